"""The gated_lora, spec_verify and collab_decode benchmark modules are discovered and every case
of their tiny scale runs (each provider and mode once; no timing is asserted): a case that errors
fails here, so a benchmark cannot rot unnoticed."""

import pytest
import torch

from lmfuse.bench import TimingPolicy, run_case, suite

ONCE = TimingPolicy(cpu_warmup=0, cpu_budget_s=0.0, cpu_min_reps=1, cpu_max_reps=1)  # runs, not timings


@pytest.mark.parametrize("name", ["gated_lora", "spec_verify", "collab_decode"])
def test_tiny_benchmark_cases_run_without_errors(name):
    op, module = suite.load(suite.discover()[name])
    cases = module.cases("tiny", torch.device("cpu"))
    assert cases, f"{name}: no tiny case"
    rows = [m for c in cases for m in run_case(c, ONCE)]
    errors = [(m.shape, m.provider, m.mode, m.note) for m in rows if m.status == "error"]
    assert not errors, errors
    ok = [m for m in rows if m.status == "ok"]
    # every case has at least one provider that really ran (skips are for missing backends)
    assert {m.shape for m in ok} == {c.shape for c in cases}, [(m.shape, m.provider, m.status, m.note) for m in rows]
    assert all(m.op == op for m in rows)
