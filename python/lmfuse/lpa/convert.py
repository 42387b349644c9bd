"""Model surgery: turn the attention projections of a Hugging Face model into LPA projections."""

from __future__ import annotations

from typing import Iterable

import torch
from torch import nn

from ..modules.low_rank_linear import LowRankLinear
from ..modules.lpa_qkv import FusedQKVGroup, QKVLowRankLinear

DEFAULT_TARGETS = ("q_proj", "k_proj", "v_proj", "o_proj")
_QKV = ("q_proj", "k_proj", "v_proj")


def convert_to_lpa(model: nn.Module, rank: int, targets: Iterable[str] = DEFAULT_TARGETS,
                   init: str = "random", fuse_qkv: bool = True) -> nn.Module:
    """Replace attention projections by low-rank ones, in place; returns ``model``.

    Args:
        model: any module tree; Llama-family HF models (Llama, Mistral, Qwen2, SmolLM2) are the
            tested case. Every ``nn.Linear`` child whose attribute name is in ``targets`` is
            replaced; the FFN and everything else are left dense.
        rank: the LPA rank ``r`` (≥ 1). Above ``min(d_out, d_in)`` the extra factor columns
            start at zero under ``init="svd"``.
        targets: attribute names to convert.
        init: ``"random"`` (pretraining from scratch, as LPA does; each factor initialised like
            an ``nn.Linear`` of its shape) or ``"svd"`` (truncated SVD of the dense weights; at
            full rank the converted model reproduces the original's outputs).
        fuse_qkv: when ``q_proj``, ``k_proj`` and ``v_proj`` of one module are all converted,
            they share one fused launch (:mod:`lmfuse.modules.lpa_qkv`) that reads the hidden
            states once.

    The replaced modules keep dtype and device; parameter names become
    ``<proj>.down_weight``, ``<proj>.up_weight``, ``<proj>.bias``. Also sets
    ``model.config.lpa = {"rank": ..., "targets": [...]}`` when the model has a config.
    """
    if not isinstance(rank, int) or rank < 1:
        raise ValueError(f"rank must be a positive int, got {rank!r}")
    if init not in ("random", "svd"):
        raise ValueError(f"init must be 'random' or 'svd', got {init!r}")
    targets = tuple(targets)
    if not targets:
        raise ValueError("targets is empty")
    converted = 0
    for parent in list(model.modules()):
        names = [t for t in targets if isinstance(getattr(parent, t, None), nn.Linear)]
        if not names:
            continue
        group = FusedQKVGroup() if fuse_qkv and all(n in names for n in _QKV) else None
        for name in names:
            linear = getattr(parent, name)
            if group is not None and name in _QKV:
                new = QKVLowRankLinear.from_linear(linear, rank, init, role=name[0], group=group)
            else:
                new = LowRankLinear.from_linear(linear, rank, init)
            setattr(parent, name, new)
            converted += 1
    if converted == 0:
        raise ValueError(f"no nn.Linear named any of {targets} was found in the model")
    cfg = getattr(model, "config", None)
    if cfg is not None:
        cfg.lpa = {"rank": rank, "targets": list(targets), "init": init}
    return model


def lpa_parameter_count(model: nn.Module) -> dict[str, int]:
    """Parameters in LPA projections vs the rest (for reports)."""
    lpa = sum(p.numel() for m in model.modules() if isinstance(m, LowRankLinear)
              for p in m.parameters(recurse=False))
    total = sum(p.numel() for p in model.parameters())
    return {"lpa": lpa, "other": total - lpa, "total": total}


@torch.no_grad()
def fused_qkv_calls(model: nn.Module) -> int:
    """How many fused q/k/v launches the model's groups have made (diagnostics)."""
    groups = {id(m._group): m._group for m in model.modules() if isinstance(m, QKVLowRankLinear)}
    return sum(g.fused_calls for g in groups.values())
