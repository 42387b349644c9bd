"""A delta saved on a backbone loads onto a copy of that backbone in another dtype; a copy whose
weights really differ is still refused, with the reason."""

import copy

import pytest
import torch

from lmfuse import delta
from lmfuse.delta import BackboneMismatchError

from .tiny import fresh_seed, randomize_deltas, tiny_llama, token_ids


def _saved(tmp_path, seed, dtype=torch.float32):
    g = torch.Generator().manual_seed(seed)
    src = tiny_llama(seed).to(dtype)
    delta.attach(src, delta.LoRAConfig(r=3), "lora", g)
    delta.attach(src, delta.SoftPromptConfig(n_tokens=2), "prompt", g)
    randomize_deltas(src, g)
    delta.save(src, str(tmp_path))
    return src


@pytest.mark.parametrize("saved_dtype,load_dtype", [(torch.float32, torch.bfloat16), (torch.float32, torch.float16),
                                                    (torch.bfloat16, torch.float32), (torch.float32, torch.float64)])
def test_load_onto_a_copy_in_another_dtype(tmp_path, saved_dtype, load_dtype):
    seed = fresh_seed()
    src = _saved(tmp_path, seed, saved_dtype)
    other = tiny_llama(seed).to(saved_dtype).to(load_dtype)
    loaded = delta.load(other, str(tmp_path))
    assert [d.name for d in loaded] == ["lora", "prompt"]
    for name, d in delta.get_deltas(src).items():
        mine = delta.get_deltas(other)[name].state_dict()
        for k, t in d.state_dict().items():
            assert mine[k].dtype == load_dtype
            assert torch.equal(mine[k], t.to(load_dtype)), k
    ids = token_ids(generator=torch.Generator().manual_seed(seed))
    with torch.no_grad():
        want = src(input_ids=ids).logits.double()
        got = other(input_ids=ids).logits.double()
    # the same model in the lower precision: its logits differ by that precision's rounding only
    tol = {torch.bfloat16: 0.1, torch.float16: 0.02, torch.float32: 1e-4, torch.float64: 1e-4}[min(
        (saved_dtype, load_dtype), key=lambda d: torch.finfo(d).bits)]
    assert (got - want).abs().max() <= tol * max(1.0, want.abs().max())


def test_a_different_copy_in_another_dtype_is_refused_with_the_true_reason(tmp_path):
    seed = fresh_seed()
    _saved(tmp_path, seed)
    tuned = tiny_llama(seed)
    with torch.no_grad():
        tuned.model.layers[0].self_attn.q_proj.weight.add_(0.05)
    tuned = tuned.to(torch.bfloat16)
    with pytest.raises(BackboneMismatchError, match="even after casting those \\(float32\\) to this model's bfloat16"):
        delta.load(tuned, str(tmp_path))
    assert delta.get_deltas(tuned) == {}
    assert [d.name for d in delta.load(tuned, str(tmp_path), check_weights=False)] == ["lora", "prompt"]


def test_mixed_dtype_model_is_refused_with_the_true_reason(tmp_path):
    seed = fresh_seed()
    _saved(tmp_path, seed)
    mixed = tiny_llama(seed)
    mixed.model.layers[1].self_attn.q_proj.to(torch.bfloat16)
    with pytest.raises(BackboneMismatchError, match="weights are bfloat16, float32, the saved backbone's were float32"):
        delta.load(mixed, str(tmp_path))
    same = copy.deepcopy(tiny_llama(seed))
    assert len(delta.load(same, str(tmp_path))) == 2  # the plain copy in the saved dtype
