"""Turning measurements into long-format rows, CSV/JSON files and a terminal table.

Every row holds one number: ``(op, provider, mode, shape, dtype, metric) -> value`` with its
20th/80th percentiles where they mean something, plus the run's environment (device, torch,
triton, git commit, timestamp). Metrics:

``time_ms``            median per call; p20/p80 from the timer
``tflops``, ``gbs``    from the op's flop/byte formulas; p20/p80 from the time's p80/p20
``roofline_pct``       100 * roofline time / measured time, against the ceilings of this run
``peak_mem_mb``        CUDA only: ``max_memory_allocated`` during one call (inputs included)
``speedup``            baseline median / this provider's median (``note`` names the baseline)
``paired_speedup``     CPU cases that ask for it: median of baseline / target times over
                       alternating back-to-back pairs (``note`` says how many)
``status``             skipped/error providers: value is NaN, ``note`` says why
"""

from __future__ import annotations

import csv
import datetime as _dt
import json
import math
import os
import platform
import re
import subprocess
from dataclasses import dataclass
from pathlib import Path
from typing import Sequence

from .harness import Measurement, speedups
from .timing import Ceilings, efficiency

COLUMNS = ("op", "provider", "mode", "shape", "dtype", "metric", "value", "p20", "p80", "unit",
           "status", "note", "device", "torch_version", "triton_version", "git_commit", "timestamp")

NOISY_SPREAD = 1.5  # the table marks a time whose p80 exceeds this many times its p20


@dataclass(frozen=True)
class RunInfo:
    """Where and when a benchmark ran; copied into every row."""

    device: str
    torch_version: str
    triton_version: str
    git_commit: str
    timestamp: str


def cpu_model() -> str:
    """The CPU's marketing name from /proc/cpuinfo, or ``platform.processor()``."""
    try:
        with open("/proc/cpuinfo") as f:
            for line in f:
                if line.startswith("model name"):
                    return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or platform.machine() or "unknown CPU"


# Vector-instruction tiers, best first: (label, flags that must all be present). The label is part of
# a CPU's benchmark name because one marketing name ("AMD EPYC") covers chips whose float32 GEMMs
# differ by 2x and whose bfloat16 GEMMs differ by 6x (native bf16 dot products or not).
_X86_TIERS = (("AMX", ("amx_bf16",)), ("AVX-512 BF16", ("avx512f", "avx512_bf16")), ("AVX-512", ("avx512f",)),
              ("AVX2", ("avx2", "fma")), ("AVX", ("avx",)), ("SSE", ("sse2",)))
_ARM_TIERS = (("SVE BF16", ("sve", "bf16")), ("SVE", ("sve",)), ("NEON BF16", ("asimd", "bf16")),
              ("NEON", ("asimd",)))


def cpu_isa(cpuinfo: str | None = None) -> str:
    """The widest vector-instruction tier the CPU reports (``"AVX-512 BF16"``, ``"AVX2"``,
    ``"SVE"``, ...), from the ``flags`` (x86) or ``Features`` (Arm) line of ``/proc/cpuinfo``
    (or of the text ``cpuinfo``; :func:`lmfuse._backend.cpu_flags`); ``""`` when it cannot tell."""
    from .._backend import cpu_flags

    found = cpu_flags(cpuinfo)
    if found is None:
        return ""
    arch, have = found
    tiers = _X86_TIERS if arch == "x86" else _ARM_TIERS
    return next((label for label, need in tiers if have.issuperset(need)), "")


def device_name(device) -> str:
    """A human-readable name for a torch device: the GPU's name, or the CPU model with its cores,
    threads and vector tier (``"AMD EPYC (2 cores, 2 threads, AVX2)"``)."""
    import torch

    if device.type == "cuda":
        return torch.cuda.get_device_name(device)
    isa = cpu_isa()
    return f"{cpu_model()} ({os.cpu_count()} cores, {torch.get_num_threads()} threads{', ' + isa if isa else ''})"


def slugify(name: str) -> str:
    """``"NVIDIA H100 80GB HBM3"`` -> ``"nvidia-h100-80gb-hbm3"`` (for directory names)."""
    slug = re.sub(r"[^a-z0-9]+", "-", name.lower()).strip("-")
    return slug or "unknown"


def device_slug(device) -> str:
    """Directory name for a device's results: ``cuda-<gpu>`` or ``cpu-<model>-<n>c-<tier>``
    (``cpu-amd-epyc-2c-avx2``; without the tier where :func:`cpu_isa` cannot tell)."""
    if device.type == "cuda":
        import torch

        return "cuda-" + slugify(torch.cuda.get_device_name(device))
    isa = cpu_isa()
    return f"cpu-{slugify(cpu_model())}-{os.cpu_count()}c" + (f"-{slugify(isa)}" if isa else "")


