"""The shared benchmark harness: what a case is, and how one is measured.

A benchmark module (``benchmarks/bench_<op>.py``) describes *what* to run as a list of
:class:`Case` objects; this module decides *how* to time it, so every op is measured the same
way. A case is one op at one shape and dtype, compared across several :class:`Provider`\\ s
(our kernel, the PyTorch baseline a user would otherwise run, ...). A provider's ``build``
returns a :class:`Workload`: a forward closure plus the leaf tensors whose gradients the
backward computes.

Modes:

``fwd``   the forward alone, autograd recording as in training.
``bwd``   the backward alone: the forward runs once outside the timed region and the timed
          call is ``torch.autograd.grad(outputs, inputs, grad_outputs, retain_graph=True)``.
``full``  forward + backward in one timed call.

Gradients are computed with ``torch.autograd.grad`` rather than ``.backward()``, so no ``.grad``
accumulates between repetitions. Upstream gradients are fresh ``randn`` tensors made once.
"""

from __future__ import annotations

import contextlib
import gc
import os
from dataclasses import dataclass
from typing import Callable, ContextManager, Sequence

import torch

from .timing import Ceilings, Timing, TimingPolicy, peak_memory_mb, time_callable

MODES = ("fwd", "bwd", "full")

CostFn = Callable[[str], "tuple[float, float]"]
"""``cost(mode) -> (flops, bytes)`` for one call of a workload in that mode."""


class ProviderUnavailable(Exception):
    """Raised by a provider's ``build`` when it cannot run here (missing backend, no compile)."""


@dataclass
class Workload:
    """What a provider runs: ``forward()`` returns a tensor or a tuple of tensors, and
    ``grad_inputs`` are the tensors (inputs and parameters) the backward differentiates.
    ``context`` (e.g. ``lambda: lmfuse.ops.use_backend("cpp")``) is entered around every
    call, the untimed forward of ``bwd`` included, so a forced backend covers the backward."""

    forward: Callable[[], "torch.Tensor | tuple[torch.Tensor, ...]"]
    grad_inputs: Sequence[torch.Tensor] = ()
    context: Callable[[], ContextManager] | None = None


def forced_backend_workload(forward, grad_inputs: Sequence[torch.Tensor] = (),
                            backend: str | None = None) -> Workload:
    """A ``Workload`` whose calls run under ``lmfuse.ops.use_backend(backend)`` (none: the op's
    own choice). A backend that is missing, or that cannot serve these tensors, turns into
    ``ProviderUnavailable`` with its reason (probed by one untimed call), never an error row."""
    if backend is None:
        return Workload(forward, grad_inputs)
    from lmfuse import ops

    status = ops.available_backends().get(backend)
    if status is None or not status.available:
        raise ProviderUnavailable(getattr(status, "reason", f"no backend {backend!r}"))
    context = lambda: ops.use_backend(backend)  # noqa: E731
    try:
        with context():
            forward()
    except ops.BackendUnavailableError as e:
        raise ProviderUnavailable(str(e)) from e
    return Workload(forward, grad_inputs, context)


@dataclass
class Provider:
    """One implementation of a case. ``cost`` overrides the case's cost when this provider
    does different work (a dense layer instead of a low-rank one, say)."""

    name: str
    build: Callable[[], Workload]
    cost: CostFn | None = None


@dataclass
class Case:
    """One op at one shape/dtype, measured for every provider and mode.

    ``baseline`` names the provider speedups are computed against; ``target`` the provider
    the table highlights (ours). ``cuda_graph`` asks for CUDA-graph timing of the forward
    (for tiny, launch-bound ops). ``note`` goes into every row (e.g. "inputs fit in L2").
    ``headline`` marks the case(s) ``lmfuse bench`` runs first, before any op's other cases (when
    no case of a module is marked, its first case is the headline): the one number to have if a
    time budget cuts the run short. ``paired`` (CPU): after the usual timings, the target and the
    baseline are timed again in ``full`` mode in alternating pairs (``policy.cpu_paired_reps``,
    the order swapped every pair) and the median of the per-pair ratios baseline / target is
    recorded as the target's ``paired_speedup``: a machine whose speed drifts during the run
    (shared hosts) biases the ratio of two medians taken minutes apart, not this one.
    """

    op: str
    shape: str
    dtype: torch.dtype
    device: torch.device
    providers: list[Provider]
    cost: CostFn | None = None
    baseline: str | None = None
    target: str | None = None
    modes: tuple[str, ...] = MODES
    cuda_graph: bool = False
    note: str = ""
    headline: bool = False
    paired: bool = False


@dataclass
class Measurement:
    """The outcome of one (case, provider, mode): a timing, or why there is none."""

    op: str
    provider: str
    mode: str
    shape: str
    dtype: str
    status: str  # "ok", "skipped" or "error"
    note: str = ""
    timing: Timing | None = None
    peak_mem_mb: float | None = None
    flops: float | None = None
    nbytes: float | None = None
    baseline: str | None = None
    target: str | None = None
    paired_speedup: float | None = None  # see Case.paired
    paired_reps: int = 0


