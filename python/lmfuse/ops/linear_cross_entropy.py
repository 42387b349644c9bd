"""Fused vocabulary losses: ``linear_cross_entropy`` and ``linear_log_probs`` compute a loss, or the
log-probability of each token's target, from the hidden states and the output embedding without
ever materialising the ``[N, V]`` logits.

Semantics (defined by :func:`reference` / :func:`log_probs_reference`)
----------------------------------------------------------------------
For a token ``n`` with hidden state ``h_n`` and the first ``V' = vocab_size`` rows of ``weight``:

    u[n, v] = h_n · weight[v] + bias[v]                 (v < V')
    z[n, v] = softcap(logit_scale · u[n, v])            softcap(x) = c·tanh(x / c), or x if None
    lse[n]  = log Σ_v exp z[n, v]

``logit_scale`` is applied *before* the softcap (the softcap bounds the final logits, as in Gemma-2,
where the scaled logits are capped). ``linear_log_probs``' ``temperature`` T is ``logit_scale = 1/T``
in the same place: ``z = softcap(u / T)``.

* cross entropy per token: ``ℓ_n = (1−ε)(lse − z_target) + ε(lse − mean_v z) + λ·lse²``
  (ε = ``label_smoothing``, λ = ``z_loss_scale``, the mean over the V' kept rows).
* ``token_weight`` w (any floating dtype, ``target``'s shape; 1 when None) multiplies ℓ_n.
  ``reduction="none"``: ``w_n·ℓ_n`` per token (0 at ignored positions); ``"sum"``: ``Σ w_n ℓ_n``;
  ``"mean"``: ``Σ w_n ℓ_n / Σ_{valid n} w_n`` — the normaliser is a device tensor (no host sync).
  A batch whose normaliser is 0 (every target ignored, or the valid weights sum to 0) gives a loss
  of exactly 0 and zero gradients, never NaN.
* log-probs: ``log p(target) = z_target − lse`` (0 at ignored positions), the entropy
  ``H = lse − Σ_v p_v z_v`` (0 at ignored positions), argmax = first index of the largest logit
  (as ``torch.argmax``; -1 at ignored positions). ``return_lse`` gives ``lse`` (0 at ignored
  positions). Every float output is float32 and differentiable (argmax is not).
* out-of-range targets (neither ``ignore_index`` nor in ``[0, V')``): on CPU tensors outside
  ``torch.compile`` the op raises ``ValueError``; elsewhere (CUDA, or when compiled, where checking
  would need a host sync) that token's loss / log-prob is NaN, so the error cannot pass silently.
  The kernels never read out of bounds for such a target.

Kernel contract (shared by the ``triton`` and ``cpp`` backends)
---------------------------------------------------------------
``hidden2d`` [N, H], ``weight`` [V, H], ``bias`` [V] or None (all one dtype: float32 / bfloat16 /
float16), ``target`` [N] int64.

* ``forward_stats(hidden2d, weight, bias, target, *, vocab_size, ignore_index, logit_scale,
  softcap, want_sum_z, want_sum_pz, want_argmax) -> (lse, z_target, sum_z, sum_pz, argmax)``:
  ``lse``, ``z_target`` (0 where the target is ignored or out of range), ``sum_z = Σ_v z_v``,
  ``sum_pz = Σ_v p_v z_v`` — each [N] float32 — and ``argmax`` [N] int64 (lowest index on ties);
  statistics not wanted are empty ``[0]`` tensors. Ignored rows may skip work but every value is
  finite.
* ``backward(hidden2d, weight, bias, target, lse, a, b, c, d, *, vocab_size, ignore_index,
  logit_scale, softcap, need_hidden, need_weight, need_bias) -> (dhidden, dweight, dbias)``: with
  ``p = exp(z − lse)`` recomputed from the saved ``lse`` and float32 per-token coefficients
  ``a, b, c, d`` [N], the gradient w.r.t. the post-softcap logits is

      dz[n, v] = p[n, v]·(a[n] + d[n]·z[n, v]) + b[n]·1[v = target[n]] + c[n]

  chained through the softcap (``× (1 − (z/c)²)`` = ``1 − tanh²``) and ``logit_scale`` into
  ``dpre`` (the gradient w.r.t. ``u``); rows whose target is ``ignore_index`` contribute nothing.
  ``dhidden = dpre·weight[:V']`` [N, H] (hidden's dtype), ``dweight = dpreᵀ·hidden2d`` [V, H]
  (weight's dtype, rows ≥ V' zero, float32 accumulation), ``dbias = Σ_n dpre`` [V]; empty ``[0]``
  where not needed. No ``[N, V]`` buffer. (The Triton backward normalises ``p`` with the lse of
  its own recomputed logits instead, which differs from the saved one only by rounding but keeps
  ``Σ_v p = 1`` exactly at very large logits, where the two GEMMs' rounding would show.)
  The backward always runs on the backend that ran the forward.

  The coefficients come from the chain rule on the statistics: with upstream gradients ``g_lse,
  g_zt, g_sz, g_spz`` of ``lse, z_target, sum_z, sum_pz`` (using ∂lse/∂z_v = p_v,
  ∂sum_pz/∂z_v = p_v(1 + z_v − sum_pz)): ``a = g_lse + g_spz·(1 − sum_pz)``, ``b = g_zt``,
  ``c = g_sz``, ``d = g_spz``. For mean cross entropy with per-token upstream γ this is
  ``a = γ(1 + 2λ·lse)``, ``b = −γ(1 − ε)``, ``c = −γε/V'``, ``d = 0``.

Every loss, reduction, weight and mask above is plain PyTorch on ``[N]`` vectors around one
differentiable statistics op (``torch.ops.lmfuse.lce_stats``), so any upstream gradient
(``reduction="none"``, token weights, entropy bonuses, the returned ``lse``) is handled by
autograd exactly.

Backends: ``triton`` (CUDA; CPU under ``TRITON_INTERPRET=1`` when forced), ``cpp`` (the CPU
extension), ``reference`` (token-chunked PyTorch, any device and float64; statistics and outputs
stay float32). See :mod:`lmfuse.ops._lce_autograd`. On CPU the order is ``cpp`` then
``reference``; on CUDA ``triton`` then ``reference``.

Besides the statistics op, ``linear_cross_entropy`` has a gradient-in-forward path
(:mod:`lmfuse.ops._lce_chunked`, ``torch.ops.lmfuse.lce_chunked``) for ``reduction="mean"`` /
``"sum"`` without ``return_lse``: per token chunk one GEMM gives the logits, the softmax and the
logit gradient are formed in place, and ``dhidden`` / ``dweight`` / ``dbias`` are computed there
(three GEMMs in all, like eager, against four for forward statistics + recomputing backward); the
backward only scales them by the upstream gradient (in place when the graph is freed after it, so
the weight gradient is never held twice). Its GEMMs run in the input dtype, so bfloat16 /
float16 logits are rounded to that dtype before the float32 softmax, as eager ``F.linear`` rounds
them, and a low-precision weight gradient is accumulated in its dtype, rounded once per chunk. The
choice is static: it is taken by default only on CPU, for float32 and bfloat16, when a gradient of
hidden, weight or bias is wanted (grad mode on) and no backend is forced — where it measured faster
than the ``cpp`` kernels (float16 keeps them); without gradients the statistics op (``cpp``
forward, one GEMM) stays. ``LMFUSE_LCE_CHUNKED=1`` forces the path for every eligible call
(any device and kernel dtype, with or without gradients), ``0`` disables it; ``LMFUSE_BACKEND``
(``cpp`` / ``reference`` / ...) set and ``LMFUSE_LCE_CHUNKED`` unset keeps the forced backend's
statistics path.
"""

