"""The delta benchmark module is discovered and its tiny case runs every provider and mode."""

import torch

from lmfuse.bench import TimingPolicy, run_case


def test_bench_delta_tiny_case_runs():
    from lmfuse.bench import suite

    op, module = suite.load(suite.discover()["delta"])
    assert op == "delta_lora_model"
    (case,) = module.cases("tiny", torch.device("cpu"))
    rows = run_case(case, TimingPolicy.for_scale("tiny"))
    status = {(r.provider, r.mode): r.status for r in rows}
    for prov in ("delta-lora", "peft-lora"):
        assert all(status[(prov, m)] == "ok" for m in ("fwd", "bwd", "full")), status
    assert status[("delta-lora-merged", "fwd")] == "ok"
    assert status[("delta-lora-merged", "bwd")] == "skipped"  # nothing to differentiate after merge
