"""Edge cases shared by the low-rank ops and spec_verify: empty input dimension, rank 0 (the same
rule and message for every low-rank op), LoRA scaling sign, and where a bad logit is."""

import pytest
import torch

from lmfuse import ops
from lmfuse.ops import spec_verify, use_backend

from .helpers import backend_params

DTYPES = (torch.float32, torch.float64)


@pytest.mark.parametrize("with_bias", [False, True])
def test_low_rank_linear_with_zero_input_features_is_bias_with_its_gradients(with_bias):
    x = torch.randn(3, 4, 0, requires_grad=True)
    down = torch.randn(2, 0, requires_grad=True)
    up = torch.randn(5, 2, requires_grad=True)
    bias = torch.randn(5, requires_grad=True) if with_bias else None
    y = ops.low_rank_linear(x, down, up, bias)
    expected = (bias if with_bias else torch.zeros(5)).expand(3, 4, 5)
    assert y.shape == (3, 4, 5) and torch.equal(y, expected)
    dy = torch.randn(3, 4, 5)
    grads = torch.autograd.grad(y, [x, down, up] + ([bias] if with_bias else []), dy)
    assert grads[0].shape == (3, 4, 0) and grads[1].shape == (2, 0)
    assert torch.equal(grads[2], torch.zeros(5, 2))  # h = 0, so the up weight gets nothing
    if with_bias:
        torch.testing.assert_close(grads[3], dy.sum((0, 1)))


def test_lpa_qkv_and_gated_lora_with_zero_input_features():
    x = torch.randn(6, 0, requires_grad=True)
    downs = [torch.randn(2, 0) for _ in range(3)]
    ups = [torch.randn(w, 2) for w in (4, 3, 3)]
    biases = [torch.randn(4), None, torch.randn(3)]
    q, k, v = ops.lpa_qkv_projection(x, downs, ups, biases)
    assert torch.equal(q, biases[0].expand(6, 4)) and torch.equal(k, torch.zeros(6, 3))
    assert torch.equal(v, biases[2].expand(6, 3))
    w, bias = torch.randn(5, 0), torch.randn(5)
    A, B = torch.randn(2, 0, requires_grad=True), torch.randn(5, 2, requires_grad=True)
    y = ops.gated_lora_linear(x.reshape(2, 3, 0), w, bias, A, B, torch.ones(2), 2.0)
    assert torch.equal(y, bias.expand(2, 3, 5))
    gA, gB = torch.autograd.grad(y.sum(), [A, B])
    assert gA.shape == (2, 0) and torch.equal(gB, torch.zeros(5, 2))


def test_rank_zero_is_refused_the_same_way_by_every_low_rank_op():
    x = torch.randn(3, 4)
    calls = {
        "low_rank_linear": lambda: ops.low_rank_linear(x, torch.randn(0, 4), torch.randn(5, 0)),
        "lpa_qkv_projection": lambda: ops.lpa_qkv_projection(x, [torch.randn(0, 4)] * 3, [torch.randn(5, 0)] * 3),
        "gated_lora_linear": lambda: ops.gated_lora_linear(x, torch.randn(5, 4), None, torch.randn(0, 4),
                                                           torch.randn(5, 0), None, 1.0),
        "lora_linear": lambda: ops.lora_linear(x, torch.randn(5, 4), None, torch.randn(0, 4), torch.randn(5, 0), 1.0),
    }
    for name, call in calls.items():
        with pytest.raises(ValueError, match=r"^rank must be at least 1, got \w+(\[0\] \(q\))? of shape \(0, 4\)$"):
            call()


@pytest.mark.parametrize("scaling", [0.0, -0.5, -2])
def test_gated_lora_refuses_non_positive_scaling(scaling):
    x, w = torch.randn(3, 4), torch.randn(5, 4)
    A, B = torch.randn(2, 4), torch.randn(5, 2)
    with pytest.raises(ValueError, match=r"scaling must be > 0 .*got " + str(scaling).replace("-", "\\-")):
        ops.gated_lora_linear(x, w, None, A, B, torch.ones(2), scaling)
    with pytest.raises(ValueError, match="scaling must be > 0"):
        ops.lora_linear(x, w, None, A, B, scaling)
    # a small positive scaling is fine
    y = ops.lora_linear(x, w, None, A, B, 1e-3)
    torch.testing.assert_close(y, x @ w.t() + 1e-3 * (x @ A.t()) @ B.t())


SPEC_BACKENDS = backend_params(("reference", "cpp", "triton"))


@pytest.mark.parametrize("backend", SPEC_BACKENDS)
def test_spec_verify_bad_logit_error_names_tensor_row_position_and_vocab_index(backend):
    B, k, V = 3, 2, 10
    target = torch.randn(B, k + 1, V)
    ids = target[:, :k].argmax(-1)  # greedy accepts everything: every target position is read
    t = target.clone()
    t[1, 2, 4] = float("nan")
    with use_backend(backend), pytest.raises(ValueError, match=r"target_logits\[1, 2, 4\] is nan .*vocab index 4"):
        spec_verify(ids, None, t, temperature=0.0)
    t = target.clone()
    t[2, 1, 7] = float("inf")
    with use_backend(backend), pytest.raises(ValueError, match=r"target_logits\[2, 1, 7\] is inf"):
        spec_verify(ids, None, t, temperature=0.0)
    t = target.clone()
    t[0, 0] = float("-inf")
    with use_backend(backend), pytest.raises(ValueError, match=r"target_logits\[0, 0, :\] has no finite logit"):
        spec_verify(ids, None, t, temperature=1.0, generator=0)
    draft = torch.randn(B, k, V)
    draft[2, 0, 3] = float("nan")
    with use_backend(backend), pytest.raises(ValueError, match=r"draft_logits\[2, 0, 3\] is nan"):
        spec_verify(ids, draft, target, temperature=1.0, generator=0)
