"""DecodeState (per-row rollback, compaction, row selection) and truncate_layers."""

import pytest
import torch

from lmfuse.collab import DecodeState, PromptLookupDrafter, truncate_layers

from .helpers import VOCAB, ragged_prompts, tiny_llama


@pytest.fixture(scope="module")
def model():
    return tiny_llama(layers=2, seed=3)


def _full_logits(model, seqs):
    """Last-position logits of each row's whole sequence, no cache (the reference)."""
    with torch.no_grad():
        return torch.stack([model(s[None]).logits[0, -1].float() for s in seqs])


@pytest.mark.parametrize("compact", [False, True])
def test_per_row_rollback_matches_a_fresh_forward(model, compact):
    g = torch.Generator().manual_seed(torch.randint(0, 2**31, ()).item())
    ids, mask = ragged_prompts([6, 2, 4], g)
    st = DecodeState(model, 3, ids.device, compact_threshold=10**6)
    st.feed(ids, mask.bool())
    extra = torch.randint(3, VOCAB, (3, 5), generator=g)
    st.feed(extra)
    drop = torch.tensor([4, 0, 2])  # each row keeps its own number of the 5 new tokens
    st.drop_last(drop)
    assert st.next_pos.tolist() == [6 + 1, 2 + 5, 4 + 3]
    assert st.valid.sum(1).tolist() == st.next_pos.tolist()
    if compact:
        st.compact()
        assert st.length == int(st.next_pos.max())
    nxt = torch.randint(3, VOCAB, (3, 1), generator=g)
    got = st.feed(nxt)[:, -1]
    seqs = [torch.cat([ids[b][mask[b].bool()], extra[b, :5 - int(drop[b])], nxt[b]]) for b in range(3)]
    torch.testing.assert_close(got, _full_logits(model, seqs), rtol=1e-9, atol=1e-9)


def test_padding_slots_in_the_middle_are_ignored(model):
    """A left-padded block fed after a prefix leaves holes mid-cache (the draft's pending tokens)."""
    g = torch.Generator().manual_seed(torch.randint(0, 2**31, ()).item())
    ids = torch.randint(3, VOCAB, (2, 4), generator=g)
    st = DecodeState(model, 2, ids.device)
    st.feed(ids)
    block = torch.randint(3, VOCAB, (2, 2), generator=g)
    valid = torch.tensor([[False, True], [True, True]])
    got = st.feed(block, valid)[:, -1]
    seqs = [torch.cat([ids[0], block[0, 1:]]), torch.cat([ids[1], block[1]])]
    torch.testing.assert_close(got, _full_logits(model, seqs), rtol=1e-9, atol=1e-9)
    with pytest.raises(ValueError, match="not valid"):
        st.drop_last(torch.tensor([2, 0]))  # row 0's second-last slot is padding


def test_select_rows_and_trailing_crop(model):
    g = torch.Generator().manual_seed(torch.randint(0, 2**31, ()).item())
    ids, mask = ragged_prompts([3, 5, 2], g)
    st = DecodeState(model, 3, ids.device)
    st.feed(ids, mask.bool())
    st.select_rows(torch.tensor([1, 2]))
    assert st.valid.shape == (2, 5) and st.next_pos.tolist() == [5, 2]
    st.drop_last(torch.tensor([3, 0]))  # slot 4 is still valid for row 1: nothing to crop
    assert st.length == 5
    st.drop_last(torch.tensor([0, 2]))  # now the last three columns are invalid everywhere
    assert st.length == 2 and st.cache.get_seq_length() == 2
    with pytest.raises(ValueError, match="counts"):
        st.drop_last(torch.tensor([-1, 0]))


def test_truncate_layers_shares_weights_and_matches_manual_truncation(model):
    d = truncate_layers(model, 1)
    assert d.config.num_hidden_layers == 1 and model.config.num_hidden_layers == 2
    assert len(d.model.layers) == 1 and len(model.model.layers) == 2
    assert d.model.layers[0] is model.model.layers[0]
    assert d.lm_head.weight is model.lm_head.weight and d.model.embed_tokens is model.model.embed_tokens
    ids = torch.randint(3, VOCAB, (2, 7))
    with torch.no_grad():
        h = model(ids, output_hidden_states=True).hidden_states[1]  # after layer 0
        want = model.lm_head(model.model.norm(h))
        torch.testing.assert_close(d(ids).logits, want)
    with pytest.raises(ValueError, match="num_layers"):
        truncate_layers(model, 3)


def test_prompt_lookup_drafter():
    dr = PromptLookupDrafter(max_ngram=2)
    h = torch.tensor([5, 6, 7, 8, 9, 5, 6])
    assert dr.propose_one(h, 3).tolist() == [7, 8, 9]  # bigram (5, 6) seen before
    assert dr.propose_one(torch.tensor([1, 2, 3]), 3).tolist() == []  # nothing repeats
    h = torch.tensor([4, 1, 4, 2, 4])  # unigram 4: the most recent earlier match wins
    assert dr.propose_one(h, 1).tolist() == [2]
    drafts, counts = dr.propose([torch.tensor([5, 6, 7, 5, 6]), torch.tensor([3])], 4)
    assert counts.tolist() == [3, 0] and drafts[0, :3].tolist() == [7, 5, 6]  # may run into the suffix
    with pytest.raises(ValueError):
        PromptLookupDrafter(max_ngram=0)
