"""Tests of the chunked path of linear_log_probs (lmfuse.ops._llp_chunked).

The path computes per-token log-probs chunk by chunk with ATen GEMMs and recomputes each chunk's
logits in the backward (the upstream gradient is a vector, so no gradient can be formed in the
forward). Every result is compared with the float64 reference of the op; bfloat16 / float16 results
must be within a small multiple of eager PyTorch's own error in the same dtype.
"""

from __future__ import annotations

import pytest
import torch

from lmfuse.ops import _lce_chunked, _llp_chunked
from lmfuse.ops.linear_cross_entropy import linear_log_probs, log_probs_reference
from lmfuse.testing import rel_error

N, V, H = 37, 1003, 48
IGN = -100

OPTIONS = [
    {},
    dict(temperature=0.7),
    dict(softcap=3.0, temperature=1.3),
    dict(vocab_size=990),
]


@pytest.fixture(params=["kernel", "torch", "vocab-blocks"])
def chunked(request, monkeypatch):
    """Force the path with a workspace of a few rows (N = 37 spans several chunks), once with the
    chunk's softmax work in the C++ kernel (the CPU default), once in PyTorch, and once with the
    float32 backward over vocabulary blocks (138 columns at N = 37: eight blocks, the last short;
    69 with a softcap). In the first two the blocks are too narrow (< MIN_BLOCK_COLS), so float32
    takes the token-chunked backward."""
    monkeypatch.setenv("LMFUSE_LCE_CHUNKED", "1")
    monkeypatch.setattr(_lce_chunked, "MIN_ROWS", 1)  # chunks of a few rows at these tiny shapes
    if request.param == "torch":
        monkeypatch.setattr(_llp_chunked, "fused_cpu", lambda h2: False)
        monkeypatch.setattr(_lce_chunked, "fused_cpu", lambda h2: False)
    else:
        assert _llp_chunked.fused_cpu(torch.empty(1, 1))
    monkeypatch.setattr(_lce_chunked, "WORKSPACE_BYTES", 4 * 1024 * 5)  # 5 rows (float32) / 10 (16-bit) per chunk
    if request.param == "vocab-blocks":
        monkeypatch.setattr(_llp_chunked, "MIN_BLOCK_COLS", 32)
        assert _llp_chunked.block_cols(N, V, False) == 138
    else:
        assert _llp_chunked.block_cols(N, V, False) == 0
    return request.param


def _data(seed, bias=False, vocab_size=V):
    g = torch.Generator().manual_seed(seed)
    h = torch.randn(N, H, generator=g, dtype=torch.float64)
    w = torch.randn(V, H, generator=g, dtype=torch.float64) * 0.3
    b = torch.randn(V, generator=g, dtype=torch.float64) if bias else None
    t = torch.randint(0, vocab_size, (N,), generator=g)
    t[::5] = IGN
    up = torch.randn(N, generator=g, dtype=torch.float64)  # random upstream gradient per token
    return h, w, b, t, up


def _leaves(tensors, dtype):
    return [None if x is None else x.detach().to(dtype).requires_grad_() for x in tensors]


def _run(fn, h, w, b, t, up, **kw):
    out = fn(h, w, t, bias=b, **kw)
    ins = [x for x in (h, w, b) if x is not None]
    grads = torch.autograd.grad((out * up.to(out.dtype)).sum(), ins)
    return out.detach(), grads


def _spy(monkeypatch):
    calls = []
    real = _llp_chunked.log_probs
    monkeypatch.setattr(_llp_chunked, "log_probs", lambda *a: (calls.append(1), real(*a))[1])
    return calls


