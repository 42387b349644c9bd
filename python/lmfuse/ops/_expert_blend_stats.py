"""Forward statistics of the logit blend, with the gate gradient from the forward pass alone.

``torch.ops.lmfuse.expert_blend_stats`` serves :func:`lmfuse.ops.expert_blend_cross_entropy`
(``blend="logits"``) when no hidden state, head or bias needs a gradient: stage 1 of UltraFuser
training (only the gate learns) and evaluation. With the expert logits
``o_e[n, v] = h_e[n]·W_e[v] + b_e[v]`` (``v < vocab_size``) and the blend
``z[n, v] = Σ_e gate[n, e]·o_e[n, v]``, it returns, per token, in float32:

* ``lse [N]``: ``log Σ_v exp z[n, v]``;
* ``mean_o [N, E]``: ``E_p[o_e] = Σ_v p[n, v]·o_e[n, v]`` with ``p = softmax(z[n])``;
* ``o_target [N, E]``: ``o_e[n, target[n]]`` (0 where the target is ignored or out of range);
* ``sum_o [N, E]``: ``Σ_v o_e[n, v]`` (only when asked, for label smoothing; else ``[0]``).

Only ``lse`` depends on the gate, and ``∂lse[n]/∂gate[n, e] = E_p[o_e]``, so the op's backward is
``dgate = g_lse[:, None]·mean_o``: no GEMM. The target logit ``Σ_e gate·o_target`` and the logit
sum ``Σ_e gate·sum_o`` are formed outside the op in PyTorch, so autograd differentiates them
exactly; the cross entropy's gate gradient becomes ``E_p[o_e] − (1−ε)·o_e[target] − ε·mean_v o_e``
per unit of upstream gradient. ``mean_o``, ``o_target`` and ``sum_o`` are not differentiable.

Work: per chunk of tokens, E GEMMs ``[rows, H_e] × [H_e, V']`` (the forward of eager PyTorch,
``2·N·V'·ΣH`` flops), a float32 logsumexp and E weighted row sums; the workspace is E + 1 blocks of
``[rows, V']`` float32, never ``[E, N, V']``: rows fill :data:`WORKSPACE_BYTES`, but never fewer
than :data:`MIN_ROWS` (GEMMs with fewer rows run far below the CPU's speed: 3 × ``[51, 576] ×
[576, 49152]`` took 1.5× as long per row as with 256 rows, one thread). The GEMMs run in
the input dtype (float32 / float64 exactly; bfloat16 / float16 logits are rounded to that dtype
before the float32 blend, as eager ``F.linear`` rounds them), except on CUDA where float16 /
bfloat16 GEMMs accumulate into float32 outputs directly. It runs on any device, in PyTorch.
"""

from __future__ import annotations

from typing import Optional, Sequence

import torch
from torch import Tensor

from ._common import gemm

WORKSPACE_BYTES = 48 << 20
MIN_ROWS = 128


def chunk_rows(n: int, vocab_size: int, num_experts: int) -> int:
    """Tokens per chunk: the ``(E + 1)`` float32 ``[rows, V']`` blocks fill :data:`WORKSPACE_BYTES`,
    with at least :data:`MIN_ROWS` rows (and at most ``n``)."""
    fit = WORKSPACE_BYTES // ((num_experts + 1) * 4 * max(vocab_size, 1))
    return max(1, min(max(n, 1), max(fit, MIN_ROWS)))


def _expert_logits(h: Tensor, w: Tensor, b: Optional[Tensor], ct: torch.dtype) -> Tensor:
    """``h·wᵀ + b`` as ``ct`` (float32, or float64 for float64 inputs)."""
    if h.dtype == ct:
        return torch.addmm(b, h, w.t()) if b is not None else h @ w.t()
    if h.is_cuda:
        try:
            o = torch.mm(h, w.t(), out_dtype=ct)
            return o + b.to(ct) if b is not None else o
        except (RuntimeError, TypeError):
            pass
    o = gemm(h, w.t()).to(ct)
    return o + b.to(ct) if b is not None else o


