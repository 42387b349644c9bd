"""Prefix tuning: outputs equal PEFT's prefix tuning (float64, the same weights) on tiny Llama,
GPT-2 and BERT; the prefix is where the layout says in the cache; the reparameterisation is its
formula and folds without changing outputs; greedy decoding with the cache (``generate``,
``lmfuse.collab``'s plain and speculative loops) equals step-by-step decoding without one,
batched and left-padded, also with a soft prompt on the same model."""

import pytest
import torch
from transformers import GPT2Config, GPT2LMHeadModel, LlamaConfig, LlamaForCausalLM

from lmfuse import delta
from lmfuse.testing import assert_close_to_reference

from .test_soft_prompt_generate import step_by_step
from .tiny import VOCAB, fresh_seed, tiny_bert, tiny_gpt2, tiny_llama

peft = pytest.importorskip("peft")


def _peft_pair(make, task, p, reparameterize, seed):
    """(PEFT model, lmfuse model) on the same float64 backbone with the same prefix weights."""
    cfg = peft.PrefixTuningConfig(task_type=task, num_virtual_tokens=p, prefix_projection=reparameterize,
                                  encoder_hidden_size=24)
    theirs = peft.get_peft_model(make(seed).double(), cfg)
    theirs.prompt_encoder.double()  # PEFT builds it in float32; the oracle computes in float64
    ours = make(seed).double()
    d = delta.attach(ours, delta.PrefixConfig(num_virtual_tokens=p, reparameterize=reparameterize, hidden_size=24), "pre")
    enc = theirs.prompt_encoder["default"]
    with torch.no_grad():
        if reparameterize:
            d.soft.embedding.copy_(enc.embedding.weight)
            for i in (0, 2):
                d.soft.mlp[i].weight.copy_(enc.transform[i].weight)
                d.soft.mlp[i].bias.copy_(enc.transform[i].bias)
        else:
            d.soft.prefix.copy_(enc.embedding.weight)
    return theirs, ours, d


@pytest.mark.parametrize("reparameterize", [False, True])
@pytest.mark.parametrize("make,task", [(tiny_llama, "CAUSAL_LM"), (tiny_gpt2, "CAUSAL_LM"),
                                       (tiny_bert, "FEATURE_EXTRACTION")], ids=["llama", "gpt2", "bert"])
def test_outputs_equal_peft_prefix_tuning(make, task, reparameterize):
    seed = fresh_seed()
    g = torch.Generator().manual_seed(seed)
    theirs, ours, d = _peft_pair(make, task, 3, reparameterize, seed)
    ids = torch.randint(3, VOCAB, (3, 7), generator=g)
    mask = torch.ones_like(ids)
    mask[1, :2] = 0  # left padding
    key = "last_hidden_state" if make is tiny_bert else "logits"
    want = getattr(theirs(input_ids=ids, attention_mask=mask), key)
    got = getattr(ours(input_ids=ids, attention_mask=mask), key)
    assert_close_to_reference(got, want, torch.float64, "prefix vs PEFT")
    delta.detach(ours, "pre")
    assert (getattr(ours(input_ids=ids, attention_mask=mask), key) - want).abs().max() > 1e-3  # the prefix matters


@torch.no_grad()
def test_cache_holds_the_prefix_in_the_documented_layout():
    seed = fresh_seed()
    m = tiny_llama(seed).double()
    d = delta.attach(m, delta.PrefixConfig(num_virtual_tokens=4, reparameterize=False), "pre",
                     torch.Generator().manual_seed(seed))
    ids = torch.randint(3, VOCAB, (2, 5))
    cache = m(input_ids=ids, use_cache=True).past_key_values
    assert cache.get_seq_length() == 4 + 5
    layers, heads, dim = m.config.num_hidden_layers, m.config.num_key_value_heads, 48 // 4
    flat = d.soft.prefix.view(4, layers, 2, heads, dim)  # per token: layer, key/value, head, dim
    for i, layer in enumerate(cache.layers):
        for b in range(2):
            assert torch.equal(layer.keys[b, :, :4], flat[:, i, 0].transpose(0, 1))
            assert torch.equal(layer.values[b, :, :4], flat[:, i, 1].transpose(0, 1))


@torch.no_grad()
def test_reparameterisation_formula_and_fold():
    seed = fresh_seed()
    g = torch.Generator().manual_seed(seed)
    m = tiny_gpt2(seed).double()
    d = delta.attach(m, delta.PrefixConfig(num_virtual_tokens=3, hidden_size=16), "pre", g)
    e, (l1, _, l2) = d.soft.embedding.double(), d.soft.mlp
    ref = torch.tanh(e @ l1.weight.t() + l1.bias) @ l2.weight.t() + l2.bias
    assert_close_to_reference(d.soft.flat(), ref, torch.float64, "reparameterised prefix")
    ids = torch.randint(3, VOCAB, (2, 6), generator=g)
    before = m(input_ids=ids).logits
    n_before = d.num_parameters()
    assert delta.merge(m) == ["pre"]
    assert not d.soft.reparameterized and d.config.reparameterize is False
    assert d.num_parameters() == 3 * 2 * 2 * 40 < n_before  # [P, layers·2·hidden]
    assert_close_to_reference(m(input_ids=ids).logits, before, torch.float64, "folded prefix")


