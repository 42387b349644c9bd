"""IFT's propagated loss as pure functions of per-token log-probs: :func:`ift_weights`,
:func:`ift_loss`, and the λ schedule :func:`ift_lambda`. See ``docs/ift.md``.

Notation (one row ``b`` of a batch, positions ``t`` along the last dimension): ``logp_t`` the
log-probability of the token predicted at ``t``, ``M_t`` the loss mask, ``N = Σ_t M_t``,
``ℓ_t = −logp_t·M_t``. The default weighting (``propagation_type="loss"``, ``side="left"``,
``norm="L1"``) is

    S_t = Σ_{s≥t} γ^(s−t) ℓ_s / N          (raw positions: masked holes keep their place)
    w_t = M_t · S_t · N / Σ_u M_u S_u      (so Σ_t w_t = N)
    L   = mean_b Σ_t ℓ_t w_t / N  =  mean_b Σ_t S_t ℓ_t / Σ_t S_t

and the weights are differentiable (not detached) unless asked.
"""

from __future__ import annotations

import math
from numbers import Real
from typing import Optional

import torch
from torch import Tensor

PROPAGATION_TYPES = ("loss", "mask", "logps")
PROPAGATION_SIDES = ("left", "right")
PROPAGATION_NORMS = ("L1", "L2", "softmax", "log")
LAMBDA_SCHEDULES = (None, "linear")
LAMBDA_DISTURBS = (None, "normal")
# the value a masked position takes in the right-side prefix sums before inversion
RIGHT_MASKED_VALUE = 1e6

__all__ = ["ift_weights", "ift_loss", "ift_lambda", "lambda_noise", "PROPAGATION_TYPES", "PROPAGATION_SIDES",
           "PROPAGATION_NORMS", "check_propagation"]


def _check_choice(name: str, value, choices) -> None:
    if value not in choices:
        raise ValueError(f"{name} must be one of {list(choices)}, got {value!r}")


def _check_unit(name: str, value) -> float:
    if isinstance(value, bool) or not isinstance(value, Real) or not math.isfinite(float(value)):
        raise TypeError(f"{name} must be a finite real number, got {value!r}")
    if not 0.0 <= float(value) <= 1.0:
        raise ValueError(f"{name} must be in [0, 1], got {value!r}")
    return float(value)


def check_propagation(gamma, propagation_type, propagation_side, propagation_norm) -> float:
    """Validate the weighting options (raises ``ValueError`` / ``TypeError`` naming the argument)."""
    _check_choice("propagation_type", propagation_type, PROPAGATION_TYPES)
    _check_choice("propagation_side", propagation_side, PROPAGATION_SIDES)
    _check_choice("propagation_norm", propagation_norm, PROPAGATION_NORMS)
    return _check_unit("gamma", gamma)


def _check_inputs(token_logps, mask) -> Tensor:
    if not isinstance(token_logps, Tensor) or not token_logps.is_floating_point():
        raise TypeError(f"token_logps must be a floating-point tensor [B, L], got "
                        f"{token_logps.dtype if isinstance(token_logps, Tensor) else type(token_logps).__name__}")
    if token_logps.dim() != 2:
        raise ValueError(f"token_logps must be [B, L], got shape {tuple(token_logps.shape)}")
    if not isinstance(mask, Tensor):
        raise TypeError(f"mask must be a bool or 0/1 integer tensor [B, L], got {type(mask).__name__}")
    if mask.shape != token_logps.shape:
        raise ValueError(f"mask must have token_logps' shape {tuple(token_logps.shape)}, got {tuple(mask.shape)}")
    if mask.is_floating_point() or mask.is_complex():
        raise TypeError(f"mask must be a bool or 0/1 integer tensor, got dtype {mask.dtype}")
    if mask.device != token_logps.device:
        raise ValueError(f"mask is on {mask.device} but token_logps is on {token_logps.device}; they must match")
    return mask.bool()


def _compute_dtype(t: Tensor) -> torch.dtype:
    return torch.float64 if t.dtype == torch.float64 else torch.float32


