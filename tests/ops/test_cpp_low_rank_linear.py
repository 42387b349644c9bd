"""Tests of the CPU extension functions lmfuse._C.low_rank_linear_{fwd,bwd_dx}.

Contract under test: x [M, K], down [R, K], up [N, R], bias [N] or None, dy [M, N]; one dtype in
{float32, bfloat16, float16}; contiguous CPU tensors. Non-contiguous inputs are rejected with a
clear error (the op layer calls .contiguous() itself where it accepts them). The intermediate
h = x @ down.T (resp. dh = dy @ up) is accumulated in fp32 and rounded to the dtype before the
second product, as two chained nn.Linear layers do. The functions allocate their outputs, so
there is no buffer to poison; instead every output element is checked to be finite and close.
"""

from __future__ import annotations

import pytest
import torch

from lmfuse.testing import assert_close_to_reference, rel_error, tolerance

_C = pytest.importorskip("lmfuse._C", reason="CPU extension lmfuse._C is not built")

DTYPES = [torch.float32, torch.bfloat16, torch.float16]
# (M, K, R, N): odd sizes, a single row, several row blocks (48) and column panels (16).
# The 1x1x1x1 case is tested on its own below: with one output element, h @ up.T + bias can
# cancel and make a norm-relative error ill-conditioned.
SHAPES = [(37, 45, 7, 29), (1, 9, 3, 5), (70, 33, 20, 50), (130, 300, 64, 200)]


def _inputs(M, K, R, N, dtype, bias=True):
    # Scaled so activations stay O(1) through both products in every dtype.
    x = torch.randn(M, K).to(dtype)
    down = (torch.randn(R, K) / max(K, 1) ** 0.5).to(dtype)
    up = (torch.randn(N, R) / max(R, 1) ** 0.5).to(dtype)
    b = torch.randn(N).to(dtype) if bias else None
    return x, down, up, b


def _fwd_ref64(x, down, up, b):
    h = x.double() @ down.double().T
    y = h @ up.double().T
    return (y + b.double() if b is not None else y), h


def _rounding_bound(dtype, terms):
    """Output rounding to `dtype` plus the worst-case error of an fp32 sum of `terms` products."""
    return torch.finfo(dtype).eps + terms * torch.finfo(torch.float32).eps / 2


@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize("shape", SHAPES, ids=lambda s: "x".join(map(str, s)))
@pytest.mark.parametrize("with_bias", [True, False], ids=["bias", "nobias"])
def test_fwd_matches_float64_reference(shape, dtype, with_bias):
    x, down, up, b = _inputs(*shape, dtype, bias=with_bias)
    y, h = _C.low_rank_linear_fwd(x, down, up, b, True)
    assert y.shape == (shape[0], shape[3]) and h.shape == (shape[0], shape[2])
    assert y.dtype == dtype and h.dtype == dtype
    y_ref, h_ref = _fwd_ref64(x, down, up, b)
    assert_close_to_reference(h, h_ref, dtype, "h")
    assert_close_to_reference(y, y_ref, dtype, "y")
    if dtype != torch.float32:
        # No worse than a small multiple of PyTorch's own error in the same dtype.
        def torch_y():
            t = (x @ down.T) @ up.T
            return t + b if b is not None else t
        ours, theirs = rel_error(y, y_ref), rel_error(torch_y(), y_ref)
        assert ours <= 2.0 * theirs + 1e-4, f"ours {ours:.3e} vs torch {theirs:.3e}"
    # y must be the second product of the *returned, rounded* h: only output rounding and the
    # fp32 accumulation over R terms (worst case R * u32) remain.
    y_from_h = h.double() @ up.double().T + (b.double() if b is not None else 0)
    assert rel_error(y, y_from_h) <= _rounding_bound(dtype, shape[2])


@pytest.mark.parametrize("dtype", DTYPES, ids=str)
def test_fwd_single_element(dtype):
    # Condition-aware bound: rounding h and y each cost at most eps/2 of |h*u| + |b|.
    x, down, up, b = _inputs(1, 1, 1, 1, dtype)
    y, h = _C.low_rank_linear_fwd(x, down, up, b, True)
    y_ref, h_ref = _fwd_ref64(x, down, up, b)
    scale = (h_ref.abs() @ up.double().abs().T + b.double().abs()).item()
    assert abs(y.double().item() - y_ref.item()) <= tolerance(dtype) * scale
    assert abs(h.double().item() - h_ref.item()) <= tolerance(dtype) * abs(h_ref.item())


@pytest.mark.parametrize("dtype", DTYPES, ids=str)
def test_fwd_without_h_returns_empty_h_and_same_y(dtype):
    x, down, up, b = _inputs(37, 45, 7, 29, dtype)
    y_h, _ = _C.low_rank_linear_fwd(x, down, up, b, True)
    y, h = _C.low_rank_linear_fwd(x, down, up, b, False)
    assert h.shape == (0, 7) and h.dtype == dtype  # empty but 2-D, like the op's fake
    assert torch.equal(y, y_h)


@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize("shape", SHAPES, ids=lambda s: "x".join(map(str, s)))
def test_bwd_dx_matches_float64_reference(shape, dtype):
    M, K, R, N = shape
    _, down, up, _ = _inputs(M, K, R, N, dtype, bias=False)
    dy = torch.randn(M, N).to(dtype)
    dx, dh = _C.low_rank_linear_bwd_dx(dy, down, up)
    assert dx.shape == (M, K) and dh.shape == (M, R) and dx.dtype == dh.dtype == dtype
    dh_ref = dy.double() @ up.double()
    dx_ref = dh_ref @ down.double()
    assert_close_to_reference(dh, dh_ref, dtype, "dh")
    assert_close_to_reference(dx, dx_ref, dtype, "dx")
    assert rel_error(dx, dh.double() @ down.double()) <= _rounding_bound(dtype, R)


