"""Token-level expert blending: the fused blended cross entropy and the decode-time blend + sample.

E experts (language models sharing one tokenizer) each give, per token ``n``, a final hidden state
``h_e[n]`` ``[H_e]`` and an output head ``W_e`` ``[V_e, H_e]`` (bias ``b_e`` optional); a gate gives
per-token weights ``gate[n, e]``. Over the first ``V' = vocab_size`` rows of every head, with the
expert logits ``o_e[n, v] = h_e[n]·W_e[v] + b_e[v]``:

* ``blend="logits"`` (UltraFuser; a logarithmic opinion pool)::

      z[n, v] = Σ_e gate[n, e]·o_e[n, v],      p[n] = softmax(z[n]),    lse[n] = log Σ_v exp z[n, v]

  One softmax over the blended logits. The gates may have any sign and need not sum to 1: their sum
  acts as an inverse temperature (with a softmax gate, Σ_e gate = 1 and ``p ∝ Π_e p_e^gate_e``, the
  normalised weighted geometric mean of the experts' distributions).
* ``blend="probs"`` (an arithmetic mixture)::

      q[n, v] = Σ_e gate[n, e]·softmax(o_e[n])[v],      p[n] = q[n] / Σ_e gate[n, e],   lse[n] = log Σ_e gate[n, e]

  The gates must be non-negative with a positive sum per token; they need not sum to 1 (the
  mixture is renormalised, so only their ratios matter).

The cross entropy per token is ``ℓ_n = −log p[n, target[n]]``, i.e. ``lse − z_target`` for the
logit blend, with label smoothing ε (logit blend only): ``(1−ε)(lse − z_target) + ε(lse − mean_v z)``.
Ignored tokens (``target == ignore_index``) give 0; ``reduction="mean"`` divides by the number of
valid tokens (0 when there is none, with zero gradients).

How it runs (:func:`expert_blend_cross_entropy`)
------------------------------------------------
* Logit blend, some hidden state / head / bias needs a gradient, ``reduction`` ``"mean"`` /
  ``"sum"``, no ``return_lse``, no backend forced (the usual training step): the
  gradient-in-forward path :mod:`lmfuse.ops._expert_blend_chunked`. Per token chunk, E GEMMs give
  the expert logits, the blend's softmax gives ``G = ∂loss/∂z`` in place, and per expert
  ``dh_e = gate_e ⊙ (G·W_e)``, ``dW_e += Gᵀ·(gate_e ⊙ h_e)``, ``dgate_e = ⟨G, o_e⟩``: three GEMMs
  per expert like eager, no copy of the heads; the backward scales the stored gradients.
* Logit blend, some hidden state / head / bias needs a gradient, otherwise (``reduction="none"``,
  ``return_lse``, or a backend forced with ``LMFUSE_BACKEND`` / ``use_backend``): the
  blend is one linear layer over the concatenated, gate-scaled hidden states,
  ``z = [g_1 h_1 | … | g_E h_E | g_{e: b_e}] · [W_1 | … | W_E | b_e…]ᵀ`` (each bias a column
  against its gate), so the op calls :func:`lmfuse.ops.linear_cross_entropy` on it, with that op's
  backends (``cpp``, ``triton``, ``reference``) and kernels; autograd takes its hidden gradient back
  through the concatenation to every ``h_e``, the gate (``dgate[n, e] = ⟨dx_e[n], h_e[n]⟩``) and
  the heads. Cost: the concatenated head ``[V', ΣH_e (+#biases)]`` is copied on every call (for
  E > 1 or a bias), and its gradient is that size too; at E = 3, H = 4096, V' = 32000 in bfloat16
  that is 786 MB, against ``E·N·V'`` logits for eager (2.4 GB at N = 4096). The gate-scaled hidden
  states are rounded to the hidden states' dtype (one rounding of the exact product).
* Logit blend, nothing but the gate needs a gradient (stage 1, evaluation): the statistics op
  :mod:`lmfuse.ops._expert_blend_stats` computes ``lse``, ``E_p[o_e]`` and ``o_e[target]`` in the
  forward pass; the gate gradient ``E_p[o_e] − o_e[target]`` (per unit upstream gradient, plus the
  smoothing term) needs no GEMM in the backward and the heads are never concatenated. When a
  backend other than ``reference`` is forced (``LMFUSE_BACKEND``), this path is not taken: the
  concatenation route runs on the forced backend instead.
* Probability blend: E calls of :func:`lmfuse.ops.linear_log_probs` give ``log p_e(target)`` (with
  their own backends and gradients), and ``ℓ = lse − log Σ_e gate_e·p_e(target)`` is formed in
  PyTorch on ``[N, E]``. ``∂ℓ/∂o_e = r_e (p_e − onehot)`` with the responsibility
  ``r_e = gate_e p_e(target) / Σ_k gate_k p_k(target)`` follows by autograd.

Memory never reaches ``E·N·V'``: every path holds at most a few ``[chunk, V']`` blocks.
"""

