"""Pruning SoRA layers to compact LoRA, and export as a standard PEFT LoRA adapter."""

from __future__ import annotations

import json
import os
from typing import Optional

import torch
from torch import nn

from ..modules.lora import LoRALinear


def lora_modules(model: nn.Module) -> dict[str, LoRALinear]:
    """Every :class:`LoRALinear` in ``model`` by qualified name (found by type, whatever attached it)."""
    return {name: m for name, m in model.named_modules() if isinstance(m, LoRALinear)}


def prune(model: nn.Module) -> dict[str, tuple[int, int]]:
    """Turn every gated (SoRA) :class:`LoRALinear` into a compact plain LoRA of its non-zero ranks
    (``A' = A[idx]``, ``B' = B[:, idx]·diag(g[idx])``): same outputs, fewer parameters.

    Returns ``{name: (rank before, rank after)}`` for the layers it pruned. Any optimizer
    holding the old parameters must be rebuilt afterwards (the tensors are new).
    """
    out = {}
    for name, m in lora_modules(model).items():
        if m.gate is None:
            continue
        before = m.r
        m.compact()
        out[name] = (before, m.r)
    return out


@torch.no_grad()
def _compact_factors(m: LoRALinear) -> tuple[torch.Tensor, torch.Tensor, int]:
    """(A', B', r') of one layer without modifying it (gates folded into B')."""
    if m.gate is None:
        return m.lora_A.detach(), m.lora_B.detach(), m.r
    idx = torch.nonzero(m.gate).flatten()
    if idx.numel() == 0:  # PEFT needs r ≥ 1: one rank with B' = 0 contributes nothing
        return m.lora_A[:1].detach(), torch.zeros_like(m.lora_B[:, :1]), 1
    return m.lora_A[idx].detach(), (m.lora_B[:, idx] * m.gate[idx]).detach(), int(idx.numel())


def _base_name(model: nn.Module, given: Optional[str]) -> Optional[str]:
    if given is not None:
        return given
    cfg = getattr(model, "config", None)
    return getattr(cfg, "_name_or_path", None) or getattr(cfg, "name_or_path", None) or None


def export_peft(model: nn.Module, save_directory: str, *, base_model_name_or_path: Optional[str] = None,
                task_type: Optional[str] = None) -> dict:
    """Write a standard PEFT LoRA adapter for every :class:`LoRALinear` of ``model``.

    Files: ``adapter_config.json`` and ``adapter_model.safetensors`` in ``save_directory``.
    Gated layers are exported compacted (the gate's non-zero ranks, gates folded into
    ``lora_B``), so each module has its own rank: ``rank_pattern`` and ``alpha_pattern`` carry
    it by full module name, with ``alpha = scaling·r'`` so PEFT's ``lora_alpha / r`` equals ours.
    The model itself is not modified. ``peft.PeftModel.from_pretrained(base, save_directory)``
    on the same base model then gives the same outputs. Merged layers are refused (unmerge first).

    Returns the config dict that was written.
    """
    from safetensors.torch import save_file

    mods = lora_modules(model)
    if not mods:
        raise ValueError("model has no LoRALinear layer to export")
    tensors, ranks, alphas, dropouts = {}, {}, {}, set()
    for name, m in mods.items():
        if m.merged:
            raise ValueError(f"{name} is merged into its base weight; unmerge() it before export_peft")
        a, b, r = _compact_factors(m)
        tensors[f"base_model.model.{name}.lora_A.weight"] = a.contiguous().clone()
        tensors[f"base_model.model.{name}.lora_B.weight"] = b.contiguous().clone()
        ranks[name], alphas[name] = r, m.scaling * r
        dropouts.add(m.dropout_p)
    # the most common rank and alpha are the defaults; every module is also listed explicitly
    default_r = max(set(ranks.values()), key=list(ranks.values()).count)
    config = {
        "peft_type": "LORA",
        "task_type": task_type,
        "base_model_name_or_path": _base_name(model, base_model_name_or_path),
        "r": default_r,
        "lora_alpha": alphas[next(n for n, r in ranks.items() if r == default_r)],
        "lora_dropout": max(dropouts),
        "target_modules": sorted(mods),
        "rank_pattern": ranks,
        "alpha_pattern": alphas,
        "bias": "none",
        "fan_in_fan_out": False,
        "use_rslora": False,
        "use_dora": False,
        "init_lora_weights": True,
        "inference_mode": True,
        "modules_to_save": None,
    }
    os.makedirs(save_directory, exist_ok=True)
    save_file(tensors, os.path.join(save_directory, "adapter_model.safetensors"), metadata={"format": "pt"})
    with open(os.path.join(save_directory, "adapter_config.json"), "w") as f:
        json.dump(config, f, indent=2, sort_keys=True)
    return config
