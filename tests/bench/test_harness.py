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
from lmfuse.bench.report import COLUMNS, RunInfo, cpu_isa, device_name, device_slug, format_table, slugify, to_rows, write_results
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


def test_plot_keeps_ops_that_share_a_shape_apart(tmp_path, monkeypatch):
    """A bench module that measures two ops on the same shapes (a loss and its log-probs): every
    (op, shape, dtype) gets its own bar group, so no op's bar hides behind the other's."""
    import dataclasses

    import matplotlib.axes

    ms = run_case(_case([_matmul_provider("slow"), _matmul_provider("fast")]), FAST)
    both = list(ms) + [dataclasses.replace(m, op="toy_logp") for m in ms]
    groups = []
    real = matplotlib.axes.Axes.set_xticklabels
    monkeypatch.setattr(matplotlib.axes.Axes, "set_xticklabels",
                        lambda self, labels, **kw: (groups.append(list(labels)), real(self, labels, **kw))[1])
    plot_op(both, tmp_path / "two.png")
    assert groups and all(len(g) == 2 and g[0].startswith(ms[0].op) and g[1].startswith("toy_logp") for g in groups)
    groups.clear()
    plot_op(ms, tmp_path / "one.png")
    assert groups and all(len(g) == 1 and not g[0].startswith(ms[0].op) for g in groups)


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


_X86 = "processor\t: 0\nmodel name\t: AMD EPYC\nflags\t\t: fpu sse sse2 avx fma avx2 {extra}\n"


@pytest.mark.parametrize("extra, tier", [("", "AVX2"), ("avx512f avx512bw", "AVX-512"),
                                         ("avx512f avx512_bf16", "AVX-512 BF16"),
                                         ("avx512f avx512_bf16 amx_tile amx_bf16", "AMX")])
def test_cpu_isa_reads_the_widest_x86_tier(extra, tier):
    assert cpu_isa(_X86.format(extra=extra)) == tier


def test_cpu_isa_arm_and_unknown():
    assert cpu_isa("processor\t: 0\nFeatures\t: fp asimd sve bf16\n") == "SVE BF16"
    assert cpu_isa("processor\t: 0\nFeatures\t: fp asimd\n") == "NEON"
    assert cpu_isa("processor\t: 0\nflags\t: fpu\n") == ""  # no tier it knows
    assert cpu_isa("model name\t: something\n") == ""  # no flags line


def test_cpu_device_name_and_slug_carry_the_tier():
    isa = cpu_isa()
    name, slug = device_name(CPU), device_slug(CPU)
    assert slug.startswith("cpu-") and slug == slugify(slug)
    if isa:
        assert name.endswith(f", {isa})") and slug.endswith("-" + slugify(isa))
    else:
        assert name.endswith("threads)")


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


# ------------------------------------------------------------------ ratio columns


def _timed(provider, med, shape, baseline, target="ours", status="ok"):
    from lmfuse.bench import Measurement, Timing

    return Measurement("toy", provider, "fwd", shape, "float32", status,
                       timing=Timing(med, med, med, 5) if status == "ok" else None,
                       note="" if status == "ok" else "unavailable: refused", baseline=baseline, target=target)


def test_ratio_columns_name_their_baseline_and_stay_empty_without_it():
    # B=1 compares with "assisted"; B=4 cannot run "assisted" (skipped) and compares with "greedy".
    ms = [_timed("ours", 1.0, "B=1", "assisted"), _timed("assisted", 3.0, "B=1", "assisted"),
          _timed("greedy", 5.0, "B=1", "assisted"),
          _timed("ours", 2.0, "B=4", "greedy"), _timed("assisted", 0, "B=4", "greedy", status="skipped"),
          _timed("greedy", 8.0, "B=4", "greedy")]
    lines = format_table(ms).splitlines()
    head = lines[1]
    cols = [c for c in head.split("  ") if c.strip()]
    assert "ours vs assisted" in cols and "ours vs greedy" in cols
    vs_a, vs_g = cols.index("ours vs assisted"), cols.index("ours vs greedy")

    def cells(shape):
        line = next(ln for ln in lines if ln.startswith(shape))
        # every column is right-aligned under its header: cut the line at the header's column edges
        ends = [head.index(c) + len(c) for c in cols]
        starts = [0] + [e + 2 for e in ends[:-1]]
        return [line[s:e].strip() for s, e in zip(starts, ends)]

    b1, b4 = cells("B=1"), cells("B=4")
    assert b1[vs_a] == "3.00x" and b1[vs_g] == ""
    assert b4[vs_a] == "" and b4[vs_g] == "4.00x"  # never 8/2 under the "assisted" header