from __future__ import annotations

from typing import Optional, Sequence

import torch
from torch import Tensor

from .. import _backend
from ._common import check_tensor, check_same
from . import _expert_blend_chunked as _chunked
from ._expert_blend_stats import stats as _blend_stats
from .linear_cross_entropy import linear_cross_entropy, linear_log_probs

BLENDS = ("logits", "probs")
REDUCTIONS = ("mean", "sum", "none")


# ----------------------------------------------------------------------------- reference
def _ct(*ts) -> torch.dtype:
    return torch.float64 if any(t is not None and t.dtype == torch.float64 for t in ts) else torch.float32


def blend_log_scores_reference(logits: Sequence[Tensor], gate: Tensor, blend: str = "logits") -> Tensor:
    """The blended log-scores ``[..., V']`` of expert logits ``logits[e]`` ``[..., V']`` (float32,
    or float64 for float64 inputs): ``Σ_e gate_e·logits_e`` for ``"logits"``; for ``"probs"`` the
    normalised log-mixture ``log(Σ_e gate_e·softmax(logits_e) / Σ_e gate_e)``. Softmax of either is
    the blended distribution ``p``."""
    ct = _ct(gate, *logits)
    g = gate.to(ct)
    if blend == "logits":
        return sum(g[..., e, None] * o.to(ct) for e, o in enumerate(logits))
    q = sum(g[..., e, None] * torch.softmax(o.to(ct), -1) for e, o in enumerate(logits))
    return torch.log(q) - torch.log(g.sum(-1, keepdim=True))


def reference(hiddens: Sequence[Tensor], weights: Sequence[Tensor], gate: Tensor, target: Tensor, *,
              biases: Optional[Sequence[Optional[Tensor]]] = None, blend: str = "logits",
              vocab_size: Optional[int] = None, ignore_index: int = -100, reduction: str = "mean",
              label_smoothing: float = 0.0, return_lse: bool = False):
    """Plain PyTorch definition of :func:`expert_blend_cross_entropy` (float32, or float64 for
    float64 inputs), materialising every expert's ``[N, V']`` logits. Same arguments and returns."""
    ct = _ct(gate, *hiddens, *weights)
    vs = min(w.shape[0] for w in weights) if vocab_size is None else vocab_size
    biases = biases if biases is not None else [None] * len(weights)
    outs = []
    for h, w, b in zip(hiddens, weights, biases):
        o = h.to(ct) @ w[:vs].to(ct).t()
        outs.append(o + b[:vs].to(ct) if b is not None else o)
    g = gate.to(ct)
    valid = target != ignore_index
    tcl = target.clamp(0, vs - 1)[:, None]
    inrange = (target >= 0) & (target < vs)
    if blend == "logits":
        z = blend_log_scores_reference(outs, g, "logits")
        lse = torch.logsumexp(z, -1)
        zt = z.gather(1, tcl).squeeze(1)
        loss_tok = (1 - label_smoothing) * (lse - zt) + label_smoothing * (lse - z.mean(-1))
    else:
        q = sum(g[:, e, None] * torch.softmax(o, -1) for e, o in enumerate(outs))
        lse = torch.log(g.sum(-1))
        loss_tok = lse - torch.log(q.gather(1, tcl).squeeze(1))
    loss_tok = torch.where(valid & ~inrange, torch.full_like(loss_tok, float("nan")), loss_tok)
    zero = torch.zeros_like(loss_tok)
    loss_tok = torch.where(valid, loss_tok, zero)
    if reduction == "none":
        loss = loss_tok
    elif reduction == "sum":
        loss = loss_tok.sum()
    else:
        den = valid.sum()
        loss = loss_tok.sum() / den if int(den) > 0 else loss_tok.sum() * 0
    return (loss, torch.where(valid, lse, zero)) if return_lse else loss


