"""The differentiable statistics op behind :mod:`lmfuse.ops.linear_cross_entropy`.

``torch.ops.lmfuse.lce_stats`` (backend chosen by the caller, :func:`backend_for`, and reused by
the backward) returns the per-token statistics ``(lse, z_target, sum_z, sum_pz,
argmax)`` of the logits (the kernel contract in :mod:`lmfuse.ops.linear_cross_entropy`);
``torch.ops.lmfuse.lce_stats_bwd`` turns upstream gradients of the statistics, as per-token
coefficients ``a, b, c, d``, into the gradients of hidden, weight and bias. Both have fake
implementations, and the pair is tied by ``register_autograd``.

Backends: ``triton`` (CUDA; CPU under ``TRITON_INTERPRET=1`` when forced), ``cpp`` (CPU extension,
:mod:`lmfuse.ops._lce_cpu`), and ``reference``: token-chunked PyTorch in float32 (float64 for
float64 inputs), whose workspace is one ``[chunk, V']`` block (about 32 MiB), never ``[N, V]``.
float64 inputs always take the ``reference`` backend.
"""

from __future__ import annotations

from typing import Optional

import torch
from torch import Tensor

from . import _lce_cpu
from ._common import dtype_limits, grad_or_none, pick_backend

PREFERENCE = {"cuda": ("triton", "reference"), "cpu": ("cpp", "reference")}
CHUNK_ELEMENTS = 1 << 23  # logits workspace of the chunked paths (elements of [chunk, V'])
# On CUDA the backward GEMMs need tall chunks to run at cuBLAS speed: 2^27 elements is a 512 MiB
# float32 workspace plus G (1024 tokens at V' = 128k), against 4 GiB of bf16 logits for eager at
# N = 16k.
CUDA_CHUNK_ELEMENTS = 1 << 27


def backend_for(hidden2d: Tensor) -> str:
    limits = dtype_limits(hidden2d, ("triton", "cpp"))
    if "cpp" not in limits and not _lce_cpu.available():
        limits["cpp"] = "lmfuse._C was built without the fused vocabulary-loss kernels"
    return pick_backend("linear_cross_entropy", hidden2d, PREFERENCE, limits)


