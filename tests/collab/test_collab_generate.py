"""plain / contrastive / proxy generation and the oracle trace, against step-by-step references
that recompute every model on the whole sequence (no cache) and call the ops' references."""

import pytest
import torch

import lmfuse.ops as ops
from lmfuse.collab import contrastive_generate, oracle_trace, plain_generate, proxy_generate, truncate_layers

from .helpers import hf_greedy, ragged_prompts, tiny_llama


@pytest.fixture(scope="module")
def models():
    large = tiny_llama(layers=3, seed=0)
    return {"large": large, "small": truncate_layers(large, 1), "base": tiny_llama(layers=1, seed=7)}


def _reference_greedy(combine, model_list, ids, mask, steps, eos=None):
    """Greedy decoding, one row at a time, recomputing each model on the full sequence."""
    rows = []
    for b in range(ids.shape[0]):
        seq = ids[b][mask[b].bool()]
        new = []
        for _ in range(steps):
            with torch.no_grad():
                logits = [m(seq[None]).logits[:, -1].float() for m in model_list]
            tok = combine(*logits).argmax(-1)
            new.append(int(tok))
            seq = torch.cat([seq, tok])
            if eos is not None and new[-1] == eos:
                break
        rows.append(new)
    return rows


def _new_tokens(out, P):
    return [out.sequences[b, P:P + int(out.new_tokens[b])].tolist() for b in range(out.sequences.shape[0])]


def test_plain_generate_equals_hf_generate(models):
    g = torch.Generator().manual_seed(torch.randint(0, 2**31, ()).item())
    ids, mask = ragged_prompts([5, 2, 7], g)
    out = plain_generate(models["large"], ids, mask, max_new_tokens=12)
    assert torch.equal(out.sequences, hf_greedy(models["large"], ids, mask, 12))
    assert not bool(out.trace.differs[out.trace.valid].any())  # it *is* the small model here


@pytest.mark.parametrize("weights", [(1.0, 1.0, 0.1), (1.5, 0.5, 0.2)])
def test_contrastive_generate_matches_reference(models, weights):
    lw, sw, alpha = weights
    g = torch.Generator().manual_seed(torch.randint(0, 2**31, ()).item())
    ids, mask = ragged_prompts([4, 6, 1], g)
    out = contrastive_generate(models["large"], models["small"], ids, mask, max_new_tokens=8, alpha=alpha,
                               large_weight=lw, small_weight=sw)
    want = _reference_greedy(lambda L, S: ops.contrastive_logits_reference(L.double(), S.double(), alpha, lw, sw),
                             [models["large"], models["small"]], ids, mask, 8)
    assert _new_tokens(out, ids.shape[1]) == want
    # the trace's statistics describe the small model at each emitted step
    tr = out.trace
    assert tr.valid.sum().item() == 24
    assert bool(((tr.small_top1_prob > 0) & (tr.small_top1_prob <= 1))[tr.valid].all())
    assert bool((tr.small_margin[tr.valid] <= tr.small_top1_prob[tr.valid]).all())


def test_proxy_generate_matches_reference_and_alpha_zero_is_the_large_model(models):
    g = torch.Generator().manual_seed(torch.randint(0, 2**31, ()).item())
    ids, mask = ragged_prompts([3, 5], g)
    trio = [models["large"], models["small"], models["base"]]
    out = proxy_generate(*trio, ids, mask, max_new_tokens=8, alpha=0.7)
    want = _reference_greedy(lambda L, S, Sb: ops.proxy_logits_reference(L.double(), S.double(), Sb.double(), 0.7),
                             trio, ids, mask, 8)
    assert _new_tokens(out, ids.shape[1]) == want
    zero = proxy_generate(*trio, ids, mask, max_new_tokens=8, alpha=0.0)
    assert torch.equal(zero.sequences, hf_greedy(models["large"], ids, mask, 8))


def test_oracle_trace_marks_disagreements(models):
    g = torch.Generator().manual_seed(torch.randint(0, 2**31, ()).item())
    ids, mask = ragged_prompts([6, 3, 4], g)
    out = oracle_trace(models["large"], models["small"], ids, mask, max_new_tokens=10)
    assert torch.equal(out.sequences, hf_greedy(models["large"], ids, mask, 10))
    P = ids.shape[1]
    with torch.no_grad():  # recompute the small model's argmax on the large model's prefixes
        for b in range(3):
            seq = out.sequences[b][torch.cat([mask[b].bool(), torch.ones(10, dtype=torch.bool)])]
            small_arg = models["small"](seq[None]).logits[0, -11:-1].argmax(-1)
            assert out.trace.differs[b].tolist() == (small_arg != out.sequences[b, P:]).tolist()
    freq = out.stats.collaboration_frequency
    assert freq == pytest.approx(out.trace.differs.float().mean().item())
    assert 0.0 < freq < 1.0  # a 1-layer truncation disagrees sometimes, not always


def test_eos_and_sampling_reproducibility(models):
    g = torch.Generator().manual_seed(torch.randint(0, 2**31, ()).item())
    ids, mask = ragged_prompts([4, 6, 2], g)
    free = plain_generate(models["large"], ids, mask, max_new_tokens=10)
    eos = int(free.sequences[1, ids.shape[1] + 3])
    out = contrastive_generate(models["large"], models["small"], ids, mask, max_new_tokens=10, eos_token_id=eos,
                               pad_token_id=0)
    want = _reference_greedy(lambda L, S: ops.contrastive_logits_reference(L.double(), S.double(), 0.1, 1.0, 1.0),
                             [models["large"], models["small"]], ids, mask, 10, eos=eos)
    assert _new_tokens(out, ids.shape[1]) == want
    for b in range(3):  # everything after a row's end is padding, and the trace stops there too
        n = int(out.new_tokens[b])
        assert bool((out.sequences[b, ids.shape[1] + n:] == 0).all())
        assert int(out.trace.valid[b].sum()) == n
    seed = int(torch.randint(0, 2**31, ()))
    a, b = (proxy_generate(models["large"], models["small"], models["base"], ids, mask, max_new_tokens=6,
                           temperature=0.9, top_p=0.9, generator=torch.Generator().manual_seed(seed)).sequences
            for _ in range(2))
    assert torch.equal(a, b)


def test_vocabulary_mismatch_is_rejected(models):
    with pytest.raises(ValueError, match="vocabulary"):
        contrastive_generate(models["large"], tiny_llama(layers=1, vocab=50), torch.tensor([[4, 5]]), max_new_tokens=2)
