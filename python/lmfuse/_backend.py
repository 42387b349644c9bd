"""Backend discovery and choice.

Four backends can implement an op:

``cuda``       the compiled CUDA extension ``lmfuse._C_cuda`` (CUDA tensors)
``triton``     Triton kernels (CUDA tensors; CPU tensors only under ``TRITON_INTERPRET=1``)
``cpp``        the compiled CPU extension ``lmfuse._C`` (CPU tensors)
``reference``  plain PyTorch, any device

Each op declares which backends it implements, in order of preference per device type. The
first available one wins, unless a backend is forced, by ``LMFUSE_BACKEND=<name>`` or by the
:func:`use_backend` context manager; a forced backend that cannot serve the call raises
:class:`BackendUnavailableError` and never falls back silently.

Nothing here runs at import time: no CUDA context, no compilation, no extension import.
"""

from __future__ import annotations

import contextlib
import functools
import importlib
import os
import threading
from dataclasses import dataclass

BACKENDS = ("cuda", "triton", "cpp", "reference")


class BackendUnavailableError(RuntimeError):
    """A forced backend cannot run the requested op on the given tensors."""


@dataclass(frozen=True)
class BackendStatus:
    name: str
    available: bool
    reason: str

    def __bool__(self) -> bool:  # so `if available_backends()["triton"]:` reads naturally
        return self.available


_local = threading.local()


def cpu_flags(cpuinfo: str | None = None) -> tuple[str, frozenset[str]] | None:
    """``("x86", flags)`` or ``("arm", features)`` of the first CPU listed in ``/proc/cpuinfo`` (or
    in the text ``cpuinfo``); None when there is no such line (another OS, another architecture).
    The file is read once per process."""
    if cpuinfo is None:
        if not _CPU_FLAGS:
            try:
                with open("/proc/cpuinfo") as f:
                    text = f.read()
            except OSError:
                text = ""
            _CPU_FLAGS.append(cpu_flags(text))
        return _CPU_FLAGS[0]
    for line in cpuinfo.splitlines():
        key, sep, value = line.partition(":")
        key = key.strip()
        if sep and key in ("flags", "Features"):
            return ("x86" if key == "flags" else "arm", frozenset(value.split()))
    return None


_CPU_FLAGS: list = []  # cpu_flags() of this machine, once read


def _import_status(module: str) -> tuple[object | None, str]:
    try:
        return importlib.import_module(module), ""
    except Exception as e:  # ImportError, or an undefined symbol in a stale build
        return None, f"{module} not importable: {type(e).__name__}: {e}"


@functools.lru_cache(maxsize=None)
def _cpp_status() -> BackendStatus:
    mod, why = _import_status("lmfuse._C")
    if mod is None:
        return BackendStatus("cpp", False, why + " (build with `pip install --no-build-isolation .`)")
    return BackendStatus("cpp", True, "lmfuse._C built" + (" with OpenMP" if mod.has_openmp() else " without OpenMP"))


def cpu_extension():
    """The compiled CPU extension ``lmfuse._C``, or None when it is not built or not importable
    (for host-side helpers that have a PyTorch fallback)."""
    return importlib.import_module("lmfuse._C") if _cpp_status().available else None


def _cuda_device_present() -> bool:
    import torch

    # is_available() queries the driver for a device count; it creates no context.
    return torch.version.cuda is not None and torch.cuda.is_available()


@functools.lru_cache(maxsize=None)
def _cuda_ext_status() -> BackendStatus:
    import torch

    if torch.version.cuda is None:
        return BackendStatus("cuda", False, "torch is a CPU-only build")
    mod, why = _import_status("lmfuse._C_cuda")
    if mod is None:
        return BackendStatus("cuda", False, why + " (built only where torch has CUDA and nvcc exists)")
    if not _cuda_device_present():
        return BackendStatus("cuda", False, "extension built, but no CUDA device is visible")
    return BackendStatus("cuda", True, "lmfuse._C_cuda built for " + mod.build_archs())


