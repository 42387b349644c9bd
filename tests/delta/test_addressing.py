"""Module-name addressing: suffix names at '.' boundaries, regex, exclusions, defaults per architecture."""

import pytest
import torch
from torch import nn

from lmfuse import delta
from lmfuse.delta import name_matches, resolve_targets

from .tiny import fresh_seed, tiny_bert, tiny_gpt2, tiny_llama


@pytest.mark.parametrize("path, pattern, expected", [
    ("model.layers.3.self_attn.q_proj", "q_proj", True),
    ("model.layers.3.self_attn.q_proj", "self_attn.q_proj", True),
    ("model.layers.3.self_attn.xq_proj", "q_proj", False),        # not at a '.' boundary
    ("q_proj", "q_proj", True),                                   # the exact path
    ("model.layers.3.self_attn.q_proj", "layers.3", False),       # a suffix, not an infix
    ("model.layers.3.self_attn.q_proj", r"re:.*layers\.(3|4)\..*_proj", True),
    ("model.layers.13.self_attn.q_proj", r"re:.*layers\.(3|4)\..*_proj", False),
    ("model.layers.3.self_attn.q_proj", "re:q_proj", False),      # regex matches the whole path
])
def test_name_matches(path, pattern, expected):
    assert name_matches(path, pattern) is expected


def test_resolve_suffix_regex_and_exclude():
    m = tiny_llama(fresh_seed(), layers=3)
    assert resolve_targets(m, ["q_proj"]) == [f"model.layers.{i}.self_attn.q_proj" for i in range(3)]
    assert resolve_targets(m, ["q_proj", "v_proj"], exclude=["re:model\\.layers\\.1\\..*"]) == [
        "model.layers.0.self_attn.q_proj", "model.layers.0.self_attn.v_proj",
        "model.layers.2.self_attn.q_proj", "model.layers.2.self_attn.v_proj"]
    assert resolve_targets(m, [r"re:.*\.mlp\.(up|down)_proj"], exclude="layers.0.mlp.up_proj") == [
        "model.layers.0.mlp.down_proj", "model.layers.1.mlp.up_proj", "model.layers.1.mlp.down_proj",
        "model.layers.2.mlp.up_proj", "model.layers.2.mlp.down_proj"]


def test_paths_are_logical_through_wrappers():
    m = tiny_llama(fresh_seed())
    delta.attach(m, delta.LoRAConfig(r=2, targets=("q_proj",)))
    # the wrapped layer keeps its name, and the delta's own modules are never targets
    assert resolve_targets(m, ["q_proj"]) == ["model.layers.0.self_attn.q_proj", "model.layers.1.self_attn.q_proj"]
    with pytest.raises(ValueError, match="no module"):
        resolve_targets(m, ["lora_A"])
    with pytest.raises(ValueError, match="no module"):
        resolve_targets(m, ["q_proj.base"])


@pytest.mark.parametrize("build, kind, first, count", [
    (tiny_llama, "lora", "model.layers.0.self_attn.q_proj", 4),        # q, v × 2 layers
    (tiny_llama, "adapter", "model.layers.0.mlp", 2),
    (tiny_gpt2, "lora", "transformer.h.0.attn.c_attn", 2),             # Conv1D layers
    (tiny_gpt2, "bitfit", "transformer.h.0.ln_1", 12),                 # ln_1, c_attn, 2 × c_proj, ln_2, c_fc
    (tiny_bert, "lora", "encoder.layer.0.attention.self.query", 4),
    (tiny_bert, "adapter", "encoder.layer.0.attention.output.dense", 4),
])
def test_default_targets_per_architecture(build, kind, first, count):
    m = build(fresh_seed())
    cfg = {"lora": delta.LoRAConfig(r=2), "adapter": delta.AdapterConfig(bottleneck=4),
           "bitfit": delta.BitFitConfig()}[kind]
    d = delta.attach(m, cfg)
    assert d.paths[0] == first
    assert len(d.paths) == count


def test_addressing_errors():
    m = tiny_llama(fresh_seed())
    with pytest.raises(ValueError, match="no module .* matches"):
        delta.attach(m, delta.LoRAConfig(targets=("nope",)))
    with pytest.raises(ValueError, match="cannot take a lora delta.*LlamaMLP"):
        delta.attach(m, delta.LoRAConfig(targets=("mlp",)))
    with pytest.raises(ValueError, match="invalid regular expression"):
        delta.attach(m, delta.LoRAConfig(targets=("re:(",)))
    with pytest.raises(TypeError, match="targets entries"):
        delta.attach(m, delta.LoRAConfig(targets=(3,)))
    plain = nn.Sequential(nn.Linear(4, 4))
    with pytest.raises(ValueError, match="no default targets.*Sequential"):
        delta.attach(plain, delta.LoRAConfig())
    d = delta.attach(plain, delta.LoRAConfig(r=2, targets=("0",)))
    assert d.paths == ["0"]
    assert torch.is_tensor(plain(torch.randn(3, 4)))
