"""Chunked path of :func:`lmfuse.ops.linear_log_probs` on the GEMMs of ATen.

``torch.ops.lmfuse.llp_chunked`` returns the per-token ``log p(target)`` [N] float32 of
``softmax(softcap(scale·(hidden·W'ᵀ + b)))`` (0 where the target is ``ignore_index``, NaN for a valid
target outside ``[0, V')``). Unlike the scalar loss of :mod:`._lce_chunked`, the upstream gradient
here is a vector ``g`` [N] known only in the backward, so the weight gradient
``Σ_n g_n·(1[t_n] − p_n)·h_nᵀ`` cannot be formed in the forward; the backward recomputes each chunk's
logits. Per chunk of ``rows`` tokens:

- forward: one GEMM for the logits ``[rows, V']`` (input dtype, as eager ``F.linear``), then the
  row statistics (log-sum-exp, target logit);
- backward: the same GEMM again, the logit gradient ``G = g·(1[t] − p)·∂z/∂u`` formed in place (input
  dtype), ``dhidden[chunk] = G·W'``, ``dweight[:V'] += Gᵀ·hidden[chunk]``, ``dbias += Σ_rows G``.

Four GEMMs in all (eager has three, and keeps ``[N, V]`` logits and softmax alive between forward
and backward). On the CPU with the extension built the per-chunk softmax work is the C++ kernel
``lmfuse._C.lce_chunk_grad_`` (one read of each row, one exp per element, ``G`` written in place);
elsewhere it is PyTorch. Precision and the workspace are as in :mod:`._lce_chunked` (bfloat16 /
float16 logits are rounded to their dtype before the float32 softmax, as eager rounds them).
"""

from __future__ import annotations

from typing import Optional

import torch
from torch import Tensor

from .. import _backend
from ._lce_chunked import _gradient_gemms, chunk_rows, fused_cpu


def _logits(hc: Tensor, wv: Tensor, bv: Optional[Tensor]) -> Tensor:
    return torch.addmm(bv, hc, wv.t()) if bv is not None else hc @ wv.t()


def _chunk(u: Tensor, tc: Tensor, tw: Tensor, ignore_index: int, scale: float, softcap: Optional[float],
           vocab_size: int, grad: bool, fused: bool) -> Tensor:
    """Per-row ``ℓ = lse − z_t`` [rows] float32 (0 on ignored rows, NaN for an out-of-range valid
    target) of the raw logits ``u`` [rows, V'] and, when ``grad``, ``u`` overwritten with
    ``G = tw·(p − 1[t])·∂z/∂u`` in u's dtype (``tw`` [rows] float32, 0 on ignored rows)."""
    if fused:
        return _backend.cpu_extension().lce_chunk_grad_(u, tc, tw, ignore_index, scale,
                                                         0.0 if softcap is None else softcap, 0.0, 0.0, grad)
    z = u.float() * scale
    if softcap is not None:
        th = torch.tanh(z / softcap)
        z = th * softcap
    valid = tc != ignore_index
    inr = (tc >= 0) & (tc < vocab_size)
    tcl = tc.clamp(0, vocab_size - 1)
    lse = torch.logsumexp(z, 1)
    li = lse - z.gather(1, tcl[:, None]).squeeze(1)
    li = torch.where(valid & ~inr, torch.full_like(li, float("nan")), li)
    li = torch.where(valid, li, torch.zeros_like(li))
    if grad:
        g = torch.exp(z - lse[:, None]).mul_(tw[:, None])
        g.scatter_add_(1, tcl[:, None], torch.where(inr, -tw, torch.zeros_like(tw))[:, None])
        if softcap is not None:
            g.mul_(1.0 - th * th)
        if scale != 1.0:
            g.mul_(scale)
        u.copy_(g)
    return li


def _rows(h2: Tensor, vocab_size: int, softcap: Optional[float]) -> int:
    return chunk_rows(h2.shape[0], vocab_size, h2.dtype, softcap is not None, fused_cpu(h2))


@torch.library.custom_op("lmfuse::llp_chunked", mutates_args=())
def _fwd_op(hidden2d: Tensor, weight: Tensor, bias: Optional[Tensor], target: Tensor, vocab_size: int,
            ignore_index: int, scale: float, softcap: Optional[float]) -> Tensor:
    N = hidden2d.shape[0]
    fused = fused_cpu(hidden2d)
    rows = _rows(hidden2d, vocab_size, softcap)
    wv = weight[:vocab_size]
    bv = bias[:vocab_size] if bias is not None else None
    target = target.contiguous()
    out = torch.zeros((N,), dtype=torch.float32, device=hidden2d.device)
    zero = torch.zeros((N,), dtype=torch.float32, device=hidden2d.device)
    for s in range(0, N, rows):
        e = min(N, s + rows)
        u = _logits(hidden2d[s:e], wv, bv)
        out[s:e] = _chunk(u, target[s:e], zero[s:e], ignore_index, scale, softcap, vocab_size, False, fused)
        del u  # before the next chunk's block is allocated
    return out.neg_().add_(0.0)  # log p = −ℓ; + 0 turns the −0 of ignored rows into 0


