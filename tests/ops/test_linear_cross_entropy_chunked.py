"""Tests of the gradient-in-forward path of linear_cross_entropy (lmfuse.ops._lce_chunked).

For ``reduction="mean"`` / ``"sum"`` with a gradient wanted, the path computes the loss and the
gradients of hidden, weight, bias in one pass over token chunks and scales them by the upstream
scalar gradient in the backward; token weights and the mean normaliser stay differentiable. Every
result is compared with the float64 reference of the op; low-precision results must be within a
small multiple of eager PyTorch's own error in the same dtype.
"""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F
from torch.utils._python_dispatch import TorchDispatchMode

from lmfuse.ops import _lce_chunked
from lmfuse.ops.linear_cross_entropy import linear_cross_entropy, reference
from lmfuse.testing import rel_error

N, V, H = 37, 1003, 48
IGN = -100

OPTIONS = [
    {},
    dict(label_smoothing=0.1),
    dict(z_loss_scale=1e-2),
    dict(logit_scale=0.7, softcap=3.0),
    dict(softcap=2.5, label_smoothing=0.2, z_loss_scale=1e-3),
    dict(vocab_size=990, label_smoothing=0.05),
    dict(logit_scale=1.3, vocab_size=1000, z_loss_scale=1e-3, softcap=4.0, label_smoothing=0.1),
]


@pytest.fixture(params=["kernel", "torch"])
def chunked(request, monkeypatch):
    """Force the path, with a workspace of a few rows so that N = 37 spans several chunks; once
    with the chunk's softmax gradient in the C++ kernel (``lce_chunk_grad_``, the CPU default) and
    once in PyTorch (the path elsewhere)."""
    monkeypatch.setenv("LMFUSE_LCE_CHUNKED", "1")
    monkeypatch.setattr(_lce_chunked, "MIN_ROWS", 1)  # chunks of a few rows at these tiny shapes
    if request.param == "torch":
        monkeypatch.setattr(_lce_chunked, "fused_cpu", lambda h2: False)
        monkeypatch.setattr(_lce_chunked, "WORKSPACE_BYTES", 4 * 1024 * 6)  # 6 rows at V' ≈ 1000 in float32
    else:
        assert _lce_chunked.fused_cpu(torch.empty(1, 1))
        monkeypatch.setattr(_lce_chunked, "WORKSPACE_BYTES", 2 * 1024 * 6)  # 3 rows at V' ≈ 1000 in float32
    return request.param


def _data(seed, bias=False, weights=False, vocab_size=V, ignore_every=5):
    g = torch.Generator().manual_seed(seed)
    h = torch.randn(N, H, generator=g, dtype=torch.float64)
    w = torch.randn(V, H, generator=g, dtype=torch.float64) * 0.3
    b = torch.randn(V, generator=g, dtype=torch.float64) if bias else None
    t = torch.randint(0, vocab_size, (N,), generator=g)
    if ignore_every:
        t[::ignore_every] = IGN
    tw = torch.rand(N, generator=g, dtype=torch.float64) + 0.1 if weights else None
    up = torch.rand((), generator=g, dtype=torch.float64) * 3 - 1.5  # random upstream scalar gradient
    return h, w, b, t, tw, up


def _leaves(tensors, dtype):
    return [None if x is None else x.detach().to(dtype).requires_grad_() for x in tensors]


def _run(fn, h, w, b, t, tw, up, **kw):
    loss = fn(h, w, t, bias=b, token_weight=tw, **kw)
    ins = [x for x in (h, w, b, tw) if x is not None]
    grads = torch.autograd.grad(loss * up.to(loss.dtype), ins)
    return loss.detach(), grads


def _rows(dtype):
    return _lce_chunked.chunk_rows(N, V, dtype, False, _lce_chunked.fused_cpu(torch.empty(1, 1, dtype=dtype)))


