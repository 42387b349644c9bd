"""The delta benchmark module is discovered and its tiny cases run every provider and mode; the
trainable-parameter counts its notes report are those of the models it builds."""

import torch

from lmfuse.bench import TimingPolicy, run_case

ONCE = TimingPolicy(cpu_warmup=0, cpu_budget_s=0.0, cpu_min_reps=1, cpu_max_reps=1)  # runs, not timings


def _module():
    from lmfuse.bench import suite

    op, module = suite.load(suite.discover()["delta"])
    assert op == "delta_lora_model"
    return module


def test_bench_delta_tiny_case_runs():
    module = _module()
    case = module.cases("tiny", torch.device("cpu"))[0]
    assert case.headline
    rows = run_case(case, TimingPolicy.for_scale("tiny"))
    status = {(r.provider, r.mode): r.status for r in rows}
    for prov in ("delta-lora", "peft-lora"):
        assert all(status[(prov, m)] == "ok" for m in ("fwd", "bwd", "full")), status
    assert status[("delta-lora-merged", "fwd")] == "ok"
    assert status[("delta-lora-merged", "bwd")] == "skipped"  # nothing to differentiate after merge


def test_every_delta_kind_runs_and_reports_its_trainable_parameters():
    module = _module()
    kinds = module.kind_cases("tiny", torch.device("cpu"))
    assert {c.op for c in kinds} == {"delta_kinds", "delta_prefix", "delta_soft_prompt"}
    counts = module.trainable_counts(1)  # the tiny shape has one layer
    for case in kinds:
        for prov in case.providers:
            work = prov.build()
            assert sum(p.numel() for p in work.grad_inputs) == counts[prov.name], prov.name
            assert f"{prov.name}={counts[prov.name]}" in case.note
        rows = run_case(case, ONCE)
        bad = [(r.provider, r.mode, r.status) for r in rows if r.status != "ok"]
        assert not bad, bad