def test_bwd_dx_matches_autograd_of_chained_linears():
    # The data path of two chained nn.Linear layers (fp32): what the op layer's backward uses.
    M, K, R, N = 37, 45, 7, 29
    x, down, up, b = _inputs(M, K, R, N, torch.float32)
    x.requires_grad_(True)
    y = torch.nn.functional.linear(torch.nn.functional.linear(x, down), up, b)
    dy = torch.randn_like(y)
    y.backward(dy)
    dx, _ = _C.low_rank_linear_bwd_dx(dy, down, up)
    assert_close_to_reference(dx, x.grad, torch.float32, "dx")


def test_results_do_not_depend_on_thread_count():
    x, down, up, b = _inputs(130, 300, 64, 200, torch.float32)
    prev = torch.get_num_threads()
    try:
        torch.set_num_threads(1)
        y1, h1 = _C.low_rank_linear_fwd(x, down, up, b, True)
        torch.set_num_threads(max(2, prev))
        y2, h2 = _C.low_rank_linear_fwd(x, down, up, b, True)
    finally:
        torch.set_num_threads(prev)
    # Each row block is computed by one thread in a fixed order, so results are bitwise equal.
    assert torch.equal(y1, y2) and torch.equal(h1, h2)


@pytest.mark.parametrize("shape", [(0, 5, 3, 4), (6, 5, 0, 4), (6, 0, 3, 4), (6, 5, 3, 0)],
                         ids=["M0", "R0", "K0", "N0"])
def test_empty_dimensions(shape):
    M, K, R, N = shape
    x, down, up, b = _inputs(M, K, R, N, torch.float32)
    y, h = _C.low_rank_linear_fwd(x, down, up, b, True)
    y_ref, h_ref = _fwd_ref64(x, down, up, b)
    assert y.shape == y_ref.shape and h.shape == h_ref.shape
    torch.testing.assert_close(y.double(), y_ref, rtol=1e-5, atol=1e-6)
    torch.testing.assert_close(h.double(), h_ref, rtol=1e-5, atol=1e-6)
    dy = torch.randn(M, N)
    dx, dh = _C.low_rank_linear_bwd_dx(dy, down, up)
    torch.testing.assert_close(dh.double(), dy.double() @ up.double(), rtol=1e-5, atol=1e-6)
    torch.testing.assert_close(dx.double(), dh.double() @ down.double(), rtol=1e-5, atol=1e-6)


def test_non_contiguous_is_rejected_and_contiguous_copy_works():
    x, down, up, b = _inputs(37, 45, 7, 29, torch.float32)
    x_t = x.T.contiguous().T  # same values, column-major strides
    assert not x_t.is_contiguous()
    with pytest.raises(RuntimeError, match="'x' must be contiguous"):
        _C.low_rank_linear_fwd(x_t, down, up, b, False)
    with pytest.raises(RuntimeError, match="'up' must be contiguous"):
        _C.low_rank_linear_fwd(x, down, up.T.contiguous().T, b, False)
    y, _ = _C.low_rank_linear_fwd(x_t.contiguous(), down, up, b, False)
    assert_close_to_reference(y, _fwd_ref64(x, down, up, b)[0], torch.float32)


def _bad_fwd_cases():
    x, down, up, b = _inputs(8, 6, 3, 5, torch.float32)
    return {
        "int dtype": ((x.to(torch.int32), down, up, b), r"'x' must be float32, bfloat16 or float16"),
        "float64": ((x.double(), down.double(), up.double(), None), r"'x' must be float32"),
        "mixed dtypes": ((x, down.half(), up, b), r"'down' has dtype Half but 'x' has dtype Float"),
        "K mismatch": ((torch.randn(8, 7), down, up, b), r"'x' must be \[M, K\] with K = 6"),
        "R mismatch": ((x, down, torch.randn(5, 4), b), r"rank mismatch"),
        "bias shape": ((x, down, up, torch.randn(4)), r"'bias' must be \[N\] with N = 5"),
        "bias dtype": ((x, down, up, b.half()), r"'bias' has dtype Half"),
        "3-D x": ((x.reshape(2, 4, 6), down, up, b), r"'x' must be 2-D"),
        "meta device": ((x.to("meta"), down, up, b), r"'x' must be on device type cpu"),
    }


@pytest.mark.parametrize("case", list(_bad_fwd_cases()), ids=str)
def test_fwd_bad_inputs_raise_clear_errors(case):
    args, pattern = _bad_fwd_cases()[case]
    with pytest.raises(RuntimeError, match=pattern):
        _C.low_rank_linear_fwd(*args, False)


def test_bwd_bad_inputs_raise_clear_errors():
    _, down, up, _ = _inputs(8, 6, 3, 5, torch.float32)
    with pytest.raises(RuntimeError, match=r"'dy' must be \[M, N\] with N = 5"):
        _C.low_rank_linear_bwd_dx(torch.randn(8, 6), down, up)
    with pytest.raises(RuntimeError, match="rank mismatch"):
        _C.low_rank_linear_bwd_dx(torch.randn(8, 5), down, torch.randn(5, 2))
    with pytest.raises(RuntimeError, match="'dy' must be contiguous"):
        _C.low_rank_linear_bwd_dx(torch.randn(5, 8).T, down, up)


def test_has_openmp_is_bool():
    assert isinstance(_C.has_openmp(), bool)
