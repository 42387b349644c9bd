"""Logit combination for collaborative decoding (FS-GEN) and the fused decode step.

``contrastive_logits(L, S)`` (contrastive decoding, Li et al. 2023)::

    large_weight·log_softmax(L) − small_weight·log_softmax(S)   where p_L ≥ alpha·max p_L
    −inf                                                        elsewhere

FS-GEN writes the collaborative score as ``s_S + β(s_L − s_S)`` with ``s = log_softmax``; that
is ``large_weight = β``, ``small_weight = β − 1`` (β = 1: the large model alone; β > 1 pushes
away from the small model, the classic contrastive setting being β = 2, i.e. weights (2, 1);
``large_weight = 1, small_weight = 1`` is the original "expert − amateur" score).

``proxy_logits(L_base, S_tuned, S_base)`` (proxy tuning, Liu et al. 2024)::

    log_softmax(L_base) + alpha·(log_softmax(S_tuned) − log_softmax(S_base))

A token masked (−inf) in any input model is −inf in the result (never NaN).

``collab_decode_step`` combines (none / contrastive / proxy), samples the next token (greedy, or
temperature with top-k / top-p, noise as in ``_sampling``) and returns the small model's
per-row statistics at temperature 1: entropy (nats), top-1 probability, top-1 − top-2
probability margin, and whether the emitted token differs from ``argmax(small_logits)``.

Outputs are float32 (float64 for float64 inputs). ``collab_decode_step`` backends: ``triton``
(CUDA; one program per row, two streaming passes over V, nothing of size V written), ``cpp``
(CPU default; the same two passes, one parallel task per row) and ``reference`` (readable, it
materialises the combined logits). It is registered with ``torch.library`` (fake impl
included); ``contrastive_logits``/``proxy_logits`` are plain PyTorch compositions that
``torch.compile`` traces directly.

Top-k / top-p become one fp32 threshold per row on the scaled combined logits (``_sampling``).
For contrastive / proxy the kernels recompute the combined logits themselves, and their
log-partitions may differ from the host's in the last ulp, which would drop the very token the
threshold was taken from; so the threshold is lowered by a slack of ``2^-16·(1 + |thr|)``
(``THRESHOLD_SLACK``) on every backend. Only a token tied with the cut to within that slack
(relative probability ~1.5e-5) is affected: it is kept, as exact ties already are.
"""

from __future__ import annotations

import math
from typing import NamedTuple, Optional

import torch
from torch import Tensor

from . import _sampling
from ._common import KERNEL_DTYPES, check_tensor, pick_backend

MODES = ("none", "contrastive", "proxy")
PREFERENCE = {"cuda": ("triton", "reference"), "cpu": ("cpp", "reference")}
THRESHOLD_SLACK = 2.0 ** -16
_BAD_ROWS = ("collab_decode_step: the combined logits hold NaN/+inf, or a row has no finite logit (check the "
             "inputs for NaN and fully masked rows)")


class DecodeStepResult(NamedTuple):
    tokens: Tensor             # [B] int64
    small_entropy: Tensor      # [B] float32, nats
    small_top1_prob: Tensor    # [B] float32
    small_margin: Tensor       # [B] float32, top-1 minus top-2 probability
    differs_from_small: Tensor  # [B] bool


def _ft(*ts: Optional[Tensor]) -> torch.dtype:
    return torch.float64 if any(t is not None and t.dtype == torch.float64 for t in ts) else torch.float32


def _check_pair(names: tuple[str, ...], tensors: tuple[Tensor, ...], ndim: Optional[int] = None) -> None:
    first_n, first = names[0], tensors[0]
    for n, t in zip(names, tensors):
        check_tensor(n, t, min_ndim=1, ndim=ndim)
        if not t.is_floating_point():
            raise TypeError(f"{n} must be a floating-point tensor, got {t.dtype}")
        if t.shape != first.shape:
            raise ValueError(f"{n} has shape {tuple(t.shape)} but {first_n} has {tuple(first.shape)}; they must match")
        if t.device != first.device:
            raise ValueError(f"{n} is on {t.device} but {first_n} is on {first.device}; they must match")


def _check_number(name: str, v, lo: float = -math.inf, hi: float = math.inf) -> None:
    if isinstance(v, bool) or not isinstance(v, (int, float)):
        raise TypeError(f"{name} must be a float, got {type(v).__name__}")
    if not (math.isfinite(v) and lo <= v <= hi):
        raise ValueError(f"{name} must be finite and in [{lo}, {hi}], got {v}")


