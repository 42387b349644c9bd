"""The ops' ``cost()`` formulas (flops, bytes) that feed the roofline numbers, against independent
counts: matmul flops counted by ``torch.utils.flop_counter.FlopCounterMode`` while the float64
reference runs forward and backward, and bytes summed from the sizes of the tensors each
formula's docstring says are read and written."""

import pytest
import torch
from torch.utils.flop_counter import FlopCounterMode

from lmfuse.ops import (gated_lora_linear_cost, gated_lora_linear_reference, low_rank_linear_cost,
                        low_rank_linear_reference, lpa_qkv_projection_cost, lpa_qkv_projection_reference,
                        spec_verify, spec_verify_cost)

SHAPES = [(6, 10, 3, 7), (1, 5, 1, 2), (13, 8, 8, 17)]  # (tokens, d_in, rank, d_out)


def _counted(fn):
    """Matmul flops of running ``fn()`` (forward, or a backward inside it)."""
    with FlopCounterMode(display=False) as counter:
        fn()
    return counter.get_total_flops()


def _leaf(*shape):
    return torch.randn(*shape, dtype=torch.float64, requires_grad=True)


def _nbytes(b, *tensors):
    return b * sum(t.numel() for t in tensors)


@pytest.mark.parametrize("T, K, R, N", SHAPES)
def test_low_rank_linear_cost(T, K, R, N):
    x, A, B = _leaf(T, K), _leaf(R, K), _leaf(N, R)
    y = None

    def fwd():
        nonlocal y
        y = low_rank_linear_reference(x, A, B)

    f_fwd = _counted(fwd)
    dy = torch.randn_like(y)
    f_bwd = _counted(lambda: torch.autograd.grad(y, (x, A, B), dy))
    b = 2
    h = torch.empty(T, R)
    b_fwd = _nbytes(b, x, A, B, y)
    b_bwd = _nbytes(b, dy, x, h, A, B) + _nbytes(b, x, A, B) + 2 * _nbytes(b, h)  # reads; dx, dA, dB; dh w+r
    assert low_rank_linear_cost(T, K, R, N, b, "fwd") == (f_fwd, b_fwd)
    assert low_rank_linear_cost(T, K, R, N, b, "bwd") == (f_bwd, b_bwd)
    assert low_rank_linear_cost(T, K, R, N, b, "full") == (f_fwd + f_bwd, b_fwd + b_bwd)


@pytest.mark.parametrize("T, K, R, N", SHAPES)
@pytest.mark.parametrize("weight_grad", [False, True])
def test_gated_lora_linear_cost(T, K, R, N, weight_grad):
    x, A, B = _leaf(T, K), _leaf(R, K), _leaf(N, R)
    W = torch.randn(N, K, dtype=torch.float64, requires_grad=weight_grad)
    gate = torch.rand(R, dtype=torch.float64)
    y = None

    def fwd():
        nonlocal y
        y = gated_lora_linear_reference(x, W, None, A, B, gate, 2.0)

    f_fwd = _counted(fwd)
    dy = torch.randn_like(y)
    wrt = (x, A, B) + ((W,) if weight_grad else ())
    f_bwd = _counted(lambda: torch.autograd.grad(y, wrt, dy))
    b = 4
    h = torch.empty(T, R)
    b_fwd = _nbytes(b, x, x, W, A, B, y, h)
    # reads dy (twice), x, W, A, B, h; writes dx, dA, dB; and one more pass over a [T, r]
    # intermediate (the gradient w.r.t. h, needed by dA) that the docstring does not list
    b_bwd = _nbytes(b, dy, dy, x, W, A, B, h) + _nbytes(b, x, A, B) + _nbytes(b, h)
    if weight_grad:
        b_bwd += _nbytes(b, dy, x, W)  # dW = dyᵀx: dy and x read again, dW written
    assert gated_lora_linear_cost(T, K, R, N, b, "fwd", weight_grad=weight_grad) == (f_fwd, b_fwd)
    assert gated_lora_linear_cost(T, K, R, N, b, "bwd", weight_grad=weight_grad) == (f_bwd, b_bwd)


@pytest.mark.parametrize("T, K, R, widths", [(5, 12, 2, (12, 4, 4)), (1, 3, 4, (7, 1, 2))])
def test_lpa_qkv_projection_cost(T, K, R, widths):
    x = _leaf(T, K)
    downs = [_leaf(R, K) for _ in range(3)]
    ups = [_leaf(n, R) for n in widths]
    out = None

    def fwd():
        nonlocal out
        out = lpa_qkv_projection_reference(x, downs, ups)

    f_fwd = _counted(fwd)
    dys = [torch.randn_like(o) for o in out]
    f_bwd = _counted(lambda: torch.autograd.grad(out, [x, *downs, *ups], dys))
    b = 2
    h = torch.empty(T, 3 * R)
    weights = _nbytes(b, *downs, *ups)
    b_fwd = _nbytes(b, x, *out) + weights
    # reads dy, x (twice: dx and the down grads), h; dh written and read; weight grads written
    b_bwd = _nbytes(b, *dys, x, x, h, h, h) + 2 * weights
    assert lpa_qkv_projection_cost(T, K, R, widths, b, "fwd") == (f_fwd, b_fwd)
    assert lpa_qkv_projection_cost(T, K, R, widths, b, "bwd") == (f_bwd, b_bwd)


@pytest.mark.parametrize("has_draft", [True, False])
def test_spec_verify_cost_counts_every_logit_and_the_int64_ids(has_draft):
    B, k, V = 3, 4, 11
    target = torch.randn(B, k + 1, V)
    draft = torch.randn(B, k, V) if has_draft else None
    ids = torch.randint(0, V, (B, k))
    n = torch.full((B,), k)
    res = spec_verify(ids, draft, target, temperature=0.7, num_draft_tokens=n, generator=0)
    logits = target.numel() + (draft.numel() if has_draft else 0)
    ints = ids.nbytes + n.nbytes + res.tokens.nbytes + res.num_accepted.to(torch.int64).nbytes
    # 4 flops per logit read (scale, exp, sum, compare): the formula's own convention
    assert spec_verify_cost(B, k, V, 2, has_draft) == (4 * logits, 2 * logits + ints)
