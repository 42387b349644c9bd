"""The benchmark harness: timing statistics, roofline arithmetic, rows, files and plots.

These check the harness's bookkeeping with plain torch callables; they assert no speed.
"""

import csv
import json
import math
import time

import pytest
import torch

from lmfuse.bench import (Case, Ceilings, Provider, ProviderUnavailable, TimingPolicy, Workload,
                          efficiency, measure_ceilings, roofline_ms, run_case, summarize)
from lmfuse.bench.plot import plot_op
from lmfuse.bench.report import COLUMNS, RunInfo, format_table, slugify, to_rows, write_results
from lmfuse.bench.timing import time_callable

CPU = torch.device("cpu")
FAST = TimingPolicy.for_scale("tiny")
INFO = RunInfo("test-cpu", torch.__version__, "n/a", "abc123", "2026-01-01T00:00:00+00:00")
CEIL = Ceilings(bandwidth_gbs=100.0, matmul_tflops=10.0, matmul_dtype="float32", copy_bytes=1, matmul_n=1)


def test_summarize_hand_numbers():
    t = summarize([5.0, 1.0, 4.0, 2.0, 3.0])
    assert t.median_ms == 3.0
    assert t.p20_ms == pytest.approx(1.8)  # numpy's linear interpolation: 1 + 0.8 * (2 - 1)
    assert t.p80_ms == pytest.approx(4.2)
    assert t.reps == 5
    with pytest.raises(ValueError):
        summarize([])


def test_cpu_timing_of_trivial_callable_is_sane():
    a, b = torch.randn(64, 64), torch.randn(64, 64)
    t = time_callable(lambda: a @ b, CPU, FAST)
    assert 0 < t.p20_ms <= t.median_ms <= t.p80_ms
    assert FAST.cpu_min_reps <= t.reps <= FAST.cpu_max_reps


def test_cpu_timing_sees_a_sleep():
    t = time_callable(lambda: time.sleep(0.005), CPU, FAST)
    assert t.median_ms >= 5.0


def test_roofline_and_efficiency_on_hand_numbers():
    # 1 TFLOP at 10 TFLOP/s = 100 ms; 1 GB at 100 GB/s = 10 ms -> compute bound, 100 ms.
    assert roofline_ms(1e12, 1e9, CEIL) == pytest.approx(100.0)
    assert efficiency(1e12, 1e9, 200.0, CEIL) == pytest.approx(0.5)
    # 1 GFLOP = 0.1 ms; 10 GB = 100 ms -> memory bound.
    assert roofline_ms(1e9, 1e10, CEIL) == pytest.approx(100.0)
    assert efficiency(1e9, 1e10, 400.0, CEIL) == pytest.approx(0.25)
    with pytest.raises(ValueError):
        efficiency(1.0, 1.0, 0.0, CEIL)


def _matmul_provider(name, n=32, sleep_s=0.0):
    def build():
        a = torch.randn(n, n, requires_grad=True)
        b = torch.randn(n, n, requires_grad=True)

        def forward():
            if sleep_s:
                time.sleep(sleep_s)
            return a @ b, (a * 2).sum(0)
        return Workload(forward, [a, b])
    return Provider(name, build)


def _unavailable():
    raise ProviderUnavailable("no such backend here")


def _broken():
    raise RuntimeError("kernel exploded")


def _case(providers, **kw):
    return Case("toy", "n=32", torch.float32, CPU, providers,
                cost=lambda mode: ({"fwd": 1e6, "bwd": 2e6, "full": 3e6}[mode], 1e5),
                baseline="slow", target="fast", **kw)


def test_run_case_statuses_and_modes():
    case = _case([_matmul_provider("fast"), Provider("missing", _unavailable), Provider("broken", _broken)])
    ms = run_case(case, FAST)
    by = {(m.provider, m.mode): m for m in ms}
    assert len(ms) == 9
    for mode in ("fwd", "bwd", "full"):
        ok = by[("fast", mode)]
        assert ok.status == "ok" and ok.timing.median_ms > 0
        assert ok.flops == {"fwd": 1e6, "bwd": 2e6, "full": 3e6}[mode]
        assert by[("missing", mode)].status == "skipped"
        assert "no such backend" in by[("missing", mode)].note
        assert by[("broken", mode)].status == "error"
        assert "kernel exploded" in by[("broken", mode)].note
    assert [m.mode for m in run_case(case, FAST, modes=["bwd"]) if m.provider == "fast"] == ["bwd"]


def test_bwd_mode_excludes_the_forward():
    # The forward sleeps 250 ms (far above the noise of a busy 2-core machine); bwd must not
    # pay it, full must.
    ms = run_case(_case([_matmul_provider("fast", sleep_s=0.25)]), FAST)
    t = {m.mode: m.timing.median_ms for m in ms}
    assert t["fwd"] >= 250 and t["full"] >= 250
    assert t["bwd"] < 250


