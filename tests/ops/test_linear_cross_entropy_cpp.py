"""Tests of the CPU kernels behind the fused vocabulary losses (lmfuse.ops._lce_cpu).

Contract under test (see the module docstring of lmfuse.ops._lce_cpu): logits
z = softcap(logit_scale · (hidden2d · weight[:V']ᵀ + bias[:V'])); ``forward_stats`` returns per-token
lse, z_target, Σz, Σ p·z and the first argmax; ``backward`` turns per-token coefficients a, b, c, d of
dz = p·(a + d·z) + b·1[v = target] + c into dhidden, dweight, dbias through the softcap and the
scale. Everything is compared with the same contract evaluated in float64 on the (rounded) inputs.

The kernels upcast bf16/fp16 inputs exactly and accumulate in fp32, so the forward statistics meet
the fp32 tolerance for every input dtype; low-precision gradients are rounded once to the dtype,
and must be no worse than PyTorch's own error in that dtype.
"""

from __future__ import annotations

import math

import pytest
import torch
import torch.nn.functional as F

from lmfuse.testing import assert_close_to_reference, rel_error, tolerance

_C = pytest.importorskip("lmfuse._C", reason="CPU extension lmfuse._C is not built")
from lmfuse.ops import _lce_cpu  # noqa: E402

if not _lce_cpu.available():
    pytest.skip("lmfuse._C lacks the linear_cross_entropy kernels (stale build)", allow_module_level=True)

DTYPES = [torch.float32, torch.bfloat16, torch.float16]
IGN = -100


# ----------------------------------------------------------------------------------------------
# float64 evaluation of the contract

def _logits64(h, w, bias, vocab_size, scale, softcap):
    u = h.double() @ w.double()[:vocab_size].T
    if bias is not None:
        u = u + bias.double()[:vocab_size]
    y = scale * u
    if softcap is None:
        return y, torch.full_like(y, scale)
    th = torch.tanh(y / softcap)
    return softcap * th, scale * (1 - th * th)


def _stats64(h, w, bias, target, vocab_size, scale, softcap, ignore_index=IGN):
    z, _ = _logits64(h, w, bias, vocab_size, scale, softcap)
    lse = torch.logsumexp(z, 1)
    p = torch.softmax(z, 1)
    valid = target != ignore_index
    zt = torch.where(valid, z.gather(1, target.clamp(0, vocab_size - 1)[:, None])[:, 0], torch.zeros_like(lse))
    return lse, zt, z.sum(1), (p * z).sum(1), z.argmax(1), z


def _grads64(h, w, bias, target, a, b, c, d, vocab_size, scale, softcap, ignore_index=IGN):
    z, g = _logits64(h, w, bias, vocab_size, scale, softcap)
    lse = torch.logsumexp(z, 1, keepdim=True)
    p = torch.exp(z - lse)
    valid = target != ignore_index
    onehot = torch.zeros_like(z)
    onehot[valid.nonzero()[:, 0], target[valid]] = 1
    dz = p * (a.double()[:, None] + d.double()[:, None] * z) + b.double()[:, None] * onehot + c.double()[:, None]
    dpre = torch.where(valid[:, None], dz * g, torch.zeros_like(dz))
    V, H = w.shape
    dh = dpre @ w.double()[:vocab_size]
    dw = torch.zeros(V, H, dtype=torch.float64)
    dw[:vocab_size] = dpre.T @ h.double()
    db = torch.zeros(V, dtype=torch.float64)
    db[:vocab_size] = dpre.sum(0)
    return dh, dw, db


# ----------------------------------------------------------------------------------------------
# inputs

