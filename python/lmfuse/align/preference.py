"""Preference-optimisation losses on per-sequence log-probs: the DPO family, KTO, ORPO, SimPO and
the Bradley–Terry loss of reward models.

Every function takes per-sequence **summed** completion log-probs (what
:func:`lmfuse.losses.sequence_log_probs` returns as ``logp_sum``; ORPO and SimPO take
token-averaged ones), never logits. The formulas follow TRL 1.16 (``DPOTrainer``,
``KTOTrainer``, ``CPOTrainer``, ``ORPOTrainer``, ``RewardTrainer``) term for term, so a loss here
averaged over the pairs equals the trainer's loss on the same log-probs; ``kto_pair`` follows
TRL ≤ 0.9, where it was last defined.

Notation (per pair i): ``r_c = π_c − ref_c``, ``r_r = π_r − ref_r`` (the log-ratios; the
reference terms are 0 when not given, the reference-free variants); ``s_c, s_r`` the
f-divergence scores of the log-ratios (``s = r`` for the default reverse KL);
``Δ = s_c − s_r``; ``β`` = ``beta``; ``ε`` = ``label_smoothing``.
"""

from __future__ import annotations

import math
from collections.abc import Sequence

import torch
import torch.nn.functional as F

__all__ = ["PREFERENCE_LOSS_TYPES", "F_DIVERGENCES", "preference_loss", "kto_loss", "orpo_loss", "simpo_loss",
           "bt_loss", "wpo_weights"]

#: Every ``loss_type`` :func:`preference_loss` accepts: TRL 1.16's DPO types, ``kto_pair`` of
#: TRL ≤ 0.9, and ``sft`` (TRL's auxiliary NLL of the chosen completions).
PREFERENCE_LOSS_TYPES = ("sigmoid", "hinge", "ipo", "exo_pair", "nca_pair", "robust", "bco_pair", "sppo_hard", "aot",
                         "aot_unpaired", "apo_zero", "apo_down", "discopop", "sigmoid_norm", "kto_pair", "sft")
F_DIVERGENCES = ("reverse_kl", "forward_kl", "js_divergence", "alpha_divergence")
_NEEDS_LENGTHS = ("ipo", "sigmoid_norm", "sft")
_REDUCTIONS = ("none", "mean", "sum")


def _vector(name: str, t, like: torch.Tensor | None = None) -> torch.Tensor:
    if not isinstance(t, torch.Tensor):
        raise TypeError(f"{name}: expected a floating-point tensor [B], got {type(t).__name__}")
    if not t.dtype.is_floating_point:
        raise TypeError(f"{name}: expected a floating-point tensor [B], got dtype {t.dtype}")
    if t.dim() != 1:
        raise ValueError(f"{name}: expected shape [B], got {tuple(t.shape)}")
    if like is not None and (t.shape != like.shape or t.device != like.device):
        raise ValueError(f"{name}: expected shape {tuple(like.shape)} on {like.device} (as the first argument), "
                         f"got {tuple(t.shape)} on {t.device}")
    return t


def _lengths(name: str, t, like: torch.Tensor) -> torch.Tensor:
    if not isinstance(t, torch.Tensor) or t.dim() != 1 or t.shape != like.shape:
        got = tuple(t.shape) if isinstance(t, torch.Tensor) else type(t).__name__
        raise ValueError(f"{name}: expected a tensor of shape {tuple(like.shape)} (completion token counts), got {got}")
    return t.to(device=like.device, dtype=like.dtype)


def _number(name: str, value, *, low=None, high=None, low_open=False, high_open=False) -> float:
    if isinstance(value, bool) or not isinstance(value, (int, float)) or not math.isfinite(value):
        raise ValueError(f"{name}: expected a finite number, got {value!r}")
    if low is not None and (value < low or (low_open and value == low)):
        raise ValueError(f"{name}: expected a value {'>' if low_open else '>='} {low}, got {value!r}")
    if high is not None and (value > high or (high_open and value == high)):
        raise ValueError(f"{name}: expected a value {'<' if high_open else '<='} {high}, got {value!r}")
    return float(value)


