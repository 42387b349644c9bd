"""CPU kernels of the fused vocabulary losses (``lmfuse._C.lce_forward_stats`` / ``lce_backward``).

Both functions work on the logits

    z[n, v] = softcap(logit_scale · (hidden2d[n] · weight[v] + bias[v])),   v < vocab_size,

with ``softcap(x) = c·tanh(x / c)`` (or the identity when ``softcap`` is None), without ever
materialising them: the C++ kernel computes one fp32 [token block × vocab block] tile per thread
at a time (extra memory bounded by threads × block, never N × V). Accumulation is fp32 for every
input dtype (float32, bfloat16, float16).

* :func:`forward_stats` returns per-token ``lse``, ``z_target`` and optionally ``sum_z``,
  ``sum_pz`` (Σ_v p_v z_v, so that the entropy is ``lse − sum_pz``) and ``argmax`` (first index
  of the maximum, as ``torch.argmax``).
* :func:`backward` takes per-token fp32 coefficients a, b, c, d and returns the gradients of
  hidden2d, weight and bias for the logit gradient

      dz[n, v] = p[n, v]·(a[n] + d[n]·z[n, v]) + b[n]·1[v = target[n]] + c[n],  p = exp(z − lse),

  chained through the softcap (× (1 − tanh²)) and ``logit_scale``. Rows whose target is
  ``ignore_index`` contribute no gradient, whatever their coefficients.

Tokens are split over OpenMP threads in the forward; vocabulary blocks in the backward (each
thread owns its rows of dweight/dbias, and keeps its own fp32 partial of dhidden that is summed at
the end). Results therefore agree to fp32 rounding across thread counts; ``torch.set_num_threads``
sets how many threads are used.

These are internal building blocks of :mod:`lmfuse.ops.linear_cross_entropy`; they validate their
arguments (clear ``TypeError``/``ValueError``) but leave semantics (reductions, smoothing, which
coefficients to pass) to the op.
"""

from __future__ import annotations

import importlib
import math
from typing import Optional

import torch
from torch import Tensor

__all__ = ["available", "forward_stats", "backward"]

_DTYPES = (torch.float32, torch.bfloat16, torch.float16)


def _ext():
    return importlib.import_module("lmfuse._C")


def available() -> bool:
    """True when the compiled CPU extension provides these kernels."""
    try:
        return hasattr(_ext(), "lce_forward_stats")
    except Exception:  # not built, or a stale build that fails to import
        return False


def _check_inputs(hidden2d, weight, bias, target, vocab_size, ignore_index, logit_scale, softcap):
    for name, t in (("hidden2d", hidden2d), ("weight", weight), ("target", target)):
        if not isinstance(t, Tensor):
            raise TypeError(f"{name} must be a torch.Tensor, got {type(t).__name__}")
    if bias is not None and not isinstance(bias, Tensor):
        raise TypeError(f"bias must be a torch.Tensor or None, got {type(bias).__name__}")
    for name, t in (("hidden2d", hidden2d), ("weight", weight), ("target", target), ("bias", bias)):
        if t is not None and t.device.type != "cpu":
            raise ValueError(f"{name} must be on the CPU, got device {t.device}")
    if hidden2d.dtype not in _DTYPES:
        raise TypeError(f"hidden2d must have dtype in {[str(d) for d in _DTYPES]}, got {hidden2d.dtype}")
    if hidden2d.dim() != 2 or hidden2d.shape[1] < 1:
        raise ValueError(f"hidden2d must be [N, H] with H >= 1, got shape {tuple(hidden2d.shape)}")
    N, H = hidden2d.shape
    if weight.dim() != 2 or weight.shape[1] != H:
        raise ValueError(f"weight must be [V, H] with H = {H}, got shape {tuple(weight.shape)}")
    if weight.dtype != hidden2d.dtype:
        raise TypeError(f"weight must have the dtype of hidden2d ({hidden2d.dtype}), got {weight.dtype}")
    V = weight.shape[0]
    if bias is not None:
        if bias.shape != (V,):
            raise ValueError(f"bias must be [V] = [{V}], got shape {tuple(bias.shape)}")
        if bias.dtype != hidden2d.dtype:
            raise TypeError(f"bias must have the dtype of hidden2d ({hidden2d.dtype}), got {bias.dtype}")
    if target.dtype != torch.int64:
        raise TypeError(f"target must be int64, got {target.dtype}")
    if target.shape != (N,):
        raise ValueError(f"target must be [N] = [{N}], got shape {tuple(target.shape)}")
    if isinstance(vocab_size, bool) or not isinstance(vocab_size, int):
        raise TypeError(f"vocab_size must be an int, got {type(vocab_size).__name__}")
    if not 1 <= vocab_size <= V:
        raise ValueError(f"vocab_size must be in [1, V = {V}], got {vocab_size}")
    if isinstance(ignore_index, bool) or not isinstance(ignore_index, int):
        raise TypeError(f"ignore_index must be an int, got {type(ignore_index).__name__}")
    if not isinstance(logit_scale, (int, float)) or isinstance(logit_scale, bool) or not math.isfinite(logit_scale):
        raise ValueError(f"logit_scale must be a finite number, got {logit_scale!r}")
    if softcap is not None and (not isinstance(softcap, (int, float)) or isinstance(softcap, bool)
                                or not math.isfinite(softcap) or softcap <= 0):
        raise ValueError(f"softcap must be None or a finite number > 0, got {softcap!r}")


