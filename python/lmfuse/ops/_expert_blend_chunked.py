"""Gradient-in-forward path of :func:`lmfuse.ops.expert_blend_cross_entropy` (logit blend, scalar
reductions), without concatenating the heads.

``torch.ops.lmfuse.expert_blend_chunked`` evaluates ``loss = Σ_n tw[n]·ℓ_n`` (``ℓ_n`` the per-token
cross entropy of the blended logits ``z = Σ_e gate_e·o_e``, ``o_e = h_e W_eᵀ + b_e``, with label
smoothing; ``tw`` float32 [N] per-token factors holding the ignore mask and the mean normaliser)
and, in the same pass over token chunks, the gradients of that loss. Per chunk of ``rows`` tokens:

1. E GEMMs give the expert logits ``o_e [rows, V']`` (in the input dtype, as eager ``F.linear``;
   bfloat16 / float16 logits are rounded to that dtype, then blended in float32);
2. ``z``, its log-sum-exp and the logit gradient ``G = tw·(softmax(z) − (1−ε)·onehot − ε/V')``;
3. ``dgate[:, e] = ⟨G, o_e⟩`` (a row-wise dot, no GEMM), and per expert
   ``dh_e = gate_e ⊙ (G·W_e)`` and ``dW_e += Gᵀ·(gate_e ⊙ h_e)`` (two GEMMs, ``G`` rounded to the
   input dtype first), ``db_e += Σ_n gate_e·G``.

Three GEMMs per expert, as eager PyTorch, and no ``[V', ΣH]`` copy of the heads; the workspace
is ``E + 2`` blocks ``[rows, V']`` float32 (``rows`` from :data:`WORKSPACE_BYTES`), never
``[E, N, V']``. The op's backward only scales the stored gradients by the upstream scalar (in place, the first
time: no second copy of the weight gradients at the peak), so it
serves ``reduction="mean"`` / ``"sum"`` without ``return_lse`` (other calls take the concatenation
route). Weight gradients are accumulated in their dtype, one ``addmm`` per chunk (bfloat16: one
rounding per chunk, as :mod:`lmfuse.ops._lce_chunked`).

Inputs: ``hiddens[e]`` [N, H_e], ``weights[e]`` [V_e, H_e], ``biases[e]`` [V_e] or empty ``[0]``
for none (one dtype), ``gate`` [N, E] (any float dtype), ``target`` [N] int64, ``tw`` [N] float32,
``need`` 3E + 1 flags (hiddens, weights, biases, gate). Output: one list ``[loss (0-d float32),
ltok [N] float32, dgate [N, E] (gate's dtype) or [0], dh_0.., dW_0.., db_0..]`` (each in its
input's dtype, ``dW_e`` rows ≥ V' zero; empty ``[0]`` where not needed).
"""

from __future__ import annotations

from typing import Optional

import torch
from torch import Tensor

from ._common import backward_frees_graph, gemm

# Bytes of the per-chunk float32 workspace (E expert logits, the blend turned into G in place, a
# temporary). CPU: 96 MiB is ~100 tokens per chunk at E = 3, V' = 49152 (eager: 600 MB of float32
# logits at N = 1024); CUDA: 512 MiB, ~840 tokens at V' = 32000, tall enough for cuBLAS.
WORKSPACE_BYTES = 96 << 20
CUDA_WORKSPACE_BYTES = 512 << 20


