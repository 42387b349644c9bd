"""lpa_qkv_projection: fused q/k/v low-rank projections against the float64 reference."""

import pytest
import torch

from lmfuse.ops import (lpa_qkv_projection, lpa_qkv_projection_reference, use_backend)
from lmfuse.testing import assert_close_to_reference

from .helpers import backend_params, poisoned_outputs

BACKENDS = backend_params(("triton", "reference"))


def _inputs(M, d, r, widths, dtype, device, biases=(True, False, True)):
    x = torch.randn(M, d, device=device).to(dtype).requires_grad_()
    downs = [(torch.randn(r, d, device=device) / d**0.5).to(dtype).requires_grad_() for _ in range(3)]
    ups = [(torch.randn(n, r, device=device) / r**0.5).to(dtype).requires_grad_() for n in widths]
    bs = [torch.randn(n, device=device).to(dtype).requires_grad_() if use else None
          for n, use in zip(widths, biases)]
    return x, downs, ups, bs


def _flat(x, downs, ups, bs):
    return [x, *downs, *ups, *[b for b in bs if b is not None]]


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("dtype", [torch.float32, torch.float16])
@pytest.mark.parametrize("M, d, r, widths", [(37, 45, 7, (29, 13, 13)), (20, 32, 16, (32, 16, 17)),
                                             (3, 17, 19, (5, 40, 9))])
def test_matches_float64_reference(backend, dtype, M, d, r, widths, device):
    x, downs, ups, bs = _inputs(M, d, r, widths, dtype, device)
    with use_backend(backend), poisoned_outputs():
        q, k, v = lpa_qkv_projection(x, downs, ups, bs)
        gq, gk, gv = torch.randn_like(q), torch.randn_like(k), torch.randn_like(v)
        grads = torch.autograd.grad((q, k, v), _flat(x, downs, ups, bs), (gq, gk, gv))
    x64, d64, u64, b64 = (x.detach().double().requires_grad_(),
                          [t.detach().double().requires_grad_() for t in downs],
                          [t.detach().double().requires_grad_() for t in ups],
                          [t.detach().double().requires_grad_() if t is not None else None for t in bs])
    ref = lpa_qkv_projection_reference(x64, d64, u64, b64)
    ref_grads = torch.autograd.grad(ref, _flat(x64, d64, u64, b64), (gq.double(), gk.double(), gv.double()))
    for name, o, rr in zip("qkv", (q, k, v), ref):
        assert o.shape == rr.shape
        assert_close_to_reference(o, rr, dtype, name)
    for i, (g, rr) in enumerate(zip(grads, ref_grads)):
        assert_close_to_reference(g, rr, dtype, f"grad[{i}]")


def test_batched_input_shapes(device):
    x, downs, ups, bs = _inputs(12, 16, 4, (16, 8, 8), torch.float32, device, biases=(False,) * 3)
    x3 = x.detach().reshape(3, 4, 16)
    q, k, v = lpa_qkv_projection(x3, downs, ups, None)
    assert q.shape == (3, 4, 16) and k.shape == (3, 4, 8) and v.shape == (3, 4, 8)
    # each projection written out in float64 for the flattened rows: (x · Dᵀ) · Uᵀ, back to (3, 4, n)
    x64 = x3.double().reshape(12, 16)
    for name, out, dn, up in zip("qkv", (q, k, v), downs, ups):
        expect = ((x64 @ dn.detach().double().T) @ up.detach().double().T).reshape(3, 4, -1)
        assert_close_to_reference(out, expect, torch.float32, name)


@pytest.mark.parametrize("mutate, exc, match", [
    (lambda x, d, u, b: (x, d[:2], u, b), TypeError, "sequence of 3"),
    (lambda x, d, u, b: (x, [d[0], d[1][:-1], d[2]], u, b), ValueError, "ranks must be equal"),
    (lambda x, d, u, b: (x, d, [u[0], u[1], u[2][:, :-1]], b), ValueError, "its rank"),
    (lambda x, d, u, b: (x[:, :-1], d, u, b), ValueError, "x's last dim"),
    (lambda x, d, u, b: (x, d, u, [b[0][:-1], None, None]), ValueError, "biases\\[0\\]"),
    (lambda x, d, u, b: (x, d, u, (None,)), TypeError, "biases must be None"),
    (lambda x, d, u, b: (x.half(), d, u, b), TypeError, "dtype"),
])
def test_bad_inputs(mutate, exc, match):
    x, d, u, b = _inputs(5, 8, 3, (8, 4, 4), torch.float32, "cpu")
    with pytest.raises(exc, match=match):
        lpa_qkv_projection(*mutate(x.detach(), d, u, b))


@pytest.mark.parametrize("backend", BACKENDS)
def test_opcheck(backend, device):
    x, downs, ups, bs = _inputs(9, 16, 4, (16, 8, 8), torch.float32, device)
    down_cat, up_cat = torch.cat(downs).detach().requires_grad_(), torch.cat(ups).detach().requires_grad_()
    bias_cat = torch.randn(32, device=device, requires_grad=True)
    with use_backend(backend):
        torch.library.opcheck(torch.ops.lmfuse.lpa_qkv_fwd.default, (x, down_cat, up_cat, bias_cat, 16, 8, 8))
        torch.library.opcheck(torch.ops.lmfuse.lpa_qkv_fwd.default, (x, down_cat, up_cat, None, 16, 8, 8))


def test_torch_compile_full_graph(device):
    x, downs, ups, bs = _inputs(10, 16, 4, (16, 8, 8), torch.float32, device)

    def f(x):
        q, k, v = lpa_qkv_projection(x, downs, ups, bs)
        return (q.sum(-1) * k.sum(-1) + v.square().sum(-1)).sum()

    out = torch.compile(f, fullgraph=True, backend="aot_eager")(x)
    torch.testing.assert_close(out, f(x))