from __future__ import annotations

import math
import os
from numbers import Real
from typing import Optional

import torch
from torch import Tensor

from .. import _backend
from . import _lce_chunked, _llp_chunked
from ._common import check_same, check_tensor, cost_for_mode
from ._lce_autograd import stats

REDUCTIONS = ("mean", "sum", "none")


# ----------------------------------------------------------------------------- references
def _ref_logits(hidden: Tensor, weight: Tensor, bias: Optional[Tensor], vocab_size: Optional[int],
                logit_scale: float, softcap: Optional[float]) -> Tensor:
    ct = torch.float64 if hidden.dtype == torch.float64 else torch.float32
    vs = weight.shape[0] if vocab_size is None else vocab_size
    u = hidden.to(ct) @ weight[:vs].to(ct).t()
    if bias is not None:
        u = u + bias[:vs].to(ct)
    z = u * logit_scale
    if softcap is not None:
        z = softcap * torch.tanh(z / softcap)
    return z


def _ref_target_logit(z: Tensor, target: Tensor, valid: Tensor) -> Tensor:
    vs = z.shape[-1]
    inrange = (target >= 0) & (target < vs)
    zt = z.gather(-1, target.clamp(0, vs - 1).unsqueeze(-1)).squeeze(-1)
    zt = torch.where(valid & ~inrange, torch.full_like(zt, float("nan")), zt)
    return torch.where(valid, zt, torch.zeros_like(zt))


