"""A soft prompt with ``model.generate()``: the prompt stays in the KV cache and the caller's
positions and attention mask are shifted past it, so greedy ``generate`` with the cache gives
exactly the tokens of greedy step-by-step decoding without one (the prompt prepended each time)."""

import pytest
import torch

from lmfuse import delta

from transformers import LlamaConfig, LlamaForCausalLM

from .tiny import VOCAB, fresh_seed


def _model(n_tokens):
    seed = fresh_seed()
    torch.manual_seed(seed)
    # a large init range so attention is far from uniform: a position off by one changes tokens
    cfg = LlamaConfig(vocab_size=VOCAB, hidden_size=48, intermediate_size=96, num_hidden_layers=2,
                      num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=64,
                      initializer_range=0.3)
    m = LlamaForCausalLM(cfg).double().eval()
    delta.attach(m, delta.SoftPromptConfig(n_tokens=n_tokens, init="random"), "prompt",
                 torch.Generator().manual_seed(seed))
    m.generation_config.eos_token_id = None
    return m


@torch.no_grad()
def step_by_step(model, ids, mask, steps):
    """Greedy decoding with no cache: the whole sequence (and its positions) on every call."""
    seq, mask = ids.clone(), mask.clone()
    for _ in range(steps):
        pos = (mask.long().cumsum(-1) - 1).clamp(min=0)
        logits = model(input_ids=seq, attention_mask=mask, position_ids=pos, use_cache=False).logits
        assert logits.shape[1] == seq.shape[1]  # prompt positions dropped from the output
        nxt = logits[:, -1].argmax(-1, keepdim=True)
        seq = torch.cat([seq, nxt], dim=1)
        mask = torch.cat([mask, torch.ones_like(nxt)], dim=1)
    return seq


@pytest.mark.parametrize("n_tokens", [1, 4])
@pytest.mark.parametrize("padded", [False, True])
def test_greedy_generate_with_cache_equals_step_by_step(n_tokens, padded):
    m = _model(n_tokens)
    g = torch.Generator().manual_seed(fresh_seed())
    ids = torch.randint(3, VOCAB, (2, 6), generator=g)
    mask = torch.ones_like(ids)
    if padded:
        ids[1, :2] = 0
        mask[1, :2] = 0
    want = step_by_step(m, ids, mask, 8)
    got = m.generate(input_ids=ids, attention_mask=mask, max_new_tokens=8, do_sample=False, pad_token_id=0)
    assert torch.equal(got, want)
    no_cache = m.generate(input_ids=ids, attention_mask=mask, max_new_tokens=8, do_sample=False,
                          pad_token_id=0, use_cache=False)
    assert torch.equal(no_cache, want)
    # the soft prompt matters: without it the continuation is another one
    delta.detach(m, "prompt")
    plain = m.generate(input_ids=ids, attention_mask=mask, max_new_tokens=8, do_sample=False, pad_token_id=0)
    assert not torch.equal(plain, want)


@torch.no_grad()
def test_manual_cache_continuation_sees_the_prompt():
    m = _model(3)
    ids = torch.randint(3, VOCAB, (1, 5))
    full = m(input_ids=ids).logits
    first = m(input_ids=ids[:, :3], use_cache=True)
    assert first.past_key_values.get_seq_length() == 3 + 3  # prompt + tokens in the cache
    rest = m(input_ids=ids[:, 3:], attention_mask=torch.ones(1, 5, dtype=torch.long),
             past_key_values=first.past_key_values, use_cache=True).logits
    assert rest.shape[1] == 2
    assert torch.allclose(rest, full[:, 3:], atol=1e-5, rtol=0)


def test_four_dimensional_mask_is_refused():
    m = _model(2)
    ids = torch.randint(3, VOCAB, (1, 4))
    with pytest.raises(ValueError, match="attention_mask: a model with a soft prompt needs a 2-D"):
        m(input_ids=ids, attention_mask=torch.ones(1, 1, 4, 4))
