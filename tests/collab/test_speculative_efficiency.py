"""Efficiency oracles for speculative_generate: output equality with greedy decoding holds for any
draft, however badly it is fed, so these tests pin down how many drafts are accepted.

* A draft identical to the target accepts every draft token in greedy mode: each target call
  gains ``k + 1`` tokens until the budget (or EOS) cuts the last step short.
* For a deterministic drafter (greedy draft model or prompt lookup) the exact per-row proposal
  and acceptance counts are predicted by re-running the algorithm step by step here, proposing
  with full (uncached) forwards of the draft model or with the lookup rule, and accepting the
  longest prefix that matches the target's own greedy continuation.
* Every statistic is checked against that prediction and against independent counts: forward
  hooks on the target and the draft model, and the tokens actually emitted.
"""

import copy
import math

import pytest
import torch

from lmfuse.collab import PromptLookupDrafter, speculative_generate, truncate_layers

from .helpers import hf_greedy, ragged_prompts, tiny_llama

K = 3          # draft tokens per step
M = 13         # new tokens per row
LENGTHS = [5, 9, 2]


@pytest.fixture(scope="module")
def target():
    return tiny_llama(layers=2, seed=3)


def _count_forwards(model):
    """Count the model's top-level forward calls with a hook; returns (counter, handle)."""
    counter = {"n": 0}

    def hook(module, args, kwargs, output):
        counter["n"] += 1

    return counter, model.register_forward_hook(hook, with_kwargs=True)


def _draft_model(target, kind):
    # Built from a deep copy so a hook on the draft is not shared with the target's modules.
    twin = copy.deepcopy(target)
    return twin if kind == "identical" else truncate_layers(twin, 1)


@torch.no_grad()
def _model_proposal(draft, history, cap, threshold):
    """Greedy drafts from full forwards of ``draft`` on ``history`` (no cache): the row keeps
    proposing until ``cap`` tokens or right after a token of draft probability < threshold."""
    out, h = [], history
    while len(out) < cap:
        logits = draft(input_ids=h[None]).logits[0, -1].float()
        tok = int(logits.argmax())
        out.append(tok)
        if threshold > 0 and torch.softmax(logits.double(), -1)[tok].item() < threshold:
            break
        h = torch.cat([h, torch.tensor([tok])])
    return out


def _predict(prompts, greedy, propose, k, max_new):
    """Replay the step loop for a batch: per row, the proposed/accepted/target-call counts, and
    the numbers of target calls and draft-model forwards. ``greedy[b]`` is row b's greedy
    continuation (the target's own), ``propose(history, cap)`` a row's proposal (≤ cap tokens)."""
    B = len(prompts)
    emitted = [0] * B
    proposed, accepted, calls = [0] * B, [0] * B, [0] * B
    target_calls = draft_forwards = 0
    while True:
        alive = [b for b in range(B) if emitted[b] < max_new]
        if not alive:
            break
        k_step = min(k, max(max_new - emitted[b] for b in alive) - 1)
        target_calls += 1
        longest = 0
        for b in alive:
            cap = max(0, min(max_new - emitted[b] - 1, k_step))
            history = torch.cat([prompts[b], greedy[b][: emitted[b]]])
            d = propose(history, cap) if cap > 0 else []
            longest = max(longest, len(d))
            a = 0
            while a < len(d) and d[a] == int(greedy[b][emitted[b] + a]):
                a += 1
            proposed[b] += len(d)
            accepted[b] += a
            calls[b] += 1
            emitted[b] += a + 1
        if k_step > 0:
            draft_forwards += max(longest, 1)
    return proposed, accepted, calls, target_calls, draft_forwards


def _run(target, draft, ids, mask, **kw):
    t_count, t_handle = _count_forwards(target)
    d_count, d_handle = (None, None) if isinstance(draft, PromptLookupDrafter) else _count_forwards(draft)
    try:
        out = speculative_generate(target, draft, ids, mask, max_new_tokens=M, num_draft_tokens=K, **kw)
    finally:
        t_handle.remove()
        if d_handle is not None:
            d_handle.remove()
    return out, t_count["n"], (0 if d_count is None else d_count["n"])


def _check_stats(st, out, proposed, accepted, calls, target_calls, draft_forwards, hooked_t, hooked_d):
    assert st.proposed.tolist() == proposed
    assert st.accepted.tolist() == accepted
    assert st.row_target_calls.tolist() == calls
    assert st.target_calls == target_calls == hooked_t
    assert st.draft_calls == draft_forwards == hooked_d
    assert torch.equal(st.new_tokens, out.new_tokens)
    expect_rate = [a / p if p else float("nan") for a, p in zip(accepted, proposed)]
    for got, want in zip(st.acceptance_rate.tolist(), expect_rate):
        assert (math.isnan(got) and math.isnan(want)) or got == pytest.approx(want, abs=1e-12)
    assert st.tokens_per_target_call == pytest.approx(int(out.new_tokens.sum()) / sum(calls), abs=1e-12)


