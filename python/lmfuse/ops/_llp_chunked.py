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
and backward). In float32, when a column block of at least :data:`MIN_BLOCK_COLS` vocabulary rows
fits the workspace for all N tokens, the backward runs over **vocabulary blocks** instead: the
forward also returns each token's log-sum-exp (not differentiable), so a block's ``G [N, cols]``
needs only its own logits; ``dweight[block] = Gᵀ·hidden`` is then one full-depth GEMM written
once (token chunks add a shallow GEMM into the whole ``[V', H]`` gradient per chunk) and
``dhidden += G·W'[block]`` accumulates into ``[N, H]`` float32. Same four GEMMs, about a fifth
less backward time at SmolLM2's head (2048 tokens, 49152 rows: 2.0–2.2 s against 2.6–2.9 s).

With a frozen head (only ``hidden2d`` takes a gradient, as under LoRA),
``torch.ops.lmfuse.llp_chunked_hidden`` forms each token's gradient direction
``∂logp_n/∂hidden_n = Σ_v (1[t_n] − p_nv)·∂z/∂u·W'[v]`` ([N, H], hidden's dtype) in the forward from
the chunk's logits (a second GEMM on the block the first one wrote); the backward multiplies it by
the upstream gradient. Two GEMMs, as eager, and no ``[N, V]`` kept: at SmolLM2's head (2048 tokens,
float32) 1.87 s against eager's 1.85 s and 2.44 s for recomputing the logits; bfloat16 0.70 s
against 1.23 s.

On the CPU with the extension built the per-chunk softmax work is the C++ kernel
``lmfuse._C.lce_chunk_grad_`` (one read of each row, one exp per element, ``G`` written in place);
elsewhere it is PyTorch. Precision and the workspace are as in :mod:`._lce_chunked` (bfloat16 /
float16 logits are rounded to their dtype before the float32 softmax, as eager rounds them).
"""

from __future__ import annotations

from typing import Optional

import torch
from torch import Tensor

from .. import _backend
from . import _lce_chunked
from ._common import gemm
from ._lce_chunked import _gradient_gemms, chunk_rows, fused_cpu, logits as _logits, workspace as _workspace

# The vocabulary-blocked backward is taken when a block of at least this many vocabulary rows
# (for every token) fits the workspace; narrower blocks would make thin GEMMs.
MIN_BLOCK_COLS = 256


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


def _squash(u: Tensor, scale: float, softcap: Optional[float]) -> Tensor:
    """``softcap(scale·u)`` in float32 (a new tensor)."""
    z = u.float() * scale
    return z if softcap is None else torch.tanh(z / softcap) * softcap


def block_cols(n: int, vocab_size: int, softcap: bool) -> int:
    """Vocabulary rows per block of the blocked backward (float32 ``[n, cols]``, plus the tanh block
    with a softcap, within the workspace); 0 when fewer than :data:`MIN_BLOCK_COLS` would fit."""
    cols = _lce_chunked.WORKSPACE_BYTES // (max(n, 1) * 4 * (2 if softcap else 1))
    return min(cols, vocab_size) if cols >= min(MIN_BLOCK_COLS, vocab_size) else 0


@torch.library.custom_op("lmfuse::llp_chunked", mutates_args=())
def _fwd_op(hidden2d: Tensor, weight: Tensor, bias: Optional[Tensor], target: Tensor, vocab_size: int,
            ignore_index: int, scale: float, softcap: Optional[float]) -> tuple[Tensor, Tensor]:
    N = hidden2d.shape[0]
    fused = fused_cpu(hidden2d)
    rows = _rows(hidden2d, vocab_size, softcap)
    wv = weight[:vocab_size]
    bv = bias[:vocab_size] if bias is not None else None
    target = target.contiguous()
    out = torch.zeros((N,), dtype=torch.float32, device=hidden2d.device)
    lse = torch.full((N,), float("inf"), dtype=torch.float32, device=hidden2d.device)
    zero = torch.zeros((N,), dtype=torch.float32, device=hidden2d.device)
    ws = _workspace(hidden2d, rows, vocab_size)
    for s in range(0, N, rows):
        e = min(N, s + rows)
        u = _logits(hidden2d[s:e], wv, bv, ws)
        tc = target[s:e]
        valid = tc != ignore_index
        # a valid target outside [0, V') is scored at a clamped index, so that ℓ + z_t is the row's
        # log-sum-exp for every valid row (no host-side branch); its log-prob is NaN below
        tcl = torch.where(valid, tc.clamp(0, vocab_size - 1), tc)
        li = _chunk(u, tcl, zero[s:e], ignore_index, scale, softcap, vocab_size, False, fused)
        zt = _squash(u.gather(1, tcl.clamp(0, vocab_size - 1)[:, None]).squeeze(1), scale, softcap)
        # each token's log-sum-exp for the vocabulary-blocked backward; +inf (= no gradient) on ignored rows
        lse[s:e] = torch.where(valid, li + zt, lse[s:e])
        odd = valid & ((tc < 0) | (tc >= vocab_size))
        out[s:e] = torch.where(odd, torch.full_like(li, float("nan")), li)
        del u
    return out.neg_().add_(0.0), lse  # log p = −ℓ; + 0 turns the −0 of ignored rows into 0


@_fwd_op.register_fake
def _fwd_fake(hidden2d, weight, bias, target, vocab_size, ignore_index, scale, softcap):
    n = hidden2d.shape[0]
    return hidden2d.new_empty((n,), dtype=torch.float32), hidden2d.new_empty((n,), dtype=torch.float32)


def _blocked_backward(grad: Tensor, hidden2d: Tensor, wv: Tensor, bv: Optional[Tensor], target: Tensor,
                      lse: Tensor, vocab_size: int, ignore_index: int, scale: float, softcap: Optional[float],
                      cols: int, dh: Optional[Tensor], dw: Optional[Tensor], db32: Optional[Tensor]) -> None:
    """float32: ``G`` one vocabulary block ``[N, cols]`` at a time from the forward's log-sum-exp;
    ``dw[block] = Gᵀ·hidden``, ``dh += G·W'[block]``, ``db32[block] = Σ_n G``."""
    valid = target != ignore_index
    tw = torch.where(valid, -grad.float(), torch.zeros((), dtype=torch.float32, device=grad.device))
    # rows without a gradient get lse = +inf, so their p is 0 (never inf·0); their tw is 0 anyway
    lse_g = torch.where(tw != 0, lse, torch.full_like(lse, float("inf")))[:, None]
    twc = tw[:, None]
    for v0 in range(0, vocab_size, cols):
        v1 = min(vocab_size, v0 + cols)
        u = _logits(hidden2d, wv[v0:v1], None if bv is None else bv[v0:v1])  # [N, c] float32
        if scale != 1.0:
            u.mul_(scale)
        th = None
        if softcap is not None:
            th = torch.tanh(u / softcap)
            u.copy_(th).mul_(softcap)
        u.sub_(lse_g).exp_().mul_(twc)  # tw·p
        inb = valid & (target >= v0) & (target < v1)
        u.scatter_add_(1, (target - v0).clamp(0, v1 - v0 - 1)[:, None],
                       torch.where(inb, -tw, torch.zeros_like(tw))[:, None])  # tw·(p − 1[t])
        if th is not None:
            u.mul_(th.mul_(th).neg_().add_(1.0))
            del th
        if scale != 1.0:
            u.mul_(scale)
        if db32 is not None:
            db32[v0:v1] = u.sum(0)
        if dw is not None:
            torch.mm(u.t(), hidden2d, out=dw[v0:v1])
        if dh is not None:
            dh.addmm_(u, wv[v0:v1])
        del u