def triton_interpreted() -> bool:
    return os.environ.get("TRITON_INTERPRET", "0") == "1"


@functools.lru_cache(maxsize=None)
def _triton_status() -> BackendStatus:
    try:
        import triton
    except Exception as e:
        return BackendStatus("triton", False, f"triton not importable: {e}")
    if triton_interpreted():
        return BackendStatus("triton", True, f"triton {triton.__version__} in interpreter mode (TRITON_INTERPRET=1)")
    if _cuda_device_present():
        return BackendStatus("triton", True, f"triton {triton.__version__} on CUDA")
    return BackendStatus("triton", False, f"triton {triton.__version__} present but no CUDA device "
                         "(set TRITON_INTERPRET=1 before import to run kernels on the CPU)")


def backend_status(name: str) -> BackendStatus:
    if name == "cuda":
        return _cuda_ext_status()
    if name == "triton":
        return _triton_status()
    if name == "cpp":
        return _cpp_status()
    if name == "reference":
        return BackendStatus("reference", True, "plain PyTorch, always available")
    raise ValueError(f"unknown backend {name!r}; expected one of {BACKENDS}")


def available_backends() -> dict[str, BackendStatus]:
    """Which backends work in this process, and why the others don't.

    Returns a dict ``name -> BackendStatus(name, available, reason)`` for every backend in
    :data:`BACKENDS`. Calling it imports the extensions (cheap) but initialises no CUDA context.
    """
    return {b: backend_status(b) for b in BACKENDS}


def forced_backend() -> str | None:
    name = getattr(_local, "forced", None) or os.environ.get("LMFUSE_BACKEND") or None
    if name is not None and name not in BACKENDS:
        raise ValueError(f"LMFUSE_BACKEND={name!r} is not a backend; expected one of {BACKENDS}")
    return name


@contextlib.contextmanager
def use_backend(name: str | None):
    """Force ``name`` for every op called in this thread inside the block (``None`` un-forces)."""
    if name is not None and name not in BACKENDS:
        raise ValueError(f"unknown backend {name!r}; expected one of {BACKENDS}")
    prev = getattr(_local, "forced", None)
    _local.forced = name
    try:
        yield
    finally:
        _local.forced = prev


def _serves(name: str, device_type: str) -> tuple[bool, str]:
    st = backend_status(name)
    if not st.available:
        return False, st.reason
    if name == "cuda" and device_type != "cuda":
        return False, f"the cuda backend needs CUDA tensors, got {device_type} tensors"
    if name == "cpp" and device_type != "cpu":
        return False, f"the cpp backend needs CPU tensors, got {device_type} tensors"
    if name == "triton" and device_type == "cpu" and not triton_interpreted():
        return False, "triton on CPU tensors needs TRITON_INTERPRET=1"
    if name == "triton" and device_type not in ("cpu", "cuda"):
        return False, f"triton does not run on {device_type} tensors"
    return True, ""


def choose_backend(op: str, device_type: str, preference: dict[str, tuple[str, ...]]) -> str:
    """Pick the backend for one call of ``op`` on tensors of ``device_type``.

    ``preference`` maps a device type ('cuda', 'cpu') to the op's backends in order; any
    other device gets ``('reference',)``. The Triton interpreter is never picked on its own
    for CPU tensors (it is a testing tool); force it to use it.
    """
    implemented = {b for order in preference.values() for b in order} | {"reference"}
    forced = forced_backend()
    if forced is not None:
        if forced not in implemented:
            raise BackendUnavailableError(
                f"{op}: backend {forced!r} is forced but {op} implements only {sorted(implemented)}")
        ok, why = _serves(forced, device_type)
        if not ok:
            raise BackendUnavailableError(f"{op}: backend {forced!r} is forced but unusable: {why}")
        return forced
    for name in preference.get(device_type, ("reference",)):
        if name == "triton" and device_type == "cpu":
            continue
        if _serves(name, device_type)[0]:
            return name
    return "reference"