# ----------------------------------------------------------------------------- cost
def cost(tokens: int, hidden_sizes: Sequence[int], vocab: int, dtype_bytes: int, mode: str = "full",
         stage1: bool = False) -> tuple[int, int]:
    """(flops, bytes) of the least work and traffic of the blended loss (logit blend), for rooflines.

    fwd: the E expert logits GEMMs, ``2·N·V'·ΣH`` flops (the blend and softmax are O(E·N·V'),
    not counted); reads every hidden state and head once. bwd, full training (``stage1=False``):
    the logits recomputed, ``dhidden`` and ``dweight`` (``6·N·V'·ΣH``), reading the inputs and
    writing their gradients; bwd, ``stage1=True``: the gate gradient from the forward's statistics,
    no GEMM (``4·N·E`` flops, ``N·E`` floats read and written).
    """
    from ._common import cost_for_mode

    N, V, b, E, K = tokens, vocab, dtype_bytes, len(hidden_sizes), sum(hidden_sizes)
    gemm = 2 * N * V * K
    inputs = b * (N * K + V * K) + 4 * N * E + 8 * N
    fwd = (gemm, inputs + 4 * N * (2 * E + 1))
    if stage1:
        bwd = (4 * N * E, 12 * N * E)
    else:
        bwd = (3 * gemm, inputs + b * (N * K + V * K) + 4 * N * E)
    return cost_for_mode(fwd, bwd, mode)


def decode_cost(batch: int, num_experts: int, vocab: int, dtype_bytes: int) -> tuple[int, int]:
    """(flops, bytes) of one decode step: the blend (``2·E·B·V'`` flops) reading E ``[B, V']``
    logit tensors, and the sampler's pass over the blended float32 ``[B, V']`` scores."""
    return 2 * num_experts * batch * vocab, num_experts * batch * vocab * dtype_bytes + 3 * 4 * batch * vocab


# ----------------------------------------------------------------------------- validation
def _seq(name: str, value, what: str) -> list:
    if isinstance(value, Tensor) or not isinstance(value, (list, tuple)):
        raise TypeError(f"{name} must be a list or tuple of {what}, got {type(value).__name__}")
    return list(value)


def _check_int(name: str, value) -> int:
    if isinstance(value, bool) or not isinstance(value, int):
        raise TypeError(f"{name} must be an int, got {value!r}")
    return value


def _vocab(weight_rows: list[int], vocab_size) -> int:
    if vocab_size is None:
        if len(set(weight_rows)) > 1:
            raise ValueError(f"the heads have different vocabulary sizes {weight_rows}; pass vocab_size "
                             f"(the common vocabulary, at most {min(weight_rows)}) to cut them")
        return weight_rows[0]
    vs = _check_int("vocab_size", vocab_size)
    if not 1 <= vs <= min(weight_rows):
        raise ValueError(f"vocab_size must be in [1, {min(weight_rows)}] (the smallest head has "
                         f"{min(weight_rows)} rows), got {vs}")
    return vs


def _check_gate(gate: Tensor, E: int, rows_name: str, rows: int, device: torch.device) -> None:
    check_tensor("gate", gate, ndim=2)
    if not gate.is_floating_point():
        raise TypeError(f"gate must be a floating-point tensor, got {gate.dtype}")
    if gate.shape[1] != E:
        raise ValueError(f"gate must be [{rows_name}, E] with E = {E} experts, got shape {tuple(gate.shape)}")
    if gate.shape[0] != rows:
        raise ValueError(f"gate must have {rows} rows ({rows_name}), got shape {tuple(gate.shape)}")
    if gate.device != device:
        raise ValueError(f"gate is on {gate.device} but the experts' tensors are on {device}; they must match")