def _reduce(losses: torch.Tensor, reduction: str) -> torch.Tensor:
    if reduction not in _REDUCTIONS:
        raise ValueError(f"reduction: expected one of {_REDUCTIONS}, got {reduction!r}")
    return losses if reduction == "none" else losses.mean() if reduction == "mean" else losses.sum()


def _scores(logratios: torch.Tensor, f_divergence: str, f_alpha: float) -> torch.Tensor:
    """f'(π/ref) expressed through the log-ratio r (TRL 1.16's ``f_divergence_type``)."""
    if f_divergence == "reverse_kl":
        return logratios
    if f_divergence == "forward_kl":
        return 1 - torch.exp(-logratios)
    if f_divergence == "js_divergence":
        return math.log(2) + F.logsigmoid(logratios)
    if abs(f_alpha - 1.0) < 1e-6:  # the α → 1 limit is the reverse KL
        return logratios
    # (e^{(α−1) r} − 1) / (α − 1), the exponent clamped in fp32 as TRL does so it stays representable
    clamp_max = {torch.float16: 11.0}.get(logratios.dtype, 80.0)
    t = (f_alpha - 1.0) * logratios
    t = torch.clamp(t.float() if t.dtype in (torch.float16, torch.bfloat16) else t, max=clamp_max)
    return (torch.exp(t) - 1.0).to(logratios.dtype) / (f_alpha - 1.0)


def _smoothed_sigmoid(z: torch.Tensor, eps: float) -> torch.Tensor:
    return -F.logsigmoid(z) * (1 - eps) - F.logsigmoid(-z) * eps


def _one_type(t: str, *, pc, pr, rc, rr, sc, sr, beta, eps, nc, nr, tau) -> torch.Tensor:
    lc, lr = pc - rc, pr - rr  # log-ratios
    delta = sc - sr
    if t == "sigmoid":  # TRL 1.x ignores label_smoothing here (the smoothed form is "robust")
        return -F.logsigmoid(beta * delta)
    if t == "hinge":
        return torch.relu(1 - beta * delta)
    if t == "ipo":
        return (sc / nc.clamp(min=1.0) - sr / nr.clamp(min=1.0) - 1 / (2 * beta)) ** 2
    if t == "exo_pair":
        z = beta * delta
        return (torch.sigmoid(z) * (F.logsigmoid(z) - math.log1p(-eps))
                + torch.sigmoid(-z) * (F.logsigmoid(-z) - math.log(eps)))
    if t == "nca_pair":
        return -F.logsigmoid(beta * lc) - 0.5 * F.logsigmoid(-beta * lc) - 0.5 * F.logsigmoid(-beta * lr)
    if t == "robust":
        return (-(1 - eps) * F.logsigmoid(beta * delta) + eps * F.logsigmoid(-beta * delta)) / (1 - 2 * eps)
    if t == "bco_pair":
        return -F.logsigmoid(beta * lc) - F.logsigmoid(-beta * lr)
    if t == "sppo_hard":
        return (lc - 0.5 / beta) ** 2 + (lr + 0.5 / beta) ** 2
    if t == "aot":  # sorted over the batch: couples the pairs of one batch
        d = torch.sort(pc - pr, dim=0).values - torch.sort(rc - rr, dim=0).values
        return _smoothed_sigmoid(beta * d, eps)
    if t == "aot_unpaired":
        d = torch.sort(lc, dim=0).values - torch.sort(lr, dim=0).values
        return _smoothed_sigmoid(beta * d, eps)
    if t == "apo_zero":
        return (1 - torch.sigmoid(beta * lc)) + torch.sigmoid(beta * lr)
    if t == "apo_down":
        return torch.sigmoid(beta * lc) + (1 - torch.sigmoid(beta * (lc - lr)))
    if t == "discopop":
        z = beta * delta
        m = torch.sigmoid(z / tau)
        return -F.logsigmoid(z) * (1 - m) + torch.exp(-z) * m
    if t == "sigmoid_norm":
        return -F.logsigmoid(beta * (sc / nc.clamp(min=1.0) - sr / nr.clamp(min=1.0)))
    if t == "kto_pair":
        # TRL ≤ 0.9: 2B terms 1 − σ(β(r_c − z_r)) and 1 − σ(β(z_c − r_r)) with the batch-mean KL
        # estimates z = clamp(mean(r), 0) (not detached), averaged; here the two terms of a pair
        # are averaged, so the mean over pairs equals the mean over the 2B terms.
        zc, zr = lc.mean().clamp(min=0), lr.mean().clamp(min=0)
        return 0.5 * ((1 - torch.sigmoid(beta * (lc - zr))) + (1 - torch.sigmoid(beta * (zc - lr))))
    if t == "sft":  # the token-mean NLL of the chosen completions over the batch, repeated per pair
        return (-pc.sum() / nc.sum().clamp(min=1.0)).expand_as(pc)
    raise AssertionError(t)