def _decoder(kind, seed):
    torch.manual_seed(seed)
    # a large init range so attention is far from uniform: a position off by one changes tokens
    if kind == "llama":
        cfg = LlamaConfig(vocab_size=VOCAB, hidden_size=48, intermediate_size=96, num_hidden_layers=2,
                          num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=64,
                          initializer_range=0.3)
        m = LlamaForCausalLM(cfg)
    else:
        m = GPT2LMHeadModel(GPT2Config(vocab_size=VOCAB, n_embd=40, n_layer=2, n_head=4, n_positions=64,
                                       initializer_range=0.3))
    m = m.double().eval()
    m.generation_config.eos_token_id = None
    return m


def _prompt(g, batch=3):
    ids = torch.randint(3, VOCAB, (batch, 6), generator=g)
    mask = torch.ones_like(ids)
    ids[1, :2], mask[1, :2] = 0, 0
    ids[2, :3], mask[2, :3] = 0, 0
    return ids, mask


@pytest.mark.parametrize("soft", [None, "before", "after"], ids=["prefix", "soft_prompt+prefix", "prefix+soft_prompt"])
@pytest.mark.parametrize("kind", ["llama", "gpt2"])
def test_generate_with_cache_equals_step_by_step(kind, soft):
    seed = fresh_seed()
    g = torch.Generator().manual_seed(seed)
    m = _decoder(kind, seed)
    if soft == "before":
        delta.attach(m, delta.SoftPromptConfig(n_tokens=2, init="random"), "prompt", g)
    delta.attach(m, delta.PrefixConfig(num_virtual_tokens=3, hidden_size=16), "pre", g)
    if soft == "after":  # attached later, its hooks still run before the prefix's
        delta.attach(m, delta.SoftPromptConfig(n_tokens=2, init="random"), "prompt", g)
    ids, mask = _prompt(g)
    want = step_by_step(m, ids, mask, 8)
    got = m.generate(input_ids=ids, attention_mask=mask, max_new_tokens=8, do_sample=False, pad_token_id=0)
    assert torch.equal(got, want)
    no_cache = m.generate(input_ids=ids, attention_mask=mask, max_new_tokens=8, do_sample=False,
                          pad_token_id=0, use_cache=False)
    assert torch.equal(no_cache, want)
    delta.detach(m, "pre")
    assert not torch.equal(step_by_step(m, ids, mask, 8), want)  # the prefix changes the continuation


def test_collab_loops_with_cache_equal_step_by_step():
    from lmfuse.collab import plain_generate, speculative_generate

    seed = fresh_seed()
    g = torch.Generator().manual_seed(seed)
    target, draft = _decoder("llama", seed), _decoder("llama", seed)
    dt = delta.attach(target, delta.PrefixConfig(num_virtual_tokens=3, hidden_size=16), "pre",
                      torch.Generator().manual_seed(seed))
    dd = delta.attach(draft, delta.PrefixConfig(num_virtual_tokens=3, hidden_size=16), "pre",
                      torch.Generator().manual_seed(seed))
    with torch.no_grad():  # a draft close to the target: some drafts accepted, some rejected
        for p in dd.parameters():
            p.add_(torch.randn(p.shape, generator=g, dtype=p.dtype) * 0.05)
    ids, mask = _prompt(g, batch=4)
    want = step_by_step(target, ids, mask, 14)
    plain = plain_generate(target, ids, mask, max_new_tokens=14, eos_token_id=[])
    assert torch.equal(plain.sequences, want)
    # compact_threshold=1: the cache is compacted after rollbacks, with the prefix slots in front
    spec = speculative_generate(target, draft, ids, mask, max_new_tokens=14, eos_token_id=[],
                                num_draft_tokens=3, compact_threshold=1)
    assert torch.equal(spec.sequences, want)
    assert dt.num_parameters() > 0


@torch.no_grad()
def test_bert_family_prefix_changes_every_token_and_respects_padding():
    seed = fresh_seed()
    g = torch.Generator().manual_seed(seed)
    m = tiny_bert(seed).double()
    ids = torch.randint(3, VOCAB, (2, 6), generator=g)
    mask = torch.ones_like(ids)
    mask[1, 4:] = 0  # right padding (BERT)
    plain = m(input_ids=ids, attention_mask=mask).last_hidden_state
    delta.attach(m, delta.PrefixConfig(num_virtual_tokens=2, reparameterize=False), "pre", g)
    out = m(input_ids=ids, attention_mask=mask).last_hidden_state
    assert out.shape == plain.shape
    assert ((out - plain).abs().amax(-1) > 1e-6).all()
    # padding stays invisible: changing a padded token changes nothing in row 1's real tokens
    ids2 = ids.clone()
    ids2[1, 5] = (ids2[1, 5] + 1) % VOCAB
    out2 = m(input_ids=ids2, attention_mask=mask).last_hidden_state
    assert torch.equal(out2[1, :4], out[1, :4])


def test_bad_inputs_are_refused():
    m = tiny_llama(fresh_seed())
    delta.attach(m, delta.PrefixConfig(num_virtual_tokens=2), "pre")
    ids = torch.randint(3, VOCAB, (1, 4))
    with pytest.raises(ValueError, match="attention_mask: a model with a prefix needs a 2-D"):
        m(input_ids=ids, attention_mask=torch.ones(1, 1, 4, 4))
    with pytest.raises(ValueError, match="attention_mask: expected 4 columns"):
        m(input_ids=ids, attention_mask=torch.ones(1, 9, dtype=torch.long))
    with pytest.raises(TypeError, match="prefix needs a transformers model"):
        delta.attach(torch.nn.Linear(3, 3), delta.PrefixConfig(), "p")