@_fwd_op.register_fake
def _fwd_fake(hidden2d, weight, bias, target, vocab_size, ignore_index, scale, softcap):
    return hidden2d.new_empty((hidden2d.shape[0],), dtype=torch.float32)


@torch.library.custom_op("lmfuse::llp_chunked_backward", mutates_args=())
def _bwd_op(grad: Tensor, hidden2d: Tensor, weight: Tensor, bias: Optional[Tensor], target: Tensor,
            vocab_size: int, ignore_index: int, scale: float, softcap: Optional[float],
            need: list[bool]) -> tuple[Tensor, Tensor, Tensor]:
    need_h, need_w, need_b = bool(need[0]), bool(need[1]), bool(need[2]) and bias is not None
    N, H = hidden2d.shape
    V = weight.shape[0]
    dt = hidden2d.dtype
    empty = lambda: hidden2d.new_empty((0,))  # noqa: E731
    dh = torch.empty((N, H), dtype=dt, device=hidden2d.device) if need_h else empty()
    dw = torch.zeros((V, H), dtype=dt, device=hidden2d.device) if need_w else empty()
    db32 = torch.zeros((vocab_size,), dtype=torch.float32, device=hidden2d.device) if need_b else None
    if need_h or need_w or need_b:
        fused = fused_cpu(hidden2d)
        rows = _rows(hidden2d, vocab_size, softcap)
        wv = weight[:vocab_size]
        bv = bias[:vocab_size] if bias is not None else None
        target = target.contiguous()
        # d(Σ g·logp)/dz = g·(1[t] − p) = tw·(p − 1[t]) with tw = −g, 0 on ignored rows
        tw = torch.where(target != ignore_index, -grad.float(), torch.zeros_like(grad, dtype=torch.float32))
        tw = tw.contiguous()
        for s in range(0, N, rows):
            e = min(N, s + rows)
            hc = hidden2d[s:e]
            u = _logits(hc, wv, bv)
            _chunk(u, target[s:e], tw[s:e], ignore_index, scale, softcap, vocab_size, True, fused)
            _gradient_gemms(u, hc, wv, dh[s:e] if need_h else None, dw[:vocab_size] if need_w else None,
                            db32 if need_b else None)
            del u
    if need_b:
        db = torch.zeros((V,), dtype=dt, device=hidden2d.device)
        db[:vocab_size] = db32.to(dt)
    else:
        db = empty()
    return dh, dw, db


@_bwd_op.register_fake
def _bwd_fake(grad, hidden2d, weight, bias, target, vocab_size, ignore_index, scale, softcap, need):
    e = lambda: hidden2d.new_empty((0,))  # noqa: E731
    return (torch.empty_like(hidden2d) if need[0] else e(), torch.empty_like(weight) if need[1] else e(),
            torch.empty_like(bias) if (need[2] and bias is not None) else e())


def _setup_context(ctx, inputs, output):
    hidden2d, weight, bias, target, vocab_size, ignore_index, scale, softcap = inputs
    ctx.save_for_backward(hidden2d, weight, bias, target)
    ctx.args = (int(vocab_size), int(ignore_index), float(scale), softcap)


def _backward(ctx, grad):
    hidden2d, weight, bias, target = ctx.saved_tensors
    n = ctx.needs_input_grad
    need = [bool(n[0]), bool(n[1]), bool(n[2]) and bias is not None]
    if not any(need):
        return (None,) * 8
    dh, dw, db = torch.ops.lmfuse.llp_chunked_backward(grad.contiguous(), hidden2d, weight, bias, target,
                                                       *ctx.args, need)
    return (dh if need[0] else None, dw if need[1] else None, db if need[2] else None) + (None,) * 5


_fwd_op.register_autograd(_backward, setup_context=_setup_context)


def log_probs(hidden2d: Tensor, weight: Tensor, bias: Optional[Tensor], target: Tensor, vocab_size: int,
              ignore_index: int, scale: float, softcap: Optional[float]) -> Tensor:
    """Per-token ``log p(target)`` [N] float32 (0 on ignored tokens), differentiable in hidden2d,
    weight and bias; see the module docstring."""
    return torch.ops.lmfuse.llp_chunked(hidden2d, weight, bias, target, int(vocab_size), int(ignore_index),
                                        float(scale), softcap)