def reference(hidden: Tensor, weight: Tensor, target: Tensor, *, bias: Optional[Tensor] = None,
              ignore_index: int = -100, reduction: str = "mean", label_smoothing: float = 0.0,
              z_loss_scale: float = 0.0, logit_scale: float = 1.0, softcap: Optional[float] = None,
              token_weight: Optional[Tensor] = None, vocab_size: Optional[int] = None,
              return_lse: bool = False):
    """Plain PyTorch definition of :func:`linear_cross_entropy` (float32, or float64 for float64
    inputs), materialising the full logits. Same arguments and returns."""
    z = _ref_logits(hidden, weight, bias, vocab_size, logit_scale, softcap)
    valid = target != ignore_index
    lse = torch.logsumexp(z, dim=-1)
    zt = _ref_target_logit(z, target, valid)
    eps = label_smoothing
    loss_tok = (1 - eps) * (lse - zt) + eps * (lse - z.mean(-1)) + z_loss_scale * lse * lse
    zero = torch.zeros_like(loss_tok)
    loss_tok = torch.where(valid, loss_tok, zero)
    w = torch.ones_like(loss_tok) if token_weight is None else token_weight.to(loss_tok.dtype)
    w = torch.where(valid, w, zero)
    loss_tok = loss_tok * w
    if reduction == "none":
        loss = loss_tok
    elif reduction == "sum":
        loss = loss_tok.sum()
    else:
        den = w.sum()
        loss = torch.where(den != 0, loss_tok.sum() / torch.where(den != 0, den, 1.0), 0.0)
    if return_lse:
        return loss, torch.where(valid, lse, zero)
    return loss


def log_probs_reference(hidden: Tensor, weight: Tensor, target: Tensor, *, bias: Optional[Tensor] = None,
                        ignore_index: int = -100, temperature: float = 1.0, softcap: Optional[float] = None,
                        vocab_size: Optional[int] = None, return_entropy: bool = False,
                        return_argmax: bool = False):
    """Plain PyTorch definition of :func:`linear_log_probs` (float32, or float64 for float64 inputs)."""
    z = _ref_logits(hidden, weight, bias, vocab_size, 1.0 / temperature, softcap)
    valid = target != ignore_index
    logp_all = torch.log_softmax(z, dim=-1)
    logp = _ref_target_logit(logp_all, target, valid)
    outs = [logp]
    if return_entropy:
        ent = -(logp_all.exp() * logp_all).sum(-1)
        outs.append(torch.where(valid, ent, torch.zeros_like(ent)))
    if return_argmax:
        outs.append(torch.where(valid, z.argmax(-1), torch.full_like(target, -1)))
    return outs[0] if len(outs) == 1 else tuple(outs)