def _inputs(N, V, H, dtype, *, vocab_size=None, bias=True, logit_scale=1.0, n_ignored=3, spread=3.0, seed=None):
    g = torch.Generator().manual_seed(seed if seed is not None else int(torch.randint(0, 2**31, ()).item()))
    vocab_size = V if vocab_size is None else vocab_size
    h = torch.randn(N, H, generator=g).to(dtype)
    # logits of O(spread) before logit_scale, so the softmax is neither flat nor one-hot
    w = (torch.randn(V, H, generator=g) * spread / math.sqrt(H)).to(dtype)
    b = (torch.randn(V, generator=g) * 0.5).to(dtype) if bias else None
    target = torch.randint(0, vocab_size, (N,), generator=g)
    if n_ignored:
        target[torch.randperm(N, generator=g)[:n_ignored]] = IGN
    coeffs = [torch.randn(N, generator=g) for _ in range(4)]
    return h, w, b, target, coeffs


def _fwd(h, w, b, t, vocab_size, scale=1.0, softcap=None, *, want=(True, True, True), ignore_index=IGN):
    return _lce_cpu.forward_stats(h, w, b, t, vocab_size=vocab_size, ignore_index=ignore_index, logit_scale=scale,
                                  softcap=softcap, want_sum_z=want[0], want_sum_pz=want[1], want_argmax=want[2])


def _bwd(h, w, b, t, lse, coeffs, vocab_size, scale=1.0, softcap=None, *, need=(True, True, True),
         ignore_index=IGN):
    return _lce_cpu.backward(h, w, b, t, lse, *coeffs, vocab_size=vocab_size, ignore_index=ignore_index,
                             logit_scale=scale, softcap=softcap, need_hidden=need[0], need_weight=need[1],
                             need_bias=need[2] and b is not None)


def _check_stats(out, ref, valid):
    lse, zt, sz, spz, am = out
    rlse, rzt, rsz, rspz, ram, z64 = ref
    for o in (lse, zt, sz, spz):
        assert o.dtype == torch.float32 and o.shape == rlse.shape
    assert_close_to_reference(lse, rlse, torch.float32, "lse")
    assert_close_to_reference(zt, rzt, torch.float32, "z_target")
    assert torch.all(zt[~valid] == 0)
    # Σz sums V' terms of both signs, so it can cancel: bound its error by the size of the terms
    assert torch.all((sz.double() - rsz).abs() <= 1e-5 * z64.abs().sum(1)), (sz.double() - rsz).abs().max()
    assert_close_to_reference(spz, rspz, torch.float32, "sum_pz")
    # argmax: the float64 one wherever the top two logits differ by more than fp32 rounding;
    # on such near-ties (saturated softcaps) any index within rounding of the maximum
    assert am.dtype == torch.int64
    top2 = z64.topk(min(2, z64.shape[1]), 1).values
    slack = 1e-5 * (1 + top2[:, 0].abs())
    clear = (top2[:, 0] - top2[:, -1] > slack) | (z64.shape[1] == 1)
    assert torch.equal(am[clear], ram[clear])
    assert torch.all(z64.gather(1, am[:, None])[:, 0] >= top2[:, 0] - slack)


CASES = [
    # (N, V, vocab_size, H, bias, logit_scale, softcap): odd sizes, V not a multiple of any block
    pytest.param(37, 1003, 1003, 48, True, 1.0, None, id="plain"),
    pytest.param(37, 1003, 990, 48, True, 0.7, None, id="vocab_size<V,scale"),
    pytest.param(37, 1003, 1003, 48, False, 1.0, 5.0, id="softcap,nobias"),
    pytest.param(37, 1003, 777, 48, True, 1.6, 2.0, id="softcap,scale,vocab_size"),
    pytest.param(1, 7, 5, 3, True, 1.0, None, id="tiny"),
    pytest.param(600, 530, 530, 33, True, 1.0, 4.0, id="several_token_blocks"),
]


@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize("N,V,Vp,H,bias,scale,softcap", CASES)
def test_forward_stats_match_float64(N, V, Vp, H, bias, scale, softcap, dtype):
    h, w, b, t, _ = _inputs(N, V, H, dtype, vocab_size=Vp, bias=bias, n_ignored=min(3, N - 1))
    out = _fwd(h, w, b, t, Vp, scale, softcap)
    # inputs are upcast exactly and accumulated in fp32: fp32 accuracy for every dtype
    ref = _stats64(h, w, b, t, Vp, scale, softcap)
    # the float64 argmax can differ from an fp32 one only on near-ties; none expected here
    _check_stats(out, ref, t != IGN)