def _weights(logp: Tensor, mask: Tensor, gamma: float, ptype: str, side: str, norm: str) -> Tensor:
    from lmfuse.ops import discounted_cumsum

    m = mask.to(logp.dtype)
    n = m.sum(-1, keepdim=True)
    if gamma == 0.0:  # no propagation: every counted token weighs 1
        return m
    nll = -torch.where(mask, logp, torch.zeros_like(logp))
    if ptype == "loss":
        item = nll / torch.where(n > 0, n, torch.ones_like(n))
    elif ptype == "mask":
        item = m
    else:
        item = nll
    zero = torch.zeros_like(item)
    if side == "left":
        s = torch.where(mask, discounted_cumsum(item, gamma, reverse=True), zero)
        if norm == "L1":
            w = s
        elif norm == "L2":
            w = s * s
        elif norm == "softmax":
            w = torch.softmax(s, dim=-1)
        else:
            w = torch.log(s + 1.0)
    else:
        s = torch.where(mask, discounted_cumsum(item, gamma, reverse=False), torch.full_like(item, RIGHT_MASKED_VALUE))
        # shift by the smallest non-zero value of the whole batch (so no entry is inverted at 0)
        nonzero = s != 0
        shift = torch.where(nonzero, s, torch.full_like(s, math.inf)).amin()
        shift = torch.where(torch.isfinite(shift), shift, torch.zeros_like(shift))
        s = s + shift
        if norm == "L1":
            w = 1.0 / s
        elif norm == "L2":
            w = 1.0 / (s * s)
        elif norm == "softmax":
            w = torch.softmax(1.0 / s, dim=-1)
        else:
            w = 1.0 / torch.log(s + 1.0)
    w = torch.where(mask, w, zero)
    total = w.sum(-1, keepdim=True)
    # a row whose weights cannot be normalised (all zero, e.g. every log-prob exactly 0, or not
    # finite) falls back to uniform weights rather than NaN
    ok = (total != 0) & torch.isfinite(total)
    return torch.where(ok, w * n / torch.where(ok, total, torch.ones_like(total)), m)


def ift_weights(token_logps: Tensor, mask: Tensor, *, gamma: float = 0.95, propagation_type: str = "loss",
                propagation_side: str = "left", propagation_norm: str = "L1", detach: bool = False) -> Tensor:
    """IFT's per-token loss weights.

    Args:
        token_logps: ``[B, L]`` float, ``log p`` of each position's target (any value where
            ``mask`` is False).
        mask: ``[B, L]`` bool (or 0/1 integers): which positions count.
        gamma: the discount γ in ``[0, 1]`` (0: every counted token weighs 1).
        propagation_type: what is propagated: ``"loss"`` (``−logp/N``, default), ``"logps"``
            (``−logp``) or ``"mask"`` (1 per counted token).
        propagation_side: ``"left"`` (default): ``S_t = Σ_{s≥t} γ^(s−t) item_s``, later losses
            flow back to earlier positions; ``"right"``: ``S_t = Σ_{s≤t} γ^(t−s) item_s``, masked
            positions set to 1e6, then the batch's smallest non-zero ``S`` added to every entry.
        propagation_norm: ``"L1"`` (``S``; right side ``1/S``), ``"L2"`` (``S²``; ``1/S²``),
            ``"softmax"`` (``softmax(S)``; ``softmax(1/S)``) or ``"log"`` (``log(S+1)``;
            ``1/log(S+1)``), each row's softmax over its whole length.
        detach: compute the weights from ``token_logps.detach()`` (no gradient through them).

    Returns:
        ``[B, L]`` float32 (float64 for float64 input): 0 where masked, each row summing to its
        number of counted tokens ``N`` (rows that cannot be normalised get weight 1 per token).
    """
    gamma = check_propagation(gamma, propagation_type, propagation_side, propagation_norm)
    mask = _check_inputs(token_logps, mask)
    logp = token_logps.to(_compute_dtype(token_logps))
    if detach:
        logp = logp.detach()
    return _weights(logp, mask, gamma, propagation_type, propagation_side, propagation_norm)