# ----------------------------------------------------------------------------- cost
def cost(tokens: int, hidden: int, vocab: int, dtype_bytes: int, mode: str = "full",
         weight_grad: bool = True) -> tuple[int, int]:
    """(flops, bytes) of the least work and traffic of the fused loss, as counted for rooflines.

    fwd: the logits GEMM ``2·N·V·H`` (the softmax statistics are O(N·V), not counted); reads
    hidden and weight once, writes O(N) statistics (counted as 4 fp32 values per token).
    bwd: recomputes the logits (``2·N·V·H``), ``dhidden = G·W`` (``2·N·V·H``) and, when the
    weight needs a gradient, ``dweight = Gᵀ·hidden`` (``2·N·V·H``); reads hidden, weight and the
    statistics, writes dhidden and dweight. So full = 8·N·V·H flops with a weight gradient.
    """
    N, H, V, b = tokens, hidden, vocab, dtype_bytes
    gemm = 2 * N * V * H
    fwd = (gemm, b * (N * H + V * H) + 16 * N)
    bwd_f = 2 * gemm + (gemm if weight_grad else 0)
    bwd_b = b * (N * H + V * H) + 16 * N + b * N * H + (b * V * H if weight_grad else 0)
    return cost_for_mode(fwd, (bwd_f, bwd_b), mode)


# ----------------------------------------------------------------------------- validation
def _check_number(name: str, value, *, positive: bool = False, nonneg: bool = False) -> float:
    if isinstance(value, bool) or not isinstance(value, Real) or not math.isfinite(float(value)):
        raise TypeError(f"{name} must be a finite real number, got {value!r}")
    if positive and not value > 0:
        raise ValueError(f"{name} must be > 0, got {value!r}")
    if nonneg and not value >= 0:
        raise ValueError(f"{name} must be >= 0, got {value!r}")
    return float(value)


def _validate(hidden, weight, target, bias, ignore_index, softcap, vocab_size, token_weight):
    check_tensor("hidden", hidden, min_ndim=1)
    check_tensor("weight", weight, ndim=2)
    check_tensor("target", target)
    if not hidden.is_floating_point():
        raise TypeError(f"hidden must be a floating-point tensor, got {hidden.dtype}")
    if bias is not None:
        check_tensor("bias", bias, ndim=1)
    check_same("hidden", hidden, weight=weight, bias=bias)
    if target.dtype != torch.int64:
        raise TypeError(f"target must have dtype torch.int64, got {target.dtype}")
    if target.device != hidden.device:
        raise ValueError(f"target is on {target.device} but hidden is on {hidden.device}; they must match")
    if tuple(target.shape) != tuple(hidden.shape[:-1]):
        raise ValueError(f"target must have hidden's leading shape {tuple(hidden.shape[:-1])}, "
                         f"got {tuple(target.shape)}")
    V, H = weight.shape
    if H != hidden.shape[-1]:
        raise ValueError(f"weight must be [V, H] with H = hidden.shape[-1] = {hidden.shape[-1]}, "
                         f"got shape {tuple(weight.shape)}")
    if V < 1:
        raise ValueError(f"weight must have at least one row, got shape {tuple(weight.shape)}")
    if bias is not None and bias.shape[0] != V:
        raise ValueError(f"bias must be [V] = [{V}], got shape {tuple(bias.shape)}")
    if isinstance(ignore_index, bool) or not isinstance(ignore_index, int):
        raise TypeError(f"ignore_index must be an int, got {ignore_index!r}")
    if softcap is not None:
        _check_number("softcap", softcap, positive=True)
    if vocab_size is None:
        vocab_size = V
    elif isinstance(vocab_size, bool) or not isinstance(vocab_size, int):
        raise TypeError(f"vocab_size must be an int or None, got {vocab_size!r}")
    elif not 1 <= vocab_size <= V:
        raise ValueError(f"vocab_size must be in [1, weight.shape[0] = {V}], got {vocab_size}")
    if token_weight is not None:
        check_tensor("token_weight", token_weight)
        if not token_weight.is_floating_point():
            raise TypeError(f"token_weight must be a floating-point tensor, got {token_weight.dtype}")
        if token_weight.shape != target.shape:
            raise ValueError(f"token_weight must have target's shape {tuple(target.shape)}, "
                             f"got {tuple(token_weight.shape)}")
        if token_weight.device != hidden.device:
            raise ValueError(f"token_weight is on {token_weight.device} but hidden is on {hidden.device}; "
                             f"they must match")
    # Target range: checked where it costs no device synchronisation (CPU tensors, eager).
    if target.device.type == "cpu" and not torch.compiler.is_compiling() and target.numel() > 0:
        bad = (target != ignore_index) & ((target < 0) | (target >= vocab_size))
        if bool(bad.any()):
            i = int(bad.flatten().nonzero()[0, 0])
            raise ValueError(f"target must be ignore_index ({ignore_index}) or in [0, vocab_size = {vocab_size}), "
                             f"got {int(target.flatten()[i])} at flat position {i}")
    return vocab_size