@torch.library.custom_op("lmfuse::llp_chunked_backward", mutates_args=())
def _bwd_op(grad: Tensor, hidden2d: Tensor, weight: Tensor, bias: Optional[Tensor], target: Tensor, lse: Tensor,
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
    cols = block_cols(N, vocab_size, softcap is not None) if dt == torch.float32 else 0
    if (need_h or need_w or need_b) and cols:
        target = target.contiguous()
        if need_h:
            dh.zero_()
        _blocked_backward(grad, hidden2d, weight[:vocab_size], bias[:vocab_size] if bias is not None else None,
                          target, lse, vocab_size, ignore_index, scale, softcap, cols, dh if need_h else None,
                          dw[:vocab_size] if need_w else None, db32)
    elif need_h or need_w or need_b:
        fused = fused_cpu(hidden2d)
        rows = _rows(hidden2d, vocab_size, softcap)
        wv = weight[:vocab_size]
        bv = bias[:vocab_size] if bias is not None else None
        target = target.contiguous()
        # d(Σ g·logp)/dz = g·(1[t] − p) = tw·(p − 1[t]) with tw = −g, 0 on ignored rows
        tw = torch.where(target != ignore_index, -grad.float(), torch.zeros_like(grad, dtype=torch.float32))
        tw = tw.contiguous()
        ws = _workspace(hidden2d, rows, vocab_size)
        for s in range(0, N, rows):
            e = min(N, s + rows)
            hc = hidden2d[s:e]
            u = _logits(hc, wv, bv, ws)
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
def _bwd_fake(grad, hidden2d, weight, bias, target, lse, vocab_size, ignore_index, scale, softcap, need):
    e = lambda: hidden2d.new_empty((0,))  # noqa: E731
    return (torch.empty_like(hidden2d) if need[0] else e(), torch.empty_like(weight) if need[1] else e(),
            torch.empty_like(bias) if (need[2] and bias is not None) else e())


def _setup_context(ctx, inputs, output):
    hidden2d, weight, bias, target, vocab_size, ignore_index, scale, softcap = inputs
    ctx.mark_non_differentiable(output[1])
    ctx.save_for_backward(hidden2d, weight, bias, target, output[1])
    ctx.args = (int(vocab_size), int(ignore_index), float(scale), softcap)


def _backward(ctx, grad, _grad_lse):
    hidden2d, weight, bias, target, lse = ctx.saved_tensors
    n = ctx.needs_input_grad
    need = [bool(n[0]), bool(n[1]), bool(n[2]) and bias is not None]
    if not any(need) or grad is None:
        return (None,) * 8
    dh, dw, db = torch.ops.lmfuse.llp_chunked_backward(grad.contiguous(), hidden2d, weight, bias, target, lse,
                                                       *ctx.args, need)
    return (dh if need[0] else None, dw if need[1] else None, db if need[2] else None) + (None,) * 5


_fwd_op.register_autograd(_backward, setup_context=_setup_context)


# -- frozen head: the hidden gradient's per-token direction in the forward -------------------------
@torch.library.custom_op("lmfuse::llp_chunked_hidden", mutates_args=())
def _hidden_op(hidden2d: Tensor, weight: Tensor, bias: Optional[Tensor], target: Tensor, vocab_size: int,
               ignore_index: int, scale: float, softcap: Optional[float]) -> tuple[Tensor, Tensor]:
    """``(logp [N] float32, basis [N, H] in hidden's dtype)`` with ``basis[n] = ∂logp_n/∂hidden_n
    = Σ_v (1[v = t_n] − p_nv)·∂z_nv/∂u_nv·W'[v]`` (0 on ignored rows). Per chunk: the logits GEMM,
    the kernel's ``G`` at weight −1 (``= ∂logp/∂u``) in place, and ``basis = G·W'``: two GEMMs."""
    N, H = hidden2d.shape
    fused = fused_cpu(hidden2d)
    rows = _rows(hidden2d, vocab_size, softcap)
    wv = weight[:vocab_size]
    bv = bias[:vocab_size] if bias is not None else None
    target = target.contiguous()
    valid = target != ignore_index
    # the kernel's G = tw·(p − 1[t])·∂z/∂u: tw = −1 gives ∂logp/∂u; 0 on ignored rows
    tw = torch.where(valid, -1.0, 0.0).to(torch.float32).to(hidden2d.device)
    out = torch.empty((N,), dtype=torch.float32, device=hidden2d.device)
    basis = torch.empty((N, H), dtype=hidden2d.dtype, device=hidden2d.device)
    ws = _workspace(hidden2d, rows, vocab_size)
    for s in range(0, N, rows):
        e = min(N, s + rows)
        hc = hidden2d[s:e]
        u = _logits(hc, wv, bv, ws)
        # ℓ = lse − z_t: 0 on ignored rows, NaN for a valid target outside [0, V') (no one-hot term)
        out[s:e] = _chunk(u, target[s:e], tw[s:e], ignore_index, scale, softcap, vocab_size, True, fused)
        gemm(u, wv, basis[s:e])
        del u
    return out.neg_().add_(0.0), basis  # log p = −ℓ; + 0 turns the −0 of ignored rows into 0


@_hidden_op.register_fake
def _hidden_fake(hidden2d, weight, bias, target, vocab_size, ignore_index, scale, softcap):
    return hidden2d.new_empty((hidden2d.shape[0],), dtype=torch.float32), torch.empty_like(hidden2d)


def _hidden_setup_context(ctx, inputs, output):
    ctx.mark_non_differentiable(output[1])
    ctx.save_for_backward(output[1])


def _hidden_backward(ctx, grad, _grad_basis):
    (basis,) = ctx.saved_tensors
    if grad is None or not ctx.needs_input_grad[0]:
        return (None,) * 8
    dh = (grad.to(torch.float32)[:, None] * basis).to(basis.dtype)
    return (dh,) + (None,) * 7


_hidden_op.register_autograd(_hidden_backward, setup_context=_hidden_setup_context)


def log_probs(hidden2d: Tensor, weight: Tensor, bias: Optional[Tensor], target: Tensor, vocab_size: int,
              ignore_index: int, scale: float, softcap: Optional[float]) -> Tensor:
    """Per-token ``log p(target)`` [N] float32 (0 on ignored tokens), differentiable in hidden2d,
    weight and bias; see the module docstring. When only ``hidden2d`` takes a gradient (a frozen
    head, as under LoRA), the forward also forms each token's gradient direction ``[N, H]`` and the
    backward is a product: two GEMMs in all, as eager, instead of four."""
    g = torch.is_grad_enabled()
    if (g and hidden2d.requires_grad and not weight.requires_grad
            and not (bias is not None and bias.requires_grad)):
        return torch.ops.lmfuse.llp_chunked_hidden(hidden2d, weight, bias, target, int(vocab_size),
                                                   int(ignore_index), float(scale), softcap)[0]
    return torch.ops.lmfuse.llp_chunked(hidden2d, weight, bias, target, int(vocab_size), int(ignore_index),
                                        float(scale), softcap)[0]
