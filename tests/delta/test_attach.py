"""Attach / detach / re-attach / compose / merge / freeze / summary, on tiny random backbones."""

import pytest
import torch
from torch import nn

from lmfuse import delta
from lmfuse.modules import LoRALinear
from lmfuse.testing import assert_close_to_reference

from .tiny import fresh_seed, randomize_deltas, tiny_bert, tiny_gpt2, tiny_llama, token_ids

ALL_KINDS = [delta.LoRAConfig(r=3), delta.SoRAConfig(r=3), delta.AdapterConfig(bottleneck=5),
             delta.ParallelAdapterConfig(bottleneck=5), delta.BitFitConfig()]


def _gen():
    return torch.Generator().manual_seed(fresh_seed())


@pytest.mark.parametrize("build", [tiny_llama, tiny_gpt2, tiny_bert])
@pytest.mark.parametrize("cfg", ALL_KINDS, ids=lambda c: c.kind)
def test_identity_at_attach_then_detach_restores_exactly(build, cfg):
    g = _gen()
    m = build(fresh_seed())
    ids = token_ids(generator=g)
    with torch.no_grad():
        before = m(input_ids=ids)[0]
        d = delta.attach(m, cfg, generator=g)
        assert torch.allclose(m(input_ids=ids)[0], before, atol=1e-6, rtol=0)  # deltas start as identity
        randomize_deltas(m, g)
        changed = m(input_ids=ids)[0]
        assert (changed - before).abs().max() > 1e-3
        delta.detach(m, d.name)
        assert torch.equal(m(input_ids=ids)[0], before)  # the very same modules are back
        assert not any(type(mod).__name__ in ("LoRALinear", "SequentialAdapter", "ParallelAdapter", "BiasDelta")
                       for mod in m.modules())
        delta.reattach(m, d)
        assert torch.equal(m(input_ids=ids)[0], changed)


def test_delta_formulas_on_a_plain_module():
    """Each wrapper computes what its docstring says (float64, composed on one layer)."""
    g = _gen()
    lin = nn.Linear(7, 5).double()
    model = nn.Sequential(lin)
    x = torch.randn(4, 7, dtype=torch.float64, generator=g)
    base = lin(x)
    lora = delta.attach(model, delta.LoRAConfig(r=3, lora_alpha=6.0, targets=("0",)), "lora", g)
    bias = delta.attach(model, delta.BitFitConfig(targets=("0",)), "bias", g)
    par = delta.attach(model, delta.ParallelAdapterConfig(bottleneck=2, scale=0.5, nonlinearity="tanh",
                                                          targets=("0",)), "par", g)
    seq = delta.attach(model, delta.AdapterConfig(bottleneck=2, nonlinearity="relu", targets=("0",)), "seq", g)
    randomize_deltas(model, g)
    w = lora.wrappers["0"]
    h = base + 2.0 * (x @ w.lora_A.t()) @ w.lora_B.t()          # LoRA, scaling = 6 / 3
    h = h + bias.wrappers["0"].bias                              # BitFit
    pa = par.wrappers["0"].adapter
    h = h + 0.5 * pa.up(torch.tanh(pa.down(x)))                  # parallel adapter from the input
    sa = seq.wrappers["0"].adapter
    h = h + sa.up(torch.relu(sa.down(h)))                        # sequential adapter on the output
    assert_close_to_reference(model(x), h, torch.float64)


def test_compose_two_deltas_and_detach_in_any_order():
    g = _gen()
    m = tiny_llama(fresh_seed())
    ids = token_ids(generator=g)
    with torch.no_grad():
        y0 = m(input_ids=ids).logits
        delta.attach(m, delta.LoRAConfig(r=4, targets=("q_proj", "up_proj")), "lora", g)
        randomize_deltas(m, g)
        y_lora = m(input_ids=ids).logits
        delta.attach(m, delta.AdapterConfig(bottleneck=6), "adapter", g)  # wraps mlp, which holds a LoRA layer
        for p in delta.get_deltas(m)["adapter"].parameters():
            p.copy_(torch.randn(p.shape, generator=g) * 0.2)
        y_both = m(input_ids=ids).logits
        assert (y_both - y_lora).abs().max() > 1e-3
        ad = delta.detach(m, "lora")          # the inner one first: the adapter stays
        y_ad = m(input_ids=ids).logits
        delta.detach(m, "adapter")
        assert torch.equal(m(input_ids=ids).logits, y0)
        delta.reattach(m, ad)
        assert torch.equal(m(input_ids=ids).logits, y_lora)
        delta.attach(m, delta.AdapterConfig(bottleneck=6), "adapter2", g)
        for p in delta.get_deltas(m)["adapter2"].parameters():
            p.zero_()
        assert torch.equal(m(input_ids=ids).logits, y_lora)  # a zero adapter is exactly the identity
    assert y_ad.shape == y0.shape


