"""Helpers shared by every op: argument checks with clear messages, backend choice per call."""

from __future__ import annotations

import torch

from .._backend import BackendUnavailableError, choose_backend, forced_backend

KERNEL_DTYPES = (torch.float32, torch.float16, torch.bfloat16)


def check_tensor(name: str, t, *, ndim: int | None = None, min_ndim: int | None = None,
                 dtypes: tuple[torch.dtype, ...] | None = None) -> None:
    if not isinstance(t, torch.Tensor):
        raise TypeError(f"{name} must be a torch.Tensor, got {type(t).__name__}")
    if ndim is not None and t.dim() != ndim:
        raise ValueError(f"{name} must be {ndim}-D, got shape {tuple(t.shape)}")
    if min_ndim is not None and t.dim() < min_ndim:
        raise ValueError(f"{name} must have at least {min_ndim} dimension(s), got shape {tuple(t.shape)}")
    if dtypes is not None and t.dtype not in dtypes:
        raise TypeError(f"{name} must have dtype in {[str(d) for d in dtypes]}, got {t.dtype}")


def check_same(first_name: str, first: torch.Tensor, **others: torch.Tensor | None) -> None:
    """Every tensor in ``others`` has ``first``'s dtype and device."""
    for name, t in others.items():
        if t is None:
            continue
        if t.dtype != first.dtype:
            raise TypeError(f"{name} has dtype {t.dtype} but {first_name} has {first.dtype}; they must match")
        if t.device != first.device:
            raise ValueError(f"{name} is on {t.device} but {first_name} is on {first.device}; they must match")


def check_dim(name: str, got: int, expected: int, what: str) -> None:
    if got != expected:
        raise ValueError(f"{name}: expected {what} = {expected}, got {got}")


def pick_backend(op: str, t: torch.Tensor, preference: dict[str, tuple[str, ...]],
                 unsupported: dict[str, str] | None = None) -> str:
    """Backend for one call.

    ``preference`` maps a device type, or a ``(device type, dtype)`` pair that overrides it, to
    backends in order. ``unsupported`` maps backends that cannot take *this* call (dtype, rank
    too large, ...) to the reason: they are skipped when choosing, and raise if forced."""
    unsupported = unsupported or {}
    forced = forced_backend()
    if forced is not None and forced in unsupported:
        raise BackendUnavailableError(f"{op}: backend {forced!r} is forced but cannot run this call: "
                                      f"{unsupported[forced]}")
    dev = t.device.type
    order = preference.get((dev, t.dtype), preference.get(dev, ("reference",)))
    pref = {dev: tuple(b for b in order if b not in unsupported)}
    for other, o in preference.items():  # the op's full backend list, for the forced-backend check
        if isinstance(other, str) and other != dev:
            pref[other] = o
    return choose_backend(op, dev, pref)


def dtype_limits(t: torch.Tensor, backends: tuple[str, ...]) -> dict[str, str]:
    if t.dtype in KERNEL_DTYPES:
        return {}
    return {b: f"kernels take {[str(d) for d in KERNEL_DTYPES]}, got {t.dtype}" for b in backends}


def grad_or_none(t: torch.Tensor, needed: bool) -> torch.Tensor | None:
    return t if needed else None


def empty_like_none(ref: torch.Tensor) -> torch.Tensor:
    """Placeholder output for a gradient that was not asked for (custom ops return tensors)."""
    return ref.new_empty((0,))


def cost_for_mode(fwd: tuple[int, int], bwd: tuple[int, int], mode: str) -> tuple[int, int]:
    """(flops, bytes) for a benchmark mode from the op's forward and backward formulas."""
    if mode == "fwd":
        return fwd
    if mode == "bwd":
        return bwd
    if mode == "full":
        return fwd[0] + bwd[0], fwd[1] + bwd[1]
    raise ValueError(f"mode must be 'fwd', 'bwd' or 'full', got {mode!r}")


def backward_frees_graph(grad: torch.Tensor) -> bool:
    """True in an eager backward whose graph is freed after it (no ``retain_graph`` /
    ``create_graph``): no later backward can read what the forward stored, so a gradient computed
    in the forward may be scaled in place and handed to autograd. False in traced backwards
    (torch.compile, opcheck: compiling, or tensor subclasses) and outside any backward (the engine
    then reports a kept graph)."""
    if type(grad) is not torch.Tensor or torch.compiler.is_compiling():
        return False
    return not torch._C._autograd._get_current_graph_task_keep_graph()