def test_ratio_is_empty_when_the_baseline_did_not_run():
    ms = [_timed("ours", 1.0, "n=1", "base"), _timed("base", 0, "n=1", "base", status="skipped"),
          _timed("other", 4.0, "n=1", "base")]
    table = format_table(ms)
    line = next(ln for ln in table.splitlines() if ln.startswith("n=1"))
    assert "x" not in line.replace("n=1", "")  # no ratio at all, in particular not 4.00x
    assert "empty '... vs base' cells" in table
    assert not [r for r in to_rows(ms, None, INFO) if r["metric"] == "speedup"]


# ------------------------------------------------------------------ nothing to measure


def test_nothing_to_measure_says_why():
    from lmfuse.bench.suite import nothing_to_measure

    fwd_only = [_case([_matmul_provider("fast")], modes=("fwd",))]
    msg = nothing_to_measure("toy", fwd_only, ["bwd"], CPU, "tiny")
    assert "toy has no backward" in msg and "not differentiable" in msg and "--modes bwd" in msg
    assert nothing_to_measure("toy", fwd_only, ["fwd", "bwd"], CPU, "tiny") is None
    assert "no case on cpu" in nothing_to_measure("toy", [], ["fwd"], CPU, "quick")


# ------------------------------------------------------------------ time budget


class FakeClock:
    def __init__(self):
        self.now = 0.0

    def __call__(self):
        return self.now


def _budget_cases(clock, started, cost_s, out_dir=None, seen_on_disk=None):
    """Two fake ops: "a" (3 cases, the middle one marked headline) and "b" (2 cases, none marked).
    Building a provider records the case and advances the fake clock by ``cost_s``."""
    def provider(op, shape):
        def build():
            started.append(f"{op}:{shape}")
            if seen_on_disk is not None and out_dir is not None:  # what earlier cases left on disk
                seen_on_disk[f"{op}:{shape}"] = sorted(p.name for p in out_dir.glob("*.csv"))
            clock.now += cost_s
            a = torch.ones(4, requires_grad=True)
            return Workload(lambda: a * 2, [a])
        return Provider("p", build)

    def case(op, shape, headline=False):
        return Case(op, shape, torch.float32, CPU, [provider(op, shape)], modes=("fwd",), headline=headline)

    return {"a": [case("a", "a0"), case("a", "a1", headline=True), case("a", "a2")],
            "b": [case("b", "b0"), case("b", "b1")]}


def test_headline_cases_of_every_op_come_first():
    from lmfuse.bench.suite import order_cases

    order = [c.shape for _, c in order_cases(_budget_cases(FakeClock(), [], 0.0))]
    assert order == ["a1", "b0", "a0", "a2", "b1"]