@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize("N,V,Vp,H,bias,scale,softcap", CASES)
def test_backward_matches_float64(N, V, Vp, H, bias, scale, softcap, dtype):
    h, w, b, t, coeffs = _inputs(N, V, H, dtype, vocab_size=Vp, bias=bias, n_ignored=min(3, N - 1))
    lse = _fwd(h, w, b, t, Vp, scale, softcap)[0]
    dh, dw, db = _bwd(h, w, b, t, lse, coeffs, Vp, scale, softcap)
    rdh, rdw, rdb = _grads64(h, w, b, t, *coeffs, Vp, scale, softcap)
    assert dh.dtype == dtype and dh.shape == h.shape
    assert dw.dtype == dtype and dw.shape == w.shape
    # fp32 accumulation, one rounding to the dtype: the table's bound for that dtype
    assert_close_to_reference(dh, rdh, dtype, "dhidden")
    assert_close_to_reference(dw, rdw, dtype, "dweight")
    assert torch.all(dw[Vp:] == 0), "rows past vocab_size must get a zero gradient"
    if bias:
        assert db.dtype == dtype and db.shape == b.shape
        assert_close_to_reference(db, rdb, dtype, "dbias")
        assert torch.all(db[Vp:] == 0)
    else:
        assert db.numel() == 0


def test_ce_coefficients_give_autograd_gradient_of_cross_entropy():
    """With the cross-entropy coefficients (a = γ, b = −γ, c = d = 0, γ = 1/n_valid) the kernel
    gives the float64 autograd gradient of mean cross-entropy over softcapped, scaled logits."""
    N, V, Vp, H, scale, cap = 41, 301, 290, 24, 0.8, 3.0
    h, w, b, t, _ = _inputs(N, V, H, torch.float32, vocab_size=Vp)
    valid = t != IGN
    gamma = torch.where(valid, 1.0 / valid.sum(), torch.zeros(N))
    lse, zt, *_ = _fwd(h, w, b, t, Vp, scale, cap, want=(False, False, False))
    dh, dw, db = _bwd(h, w, b, t, lse, [gamma, -gamma, torch.zeros(N), torch.zeros(N)], Vp, scale, cap)

    h64, w64, b64 = (x.double().requires_grad_() for x in (h, w, b))
    y = scale * (h64 @ w64[:Vp].T + b64[:Vp])
    loss = F.cross_entropy(cap * torch.tanh(y / cap), t, ignore_index=IGN)
    loss.backward()
    assert_close_to_reference((lse - zt)[valid].mean(), loss.detach(), torch.float32, "loss")
    assert_close_to_reference(dh, h64.grad, torch.float32, "dhidden")
    assert_close_to_reference(dw, w64.grad, torch.float32, "dweight")
    assert_close_to_reference(db, b64.grad, torch.float32, "dbias")


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16], ids=str)
def test_low_precision_gradients_no_worse_than_torch(dtype):
    """Cross-entropy gradients in bf16/fp16: no worse than eager PyTorch (linear + cross_entropy
    in the same dtype) against float64."""
    N, V, H = 64, 1003, 48
    h, w, b, t, _ = _inputs(N, V, H, dtype, bias=False)
    valid = t != IGN
    gamma = torch.where(valid, 1.0 / valid.sum(), torch.zeros(N))
    lse = _fwd(h, w, None, t, V, want=(False, False, False))[0]
    dh, dw, _ = _bwd(h, w, None, t, lse, [gamma, -gamma, torch.zeros(N), torch.zeros(N)], V)

    def eager(dt):
        hh, ww = h.to(dt).requires_grad_(), w.to(dt).requires_grad_()
        F.cross_entropy(F.linear(hh, ww), t, ignore_index=IGN).backward()
        return hh.grad, ww.grad

    rdh, rdw = eager(torch.float64)
    tdh, tdw = eager(dtype)
    assert rel_error(dh, rdh) <= max(rel_error(tdh, rdh), tolerance(dtype) / 4)
    assert rel_error(dw, rdw) <= max(rel_error(tdw, rdw), tolerance(dtype) / 4)