def _eager_cpu(t: Tensor) -> bool:
    return t.device.type == "cpu" and not torch.compiler.is_compiling() and t.numel() > 0


def _check_probs_gate(gate: Tensor) -> None:
    """blend="probs": gates >= 0 (checked where it costs no device synchronisation)."""
    if _eager_cpu(gate) and bool((gate < 0).any()):
        raise ValueError("blend='probs' needs non-negative gates (a mixture of distributions); got a negative "
                         f"gate, min {float(gate.detach().min())}")


def _validate(hiddens, weights, gate, target, biases, blend, vocab_size, ignore_index, reduction, label_smoothing):
    hiddens = _seq("hiddens", hiddens, "E tensors [N, H_e]")
    weights = _seq("weights", weights, "E tensors [V_e, H_e]")
    E = len(hiddens)
    if E < 1:
        raise ValueError("hiddens must hold at least one expert's hidden states")
    if len(weights) != E:
        raise ValueError(f"weights has {len(weights)} heads but hiddens has {E} experts; they must match")
    biases = [None] * E if biases is None else _seq("biases", biases, "E tensors [V_e] or None")
    if len(biases) != E:
        raise ValueError(f"biases has {len(biases)} entries but there are {E} experts; they must match")
    if blend not in BLENDS:
        raise ValueError(f"blend must be one of {BLENDS}, got {blend!r}")
    if reduction not in REDUCTIONS:
        raise ValueError(f"reduction must be one of {REDUCTIONS}, got {reduction!r}")
    for e, (h, w, b) in enumerate(zip(hiddens, weights, biases)):
        check_tensor(f"hiddens[{e}]", h, ndim=2)
        check_tensor(f"weights[{e}]", w, ndim=2)
        if b is not None:
            check_tensor(f"biases[{e}]", b, ndim=1)
        if not h.is_floating_point():
            raise TypeError(f"hiddens[{e}] must be a floating-point tensor, got {h.dtype}")
        check_same("hiddens[0]", hiddens[0], **{f"hiddens[{e}]": h, f"weights[{e}]": w, f"biases[{e}]": b})
        if h.shape[0] != hiddens[0].shape[0]:
            raise ValueError(f"hiddens[{e}] has {h.shape[0]} tokens but hiddens[0] has {hiddens[0].shape[0]}; the "
                             f"experts' tokens must be aligned (same N)")
        if w.shape[1] != h.shape[1]:
            raise ValueError(f"weights[{e}] must be [V_e, H_e] with H_e = hiddens[{e}].shape[1] = {h.shape[1]}, "
                             f"got shape {tuple(w.shape)}")
        if w.shape[0] < 1:
            raise ValueError(f"weights[{e}] must have at least one row, got shape {tuple(w.shape)}")
        if b is not None and b.shape[0] != w.shape[0]:
            raise ValueError(f"biases[{e}] must be [V_e] = [{w.shape[0]}], got shape {tuple(b.shape)}")
    N, dev = hiddens[0].shape[0], hiddens[0].device
    _check_gate(gate, E, "N", N, dev)
    check_tensor("target", target, ndim=1)
    if target.dtype != torch.int64:
        raise TypeError(f"target must have dtype torch.int64, got {target.dtype}")
    if target.shape[0] != N or target.device != dev:
        raise ValueError(f"target must be [N] = [{N}] on {dev}, got shape {tuple(target.shape)} on {target.device}")
    _check_int("ignore_index", ignore_index)
    vs = _vocab([w.shape[0] for w in weights], vocab_size)
    if isinstance(label_smoothing, bool) or not isinstance(label_smoothing, (int, float)) \
            or not 0.0 <= float(label_smoothing) <= 1.0:
        raise ValueError(f"label_smoothing must be a number in [0, 1], got {label_smoothing!r}")
    if blend == "probs":
        if label_smoothing != 0:
            raise ValueError("label_smoothing is only supported with blend='logits' (the smoothing term of a "
                             "mixture needs every token's mixture probability)")
        _check_probs_gate(gate)
    if _eager_cpu(target):
        bad = (target != ignore_index) & ((target < 0) | (target >= vs))
        if bool(bad.any()):
            i = int(bad.nonzero()[0, 0])
            raise ValueError(f"target must be ignore_index ({ignore_index}) or in [0, vocab_size = {vs}), got "
                             f"{int(target[i])} at position {i}")
    return hiddens, weights, biases, vs