def _as_tuple(out) -> tuple[torch.Tensor, ...]:
    return tuple(out) if isinstance(out, (tuple, list)) else (out,)


def _mode_callable(work: Workload, mode: str) -> Callable[[], object]:
    """The closure timed for ``mode``; for ``bwd`` the forward runs here, once, untimed."""
    ctx = work.context or contextlib.nullcontext

    def wrapped(fn):
        def call():
            with ctx():
                return fn()
        return call

    if mode == "fwd":
        return wrapped(work.forward)
    inputs = [t for t in work.grad_inputs if t.requires_grad]
    if not inputs:
        raise ProviderUnavailable("no tensor requires grad, backward is not defined")
    with ctx():
        outs = _as_tuple(work.forward())
    grads = tuple(torch.randn_like(o) for o in outs)
    if mode == "bwd":
        return wrapped(lambda: torch.autograd.grad(outs, inputs, grads, retain_graph=True))
    if mode == "full":
        return wrapped(lambda: torch.autograd.grad(_as_tuple(work.forward()), inputs, grads))
    raise ValueError(f"unknown mode {mode!r}; expected one of {MODES}")


def _release(device: torch.device) -> None:
    gc.collect()
    if device.type == "cuda":
        torch.cuda.empty_cache()


def run_case(case: Case, policy: TimingPolicy, modes: Sequence[str] = MODES) -> list[Measurement]:
    """Measure every provider of ``case`` in each of ``modes`` (intersected with the case's).

    A provider whose ``build`` raises :class:`ProviderUnavailable` gives ``skipped`` rows;
    any other exception gives ``error`` rows carrying the message, and the remaining providers
    still run. The caller decides what an error means for the exit code.
    """
    wanted = [m for m in case.modes if m in modes]
    dtype = str(case.dtype).replace("torch.", "")
    out: list[Measurement] = []

    def record(prov: Provider, mode: str, status: str, note: str = "", **kw) -> None:
        cost = prov.cost or case.cost
        flops = nbytes = None
        note = note or case.note
        if cost is not None and status == "ok":
            try:
                flops, nbytes = cost(mode)
            except Exception as e:  # keep the timing; only the derived metrics are lost
                note += f"; cost formula failed: {type(e).__name__}: {e}"
        out.append(Measurement(case.op, prov.name, mode, case.shape, dtype, status,
                               note, flops=flops, nbytes=nbytes,
                               baseline=case.baseline, target=case.target, **kw))

    for prov in case.providers:
        try:
            work = prov.build()
        except ProviderUnavailable as e:
            for mode in wanted:
                record(prov, mode, "skipped", f"unavailable: {e}")
            continue
        except Exception as e:  # a provider that should run but crashed
            for mode in wanted:
                record(prov, mode, "error", f"{type(e).__name__}: {e}")
            continue
        for mode in wanted:
            try:
                fn = _mode_callable(work, mode)
                graph = case.cuda_graph and mode == "fwd"
                timing = time_callable(fn, case.device, policy, cuda_graph=graph)
                peak = peak_memory_mb(fn, case.device)
                del fn
                record(prov, mode, "ok", timing=timing, peak_mem_mb=peak)
            except ProviderUnavailable as e:
                record(prov, mode, "skipped", f"unavailable: {e}")
            except Exception as e:
                record(prov, mode, "error", f"{type(e).__name__}: {e}")
        del work
        _release(case.device)
    if case.paired and case.device.type == "cpu" and "full" in wanted and policy.cpu_paired_reps > 0:
        _paired(case, out, policy.cpu_paired_reps)
    return out


def paired_ratio(target: Callable[[], object], baseline: Callable[[], object], reps: int) -> float:
    """Median over ``reps`` pairs of (baseline time / target time), the two called back to back
    and the order swapped every pair (after one untimed call of each)."""
    import statistics
    import time

    target()
    baseline()
    ratios = []
    for i in range(reps):
        times = {}
        for name, fn in (("t", target), ("b", baseline)) if i % 2 == 0 else (("b", baseline), ("t", target)):
            start = time.perf_counter()
            fn()
            times[name] = time.perf_counter() - start
        ratios.append(times["b"] / times["t"])
    return statistics.median(ratios)


def _paired(case: Case, out: list[Measurement], reps: int) -> None:
    """Fill the target's ``paired_speedup`` in ``full`` mode where target and baseline both ran."""
    by_name = {m.provider: m for m in out if m.mode == "full"}
    tm, bm = by_name.get(case.target), by_name.get(case.baseline)
    if tm is None or bm is None or tm.status != "ok" or bm.status != "ok":
        return
    provs = {p.name: p for p in case.providers}
    try:
        t_work, b_work = provs[case.target].build(), provs[case.baseline].build()
        tm.paired_speedup = paired_ratio(_mode_callable(t_work, "full"), _mode_callable(b_work, "full"), reps)
        tm.paired_reps = reps
    except Exception as e:  # keep the case's timings; say why the paired ratio is missing
        tm.note += f"; paired timing failed: {type(e).__name__}: {e}"
    _release(case.device)