@pytest.mark.parametrize("dtype", DTYPES, ids=str)
def test_large_logits_do_not_overflow(dtype):
    """Logits of size ~1e4 (exp would overflow fp32 without the running max)."""
    N, V, H = 37, 1003, 48
    h, w, b, t, coeffs = _inputs(N, V, H, dtype, spread=1.0)
    scale = 1e4 / 3
    out = _fwd(h, w, b, t, V, scale)
    ref = _stats64(h, w, b, t, V, scale, None)
    assert max(ref[0].abs().max().item(), 1) > 1e3, "the case must reach large logits"
    for o in out[:4]:
        assert torch.isfinite(o).all()
    assert_close_to_reference(out[0], ref[0], torch.float32, "lse")
    assert_close_to_reference(out[1], ref[1], torch.float32, "z_target")
    assert_close_to_reference(out[3], ref[3], torch.float32, "sum_pz")
    assert torch.equal(out[4], ref[4])
    # mean cross-entropy coefficients (a = 1/N, b = −1/N, c = d = 0): the true gradients, × 3333,
    # stay within fp16's range
    gamma = torch.full((N,), 1.0 / N)
    coeffs = [gamma, -gamma, torch.zeros(N), torch.zeros(N)]
    dh, dw, db = _bwd(h, w, b, t, out[0], coeffs, V, scale)
    rdh, rdw, rdb = _grads64(h, w, b, t, *coeffs, V, scale, None)
    for g, r, name in ((dh, rdh, "dhidden"), (dw, rdw, "dweight"), (db, rdb, "dbias")):
        assert torch.isfinite(g).all(), name
        # p is a near one-hot here: an fp32 logit error of eps·1e4 moves it by ~1e-3 relative
        assert_close_to_reference(g, r, dtype, name, factor=max(1.0, 1e-3 / tolerance(dtype)))


def test_argmax_ties_pick_the_lowest_index():
    """Exact ties within a SIMD group, across groups and across vocab blocks (256 rows)."""
    N, V, H = 5, 1003, 16
    g = torch.Generator().manual_seed(0)
    h = torch.randn(N, H, generator=g)
    w = torch.randn(V, H, generator=g) * 0.1
    best = h.sum(0, keepdim=True).sign()  # a row that wins for most tokens, made huge so it always wins
    w[[900, 700, 300, 11, 6, 3]] = best * 10  # identical rows: identical logits
    h = h.abs() * best  # every token points along `best`
    t = torch.zeros(N, dtype=torch.long)
    out = _fwd(h, w, None, t, V, want=(False, False, True))
    assert torch.equal(out[4], torch.full((N,), 3)), out[4]
    # with the first tied rows out of the vocabulary, the next tied row wins
    out = _fwd(h, w, None, t, 500, want=(False, False, True))
    assert torch.equal(out[4], torch.full((N,), 3))
    w2 = w.clone()
    w2[[3, 6, 11]] = 0
    out = _fwd(h, w2, None, t, V, want=(False, False, True))
    assert torch.equal(out[4], torch.full((N,), 300)), out[4]
    assert torch.equal(out[4], (h.double() @ w2.double().T).argmax(1))


def test_all_ignored_rows_give_finite_stats_and_zero_gradients():
    N, V, H = 20, 300, 16
    h, w, b, _, coeffs = _inputs(N, V, H, torch.float32, n_ignored=0)
    t = torch.full((N,), IGN)
    lse, zt, sz, spz, am = _fwd(h, w, b, t, V)
    ref = _stats64(h, w, b, t, V, 1.0, None)
    assert_close_to_reference(lse, ref[0], torch.float32, "lse")  # ignored rows still get their lse
    assert torch.all(zt == 0)
    dh, dw, db = _bwd(h, w, b, t, lse, coeffs, V)
    assert torch.all(dh == 0) and torch.all(dw == 0) and torch.all(db == 0)


