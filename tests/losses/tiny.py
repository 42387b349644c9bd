"""Tiny random causal LMs for the loss tests, one per way an architecture maps its last hidden
state to logits (tied / untied head, a head with a bias, a logit scale, a final-logit softcap)."""

import torch
from torch import nn
from transformers import (CohereConfig, CohereForCausalLM, Gemma2Config, Gemma2ForCausalLM, GPT2Config,
                          GPT2LMHeadModel, GraniteConfig, GraniteForCausalLM, LlamaConfig, LlamaForCausalLM)

VOCAB = 101


def _llama_kw(hidden=48, layers=2):
    return dict(vocab_size=VOCAB, hidden_size=hidden, intermediate_size=2 * hidden, num_hidden_layers=layers,
                num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=64)


def llama(seed, tied=False, layers=2):
    torch.manual_seed(seed)
    return sharpen(LlamaForCausalLM(LlamaConfig(tie_word_embeddings=tied, **_llama_kw(layers=layers))).eval())


def llama_with_head_bias(seed):
    """A Llama whose output projection has a bias (as some converted checkpoints do)."""
    m = llama(seed)
    head = nn.Linear(m.config.hidden_size, VOCAB, bias=True)
    with torch.no_grad():
        head.weight.copy_(m.lm_head.weight)
        head.bias.normal_(0.0, 0.5)
    m.lm_head = head
    return m


def gpt2(seed):
    torch.manual_seed(seed)
    cfg = GPT2Config(vocab_size=VOCAB, n_embd=40, n_layer=2, n_head=4, n_positions=64, bos_token_id=0, eos_token_id=0)
    return sharpen(GPT2LMHeadModel(cfg).eval())


def gemma2(seed, softcap=3.0):
    """Gemma 2 with a small final-logit softcap, so the cap really bends the logits."""
    torch.manual_seed(seed)
    cfg = Gemma2Config(vocab_size=VOCAB, hidden_size=48, intermediate_size=96, num_hidden_layers=2,
                       num_attention_heads=4, num_key_value_heads=2, head_dim=12, max_position_embeddings=64,
                       final_logit_softcapping=softcap, sliding_window=8)
    return sharpen(Gemma2ForCausalLM(cfg).eval())


def cohere(seed, logit_scale=2.5):
    torch.manual_seed(seed)
    cfg = CohereConfig(logit_scale=logit_scale, bos_token_id=1, eos_token_id=2, pad_token_id=0, **_llama_kw())
    return sharpen(CohereForCausalLM(cfg).eval())


def granite(seed, logits_scaling=0.4):
    torch.manual_seed(seed)
    cfg = GraniteConfig(logits_scaling=logits_scaling, **_llama_kw())
    return sharpen(GraniteForCausalLM(cfg).eval())


@torch.no_grad()
def sharpen(model, gain=30.0):
    """Scale the output head so the logits spread over several units (a fresh model's are near
    zero, where a softcap or a logit scale would hardly change the loss)."""
    model.get_output_embeddings().weight.mul_(gain)
    return model


BUILDERS = {
    "llama": llama,
    "llama-tied": lambda seed: llama(seed, tied=True),
    "llama-head-bias": llama_with_head_bias,
    "gpt2": gpt2,
    "gemma2-softcap": gemma2,
    "cohere-logit-scale": cohere,
    "granite-logits-scaling": granite,
}


def token_ids(batch=3, seq=11, generator=None):
    return torch.randint(0, VOCAB, (batch, seq), generator=generator)


def fresh_seed():
    return int(torch.randint(0, 2**31 - 1, ()))