def test_rows_have_every_column_and_sane_derived_metrics(tmp_path):
    case = _case([_matmul_provider("slow", sleep_s=0.1), _matmul_provider("fast"),
                  Provider("missing", _unavailable)])
    ms = run_case(case, FAST)
    rows = to_rows(ms, CEIL, INFO)
    assert rows and all(set(r) == set(COLUMNS) for r in rows)
    metrics = {(r["provider"], r["mode"], r["metric"]): r for r in rows}
    assert metrics[("slow", "full", "speedup")]["value"] == pytest.approx(1.0)
    assert metrics[("fast", "full", "speedup")]["value"] > 1.0  # the slow one sleeps 100 ms a call
    tf = metrics[("fast", "fwd", "tflops")]
    t = metrics[("fast", "fwd", "time_ms")]
    assert tf["value"] == pytest.approx(1e6 / (t["value"] * 1e-3) / 1e12)
    assert tf["p20"] <= tf["value"] <= tf["p80"]
    eff = metrics[("fast", "fwd", "roofline_pct")]["value"]
    assert eff == pytest.approx(100 * efficiency(1e6, 1e5, t["value"], CEIL))
    assert metrics[("missing", "fwd", "status")]["status"] == "skipped"
    assert all(r["git_commit"] == "abc123" for r in rows)

    csv_path, json_path = write_results(rows, tmp_path / "out", "toy", CEIL)
    with open(csv_path) as f:
        reader = csv.DictReader(f)
        assert tuple(reader.fieldnames) == COLUMNS
        back = list(reader)
    assert len(back) == len(rows)
    payload = json.loads(json_path.read_text())
    assert payload["ceilings"]["matmul_tflops"] == 10.0
    assert len(payload["rows"]) == len(rows) and set(payload["rows"][0]) == set(COLUMNS)

    table = format_table(ms, CEIL)
    assert "slow ms" in table and "fast ms" in table and "fast vs slow" in table
    assert "skipped" in table and "no such backend" in table

    png = plot_op(ms, tmp_path / "out" / "toy.png", CEIL, title="test")
    data = png.read_bytes()
    assert data[:8] == b"\x89PNG\r\n\x1a\n" and len(data) > 1000


def test_plot_refuses_when_nothing_ran(tmp_path):
    ms = run_case(_case([Provider("missing", _unavailable)]), FAST)
    with pytest.raises(ValueError):
        plot_op(ms, tmp_path / "x.png")


def test_cpu_ceilings_are_positive_and_finite():
    c = measure_ceilings(CPU, "tiny")
    assert 0 < c.bandwidth_gbs < 1e5 and math.isfinite(c.bandwidth_gbs)
    assert 0 < c.matmul_tflops < 1e3
    assert c.matmul_dtype == "float32"


def test_slugify():
    assert slugify("NVIDIA H100 80GB HBM3") == "nvidia-h100-80gb-hbm3"
    assert slugify("  ///  ") == "unknown"


def test_discovery_finds_the_low_rank_linear_benchmark():
    from lmfuse.bench import suite

    found = suite.discover()
    assert "low_rank_linear" in found
    op, module = suite.load(found["low_rank_linear"])
    assert op == "low_rank_linear"
    cases = module.cases("tiny", CPU)
    assert cases and all(c.baseline in [p.name for p in c.providers] for c in cases)
    assert {"reference", "lpa-separate-linear", "dense-linear"} <= {p.name for p in cases[0].providers}


def test_low_rank_linear_bench_cost_formulas():
    from lmfuse.bench import suite

    _, module = suite.load(suite.discover()["low_rank_linear"])
    T, d = 8, 16
    flops, nbytes = module.dense_cost(T, d, 4, "fwd")
    assert flops == 4 * 2 * T * d * d
    assert nbytes == 4 * 4 * (2 * T * d + d * d)
    full = module.dense_cost(T, d, 4, "full")
    assert full[0] == flops + module.dense_cost(T, d, 4, "bwd")[0]


def test_cuda_timer_asks_do_bench_for_median_p20_p80(monkeypatch):
    # No GPU needed: check the harness calls do_bench the way it means to and unpacks it.
    import triton.testing

    from lmfuse.bench import timing

    seen = {}

    def fake_do_bench(fn, warmup, rep, quantiles):
        seen.update(warmup=warmup, rep=rep, quantiles=quantiles)
        return [2.0, 1.5, 3.0]

    monkeypatch.setattr(triton.testing, "do_bench", fake_do_bench)
    t = timing.time_cuda(lambda: None, FAST)
    assert seen == {"warmup": FAST.warmup_ms, "rep": FAST.rep_ms, "quantiles": [0.5, 0.2, 0.8]}
    assert (t.median_ms, t.p20_ms, t.p80_ms) == (2.0, 1.5, 3.0)


@pytest.mark.gpu
def test_cuda_timing_and_peak_memory_are_sane():
    from lmfuse.bench.timing import peak_memory_mb

    dev = torch.device("cuda")
    a = torch.randn(1024, 1024, device=dev)
    t = time_callable(lambda: a @ a, dev, FAST)
    assert 0 < t.p20_ms <= t.median_ms <= t.p80_ms
    assert peak_memory_mb(lambda: a @ a, dev) >= 8.0  # a and the 4 MiB result at least


def test_table_marks_noisy_times_and_computes_speedup():
    from lmfuse.bench import Measurement, Timing

    def m(provider, med, p20, p80):
        return Measurement("toy", provider, "fwd", "n=1", "float32", "ok", timing=Timing(med, p20, p80, 5),
                           baseline="base", target="ours")
    table = format_table([m("base", 4.0, 3.9, 4.1), m("ours", 2.0, 1.0, 3.0)])
    line = next(ln for ln in table.splitlines() if ln.startswith("n=1"))
    assert "4.000 " in line + " " and "2.000*" in line and "2.00x" in line
    assert "noisy" in table