def _flat(hidden: Tensor, target: Tensor):
    H = hidden.shape[-1]
    return hidden.reshape(-1, H), target.reshape(-1)


def _nan_out_of_range(x: Tensor, target2: Tensor, valid: Tensor, vocab_size: int) -> Tensor:
    bad = valid & ((target2 < 0) | (target2 >= vocab_size))
    return torch.where(bad, torch.full_like(x, float("nan")), x)


# ----------------------------------------------------------------------------- path choice
_CHUNKED_DTYPES = (torch.float32, torch.bfloat16, torch.float16)
# Where the gradient-in-forward path is the default (CPU training): bfloat16, whose GEMMs run in
# bfloat16 there, and float32, where its three GEMMs beat the cpp kernels' four (float16 GEMMs are
# slow on most CPUs: the cpp kernels, which convert to float32, stay).
_CHUNKED_DEFAULT_DTYPES = (torch.float32, torch.bfloat16)


def _chunked_mode() -> str:
    """'on' / 'off' from ``LMFUSE_LCE_CHUNKED`` (1 / 0), else 'auto' when no backend is forced and
    'off' when one is (so ``LMFUSE_BACKEND=cpp`` / ``reference`` test those backends)."""
    env = os.environ.get("LMFUSE_LCE_CHUNKED", "")
    if env not in ("", "0", "1"):
        raise ValueError(f"LMFUSE_LCE_CHUNKED must be 0, 1 or unset, got {env!r}")
    if env:
        return "on" if env == "1" else "off"
    return "auto" if _backend.forced_backend() is None else "off"


def _chunked_need(hidden: Tensor, weight: Tensor, bias: Optional[Tensor]) -> list[bool]:
    g = torch.is_grad_enabled()
    return [g and hidden.requires_grad, g and weight.requires_grad, g and bias is not None and bias.requires_grad]


def _takes_chunked(h2: Tensor, need: list[bool], default_dtypes: tuple = _CHUNKED_DEFAULT_DTYPES) -> bool:
    """Static rule for the chunked paths (scalar cross-entropy reductions without ``return_lse``;
    log-probs without entropy / argmax): on CPU for ``default_dtypes`` when a gradient is needed
    (``auto``), for every kernel dtype on any device when forced on, never when off."""
    return _chunked_rule(h2.device.type, h2.dtype, default_dtypes, any(need))


def _chunked_rule(device_type: str, dtype: torch.dtype, default_dtypes: tuple, grad: bool) -> bool:
    if dtype not in _CHUNKED_DTYPES:
        return False
    mode = _chunked_mode()
    if mode == "on":
        return True
    return mode == "auto" and device_type == "cpu" and dtype in default_dtypes and grad


# Where linear_log_probs takes its chunked path by default (CPU training): bfloat16, where ATen's
# bf16 GEMMs plus the in-place softmax kernel measured faster than the cpp kernels, and float32 with
# a frozen head (two GEMMs); a trainable float32 head keeps the cpp kernels (the chunked path's four
# ATen GEMMs measured slower: 0.82x eager against 0.97x, 2048 tokens at SmolLM2's head).
_LOGP_CHUNKED_DEFAULT_DTYPES = (torch.bfloat16,)
_LOGP_FROZEN_HEAD_CHUNKED_DTYPES = (torch.float32, torch.bfloat16)