def contrastive_logits_reference(large_logits: Tensor, small_logits: Tensor, alpha: float = 0.1,
                                 large_weight: float = 1.0, small_weight: float = 1.0) -> Tensor:
    ft = _ft(large_logits, small_logits)
    lp_l = torch.log_softmax(large_logits.to(ft), -1)
    lp_s = torch.log_softmax(small_logits.to(ft), -1)
    # p_L ≥ alpha·max p_L  ⇔  log p_L ≥ log(alpha) + max log p_L   (alpha = 0: every token)
    cut = lp_l.amax(-1, keepdim=True) + (math.log(alpha) if alpha > 0 else -math.inf)
    score = large_weight * lp_l - small_weight * lp_s
    return torch.where((lp_l >= cut) & torch.isfinite(score), score, float("-inf"))


def proxy_logits_reference(large_base: Tensor, small_tuned: Tensor, small_base: Tensor,
                           alpha: float = 1.0) -> Tensor:
    ft = _ft(large_base, small_tuned, small_base)
    lb = torch.log_softmax(large_base.to(ft), -1)
    st = torch.log_softmax(small_tuned.to(ft), -1)
    sb = torch.log_softmax(small_base.to(ft), -1)
    masked = torch.isinf(lb) | torch.isinf(st) | torch.isinf(sb)
    return torch.where(masked, float("-inf"), lb + alpha * (st - sb))


def contrastive_logits(large_logits: Tensor, small_logits: Tensor, *, alpha: float = 0.1,
                       large_weight: float = 1.0, small_weight: float = 1.0) -> Tensor:
    """Contrastive-decoding scores ``[..., V]`` float32 (see the module docstring).

    ``large_logits``, ``small_logits``: ``[..., V]``, same shape and device, any float dtype.
    ``alpha`` in [0, 1]: plausibility cut relative to the large model's top probability."""
    _check_pair(("large_logits", "small_logits"), (large_logits, small_logits))
    _check_number("alpha", alpha, 0.0, 1.0)
    _check_number("large_weight", large_weight)
    _check_number("small_weight", small_weight)
    return contrastive_logits_reference(large_logits, small_logits, alpha, large_weight, small_weight)


def proxy_logits(large_base: Tensor, small_tuned: Tensor, small_base: Tensor, *, alpha: float = 1.0) -> Tensor:
    """Proxy-tuning scores ``[..., V]`` float32: ``log_softmax(L_base) + alpha·(log_softmax(S_tuned)
    − log_softmax(S_base))``. All three ``[..., V]``, same shape and device."""
    _check_pair(("large_base", "small_tuned", "small_base"), (large_base, small_tuned, small_base))
    _check_number("alpha", alpha)
    return proxy_logits_reference(large_base, small_tuned, small_base, alpha)


def small_stats_reference(small_logits: Tensor) -> tuple[Tensor, Tensor, Tensor, Tensor]:
    """(entropy, top-1 prob, top-1 − top-2 prob, argmax) of ``softmax(small_logits)`` per row."""
    ft = _ft(small_logits)
    lp = torch.log_softmax(small_logits.to(ft), -1)
    p = lp.exp()
    entropy = -(p * torch.where(p > 0, lp, 0.0)).sum(-1)
    top = torch.topk(p, min(2, p.shape[-1]), dim=-1).values
    second = top[:, 1] if top.shape[-1] > 1 else torch.zeros_like(top[:, 0])
    return entropy, top[:, 0], top[:, 0] - second, small_logits.argmax(-1)


def combine_reference(small_logits: Tensor, large_logits: Optional[Tensor], small_base_logits: Optional[Tensor],
                      mode: str, alpha: float, large_weight: float, small_weight: float,
                      proxy_alpha: float) -> Tensor:
    """The logits the decode step samples from (un-normalised; float32/float64)."""
    if mode == "contrastive":
        return contrastive_logits_reference(large_logits, small_logits, alpha, large_weight, small_weight)
    if mode == "proxy":
        return proxy_logits_reference(large_logits, small_logits, small_base_logits, proxy_alpha)
    src = large_logits if large_logits is not None else small_logits
    return src.to(_ft(src))