def _forward(hiddens: Sequence[Tensor], weights: Sequence[Tensor], biases: Sequence[Optional[Tensor]], gate: Tensor,
             target: Tensor, vocab_size: int, want_sum: bool, rows: int):
    N, E = gate.shape
    dev = gate.device
    ct = torch.float64 if hiddens[0].dtype == torch.float64 else torch.float32
    lse = torch.empty(N, dtype=ct, device=dev)
    mean_o = torch.empty(N, E, dtype=ct, device=dev)
    o_t = torch.zeros(N, E, dtype=ct, device=dev)
    sum_o = torch.empty(N if want_sum else 0, E, dtype=ct, device=dev)
    wv = [w[:vocab_size] for w in weights]
    bv = [None if b is None else b[:vocab_size] for b in biases]
    g = gate.to(ct)
    inr = (target >= 0) & (target < vocab_size)
    tcl = target.clamp(0, vocab_size - 1)
    for s in range(0, N, max(1, rows)):
        e_ = min(N, s + rows)
        outs = [_expert_logits(h[s:e_], w, b, ct) for h, w, b in zip(hiddens, wv, bv)]
        z = outs[0] * g[s:e_, 0:1]
        for k in range(1, E):
            z.addcmul_(outs[k], g[s:e_, k:k + 1])
        # logsumexp in place (torch.logsumexp would allocate another block)
        m = z.amax(dim=1, keepdim=True)
        m = torch.where(torch.isfinite(m), m, torch.zeros((), dtype=ct, device=dev))
        p = z.sub_(m).exp_()  # unnormalised
        total = p.sum(1)
        lse[s:e_] = m.squeeze(1) + total.log()
        tc = tcl[s:e_, None]
        for k, o in enumerate(outs):
            mean_o[s:e_, k] = (p * o).sum(1) / total
            o_t[s:e_, k] = o.gather(1, tc).squeeze(1)
            if want_sum:
                sum_o[s:e_, k] = o.sum(1)
        del outs, z, p
    o_t = torch.where(inr[:, None], o_t, torch.zeros((), dtype=ct, device=dev))
    f = torch.float32
    return lse.to(f), mean_o.to(f), o_t.to(f), sum_o.to(f)


@torch.library.custom_op("lmfuse::expert_blend_stats", mutates_args=())
def _stats_op(hiddens: list[Tensor], weights: list[Tensor], biases: list[Tensor], gate: Tensor,
              target: Tensor, vocab_size: int, want_sum: bool, rows: int) -> tuple[Tensor, Tensor, Tensor, Tensor]:
    # an empty biases[e] stands for "no bias" (the schema has no list of optional tensors)
    biases = [None if b.numel() == 0 else b for b in biases]
    return _forward(hiddens, weights, biases, gate, target, vocab_size, want_sum, rows)


@_stats_op.register_fake
def _stats_fake(hiddens, weights, biases, gate, target, vocab_size, want_sum, rows):
    N, E = gate.shape
    f = dict(dtype=torch.float32)
    return (gate.new_empty((N,), **f), gate.new_empty((N, E), **f), gate.new_empty((N, E), **f),
            gate.new_empty((N if want_sum else 0, E), **f))


def _setup_context(ctx, inputs, output):
    _, mean_o, o_t, sum_o = output
    ctx.mark_non_differentiable(mean_o, o_t, sum_o)
    ctx.save_for_backward(mean_o)
    ctx.gate_dtype = inputs[3].dtype


def _any(flag) -> bool:
    return any(flag) if isinstance(flag, (list, tuple)) else bool(flag)


def _backward(ctx, g_lse, _g_mean, _g_ot, _g_so):
    (mean_o,) = ctx.saved_tensors
    n = ctx.needs_input_grad
    if any(_any(x) for x in n[:3]):
        raise RuntimeError("lmfuse::expert_blend_stats only differentiates the gate; hiddens, weights and biases "
                           "take the full path of expert_blend_cross_entropy")
    dgate = None
    if n[3] and g_lse is not None:
        dgate = (g_lse.float()[:, None] * mean_o).to(ctx.gate_dtype)
    E = mean_o.shape[1]
    return [None] * E, [None] * E, [None] * E, dgate, None, None, None, None


_stats_op.register_autograd(_backward, setup_context=_setup_context)


def stats(hiddens: Sequence[Tensor], weights: Sequence[Tensor], biases: Sequence[Optional[Tensor]], gate: Tensor,
          target: Tensor, vocab_size: int, want_sum: bool):
    """``(lse [N], mean_o [N, E], o_target [N, E], sum_o [N, E] or [0])`` float32, differentiable in
    ``gate`` only (see the module docstring). ``hiddens[e]`` [N, H_e], ``weights[e]`` [V_e, H_e],
    ``biases[e]`` [V_e] or None, ``gate`` [N, E], ``target`` [N] int64."""
    rows = chunk_rows(gate.shape[0], int(vocab_size), gate.shape[1])
    biases = [h.new_empty((0,)) if b is None else b for h, b in zip(hiddens, biases)]
    return torch.ops.lmfuse.expert_blend_stats(list(hiddens), list(weights), biases, gate, target,
                                               int(vocab_size), bool(want_sum), int(rows))
