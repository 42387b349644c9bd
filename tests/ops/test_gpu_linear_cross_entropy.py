"""GPU-only: the fused vocabulary losses (Triton forward + chunked cuBLAS/Triton backward) at real
sizes in bf16 / fp16 / fp32, the vocabulary-split forward, CUDA-graph capture (no host sync) and
out-of-range targets.

Bound for low precision: the error against float64 is no worse than 2x the error of PyTorch's own
``linear`` + ``cross_entropy`` in the same dtype (plus a small floor).
"""

import pytest
import torch
import torch.nn.functional as F

from lmfuse.ops import linear_cross_entropy, linear_cross_entropy_reference, linear_log_probs, use_backend
from lmfuse.ops import linear_log_probs_reference
from lmfuse.testing import assert_close_to_reference, rel_error

from .helpers import backend_params

pytestmark = pytest.mark.gpu
DEV = "cuda"


def _bounded(out, torch_out, ref, what):
    ours, theirs = rel_error(out, ref), rel_error(torch_out, ref)
    assert ours <= 2 * theirs + 1e-4, f"{what}: ours {ours:.2e} vs torch {theirs:.2e}"


def _inputs(n, h, v, dtype, ignore_frac=0.1):
    hidden = torch.randn(n, h, device=DEV).to(dtype).requires_grad_()
    weight = (torch.randn(v, h, device=DEV) * 2 * h ** -0.5).to(dtype).requires_grad_()
    target = torch.randint(0, v, (n,), device=DEV)
    target[torch.rand(n, device=DEV) < ignore_frac] = -100
    return hidden, weight, target


@pytest.mark.parametrize("backend", backend_params(("triton",)))
@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
@pytest.mark.parametrize("n, h, v", [(4096, 2048, 32003), (37, 1024, 131072), (1500, 576, 49152)])
def test_cross_entropy_real_sizes(backend, dtype, n, h, v):
    hidden, weight, target = _inputs(n, h, v, dtype)
    up = torch.randn(n, device=DEV)
    with use_backend(backend):
        loss = linear_cross_entropy(hidden, weight, target, reduction="none")
    dh, dw = torch.autograd.grad(loss, (hidden, weight), up)
    t_loss = F.cross_entropy(F.linear(hidden, weight), target, reduction="none")
    tdh, tdw = torch.autograd.grad(t_loss, (hidden, weight), up.to(dtype))
    r = [t.detach().double().requires_grad_() for t in (hidden, weight)]
    r_loss = linear_cross_entropy_reference(r[0], r[1], target, reduction="none")
    rdh, rdw = torch.autograd.grad(r_loss, r, up.double())
    _bounded(loss, t_loss, r_loss, "loss")
    _bounded(dh, tdh, rdh, "dhidden")
    _bounded(dw, tdw, rdw, "dweight")


@pytest.mark.parametrize("backend", backend_params(("triton",)))
def test_many_backward_chunks_accumulate_in_float32(backend, monkeypatch):
    """Small chunks (about 16 per call): dweight sums per-chunk products in float32."""
    from lmfuse.ops import _lce_autograd

    monkeypatch.setattr(_lce_autograd, "CUDA_CHUNK_ELEMENTS", 1 << 21)
    test_cross_entropy_real_sizes(backend, torch.bfloat16, 2000, 1024, 16411)


@pytest.mark.parametrize("backend", backend_params(("triton",)))
def test_every_option_fp32(backend, monkeypatch):
    monkeypatch.setattr(torch.backends.cuda.matmul, "allow_tf32", False)
    n, h, v = 1000, 256, 20011
    hidden, weight, target = _inputs(n, h, v - 11, torch.float32)
    weight = torch.cat([weight.detach(), torch.randn(11, h, device=DEV)]).requires_grad_()
    bias = torch.randn(v, device=DEV, requires_grad=True)
    tw = torch.rand(n, device=DEV, requires_grad=True)
    kw = dict(label_smoothing=0.1, z_loss_scale=1e-3, logit_scale=1.3, softcap=20.0, vocab_size=v - 11)
    with use_backend(backend):
        loss, lse = linear_cross_entropy(hidden, weight, target, bias=bias, token_weight=tw, return_lse=True, **kw)
        logp, ent, am = linear_log_probs(hidden, weight, target, bias=bias, temperature=0.7, softcap=20.0,
                                         vocab_size=v - 11, return_entropy=True, return_argmax=True)
    ins = (hidden, weight, bias, tw)
    grads = torch.autograd.grad(loss + lse.sum() * 1e-3 + (logp + ent).sum() * 1e-3, ins)
    r = [t.detach().double().requires_grad_() for t in ins]
    r_loss, r_lse = linear_cross_entropy_reference(r[0], r[1], target, bias=r[2], token_weight=r[3],
                                                   return_lse=True, **kw)
    r_logp, r_ent, r_am = linear_log_probs_reference(r[0], r[1], target, bias=r[2], temperature=0.7, softcap=20.0,
                                                     vocab_size=v - 11, return_entropy=True, return_argmax=True)
    r_grads = torch.autograd.grad(r_loss + r_lse.sum() * 1e-3 + (r_logp + r_ent).sum() * 1e-3, r)
    for name, o, rr in (("loss", loss, r_loss), ("lse", lse, r_lse), ("logp", logp, r_logp), ("entropy", ent, r_ent)):
        assert_close_to_reference(o, rr, torch.float32, name)
    assert (am == r_am).float().mean() > 0.999  # fp32 near-ties may differ from float64
    for name, g, rg in zip(("hidden", "weight", "bias", "token_weight"), grads, r_grads):
        assert_close_to_reference(g, rg, torch.float32, f"d{name}")
    assert (grads[1][v - 11:] == 0).all()


@pytest.mark.parametrize("backend", backend_params(("triton",)))
def test_forward_captures_in_a_cuda_graph(backend):
    """No host synchronisation in the op: the forward records into a CUDA graph and replays."""
    hidden, weight, target = _inputs(512, 256, 8191, torch.bfloat16)
    hidden, weight = hidden.detach(), weight.detach()
    with use_backend(backend):
        eager = linear_cross_entropy(hidden, weight, target)
        s = torch.cuda.Stream()
        s.wait_stream(torch.cuda.current_stream())
        with torch.cuda.stream(s):
            linear_cross_entropy(hidden, weight, target)  # warm-up (Triton compiles)
        torch.cuda.current_stream().wait_stream(s)
        g = torch.cuda.CUDAGraph()
        with torch.cuda.graph(g):
            out = linear_cross_entropy(hidden, weight, target)
    hidden.normal_()
    g.replay()
    with use_backend(backend):
        expect = linear_cross_entropy(hidden, weight, target)
    assert torch.isfinite(out) and abs(out.item() - expect.item()) <= 1e-5 * abs(expect.item())
    assert out.item() != eager.item()


@pytest.mark.parametrize("backend", backend_params(("triton",)))
def test_out_of_range_target_gives_nan_on_gpu(backend):
    hidden, weight, target = _inputs(64, 128, 1000, torch.float32, ignore_frac=0.0)
    target[5] = 1000
    with use_backend(backend):
        loss = linear_cross_entropy(hidden, weight, target, reduction="none")
    assert torch.isnan(loss[5]) and torch.isfinite(torch.cat([loss[:5], loss[6:]])).all()
