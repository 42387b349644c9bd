"""``eos_token_id=None`` falls back to the model's generation config, as ``generate`` does; an
explicit id (or list) wins; ``[]`` disables EOS. Checked for every generation loop."""

import pytest
import torch

from lmfuse.collab import (PromptLookupDrafter, contrastive_generate, oracle_trace, plain_generate,
                           proxy_generate, speculative_generate)
from lmfuse.collab._common import resolve_eos

from .helpers import hf_greedy, ragged_prompts, tiny_llama

N = 12


@pytest.fixture(scope="module")
def model():
    return tiny_llama(layers=2, seed=3)


@pytest.fixture(scope="module")
def prompt():
    g = torch.Generator().manual_seed(torch.randint(0, 2**31, ()).item())
    return ragged_prompts([5, 3], g)


def _loops(model):
    return {
        "plain": lambda **kw: plain_generate(model, **kw),
        "speculative": lambda **kw: speculative_generate(model, PromptLookupDrafter(), **kw),
        "contrastive": lambda **kw: contrastive_generate(model, model, alpha=0.0, large_weight=1.0,
                                                         small_weight=0.0, **kw),
        "proxy": lambda **kw: proxy_generate(model, model, model, alpha=0.0, **kw),
        "oracle": lambda **kw: oracle_trace(model, model, **kw),
    }


def _eos_at_step(model, ids, mask, step):
    """A token the greedy continuation of row 0 emits at ``step`` (and not before)."""
    free = hf_greedy(model, ids, mask, N)[0, ids.shape[1]:]
    for s in range(step, N):
        if not bool((free[:s] == free[s]).any()):
            return int(free[s]), s
    pytest.skip("the greedy continuation repeats every token (no usable EOS)")


@pytest.mark.parametrize("loop", ["plain", "speculative", "contrastive", "proxy", "oracle"])
def test_default_eos_comes_from_generation_config(model, prompt, loop):
    ids, mask = prompt
    eos, stop = _eos_at_step(model, ids, mask, 3)
    run = _loops(model)[loop]
    old = model.generation_config.eos_token_id
    try:
        model.generation_config.eos_token_id = eos
        ref = hf_greedy(model, ids, mask, N, eos=eos, pad=0)  # what generate() does with it
        out = run(input_ids=ids, attention_mask=mask, max_new_tokens=N, pad_token_id=0)
        assert int(out.new_tokens[0]) == stop + 1  # row 0 stopped right after the EOS
        assert torch.equal(out.sequences, ref)
        # a list in the generation config works too
        model.generation_config.eos_token_id = [10**6, eos]
        out_list = run(input_ids=ids, attention_mask=mask, max_new_tokens=N, pad_token_id=0)
        assert torch.equal(out_list.sequences, ref)
        # an explicit value wins over the generation config; [] means no EOS
        for explicit in ([], [10**6]):
            full = run(input_ids=ids, attention_mask=mask, max_new_tokens=N, pad_token_id=0,
                       eos_token_id=explicit)
            assert full.new_tokens.tolist() == [N, N]
    finally:
        model.generation_config.eos_token_id = old


def test_resolve_eos_sources_and_bad_values():
    class Cfg:
        def __init__(self, eos):
            self.eos_token_id = eos

    class M:
        pass

    m = M()
    m.config = Cfg(7)
    assert resolve_eos(m, None) == [7]  # no generation config: the model config
    m.generation_config = Cfg([4, 5])
    assert resolve_eos(m, None) == [4, 5]
    m.generation_config = Cfg(None)  # as generate(): a generation config without EOS means none
    assert resolve_eos(m, None) == []
    assert resolve_eos(m, 3) == [3] and resolve_eos(m, [3, 9]) == [3, 9] and resolve_eos(m, []) == []
    assert resolve_eos(m, torch.tensor([6])) == [6]
    for bad in (-1, [1.5], [True]):
        with pytest.raises(ValueError, match="eos_token_id"):
            resolve_eos(m, bad)
    for bad in (2.0, True):
        with pytest.raises(TypeError, match="eos_token_id"):
            resolve_eos(m, bad)