def chunk_rows(n: int, vocab_size: int, num_experts: int, cuda: bool) -> int:
    budget = CUDA_WORKSPACE_BYTES if cuda else WORKSPACE_BYTES
    return max(1, min(max(n, 1), budget // ((num_experts + 2) * 4 * vocab_size)))


def _forward(hiddens, weights, biases, gate, target, tw, vocab_size, ignore_index, eps, need, rows):
    E = len(hiddens)
    N = gate.shape[0]
    need_h, need_w, need_b, need_g = need[:E], need[E:2 * E], need[2 * E:3 * E], need[3 * E]
    dt = hiddens[0].dtype
    ct = torch.float64 if dt == torch.float64 else torch.float32
    low = dt != ct
    dev = gate.device
    empty = lambda: hiddens[0].new_empty((0,))  # noqa: E731
    wv = [w[:vocab_size] for w in weights]
    bv = [None if b is None else b[:vocab_size] for b in biases]
    dh = [torch.empty_like(h, memory_format=torch.contiguous_format) if need_h[e] else empty()
          for e, h in enumerate(hiddens)]
    dw = [torch.zeros(w.shape, dtype=dt, device=dev) if need_w[e] else empty() for e, w in enumerate(weights)]
    db32 = [torch.zeros(vocab_size, dtype=ct, device=dev) if need_b[e] else None for e in range(E)]
    dgate = torch.zeros(N, E, dtype=ct, device=dev) if need_g else None
    ltok = torch.zeros(N, dtype=ct, device=dev)
    any_grad = any(need)
    g = gate.to(ct)
    valid = target != ignore_index
    tw = torch.where(valid, tw.to(ct), torch.zeros((), dtype=ct, device=dev))
    inr = (target >= 0) & (target < vocab_size)
    tcl = target.clamp(0, vocab_size - 1)
    for s in range(0, N, max(1, rows)):
        e_ = min(N, s + rows)
        hc = [h[s:e_] for h in hiddens]
        gc, twc, tc = g[s:e_], tw[s:e_], tcl[s:e_, None]
        outs = []
        for h, w, b in zip(hc, wv, bv):
            o = gemm(h, w.t(), bias=b)
            outs.append(o.to(ct) if low else o)
        z = outs[0] * gc[:, 0:1]
        for k in range(1, E):
            z.addcmul_(outs[k], gc[:, k:k + 1])
        zt = z.gather(1, tc).squeeze(1)
        sz = z.sum(1) if eps > 0 else None
        lse = torch.logsumexp(z, 1)
        li = lse - (1.0 - eps) * zt
        if eps > 0:
            li = li - (eps / vocab_size) * sz
        li = torch.where(valid[s:e_] & ~inr[s:e_], torch.full_like(li, float("nan")), li)
        ltok[s:e_] = torch.where(valid[s:e_], li, torch.zeros_like(li))
        if not any_grad:
            continue
        G = z.sub_(lse[:, None]).exp_().mul_(twc[:, None])  # in place: z is not needed any more
        if eps > 0:
            G.sub_((twc * (eps / vocab_size))[:, None])
        G.scatter_add_(1, tc, torch.where(inr[s:e_], -(1.0 - eps) * twc, torch.zeros_like(twc))[:, None])
        if need_g:
            for k, o in enumerate(outs):
                dgate[s:e_, k] = (G * o).sum(1)
        del outs
        Gd = G.to(dt) if low else G
        for k in range(E):
            gk = gc[:, k:k + 1]
            if need_b[k]:
                db32[k] += G.t() @ gc[:, k]
            if need_h[k]:
                dh[k][s:e_] = gemm(Gd, wv[k]).to(ct).mul_(gk).to(dt)
            if need_w[k]:
                gemm(Gd.t(), (hc[k].to(ct) * gk).to(dt), dw[k][:vocab_size], add=True)
        del G, Gd
    db = []
    for k in range(E):
        if need_b[k]:
            full = torch.zeros(biases[k].shape[0], dtype=dt, device=dev)
            full[:vocab_size] = db32[k].to(dt)
            db.append(full)
        else:
            db.append(empty())
    loss = (tw * ltok).sum().to(torch.float32)
    dg = dgate.to(gate.dtype) if need_g else empty()
    return [loss, ltok.to(torch.float32), dg, *dh, *dw, *db]


@torch.library.custom_op("lmfuse::expert_blend_chunked", mutates_args=())
def _chunked_op(hiddens: list[Tensor], weights: list[Tensor], biases: list[Tensor], gate: Tensor, target: Tensor,
                tw: Tensor, vocab_size: int, ignore_index: int, label_smoothing: float, need: list[bool],
                rows: int) -> list[Tensor]:
    bs = [None if b.numel() == 0 else b for b in biases]  # an empty bias stands for none
    need = [bool(x) for x in need]
    E = len(hiddens)
    for k in range(E):
        need[2 * E + k] = need[2 * E + k] and bs[k] is not None
    return _forward(hiddens, weights, bs, gate, target, tw, vocab_size, ignore_index, label_smoothing, need, rows)


@_chunked_op.register_fake
def _chunked_fake(hiddens, weights, biases, gate, target, tw, vocab_size, ignore_index, label_smoothing, need, rows):
    E = len(hiddens)
    e = lambda: hiddens[0].new_empty((0,))  # noqa: E731
    out = [gate.new_empty((), dtype=torch.float32), gate.new_empty((gate.shape[0],), dtype=torch.float32),
           torch.empty_like(gate) if need[3 * E] else e()]
    out += [torch.empty_like(h) if need[k] else e() for k, h in enumerate(hiddens)]
    out += [torch.empty_like(w) if need[E + k] else e() for k, w in enumerate(weights)]
    out += [torch.empty_like(b) if (need[2 * E + k] and b.numel() > 0) else e() for k, b in enumerate(biases)]
    return out


def _setup_context(ctx, inputs, output):
    ctx.E = len(inputs[0])
    # the gradient outputs never receive an upstream gradient: without this autograd would
    # allocate a zero tensor the size of every weight gradient for them in the backward
    ctx.set_materialize_grads(False)
    ctx.save_for_backward(output[1])
    # The gradients are scaled in place by a backward that frees the graph (no second copy of
    # every weight gradient at its peak), so they are kept as detached aliases, not saved tensors
    # (whose version check would also refuse the in-place scaling).
    ctx.grads = [t.detach() for t in output[2:]]


def _backward(ctx, grads):
    E = ctx.E
    (ltok,) = ctx.saved_tensors
    dgate, *rest = ctx.grads
    n = ctx.needs_input_grad
    if grads[0] is None and (len(grads) < 2 or grads[1] is None):
        return [None] * E, [None] * E, [None] * E, None, None, None, None, None, None, None, None
    g = grads[0].float() if grads[0] is not None else torch.zeros((), device=ltok.device)
    flags = [list(x) if isinstance(x, (list, tuple)) else [bool(x)] * E for x in n[:3]]
    # in place only when no later backward can read the stored gradients (the graph is freed);
    # through a retained graph each backward derives fresh tensors and leaves them unscaled
    in_place = backward_frees_graph(g)

    def scaled(t: Tensor, wanted: bool) -> Optional[Tensor]:
        if not (wanted and t.numel() > 0):
            return None
        f = g.to(t.dtype)
        return t.mul_(f) if in_place else t * f

    dh = [scaled(rest[k], flags[0][k]) for k in range(E)]
    dw = [scaled(rest[E + k], flags[1][k]) for k in range(E)]
    db = [scaled(rest[2 * E + k], flags[2][k]) for k in range(E)]
    g_tw = g * ltok if n[5] else None
    return dh, dw, db, scaled(dgate, bool(n[3])), None, g_tw, None, None, None, None, None


_chunked_op.register_autograd(_backward, setup_context=_setup_context)


def fused_loss(hiddens, weights, biases, gate, target, tw, vocab_size: int, ignore_index: int,
               label_smoothing: float) -> Tensor:
    """``Σ_n tw[n]·ℓ_n`` (0-d float32) with every gradient (hiddens, heads, biases, gate; those that
    require one, in grad mode) computed in the forward pass."""
    grad = torch.is_grad_enabled()
    req = lambda t: grad and t is not None and t.requires_grad  # noqa: E731
    need = [req(h) for h in hiddens] + [req(w) for w in weights] + [req(b) for b in biases] + [req(gate)]
    bs = [h.new_empty((0,)) if b is None else b for h, b in zip(hiddens, biases)]
    rows = chunk_rows(gate.shape[0], int(vocab_size), len(hiddens), gate.is_cuda)
    out = torch.ops.lmfuse.expert_blend_chunked(list(hiddens), list(weights), bs, gate, target, tw, int(vocab_size),
                                                int(ignore_index), float(label_smoothing), need, int(rows))
    return out[0]