def speedups(measurements: Sequence[Measurement]) -> dict[tuple[str, str, str, str], float]:
    """``baseline median / provider median`` keyed by (op, shape, dtype, mode, provider); only
    where the case's own baseline ran (never against another provider)."""
    base: dict[tuple[str, str, str, str], float] = {}
    for m in measurements:
        if m.status == "ok" and m.provider == m.baseline:
            base[(m.op, m.shape, m.dtype, m.mode)] = m.timing.median_ms
    result = {}
    for m in measurements:
        ref = base.get((m.op, m.shape, m.dtype, m.mode))
        if m.status == "ok" and ref is not None:
            result[(m.op, m.shape, m.dtype, m.mode, m.provider)] = ref / m.timing.median_ms
    return result


def _cache_bytes(device: torch.device) -> tuple[int, str]:
    """Size and name of the cache an input set should be compared with (0 if unknown)."""
    if device.type == "cuda":
        props = torch.cuda.get_device_properties(device)
        return int(getattr(props, "L2_cache_size", 0)), "L2"
    try:  # last-level cache of cpu0, e.g. "32768K"
        base = "/sys/devices/system/cpu/cpu0/cache"
        idx = max(int(n[5:]) for n in os.listdir(base) if n.startswith("index"))
        with open(f"{base}/index{idx}/size") as f:
            txt = f.read().strip()
        with open(f"{base}/index{idx}/level") as f:
            level = f.read().strip()
        mult = {"K": 2**10, "M": 2**20, "G": 2**30}.get(txt[-1], 1)
        return int(txt.rstrip("KMG")) * mult, f"L{level}"
    except (OSError, ValueError):
        return 0, "cache"


def working_set_note(nbytes: int, device: torch.device, cuda_graph: bool = False) -> str:
    """Say how big a case's inputs are and whether the timed calls see them in cache.

    Inputs are never rotated. ``triton.testing.do_bench`` flushes the L2 before every call, so
    CUDA timings are cold-cache; CPU timings (and CUDA-graph ones) are warm-cache whenever the
    working set fits in the last-level cache, and the note says so.
    """
    cache, name = _cache_bytes(device)
    note = f"working set {nbytes / 2**20:.1f} MiB"
    if device.type == "cuda" and not cuda_graph:
        return note + ", L2 flushed before every call (do_bench)"
    if cache and nbytes <= cache:
        note += f", fits in {name} ({cache / 2**20:.0f} MiB): inputs not rotated, timings are warm-cache"
    return note


def describe_ceilings(c: Ceilings) -> str:
    """One line for the terminal."""
    return (f"ceilings: copy {c.bandwidth_gbs:.1f} GB/s ({c.copy_bytes / 2**20:.0f} MiB moved), "
            f"{c.matmul_dtype} matmul {c.matmul_tflops:.3f} TFLOP/s (n={c.matmul_n})")


def llama_1b_config():
    """Llama-3.2-1B's shape (16 layers, hidden 2048, MLP 8192, 32 heads / 8 KV heads, vocabulary
    128256, tied embeddings): the GPU size of the model-level cases (random weights, same cost)."""
    from transformers import LlamaConfig

    return LlamaConfig(vocab_size=128256, hidden_size=2048, intermediate_size=8192, num_hidden_layers=16,
                       num_attention_heads=32, num_key_value_heads=8, max_position_embeddings=4096,
                       tie_word_embeddings=True, rope_theta=500000.0, pad_token_id=0)


def training_model(name: str, device: torch.device, dtype: torch.dtype = torch.float32):
    """A causal LM in train mode, in ``dtype``, for model-level benchmark cases: ``"smollm2-135m"``
    (the bundled model; :class:`ProviderUnavailable` when it is not installed), ``"llama-1b"``
    (:func:`llama_1b_config`, seeded random weights, built on ``device``) or ``"tiny-llama"``
    (2 layers, hidden 48, vocabulary 1003, seeded)."""
    if name == "smollm2-135m":
        from ..models import load_bundled_model
        try:
            model, _ = load_bundled_model(with_tokenizer=False)
        except FileNotFoundError as e:
            raise ProviderUnavailable(f"bundled model unavailable: {e}") from e
    elif name == "llama-1b":
        from transformers import LlamaForCausalLM
        torch.manual_seed(0)
        with torch.device(device):
            model = LlamaForCausalLM(llama_1b_config())
    elif name == "tiny-llama":
        from transformers import LlamaConfig, LlamaForCausalLM
        torch.manual_seed(0)
        model = LlamaForCausalLM(LlamaConfig(
            vocab_size=1003, hidden_size=48, intermediate_size=96, num_hidden_layers=2,
            num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=64))
    else:
        raise ValueError(f"training_model: name must be 'smollm2-135m', 'llama-1b' or 'tiny-llama', got {name!r}")
    return model.to(device=device, dtype=dtype).train()
