"""The fused-loss benchmark runs end to end at the tiny scale: every provider either measures
or says why it cannot run here, none errors; the memory probe measures something."""

import torch

from lmfuse.bench import TimingPolicy, run_case
from lmfuse.bench.suite import discover, load

CPU = torch.device("cpu")


def _module():
    return load(discover()["linear_cross_entropy"])[1]


def test_tiny_scale_runs_without_errors():
    mod = _module()
    cases = mod.cases("tiny", CPU)
    assert {c.op for c in cases} == {"linear_cross_entropy", "linear_log_probs", "lm_train_step"}
    results = [m for c in cases for m in run_case(c, TimingPolicy.for_scale("tiny"))]
    errors = [f"{m.op}/{m.provider}/{m.mode}: {m.note}" for m in results if m.status == "error"]
    assert not errors, errors
    ok = {(m.op, m.provider) for m in results if m.status == "ok"}
    for op in ("linear_cross_entropy", "linear_log_probs"):
        assert {(op, "lmfuse"), (op, "eager")} <= ok
    assert {("lm_train_step", "stock"), ("lm_train_step", "fused")} <= ok
    assert all(m.flops and m.flops > 0 for m in results if m.status == "ok")


def test_memory_probe_sees_the_eager_logits():
    """The probe's resident-set measure is large enough to see eager's [N, V] fp32 logits."""
    mod = _module()
    spec = mod.Spec("ce", 512, 64, 8192, "float32")
    logits_mib = spec.N * spec.V * 4 / 2**20  # 16 MiB
    rows = mod.measure_memory_for(spec, ["eager"], ["fwd"], CPU)
    assert rows[0]["extra_mib"] >= logits_mib, rows