def forward_stats(hidden2d: Tensor, weight: Tensor, bias: Optional[Tensor], target: Tensor, *,
                  vocab_size: int, ignore_index: int, logit_scale: float, softcap: Optional[float],
                  want_sum_z: bool, want_sum_pz: bool, want_argmax: bool
                  ) -> tuple[Tensor, Tensor, Tensor, Tensor, Tensor]:
    """Per-token statistics of the logits over the first ``vocab_size`` vocabulary rows.

    Args:
        hidden2d: [N, H] float32/bfloat16/float16, CPU.
        weight: [V, H], dtype of hidden2d.
        bias: [V] in that dtype, or None.
        target: [N] int64. Values are not checked here (the op decides what an out-of-range
            target means): one that is neither ``ignore_index`` nor in ``[0, vocab_size)`` has no
            logit, so its ``z_target`` is 0 and its row gets no one-hot gradient term; the kernels
            never index memory with a target.
        vocab_size: V' in [1, V]; rows >= V' of weight are not part of the logits.
        ignore_index: target value marking rows without a target.
        logit_scale: multiplies ``hidden·weightᵀ + bias`` before the softcap.
        softcap: c of ``c·tanh(x / c)``, or None.
        want_sum_z / want_sum_pz / want_argmax: which optional statistics to compute.

    Returns:
        ``(lse, z_target, sum_z, sum_pz, argmax)``: ``lse`` [N] float32 (log Σ_v e^{z_v}),
        ``z_target`` [N] float32 (z at the target; 0 where the target is ``ignore_index`` or
        out of range),
        ``sum_z`` [N] float32 (Σ_v z_v), ``sum_pz`` [N] float32 (Σ_v softmax(z)_v z_v) and
        ``argmax`` [N] int64 (first index of the largest z). Statistics not asked for are empty
        tensors of shape [0]. Ignored rows get the statistics of their logits like any other row.
    """
    _check_inputs(hidden2d, weight, bias, target, vocab_size, ignore_index, logit_scale, softcap)
    return _ext().lce_forward_stats(
        hidden2d.contiguous(), weight.contiguous(), None if bias is None else bias.contiguous(),
        target.contiguous(), int(vocab_size), int(ignore_index), float(logit_scale),
        0.0 if softcap is None else float(softcap), bool(want_sum_z), bool(want_sum_pz), bool(want_argmax))


def backward(hidden2d: Tensor, weight: Tensor, bias: Optional[Tensor], target: Tensor, lse: Tensor,
             a: Tensor, b: Tensor, c: Tensor, d: Tensor, *, vocab_size: int, ignore_index: int,
             logit_scale: float, softcap: Optional[float], need_hidden: bool, need_weight: bool,
             need_bias: bool) -> tuple[Tensor, Tensor, Tensor]:
    """Gradients of hidden2d, weight and bias for the per-token coefficients a, b, c, d.

    Args:
        hidden2d, weight, bias, target, vocab_size, ignore_index, logit_scale, softcap: as in
            :func:`forward_stats` (the same values as the forward).
        lse: [N] float32, the ``lse`` of :func:`forward_stats`; p = exp(z − lse).
        a, b, c, d: [N] floating coefficients (converted to float32) of
            ``dz = p·(a + d·z) + b·1[v = target] + c``.
        need_hidden / need_weight / need_bias: which gradients to compute (``need_bias`` needs a
            bias).

    Returns:
        ``(dhidden, dweight, dbias)``: dhidden [N, H] in hidden2d's dtype, dweight [V, H] in
        weight's dtype (rows >= vocab_size are zero), dbias [V] in bias's dtype (likewise);
        accumulated in float32 and rounded once. Gradients not asked for are empty tensors of
        shape [0]. Rows whose target is ``ignore_index`` contribute nothing.
    """
    _check_inputs(hidden2d, weight, bias, target, vocab_size, ignore_index, logit_scale, softcap)
    N = hidden2d.shape[0]
    coeffs = []
    for name, t in (("lse", lse), ("a", a), ("b", b), ("c", c), ("d", d)):
        if not isinstance(t, Tensor):
            raise TypeError(f"{name} must be a torch.Tensor, got {type(t).__name__}")
        if not t.is_floating_point():
            raise TypeError(f"{name} must be a floating tensor, got {t.dtype}")
        if t.shape != (N,):
            raise ValueError(f"{name} must be [N] = [{N}], got shape {tuple(t.shape)}")
        if t.device.type != "cpu":
            raise ValueError(f"{name} must be on the CPU, got device {t.device}")
        coeffs.append(t.to(torch.float32).contiguous())
    if need_bias and bias is None:
        raise ValueError("need_bias=True needs a bias tensor, got bias=None")
    return _ext().lce_backward(
        hidden2d.contiguous(), weight.contiguous(), None if bias is None else bias.contiguous(),
        target.contiguous(), *coeffs, int(vocab_size), int(ignore_index), float(logit_scale),
        0.0 if softcap is None else float(softcap), bool(need_hidden), bool(need_weight), bool(need_bias))