def preference_loss(policy_chosen_logps: torch.Tensor, policy_rejected_logps: torch.Tensor,
                    ref_chosen_logps: torch.Tensor | None = None, ref_rejected_logps: torch.Tensor | None = None, *,
                    loss_type: str | Sequence[str] = "sigmoid", beta: float = 0.1, label_smoothing: float = 0.0,
                    loss_weights: Sequence[float] | None = None, chosen_lengths: torch.Tensor | None = None,
                    rejected_lengths: torch.Tensor | None = None, discopop_tau: float = 0.05,
                    f_divergence: str = "reverse_kl", f_alpha: float = 0.5, pair_weights: torch.Tensor | None = None,
                    reduction: str = "none"):
    """The DPO-family loss of each preference pair.

    Inputs, all ``[B]`` floating point on one device: the policy's summed completion log-probs
    of the chosen and rejected answers, and the reference model's (``None`` = 0, the
    reference-free variant; give both or neither). ``chosen_lengths`` / ``rejected_lengths``
    ``[B]``: completion token counts, needed by ``ipo``, ``sigmoid_norm`` (length-normalised
    scores) and ``sft`` (token mean).

    ``loss_type``: one name of :data:`PREFERENCE_LOSS_TYPES` or a list; a list is summed with
    ``loss_weights`` (default 1 each), as TRL does. ``label_smoothing`` ε is used by
    ``exo_pair`` (needs 0 < ε < 1), ``robust`` (0 ≤ ε < 0.5), ``aot`` / ``aot_unpaired``; ``sigmoid``
    ignores it (TRL 1.x). ``discopop_tau``: DiscoPOP's temperature. ``f_divergence`` (one of
    :data:`F_DIVERGENCES`) / ``f_alpha``: the score transform of the log-ratios used by the
    types written with Δ (TRL's ``f_divergence_type``). ``pair_weights [B]``: a multiplier of each
    pair's loss, detached (WPO's ``w_c · w_r``, see :func:`wpo_weights`); not allowed with ``aot`` /
    ``aot_unpaired``, which sort the pairs.

    Batch-coupled types: ``aot`` / ``aot_unpaired`` sort the log-ratios over the batch,
    ``kto_pair`` uses batch means, ``sft`` is one batch mean; their per-pair values depend on the
    whole batch, as in TRL.

    Returns ``(losses, chosen_rewards, rejected_rewards)``: ``losses`` ``[B]`` (or a scalar for
    ``reduction`` "mean" / "sum"; the mean equals TRL's loss), the rewards ``β·r_c``, ``β·r_r``
    ``[B]`` detached, in the dtype of the inputs.
    """
    pc = _vector("policy_chosen_logps", policy_chosen_logps)
    pr = _vector("policy_rejected_logps", policy_rejected_logps, pc)
    if (ref_chosen_logps is None) != (ref_rejected_logps is None):
        raise ValueError("ref_chosen_logps / ref_rejected_logps: give both or neither (neither = reference-free)")
    if ref_chosen_logps is None:
        rc = rr = torch.zeros_like(pc)
    else:
        rc = _vector("ref_chosen_logps", ref_chosen_logps, pc)
        rr = _vector("ref_rejected_logps", ref_rejected_logps, pc)
    types = [loss_type] if isinstance(loss_type, str) else list(loss_type)
    if not types or any(t not in PREFERENCE_LOSS_TYPES for t in types):
        raise ValueError(f"loss_type: expected one of {PREFERENCE_LOSS_TYPES} or a non-empty list of them, "
                         f"got {loss_type!r}")
    if loss_weights is None:
        weights = [1.0] * len(types)
    else:
        weights = [_number("loss_weights", w) for w in loss_weights]
        if len(weights) != len(types):
            raise ValueError(f"loss_weights: expected {len(types)} weights (one per loss type), got {len(weights)}")
    beta = _number("beta", beta, low=0.0, low_open=True)
    eps = _number("label_smoothing", label_smoothing, low=0.0, high=1.0, high_open=True)
    if "exo_pair" in types and not 0 < eps < 1:
        raise ValueError(f"label_smoothing: exo_pair needs 0 < label_smoothing < 1 (e.g. 1e-3), got {eps!r}")
    if "robust" in types and eps >= 0.5:
        raise ValueError(f"label_smoothing: robust needs 0 <= label_smoothing < 0.5, got {eps!r}")
    tau = _number("discopop_tau", discopop_tau, low=0.0, low_open=True)
    if f_divergence not in F_DIVERGENCES:
        raise ValueError(f"f_divergence: expected one of {F_DIVERGENCES}, got {f_divergence!r}")
    f_alpha = _number("f_alpha", f_alpha)
    nc = nr = None
    if any(t in _NEEDS_LENGTHS for t in types):
        if chosen_lengths is None or rejected_lengths is None:
            raise ValueError(f"chosen_lengths / rejected_lengths: loss types {[t for t in types if t in _NEEDS_LENGTHS]} "
                             "need the completion token counts")
        nc = _lengths("chosen_lengths", chosen_lengths, pc)
        nr = _lengths("rejected_lengths", rejected_lengths, pc)
    sc, sr = _scores(pc - rc, f_divergence, f_alpha), _scores(pr - rr, f_divergence, f_alpha)
    if pair_weights is not None:
        sorting = [t for t in types if t in ("aot", "aot_unpaired")]
        if sorting:
            raise ValueError(f"pair_weights: not defined for {sorting}, which sort the pairs over the batch")
        pair_weights = _vector("pair_weights", pair_weights, pc).detach()
    losses = 0
    for t, w in zip(types, weights):
        losses = losses + w * _one_type(t, pc=pc, pr=pr, rc=rc, rr=rr, sc=sc, sr=sr, beta=beta, eps=eps,
                                        nc=nc, nr=nr, tau=tau)
    if pair_weights is not None:
        losses = losses * pair_weights
    chosen_rewards = (beta * (pc - rc)).detach()
    rejected_rewards = (beta * (pr - rr)).detach()
    return _reduce(losses, reduction), chosen_rewards, rejected_rewards