@pytest.mark.parametrize("bias", [False, True])
@pytest.mark.parametrize("opts", OPTIONS, ids=lambda o: ",".join(o) or "plain")
def test_float32_matches_float64_reference(chunked, monkeypatch, bias, opts):
    h, w, b, t, up = _data(1, bias, opts.get("vocab_size", V))
    ref, ref_grads = _run(log_probs_reference, *_leaves((h, w, b), torch.float64), t, up, **opts)
    calls = _spy(monkeypatch)
    out, grads = _run(linear_log_probs, *_leaves((h, w, b), torch.float32), t, up, **opts)
    assert calls
    assert out.dtype == torch.float32 and out.shape == (N,)
    assert torch.equal(out[::5], torch.zeros_like(out[::5])) and not torch.signbit(out[::5]).any()
    assert rel_error(out, ref) < 1e-5
    for name, gx, gr in zip(("hidden", "weight", "bias"), grads, ref_grads):
        assert gx.shape == gr.shape and torch.isfinite(gx).all(), name
        assert rel_error(gx, gr) < 2e-5, (name, rel_error(gx, gr))


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
def test_low_precision_within_a_small_multiple_of_eager(chunked, lowp_gemm, monkeypatch, dtype):
    h, w, b, t, up = _data(2, True)
    ref, ref_grads = _run(log_probs_reference, *_leaves((h, w, b), torch.float64), t, up, softcap=4.0)

    def eager(h, w, t, bias=None, softcap=None):
        z = torch.nn.functional.linear(h, w, bias).float()
        z = softcap * torch.tanh(z / softcap)
        lp = torch.log_softmax(z, -1).gather(-1, t.clamp(min=0)[:, None])[:, 0]
        return lp.masked_fill(t == IGN, 0.0)

    e_out, e_grads = _run(eager, *_leaves((h, w, b), dtype), t, up, softcap=4.0)
    calls = _spy(monkeypatch)
    out, grads = _run(linear_log_probs, *_leaves((h, w, b), dtype), t, up, softcap=4.0)
    assert calls
    assert rel_error(out, ref) <= 2 * rel_error(e_out, ref) + 1e-6
    for name, gx, ge, gr in zip(("hidden", "weight", "bias"), grads, e_grads, ref_grads):
        assert gx.dtype == dtype
        assert rel_error(gx, gr) <= 2 * rel_error(ge, gr) + 1e-6, (name, rel_error(gx, gr), rel_error(ge, gr))


def test_frozen_weight_and_all_ignored(chunked):
    h, w, _, t, up = _data(3)
    hh = _leaves((h,), torch.float32)[0]
    ww = w.float()  # frozen head: no weight gradient is computed
    out = linear_log_probs(hh, ww, t)
    (out * up.float()).sum().backward()
    rh = h.clone().requires_grad_()
    (log_probs_reference(rh, w, t) * up).sum().backward()
    assert ww.grad is None and rel_error(hh.grad, rh.grad) < 2e-5
    # all ignored: zeros and zero gradients, no NaN
    hh = _leaves((h,), torch.float32)[0]
    wq = _leaves((w,), torch.float32)[0]
    none = torch.full_like(t, IGN)
    out = linear_log_probs(hh, wq, none)
    out.sum().backward()
    assert torch.equal(out, torch.zeros(N)) and torch.equal(hh.grad, torch.zeros_like(hh))
    assert torch.equal(wq.grad, torch.zeros_like(wq))


def test_lse_output_and_vocabulary_blocks_equal_token_chunks(monkeypatch):
    """The forward's second output is each token's log-sum-exp (float64 reference; +inf on ignored
    rows, computed over the row for a valid target outside the vocabulary); the vocabulary-blocked
    backward gives the token-chunked backward's gradients, finite even with such a row (whose
    log-prob is NaN) under a nonzero upstream gradient."""
    monkeypatch.setattr(_lce_chunked, "WORKSPACE_BYTES", 4 * 1024 * 5)
    h, w, b, t, up = _data(7, True, 990)
    t[3] = 995  # valid, but outside vocab_size = 990
    hh, ww, bb = _leaves((h, w, b), torch.float32)
    logp, lse = torch.ops.lmfuse.llp_chunked(hh, ww, bb, t, 990, IGN, 0.8, 3.0)
    z = 3.0 * torch.tanh(0.8 * (h @ w[:990].t() + b[:990]) / 3.0)
    want = torch.logsumexp(z, 1)
    valid = t != IGN
    assert torch.isnan(logp[3]) and torch.isinf(lse[~valid]).all() and (lse[~valid] > 0).all()
    assert rel_error(lse[valid], want[valid]) < 1e-6
    grads = {}
    for name, min_cols in (("blocks", 32), ("tokens", 10**9)):
        monkeypatch.setattr(_llp_chunked, "MIN_BLOCK_COLS", min_cols)
        seen = []
        real = _llp_chunked._blocked_backward
        monkeypatch.setattr(_llp_chunked, "_blocked_backward", lambda *a: (seen.append(1), real(*a))[1])
        grads[name] = torch.autograd.grad(logp, (hh, ww, bb), up.float(), retain_graph=True)
        assert bool(seen) == (name == "blocks")
    for a, c in zip(grads["blocks"], grads["tokens"]):
        assert torch.isfinite(a).all() and rel_error(a, c) < 1e-5


