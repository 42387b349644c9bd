"""The expert_blend benchmark module is discovered and every case of its tiny scale runs (each
provider and mode once; no timing is asserted), and its cost formulas count the GEMMs."""

import torch

from lmfuse.bench import TimingPolicy, run_case, suite
from lmfuse.ops.expert_blend import cost, decode_cost

ONCE = TimingPolicy(cpu_warmup=0, cpu_budget_s=0.0, cpu_min_reps=1, cpu_max_reps=1)  # runs, not timings


def test_tiny_benchmark_cases_run_without_errors():
    _, module = suite.load(suite.discover()["expert_blend"])
    cases = module.cases("tiny", torch.device("cpu"))
    assert {c.op for c in cases} == {"expert_blend_cross_entropy", "expert_blend_stage1", "expert_blend_decode_step"}
    rows = [m for c in cases for m in run_case(c, ONCE)]
    errors = [(m.shape, m.provider, m.mode, m.note) for m in rows if m.status == "error"]
    assert not errors, errors
    ok = {(m.op, m.provider, m.mode) for m in rows if m.status == "ok"}
    for c in cases:  # ours and the baseline both ran in every mode of every case
        for prov in ("lmfuse", "eager"):
            for mode in c.modes:
                assert (c.op, prov, mode) in ok, (c.op, prov, mode)


def test_cost_formulas():
    n, hs, v = 1024, (576, 640, 512), 49152
    k = sum(hs)
    assert cost(n, hs, v, 4, "fwd")[0] == 2 * n * v * k
    assert cost(n, hs, v, 4, "bwd")[0] == 6 * n * v * k
    assert cost(n, hs, v, 2, "full")[0] == 8 * n * v * k
    assert cost(n, hs, v, 2, "bwd", stage1=True)[0] == 4 * n * 3  # no GEMM in the stage-1 backward
    assert cost(n, hs, v, 2, "fwd")[1] < cost(n, hs, v, 4, "fwd")[1]
    assert decode_cost(8, 3, v, 2) == (2 * 3 * 8 * v, 3 * 8 * v * 2 + 12 * 8 * v)