def _logp_default_dtypes(need: list[bool]) -> tuple:
    frozen_head = bool(need[0]) and not need[1] and not need[2]
    return _LOGP_FROZEN_HEAD_CHUNKED_DTYPES if frozen_head else _LOGP_CHUNKED_DEFAULT_DTYPES


def chunked_by_default(op: str, device: torch.device, dtype: torch.dtype, frozen_head: bool = False) -> bool:
    """Whether a call of ``op`` ("linear_cross_entropy" or "linear_log_probs") that wants a gradient
    (of the hidden states only when ``frozen_head``) takes the chunked ATen-GEMM path rather than a
    backend's statistics path, with the environment as it is now. For benchmarks and tools that
    report which path ran."""
    if op == "linear_cross_entropy":
        dtypes = _CHUNKED_DEFAULT_DTYPES
    elif op == "linear_log_probs":
        dtypes = _logp_default_dtypes([True, not frozen_head, False])
    else:
        raise ValueError(f"op must be 'linear_cross_entropy' or 'linear_log_probs', got {op!r}")
    return _chunked_rule(torch.device(device).type, dtype, dtypes, True)


# ----------------------------------------------------------------------------- public ops
def linear_cross_entropy(hidden: Tensor, weight: Tensor, target: Tensor, *, bias: Optional[Tensor] = None,
                         ignore_index: int = -100, reduction: str = "mean", label_smoothing: float = 0.0,
                         z_loss_scale: float = 0.0, logit_scale: float = 1.0, softcap: Optional[float] = None,
                         token_weight: Optional[Tensor] = None, vocab_size: Optional[int] = None,
                         return_lse: bool = False):
    """Cross entropy of ``softcap(logit_scale·(hidden·weightᵀ + bias))`` against ``target``, fused.

    Args:
        hidden: ``[..., H]`` float32 / float16 / bfloat16 (float64 runs on the reference backend).
        weight: ``[V, H]``, hidden's dtype and device (the output embedding); only the first
            ``vocab_size`` rows form the logits. Its gradient is computed only if it requires grad.
        target: ``[...]`` (hidden's leading shape) int64: a class in ``[0, vocab_size)`` or
            ``ignore_index``.
        bias: ``[V]`` or None.
        reduction: ``"mean"`` (divided by the summed weight of the valid tokens), ``"sum"`` or
            ``"none"`` (per-token ``[...]``, 0 at ignored positions).
        label_smoothing: ε in ``[0, 1]``; z_loss_scale: λ ≥ 0 (adds ``λ·lse²`` per token).
        logit_scale: finite, multiplies the logits before the softcap; softcap: ``c > 0`` or None.
        token_weight: ``[...]`` floating per-token weights or None.
        vocab_size: V' in ``[1, V]`` or None (= V).
        return_lse: also return the per-token log-sum-exp ``[...]`` float32 (0 at ignored
            positions; differentiable).

    Returns:
        The float32 loss (a 0-d tensor, or ``[...]`` for ``reduction="none"``), or ``(loss, lse)``.
        An all-ignored batch gives 0 (and zero gradients) for every reduction.
    """
    vs = _validate(hidden, weight, target, bias, ignore_index, softcap, vocab_size, token_weight)
    if reduction not in REDUCTIONS:
        raise ValueError(f"reduction must be one of {REDUCTIONS}, got {reduction!r}")
    eps = _check_number("label_smoothing", label_smoothing, nonneg=True)
    if eps > 1:
        raise ValueError(f"label_smoothing must be in [0, 1], got {label_smoothing!r}")
    lam = _check_number("z_loss_scale", z_loss_scale, nonneg=True)
    scale = _check_number("logit_scale", logit_scale)
    h2, t2 = _flat(hidden, target)
    need = _chunked_need(hidden, weight, bias)
    if reduction != "none" and not return_lse and _takes_chunked(h2, need):
        valid = t2 != ignore_index
        w = torch.ones(t2.shape, dtype=torch.float32, device=h2.device) if token_weight is None \
            else token_weight.reshape(-1).float()
        w = torch.where(valid, w, torch.zeros_like(w))
        if reduction == "mean":
            den = w.sum()
            nonzero = den != 0
            w = torch.where(nonzero, w / torch.where(nonzero, den, torch.ones_like(den)), torch.zeros_like(w))
        return _lce_chunked.fused_loss(h2, weight, bias, t2, w, vs, ignore_index, scale,
                                       None if softcap is None else float(softcap), eps, lam, need)
    lse, zt, sz, _, _ = stats(h2, weight, bias, t2, vs, ignore_index, scale,
                              None if softcap is None else float(softcap), eps > 0, False, False)
    valid = t2 != ignore_index
    zero = torch.zeros_like(lse)
    zt = _nan_out_of_range(zt, t2, valid, vs)
    loss_tok = lse - (1.0 - eps) * zt
    if eps > 0:
        loss_tok = loss_tok - (eps / vs) * sz
    if lam > 0:
        loss_tok = loss_tok + lam * lse * lse
    loss_tok = torch.where(valid, loss_tok, zero)
    w = torch.where(valid, torch.ones_like(lse) if token_weight is None else token_weight.reshape(-1).float(), zero)
    if token_weight is not None:
        loss_tok = loss_tok * w
    if reduction == "none":
        loss = loss_tok.reshape(target.shape)
    elif reduction == "sum":
        loss = loss_tok.sum()
    else:
        den = w.sum()
        nonzero = den != 0
        loss = torch.where(nonzero, loss_tok.sum() / torch.where(nonzero, den, torch.ones_like(den)),
                           torch.zeros_like(den))
    if return_lse:
        return loss, torch.where(valid, lse, zero).reshape(target.shape)
    return loss


