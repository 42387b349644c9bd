"""SoRA's gate optimisation: AdamW followed by a proximal (L1) step on the gates.

The L1 term ``ξ·‖g‖₁`` is not differentiable at zero, so SoRA minimises it with a proximal
gradient step: after the ordinary AdamW update of the gates, each gate goes through the
proximal operator of the L1 norm, the soft threshold

    g ← sign(g)·max(|g| − ξ, 0)

which shrinks every gate by ξ and sets those with |g| ≤ ξ to exactly zero. Exact zeros are what
lets :func:`lmfuse.sora.prune` drop ranks.

The original SoRA code applies three masks one after the other (``g > ξ → g − ξ``, then
``g < −ξ → g + ξ``, then ``|g| < ξ → 0``), each on the result of the previous one. A gate in
``(ξ, 2ξ)`` is first shrunk into ``(0, ξ)`` and then zeroed by the third mask, so the sequential
version zeroes every ``|g| < 2ξ`` (and shrinks the rest by ξ): it prunes harder than the
proximal operator it stands for. It is available as ``threshold="sequential"`` to reproduce
published numbers; the default is the true soft threshold.
"""

from __future__ import annotations

from typing import Optional

import torch
from torch import nn

from ..modules.lora import is_gate, mark_gate  # noqa: F401  (mark_gate is public here too)

THRESHOLDS = ("soft", "sequential")
XI_MODES = ("absolute", "lr_scaled")


@torch.no_grad()
def soft_threshold_(gate: torch.Tensor, xi: float) -> torch.Tensor:
    """In place ``gate ← sign(gate)·max(|gate| − xi, 0)`` (the proximal operator of ``xi·‖·‖₁``).

    ``xi ≥ 0``. Returns ``gate``.
    """
    _check_xi(xi)
    mag = (gate.abs() - xi).clamp_(min=0)
    return gate.copy_(torch.sign(gate) * mag)


@torch.no_grad()
def sequential_threshold_(gate: torch.Tensor, xi: float) -> torch.Tensor:
    """In place, the original SoRA code's three masks applied one after the other.

    Equivalent to zeroing ``|g| < 2·xi`` and shrinking the rest by ``xi`` (see the module
    docstring). Kept for reproduction only. Returns ``gate``.
    """
    _check_xi(xi)
    d = gate.data
    d[d > xi] -= xi
    d[d < -xi] += xi
    d[d.abs() < xi] = 0.0
    return gate


def _check_xi(xi) -> None:
    if isinstance(xi, bool) or not isinstance(xi, (int, float)) or not xi >= 0:
        raise ValueError(f"xi must be a non-negative number, got {xi!r}")


def _shape(p) -> list:
    return list(p.shape) if isinstance(p, torch.Tensor) else type(p).__name__


def _gate_groups(params, module: Optional[nn.Module]) -> list[dict]:
    """Parameter groups with a ``"gate"`` flag on each (see :class:`SparseGateOptimizer`)."""
    if module is not None:
        gates = [g for g in gate_parameters(module) if g.requires_grad]
        if not gates:
            raise ValueError(f"params: {type(module).__name__} has no trainable SoRA gate "
                             f"(no gated LoRALinear layer with requires_grad gates)")
        ids = {id(g) for g in gates}
        others = [p for p in module.parameters() if p.requires_grad and id(p) not in ids]
        return ([{"params": others, "gate": False}] if others else []) + [{"params": gates, "gate": True}]
    if not any(isinstance(g, dict) for g in params):
        groups = [{"params": list(params)}] if params else []  # a flat list of tensors: one group
    else:
        groups = []
        for g in params:
            if not isinstance(g, dict) or "params" not in g:
                raise TypeError(f"params: mix of parameter groups and {type(g).__name__}; pass only "
                                f"tensors or only dicts with a 'params' key")
            ps = g["params"]
            groups.append(dict(g, params=[ps] if isinstance(ps, torch.Tensor) else list(ps)))
    for g in groups:
        if "gate" in g and not isinstance(g["gate"], bool):
            raise TypeError(f"params: a group's 'gate' must be True or False, got {g['gate']!r}")
    unflagged = [g for g in groups if "gate" not in g]
    any_marked = any(is_gate(p) for g in unflagged for p in g["params"])
    out = []
    for g in groups:
        if "gate" in g:
            out.append(g)
        elif any_marked:
            # split by identity: the marked gates get the proximal step, the rest plain AdamW
            rest = {k: v for k, v in g.items() if k != "params"}
            others = [p for p in g["params"] if not is_gate(p)]
            gates = [p for p in g["params"] if is_gate(p)]
            out += [dict(rest, params=ps, gate=flag) for ps, flag in ((others, False), (gates, True)) if ps]
        else:
            # no LoRALinear gate anywhere: the tensors are taken as hand-made gates, which are
            # vectors; anything else is a model's weights passed by mistake
            for p in g["params"]:
                if not isinstance(p, torch.Tensor) or p.dim() != 1:
                    raise ValueError(
                        f"params: found no SoRA gate (gated LoRALinear) among the parameters, and a "
                        f"tensor of shape {_shape(p)} is not a gate vector [r]. Pass the model itself "
                        f"(SparseGateOptimizer(model, ...)), or parameter groups flagged "
                        f"{{'params': ..., 'gate': False}} for parameters that only need AdamW and "
                        f"{{'params': ..., 'gate': True}} for tensors to threshold")
            out.append(dict(g, gate=True))
    return out


