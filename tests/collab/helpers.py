"""Tiny random Llama models for the generation tests (float64 so argmax ties between a cached,
batched forward and HF's own generate are practically impossible)."""

import torch
from transformers import LlamaConfig, LlamaForCausalLM

VOCAB = 97


def tiny_llama(layers: int = 4, seed: int = 0, vocab: int = VOCAB) -> LlamaForCausalLM:
    g = torch.random.fork_rng()
    with g:
        torch.manual_seed(seed)
        # A large init range makes every layer matter, so a truncated draft really disagrees.
        cfg = LlamaConfig(vocab_size=vocab, hidden_size=64, intermediate_size=96, num_hidden_layers=layers,
                          num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=512,
                          initializer_range=0.3, bos_token_id=1, eos_token_id=2, pad_token_id=0)
        model = LlamaForCausalLM(cfg).double().eval()
    model.generation_config.eos_token_id = None  # tests pass the EOS they want explicitly
    return model


def ragged_prompts(lengths, gen: torch.Generator, vocab: int = VOCAB, pad: int = 0):
    """Left-padded random prompts of the given lengths (tokens avoid 0..2: pad/bos/eos)."""
    P = max(lengths)
    ids = torch.full((len(lengths), P), pad, dtype=torch.long)
    mask = torch.zeros(len(lengths), P, dtype=torch.long)
    for b, n in enumerate(lengths):
        ids[b, P - n:] = torch.randint(3, vocab, (n,), generator=gen)
        mask[b, P - n:] = 1
    return ids, mask


def hf_greedy(model, ids, mask, max_new_tokens, eos=None, pad=0):
    """HF's own greedy generate, padded to P + max_new_tokens with ``pad``."""
    out = model.generate(input_ids=ids, attention_mask=mask, max_new_tokens=max_new_tokens, do_sample=False,
                         pad_token_id=pad, eos_token_id=eos)
    full = torch.full((ids.shape[0], ids.shape[1] + max_new_tokens), pad, dtype=torch.long)
    full[:, :out.shape[1]] = out
    return full