# ----------------------------------------------------------------------------- paths
def _needs_full(hiddens, weights, biases) -> bool:
    if not torch.is_grad_enabled():
        return False
    return any(t is not None and t.requires_grad for t in (*hiddens, *weights, *biases))


def concat_blend_inputs(hiddens: Sequence[Tensor], weights: Sequence[Tensor], biases: Sequence[Optional[Tensor]],
                        gate: Tensor, vocab_size: int) -> tuple[Tensor, Tensor]:
    """``(x [N, K], W [V', K])`` with ``x·Wᵀ`` = the blended logits ``Σ_e gate_e (h_e W_eᵀ + b_e)``:
    ``x = [g_1 h_1 | … | g_E h_E | g_e (for each bias)]``, ``W = [W_1 | … | W_E | b_e]`` cut to
    ``V'`` rows, ``K = ΣH_e + #biases``, in the hidden states' dtype. Differentiable."""
    dt = hiddens[0].dtype
    ct = _ct(hiddens[0])
    g = gate.to(ct)
    cols = [(h.to(ct) * g[:, e:e + 1]).to(dt) for e, h in enumerate(hiddens)]
    wcols = [w[:vocab_size] for w in weights]
    for e, b in enumerate(biases):
        if b is not None:
            cols.append(g[:, e:e + 1].to(dt))
            wcols.append(b[:vocab_size, None])
    if len(cols) == 1:
        return cols[0], wcols[0]
    return torch.cat(cols, 1), torch.cat(wcols, 1)


def _reduce(loss_tok: Tensor, valid: Tensor, reduction: str) -> Tensor:
    if reduction == "none":
        return loss_tok
    if reduction == "sum":
        return loss_tok.sum()
    den = valid.sum().to(loss_tok.dtype)
    nonzero = den != 0
    return torch.where(nonzero, loss_tok.sum() / torch.where(nonzero, den, torch.ones_like(den)), torch.zeros_like(den))


def _nan_bad_targets(x: Tensor, target: Tensor, valid: Tensor, vs: int) -> Tensor:
    bad = valid & ((target < 0) | (target >= vs))
    return torch.where(bad, torch.full_like(x, float("nan")), x)


def _logits_from_stats(hiddens, weights, biases, gate, target, vs, ignore_index, reduction, eps, return_lse):
    lse, _mean_o, o_t, sum_o = _blend_stats(hiddens, weights, biases, gate, target, vs, eps > 0)
    g = gate.float()
    valid = target != ignore_index
    zt = _nan_bad_targets((g * o_t).sum(1), target, valid, vs)
    loss_tok = lse - (1.0 - eps) * zt
    if eps > 0:
        loss_tok = loss_tok - (eps / vs) * (g * sum_o).sum(1)
    zero = torch.zeros_like(lse)
    loss = _reduce(torch.where(valid, loss_tok, zero), valid, reduction)
    return (loss, torch.where(valid, lse, zero)) if return_lse else loss


def _probs(hiddens, weights, biases, gate, target, vs, ignore_index, reduction, return_lse):
    logp = torch.stack([linear_log_probs(h, w, target, bias=b, ignore_index=ignore_index, vocab_size=vs)
                        for h, w, b in zip(hiddens, weights, biases)], 1)          # [N, E], 0 where ignored
    g = gate.float()
    m = logp.detach().amax(1, keepdim=True)  # a shift only: the result and its gradient do not depend on it
    log_mass = m.squeeze(1) + torch.log((g * torch.exp(logp - m)).sum(1))
    lse = torch.log(g.sum(1))
    valid = target != ignore_index
    zero = torch.zeros_like(lse)
    loss = _reduce(torch.where(valid, lse - log_mass, zero), valid, reduction)
    return (loss, torch.where(valid, lse, zero)) if return_lse else loss