def test_ignore_index_inside_the_vocabulary():
    """ignore_index may be a real vocabulary id (e.g. 0): those rows are ignored, others use it."""
    N, V, H = 30, 200, 16
    h, w, b, t, coeffs = _inputs(N, V, H, torch.float32, n_ignored=0)
    t[::3] = 0
    out = _fwd(h, w, b, t, V, ignore_index=0)
    ref = _stats64(h, w, b, t, V, 1.0, None, ignore_index=0)
    _check_stats(out, ref, t != 0)
    grads = _bwd(h, w, b, t, out[0], coeffs, V, ignore_index=0)
    for g, r in zip(grads, _grads64(h, w, b, t, *coeffs, V, 1.0, None, ignore_index=0)):
        assert_close_to_reference(g, r, torch.float32)


def test_out_of_range_targets_have_no_logit():
    """A target neither ignore_index nor in [0, vocab_size) (the op decides what it means) is never
    used as an index: z_target 0, the row's other statistics as usual, and no one-hot gradient term."""
    N, V, Vp, H = 30, 300, 250, 16
    h, w, b, t, coeffs = _inputs(N, V, H, torch.float32, vocab_size=Vp, n_ignored=2)
    bad = torch.tensor([1, 5, 9, 20])
    t[bad] = torch.tensor([-1, 250, 299, 10**12])  # below 0, == vocab_size, inside V but past V', huge
    lse, zt, sz, spz, am = _fwd(h, w, b, t, Vp)
    ref = _stats64(h, w, b, t.clamp(-100, Vp - 1), Vp, 1.0, None)
    assert torch.all(zt[bad] == 0)
    assert_close_to_reference(lse, ref[0], torch.float32, "lse")
    assert_close_to_reference(spz, ref[3], torch.float32, "sum_pz")
    grads = _bwd(h, w, b, t, lse, coeffs, Vp)
    # reference: the same rows with b = 0 (no one-hot term), the rest unchanged
    a_, b_, c_, d_ = coeffs
    b0 = b_.clone()
    b0[bad] = 0
    t_ok = t.clone()
    t_ok[bad] = 0
    for g, r in zip(grads, _grads64(h, w, b, t_ok, a_, b0, c_, d_, Vp, 1.0, None)):
        assert_close_to_reference(g, r, torch.float32)


def test_need_flags_give_empty_tensors_and_same_values():
    N, V, H = 37, 1003, 48
    h, w, b, t, coeffs = _inputs(N, V, H, torch.float32)
    lse, zt, sz, spz, am = _fwd(h, w, b, t, V, want=(False, False, False))
    assert sz.shape == (0,) and spz.shape == (0,) and am.shape == (0,) and am.dtype == torch.int64
    full = _fwd(h, w, b, t, V)
    assert torch.equal(lse, full[0]) and torch.equal(zt, full[1])
    dh, dw, db = _bwd(h, w, b, t, lse, coeffs, V)
    for need in [(True, False, False), (False, True, False), (False, False, True), (False, False, False)]:
        out = _bwd(h, w, b, t, lse, coeffs, V, need=need)
        for flag, o, ref in zip(need, out, (dh, dw, db)):
            if flag:
                assert torch.equal(o, ref)
            else:
                assert o.numel() == 0


def test_non_contiguous_inputs_are_accepted_by_the_wrapper():
    N, V, H = 37, 300, 48
    h, w, b, t, coeffs = _inputs(N, V, H, torch.float32)
    hn = torch.randn(H, N).T.copy_(h)  # same values, transposed storage
    wn = torch.randn(H, V).T.copy_(w)
    tn = torch.stack([t, t], 1)[:, 0]
    assert not (hn.is_contiguous() or wn.is_contiguous() or tn.is_contiguous())
    out, ref = _fwd(hn, wn, b, tn, V), _fwd(h, w, b, t, V)
    for o, r in zip(out, ref):
        assert torch.equal(o, r)
    cn = [torch.stack([c, c], 1)[:, 1] for c in coeffs]
    for o, r in zip(_bwd(hn, wn, b, tn, out[0], cn, V), _bwd(h, w, b, t, ref[0], coeffs, V)):
        assert torch.allclose(o, r, rtol=1e-6, atol=1e-7)