def test_budget_stops_cleanly_writes_as_it_goes_and_lists_what_it_skipped(tmp_path):
    from lmfuse.bench.suite import Budget, run_cases

    clock, started, seen, echoed = FakeClock(), [], {}, []
    out = tmp_path / "res"
    cases = _budget_cases(clock, started, 10.0, out, seen)
    # 25 s, 10 s a case: a1 (0-10), b0 (10-20); then 5 s are left and each op's last case took 10 s
    res = run_cases(cases, ["fwd"], CEIL, INFO, out, "tiny", plot=False, progress=False,
                    echo=echoed.append, budget=Budget(25.0, clock))
    assert started == ["a:a1", "b:b0"]
    assert seen["b:b0"] == ["a.csv"]  # a1's result was on disk before b0 started
    with open(out / "b.csv") as f:
        assert {r["shape"] for r in csv.DictReader(f)} == {"b0"}
    assert [s.split(" ")[0] for s in res["a"].skipped] == ["a0", "a2"]
    assert [s.split(" ")[0] for s in res["b"].skipped] == ["b1"]
    assert all("time budget" in s for s in res["a"].skipped + res["b"].skipped)
    assert len(echoed) == 2 and "a1" in echoed[0] and "b0" in echoed[1]  # one table per finished case
    assert not list(out.glob(".*.tmp"))


def test_budget_never_starts_a_case_once_spent():
    from lmfuse.bench.suite import Budget, run_cases

    clock, started = FakeClock(), []
    # 15 s: a1 (0-10); b0 has no estimate yet and 5 s are left, so it starts (10-20); then none
    res = run_cases(_budget_cases(clock, started, 10.0), ["fwd"], CEIL, INFO, None, "tiny", plot=False,
                    progress=False, echo=lambda s: None, budget=Budget(15.0, clock))
    assert started == ["a:a1", "b:b0"]
    assert all("spent" in s for s in res["a"].skipped + res["b"].skipped)
    clock2, started2 = FakeClock(), []
    run_cases(_budget_cases(clock2, started2, 10.0), ["fwd"], CEIL, INFO, None, "tiny", plot=False,
              progress=False, echo=lambda s: None, budget=None)
    assert started2 == ["a:a1", "b:b0", "a:a0", "a:a2", "b:b1"]  # no budget: everything runs


def test_budget_refuses_bad_values():
    from lmfuse.bench.suite import Budget

    for bad in (0, -1.0):
        with pytest.raises(ValueError, match="budget"):
            Budget(bad)


def _fake_suite(monkeypatch, clock, started, cost_s):
    """run_suite over two fake benchmark modules (no discovery, no real ceilings)."""
    import types

    from lmfuse.bench import suite

    built = []

    def module(op):
        def cases(scale, device):
            built.append(op)
            return _budget_cases(clock, started, cost_s)[op]
        return types.SimpleNamespace(cases=cases, OP=op)

    mods = {"a": module("a"), "b": module("b")}
    monkeypatch.setattr(suite, "discover", lambda: {"a": "a", "b": "b"})
    monkeypatch.setattr(suite, "load", lambda name: (name, mods[name]))
    monkeypatch.setattr(suite, "measure_ceilings", lambda device, scale: CEIL)
    return suite, built


def test_suite_with_budget_runs_headlines_first_and_one_op_at_a_time(monkeypatch, tmp_path):
    clock, started, echoed = FakeClock(), [], []
    suite, built = _fake_suite(monkeypatch, clock, started, 1.0)
    res = suite.run_suite(None, CPU, "tiny", ["fwd"], tmp_path, plot=False, progress=False, info=INFO,
                          echo=echoed.append, budget_s=100.0, clock=clock)
    assert started == ["a:a1", "b:b0", "a:a0", "a:a2", "b:b1"]
    assert built == ["a", "b", "a", "b"]  # pass 1 then pass 2: never two modules' cases at once
    assert all(not r.skipped for r in res)
    assert json.loads((tmp_path / "budget.json").read_text())["skipped"] == []
    assert any("every case ran" in e for e in echoed)


def test_suite_budget_skips_pass_two_and_says_what(monkeypatch, tmp_path):
    clock, started, echoed = FakeClock(), [], []
    suite, built = _fake_suite(monkeypatch, clock, started, 10.0)
    res = {r.op: r for r in suite.run_suite(None, CPU, "tiny", ["fwd"], tmp_path, plot=False, progress=False,
                                            info=INFO, echo=echoed.append, budget_s=25.0, clock=clock)}
    assert started == ["a:a1", "b:b0"] and built == ["a", "b"]  # pass 2 was not even built
    assert [s.split(" ")[0] for s in res["a"].skipped] == ["a0", "a2"]
    record = json.loads((tmp_path / "budget.json").read_text())
    assert [(s["op"], s["case"].split(" ")[0]) for s in record["skipped"]] == [("a", "a0"), ("a", "a2"), ("b", "b1")]
    assert any(e.startswith("  skipped a a0") for e in echoed)


