"""Gradient-in-forward path of :func:`lmfuse.ops.linear_cross_entropy` for scalar reductions.

``torch.ops.lmfuse.lce_chunked`` evaluates ``loss = Σ_n tw[n]·ℓ_n`` (``ℓ_n`` the per-token cross
entropy with label smoothing and z-loss, ``tw`` float32 [N] per-token factors that already hold the
ignore mask, the token weights and the mean normaliser) and, in the same pass over token chunks,
the gradients of that loss: per chunk of ``rows`` tokens it forms the logits ``[rows, V']`` with
one GEMM, the softmax and the logit gradient ``G`` in place (float32), then ``dhidden[chunk] = G·W'``
and ``dweight[:V'] += Gᵀ·hidden[chunk]`` (and ``dbias``). Three GEMMs in all, like eager PyTorch,
against four for the statistics path (which recomputes the logits in the backward). The backward
of the op only scales the stored gradients by the upstream scalar gradient (in place when the
autograd graph is freed after it, so the weight gradient is never held twice); the gradient w.r.t.
``tw`` is ``g·ℓ`` (``ℓ`` is the op's second output), so token weights and the mean normaliser are
differentiated by autograd exactly.

Inputs: ``hidden2d`` [N, H], ``weight`` [V, H], ``bias`` [V] or None, all one dtype (float32 /
bfloat16 / float16 / float64), ``target`` [N] int64, ``tw`` [N] float32 (taken as 0 where the
target is ``ignore_index``). Outputs: ``loss`` 0-d float32, ``ltok`` [N] float32 (``ℓ_n``, 0
where the target is ignored), ``dhidden`` [N, H], ``dweight`` [V, H] (rows ≥ V' zero) and ``dbias`` [V] in the
input dtype, or empty ``[0]`` where ``need`` says they are not wanted (then no work is done for
them). Out-of-range targets give a NaN ``ℓ_n``.

Precision: the GEMMs run in the input dtype, as eager ``F.linear`` does (for bfloat16 / float16 the
logits are rounded to that dtype before the float32 softmax, as eager rounds them; ``G`` is rounded
to the dtype before the two gradient GEMMs, as eager's softmax gradient is). On a CPU without
native bf16 / fp16 dot products every GEMM goes through :func:`~lmfuse.ops._common.gemm`'s float32
blocks (same float32 accumulation and one rounding, about 5× faster there than torch's emulated
bf16 GEMM). ``dweight`` is
accumulated in its own dtype, one ``addmm`` (float32 accumulation inside the GEMM) per chunk, so a
bfloat16 weight gradient is rounded once per chunk; a float32 accumulator would cost ``V·H·4``
bytes (113 MB at V = 49152, H = 576), more than an eighth of eager's bfloat16 logits and softmax
gradients. The price: over 20 chunks (2048 tokens, 106 per chunk) the bfloat16 ``dweight`` has
about twice the relative error of eager bfloat16's (4.9e-3 against 2.4e-3 vs float64, V = 8192,
H = 576); ``dhidden`` and ``dbias`` are as accurate as eager's.

Memory: besides the gradients themselves (which eager produces too) the workspace is one
``[rows, V']`` block in the input dtype on the CPU with the extension (the C++ kernel turns the
GEMM's output into ``G`` in place; the same block serves every chunk), a few float32 ones
elsewhere; ``rows`` comes from :data:`WORKSPACE_BYTES` and :data:`MIN_ROWS`.
"""

from __future__ import annotations

from typing import Optional

import torch
from torch import Tensor

from .. import _backend
from ._common import backward_frees_graph, gemm