def git_commit(cwd: str | os.PathLike | None = None) -> str:
    """``git rev-parse HEAD`` of the checkout at ``cwd``, or ``"unknown"``."""
    try:
        r = subprocess.run(["git", "rev-parse", "HEAD"], cwd=cwd, capture_output=True, text=True, timeout=10)
    except (OSError, subprocess.TimeoutExpired):
        return "unknown"
    return r.stdout.strip() if r.returncode == 0 and r.stdout.strip() else "unknown"


def run_info(device, commit: str | None = None) -> RunInfo:
    """Collect the environment columns for ``device``; ``commit`` defaults to the commit of the
    checkout lmfuse is imported from ("unknown" outside a git checkout)."""
    import torch

    if commit is None:
        commit = git_commit(os.path.dirname(os.path.abspath(__file__)))

    try:
        import triton

        triton_version = triton.__version__
    except Exception:
        triton_version = "not installed"
    now = _dt.datetime.now(_dt.timezone.utc).isoformat(timespec="seconds")
    return RunInfo(device_name(device), torch.__version__, triton_version, commit, now)


def _row(m: Measurement, info: RunInfo, metric: str, value, p20=None, p80=None, unit="", note=None) -> dict:
    nan = float("nan")
    return {
        "op": m.op, "provider": m.provider, "mode": m.mode, "shape": m.shape, "dtype": m.dtype,
        "metric": metric, "value": nan if value is None else float(value),
        "p20": nan if p20 is None else float(p20), "p80": nan if p80 is None else float(p80),
        "unit": unit, "status": m.status, "note": m.note if note is None else note,
        "device": info.device, "torch_version": info.torch_version,
        "triton_version": info.triton_version, "git_commit": info.git_commit, "timestamp": info.timestamp,
    }


def to_rows(measurements: Sequence[Measurement], ceilings: Ceilings | None, info: RunInfo) -> list[dict]:
    """Long-format rows for ``measurements`` (see the module docstring for the metrics)."""
    rows: list[dict] = []
    speed = speedups(measurements)
    for m in measurements:
        if m.status != "ok":
            rows.append(_row(m, info, "status", None))
            continue
        t = m.timing
        rows.append(_row(m, info, "time_ms", t.median_ms, t.p20_ms, t.p80_ms, "ms"))
        if m.flops is not None and m.nbytes is not None:
            def rate(x, scale):
                return x / (t.median_ms * 1e-3) / scale, x / (t.p80_ms * 1e-3) / scale, x / (t.p20_ms * 1e-3) / scale
            rows.append(_row(m, info, "tflops", *rate(m.flops, 1e12), "TFLOP/s"))
            rows.append(_row(m, info, "gbs", *rate(m.nbytes, 1e9), "GB/s"))
            if ceilings is not None:
                eff = [100 * efficiency(m.flops, m.nbytes, x, ceilings) for x in (t.median_ms, t.p80_ms, t.p20_ms)]
                rows.append(_row(m, info, "roofline_pct", *eff, "%"))
        if m.peak_mem_mb is not None:
            rows.append(_row(m, info, "peak_mem_mb", m.peak_mem_mb, unit="MiB"))
        s = speed.get((m.op, m.shape, m.dtype, m.mode, m.provider))
        if s is not None:
            rows.append(_row(m, info, "speedup", s, unit="x", note=f"vs {m.baseline}"))
        if m.paired_speedup is not None:
            rows.append(_row(m, info, "paired_speedup", m.paired_speedup, unit="x",
                             note=f"vs {m.baseline}: median of {m.paired_reps} alternating pairs"))
    return rows


def write_results(rows: Sequence[dict], out_dir: str | os.PathLike, op: str,
                  ceilings: Ceilings | None = None) -> tuple[Path, Path]:
    """Write ``<op>.csv`` and ``<op>.json`` (rows + ceilings) under ``out_dir``.

    Each file is written to a temporary name and renamed into place, so a run killed while
    writing leaves the previous complete file, never a truncated one."""
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    csv_path, json_path = out / f"{op}.csv", out / f"{op}.json"
    csv_tmp, json_tmp = out / f".{op}.csv.tmp", out / f".{op}.json.tmp"
    with open(csv_tmp, "w", newline="") as f:
        w = csv.DictWriter(f, fieldnames=COLUMNS)
        w.writeheader()
        for r in rows:
            w.writerow({k: ("" if isinstance(v, float) and math.isnan(v) else v) for k, v in r.items()})
    payload = {
        "op": op,
        "ceilings": ceilings.as_dict() if ceilings else None,
        "rows": [{k: (None if isinstance(v, float) and math.isnan(v) else v) for k, v in r.items()} for r in rows],
    }
    with open(json_tmp, "w") as f:
        json.dump(payload, f, indent=1)
    os.replace(csv_tmp, csv_path)
    os.replace(json_tmp, json_path)
    return csv_path, json_path