@pytest.mark.parametrize("build, targets", [(tiny_llama, None), (tiny_gpt2, None)])
@pytest.mark.parametrize("kind", [delta.LoRAConfig, delta.SoRAConfig])
def test_merge_leaves_outputs_unchanged(build, targets, kind):
    g = _gen()
    m = build(fresh_seed())
    ids = token_ids(generator=g)
    with torch.no_grad():
        y0 = m(input_ids=ids)[0]
        delta.attach(m, kind(r=4, targets=targets), "d", g)
        randomize_deltas(m, g)
        y = m(input_ids=ids)[0]
        assert delta.merge(m) == ["d"]
        assert_close_to_reference(m(input_ids=ids)[0], y.double(), torch.float32, "merged")
        delta.unmerge(m)
        assert torch.equal(m(input_ids=ids)[0], y)            # unmerge is bit-exact
        delta.merge(m)
        delta.detach(m, "d")                                   # detach un-merges first
        assert torch.equal(m(input_ids=ids)[0], y0)
        d = delta.attach(m, kind(r=4, targets=targets), "d", g)
        randomize_deltas(m, g)
        y = m(input_ids=ids)[0]
        delta.merge(m, unwrap=True)                            # zero overhead: plain backbone modules
        assert not any(isinstance(mod, LoRALinear) for mod in m.modules()) and "d" not in delta.get_deltas(m)
        assert_close_to_reference(m(input_ids=ids)[0], y.double(), torch.float32, "merged+unwrapped")
        assert not d.attached


def test_freeze_and_gradients_reach_only_the_delta():
    g = _gen()
    m = tiny_llama(fresh_seed())
    delta.attach(m, delta.LoRAConfig(r=4), "lora", g)
    delta.attach(m, delta.SoftPromptConfig(n_tokens=3), "prompt", g)
    counts = delta.freeze(m, extras=["lm_head", "re:.*\\.norm"])
    expected = {p for p in delta.delta_parameters(m)} | {m.lm_head.weight, m.model.norm.weight}
    assert {p for p in m.parameters() if p.requires_grad} == expected
    assert counts["trainable"] == sum(p.numel() for p in expected)
    ids = token_ids(generator=g)
    randomize_deltas(m, g)
    m(input_ids=ids, labels=ids).loss.backward()
    for p in m.parameters():
        assert (p.grad is not None) == (p in expected)
    with pytest.raises(ValueError, match="address no backbone parameter"):
        delta.freeze(m, extras=["nothing_here"])


def test_summary_tree_and_counts():
    g = _gen()
    m = tiny_llama(fresh_seed(), layers=3)
    delta.attach(m, delta.LoRAConfig(r=4), "lora", g)
    delta.attach(m, delta.BitFitConfig(targets=("o_proj",)), "bias", g)
    delta.freeze(m)
    text = delta.summary(m)
    assert "0-2: 3 × LlamaDecoderLayer" in text                      # identical layers collapsed
    assert "◆ lora[lora] r=4" in text and "◆ bitfit[bias]" in text
    c = delta.parameter_counts(m)
    lora = 3 * (4 * 48 + 48 * 4 + 4 * 48 + 24 * 4)                   # q: [4,48]+[48,4], v: [4,48]+[24,4]
    assert c["per_delta"]["lora"] == {"kind": "lora", "modules": 6, "params": lora}
    assert c["delta"] == lora + 3 * 48 == c["trainable"]
    assert c["backbone"] == sum(p.numel() for p in tiny_llama(0, layers=3).parameters())
    assert f"{c['trainable']:,}" in text


def test_errors():
    g = _gen()
    m = tiny_llama(fresh_seed())
    delta.attach(m, delta.LoRAConfig(r=2), "a", g)
    with pytest.raises(ValueError, match="already attached"):
        delta.attach(m, delta.LoRAConfig(r=2), "a")
    with pytest.raises(ValueError, match="already carries the lora delta 'a'"):
        delta.attach(m, delta.SoRAConfig(r=2), "b")
    with pytest.raises(ValueError, match="identifier"):
        delta.attach(m, delta.BitFitConfig(), "a.b")
    with pytest.raises(TypeError, match="Config objects"):
        delta.attach(m, {"r": 2})
    with pytest.raises(KeyError, match="no delta named 'zz'"):
        delta.detach(m, "zz")
    with pytest.raises(ValueError, match="r must be a positive int"):
        delta.LoRAConfig(r=0)
    with pytest.raises(ValueError, match="only LoRA-family"):
        delta.attach(m, delta.BitFitConfig(), "bf")
        delta.merge(m, "bf")
    other = tiny_llama(fresh_seed())
    d = delta.detach(m, "a")
    with pytest.raises(ValueError, match="not the module delta 'a' was detached from"):
        delta.reattach(other, d)