def collab_decode_step_reference(small_logits, large_logits, small_base_logits, mode, alpha, large_weight,
                                 small_weight, proxy_alpha, temperature, threshold, seeds) -> DecodeStepResult:
    """Plain PyTorch decode step with explicit noise: ``threshold [B]`` (top-k/top-p on the
    temperature-scaled combined logits, or None) and ``seeds [B, 2]`` (see ``_sampling``)."""
    comb = combine_reference(small_logits, large_logits, small_base_logits, mode, alpha, large_weight,
                             small_weight, proxy_alpha)
    if bool((torch.isnan(comb) | (comb == float("inf"))).any() | ~torch.isfinite(comb).any(-1).any()):
        raise ValueError(_BAD_ROWS)
    if temperature == 0:
        tokens = comb.argmax(-1)
    else:
        scaled = _sampling.apply_threshold(comb * _sampling.inv_temperature(temperature), threshold)
        p = torch.softmax(scaled, -1)
        tokens = (p / _sampling.noise_exponential(seeds, comb.shape[-1]).to(p.dtype)).argmax(-1)
    ent, top1, margin, s_arg = small_stats_reference(small_logits)
    return DecodeStepResult(tokens, ent.float(), top1.float(), margin.float(), tokens != s_arg)


@torch.library.custom_op("lmfuse::collab_decode_step", mutates_args=())
def _decode_op(small_logits: Tensor, large_logits: Optional[Tensor], small_base_logits: Optional[Tensor],
               mode: str, alpha: float, large_weight: float, small_weight: float, proxy_alpha: float,
               temperature: float, threshold: Optional[Tensor], seeds: Tensor
               ) -> tuple[Tensor, Tensor, Tensor, Tensor, Tensor]:
    unsupported = {} if small_logits.dtype in KERNEL_DTYPES else {
        b: f"kernels take {[str(d) for d in KERNEL_DTYPES]}, got {small_logits.dtype}" for b in ("triton", "cpp")}
    unsupported.update(_stale_extension())
    backend = pick_backend("collab_decode_step", small_logits, PREFERENCE, unsupported)
    if backend == "reference":
        r = collab_decode_step_reference(small_logits, large_logits, small_base_logits, mode, alpha, large_weight,
                                         small_weight, proxy_alpha, temperature, threshold, seeds)
        return tuple(t.contiguous() for t in r)
    args = (small_logits.contiguous(), None if large_logits is None else large_logits.contiguous(),
            None if small_base_logits is None else small_base_logits.contiguous(), mode,
            math.log(alpha) if alpha > 0 else -math.inf, float(large_weight), float(small_weight),
            float(proxy_alpha), _sampling.inv_temperature(temperature),
            None if threshold is None else threshold.contiguous(), seeds.contiguous())
    if backend == "triton":
        from ..triton_kernels import collab_decode as tk

        out = tk.collab_decode_step(*args)
    else:
        import lmfuse._C as ext

        out = ext.collab_decode_step(*args)
    if bool((out[0] < 0).any()):  # the kernels mark an invalid row with token -1
        raise ValueError(f"{_BAD_ROWS} [{backend} backend, row {int((out[0] < 0).nonzero()[0, 0])}]")
    return tuple(out)


def _stale_extension() -> dict[str, str]:
    """{"cpp": why} when lmfuse._C exists but predates this kernel (rebuild to enable it)."""
    try:
        import lmfuse._C as ext
    except Exception:
        return {}  # unavailable anyway; _backend reports why
    if hasattr(ext, "collab_decode_step"):
        return {}
    return {"cpp": "lmfuse._C was built without collab_decode_step (rebuild: pip install --no-build-isolation -e .)"}


@_decode_op.register_fake
def _decode_fake(small_logits, large_logits, small_base_logits, mode, alpha, large_weight, small_weight,
                 proxy_alpha, temperature, threshold, seeds):
    B = small_logits.shape[0]
    f = small_logits.new_empty((B,), dtype=torch.float32)
    return (small_logits.new_empty((B,), dtype=torch.int64), f, torch.empty_like(f), torch.empty_like(f),
            small_logits.new_empty((B,), dtype=torch.bool))


def _filter_thresholds(comb: Tensor, inv_t: float, top_k: Optional[int], top_p: Optional[float]) -> Optional[Tensor]:
    """``_sampling.filter_thresholds`` of the combined logits, on their finite entries only.

    Contrastive scores are −inf outside the plausible set (typically tens of tokens out of tens of
    thousands), so the full-width sort + softmax + cumsum of top-p would cost more than the whole
    kernel. The threshold depends only on the finite values, and ``topk`` (sorted, O(V)) gives
    them, −inf padded, in the order the sort would: the result is the same token value."""
    if torch.compiler.is_compiling():  # the shortcut needs a data-dependent size: trace the full-width path
        return _sampling.filter_thresholds(comb, inv_t, top_k, top_p)
    n_fin = int(torch.isfinite(comb).sum(-1).max())
    if 0 < n_fin <= comb.shape[-1] // 4:
        comb = torch.topk(comb, n_fin, dim=-1).values
        if top_k is not None and top_k >= n_fin:
            top_k = None  # keeps every finite token, as it would on the full row
    return _sampling.filter_thresholds(comb, inv_t, top_k, top_p)