# ----------------------------------------------------------------------------- public op
def expert_blend_cross_entropy(hiddens: Sequence[Tensor], weights: Sequence[Tensor], gate: Tensor, target: Tensor, *,
                               biases: Optional[Sequence[Optional[Tensor]]] = None, blend: str = "logits",
                               vocab_size: Optional[int] = None, ignore_index: int = -100, reduction: str = "mean",
                               label_smoothing: float = 0.0, return_lse: bool = False):
    """Cross entropy of the gate-blended distribution of E experts, without ``[E, N, V]`` logits.

    Args:
        hiddens: E tensors ``[N, H_e]`` (one floating dtype and device for all of them and the
            heads; float32 / float16 / bfloat16, float64 on the reference paths): each expert's
            final hidden state at the same N aligned tokens.
        weights: E heads ``[V_e, H_e]``; the first ``vocab_size`` rows of each are used.
        gate: ``[N, E]`` floating (any float dtype), the per-token blend weights; differentiable.
            ``blend="logits"``: any real values. ``blend="probs"``: non-negative, positive sum per
            token (checked for CPU tensors in eager mode; elsewhere a bad row gives NaN).
        target: ``[N]`` int64, a class in ``[0, vocab_size)`` or ``ignore_index``.
        biases: None, or E entries, each ``[V_e]`` or None.
        blend: ``"logits"`` (one softmax over ``Σ_e gate_e·o_e``) or ``"probs"``
            (``Σ_e gate_e·softmax(o_e)``, renormalised by ``Σ_e gate_e``); see the module docstring.
        vocab_size: the common vocabulary V'; required when the heads' row counts differ.
        reduction: ``"mean"`` (over valid tokens), ``"sum"`` or ``"none"`` (``[N]``, 0 at ignored tokens).
        label_smoothing: ε in ``[0, 1]`` (``blend="logits"`` only).
        return_lse: also return ``lse`` ``[N]`` float32 (0 at ignored tokens; differentiable): the
            log-partition ``log Σ_v exp z`` of the blended logits, or ``log Σ_e gate_e`` for
            ``"probs"``, so that ``ℓ = lse − log(score of the target)`` in both.

    Returns:
        The float32 loss (0-d, or ``[N]`` for ``"none"``), or ``(loss, lse)``. Gradients reach every
        hidden state, head and bias that requires one, and the gate.
    """
    hiddens, weights, biases, vs = _validate(hiddens, weights, gate, target, biases, blend, vocab_size,
                                             ignore_index, reduction, label_smoothing)
    eps = float(label_smoothing)
    if blend == "probs":
        return _probs(hiddens, weights, biases, gate, target, vs, ignore_index, reduction, return_lse)
    forced = _backend.forced_backend()
    if not _needs_full(hiddens, weights, biases) and forced in (None, "reference"):
        return _logits_from_stats(hiddens, weights, biases, gate, target, vs, ignore_index, reduction, eps,
                                  return_lse)
    if forced is None and reduction != "none" and not return_lse:
        tw = (target != ignore_index).to(torch.float32)
        if reduction == "mean":
            den = tw.sum()
            nonzero = den != 0
            tw = torch.where(nonzero, tw / torch.where(nonzero, den, torch.ones_like(den)), torch.zeros_like(tw))
        return _chunked.fused_loss(hiddens, weights, biases, gate, target, tw, vs, ignore_index, eps)
    x, w = concat_blend_inputs(hiddens, weights, biases, gate, vs)
    return linear_cross_entropy(x, w, target, ignore_index=ignore_index, reduction=reduction, label_smoothing=eps,
                                vocab_size=vs, return_lse=return_lse)


from ._expert_blend_decode import BlendDecodeResult, blend_logits, expert_blend_decode_step  # noqa: E402

__all__ = ["expert_blend_cross_entropy", "reference", "cost", "decode_cost", "blend_log_scores_reference", "concat_blend_inputs",
           "expert_blend_decode_step", "blend_logits", "BlendDecodeResult", "BLENDS"]