def _case(target):
    g = torch.Generator().manual_seed(torch.randint(0, 2**31, ()).item())
    ids, mask = ragged_prompts(LENGTHS, g)
    ref = hf_greedy(target, ids, mask, M)
    prompts = [ids[b][mask[b].bool()] for b in range(len(LENGTHS))]
    greedy = [ref[b, ids.shape[1]:] for b in range(len(LENGTHS))]
    return ids, mask, ref, prompts, greedy


@pytest.mark.parametrize("compact_threshold", [1, 1000])
def test_identical_draft_accepts_every_token_in_greedy_mode(target, compact_threshold):
    ids, mask, ref, prompts, greedy = _case(target)
    draft = _draft_model(target, "identical")
    out, hooked_t, hooked_d = _run(target, draft, ids, mask, draft_confidence_threshold=0.0,
                                   compact_threshold=compact_threshold)
    assert torch.equal(out.sequences, ref)
    st = out.stats
    # closed form: every call but the last gains k + 1 tokens, the last the rest of the budget
    calls = math.ceil(M / (K + 1))
    assert out.new_tokens.tolist() == [M] * len(LENGTHS)
    assert st.row_target_calls.tolist() == [calls] * len(LENGTHS)
    assert st.proposed.tolist() == [M - calls] * len(LENGTHS)
    assert st.accepted.tolist() == st.proposed.tolist()
    assert st.acceptance_rate.tolist() == [1.0] * len(LENGTHS)
    assert st.tokens_per_target_call == pytest.approx(M / calls)
    # one draft forward per draft token (the first of a step also takes the pending tokens)
    _check_stats(st, out, [M - calls] * 3, [M - calls] * 3, [calls] * 3, calls, M - calls, hooked_t, hooked_d)


def test_identical_draft_accepts_every_token_up_to_eos(target):
    ids, mask, ref, prompts, greedy = _case(target)
    eos = int(greedy[0][6])  # row 0 stops at step 7 or earlier; the other rows wherever it occurs
    firsts = [(g == eos).nonzero().flatten() for g in greedy]
    new = [int(f[0]) + 1 if f.numel() else M for f in firsts]
    draft = _draft_model(target, "identical")
    out, hooked_t, hooked_d = _run(target, draft, ids, mask, draft_confidence_threshold=0.0, eos_token_id=eos,
                                   pad_token_id=0)
    st = out.stats
    assert out.new_tokens.tolist() == new
    assert st.accepted.tolist() == st.proposed.tolist()  # nothing ever rejected
    assert st.row_target_calls.tolist() == [math.ceil(n / (K + 1)) for n in new]
    assert st.target_calls == hooked_t == max(math.ceil(n / (K + 1)) for n in new)
    assert st.draft_calls == hooked_d
    assert st.tokens_per_target_call == pytest.approx(sum(new) / sum(st.row_target_calls.tolist()))


@pytest.mark.parametrize("kind", ["identical", "truncated"])
@pytest.mark.parametrize("confidence", [0.0, 0.4])
@pytest.mark.parametrize("compact_threshold", [1, 1000])
def test_draft_model_acceptance_equals_its_exact_expected_value(target, kind, confidence, compact_threshold):
    ids, mask, ref, prompts, greedy = _case(target)
    draft = _draft_model(target, kind)
    pred = _predict(prompts, greedy, lambda h, cap: _model_proposal(draft, h, cap, confidence), K, M)
    out, hooked_t, hooked_d = _run(target, draft, ids, mask, draft_confidence_threshold=confidence,
                                   compact_threshold=compact_threshold)
    assert torch.equal(out.sequences, ref)
    _check_stats(out.stats, out, *pred, hooked_t, hooked_d)
    if kind == "identical":
        assert pred[1] == pred[0]  # the prediction itself: an identical draft is never rejected


@pytest.mark.parametrize("compact_threshold", [1, 1000])
def test_prompt_lookup_acceptance_equals_its_exact_expected_value(target, compact_threshold):
    ids, mask, ref, prompts, greedy = _case(target)
    # a prompt that repeats itself, so lookups hit (and partly miss) from the first step
    prompts[1] = torch.cat([prompts[1][:4], prompts[1][:4], prompts[1][8:]])
    ids[1, ids.shape[1] - LENGTHS[1]:] = prompts[1]
    ref = hf_greedy(target, ids, mask, M)
    greedy = [ref[b, ids.shape[1]:] for b in range(len(LENGTHS))]
    drafter = PromptLookupDrafter(max_ngram=2)
    pred = _predict(prompts, greedy, lambda h, cap: drafter.propose_one(h, cap).tolist(), K, M)
    out, hooked_t, hooked_d = _run(target, drafter, ids, mask, compact_threshold=compact_threshold)
    assert torch.equal(out.sequences, ref)
    _check_stats(out.stats, out, *pred[:4], 0, hooked_t, hooked_d)