def test_empty_batch():
    h, w, b, t, _ = _inputs(0, 50, 8, torch.float32, n_ignored=0)
    lse, zt, sz, spz, am = _fwd(h, w, b, t, 50)
    assert lse.shape == (0,) and am.shape == (0,)
    dh, dw, db = _bwd(h, w, b, t, lse, [torch.zeros(0)] * 4, 50)
    assert dh.shape == (0, 8) and torch.all(dw == 0) and torch.all(db == 0)


def _with_threads(n, fn):
    prev = torch.get_num_threads()
    torch.set_num_threads(n)
    try:
        return fn()
    finally:
        torch.set_num_threads(prev)


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=str)
def test_thread_count_independence(dtype):
    """Forward: identical (each row has a fixed order). Backward: dweight/dbias identical (each
    vocab block sums its tokens in order); dhidden sums per-thread partials, so it may differ in
    the last fp32 bits."""
    N, V, H = 1100, 700, 40  # several token blocks (512) and vocab blocks (256)
    h, w, b, t, coeffs = _inputs(N, V, H, dtype)

    def run():
        f = _fwd(h, w, b, t, V, 1.3, 6.0)
        return f, _bwd(h, w, b, t, f[0], coeffs, V, 1.3, 6.0)

    (f1, g1), (f2, g2) = _with_threads(1, run), _with_threads(2, run)
    for a, c in zip(f1, f2):
        assert torch.equal(a, c)
    assert torch.equal(g1[1], g2[1]) and torch.equal(g1[2], g2[2])
    if dtype == torch.float32:
        assert rel_error(g1[0], g2[0].double()) <= 1e-6
    else:  # one rounding to bf16 of values that agree to fp32 rounding: at most one ulp apart
        ulp = torch.finfo(dtype).eps * g2[0].double().abs()
        assert torch.all((g1[0].double() - g2[0].double()).abs() <= ulp)


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=str)
def test_long_inputs_are_processed_in_token_chunks(dtype):
    """N·H large enough that the backward splits the tokens into chunks (fp32 dweight in the output
    itself; bf16 through a full fp32 accumulator)."""
    N, V, H = (4500 if dtype == torch.float32 else 3000), 300, 2048
    h, w, b, t, coeffs = _inputs(N, V, H, dtype, spread=2.0)
    # rows per chunk at 2 threads: 64 MiB / (H·4 B · (2 partials (+1 fp32 copy for bf16)))
    per_row = H * 4 * (2 + (dtype != torch.float32))
    assert N * per_row > 64 * 2**20
    lse = _fwd(h, w, b, t, V, want=(False, False, False))[0]
    dh, dw, db = _with_threads(2, lambda: _bwd(h, w, b, t, lse, coeffs, V))
    rdh, rdw, rdb = _grads64(h, w, b, t, *coeffs, V, 1.0, None)
    assert_close_to_reference(dh, rdh, dtype, "dhidden")
    assert_close_to_reference(dw, rdw, dtype, "dweight")
    assert_close_to_reference(db, rdb, dtype, "dbias")


# ----------------------------------------------------------------------------------------------
# bad inputs

def _good():
    h, w, b, t, coeffs = _inputs(6, 20, 4, torch.float32)
    return dict(h=h, w=w, b=b, t=t, coeffs=coeffs)


