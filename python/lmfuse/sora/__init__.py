"""SoRA: LoRA with a sparse per-rank gate, trained with a proximal L1 step, pruned to a compact
LoRA and exported to PEFT. See ``docs/sora.md``.

The layer is :class:`lmfuse.modules.LoRALinear` with ``gated=True``; everything here finds
layers by type, so it works whatever attached them (``lmfuse.delta`` or your own code).
"""

from ..modules.lora import LoRALinear
from .export import export_peft, lora_modules, prune
from .optim import (SparseGateOptimizer, gate_parameters, is_gate, l1_penalty, mark_gate,
                    sequential_threshold_, soft_threshold_, sparsity_stats)
from .schedule import SparsifyScheduler, xi_values


def __getattr__(name):  # the Trainer integration imports transformers: only when asked for
    if name == "SoRATrainer":
        from .trainer import SoRATrainer

        return SoRATrainer
    raise AttributeError(f"module 'lmfuse.sora' has no attribute {name!r}")


__all__ = [
    "LoRALinear", "SparseGateOptimizer", "soft_threshold_", "sequential_threshold_", "l1_penalty",
    "gate_parameters", "sparsity_stats", "SparsifyScheduler", "xi_values", "SoRATrainer", "prune",
    "export_peft", "lora_modules", "mark_gate", "is_gate",
]