# Bytes of the per-chunk workspace (the float32 logits turned in place into G, the low-precision
# logits and G, the softcap's tanh). At H = 576, V = 49152, N = 2048 eager holds 1152 MiB of float32
# logits, log-softmax and its gradient; the chunked path holds the weight gradient (108 MiB in
# float32, which eager produces too), dhidden and this workspace, 28 MiB (149 float32 / 298 bf16
# tokens per chunk there), so that all of it stays within an eighth of eager's.
WORKSPACE_BYTES = 28 << 20
# Never fewer tokens per chunk than this (where there are that many): MKL's GEMMs run far below
# the CPU's speed with a few dozen rows (at V = 128256 in float32 the workspace alone would give 57).
MIN_ROWS = 128


def fused_cpu(h2: Tensor) -> bool:
    """True where the chunk's softmax gradient runs in the C++ kernel ``lmfuse._C.lce_chunk_grad_``
    (CPU float32 / bfloat16 / float16 with the extension built): the workspace is then just the
    GEMM's output block, overwritten in place."""
    if h2.device.type != "cpu" or h2.dtype not in (torch.float32, torch.bfloat16, torch.float16):
        return False
    ext = _backend.cpu_extension()
    return ext is not None and hasattr(ext, "lce_chunk_grad_")


def chunk_rows(n: int, vocab_size: int, dtype: torch.dtype, softcap: bool, fused: bool = False) -> int:
    """Tokens per chunk: the workspace fills :data:`WORKSPACE_BYTES`, with at least
    :data:`MIN_ROWS` tokens (and at most ``n``)."""
    ct = 8 if dtype == torch.float64 else 4
    if fused:  # one [rows, V'] block in the input dtype
        per_elem = dtype.itemsize
    else:
        per_elem = ct + (2 * dtype.itemsize if dtype in (torch.bfloat16, torch.float16) else 0)
        if softcap:
            per_elem += ct
    return max(1, min(max(n, 1), max(MIN_ROWS, WORKSPACE_BYTES // (per_elem * vocab_size))))


def workspace(h2: Tensor, rows: int, vocab_size: int) -> Optional[Tensor]:
    """One ``[rows, V']`` block for every chunk's logits, in the input dtype, on the CPU (a new
    block per chunk would be a fresh mapping each time, paid for again in page faults); None
    elsewhere (the caching allocator reuses the block)."""
    if h2.device.type != "cpu":
        return None
    return torch.empty((min(rows, h2.shape[0]), vocab_size), dtype=h2.dtype, device=h2.device)


def logits(hc: Tensor, wv: Tensor, bv: Optional[Tensor], ws: Optional[Tensor] = None) -> Tensor:
    """``hc·wvᵀ (+ bv)`` in hc's dtype, written into the first rows of ``ws`` when given (through
    :func:`~lmfuse.ops._common.gemm`: float32 blocks for bf16/fp16 on a CPU without native ones)."""
    return gemm(hc, wv.t(), None if ws is None else ws[: hc.shape[0]], bias=bv)


def _gradient_gemms(g: Tensor, hc: Tensor, wv: Tensor, dh: Optional[Tensor], dw: Optional[Tensor],
                    db32: Optional[Tensor]) -> None:
    """From the chunk's logit gradient ``g`` [rows, V']: ``dh = g·W'`` (written in place),
    ``dw += gᵀ·hc`` in dw's dtype (one rounding per chunk for low precision) and ``db32 += Σ_rows g``."""
    if db32 is not None:
        db32 += g.sum(0, dtype=db32.dtype)
    if dh is not None:
        gemm(g, wv, dh)
    if dw is not None:
        gemm(g.t(), hc, dw, add=True)


def _forward(h2: Tensor, weight: Tensor, bias: Optional[Tensor], target: Tensor, tw: Tensor, vocab_size: int,
             ignore_index: int, scale: float, softcap: Optional[float], eps: float, lam: float,
             need: list[bool], rows: int):
    need_h, need_w, need_b = need
    N, H = h2.shape
    V = weight.shape[0]
    dt = h2.dtype
    ct = torch.float64 if dt == torch.float64 else torch.float32
    low = dt != ct
    wv = weight[:vocab_size]
    bv = bias[:vocab_size] if bias is not None else None
    empty = lambda: h2.new_empty((0,))  # noqa: E731
    dh = torch.empty((N, H), dtype=dt, device=h2.device) if need_h else empty()
    dw = torch.zeros((V, H), dtype=dt, device=h2.device) if need_w else empty()
    db32 = torch.zeros((vocab_size,), dtype=ct, device=h2.device) if need_b else None
    ltok = torch.zeros((N,), dtype=ct, device=h2.device)
    any_grad = need_h or need_w or need_b
    target = target.contiguous()
    tw = torch.where(target != ignore_index, tw.to(ct), torch.zeros((), dtype=ct, device=h2.device))
    fused = fused_cpu(h2)
    tw32 = tw.to(torch.float32).contiguous() if fused else None
    rows = max(1, rows)
    ws = workspace(h2, rows, vocab_size) if fused else None
    for s in range(0, N, rows):
        e = min(N, s + rows)
        hc, tc, twc = h2[s:e], target[s:e], tw[s:e]
        # logits in the input dtype (as F.linear), then float32 for the softmax
        u = logits(hc, wv, bv, ws)
        if fused:  # loss and (in place) G by the C++ kernel, then the two gradient GEMMs
            ltok[s:e] = _backend.cpu_extension().lce_chunk_grad_(
                u, tc, tw32[s:e], ignore_index, scale, 0.0 if softcap is None else softcap, eps, lam, any_grad)
            if any_grad:
                _gradient_gemms(u, hc, wv, dh[s:e] if need_h else None, dw[:vocab_size] if need_w else None,
                                db32 if need_b else None)
            del u
            continue
        z = u.to(ct) if low else u
        del u
        if scale != 1.0:
            z.mul_(scale)
        if softcap is not None:
            z.div_(softcap).tanh_()
            th = z.clone() if any_grad else None
            z.mul_(softcap)
        inr = (tc >= 0) & (tc < vocab_size)
        tcl = tc.clamp(0, vocab_size - 1)
        zt = z.gather(1, tcl[:, None]).squeeze(1)
        sz = z.sum(1) if eps > 0 else None
        m = z.amax(1)
        z.sub_(m[:, None])
        p = z.exp_()
        del z
        ssum = p.sum(1)
        lse = m + ssum.log()
        valid = tc != ignore_index
        li = lse - (1.0 - eps) * zt
        if eps > 0:
            li = li - (eps / vocab_size) * sz
        if lam > 0:
            li = li + lam * lse * lse
        li = torch.where(valid & ~inr, torch.full_like(li, float("nan")), li)
        ltok[s:e] = torch.where(valid, li, torch.zeros_like(li))
        if not any_grad:
            continue
        # G = ∂(Σ tw ℓ)/∂z = tw·((1 + 2λ·lse)·p − (1−ε)·1[target] − ε/V'), through softcap and scale
        a = twc * (1.0 + 2.0 * lam * lse) / ssum
        g = p.mul_(a[:, None])
        if eps > 0:
            g.sub_((twc * (eps / vocab_size))[:, None])
        g.scatter_add_(1, tcl[:, None], torch.where(inr, -(1.0 - eps) * twc, torch.zeros_like(twc))[:, None])
        if softcap is not None:
            g.mul_(th.mul_(th).neg_().add_(1.0))
            del th
        if scale != 1.0:
            g.mul_(scale)
        if need_b:
            db32 += g.sum(0)
        if low:
            g = g.to(dt)
        _gradient_gemms(g, hc, wv, dh[s:e] if need_h else None, dw[:vocab_size] if need_w else None, None)
        del g, p
    if need_b:
        db = torch.zeros((V,), dtype=dt, device=h2.device)
        db[:vocab_size] = db32.to(dt)
    else:
        db = empty()
    return (tw * ltok).sum().to(torch.float32), ltok.to(torch.float32), dh, dw, db


@torch.library.custom_op("lmfuse::lce_chunked", mutates_args=())
def _chunked_op(hidden2d: Tensor, weight: Tensor, bias: Optional[Tensor], target: Tensor, tw: Tensor,
                vocab_size: int, ignore_index: int, logit_scale: float, softcap: Optional[float],
                label_smoothing: float, z_loss_scale: float, need: list[bool],
                rows: int) -> tuple[Tensor, Tensor, Tensor, Tensor, Tensor]:
    need = [bool(need[0]), bool(need[1]), bool(need[2]) and bias is not None]
    if rows <= 0:  # decided here, not in the traced caller: the choice depends on the built extension
        rows = chunk_rows(hidden2d.shape[0], int(vocab_size), hidden2d.dtype, softcap is not None,
                          fused_cpu(hidden2d))
    return _forward(hidden2d, weight, bias, target, tw, vocab_size, ignore_index, logit_scale, softcap,
                    label_smoothing, z_loss_scale, need, rows)


@_chunked_op.register_fake
def _chunked_fake(hidden2d, weight, bias, target, tw, vocab_size, ignore_index, logit_scale, softcap,
                  label_smoothing, z_loss_scale, need, rows):
    N = hidden2d.shape[0]
    e = lambda: hidden2d.new_empty((0,))  # noqa: E731
    return (hidden2d.new_empty((), dtype=torch.float32), hidden2d.new_empty((N,), dtype=torch.float32),
            torch.empty_like(hidden2d) if need[0] else e(), torch.empty_like(weight) if need[1] else e(),
            torch.empty_like(bias) if (need[2] and bias is not None) else e())


def _setup_context(ctx, inputs, output):
    _, ltok, dh, dw, db = output
    ctx.save_for_backward(ltok, dh, dw, db)
    ctx.set_materialize_grads(False)  # the four outputs besides the loss never get a gradient: no zeros
    need = inputs[11]
    ctx.have = (bool(need[0]), bool(need[1]), bool(need[2]) and inputs[2] is not None)


def _backward(ctx, g_loss, _g_ltok, _g_dh, _g_dw, _g_db):
    # When the graph is freed after this backward (the usual ``loss.backward()``), the stored
    # gradients are scaled in place and handed over: no second copy of the weight gradient at the
    # backward's peak (108 MiB at V = 49152, H = 576 in float32), and autograd can adopt it as
    # ``.grad``. Otherwise (``retain_graph=True``, ``create_graph=True``, traced) out of place, so
    # that they stay valid for the next backward.
    ltok, dh, dw, db = ctx.saved_tensors
    n = ctx.needs_input_grad
    g = g_loss.float()
    in_place = backward_frees_graph(g)
    out = []
    for grad, have, wanted in zip((dh, dw, db), ctx.have, n[:3]):
        if not (have and wanted):
            out.append(None)
        else:
            f = g.to(grad.dtype)
            out.append(grad.mul_(f) if in_place else grad * f)
    g_tw = g * ltok if n[4] else None
    return (*out, None, g_tw) + (None,) * 8


_chunked_op.register_autograd(_backward, setup_context=_setup_context)


def fused_loss(hidden2d: Tensor, weight: Tensor, bias: Optional[Tensor], target: Tensor, tw: Tensor,
               vocab_size: int, ignore_index: int, logit_scale: float, softcap: Optional[float],
               label_smoothing: float, z_loss_scale: float, need: list[bool]) -> Tensor:
    """``Σ_n tw[n]·ℓ_n`` (0-d float32), differentiable w.r.t. hidden2d, weight, bias (where ``need``
    says so; gradients computed in the forward) and ``tw``."""
    loss, _, _, _, _ = torch.ops.lmfuse.lce_chunked(
        hidden2d, weight, bias, target, tw, int(vocab_size), int(ignore_index), float(logit_scale), softcap,
        float(label_smoothing), float(z_loss_scale), [bool(x) for x in need], 0)
    return loss