def wpo_weights(chosen_logp_sum: torch.Tensor, chosen_log_sum_sq: torch.Tensor, chosen_lengths: torch.Tensor,
                rejected_logp_sum: torch.Tensor, rejected_log_sum_sq: torch.Tensor,
                rejected_lengths: torch.Tensor) -> torch.Tensor:
    """WPO's pair weights (TRL 1.16's ``use_weighting``), detached, ``[B]``.

    Each answer's weight is ``exp(mean_t (log p(y_t) − log Σ_v p_v²))`` over its completion
    tokens: its length-normalised probability under the policy, aligned by each position's
    ``Σ p²`` (the probability the policy would give its own sample there); the pair's weight is
    the product of the two. Inputs ``[B]``: the summed log-probs, the summed ``log Σ p²`` (from
    :func:`lmfuse.losses.sequence_log_probs` with ``return_log_sum_sq=True``) and the token counts
    (an empty answer counts as one token).
    """
    def one(logp, lss, n, name):
        logp = _vector(f"{name}_logp_sum", logp)
        lss = _vector(f"{name}_log_sum_sq", lss, logp)
        n = _lengths(f"{name}_lengths", n, logp)
        return torch.exp((logp.detach() - lss.detach()) / n.clamp(min=1))

    return one(chosen_logp_sum, chosen_log_sum_sq, chosen_lengths, "chosen") * \
        one(rejected_logp_sum, rejected_log_sum_sq, rejected_lengths, "rejected")


