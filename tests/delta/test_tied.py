"""freeze(extras=...) on models with tied input / output embeddings: the shared parameter is
addressed by either of its names."""

import pytest
import torch
from transformers import LlamaConfig, LlamaForCausalLM

from lmfuse import delta

from .tiny import VOCAB, fresh_seed


def tied_llama(seed):
    torch.manual_seed(seed)
    cfg = LlamaConfig(vocab_size=VOCAB, hidden_size=32, intermediate_size=64, num_hidden_layers=2,
                      num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=64,
                      tie_word_embeddings=True)
    return LlamaForCausalLM(cfg).eval()


@pytest.mark.parametrize("extra", ["lm_head", "lm_head.weight", "model.embed_tokens", "embed_tokens.weight",
                                   "re:.*lm_head.*"])
def test_tied_embedding_trains_under_either_name(extra):
    m = tied_llama(fresh_seed())
    assert m.lm_head.weight is m.model.embed_tokens.weight
    d = delta.attach(m, delta.LoRAConfig(r=2), generator=torch.Generator().manual_seed(fresh_seed()))
    counts = delta.freeze(m, extras=[extra])
    shared = m.lm_head.weight
    trainable = {n for n, p in m.named_parameters() if p.requires_grad}
    assert shared.requires_grad
    lora = {n for n, _ in m.named_parameters() if ".lora_" in n}
    assert len(lora) == 8  # A and B of q_proj, v_proj in 2 layers
    assert trainable == lora | {"model.embed_tokens.weight"}  # the tied head is listed once
    assert counts["trainable"] == shared.numel() + d.num_parameters()
    ids = torch.randint(0, VOCAB, (2, 7))
    m(input_ids=ids, labels=ids).loss.backward()
    assert shared.grad is not None and shared.grad.abs().sum() > 0
    assert m.model.layers[0].mlp.up_proj.weight.grad is None  # the backbone stays frozen


def test_untied_head_is_addressed_alone():
    torch.manual_seed(fresh_seed())
    cfg = LlamaConfig(vocab_size=VOCAB, hidden_size=32, intermediate_size=64, num_hidden_layers=2,
                      num_attention_heads=4, num_key_value_heads=2, tie_word_embeddings=False)
    m = LlamaForCausalLM(cfg)
    delta.freeze(m, extras=["lm_head"])
    assert m.lm_head.weight.requires_grad and not m.model.embed_tokens.weight.requires_grad