def test_suite_without_budget_runs_op_by_op_headline_first(monkeypatch):
    clock, started = FakeClock(), []
    suite, built = _fake_suite(monkeypatch, clock, started, 1.0)
    suite.run_suite(None, CPU, "tiny", ["fwd"], None, plot=False, progress=False, info=INFO, echo=lambda s: None)
    assert started == ["a:a1", "a:a0", "a:a2", "b:b0", "b:b1"] and built == ["a", "b"]
    with pytest.raises(ValueError, match="a has no backward"):
        suite.run_suite(["a"], CPU, "tiny", ["bwd"], None, plot=False, progress=False, info=INFO, echo=lambda s: None)


def test_run_info_records_the_checkout_commit():
    import subprocess
    from pathlib import Path

    from lmfuse.bench.report import run_info

    root = Path(__file__).resolve().parents[2]
    head = subprocess.run(["git", "rev-parse", "HEAD"], cwd=root, capture_output=True, text=True)
    if head.returncode != 0:
        pytest.skip("not a git checkout")
    assert run_info(torch.device("cpu")).git_commit == head.stdout.strip()
    assert run_info(torch.device("cpu"), "abc").git_commit == "abc"


def test_paired_ratio_sees_a_known_ratio_despite_a_drifting_machine():
    """Target sleeps 0.1 s, baseline 0.3 s, and every call of both gets 10 % slower as the run goes
    on (a machine whose speed drifts): the paired ratio stays near 3 (each pair shares the drift),
    while blocks timed one after the other would not. Bounds leave room for a busy machine's
    oversleeping (tens of ms per call pull the ratio towards 1)."""
    from lmfuse.bench.harness import paired_ratio

    calls = [0]

    def sleeper(base):
        def fn():
            calls[0] += 1
            time.sleep(base * (1 + 0.1 * calls[0]))  # 10 % slower per call
        return fn

    r = paired_ratio(sleeper(0.1), sleeper(0.3), reps=4)
    assert 1.8 < r < 3.6, r


def test_paired_speedup_recorded_for_cpu_cases_that_ask_and_reported():
    # 0.1 s against 0.3 s of sleep: a ratio of 3, which a loaded machine's oversleeping (tens of ms
    # per call) pulls towards 1, never below 1.8 for a lag under 150 ms
    fast, slow = _matmul_provider("fast", sleep_s=0.1), _matmul_provider("slow", sleep_s=0.3)
    policy = TimingPolicy(cpu_warmup=0, cpu_budget_s=0.0, cpu_min_reps=1, cpu_max_reps=1, cpu_paired_reps=3)
    ms = run_case(_case([fast, slow], paired=True), policy)
    full = {m.provider: m for m in ms if m.mode == "full"}
    assert 1.8 < full["fast"].paired_speedup < 4.5 and full["fast"].paired_reps == 3
    assert all(m.paired_speedup is None for m in ms if (m.provider, m.mode) != ("fast", "full"))
    info = RunInfo("cpu", "2.x", None, "abc", "now")
    rows = [r for r in to_rows(ms, None, info) if r["metric"] == "paired_speedup"]
    assert len(rows) == 1 and rows[0]["provider"] == "fast" and "3 alternating pairs" in rows[0]["note"]
    assert "(paired " in format_table(ms)
    # not asked for, or the baseline did not run: no paired ratio
    assert all(m.paired_speedup is None for m in run_case(_case([fast, slow]), policy))
    ms = run_case(_case([fast, Provider("slow", _unavailable)], paired=True), policy)
    assert all(m.paired_speedup is None for m in ms)
