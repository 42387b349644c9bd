"""Benchmark: a whole small Llama with LoRA attached by ``lmfuse.delta`` vs ``peft``'s LoRA.

Model-level, so it measures what a user sees: the fused LoRA layers plus the wrapping overhead of
``lmfuse.delta``, against ``peft.get_peft_model`` on the same backbone and the same weights.
Forward (logits) and backward with gradients for the LoRA factors only (backbone frozen).

Providers:

``delta-lora``         ``lmfuse.delta.attach(model, LoRAConfig(r))`` on q/k/v/o (the target)
``peft-lora``          ``peft`` LoRA on the same modules (the baseline)
``delta-lora-merged``  after ``lmfuse.delta.merge(unwrap=True)``: the plain backbone (forward only)

The layer-level kernel benchmark is ``bench_gated_lora``. No flop/byte formula here: a whole
model's roofline is not the point of this comparison, only the relative time.
"""

from __future__ import annotations

import torch

from lmfuse.bench import Case, Provider, ProviderUnavailable, Workload

OP = "delta_lora_model"
TARGETS = ("q_proj", "k_proj", "v_proj", "o_proj")


def _shapes(scale: str, device: torch.device) -> list[tuple[int, int, int, int]]:
    """(batch×seq tokens as (batch, seq), hidden, layers, r)."""
    if scale == "tiny":
        return [(2, 32, 64, 1, 4)]
    if device.type == "cuda":
        return [(8, 1024, 2048, 4, 16)] if scale == "quick" else [(8, 1024, 2048, 4, r) for r in (8, 16, 64)]
    if scale == "quick":
        return [(4, 128, 256, 2, 8)]
    return [(4, 256, 512, 4, r) for r in (8, 64)]


def _backbone(hidden: int, layers: int, device, dtype, seed: int = 0):
    from transformers import LlamaConfig, LlamaForCausalLM

    torch.manual_seed(seed)
    cfg = LlamaConfig(vocab_size=1024, hidden_size=hidden, intermediate_size=2 * hidden, num_hidden_layers=layers,
                      num_attention_heads=max(1, hidden // 64), num_key_value_heads=max(1, hidden // 64),
                      max_position_embeddings=4096)
    return LlamaForCausalLM(cfg).to(device=device, dtype=dtype).eval()


def _delta(hidden, layers, r, ids, device, dtype, merged=False):
    from lmfuse import delta

    model = _backbone(hidden, layers, device, dtype)
    delta.attach(model, delta.LoRAConfig(r=r, targets=TARGETS), generator=torch.Generator().manual_seed(1))
    with torch.no_grad():
        for p in delta.delta_parameters(model):
            p.normal_(0, 0.02)
    delta.freeze(model)
    if merged:
        delta.merge(model, unwrap=True)
        return Workload(lambda: model(input_ids=ids).logits)
    params = list(delta.delta_parameters(model))
    return Workload(lambda: model(input_ids=ids).logits, grad_inputs=params)


def _peft(hidden, layers, r, ids, device, dtype):
    try:
        import peft
    except ImportError as e:
        raise ProviderUnavailable(f"peft is not installed: {e}") from None
    model = peft.get_peft_model(_backbone(hidden, layers, device, dtype),
                                peft.LoraConfig(r=r, lora_alpha=16, target_modules=list(TARGETS), lora_dropout=0.0))
    params = [p for p in model.parameters() if p.requires_grad]
    with torch.no_grad():
        for p in params:
            p.normal_(0, 0.02)
    return Workload(lambda: model(input_ids=ids).logits, grad_inputs=params)


def cases(scale: str, device: torch.device) -> list[Case]:
    dtype = torch.bfloat16 if device.type == "cuda" else torch.float32
    out = []
    for b, s, hidden, layers, r in _shapes(scale, device):
        ids = torch.randint(0, 1024, (b, s), device=device, generator=None)
        args = (hidden, layers, r, ids, device, dtype)
        out.append(Case(OP, f"B={b},S={s},d={hidden},L={layers},r={r}", dtype, device, [
            Provider("delta-lora", lambda a=args: _delta(*a)),
            Provider("peft-lora", lambda a=args: _peft(*a)),
            Provider("delta-lora-merged", lambda a=args: _delta(*a, merged=True)),
        ], baseline="peft-lora", target="delta-lora",
            note="whole-model forward/backward, LoRA on q/k/v/o, backbone frozen"))
    return out