def test_path_is_taken_and_not_taken(monkeypatch):
    """The static rule: CPU bfloat16 with a gradient wanted, float32 with only the hidden states
    taking one (a frozen head), no entropy / argmax; forced on / off by LMFUSE_LCE_CHUNKED; a forced
    backend keeps its own path."""
    calls = _spy(monkeypatch)
    monkeypatch.delenv("LMFUSE_LCE_CHUNKED", raising=False)
    monkeypatch.delenv("LMFUSE_BACKEND", raising=False)
    h, w, _, t, _ = _data(4)
    linear_log_probs(*_leaves((h, w), torch.bfloat16), t)
    linear_log_probs(_leaves((h,), torch.float32)[0], w.float(), t)  # float32, frozen head
    assert len(calls) == 2
    linear_log_probs(*_leaves((h, w), torch.float32), t)  # float32, trainable head: the cpp kernels
    assert len(calls) == 2
    hh, ww = _leaves((h, w), torch.float32)
    linear_log_probs(hh, ww, t, return_entropy=True)
    linear_log_probs(hh, ww, t, return_argmax=True)
    with torch.no_grad():
        linear_log_probs(hh, ww, t)
    linear_log_probs(hh.detach(), ww.detach(), t)
    linear_log_probs(*_leaves((h, w), torch.float16), t)  # float16 on CPU: the cpp path by default
    assert len(calls) == 2
    monkeypatch.setenv("LMFUSE_BACKEND", "reference")
    linear_log_probs(hh, ww, t)
    monkeypatch.setenv("LMFUSE_LCE_CHUNKED", "0")
    monkeypatch.delenv("LMFUSE_BACKEND")
    linear_log_probs(hh, ww, t)
    assert len(calls) == 2
    monkeypatch.setenv("LMFUSE_LCE_CHUNKED", "1")
    linear_log_probs(*_leaves((h, w), torch.float16), t)
    with torch.no_grad():
        linear_log_probs(hh, ww, t)
    assert len(calls) == 4


def test_opcheck():
    h, w, b, t, up = _data(5, True)
    hh, ww, bb = _leaves((h, w, b), torch.float32)
    torch.library.opcheck(torch.ops.lmfuse.llp_chunked.default, (hh, ww, bb, t, V, IGN, 0.8, 3.0))
    torch.library.opcheck(torch.ops.lmfuse.llp_chunked.default, (hh, ww, None, t.clamp(0, 899), 900, IGN, 1.0, None))
    _, lse = torch.ops.lmfuse.llp_chunked(hh.detach(), ww.detach(), bb.detach(), t, V, IGN, 0.8, 3.0)
    torch.library.opcheck(torch.ops.lmfuse.llp_chunked_backward.default,
                          (up.float(), hh.detach(), ww.detach(), bb.detach(), t, lse, V, IGN, 0.8, 3.0,
                           [True, True, True]))


