"""speculative_generate on tiny random Llama models: greedy equality with HF generate for ragged
left-padded batches (every rollback path), EOS, budgets, prompt lookup, sampling distribution."""

import pytest
import torch
from scipy.stats import chisquare

from lmfuse.collab import PromptLookupDrafter, speculative_generate, truncate_layers

from .helpers import VOCAB, hf_greedy, ragged_prompts, tiny_llama


@pytest.fixture(scope="module")
def target():
    return tiny_llama(layers=4, seed=0)


@pytest.fixture(scope="module")
def drafts(target):
    # Truncated self-draft (partial agreement) and an unrelated model (almost never agrees).
    return {"truncated": truncate_layers(target, 2), "independent": tiny_llama(layers=2, seed=1)}


@pytest.mark.parametrize("draft_kind", ["truncated", "independent", "lookup"])
@pytest.mark.parametrize("compact_threshold", [1, 1000])
@pytest.mark.parametrize("confidence", [0.0, 0.4])
def test_greedy_equals_target_generate_on_a_ragged_batch(target, drafts, draft_kind, compact_threshold, confidence):
    g = torch.Generator().manual_seed(torch.randint(0, 2**31, ()).item())
    ids, mask = ragged_prompts([7, 3, 1, 5], g)
    ref = hf_greedy(target, ids, mask, 19)
    draft = PromptLookupDrafter() if draft_kind == "lookup" else drafts[draft_kind]
    out = speculative_generate(target, draft, ids, mask, max_new_tokens=19, num_draft_tokens=4,
                               compact_threshold=compact_threshold, draft_confidence_threshold=confidence)
    assert torch.equal(out.sequences, ref)
    assert out.new_tokens.tolist() == [19] * 4
    st = out.stats
    assert torch.equal(st.new_tokens, out.new_tokens)
    assert bool((st.accepted <= st.proposed).all())
    # each verification emits accepted drafts + 1 token per row
    assert int(st.new_tokens.sum()) == int(st.accepted.sum()) + int(st.row_target_calls.sum())
    assert st.tokens_per_target_call >= 1.0 and st.wall_time_s > 0


def test_acceptance_really_varies_per_row(target, drafts):
    """The truncated draft must produce ragged acceptance, or the test above proves little."""
    g = torch.Generator().manual_seed(torch.randint(0, 2**31, ()).item())
    ids, mask = ragged_prompts([6, 2, 9, 4, 5, 8], g)
    out = speculative_generate(target, drafts["truncated"], ids, mask, max_new_tokens=24, num_draft_tokens=4,
                               draft_confidence_threshold=0)
    assert torch.equal(out.sequences, hf_greedy(target, ids, mask, 24))
    rate = out.stats.acceptance_rate
    assert 0.0 < float(rate.mean()) < 1.0


def test_rows_stop_at_eos_independently(target, drafts):
    g = torch.Generator().manual_seed(torch.randint(0, 2**31, ()).item())
    ids, mask = ragged_prompts([5, 8, 2, 6], g)
    free = hf_greedy(target, ids, mask, 16)
    eos = int(free[0, ids.shape[1] + 4])  # row 0 emits it at step 4: it stops there, others may not
    ref = hf_greedy(target, ids, mask, 16, eos=eos, pad=0)
    for draft in (drafts["truncated"], PromptLookupDrafter(max_ngram=2)):
        out = speculative_generate(target, draft, ids, mask, max_new_tokens=16, num_draft_tokens=3,
                                   eos_token_id=[eos], pad_token_id=0, draft_confidence_threshold=0)
        assert torch.equal(out.sequences, ref)
        assert int(out.new_tokens[0]) <= 5
        stop = (ref[:, ids.shape[1]:] == eos).int().argmax(1)
        for b in range(4):
            if bool((ref[b, ids.shape[1]:] == eos).any()):
                assert int(out.new_tokens[b]) == int(stop[b]) + 1


@pytest.mark.parametrize("max_new", [1, 2, 5])
def test_budget_smaller_than_draft_window(target, drafts, max_new):
    g = torch.Generator().manual_seed(torch.randint(0, 2**31, ()).item())
    ids, mask = ragged_prompts([4, 1], g)
    out = speculative_generate(target, drafts["truncated"], ids, mask, max_new_tokens=max_new, num_draft_tokens=6,
                               draft_confidence_threshold=0)
    assert torch.equal(out.sequences, hf_greedy(target, ids, mask, max_new))
    assert out.new_tokens.tolist() == [max_new, max_new]


