"""Benchmark: a whole small Llama with LoRA attached by ``lmfuse.delta`` vs ``peft``'s LoRA.

Model-level, so it measures what a user sees: the fused LoRA layers plus the wrapping overhead of
``lmfuse.delta``, against ``peft.get_peft_model`` on the same backbone and the same weights.
Forward (logits) and backward with gradients for the LoRA factors only (backbone frozen).

Providers:

``delta-lora``         ``lmfuse.delta.attach(model, LoRAConfig(r))`` on q/k/v/o (the target)
``peft-lora``          ``peft`` LoRA on the same modules (the baseline)
``delta-lora-merged``  after ``lmfuse.delta.merge(unwrap=True)``: the plain backbone (forward only)

Then every delta kind on SmolLM2-135M shapes (hidden 576, 9 heads / 3 key-value heads, FFN 1536;
30 layers at ``full`` scale, fewer below; vocabulary 49152 on CUDA, 1024 on CPU), forward and
backward with only the delta training, against PEFT where PEFT has the same method:

``kinds`` case    ``delta-lora`` (r=8, q/v) vs ``peft-lora``; ``delta-adapter`` (bottleneck 36),
                  ``delta-compacter``, ``delta-low-rank-adapter``, ``delta-bitfit`` (defaults)
``prefix`` case   ``delta-prefix`` (20 plain virtual tokens) vs ``peft-prefix`` (PEFT's default,
                  no projection); ``delta-prefix-mlp`` (reparameterised, hidden 512)
``soft-prompt``   ``delta-soft-prompt`` (20 tokens) vs ``peft-soft-prompt`` (prompt tuning)

Each case's ``note`` lists the trainable parameters of every provider (:func:`trainable_counts`,
checked against the built models in ``tests/delta/test_bench_delta.py``).

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


# ----------------------------------------------------------------------------------------------
# every delta kind on SmolLM2-135M shapes

SMOL = dict(hidden=576, ffn=1536, heads=9, kv_heads=3)
PREFIX_TOKENS = 20


def _kind_shapes(scale: str, device: torch.device) -> list[tuple[int, int, int, int]]:
    """(batch, seq, layers, vocab)."""
    if scale == "tiny":
        return [(1, 16, 1, 1024)]
    if device.type == "cuda":
        return [(8, 512, 30, 49152)] if scale == "quick" else [(8, 512, 30, 49152), (8, 1024, 30, 49152)]
    return [(2, 64, 4, 1024)] if scale == "quick" else [(4, 128, 30, 1024)]


def _smol(layers: int, vocab: int, device, dtype, seed: int = 0):
    from transformers import LlamaConfig, LlamaForCausalLM

    torch.manual_seed(seed)
    cfg = LlamaConfig(vocab_size=vocab, hidden_size=SMOL["hidden"], intermediate_size=SMOL["ffn"],
                      num_hidden_layers=layers, num_attention_heads=SMOL["heads"],
                      num_key_value_heads=SMOL["kv_heads"], max_position_embeddings=4096, tie_word_embeddings=True)
    return LlamaForCausalLM(cfg).to(device=device, dtype=dtype).eval()


def _delta_configs():
    from lmfuse import delta

    return {
        "delta-lora": delta.LoRAConfig(r=8),
        "delta-adapter": delta.AdapterConfig(bottleneck=36),
        "delta-compacter": delta.CompacterConfig(),
        "delta-low-rank-adapter": delta.LowRankAdapterConfig(),
        "delta-bitfit": delta.BitFitConfig(),
        "delta-prefix": delta.PrefixConfig(num_virtual_tokens=PREFIX_TOKENS, reparameterize=False),
        "delta-prefix-mlp": delta.PrefixConfig(num_virtual_tokens=PREFIX_TOKENS, hidden_size=512),
        "delta-soft-prompt": delta.SoftPromptConfig(n_tokens=PREFIX_TOKENS),
    }


def trainable_counts(layers: int) -> dict[str, int]:
    """Trainable parameters of each provider on the SmolLM2-shaped model with ``layers`` layers,
    from the formulas of ``docs/delta.md`` (the table of delta types)."""
    d, f, kv = SMOL["hidden"], SMOL["ffn"], SMOL["kv_heads"] * (SMOL["hidden"] // SMOL["heads"])
    lora = 8 * (d + d) + 8 * (d + kv)                       # q_proj and v_proj, r = 8
    k = max(4, -(-d // 64) * 4)                             # Compacter bottleneck (n = 4)
    bitfit = 5 * d + 2 * kv + 2 * f                         # q o down + 2 norms, k v, gate up
    prefix = PREFIX_TOKENS * layers * 2 * kv
    mlp = PREFIX_TOKENS * kv + kv * 512 + 512 + 512 * 2 * layers * kv + 2 * layers * kv
    return {"delta-lora": layers * lora, "peft-lora": layers * lora,
            "delta-adapter": layers * (2 * d * 36 + 36 + d),
            "delta-compacter": layers * (4 ** 3 + 2 * (d + k) + k + d),
            "delta-low-rank-adapter": layers * (2 * (d + d // 32) + d // 32 + d),
            "delta-bitfit": layers * bitfit,
            "delta-prefix": prefix, "peft-prefix": prefix, "delta-prefix-mlp": mlp,
            "delta-soft-prompt": PREFIX_TOKENS * d, "peft-soft-prompt": PREFIX_TOKENS * d}


def _delta_kind(name, layers, vocab, ids, device, dtype):
    from lmfuse import delta

    model = _smol(layers, vocab, device, dtype)
    d = delta.attach(model, _delta_configs()[name], generator=torch.Generator().manual_seed(1))
    with torch.no_grad():  # away from the identity, as after some training
        for p in d.parameters():
            p.add_(torch.randn(p.shape, generator=torch.Generator().manual_seed(2)).to(p) * 0.02)
    delta.freeze(model)
    return Workload(lambda: model(input_ids=ids).logits, grad_inputs=list(d.parameters()))


def _peft_kind(name, layers, vocab, ids, device, dtype):
    try:
        import peft
    except ImportError as e:
        raise ProviderUnavailable(f"peft is not installed: {e}") from None
    cfg = {"peft-lora": lambda: peft.LoraConfig(r=8, lora_alpha=16, target_modules=["q_proj", "v_proj"]),
           "peft-prefix": lambda: peft.PrefixTuningConfig(task_type="CAUSAL_LM", num_virtual_tokens=PREFIX_TOKENS),
           "peft-soft-prompt": lambda: peft.PromptTuningConfig(task_type="CAUSAL_LM",
                                                               num_virtual_tokens=PREFIX_TOKENS)}[name]()
    model = peft.get_peft_model(_smol(layers, vocab, device, dtype), cfg)
    params = [p for p in model.parameters() if p.requires_grad]
    return Workload(lambda: model(input_ids=ids).logits, grad_inputs=params)


KIND_CASES = {  # case name -> (providers, baseline, target)
    "kinds": (["delta-lora", "peft-lora", "delta-adapter", "delta-compacter", "delta-low-rank-adapter",
               "delta-bitfit"], "peft-lora", "delta-compacter"),
    "prefix": (["delta-prefix", "peft-prefix", "delta-prefix-mlp"], "peft-prefix", "delta-prefix"),
    "soft-prompt": (["delta-soft-prompt", "peft-soft-prompt"], "peft-soft-prompt", "delta-soft-prompt"),
}


def kind_cases(scale: str, device: torch.device) -> list[Case]:
    dtype = torch.bfloat16 if device.type == "cuda" else torch.float32
    out = []
    for b, s, layers, vocab in _kind_shapes(scale, device):
        ids = torch.randint(0, vocab, (b, s), device=device)
        counts = trainable_counts(layers)
        for case, (names, baseline, target) in KIND_CASES.items():
            provs = [Provider(n, (lambda n=n: (_peft_kind if n.startswith("peft") else _delta_kind)(
                n, layers, vocab, ids, device, dtype))) for n in names]
            note = ("SmolLM2-135M shapes, whole-model forward/backward, backbone frozen; trainable params: "
                    + ", ".join(f"{n}={counts[n]}" for n in names))
            out.append(Case(f"delta_{case.replace('-', '_')}", f"B={b},S={s},d=576,L={layers},V={vocab}", dtype,
                            device, provs, baseline=baseline, target=target, note=note))
    return out


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
            note="whole-model forward/backward, LoRA on q/k/v/o, backbone frozen", headline=True))
    return out + kind_cases(scale, device)
