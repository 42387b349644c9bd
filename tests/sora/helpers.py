"""Local helpers for the SoRA tests: a tiny random Llama and a minimal LoRALinear attacher
(the real one is lmfuse.delta; lmfuse.sora finds layers by type, so either works)."""

import torch
from torch import nn

from lmfuse.modules import LoRALinear

TARGETS = ("q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj")


def tiny_llama(seed: int, vocab: int = 48):
    from transformers import LlamaConfig, LlamaForCausalLM

    cfg = LlamaConfig(vocab_size=vocab, hidden_size=40, intermediate_size=72, num_hidden_layers=2,
                      num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=64,
                      attention_bias=True)  # biases exercise the base layer's bias path
    torch.manual_seed(seed)
    return LlamaForCausalLM(cfg).eval()


def attach(model: nn.Module, r: int, gated: bool, targets=TARGETS, lora_alpha: float = 16.0,
           dropout: float = 0.0, generator=None) -> list[str]:
    """Wrap every nn.Linear whose name ends with a target; freeze everything else."""
    for p in model.parameters():
        p.requires_grad_(False)
    names = [n for n, m in model.named_modules() if isinstance(m, nn.Linear) and n.split(".")[-1] in targets]
    for n in names:
        parent_name, _, child = n.rpartition(".")
        parent = model.get_submodule(parent_name)
        setattr(parent, child, LoRALinear(getattr(parent, child), r, lora_alpha, dropout, gated, generator=generator))
    return names


@torch.no_grad()
def randomize_lora(model: nn.Module, gen: torch.Generator, zero_frac: float = 0.4) -> None:
    """Non-zero B (a fresh layer has B = 0) and some gates exactly zero."""
    for m in model.modules():
        if isinstance(m, LoRALinear):
            m.lora_B.copy_(torch.randn(m.lora_B.shape, generator=gen) * 0.3)
            if m.gate is not None:
                m.gate[torch.rand(m.r, generator=gen) < zero_frac] = 0.0