def _n_chunks():
    return -(-N // _rows(torch.float32))


def _count_weight_updates(monkeypatch, run_real=True):
    """Patch the per-chunk gradient GEMMs; the list counts the calls that update the weight gradient."""
    calls = []
    real = _lce_chunked._gradient_gemms

    def spy(g, hc, wv, dh, dw, db32):
        if dw is not None:
            calls.append(1)
        if run_real:
            real(g, hc, wv, dh, dw, db32)
    monkeypatch.setattr(_lce_chunked, "_gradient_gemms", spy)
    return calls


@pytest.mark.parametrize("reduction", ["mean", "sum"])
@pytest.mark.parametrize("bias,weights", [(False, False), (True, False), (False, True), (True, True)])
@pytest.mark.parametrize("opts", OPTIONS, ids=lambda o: ",".join(o) or "plain")
def test_float32_matches_float64_reference(chunked, reduction, bias, weights, opts):
    assert _n_chunks() >= 5
    h, w, b, t, tw, up = _data(1, bias, weights, opts.get("vocab_size", V))
    ref_loss, ref_grads = _run(reference, *_leaves((h, w, b), torch.float64), t,
                               *_leaves((tw,), torch.float64), up, reduction=reduction, **opts)
    calls = []
    real = _lce_chunked._forward
    loss, grads = _run(lambda *a, **k: (calls.append(1), linear_cross_entropy(*a, **k))[1],
                       *_leaves((h, w, b), torch.float32), t, *_leaves((tw,), torch.float32), up,
                       reduction=reduction, **opts)
    assert real is _lce_chunked._forward and calls
    assert loss.dtype == torch.float32 and loss.shape == ()
    assert abs(float(loss) - float(ref_loss)) <= 1e-5 * max(1.0, abs(float(ref_loss)))
    for name, gx, gr in zip(("hidden", "weight", "bias/token_weight", "token_weight"), grads, ref_grads):
        assert gx.shape == gr.shape
        assert torch.isfinite(gx).all(), name
        assert rel_error(gx, gr) < 2e-5, (name, rel_error(gx, gr))


def test_chunk_rows_rule():
    """Rows per chunk fill the workspace (28 MiB: 149 float32 rows at SmolLM2's V = 49152), never
    fewer than MIN_ROWS (a 128k vocabulary would give 57 float32 rows), never more than N."""
    rows = _lce_chunked.chunk_rows
    assert rows(2048, 49152, torch.float32, False, True) == (28 << 20) // (4 * 49152) == 149
    assert rows(2048, 49152, torch.bfloat16, False, True) == 298
    assert rows(2048, 128256, torch.float32, False, True) == _lce_chunked.MIN_ROWS == 128
    assert rows(100, 128256, torch.float32, False, True) == 100
    assert rows(0, 49152, torch.float32, False, True) == 1


def test_path_is_taken_and_not_taken(monkeypatch):
    """The static rule: scalar reduction, no return_lse, grad wanted; forced on/off by the env."""
    taken = []
    real = _lce_chunked.fused_loss
    monkeypatch.setattr(_lce_chunked, "fused_loss", lambda *a, **k: (taken.append(1), real(*a, **k))[1])
    h, w, _, t, _, _ = _data(2)
    hb, wb = _leaves((h, w), torch.bfloat16)
    monkeypatch.delenv("LMFUSE_LCE_CHUNKED", raising=False)
    monkeypatch.delenv("LMFUSE_BACKEND", raising=False)
    linear_cross_entropy(hb, wb, t)
    assert len(taken) == 1  # default for bfloat16 training on CPU
    linear_cross_entropy(*_leaves((h, w), torch.float32), t)
    assert len(taken) == 2  # and for float32
    linear_cross_entropy(*_leaves((h, w), torch.float16), t)
    assert len(taken) == 2  # not for float16 (the cpp kernels)
    linear_cross_entropy(hb, wb, t, reduction="none")
    linear_cross_entropy(hb, wb, t, return_lse=True)
    with torch.no_grad():
        linear_cross_entropy(hb, wb, t)
    linear_cross_entropy(hb.detach(), wb.detach(), t)
    assert len(taken) == 2
    monkeypatch.setenv("LMFUSE_BACKEND", "reference")  # a forced backend keeps the statistics path
    linear_cross_entropy(hb, wb, t)
    assert len(taken) == 2
    monkeypatch.setenv("LMFUSE_LCE_CHUNKED", "0")
    monkeypatch.delenv("LMFUSE_BACKEND")
    linear_cross_entropy(hb, wb, t)
    assert len(taken) == 2
    monkeypatch.setenv("LMFUSE_LCE_CHUNKED", "1")
    linear_cross_entropy(*_leaves((h, w), torch.float32), t, reduction="sum")
    assert len(taken) == 3
    monkeypatch.setenv("LMFUSE_LCE_CHUNKED", "yes")
    with pytest.raises(ValueError, match="LMFUSE_LCE_CHUNKED"):
        linear_cross_entropy(hb, wb, t)


@pytest.mark.parametrize("reduction", ["mean", "sum"])
@pytest.mark.parametrize("bias", [False, True])
def test_all_ignored_gives_zero_loss_and_grads(chunked, reduction, bias):
    h, w, b, t, tw, up = _data(3, bias, True)
    t[:] = IGN
    loss, grads = _run(linear_cross_entropy, *_leaves((h, w, b), torch.float32), t,
                       *_leaves((tw,), torch.float32), up, reduction=reduction, label_smoothing=0.1,
                       z_loss_scale=1e-3)
    assert float(loss) == 0.0
    for g in grads:
        assert torch.isfinite(g).all() and not g.any()


def test_zero_weight_sum_gives_zero_loss(chunked):
    h, w, _, t, _, up = _data(4, ignore_every=0)
    tw = torch.zeros(N, dtype=torch.float32)
    loss, grads = _run(linear_cross_entropy, *_leaves((h, w), torch.float32), None, t,
                       tw.requires_grad_(), up)
    assert float(loss) == 0.0 and all(torch.isfinite(g).all() for g in grads)
    assert not grads[0].any() and not grads[1].any()


def _eager(h, w, t, bias=None, token_weight=None, **kw):
    return F.cross_entropy(F.linear(h, w, bias).float(), t, ignore_index=IGN, **kw)


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
@pytest.mark.parametrize("bias", [False, True])
def test_low_precision_within_eager_error(chunked, lowp_gemm, dtype, bias):
    """Logits, G and the gradients in the input dtype: error a small multiple of eager's in that dtype.

    (Eager here casts its logits to float32 for the softmax, as mixed-precision training does; the
    weight gradient of the path is rounded once per chunk, over a dozen chunks here.)"""
    assert -(-N // _rows(dtype)) >= 5
    h, w, b, t, _, up = _data(5, bias)
    ref_loss, ref_grads = _run(reference, *_leaves((h, w, b), torch.float64), t, None, up, label_smoothing=0.1)
    loss, grads = _run(linear_cross_entropy, *_leaves((h, w, b), dtype), t, None, up, label_smoothing=0.1)
    e_loss, e_grads = _run(_eager, *_leaves((h, w, b), dtype), t, None, up, label_smoothing=0.1)
    assert grads[0].dtype == dtype and grads[1].dtype == dtype
    assert abs(float(loss) - float(ref_loss)) <= 3 * abs(float(e_loss) - float(ref_loss)) + 1e-3
    for name, gx, ge, gr in zip(("hidden", "weight", "bias"), grads, e_grads, ref_grads):
        err, e_err = rel_error(gx, gr), rel_error(ge, gr)
        assert err <= 3 * e_err + 1e-4, (name, err, e_err)


def test_frozen_weight_does_no_weight_work(chunked, monkeypatch):
    calls = _count_weight_updates(monkeypatch)
    h, w, _, t, _, up = _data(6)
    hh = h.float().requires_grad_()
    loss = linear_cross_entropy(hh, w.float(), t)
    (gh,) = torch.autograd.grad(loss * up.float(), [hh])
    assert not calls
    h64 = h.clone().requires_grad_()
    (gr,) = torch.autograd.grad(reference(h64, w, t) * up, [h64])
    assert rel_error(gh, gr) < 2e-5
    # with the weight trainable, the update runs once per chunk
    ww = w.float().requires_grad_()
    linear_cross_entropy(hh, ww, t).backward()
    assert len(calls) == _n_chunks()


def test_no_grad_does_no_gradient_work(chunked, monkeypatch):
    calls = _count_weight_updates(monkeypatch, run_real=False)
    h, w, b, t, _, _ = _data(7, True)
    hh, ww, bb = _leaves((h, w, b), torch.float32)
    with torch.no_grad():
        loss = linear_cross_entropy(hh, ww, t, bias=bb, z_loss_scale=1e-3)
        outs = torch.ops.lmfuse.lce_chunked(hh, ww, bb, t, torch.ones(N), V, IGN, 1.0, None, 0.0, 0.0,
                                            [False, False, False], 5)
    assert not calls
    assert all(o.numel() == 0 for o in outs[2:])
    assert abs(float(loss) - float(reference(h, w, t, bias=b, z_loss_scale=1e-3))) < 1e-5


def test_retain_graph_second_backward(chunked):
    h, w, _, t, _, _ = _data(8)
    hh, ww = _leaves((h, w), torch.float32)
    loss = linear_cross_entropy(hh, ww, t)
    g1 = torch.autograd.grad(loss * 2.0, [hh, ww], retain_graph=True)
    g2 = torch.autograd.grad(loss * -0.5, [hh, ww])
    for a, b in zip(g1, g2):
        torch.testing.assert_close(b, a * -0.25, rtol=1e-6, atol=1e-9)


class _Shapes(TorchDispatchMode):
    """Records the shape of every tensor an op produces in new memory (views and aliases of its
    inputs excluded)."""

    def __init__(self):
        super().__init__()
        self.shapes = []

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        out = func(*args, **(kwargs or {}))
        inputs = {a.untyped_storage().data_ptr() for a in torch.utils._pytree.tree_leaves((args, kwargs))
                  if isinstance(a, torch.Tensor)}
        for o in out if isinstance(out, (tuple, list)) else (out,):
            if isinstance(o, torch.Tensor) and o.untyped_storage().data_ptr() not in inputs:
                self.shapes.append(tuple(o.shape))
        return out


@pytest.mark.parametrize("mean", [True, False])
def test_backward_allocates_no_gradient_copy_unless_retained(chunked, mean):
    """The backward only scales the gradients computed in the forward. When the graph is freed
    after it (a plain ``backward()``) it scales them in place and autograd adopts them as
    ``.grad``: no new weight- or hidden-sized tensor at all. Through a retained graph it makes one
    new weight-sized and one hidden-sized tensor per backward (never zero-filled gradients for the
    op's other outputs), and three backwards through it accumulate to three times the reference:
    the stored gradients are not modified while the graph is kept."""
    h, w, _, t, _, _ = _data(12)
    red = "mean" if mean else "sum"
    rh, rw = _leaves((h, w), torch.float64)
    reference(rh, rw, t, reduction=red).backward()
    hh, ww = _leaves((h, w), torch.float32)
    loss = linear_cross_entropy(hh, ww, t, reduction=red) * 0.5
    with _Shapes() as seen:
        loss.backward()
    assert seen.shapes.count((V, H)) == 0 and seen.shapes.count((N, H)) == 0, seen.shapes
    for out, ref in ((hh.grad, rh.grad), (ww.grad, rw.grad)):
        assert rel_error(out, 0.5 * ref) < 1e-5
    hh.grad = ww.grad = None
    loss = linear_cross_entropy(hh, ww, t, reduction=red)
    with _Shapes() as seen:
        loss.backward(retain_graph=True)
    assert seen.shapes.count((V, H)) == 1 and seen.shapes.count((N, H)) == 1, seen.shapes
    loss.backward(retain_graph=True)
    loss.backward()
    for out, ref in ((hh.grad, rh.grad), (ww.grad, rw.grad)):
        assert rel_error(out, 3 * ref) < 1e-5


def test_in_place_backward_after_a_retained_one():
    """A retained backward, then the last one (graph freed, in place): the last one still starts
    from the unscaled gradients, and ``.grad`` accumulates both."""
    h, w, _, t, _, _ = _data(13)
    rh, rw = _leaves((h, w), torch.float64)
    reference(rh, rw, t).backward()
    hh, ww = _leaves((h, w), torch.float32)
    loss = linear_cross_entropy(hh, ww, t)
    g_kept = torch.autograd.grad(loss * 3.0, [hh, ww], retain_graph=True)
    (loss * -2.0).backward()
    for kept, acc, ref in zip(g_kept, (hh.grad, ww.grad), (rh.grad, rw.grad)):
        assert rel_error(kept, 3 * ref) < 1e-5
        assert rel_error(acc, -2 * ref) < 1e-5


def test_opcheck():
    h, w, b, t, _, _ = _data(9, True)
    hh, ww, bb = _leaves((h, w, b), torch.float32)
    tw = torch.rand(N, requires_grad=True)
    op = torch.ops.lmfuse.lce_chunked.default
    torch.library.opcheck(op, (hh, ww, bb, t, tw, V, IGN, 0.8, 3.0, 0.1, 1e-3, [True, True, True], 8))
    torch.library.opcheck(op, (hh, ww, None, t.clamp(0, 899), tw, 900, IGN, 1.0, None, 0.0, 0.0,
                               [True, False, False], 40))


def test_compile_fullgraph_matches_eager(chunked, monkeypatch):
    calls = []
    real = _lce_chunked._forward
    monkeypatch.setattr(_lce_chunked, "_forward", lambda *a: (calls.append(1), real(*a))[1])
    h, w, b, t, tw, _ = _data(10, True, True)
    fn = torch.compile(lambda h, w, b, t, tw: linear_cross_entropy(h, w, t, bias=b, token_weight=tw,
                                                                   label_smoothing=0.1, softcap=5.0),
                       fullgraph=True, backend="aot_eager")
    a = _leaves((h, w, b, tw), torch.float32)
    c = _leaves((h, w, b, tw), torch.float32)
    la = fn(a[0], a[1], a[2], t, a[3])
    la.backward()
    assert calls  # the compiled graph runs the gradient-in-forward op
    lc = linear_cross_entropy(c[0], c[1], t, bias=c[2], token_weight=c[3], label_smoothing=0.1, softcap=5.0)
    lc.backward()
    torch.testing.assert_close(la, lc)
    for x, y in zip(a, c):
        torch.testing.assert_close(x.grad, y.grad)


# ------------------------------------------------------------------ the C++ chunk kernel alone
_HALF_ULP = {torch.float32: 2.0 ** -24, torch.bfloat16: 2.0 ** -8, torch.float16: 2.0 ** -11}
# below the smallest normal, rounding errs by up to half the subnormal spacing (absolute)
_HALF_SUBNORMAL = {torch.float32: 2.0 ** -150, torch.bfloat16: 2.0 ** -134, torch.float16: 2.0 ** -25}


def _chunk_kernel_expected(u64, t, tw, scale, cap, eps, lam, ignore):
    """Per-token loss and G = ∂(tw·ℓ)/∂u in float64, written out from the definitions."""
    Vp = u64.shape[1]
    y = scale * u64
    z = cap * torch.tanh(y / cap) if cap else y
    lse = torch.logsumexp(z, 1)
    valid = t != ignore
    inr = (t >= 0) & (t < Vp)
    zt = torch.where(inr, z.gather(1, t.clamp(0, Vp - 1)[:, None]).squeeze(1), torch.zeros_like(lse))
    li = lse - (1 - eps) * zt - eps / Vp * z.sum(1) + lam * lse * lse
    li = torch.where(valid & ~inr, torch.full_like(li, float("nan")), li)
    li = torch.where(valid, li, torch.zeros_like(li))
    onehot = torch.zeros_like(z)
    onehot[inr.nonzero().squeeze(1), t[inr]] = 1.0
    dz = tw[:, None] * ((1 + 2 * lam * lse)[:, None] * torch.exp(z - lse[:, None]) - eps / Vp - (1 - eps) * onehot)
    du = dz * scale * ((1 - torch.tanh(y / cap) ** 2) if cap else 1.0)
    return li, du


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.float16])
@pytest.mark.parametrize("scale,cap,eps,lam", [(1.0, 0.0, 0.0, 0.0), (0.7, 3.0, 0.1, 1e-3), (-1.3, 0.0, 0.2, 0.0)])
def test_chunk_kernel_matches_float64_definition(dtype, scale, cap, eps, lam):
    """``lmfuse._C.lce_chunk_grad_`` on a strided block whose width is no multiple of 8: the loss
    per token to float32 accuracy, and G within half an ulp of the dtype (+ float32 error) of the
    float64 value; ignored rows give 0 and G = 0; a valid out-of-range target gives NaN and no
    one-hot term; the result does not depend on the thread count."""
    from lmfuse import _backend
    ext = _backend.cpu_extension()
    R, Vp = 13, 1003
    g = torch.Generator().manual_seed(11)
    wide = (torch.randn(R, Vp + 5, generator=g, dtype=torch.float64) * 3).to(dtype)
    u = wide[:, :Vp]  # row stride Vp + 5
    t = torch.randint(0, Vp, (R,), generator=g)
    t[2] = IGN
    t[5] = Vp + 7          # out of range on a valid row
    tw = torch.rand(R, generator=g) + 0.1
    tw[2] = 0.0            # the caller zeroes ignored rows' weights
    li_ref, du_ref = _chunk_kernel_expected(u.double(), t, tw.double(), scale, cap, eps, lam, IGN)
    outs = []
    threads = torch.get_num_threads()
    try:
        for n in (1, 2):
            torch.set_num_threads(n)
            w2 = wide.clone()
            li = ext.lce_chunk_grad_(w2[:, :Vp], t, tw, IGN, scale, cap, eps, lam, True)
            outs.append((li, w2))
    finally:
        torch.set_num_threads(threads)
    (li, w2), (li2, w2b) = outs
    assert torch.equal(w2, w2b) and torch.equal(li.nan_to_num(1.5), li2.nan_to_num(1.5))
    assert torch.equal(w2[:, Vp:], wide[:, Vp:])  # nothing written past V'
    assert torch.isnan(li[5]) and float(li[2]) == 0.0
    ok = torch.ones(R, dtype=torch.bool)
    ok[5] = False
    assert torch.allclose(li[ok].double(), li_ref[ok], rtol=2e-6, atol=2e-6)
    G = w2[:, :Vp].double()
    assert not G[2].any()
    bound = (du_ref.abs() * _HALF_ULP[dtype] * 1.01 + 1e-6 * du_ref.abs().amax(1, keepdim=True)
             + _HALF_SUBNORMAL[dtype] * 1.01 + 1e-12)
    err = (G - du_ref).abs()
    assert (err <= bound).all(), float((err / bound).max())
    # without want_grad: the same losses, u untouched
    w3 = wide.clone()
    li3 = ext.lce_chunk_grad_(w3[:, :Vp], t, tw, IGN, scale, cap, eps, lam, False)
    assert torch.equal(w3, wide) and torch.equal(li3.nan_to_num(1.5), li.nan_to_num(1.5))


def test_chunk_kernel_rejects_bad_arguments():
    from lmfuse import _backend
    ext = _backend.cpu_extension()
    u, t, tw = torch.randn(4, 10), torch.zeros(4, dtype=torch.long), torch.ones(4)
    with pytest.raises(RuntimeError, match="'u' must be"):
        ext.lce_chunk_grad_(u.t(), t, tw, IGN, 1.0, 0.0, 0.0, 0.0, True)
    with pytest.raises(RuntimeError, match="'target' must be"):
        ext.lce_chunk_grad_(u, t[:3], tw, IGN, 1.0, 0.0, 0.0, 0.0, True)
    with pytest.raises(RuntimeError, match="'tw' must be"):
        ext.lce_chunk_grad_(u, t, tw.double(), IGN, 1.0, 0.0, 0.0, 0.0, True)
    with pytest.raises(RuntimeError, match="'softcap'"):
        ext.lce_chunk_grad_(u, t, tw, IGN, 1.0, -1.0, 0.0, 0.0, True)
