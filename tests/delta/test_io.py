"""save → load of the deltas alone: exact round trip, backbone identity checks."""

import json
import os

import pytest
import torch

from lmfuse import delta
from lmfuse.delta import BackboneMismatchError

from .tiny import fresh_seed, randomize_deltas, tiny_gpt2, tiny_llama, token_ids


def _gen():
    return torch.Generator().manual_seed(fresh_seed())


def _decorate(m, g):
    delta.attach(m, delta.LoRAConfig(r=4, lora_alpha=8.0), "lora", g)
    delta.attach(m, delta.SoRAConfig(r=5, targets=("o_proj",)), "sora", g)
    delta.attach(m, delta.AdapterConfig(bottleneck=6), "adapter", g)
    delta.attach(m, delta.ParallelAdapterConfig(bottleneck=3, targets=("self_attn",)), "par", g)
    delta.attach(m, delta.BitFitConfig(targets=("down_proj",)), "bias", g)
    delta.attach(m, delta.SoftPromptConfig(n_tokens=2), "prompt", g)
    randomize_deltas(m, g)
    sora = delta.get_deltas(m)["sora"]
    with torch.no_grad():   # a pruned SoRA delta: ranks differ per module after compaction
        first = sora.wrappers[sora.paths[0]]
        first.gate[:2] = 0
        first.compact()


def test_save_load_round_trip_is_exact(tmp_path):
    g = _gen()
    seed = fresh_seed()
    m = tiny_llama(seed)
    _decorate(m, g)
    ids = token_ids(generator=g)
    with torch.no_grad():
        y = m(input_ids=ids, attention_mask=torch.ones_like(ids)).logits
    delta.save(m, str(tmp_path))
    meta = json.loads((tmp_path / "delta_config.json").read_text())
    assert [e["name"] for e in meta["deltas"]] == ["lora", "sora", "adapter", "par", "bias", "prompt"]
    assert meta["backbone"]["class"] == "LlamaForCausalLM" and meta["backbone"]["weights_sha256"]
    assert sorted(meta["deltas"][1]["modules"].values(), key=lambda v: v["r"])[0]["r"] == 3

    fresh = tiny_llama(seed)
    loaded = delta.load(fresh, str(tmp_path))
    assert [d.name for d in loaded] == ["lora", "sora", "adapter", "par", "bias", "prompt"]
    with torch.no_grad():
        assert torch.equal(fresh(input_ids=ids, attention_mask=torch.ones_like(ids)).logits, y)
    for name, d in delta.get_deltas(m).items():
        other = delta.get_deltas(fresh)[name].state_dict()
        assert all(torch.equal(t, other[k]) for k, t in d.state_dict().items())
    # only the deltas are stored, not the backbone
    n_saved = sum(p.numel() for p in delta.delta_parameters(m))
    assert os.path.getsize(tmp_path / "delta_model.safetensors") < 4 * n_saved + 8192


def test_load_selected_names_and_gpt2(tmp_path):
    g = _gen()
    seed = fresh_seed()
    m = tiny_gpt2(seed)
    delta.attach(m, delta.LoRAConfig(r=3), "lora", g)
    delta.attach(m, delta.BitFitConfig(), "bias", g)
    randomize_deltas(m, g)
    delta.detach(m, "bias")
    ids = token_ids(generator=g)
    with torch.no_grad():
        y = m(input_ids=ids).logits
    delta.reattach(m, delta.detach(m, "lora"))
    delta.attach(m, delta.BitFitConfig(), "bias", g)
    delta.save(m, str(tmp_path))
    fresh = tiny_gpt2(seed)
    delta.load(fresh, str(tmp_path), names=["lora"])
    assert list(delta.get_deltas(fresh)) == ["lora"]
    with torch.no_grad():
        assert torch.equal(fresh(input_ids=ids).logits, y)
    with pytest.raises(KeyError, match="nope"):
        delta.load(tiny_gpt2(seed), str(tmp_path), names=["nope"])


@pytest.mark.parametrize("change", ["hidden", "layers", "weights", "class"])
def test_mismatched_backbone_is_refused(tmp_path, change):
    g = _gen()
    seed = fresh_seed()
    m = tiny_llama(seed)
    delta.attach(m, delta.LoRAConfig(r=4), "lora", g)
    delta.save(m, str(tmp_path))
    other = {"hidden": lambda: tiny_llama(seed, hidden=64), "layers": lambda: tiny_llama(seed, layers=3),
             "weights": lambda: tiny_llama(seed + 1), "class": lambda: tiny_gpt2(seed)}[change]()
    expected = {"hidden": "architecture config differs", "layers": "architecture config differs",
                "weights": "weights of the touched modules differ", "class": "model class GPT2LMHeadModel"}[change]
    with pytest.raises(BackboneMismatchError, match=expected):
        delta.load(other, str(tmp_path))
    assert not delta.get_deltas(other)  # nothing half-attached
    if change == "weights":            # a fine-tuned copy, on purpose
        assert [d.name for d in delta.load(other, str(tmp_path), check_weights=False)] == ["lora"]


def test_save_errors(tmp_path):
    m = tiny_llama(fresh_seed())
    with pytest.raises(ValueError, match="nothing to save"):
        delta.save(m, str(tmp_path))
    delta.attach(m, delta.LoRAConfig(r=2), "lora")
    delta.merge(m)
    with pytest.raises(RuntimeError, match="unmerge it before saving"):
        delta.save(m, str(tmp_path))
    with pytest.raises(FileNotFoundError, match="not a saved lmfuse delta"):
        delta.load(m, str(tmp_path / "missing"))
