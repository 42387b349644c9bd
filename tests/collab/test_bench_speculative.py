"""The speculative-generation benchmark module runs at its tiny scale (tiny random Llama): every
lmfuse provider produces the target's greedy output, and the batch-4 HF assisted row is skipped
with transformers' refusal rather than failing."""

import torch

from lmfuse.bench import TimingPolicy, run_case
from lmfuse.bench import suite


def test_tiny_benchmark_cases_run():
    op, module = suite.load(suite.discover()["speculative_generate"])
    assert op == "speculative_generate"
    cases = module.cases("tiny", torch.device("cpu"))
    assert {c.shape.split(",")[0] for c in cases} == {"B=1", "B=4"}
    once = TimingPolicy(cpu_warmup=0, cpu_budget_s=0.0, cpu_min_reps=1, cpu_max_reps=1)  # runs, not timings
    rows = [m for c in cases for m in run_case(c, once, ("fwd",))]
    by = {(m.shape, m.provider): m for m in rows}
    assert not [m for m in rows if m.status == "error"], [m.note for m in rows if m.status == "error"]
    for (shape, prov), m in by.items():
        if prov.startswith("lmfuse") or prov == "hf-greedy" or shape.startswith("B=1"):
            assert m.status == "ok", (shape, prov, m.note)
    for conf in (0.4, 0.0):
        assert by[(f"B=4,draft=L2,k=4,conf={conf},new=8", "hf-assisted")].status == "skipped"