def kto_loss(policy_logps: torch.Tensor, ref_logps: torch.Tensor | None, desirable: torch.Tensor,
             kl: torch.Tensor | float | None = None, *, beta: float = 0.1, desirable_weight: float = 1.0,
             undesirable_weight: float = 1.0, loss_type: str = "kto", reduction: str = "none"):
    """The KTO loss of unpaired completions (TRL 1.16 ``KTOTrainer``).

    ``policy_logps`` / ``ref_logps`` ``[N]``: summed completion log-probs (``ref_logps=None`` =
    0); ``desirable [N]`` bool: whether each completion is a desirable one. ``kl``: the reference
    point z₀, a number or 0-d tensor (TRL: the batch mean of ``π − ref`` on mismatched
    prompt/completion pairs, clamped at 0 and detached; it is detached here too); ``None`` = 0.

    ``loss_type="kto"``: desirable ``λ_D·(1 − σ(β(r − z₀)))``, undesirable
    ``λ_U·(1 − σ(β(z₀ − r)))``; ``"apo_zero_unpaired"``: ``λ_D·(1 − σ(βr))`` / ``λ_U·σ(βr)``.
    Returns ``(losses [N], rewards [N] = β·r detached)``; TRL's loss is ``losses.nanmean()``
    (``reduction="mean"``).
    """
    p = _vector("policy_logps", policy_logps)
    r = p - (_vector("ref_logps", ref_logps, p) if ref_logps is not None else 0)
    if not isinstance(desirable, torch.Tensor) or desirable.shape != p.shape or desirable.dtype != torch.bool:
        got = (tuple(desirable.shape), desirable.dtype) if isinstance(desirable, torch.Tensor) else type(desirable).__name__
        raise ValueError(f"desirable: expected a bool tensor of shape {tuple(p.shape)}, got {got}")
    if loss_type not in ("kto", "apo_zero_unpaired"):
        raise ValueError(f"loss_type: expected 'kto' or 'apo_zero_unpaired', got {loss_type!r}")
    beta = _number("beta", beta, low=0.0, low_open=True)
    wd = _number("desirable_weight", desirable_weight, low=0.0)
    wu = _number("undesirable_weight", undesirable_weight, low=0.0)
    z0 = torch.as_tensor(0.0 if kl is None else kl, dtype=p.dtype, device=p.device).detach()
    if z0.dim() != 0:
        raise ValueError(f"kl: expected a number or a 0-d tensor, got shape {tuple(z0.shape)}")
    if loss_type == "kto":
        good, bad = 1 - torch.sigmoid(beta * (r - z0)), 1 - torch.sigmoid(beta * (z0 - r))
    else:
        good, bad = 1 - torch.sigmoid(beta * r), torch.sigmoid(beta * r)
    losses = torch.where(desirable, wd * good, wu * bad)
    if reduction == "mean":
        return losses.nanmean(), (beta * r).detach()
    return _reduce(losses, reduction), (beta * r).detach()


def _log1mexp(x: torch.Tensor) -> torch.Tensor:
    """log(1 − e^x) for x < 0, accurate at both ends."""
    return torch.where(x > -math.log(2), torch.log(-torch.expm1(x)), torch.log1p(-torch.exp(x)))


