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


def test_forced_cpp_is_timed_where_the_default_is_the_chunked_path(monkeypatch):
    """On the CPU the default path of float32 / bfloat16 cross-entropy and bfloat16 log-probs
    training calls is the chunked ATen path, so ``lmfuse-cpp`` (the statistics path) is a different
    provider there and is built; where the default is the cpp backend itself (float16, float32
    log-probs with a trainable head) the row says so. The frozen-head providers differentiate
    the hidden states only."""
    from lmfuse.bench import ProviderUnavailable

    monkeypatch.delenv("LMFUSE_LCE_CHUNKED", raising=False)
    monkeypatch.delenv("LMFUSE_BACKEND", raising=False)
    mod = _module()
    for kind in ("ce", "logp"):
        # log-probs with a trainable float32 head: the cpp kernels are the default
        for dtype, built in (("float32", kind == "ce"), ("bfloat16", True), ("float16", False)):
            case = mod.build_case(mod.Spec(kind, 128, 32, 257, dtype), CPU)
            prov = {p.name: p for p in case.providers}
            if built:
                work = prov["lmfuse-cpp"].build()
                assert len(work.grad_inputs) == 2
            else:
                try:
                    prov["lmfuse-cpp"].build()
                    raise AssertionError(f"{kind} {dtype}: lmfuse-cpp should be the lmfuse row")
                except ProviderUnavailable as e:
                    assert "default backend" in str(e)
            if kind == "logp":
                for name in ("lmfuse-frozen-head", "eager-frozen-head"):
                    work = prov[name].build()
                    assert [t.shape for t in work.grad_inputs] == [(128, 32)]
                    out = work.forward()
                    (grad,) = torch.autograd.grad(out.sum(), work.grad_inputs)
                    assert torch.isfinite(grad).all()
            else:
                assert "lmfuse-frozen-head" not in prov