def linear_log_probs(hidden: Tensor, weight: Tensor, target: Tensor, *, bias: Optional[Tensor] = None,
                     ignore_index: int = -100, temperature: float = 1.0, softcap: Optional[float] = None,
                     vocab_size: Optional[int] = None, return_entropy: bool = False,
                     return_argmax: bool = False):
    """Per-token ``log p(target)`` under ``softmax(softcap((hidden·weightᵀ + bias) / temperature))``.

    Args: as :func:`linear_cross_entropy`; ``temperature`` is a finite number > 0 (applied before
    the softcap, like ``logit_scale = 1/temperature``).

    Returns:
        ``logp`` ``[...]`` float32 (0 at ignored positions), followed, when asked, by the entropy
        ``[...]`` float32 (differentiable, 0 at ignored positions) and the argmax ``[...]`` int64
        (lowest index on ties, -1 at ignored positions): a tensor alone or a tuple in that order.
    """
    vs = _validate(hidden, weight, target, bias, ignore_index, softcap, vocab_size, None)
    temp = _check_number("temperature", temperature, positive=True)
    h2, t2 = _flat(hidden, target)
    need = _chunked_need(hidden, weight, bias)
    if not return_entropy and not return_argmax and _takes_chunked(h2, need, _logp_default_dtypes(need)):
        logp = _llp_chunked.log_probs(h2, weight, bias, t2, vs, ignore_index, 1.0 / temp,
                                      None if softcap is None else float(softcap))
        return logp.reshape(target.shape)
    lse, zt, _, spz, am = stats(h2, weight, bias, t2, vs, ignore_index, 1.0 / temp,
                                None if softcap is None else float(softcap), False, bool(return_entropy),
                                bool(return_argmax))
    valid = t2 != ignore_index
    zero = torch.zeros_like(lse)
    logp = torch.where(valid, _nan_out_of_range(zt, t2, valid, vs) - lse, zero)
    outs = [logp.reshape(target.shape)]
    if return_entropy:
        outs.append(torch.where(valid, lse - spz, zero).reshape(target.shape))
    if return_argmax:
        outs.append(torch.where(valid, am, torch.full_like(am, -1)).reshape(target.shape))
    return outs[0] if len(outs) == 1 else tuple(outs)


__all__ = ["linear_cross_entropy", "linear_log_probs", "reference", "log_probs_reference", "cost", "REDUCTIONS"]
