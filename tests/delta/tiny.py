"""Tiny random backbones for the delta tests (built fresh from a seed, so two calls give two
identical models)."""

import torch
from transformers import (BertConfig, BertModel, GPT2Config, GPT2LMHeadModel, LlamaConfig,
                          LlamaForCausalLM)

VOCAB = 101


def tiny_llama(seed, layers=2, hidden=48):
    torch.manual_seed(seed)
    cfg = LlamaConfig(vocab_size=VOCAB, hidden_size=hidden, intermediate_size=2 * hidden,
                      num_hidden_layers=layers, num_attention_heads=4, num_key_value_heads=2,
                      max_position_embeddings=64)
    return LlamaForCausalLM(cfg).eval()


def tiny_gpt2(seed):
    torch.manual_seed(seed)
    cfg = GPT2Config(vocab_size=VOCAB, n_embd=40, n_layer=2, n_head=4, n_positions=64,
                     bos_token_id=0, eos_token_id=0)
    return GPT2LMHeadModel(cfg).eval()


def tiny_bert(seed):
    torch.manual_seed(seed)
    cfg = BertConfig(vocab_size=VOCAB, hidden_size=40, num_hidden_layers=2, num_attention_heads=4,
                     intermediate_size=72, max_position_embeddings=64)
    return BertModel(cfg).eval()


def token_ids(batch=2, seq=11, generator=None):
    return torch.randint(0, VOCAB, (batch, seq), generator=generator)


@torch.no_grad()
def randomize_deltas(model, generator, std=0.2):
    """Give every delta parameter random values (they start as the identity)."""
    from lmfuse.delta import delta_parameters

    for p in delta_parameters(model):
        p.copy_(torch.randn(p.shape, generator=generator) * std)


def fresh_seed():
    """A seed drawn from the per-test random state (conftest reseeds it on every run)."""
    return int(torch.randint(0, 2**31 - 1, ()))