def test_compile_fullgraph_matches_eager(chunked, monkeypatch):
    h, w, b, t, up = _data(6, True)
    fn = torch.compile(lambda h, w, b, t: linear_log_probs(h, w, t, bias=b, softcap=5.0, temperature=0.9),
                       fullgraph=True, backend="aot_eager")
    a = _leaves((h, w, b), torch.float32)
    c = _leaves((h, w, b), torch.float32)
    out_a, grads_a = _run(lambda h, w, t, bias=None: fn(h, w, bias, t), a[0], a[1], a[2], t, up)
    out_c, grads_c = _run(linear_log_probs, c[0], c[1], c[2], t, up, softcap=5.0, temperature=0.9)
    torch.testing.assert_close(out_a, out_c, rtol=1e-6, atol=1e-6)
    for x, y in zip(grads_a, grads_c):
        torch.testing.assert_close(x, y, rtol=1e-5, atol=1e-6)


# -- frozen head: the hidden gradient's direction formed in the forward ---------------------------
def _node_names(out):
    names, todo = set(), [out.grad_fn]
    while todo:
        fn = todo.pop()
        if fn is not None and fn.name() not in names:
            names.add(fn.name())
            todo += [f for f, _ in fn.next_functions]
    return names


def _frozen_run(fn, h, w, b, t, up, **kw):
    out = fn(h, w, t, bias=b, **kw)
    (grad,) = torch.autograd.grad((out * up.to(out.dtype)).sum(), [h])
    return out.detach(), grad, out


HIDDEN_NODE = "GeneratedBackwardFor_lmfuse_llp_chunked_hidden_defaultBackward"


@pytest.mark.parametrize("bias", [False, True])
@pytest.mark.parametrize("opts", OPTIONS, ids=lambda o: ",".join(o) or "plain")
def test_frozen_head_matches_float64_reference(chunked, bias, opts):
    """Only the hidden states take a gradient (a frozen head and bias, as under LoRA): the op forms
    ``∂logp/∂hidden`` per token in the forward and the backward scales it by the upstream gradient."""
    h, w, b, t, up = _data(11, bias, opts.get("vocab_size", V))
    ref, ref_grad, _ = _frozen_run(log_probs_reference, h.clone().requires_grad_(), w, b, t, up, **opts)
    hh = _leaves((h,), torch.float32)[0]
    out, grad, node = _frozen_run(linear_log_probs, hh, w.float(), None if b is None else b.float(), t, up, **opts)
    assert HIDDEN_NODE in _node_names(node)
    assert torch.equal(out[::5], torch.zeros_like(out[::5])) and not torch.signbit(out[::5]).any()
    assert rel_error(out, ref) < 1e-5
    assert torch.equal(grad[::5], torch.zeros_like(grad[::5]))  # ignored rows
    assert rel_error(grad, ref_grad) < 2e-5


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
def test_frozen_head_low_precision_within_a_small_multiple_of_eager(chunked, lowp_gemm, dtype):
    h, w, b, t, up = _data(12, True)
    ref, ref_grad, _ = _frozen_run(log_probs_reference, h.clone().requires_grad_(), w, b, t, up, softcap=4.0)

    def eager(h, w, t, bias=None, softcap=None):
        z = torch.nn.functional.linear(h, w, bias).float()
        z = softcap * torch.tanh(z / softcap)
        return torch.log_softmax(z, -1).gather(-1, t.clamp(min=0)[:, None])[:, 0].masked_fill(t == IGN, 0.0)

    _, e_grad, _ = _frozen_run(eager, _leaves((h,), dtype)[0], w.to(dtype), b.to(dtype), t, up, softcap=4.0)
    e_out = eager(h.to(dtype), w.to(dtype), t, b.to(dtype), 4.0)
    out, grad, node = _frozen_run(linear_log_probs, _leaves((h,), dtype)[0], w.to(dtype), b.to(dtype), t, up,
                                  softcap=4.0)
    assert HIDDEN_NODE in _node_names(node)
    assert grad.dtype == dtype
    assert rel_error(out, ref) <= 2 * rel_error(e_out, ref) + 1e-6
    assert rel_error(grad, ref_grad) <= 2 * rel_error(e_grad, ref_grad) + 1e-6, (rel_error(grad, ref_grad),
                                                                                 rel_error(e_grad, ref_grad))