def collab_decode_step(small_logits: Tensor, large_logits: Optional[Tensor] = None,
                       small_base_logits: Optional[Tensor] = None, *, mode: str = "none", alpha: float = 0.1,
                       large_weight: float = 1.0, small_weight: float = 1.0, proxy_alpha: float = 1.0,
                       temperature: float = 0.0, top_k: Optional[int] = None, top_p: Optional[float] = None,
                       generator=None) -> DecodeStepResult:
    """One collaborative decoding step over ``[B, V]`` logits (fp32/fp16/bf16, one dtype).

    ``mode="none"``: sample from ``large_logits`` (or ``small_logits`` when ``large_logits`` is
    None); ``"contrastive"``: from ``contrastive_logits(large, small, alpha, large_weight,
    small_weight)``; ``"proxy"``: from ``proxy_logits(large (base), small (tuned), small_base,
    alpha=proxy_alpha)``. ``temperature == 0`` is greedy; otherwise top-k / top-p apply to the
    combined distribution and ``generator`` (or an int seed) makes it reproducible.

    Returns ``DecodeStepResult(tokens [B] int64, small_entropy, small_top1_prob, small_margin
    [B] float32, differs_from_small [B] bool)``; the statistics describe ``softmax(small_logits)``.
    """
    if mode not in MODES:
        raise ValueError(f"mode must be one of {MODES}, got {mode!r}")
    names, ts = ["small_logits"], [small_logits]
    if mode in ("contrastive", "proxy") and large_logits is None:
        raise ValueError(f"mode={mode!r} needs large_logits")
    if mode == "proxy" and small_base_logits is None:
        raise ValueError("mode='proxy' needs small_base_logits (the untuned small model)")
    if mode != "proxy" and small_base_logits is not None:
        raise ValueError(f"small_base_logits is only used by mode='proxy', got it with mode={mode!r}")
    for n, t in (("large_logits", large_logits), ("small_base_logits", small_base_logits)):
        if t is not None:
            names.append(n)
            ts.append(t)
    _check_pair(tuple(names), tuple(ts), ndim=2)
    for n, t in zip(names, ts):
        if t.dtype != small_logits.dtype:
            raise TypeError(f"{n} has dtype {t.dtype} but small_logits has {small_logits.dtype}; they must match")
    if small_logits.shape[0] < 1 or small_logits.shape[1] < 1:
        raise ValueError(f"small_logits must be [B, V] with B, V >= 1, got {tuple(small_logits.shape)}")
    _check_number("alpha", alpha, 0.0, 1.0)
    for n, v in (("large_weight", large_weight), ("small_weight", small_weight), ("proxy_alpha", proxy_alpha)):
        _check_number(n, v)
    _sampling.check_sampling_args(temperature, top_k, top_p)
    B, dev = small_logits.shape[0], small_logits.device
    threshold = None
    if temperature == 0:
        seeds = torch.zeros((B, 2), dtype=torch.int64, device=dev)
    else:
        seeds = _sampling.draw_seeds(B, _sampling.resolve_generator(generator, dev), dev)
        if top_k is not None or top_p is not None:
            comb = combine_reference(small_logits, large_logits, small_base_logits, mode, alpha, large_weight,
                                     small_weight, proxy_alpha)
            threshold = _filter_thresholds(comb, _sampling.inv_temperature(temperature), top_k, top_p)
            if threshold is not None and mode != "none":  # see THRESHOLD_SLACK in the module docstring
                threshold = threshold - THRESHOLD_SLACK * (1.0 + threshold.abs())
    out = torch.ops.lmfuse.collab_decode_step(small_logits, large_logits, small_base_logits, mode, float(alpha),
                                              float(large_weight), float(small_weight), float(proxy_alpha),
                                              float(temperature), threshold, seeds)
    return DecodeStepResult(*out)


__all__ = ["contrastive_logits", "proxy_logits", "collab_decode_step", "DecodeStepResult",
           "contrastive_logits_reference", "proxy_logits_reference", "collab_decode_step_reference"]