def test_single_token_prompt_batch_of_one(target, drafts):
    ids = torch.tensor([[17]])
    out = speculative_generate(target, drafts["truncated"], ids, max_new_tokens=9, num_draft_tokens=1)
    assert torch.equal(out.sequences, hf_greedy(target, ids, torch.ones_like(ids), 9))


def test_sampling_is_reproducible_with_a_generator(target, drafts):
    g = torch.Generator().manual_seed(torch.randint(0, 2**31, ()).item())
    ids, mask = ragged_prompts([5, 3, 6], g)
    seed = int(torch.randint(0, 2**31, ()))
    runs = [speculative_generate(target, drafts["truncated"], ids, mask, max_new_tokens=10, temperature=0.8,
                                 top_k=20, generator=torch.Generator().manual_seed(seed)).sequences
            for _ in range(2)]
    assert torch.equal(runs[0], runs[1])
    other = speculative_generate(target, drafts["truncated"], ids, mask, max_new_tokens=10, temperature=0.8,
                                 top_k=20, generator=torch.Generator().manual_seed(seed + 1)).sequences
    assert not torch.equal(runs[0], other)


def _balanced_threshold(draft, prompt) -> float | None:
    """A confidence threshold at which the draft's first token (sampled at temperature 1) stops
    the drafting with probability in [0.2, 0.8] — P(stop) = mass of the tokens whose draft
    probability is below it — or None if this prompt's draft distribution has no such value."""
    with torch.no_grad():
        q = torch.sort(torch.softmax(draft(prompt).logits[0, -1].double(), -1)).values
    below = torch.cumsum(q, 0) - q  # P(stop) for threshold q[j] (ties aside)
    j = int((below - 0.5).abs().argmin())
    if not (0.2 <= float(below[j]) <= 0.8) or bool((q == q[j]).sum() > 1):
        return None
    return float(q[j])


@pytest.mark.parametrize("draft_kind,early_stop", [("independent", False), ("truncated", True), ("lookup", False)])
def test_sampled_tokens_follow_the_target_distribution(target, drafts, draft_kind, early_stop):
    """Many copies of one prompt, two new tokens each at temperature 1: the first token is
    distributed as p(x1 | prompt) and the second as Σ p(x1) p(x2 | x1) — the latter only holds
    if every row's caches were rolled back correctly after the first verification, and (with a
    confidence threshold) only if stopping the draft early leaves the distribution alone."""
    rows = 1500
    g = torch.Generator().manual_seed(torch.randint(0, 2**31, ()).item())
    prompt = torch.randint(3, VOCAB, (1, 5), generator=g)
    confidence = 0.0
    if early_stop:  # a prompt where about half the rows stop drafting after their first token
        for _ in range(50):
            confidence = _balanced_threshold(drafts[draft_kind], prompt)
            if confidence is not None:
                break
            prompt = torch.randint(3, VOCAB, (1, 5), generator=g)
        assert confidence is not None, "no prompt with a balanced draft confidence in 50 tries"
    with torch.no_grad():
        p1 = torch.softmax(target(prompt).logits[0, -1], -1)
        both = torch.cat([prompt.expand(VOCAB, -1), torch.arange(VOCAB)[:, None]], dim=1)
        p2 = (p1[:, None] * torch.softmax(target(both).logits[:, -1], -1)).sum(0)
    # a repetitive prompt gives prompt lookup something to propose
    ids = prompt.expand(rows, -1) if draft_kind != "lookup" else torch.cat([prompt, prompt], 1).expand(rows, -1)
    if draft_kind == "lookup":
        with torch.no_grad():
            p1 = torch.softmax(target(ids[:1]).logits[0, -1], -1)
            both = torch.cat([ids[:1].expand(VOCAB, -1), torch.arange(VOCAB)[:, None]], dim=1)
            p2 = (p1[:, None] * torch.softmax(target(both).logits[:, -1], -1)).sum(0)
    draft = drafts[draft_kind] if draft_kind != "lookup" else PromptLookupDrafter()
    # three new tokens, so the first step drafts up to two and the threshold can stop it after one
    out = speculative_generate(target, draft, ids.contiguous(), max_new_tokens=3, num_draft_tokens=2,
                               temperature=1.0, generator=g, draft_confidence_threshold=confidence)
    for pos, p in ((0, p1), (1, p2)):
        tok = out.sequences[:, ids.shape[1] + pos]
        counts = torch.bincount(tok, minlength=VOCAB).double()
        expected = p.double() * rows
        # pool the rare tokens so every chi-square cell expects >= 5
        big = expected >= 5
        obs = torch.cat([counts[big], counts[~big].sum()[None]])
        exp = torch.cat([expected[big], expected[~big].sum()[None]])
        if float(exp[-1]) < 5:
            obs, exp = obs[:-1], exp[:-1] * (obs[:-1].sum() / exp[:-1].sum())
        assert chisquare(obs.numpy(), exp.numpy()).pvalue > 1e-4, f"token {pos} is not distributed as p"


