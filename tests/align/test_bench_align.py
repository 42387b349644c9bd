"""The DPO-step benchmark runs at the tiny scale: both providers measure (or TRL is reported as
unavailable when it is not installed), none errors, and the two compute the same loss."""

import pytest
import torch

from lmfuse.bench import TimingPolicy, run_case
from lmfuse.bench.suite import discover, load
from lmfuse.testing import assert_close_to_reference

CPU = torch.device("cpu")


def _module():
    return load(discover()["align"])[1]


def test_tiny_scale_runs_without_errors():
    mod = _module()
    cases = mod.cases("tiny", CPU)
    assert [c.op for c in cases] == ["dpo_step"] and cases[0].headline
    results = run_case(cases[0], TimingPolicy.for_scale("tiny"))
    errors = [f"{m.provider}/{m.mode}: {m.note}" for m in results if m.status == "error"]
    assert not errors, errors
    ok = {m.provider for m in results if m.status == "ok"}
    assert "lmfuse" in ok
    pytest.importorskip("trl")
    assert "trl" in ok


def test_providers_compute_the_same_loss_and_gradients():
    """The timed workloads do the same work: equal losses and gradients on the benchmark's batch."""
    pytest.importorskip("trl")
    mod = _module()
    setup = mod._Setup(mod.specs("tiny")[0], CPU)
    ours, theirs = mod._lmfuse(setup), mod._trl(setup)
    params = list(ours.grad_inputs)
    a, b = ours.forward(), theirs.forward()
    assert_close_to_reference(a, b.double(), torch.float32, "benchmark loss", factor=2)  # two fp32 results
    ga, gb = torch.autograd.grad(a, params), torch.autograd.grad(b, params)
    for x, y in zip(ga, gb):
        assert_close_to_reference(x, y.double(), torch.float32, "benchmark gradient", factor=2)


def test_gpu_case_is_a_bf16_llama_1b_and_the_dtype_reaches_the_model():
    """On CUDA the full scale adds the Llama-3.2-1B-shaped bf16 case (checked here without a GPU:
    its spec and config; and a bf16 tiny spec builds a bf16 model for both providers)."""
    mod = _module()
    assert [s.model for s in mod.specs("full", CPU)] == ["smollm2-135m"]
    gpu = mod.specs("full", torch.device("cuda"))
    assert gpu[-1] == mod.Spec(4, 1024, "llama-1b", "bfloat16")
    from lmfuse.bench import llama_1b_config

    cfg = llama_1b_config()
    assert (cfg.hidden_size, cfg.num_hidden_layers, cfg.intermediate_size, cfg.vocab_size) == (2048, 16, 8192, 128256)
    with torch.device("meta"):
        from transformers import LlamaForCausalLM
        n = sum(p.numel() for p in LlamaForCausalLM(cfg).parameters())
    assert 1.2e9 < n < 1.3e9  # Llama-3.2-1B: 1.24 B parameters (tied embeddings)
    setup = mod._Setup(mod.Spec(2, 16, "tiny-llama", "bfloat16"), CPU)
    model = setup.get()[0]
    assert {p.dtype for p in model.parameters()} == {torch.bfloat16}
    assert mod.build_case(setup.spec, CPU).dtype == torch.bfloat16