def orpo_loss(chosen_avg_logps: torch.Tensor, rejected_avg_logps: torch.Tensor,
              chosen_nll: torch.Tensor | None = None, *, beta: float = 0.1, reduction: str = "none"):
    """The ORPO loss (TRL 1.16 ``ORPOTrainer``), reference-free.

    ``chosen_avg_logps`` / ``rejected_avg_logps`` ``[B]``: token-**averaged** completion log-probs
    (all < 0). log-odds = ``(p̄_c − p̄_r) − (log(1 − e^{p̄_c}) − log(1 − e^{p̄_r}))``; per pair
    ``NLL_c − β·logσ(log-odds)`` with ``chosen_nll [B]`` the chosen answers' NLL term (None = 0;
    TRL uses the batch's token-mean cross-entropy, the same for every pair).
    Returns ``(losses, chosen_rewards = β·p̄_c, rejected_rewards = β·p̄_r)`` (rewards detached).
    """
    pc = _vector("chosen_avg_logps", chosen_avg_logps)
    pr = _vector("rejected_avg_logps", rejected_avg_logps, pc)
    beta = _number("beta", beta, low=0.0, low_open=True)
    pcf, prf = pc.float() if pc.dtype != torch.float64 else pc, pr.float() if pr.dtype != torch.float64 else pr
    log_odds = (pcf - prf) - (_log1mexp(pcf) - _log1mexp(prf))
    losses = -beta * F.logsigmoid(log_odds)
    if chosen_nll is not None:
        losses = losses + (chosen_nll if isinstance(chosen_nll, torch.Tensor) else torch.tensor(float(chosen_nll)))
    return _reduce(losses, reduction), (beta * pcf).detach(), (beta * prf).detach()


def simpo_loss(chosen_avg_logps: torch.Tensor, rejected_avg_logps: torch.Tensor, *, beta: float = 2.0,
               gamma: float = 0.5, label_smoothing: float = 0.0, chosen_nll: torch.Tensor | None = None,
               cpo_alpha: float = 0.0, reduction: str = "none"):
    """The SimPO loss (TRL 1.16 ``CPOTrainer`` with ``loss_type="simpo"``), reference-free.

    ``chosen_avg_logps`` / ``rejected_avg_logps`` ``[B]``: token-averaged completion log-probs.
    ``z = β(p̄_c − p̄_r) − γ``; per pair ``−(1−ε)·logσ(z) − ε·logσ(−z)``, plus
    ``cpo_alpha · chosen_nll`` (CPO's behaviour-cloning term; pure SimPO: ``cpo_alpha=0``).
    ``gamma`` is the target reward margin (TRL's ``simpo_gamma``). Returns
    ``(losses, β·p̄_c, β·p̄_r)`` (rewards detached).
    """
    pc = _vector("chosen_avg_logps", chosen_avg_logps)
    pr = _vector("rejected_avg_logps", rejected_avg_logps, pc)
    beta = _number("beta", beta, low=0.0, low_open=True)
    gamma = _number("gamma", gamma)
    eps = _number("label_smoothing", label_smoothing, low=0.0, high=0.5, high_open=True)
    cpo_alpha = _number("cpo_alpha", cpo_alpha, low=0.0)
    losses = _smoothed_sigmoid(beta * ((pc - pr) - gamma / beta), eps)
    if cpo_alpha:
        if chosen_nll is None:
            raise ValueError("chosen_nll: cpo_alpha > 0 needs the chosen answers' NLL")
        losses = losses + cpo_alpha * chosen_nll
    return _reduce(losses, reduction), (beta * pc).detach(), (beta * pr).detach()


def bt_loss(chosen_rewards: torch.Tensor, rejected_rewards: torch.Tensor, margin: torch.Tensor | None = None, *,
            center_rewards_coefficient: float | None = None, reduction: str = "mean") -> torch.Tensor:
    """The Bradley–Terry loss of a reward model (TRL 1.16 ``RewardTrainer``).

    ``chosen_rewards`` / ``rejected_rewards`` ``[B]``: the scalar rewards of each pair; ``margin``
    ``[B]`` or None. Per pair ``−logσ(r_c − r_r − margin)``, plus
    ``center_rewards_coefficient · (r_c + r_r)²`` when given (TRL adds the coefficient times the
    mean of ``(r_c + r_r)²``, so the mean here equals TRL's loss). Returns a scalar for
    ``reduction="mean"`` (default) or ``"sum"``, ``[B]`` for ``"none"``.
    """
    rc = _vector("chosen_rewards", chosen_rewards)
    rr = _vector("rejected_rewards", rejected_rewards, rc)
    diff = rc - rr
    if margin is not None:
        diff = diff - _vector("margin", margin, rc)
    losses = -F.logsigmoid(diff)
    if center_rewards_coefficient is not None:
        coef = _number("center_rewards_coefficient", center_rewards_coefficient, low=0.0)
        losses = losses + coef * (rc + rr) ** 2
    return _reduce(losses, reduction)