def test_confidence_threshold_stops_drafting_early(target, drafts):
    """Threshold 1 stops every row after its first draft (one draft forward per step), 0 never
    stops; the greedy output is the same either way."""
    g = torch.Generator().manual_seed(torch.randint(0, 2**31, ()).item())
    ids, mask = ragged_prompts([6, 4, 9], g)
    ref = hf_greedy(target, ids, mask, 12)
    full = speculative_generate(target, drafts["truncated"], ids, mask, max_new_tokens=12, num_draft_tokens=4,
                                draft_confidence_threshold=0)
    one = speculative_generate(target, drafts["truncated"], ids, mask, max_new_tokens=12, num_draft_tokens=4,
                               draft_confidence_threshold=1.0)
    assert torch.equal(full.sequences, ref) and torch.equal(one.sequences, ref)
    # one draft forward per step (none in a last step where every row has one token left)
    assert one.stats.target_calls - 1 <= one.stats.draft_calls <= one.stats.target_calls
    assert bool((one.stats.proposed <= one.stats.row_target_calls).all())
    assert full.stats.draft_calls > full.stats.target_calls


def test_confidence_is_the_draft_probability_of_its_token():
    from lmfuse.collab.speculative import _confidence

    logits = torch.tensor([[0.0, 1.0, 2.0], [3.0, -float("inf"), 0.0]])
    tokens = torch.tensor([2, 0])
    assert torch.allclose(_confidence(logits, tokens, 0.0), torch.softmax(logits, -1)[[0, 1], [2, 0]])
    assert torch.allclose(_confidence(logits, tokens, 2.0), torch.softmax(logits / 2, -1)[[0, 1], [2, 0]])


def test_bad_arguments_raise_clear_errors(target, drafts):
    ids = torch.tensor([[5, 6, 7]])
    with pytest.raises(ValueError, match="max_new_tokens"):
        speculative_generate(target, drafts["truncated"], ids, max_new_tokens=0)
    with pytest.raises(ValueError, match="num_draft_tokens"):
        speculative_generate(target, drafts["truncated"], ids, max_new_tokens=3, num_draft_tokens=0)
    with pytest.raises(ValueError, match="left-padded"):
        speculative_generate(target, drafts["truncated"], ids, torch.tensor([[1, 1, 0]]), max_new_tokens=3)
    with pytest.raises(TypeError, match="input_ids"):
        speculative_generate(target, drafts["truncated"], ids.float(), max_new_tokens=3)
    with pytest.raises(ValueError, match="vocabulary"):
        speculative_generate(target, tiny_llama(layers=1, vocab=VOCAB + 3), ids, max_new_tokens=3)
    with pytest.raises(TypeError, match="draft"):
        speculative_generate(target, object(), ids, max_new_tokens=3)
    with pytest.raises(ValueError, match="temperature"):
        speculative_generate(target, drafts["truncated"], ids, max_new_tokens=3, temperature=-1.0)
    with pytest.raises(ValueError, match="draft_confidence_threshold"):
        speculative_generate(target, drafts["truncated"], ids, max_new_tokens=3, draft_confidence_threshold=1.5)
