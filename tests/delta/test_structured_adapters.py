"""Compacter (PHM projections) and the low-rank adapter: their math against float64 references
written independently (``torch.kron`` sums, dense products), both PHM paths (structured and
dense), the attached adapter against the adapter formula on the wrapped module's own output,
zero effect at attach, the documented parameter counts and config errors."""

import pytest
import torch

from lmfuse import delta
from lmfuse.delta.compacter import LowRankLinear, PHMLinear, PHMRules, phm_apply, phm_weight
from lmfuse.testing import assert_close_to_reference

from .tiny import fresh_seed, randomize_deltas, tiny_bert, tiny_gpt2, tiny_llama, token_ids


def _kron_reference(rules, left, right):
    """``Σ_i kron(A_i, B_i)`` in float64 with torch.kron (independent of the einsum in phm_weight)."""
    b = left.double() if right is None else left.double() @ right.double().transpose(-1, -2)
    return sum(torch.kron(rules[i].double(), b[i]) for i in range(rules.shape[0]))


@pytest.mark.parametrize("n,d_in,d_out,rank", [(4, 20, 12, 1), (2, 14, 6, 3), (3, 9, 21, None)])
def test_phm_weight_and_apply_match_a_kron_reference(n, d_in, d_out, rank):
    g = torch.Generator().manual_seed(fresh_seed())
    rules = torch.randn(n, n, n, generator=g)
    if rank is None:
        left, right = torch.randn(n, d_out // n, d_in // n, generator=g), None
    else:
        left, right = torch.randn(n, d_out // n, rank, generator=g), torch.randn(n, d_in // n, rank, generator=g)
    ref_w = _kron_reference(rules, left, right)
    assert_close_to_reference(phm_weight(rules, left, right), ref_w, torch.float32, "phm_weight")
    x = torch.randn(3, 5, d_in, generator=g)[:, ::2]  # strided input
    if rank is not None:
        assert_close_to_reference(phm_apply(x, rules, left, right), x.double() @ ref_w.t(), torch.float32, "phm_apply")


@pytest.mark.parametrize("d_in,d_out,rank,structured", [(96, 24, 1, True), (8, 8, 1, False), (96, 24, None, False)])
def test_phm_linear_paths_and_gradients(d_in, d_out, rank, structured):
    g = torch.Generator().manual_seed(fresh_seed())
    owner = PHMRules(4, 0.5, g)
    layer = PHMLinear(d_in, d_out, 4, rank, owner, generator=g)
    with torch.no_grad():
        layer.bias.normal_(generator=g)
    assert layer.structured is structured
    x = torch.randn(2, 7, d_in, generator=g, requires_grad=True)
    y = layer(x)
    ref = x.double() @ _kron_reference(owner.rules, layer.left, layer.right).t() + layer.bias.double()
    assert_close_to_reference(y, ref, torch.float32, "PHMLinear")
    # gradients of every input against float64 autograd through the kron reference
    gy = torch.randn(y.shape, generator=g)
    params = [x, owner.rules, layer.left, layer.bias] + ([layer.right] if rank is not None else [])
    got = torch.autograd.grad(y, params, gy)
    p64 = [p.detach().double().requires_grad_() for p in params]
    right64 = p64[4] if rank is not None else None
    ref = p64[0] @ _kron_reference(p64[1], p64[2], right64).t() + p64[3]
    want = torch.autograd.grad(ref, p64, gy.double())
    for name, a, b in zip(("x", "rules", "left", "bias", "right"), got, want):
        assert_close_to_reference(a, b, torch.float32, f"grad {name}")


def test_low_rank_linear_matches_dense_product():
    g = torch.Generator().manual_seed(fresh_seed())
    layer = LowRankLinear(13, 7, 2, generator=g)
    with torch.no_grad():
        layer.bias.normal_(generator=g)
    x = torch.randn(4, 13, generator=g)
    ref = x.double() @ (layer.u.double() @ layer.v.double()).t() + layer.bias.double()
    assert_close_to_reference(layer(x), ref, torch.float32, "LowRankLinear")
    assert torch.equal(LowRankLinear(13, 7, 2, zero=True, generator=g).u, torch.zeros(7, 2))


def _capture_outputs(model, path):
    """The wrapped backbone module's own outputs (a forward hook on it), to rebuild the adapter."""
    from lmfuse.delta.addressing import get_logical

    seen = []
    handle = get_logical(model, path).register_forward_hook(lambda m, a, out: seen.append(out))
    return seen, handle


@pytest.mark.parametrize("cfg", [delta.CompacterConfig(scale=0.7), delta.CompacterConfig(rules="shared"),
                                 delta.CompacterConfig(factorized=False, n=2), delta.CompacterConfig(rank=2, bottleneck=8),
                                 delta.LowRankAdapterConfig(rank=2, bottleneck=5, scale=1.3)],
                         ids=["compacter", "shared", "full", "rank2", "low_rank"])
def test_attached_adapter_equals_float64_formula(cfg):
    seed = fresh_seed()
    g = torch.Generator().manual_seed(seed)
    m = tiny_llama(seed).double()
    ids = token_ids(generator=g)
    plain = m(input_ids=ids).logits
    d = delta.attach(m, cfg, "a", g)
    assert torch.equal(m(input_ids=ids).logits, plain)  # up starts at zero: the identity
    randomize_deltas(m, g, std=0.3)
    path = d.paths[0]
    seen, handle = _capture_outputs(m, path)
    out = {}
    h2 = d.wrappers[path].register_forward_hook(lambda mod, a, o: out.setdefault("y", o))
    m(input_ids=ids)
    handle.remove(), h2.remove()
    ad = d.wrappers[path].adapter
    act = torch.nn.GELU()
    ref = seen[0].double()
    if cfg.kind == "compacter":
        rules = d.wrappers[d.paths[0]].adapter.rules.rules  # shared or this layer's own
        wd = _kron_reference(rules, ad.down.left, ad.down.right)
        wu = _kron_reference(rules, ad.up.left, ad.up.right)
    else:
        wd, wu = ad.down.u.double() @ ad.down.v.double(), ad.up.u.double() @ ad.up.v.double()
    ref = ref + cfg.scale * (act(ref @ wd.t() + ad.down.bias.double()) @ wu.t() + ad.up.bias.double())
    assert_close_to_reference(out["y"], ref, torch.float64, "adapter output")
    assert not torch.equal(m(input_ids=ids).logits, plain)


@pytest.mark.parametrize("make", [tiny_llama, tiny_gpt2, tiny_bert])
def test_parameter_counts_follow_the_documented_formulas(make):
    m = make(fresh_seed())
    d_model = m.config.hidden_size
    layers = m.config.num_hidden_layers
    per_module = len(delta.resolve_targets(m, delta.default_targets(m, "compacter"))) // layers
    c = delta.attach(m, delta.CompacterConfig(), "c")
    k = delta.CompacterConfig().bottleneck_for(d_model)
    assert k % 4 == 0
    assert c.num_parameters() == per_module * layers * (4 ** 3 + 2 * 1 * (d_model + k) + k + d_model)
    s = delta.attach(m, delta.CompacterConfig(rules="shared"), "s")
    assert s.num_parameters() == 4 ** 3 + per_module * layers * (2 * (d_model + k) + k + d_model)
    rules = {id(w.adapter.down.rules) for w in s.wrappers.values()}
    assert len(rules) == 1  # one rule tensor for every adapter of the delta
    lr = delta.attach(m, delta.LowRankAdapterConfig(), "lr")
    k = max(1, d_model // 32)
    assert lr.num_parameters() == per_module * layers * (2 * 1 * (d_model + k) + k + d_model)
    text = delta.summary(m)
    for name, kind in (("c", "compacter"), ("s", "compacter"), ("lr", "low_rank_adapter")):
        assert f"{kind}[{name}]" in text
    counts = delta.parameter_counts(m)["per_delta"]
    assert counts["s"]["params"] == s.num_parameters() and counts["lr"]["kind"] == "low_rank_adapter"


def test_config_errors_name_the_argument():
    with pytest.raises(ValueError, match="rules must be"):
        delta.CompacterConfig(rules="global")
    with pytest.raises(ValueError, match="n must be a positive int"):
        delta.CompacterConfig(n=0)
    with pytest.raises(ValueError, match="bottleneck .* multiple of n"):
        delta.CompacterConfig(bottleneck=6)
    with pytest.raises(ValueError, match="rank must be a positive int"):
        delta.LowRankAdapterConfig(rank=0)
    m = tiny_llama(fresh_seed())  # hidden 48: n=5 does not divide it
    with pytest.raises(ValueError, match="divisible by n=5"):
        delta.attach(m, delta.CompacterConfig(n=5, bottleneck=10), "c")
    assert delta.get_deltas(m) == {}  # atomic: nothing left attached
    with pytest.raises(ValueError, match="num_virtual_tokens must be a positive int"):
        delta.PrefixConfig(num_virtual_tokens=0)