class SparseGateOptimizer(torch.optim.AdamW):
    """AdamW whose gate parameter groups get a proximal L1 step after every update.

    Only SoRA gates are thresholded. Which parameters are gates:

    * ``params`` is a model (``nn.Module``): the gates of its gated
      :class:`~lmfuse.modules.LoRALinear` layers, found by identity (this includes the SoRA
      deltas of :mod:`lmfuse.delta`); every other trainable parameter gets plain AdamW.
    * ``params`` is an iterable of tensors or parameter groups, e.g. ``model.parameters()``: a
      group with ``"gate": True`` / ``False`` is thresholded / plain AdamW as flagged. In groups
      without the flag, LoRALinear gates (recognised by a mark they carry, see
      :func:`mark_gate`) are thresholded and all other tensors get plain AdamW. Without any
      LoRALinear gate among the unflagged tensors, they are taken as hand-made gates, which must
      then be vectors (a ``ValueError`` otherwise, so a model's weights are never shrunk).

    Args:
        params: a model, or tensors / parameter groups (see above).
        lr, betas, eps, weight_decay: as for :class:`torch.optim.AdamW` (``weight_decay``
            defaults to 0: the gates are regularised by the L1 step, not by decay).
        xi: the threshold ξ (per group, key ``"xi"``; a scheduler may change it).
        xi_mode: ``"absolute"`` — threshold by ξ; ``"lr_scaled"`` — by ``ξ·lr`` of the group
            (the textbook proximal-gradient step, so ξ is an L1 weight independent of the lr).
        threshold: ``"soft"`` (default, the true proximal operator) or ``"sequential"`` (the
            original code's three masks, which zero ``|g| < 2ξ``).
    """

    def __init__(self, params, lr: float = 1e-3, betas=(0.9, 0.999), eps: float = 1e-8,
                 weight_decay: float = 0.0, *, xi: float = 1e-4, xi_mode: str = "absolute",
                 threshold: str = "soft") -> None:
        _check_xi(xi)
        if xi_mode not in XI_MODES:
            raise ValueError(f"xi_mode must be one of {XI_MODES}, got {xi_mode!r}")
        if threshold not in THRESHOLDS:
            raise ValueError(f"threshold must be one of {THRESHOLDS}, got {threshold!r}")
        if isinstance(params, torch.Tensor):
            raise TypeError("params: expected a model or an iterable of tensors / parameter groups, "
                            "got a single tensor (wrap it in a list)")
        module = params if isinstance(params, nn.Module) else None
        groups = _gate_groups(() if module is not None else list(params), module)
        super().__init__(groups, lr=lr, betas=betas, eps=eps, weight_decay=weight_decay)
        for g in self.param_groups:
            g.setdefault("xi", xi)
            g.setdefault("xi_mode", xi_mode)
            g.setdefault("threshold", threshold)

    @property
    def xi(self) -> float:
        """ξ of the first gate group (all of them, when set)."""
        for g in self.param_groups:
            if g["gate"]:
                return g["xi"]
        raise RuntimeError("this optimizer has no gate parameter group")

    @xi.setter
    def xi(self, value: float) -> None:
        _check_xi(value)
        for g in self.param_groups:
            if g["gate"]:
                g["xi"] = float(value)

    def effective_xi(self, group: dict) -> float:
        return group["xi"] * group["lr"] if group["xi_mode"] == "lr_scaled" else group["xi"]

    @torch.no_grad()
    def step(self, closure=None):
        loss = super().step(closure)
        for group in self.param_groups:
            if not group["gate"]:
                continue
            xi = float(self.effective_xi(group))
            prox = soft_threshold_ if group["threshold"] == "soft" else sequential_threshold_
            for p in group["params"]:
                prox(p, xi)
        return loss


def gate_parameters(model: nn.Module) -> list[nn.Parameter]:
    """The gates of every gated :class:`~lmfuse.modules.LoRALinear` in ``model``."""
    from ..modules.lora import LoRALinear

    return [m.gate for m in model.modules() if isinstance(m, LoRALinear) and m.gate is not None]


def l1_penalty(model_or_gates, weight: float) -> torch.Tensor:
    """``weight · Σ |g|`` over the gates (of a model's gated LoRA layers, or a list of tensors).

    Differentiable; add it to the loss when training with a (sub)gradient L1 term instead of,
    or as well as, the proximal step.
    """
    gates = gate_parameters(model_or_gates) if isinstance(model_or_gates, nn.Module) else list(model_or_gates)
    if not gates:
        raise ValueError("no gates found: the model has no gated LoRALinear layer")
    return weight * sum(g.abs().sum() for g in gates)


@torch.no_grad()
def sparsity_stats(model: nn.Module) -> dict:
    """Gate sparsity of a model's gated LoRA layers.

    Returns ``{"gates": total ranks, "nonzero_gates": ranks whose gate is non-zero,
    "sparsity": fraction of zero gates, "nonzero_params": LoRA parameters left after pruning
    (``r'·(d_in + d_out)`` summed over layers), "params": the same before pruning}``.
    """
    from ..modules.lora import LoRALinear

    total = nonzero = params = kept = 0
    for m in model.modules():
        if not isinstance(m, LoRALinear) or m.gate is None:
            continue
        nz = int(torch.count_nonzero(m.gate))
        total += m.r
        nonzero += nz
        params += m.r * (m.in_features + m.out_features)
        kept += nz * (m.in_features + m.out_features)
    return {"gates": total, "nonzero_gates": nonzero, "sparsity": (1 - nonzero / total) if total else 0.0,
            "nonzero_params": kept, "params": params}