@pytest.mark.parametrize("change,exc,match", [
    (dict(h=torch.randn(6, 4, dtype=torch.float64)), TypeError, "hidden2d must have dtype"),
    (dict(h=torch.randn(6, 4, 1)), ValueError, r"hidden2d must be \[N, H\]"),
    (dict(w=torch.randn(20, 5)), ValueError, r"weight must be \[V, H\] with H = 4"),
    (dict(w=torch.randn(20, 4).bfloat16()), TypeError, "weight must have the dtype of hidden2d"),
    (dict(b=torch.randn(19)), ValueError, r"bias must be \[V\] = \[20\]"),
    (dict(t=torch.zeros(6, dtype=torch.int32)), TypeError, "target must be int64"),
    (dict(t=torch.zeros(5, dtype=torch.long)), ValueError, r"target must be \[N\] = \[6\]"),
    (dict(vocab_size=0), ValueError, r"vocab_size must be in \[1, V = 20\], got 0"),
    (dict(vocab_size=21), ValueError, r"vocab_size must be in \[1, V = 20\], got 21"),
    (dict(vocab_size=2.0), TypeError, "vocab_size must be an int"),
    (dict(softcap=0.0), ValueError, "softcap must be None or a finite number > 0"),
    (dict(softcap=float("inf")), ValueError, "softcap must be None or a finite number > 0"),
    (dict(logit_scale=float("nan")), ValueError, "logit_scale must be a finite number"),
    (dict(h="x"), TypeError, "hidden2d must be a torch.Tensor"),
])
def test_bad_inputs_raise_clear_errors(change, exc, match):
    g = _good()
    kw = dict(vocab_size=20, ignore_index=IGN, logit_scale=1.0, softcap=None)
    for k in ("vocab_size", "softcap", "logit_scale"):
        if k in change:
            kw[k] = change[k]
    h, w, b, t = (change.get(k, g[k]) for k in ("h", "w", "b", "t"))
    with pytest.raises(exc, match=match):
        _lce_cpu.forward_stats(h, w, b, t, **kw, want_sum_z=True, want_sum_pz=True, want_argmax=True)
    with pytest.raises(exc, match=match):
        _lce_cpu.backward(h, w, b, t, torch.zeros(6), *g["coeffs"], **kw, need_hidden=True, need_weight=True,
                          need_bias=True)


def test_bad_coefficients_raise_clear_errors():
    g = _good()
    kw = dict(vocab_size=20, ignore_index=IGN, logit_scale=1.0, softcap=None, need_hidden=True,
              need_weight=True, need_bias=True)
    a, b, c, d = g["coeffs"]
    with pytest.raises(ValueError, match=r"c must be \[N\] = \[6\]"):
        _lce_cpu.backward(g["h"], g["w"], g["b"], g["t"], torch.zeros(6), a, b, torch.zeros(5), d, **kw)
    with pytest.raises(TypeError, match="lse must be a floating tensor"):
        _lce_cpu.backward(g["h"], g["w"], g["b"], g["t"], torch.zeros(6, dtype=torch.long), a, b, c, d, **kw)
    with pytest.raises(ValueError, match="need_bias=True needs a bias"):
        _lce_cpu.backward(g["h"], g["w"], None, g["t"], torch.zeros(6), a, b, c, d, **kw)


def test_extension_rejects_what_memory_safety_depends_on():
    """The bindings re-check shapes, dtypes, contiguity and vocab_size (a direct caller of
    lmfuse._C skips the Python checks)."""
    g = _good()
    h, w, b, t = g["h"], g["w"], g["b"], g["t"]
    with pytest.raises(RuntimeError, match="'hidden' must be a contiguous CPU tensor"):
        _C.lce_forward_stats(torch.randn(4, 6).T, w, b, t, 20, IGN, 1.0, 0.0, True, True, True)
    with pytest.raises(RuntimeError, match=r"'vocab_size' must be in \[1, V = 20\]"):
        _C.lce_forward_stats(h, w, b, t, 25, IGN, 1.0, 0.0, True, True, True)
    with pytest.raises(RuntimeError, match=r"'a' must be a contiguous CPU float32 \[N\] = \[6\]"):
        _C.lce_backward(h, w, b, t, torch.zeros(6), torch.zeros(6, dtype=torch.float64), *g["coeffs"][1:], 20, IGN,
                        1.0, 0.0, True, True, True)
    with pytest.raises(RuntimeError, match="'softcap' must be finite and > 0"):
        _C.lce_forward_stats(h, w, b, t, 20, IGN, 1.0, -1.0, True, True, True)