def ift_loss(token_logps: Tensor, mask: Tensor, *, gamma: float = 0.95, propagation_type: str = "loss",
             propagation_side: str = "left", propagation_norm: str = "L1", detach_weights: bool = False,
             return_weights: bool = False):
    """IFT's propagated loss ``mean_b Σ_t (−logp_{b,t})·w_{b,t} / N_b`` (weights of :func:`ift_weights`).

    A per-sequence token mean, then a mean over the sequences that have at least one counted
    token (a batch with none gives 0 with zero gradients). With γ = 0 it is the per-sequence
    mean NLL, i.e. plain SFT; with the defaults it equals ``mean_b Σ_t S_t ℓ_t / Σ_t S_t``.

    Args: as :func:`ift_weights` (``detach_weights`` = its ``detach``; default False, as the
    published method: the gradient also flows through the weights).

    Returns:
        The 0-d loss (float32, float64 for float64 input), or ``(loss, weights [B, L])`` with
        ``return_weights``.
    """
    gamma = check_propagation(gamma, propagation_type, propagation_side, propagation_norm)
    mask = _check_inputs(token_logps, mask)
    logp = token_logps.to(_compute_dtype(token_logps))
    w = _weights(logp.detach() if detach_weights else logp, mask, gamma, propagation_type, propagation_side,
                 propagation_norm)
    nll = -torch.where(mask, logp, torch.zeros_like(logp))
    n = mask.sum(-1).to(logp.dtype)
    has = n > 0
    per_seq = (nll * w).sum(-1) / torch.where(has, n, torch.ones_like(n))
    rows = has.sum().to(logp.dtype)
    loss = torch.where(rows > 0, (per_seq * has).sum() / torch.where(rows > 0, rows, torch.ones_like(rows)),
                       per_seq.sum() * 0.0)
    return (loss, w) if return_weights else loss


def lambda_noise(seed: int, step: int) -> float:
    """The standard-normal draw that disturbs λ at optimizer step ``step`` (reproducible from ``seed``)."""
    g = torch.Generator().manual_seed((int(seed) * 1_000_003 + int(step)) % (2**63 - 1))
    return float(torch.randn((), generator=g))


def ift_lambda(step: int, *, lambda_min: float = 0.2, lambda_max: float = 0.2, schedule: Optional[str] = None,
               warmup_steps: int = 150, disturb: Optional[str] = None, disturb_std: float = 0.5,
               noise: Optional[float] = None, seed: int = 0) -> float:
    """λ at optimizer step ``step``.

    ``schedule=None``: ``lambda_max``; ``"linear"``: ``lambda_min + (lambda_max − lambda_min)·
    min(1, step / warmup_steps)``. ``disturb="normal"``: ``λ ← λ + n·disturb_std·λ`` with
    ``n ~ N(0, 1)`` (``noise`` if given, else :func:`lambda_noise(seed, step)`). Clamped to [0, 1].
    """
    if isinstance(step, bool) or not isinstance(step, int) or step < 0:
        raise ValueError(f"step must be an int >= 0, got {step!r}")
    lo, hi = _check_unit("lambda_min", lambda_min), _check_unit("lambda_max", lambda_max)
    _check_choice("schedule", schedule, LAMBDA_SCHEDULES)
    _check_choice("disturb", disturb, LAMBDA_DISTURBS)
    if schedule == "linear":
        if isinstance(warmup_steps, bool) or not isinstance(warmup_steps, int) or warmup_steps < 1:
            raise ValueError(f"warmup_steps must be an int >= 1, got {warmup_steps!r}")
        lam = lo + (hi - lo) * min(1.0, step / warmup_steps)
    else:
        lam = hi
    if disturb == "normal":
        if isinstance(disturb_std, bool) or not isinstance(disturb_std, Real) or not disturb_std >= 0:
            raise ValueError(f"disturb_std must be a number >= 0, got {disturb_std!r}")
        n = lambda_noise(seed, step) if noise is None else float(noise)
        lam = lam + n * float(disturb_std) * lam
    return min(1.0, max(0.0, lam))
