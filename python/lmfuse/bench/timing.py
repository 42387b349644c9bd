"""Timers and device ceilings shared by every benchmark.

On CUDA the timer is :func:`triton.testing.do_bench` (or ``do_bench_cudagraph`` for tiny
launch-bound ops) asked for the 50th, 20th and 80th percentiles. On the CPU it is a
``time.perf_counter`` loop: warm-up calls first, then enough repeats to fill a time budget;
the thread count is left as torch chose it.

The ceilings (:func:`measure_ceilings`) are measured in the same process as the benchmark, so a
row's "% of roofline" compares against what this machine did today, not a datasheet.
"""

from __future__ import annotations

import statistics
import time
from dataclasses import asdict, dataclass
from typing import Callable

import torch


@dataclass(frozen=True)
class TimingPolicy:
    """How hard to time one callable.

    ``warmup_ms``/``rep_ms`` go to ``do_bench`` on CUDA. On the CPU, ``cpu_warmup`` calls run
    untimed, then calls repeat until ``cpu_budget_s`` has passed, clamped to
    ``[cpu_min_reps, cpu_max_reps]`` calls. ``cpu_paired_reps``: pairs for a case's paired ratio
    (:attr:`lmfuse.bench.harness.Case.paired`).
    """

    warmup_ms: int = 25
    rep_ms: int = 100
    cpu_warmup: int = 2
    cpu_budget_s: float = 0.3
    cpu_min_reps: int = 5
    cpu_max_reps: int = 200
    # alternating target / baseline pairs for a case that asks for a paired ratio (CPU, ``full``)
    cpu_paired_reps: int = 6

    @classmethod
    def for_scale(cls, scale: str) -> "TimingPolicy":
        """Policy for a benchmark scale: ``"tiny"`` (tests), ``"quick"`` or ``"full"``."""
        if scale == "tiny":
            return cls(warmup_ms=5, rep_ms=10, cpu_warmup=1, cpu_budget_s=0.02, cpu_min_reps=3, cpu_max_reps=10,
                       cpu_paired_reps=2)
        if scale == "quick":
            return cls(warmup_ms=10, rep_ms=50, cpu_warmup=1, cpu_budget_s=0.15, cpu_min_reps=5, cpu_max_reps=100,
                       cpu_paired_reps=4)
        return cls()


@dataclass(frozen=True)
class Timing:
    """Milliseconds per call: the median and the 20th/80th percentiles."""

    median_ms: float
    p20_ms: float
    p80_ms: float
    reps: int


def _quantile(sorted_vals: list[float], q: float) -> float:
    """Linear-interpolated quantile of an already sorted list (numpy's default method)."""
    if len(sorted_vals) == 1:
        return sorted_vals[0]
    pos = q * (len(sorted_vals) - 1)
    lo = int(pos)
    hi = min(lo + 1, len(sorted_vals) - 1)
    return sorted_vals[lo] + (sorted_vals[hi] - sorted_vals[lo]) * (pos - lo)


def summarize(samples_ms: list[float]) -> Timing:
    """Median, p20 and p80 of raw per-call times in milliseconds."""
    if not samples_ms:
        raise ValueError("summarize: no samples")
    s = sorted(samples_ms)
    return Timing(statistics.median(s), _quantile(s, 0.2), _quantile(s, 0.8), len(s))


def time_cpu(fn: Callable[[], object], policy: TimingPolicy) -> Timing:
    """Wall-clock timing of ``fn`` on the CPU (each call timed on its own)."""
    for _ in range(policy.cpu_warmup):
        fn()
    samples: list[float] = []
    start = time.perf_counter()
    while True:
        t0 = time.perf_counter()
        fn()
        samples.append((time.perf_counter() - t0) * 1e3)
        n = len(samples)
        if n >= policy.cpu_max_reps:
            break
        if n >= policy.cpu_min_reps and time.perf_counter() - start >= policy.cpu_budget_s:
            break
    return summarize(samples)


def time_cuda(fn: Callable[[], object], policy: TimingPolicy, cuda_graph: bool = False) -> Timing:
    """``triton.testing.do_bench`` (or its CUDA-graph variant) at the median, p20 and p80."""
    import triton.testing

    q = [0.5, 0.2, 0.8]
    if cuda_graph:
        med, p20, p80 = triton.testing.do_bench_cudagraph(fn, rep=policy.rep_ms, quantiles=q)
    else:
        med, p20, p80 = triton.testing.do_bench(fn, warmup=policy.warmup_ms, rep=policy.rep_ms, quantiles=q)
    return Timing(float(med), float(p20), float(p80), -1)  # do_bench does not say how many reps


def time_callable(fn: Callable[[], object], device: torch.device, policy: TimingPolicy,
                  cuda_graph: bool = False) -> Timing:
    """Time ``fn`` with the timer that suits ``device``."""
    if device.type == "cuda":
        return time_cuda(fn, policy, cuda_graph)
    return time_cpu(fn, policy)