def test_frozen_head_backward_is_a_product(chunked):
    """The backward makes one hidden-sized tensor and nothing with a vocabulary dimension (no
    logits recomputed); two backwards through a retained graph give the same gradient."""
    from torch.utils._python_dispatch import TorchDispatchMode

    class Shapes(TorchDispatchMode):
        def __init__(self):
            super().__init__()
            self.shapes = []

        def __torch_dispatch__(self, func, types, args=(), kwargs=None):
            out = func(*args, **(kwargs or {}))
            for o in out if isinstance(out, (tuple, list)) else (out,):
                if isinstance(o, torch.Tensor):
                    self.shapes.append(tuple(o.shape))
            return out

    h, w, _, t, up = _data(13)
    hh = _leaves((h,), torch.float32)[0]
    out = linear_log_probs(hh, w.float(), t)
    with Shapes() as seen:
        g1 = torch.autograd.grad(out, [hh], up.float(), retain_graph=True)[0]
    assert (N, H) in seen.shapes and not any(V in s for s in seen.shapes), seen.shapes
    g2 = torch.autograd.grad(out, [hh], up.float())[0]
    assert torch.equal(g1, g2)


def test_frozen_head_out_of_range_target_and_trainable_path_agree():
    """A valid target outside the vocabulary (the ops behind the public one, which refuses it on the
    CPU): NaN log-prob, and the same finite hidden gradient as the op for a trainable head gives
    (no one-hot term for that row)."""
    h, w, b, t, up = _data(14, True, 990)
    t[3] = 995
    args = (990, IGN, 0.8, 3.0)
    hh = _leaves((h,), torch.float32)[0]
    out, basis = torch.ops.lmfuse.llp_chunked_hidden(hh, w.float(), b.float(), t, *args)
    grad = torch.autograd.grad(out, [hh], up.float())[0]
    hh2, ww2 = _leaves((h, w), torch.float32)
    out2, _ = torch.ops.lmfuse.llp_chunked(hh2, ww2, b.float(), t, *args)
    grad2 = torch.autograd.grad(out2, [hh2], up.float())[0]
    assert torch.isnan(out[3]) and torch.isnan(out2[3])
    keep = torch.arange(N) != 3
    assert rel_error(out[keep].detach(), out2[keep].detach()) < 1e-6
    assert torch.isfinite(grad).all() and rel_error(grad, grad2) < 1e-5
    assert torch.equal(basis[t == IGN], torch.zeros_like(basis[t == IGN]))


def test_frozen_head_opcheck_and_compile(monkeypatch):
    monkeypatch.setenv("LMFUSE_LCE_CHUNKED", "1")
    h, w, b, t, up = _data(15, True)
    hh = _leaves((h,), torch.float32)[0]
    torch.library.opcheck(torch.ops.lmfuse.llp_chunked_hidden.default,
                          (hh, w.float(), b.float(), t, V, IGN, 0.8, 3.0))
    torch.library.opcheck(torch.ops.lmfuse.llp_chunked_hidden.default,
                          (hh, w.float(), None, t.clamp(0, 899), 900, IGN, 1.0, None))
    fn = torch.compile(lambda h, w, b, t: linear_log_probs(h, w, t, bias=b, softcap=5.0, temperature=0.9),
                       fullgraph=True, backend="aot_eager")
    a, c = _leaves((h,), torch.float32)[0], _leaves((h,), torch.float32)[0]
    out_a, grad_a, _ = _frozen_run(lambda h, w, t, bias=None: fn(h, w, bias, t), a, w.float(), b.float(), t, up)
    out_c, grad_c, node = _frozen_run(linear_log_probs, c, w.float(), b.float(), t, up, softcap=5.0,
                                      temperature=0.9)
    assert HIDDEN_NODE in _node_names(node)
    torch.testing.assert_close(out_a, out_c, rtol=1e-6, atol=1e-6)
    torch.testing.assert_close(grad_a, grad_c, rtol=1e-5, atol=1e-6)