def format_table(measurements: Sequence[Measurement], ceilings: Ceilings | None = None) -> str:
    """Providers side by side (median ms per call, ``*`` when noisy), then for each baseline the
    cases name, a ``<target> vs <baseline>`` ratio column (baseline median / target median) and
    the target's % of roofline, one line per (shape, mode).

    A ratio cell is empty where that row's case has another baseline, or where the baseline or
    the target did not run (skipped, error): a ratio is never taken against another provider."""
    if not measurements:
        return "(no measurements)"
    speed = speedups(measurements)
    providers = list(dict.fromkeys(m.provider for m in measurements))
    keys = list(dict.fromkeys((m.op, m.shape, m.dtype, m.mode) for m in measurements))
    by_key = {(m.op, m.shape, m.dtype, m.mode, m.provider): m for m in measurements}
    case_pair = {}  # (op, shape, dtype, mode) -> (target, baseline) of its case
    for m in measurements:
        case_pair.setdefault((m.op, m.shape, m.dtype, m.mode), (m.target, m.baseline))
    pairs = list(dict.fromkeys(p for p in case_pair.values() if p[0] and p[1]))
    targets = list(dict.fromkeys(t for t, _ in pairs))
    first = measurements[0]
    head = ["shape", "dtype", "mode"] + [f"{p} ms" for p in providers]
    head += [f"{t} vs {b}" for t, b in pairs] + [f"{t} roofline" for t in targets]
    lines = [head]
    for op, shape, dtype, mode in keys:
        cells = [shape, dtype, mode]
        for p in providers:
            m = by_key.get((op, shape, dtype, mode, p))
            if m is None:
                cells.append("")
            elif m.status == "ok":
                noisy = m.timing.p80_ms > NOISY_SPREAD * m.timing.p20_ms
                cells.append(f"{m.timing.median_ms:.3f}" + ("*" if noisy else ""))
            else:
                cells.append(m.status)
        mine = case_pair[(op, shape, dtype, mode)]
        for pair in pairs:
            s = speed.get((op, shape, dtype, mode, pair[0])) if pair == mine else None
            m = by_key.get((op, shape, dtype, mode, pair[0])) if pair == mine else None
            paired = f" (paired {m.paired_speedup:.2f}x)" if m is not None and m.paired_speedup is not None else ""
            cells.append((f"{s:.2f}x" if s is not None else "") + paired)
        for t in targets:
            m = by_key.get((op, shape, dtype, mode, t))
            if ceilings and m is not None and m.status == "ok" and m.flops is not None:
                cells.append(f"{100 * efficiency(m.flops, m.nbytes, m.timing.median_ms, ceilings):.1f}%")
            else:
                cells.append("n/a" if mine[0] == t else "")
        lines.append(cells)
    widths = [max(len(r[i]) for r in lines) for i in range(len(head))]
    fmt = lambda r: "  ".join(c.rjust(w) if i >= 3 else c.ljust(w) for i, (c, w) in enumerate(zip(r, widths)))
    out = [f"== {first.op} ==", fmt(lines[0]), fmt(["-" * w for w in widths])]
    out += [fmt(r) for r in lines[1:]]
    if any(m.status == "ok" and m.timing.p80_ms > NOISY_SPREAD * m.timing.p20_ms for m in measurements):
        out.append(f"  * noisy: p80 > {NOISY_SPREAD} x p20 (a busy machine?)")
    missing = {b for (op, shape, dtype, mode), (t, b) in case_pair.items()
               if t and b and speed.get((op, shape, dtype, mode, t)) is None}
    for b in sorted(missing):
        out.append(f"  empty '... vs {b}' cells: {b} (or the target) has no time there")
    problems = [m for m in measurements if m.status != "ok"]
    for m in {(m.provider, m.status, m.note): m for m in problems}.values():
        out.append(f"  {m.provider}: {m.status}: {m.note}")
    return "\n".join(out)