def peak_memory_mb(fn: Callable[[], object], device: torch.device) -> float | None:
    """Peak allocated memory (MiB, inputs and weights included) during one call, CUDA only."""
    if device.type != "cuda":
        return None
    torch.cuda.synchronize(device)
    torch.cuda.reset_peak_memory_stats(device)
    fn()
    torch.cuda.synchronize(device)
    return torch.cuda.max_memory_allocated(device) / 2**20


def status_mib(key: str) -> float:
    """A ``/proc/self/status`` memory field (``VmRSS``, ``VmHWM``, ...) in MiB (Linux)."""
    import re

    with open("/proc/self/status") as f:
        return int(re.search(rf"^{key}:\s+(\d+) kB", f.read(), re.M).group(1)) / 1024


def extra_memory_mib(fn: Callable[[], object], device: torch.device) -> tuple[float, float]:
    """``(base, peak)`` MiB around one call of ``fn``: allocated memory on CUDA, the resident set
    on CPU (the peak ``VmHWM`` reset to the current ``VmRSS`` first; Linux). The result of ``fn``
    is dropped only after the peak is read, so memory it returns counts."""
    if device.type == "cuda":
        torch.cuda.synchronize(device)
        base = torch.cuda.memory_allocated(device) / 2**20
        torch.cuda.reset_peak_memory_stats(device)
        out = fn()
        torch.cuda.synchronize(device)
        peak = torch.cuda.max_memory_allocated(device) / 2**20
    else:
        base = status_mib("VmRSS")
        with open("/proc/self/clear_refs", "w") as f:
            f.write("5")  # reset the peak resident set (VmHWM) to the current one
        out = fn()
        peak = status_mib("VmHWM")
    del out
    return base, peak


@dataclass(frozen=True)
class Ceilings:
    """Measured peak bandwidth (GB/s, read + write counted) and matmul throughput (TFLOP/s)."""

    bandwidth_gbs: float
    matmul_tflops: float
    matmul_dtype: str
    copy_bytes: int
    matmul_n: int

    def as_dict(self) -> dict:
        return asdict(self)


def measure_ceilings(device: torch.device, scale: str = "full") -> Ceilings:
    """A large copy and a large square matmul on ``device``, timed with the same timers.

    CUDA: a 1 GiB device-to-device copy and a bf16 8192^3 matmul. CPU: a 256 MiB memcpy (far
    larger than any L3) and an fp32 matmul (2048^3, or 1024^3 for tiny/quick runs).
    A ceiling is a peak, so it is computed from the fast (20th-percentile) time: on a busy
    machine this keeps it from sinking with the noise, and efficiencies stay conservative.
    """
    policy = TimingPolicy.for_scale("quick" if scale == "tiny" else scale)
    if device.type == "cuda":
        copy_numel, n, dtype = 2**30 // 2, 8192, torch.bfloat16
    else:
        copy_numel = (16 if scale == "tiny" else 64) * 2**20 // 4 * 4
        n, dtype = (1024 if scale in ("tiny", "quick") else 2048), torch.float32
    src = torch.randn(copy_numel, device=device, dtype=torch.float32 if device.type == "cpu" else torch.bfloat16)
    dst = torch.empty_like(src)
    t_copy = time_callable(lambda: dst.copy_(src), device, policy)
    copy_bytes = 2 * src.numel() * src.element_size()
    del src, dst
    a = torch.randn(n, n, device=device, dtype=dtype)
    b = torch.randn(n, n, device=device, dtype=dtype)
    t_mm = time_callable(lambda: a @ b, device, policy)
    return Ceilings(
        bandwidth_gbs=copy_bytes / (t_copy.p20_ms * 1e-3) / 1e9,
        matmul_tflops=2 * n**3 / (t_mm.p20_ms * 1e-3) / 1e12,
        matmul_dtype=str(dtype).replace("torch.", ""),
        copy_bytes=copy_bytes,
        matmul_n=n,
    )


def roofline_ms(flops: float, nbytes: float, ceilings: Ceilings) -> float:
    """Lower bound on the time of a kernel: ``max(flops / peak_flops, bytes / peak_bw)``."""
    t_compute = flops / (ceilings.matmul_tflops * 1e12)
    t_memory = nbytes / (ceilings.bandwidth_gbs * 1e9)
    return max(t_compute, t_memory) * 1e3


def efficiency(flops: float, nbytes: float, measured_ms: float, ceilings: Ceilings) -> float:
    """Fraction of the roofline reached: roofline time / measured time (1.0 = at the ceiling)."""
    if measured_ms <= 0:
        raise ValueError(f"efficiency: measured time must be positive, got {measured_ms}")
    return roofline_ms(flops, nbytes, ceilings) / measured_ms
