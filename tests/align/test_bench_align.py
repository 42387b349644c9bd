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