def _chunk_rows(n: int, vocab_size: int, cuda: bool = False) -> int:
    return max(1, min(n, (CUDA_CHUNK_ELEMENTS if cuda else CHUNK_ELEMENTS) // vocab_size))


def _compute_dtype(dtype: torch.dtype) -> torch.dtype:
    return torch.float64 if dtype == torch.float64 else torch.float32


def _torch_z(h: Tensor, wv: Tensor, bv: Optional[Tensor], scale: float, softcap: Optional[float]) -> Tensor:
    u = h.to(wv.dtype) @ wv.t()
    if bv is not None:
        u = u + bv
    z = u * scale
    return softcap * torch.tanh(z / softcap) if softcap is not None else z


def _target_mask(target: Tensor, vocab_size: int):
    return (target >= 0) & (target < vocab_size), target.clamp(0, vocab_size - 1)


def _torch_stats(h2, weight, bias, target, vocab_size, scale, softcap, want_sz, want_spz, want_am):
    N, ct = h2.shape[0], _compute_dtype(h2.dtype)
    wv = weight[:vocab_size].to(ct)
    bv = bias[:vocab_size].to(ct) if bias is not None else None
    f32 = dict(dtype=torch.float32, device=h2.device)
    lse, zt = torch.empty(N, **f32), torch.empty(N, **f32)
    sz = torch.empty(N if want_sz else 0, **f32)
    spz = torch.empty(N if want_spz else 0, **f32)
    am = torch.empty(N if want_am else 0, dtype=torch.int64, device=h2.device)
    rows = _chunk_rows(N, vocab_size)
    for s in range(0, N, rows):
        e = min(N, s + rows)
        z = _torch_z(h2[s:e], wv, bv, scale, softcap)
        l = torch.logsumexp(z, dim=1)
        lse[s:e] = l
        inr, tc = _target_mask(target[s:e], vocab_size)
        zt[s:e] = torch.where(inr, z.gather(1, tc[:, None]).squeeze(1), 0.0)
        if want_sz:
            sz[s:e] = z.sum(1)
        if want_spz:
            spz[s:e] = (torch.exp(z - l[:, None]) * z).sum(1)
        if want_am:
            am[s:e] = z.argmax(1)
    return lse, zt, sz, spz, am


def _mm_f32(x: Tensor, y: Tensor) -> Tensor:
    """``x·y`` accumulated and returned in float32 (cuBLAS's out_dtype where there is one)."""
    if x.dtype == torch.float32:
        return x @ y
    if x.is_cuda:
        try:
            return torch.mm(x, y, out_dtype=torch.float32)
        except (RuntimeError, TypeError):
            pass
    return x.float() @ y.float()


def _addmm_f32_(acc: Tensor, x: Tensor, y: Tensor) -> None:
    """``acc += x·y`` with ``acc`` float32 and no ``[V', H]`` temporary where cuBLAS can do it."""
    if x.dtype == acc.dtype:
        acc.addmm_(x, y)
        return
    if x.is_cuda:
        try:
            torch.addmm(acc, x, y, out_dtype=torch.float32, out=acc)
            return
        except (RuntimeError, TypeError):
            pass
    acc += _mm_f32(x, y)


def _chunked_backward(h2, weight, bias, target, lse, a, b, c, d, vocab_size, ignore_index, scale, softcap,
                      need_h, need_w, need_b, use_triton):
    """Recompute the logits per token chunk, form G, then dH = G·W' and dW += Gᵀ·H (float32)."""
    N, H = h2.shape
    V = weight.shape[0]
    ct = _compute_dtype(h2.dtype)
    wv = weight[:vocab_size]
    dh = torch.empty((N, H), dtype=h2.dtype, device=h2.device) if need_h else h2.new_empty((0,))
    dw32 = torch.zeros((V, H), dtype=ct, device=h2.device) if need_w else None
    db32 = torch.zeros((V,), dtype=ct, device=h2.device) if need_b else None
    if use_triton:
        from ..triton_kernels import linear_cross_entropy as tk
    else:
        wvc = wv.to(ct)
        bvc = bias[:vocab_size].to(ct) if bias is not None else None
    target = target.contiguous()
    rows = _chunk_rows(N, vocab_size, h2.is_cuda)
    for s in range(0, N, rows):
        e = min(N, s + rows)
        hc, tc_ = h2[s:e], target[s:e]
        if use_triton:
            u = _mm_f32(hc, wv.t())
            if bias is not None:
                u += bias[:vocab_size].float()
            g = tk.logits_grad(u, a[s:e], b[s:e], c[s:e], d[s:e], tc_, ignore_index=ignore_index,
                               logit_scale=scale, softcap=softcap, out_dtype=h2.dtype)
            if need_h:
                dh[s:e] = g @ wv
            if need_w:
                _addmm_f32_(dw32[:vocab_size], g.t(), hc)
            if need_b:
                db32[:vocab_size] += g.sum(0, dtype=torch.float32)
            continue
        z = _torch_z(hc, wvc, bvc, scale, softcap)
        g = torch.exp(z - lse[s:e, None].to(ct)) * (a[s:e, None] + d[s:e, None] * z) + c[s:e, None]
        inr, tcl = _target_mask(tc_, vocab_size)
        g.scatter_add_(1, tcl[:, None], torch.where(inr, b[s:e], 0.0).to(ct)[:, None])
        if softcap is not None:
            g = g * (1 - (z / softcap) ** 2)
        g = torch.where((tc_ != ignore_index)[:, None], g * scale, 0.0)
        if need_h:
            dh[s:e] = (g @ wvc).to(h2.dtype)
        if need_w:
            dw32[:vocab_size].addmm_(g.t(), hc.to(ct))
        if need_b:
            db32[:vocab_size] += g.sum(0)
    dw = dw32.to(weight.dtype) if need_w else h2.new_empty((0,))
    db = db32.to(bias.dtype) if need_b else h2.new_empty((0,))
    return dh, dw, db


@torch.library.custom_op("lmfuse::lce_stats", mutates_args=())
def _stats_op(hidden2d: Tensor, weight: Tensor, bias: Optional[Tensor], target: Tensor, vocab_size: int,
              ignore_index: int, logit_scale: float, softcap: Optional[float], want_sum_z: bool,
              want_sum_pz: bool, want_argmax: bool, backend: str) -> tuple[Tensor, Tensor, Tensor, Tensor, Tensor]:
    backend = backend or backend_for(hidden2d)
    if backend == "cpp":
        outs = _lce_cpu.forward_stats(hidden2d, weight, bias, target, vocab_size=vocab_size,
                                      ignore_index=ignore_index, logit_scale=logit_scale, softcap=softcap,
                                      want_sum_z=want_sum_z, want_sum_pz=want_sum_pz, want_argmax=want_argmax)
        return tuple(o.clone() if o.numel() == 0 else o for o in outs)
    if backend == "triton":
        from ..triton_kernels import linear_cross_entropy as tk

        return tk.forward_stats(hidden2d, weight, bias, target, vocab_size=vocab_size, logit_scale=logit_scale,
                                softcap=softcap, want_sum_z=want_sum_z, want_sum_pz=want_sum_pz,
                                want_argmax=want_argmax)
    return _torch_stats(hidden2d, weight, bias, target, vocab_size, logit_scale, softcap,
                        want_sum_z, want_sum_pz, want_argmax)


@_stats_op.register_fake
def _stats_fake(hidden2d, weight, bias, target, vocab_size, ignore_index, logit_scale, softcap,
                want_sum_z, want_sum_pz, want_argmax, backend):
    N = hidden2d.shape[0]
    f = lambda want: hidden2d.new_empty((N if want else 0,), dtype=torch.float32)  # noqa: E731
    return (f(True), f(True), f(want_sum_z), f(want_sum_pz),
            hidden2d.new_empty((N if want_argmax else 0,), dtype=torch.int64))


@torch.library.custom_op("lmfuse::lce_stats_bwd", mutates_args=())
def _bwd_op(hidden2d: Tensor, weight: Tensor, bias: Optional[Tensor], target: Tensor, lse: Tensor, a: Tensor,
            b: Tensor, c: Tensor, d: Tensor, vocab_size: int, ignore_index: int, logit_scale: float,
            softcap: Optional[float], need: list[bool], backend: str) -> tuple[Tensor, Tensor, Tensor]:
    need_h, need_w, need_b = need
    backend = backend or backend_for(hidden2d)
    if backend == "cpp":
        outs = _lce_cpu.backward(hidden2d, weight, bias, target, lse, a, b, c, d, vocab_size=vocab_size,
                                 ignore_index=ignore_index, logit_scale=logit_scale, softcap=softcap,
                                 need_hidden=need_h, need_weight=need_w, need_bias=need_b)
        return tuple(o.clone() if o.numel() == 0 else o for o in outs)
    return _chunked_backward(hidden2d, weight, bias, target, lse, a, b, c, d, vocab_size, ignore_index,
                             logit_scale, softcap, need_h, need_w, need_b, backend == "triton")


@_bwd_op.register_fake
def _bwd_fake(hidden2d, weight, bias, target, lse, a, b, c, d, vocab_size, ignore_index, logit_scale, softcap,
              need, backend):
    e = lambda: hidden2d.new_empty((0,))  # noqa: E731
    return (torch.empty_like(hidden2d) if need[0] else e(), torch.empty_like(weight) if need[1] else e(),
            torch.empty_like(bias) if (need[2] and bias is not None) else e())


def _setup_context(ctx, inputs, output):
    hidden2d, weight, bias, target, vocab_size, ignore_index, logit_scale, softcap, _, want_spz, _, backend = inputs
    lse, _, _, spz, _ = output
    ctx.save_for_backward(hidden2d, weight, bias, target, lse, spz)
    ctx.args = (vocab_size, ignore_index, logit_scale, softcap)
    ctx.has_bias, ctx.want_spz = bias is not None, want_spz
    ctx.backend = backend  # the backward runs where the forward ran: it recomputes that kernel's logits


def _grad(g: Optional[Tensor], like: Tensor) -> Tensor:
    if g is None or g.shape != like.shape:
        return torch.zeros_like(like, dtype=torch.float32)
    return g.float()


def _backward(ctx, g_lse, g_zt, g_sz, g_spz, _g_am):
    hidden2d, weight, bias, target, lse, spz = ctx.saved_tensors
    n = ctx.needs_input_grad
    need = [n[0], n[1], ctx.has_bias and n[2]]
    if not any(need):
        return (None,) * 12
    g_lse, g_zt = _grad(g_lse, lse), _grad(g_zt, lse)
    g_sz = _grad(g_sz, lse)
    if ctx.want_spz:  # ∂sum_pz/∂z_v = p_v (1 + z_v − sum_pz)
        g_spz = _grad(g_spz, lse)
        a, d = g_lse + g_spz * (1 - spz), g_spz
    else:
        a, d = g_lse, torch.zeros_like(g_lse)
    grads = torch.ops.lmfuse.lce_stats_bwd(hidden2d, weight, bias, target, lse, a.contiguous(), g_zt.contiguous(),
                                           g_sz.contiguous(), d.contiguous(), *ctx.args, need, ctx.backend)
    return (*[grad_or_none(g, k) for g, k in zip(grads, need)],) + (None,) * 9


_stats_op.register_autograd(_backward, setup_context=_setup_context)


def stats(hidden2d: Tensor, weight: Tensor, bias: Optional[Tensor], target: Tensor, vocab_size: int,
          ignore_index: int, logit_scale: float, softcap: Optional[float], want_sum_z: bool, want_sum_pz: bool,
          want_argmax: bool):
    """Differentiable per-token statistics ``(lse, z_target, sum_z, sum_pz, argmax)`` (see the contract)."""
    return torch.ops.lmfuse.lce_stats(hidden2d, weight, bias, target, int(vocab_size), int(ignore_index),
                                      float(logit_scale), softcap, bool(want_sum_z), bool(want_sum_pz),
                                      bool(want_argmax), _eager_backend(hidden2d))


def _eager_backend(hidden2d: Tensor) -> str:
    # Under torch.compile the choice cannot be traced (it imports the extension, reads the
    # environment): "" lets each op choose when it runs, by the same rule.
    return "" if torch.compiler.is_compiling() else backend_for(hidden2d)
