"""``sequence_log_probs`` equals log-softmax of the model's full logits, gathered at the
completion tokens and summed per sequence; padding (left or right) changes nothing."""

import pytest
import torch

from lmfuse.losses import sequence_log_probs
from lmfuse.testing import assert_close_to_reference

from . import tiny
from .tiny import BUILDERS, fresh_seed

FP32 = torch.float32


def full_logits_log_probs(model, ids, mask, completion, position_ids=None, temperature=1.0):
    """What a user computes without the fused op: all [B, T, V] logits in float64."""
    logits = model(input_ids=ids, attention_mask=mask, position_ids=position_ids).logits.double() / temperature
    logp = torch.log_softmax(logits[:, :-1], -1).gather(-1, ids[:, 1:, None])[..., 0]
    counted = completion[:, 1:].bool() & mask[:, 1:].bool()
    per_token = torch.where(counted, logp, 0.0)
    return per_token.sum(-1), counted.sum(-1), per_token


def _batch(generator, lengths, prompt_lengths, seq, left):
    """Random prompt+completion sequences padded to ``seq`` (left or right)."""
    B = len(lengths)
    ids = torch.randint(0, tiny.VOCAB, (B, seq), generator=generator)
    mask = torch.zeros(B, seq, dtype=torch.long)
    completion = torch.zeros(B, seq, dtype=torch.long)
    for b, (n, p) in enumerate(zip(lengths, prompt_lengths)):
        start = seq - n if left else 0
        mask[b, start:start + n] = 1
        completion[b, start + p:start + n] = 1
    return ids, mask, completion


@pytest.mark.parametrize("arch", sorted(BUILDERS))
@pytest.mark.parametrize("left", [False, True], ids=["right-pad", "left-pad"])
def test_equals_full_logits_log_softmax(arch, left):
    seed = fresh_seed()
    g = torch.Generator().manual_seed(seed)
    ids, mask, completion = _batch(g, lengths=[12, 7, 10], prompt_lengths=[4, 3, 1], seq=12, left=left)
    m = BUILDERS[arch](seed)
    pos = (mask.cumsum(-1) - 1).clamp(min=0)
    out = sequence_log_probs(m, ids, mask, completion)
    with torch.no_grad():
        ref_sum, ref_n, ref_tok = full_logits_log_probs(m, ids, mask, completion, position_ids=pos)
    assert out.logp_sum.dtype == torch.float32 and out.logp_sum.shape == (3,)
    assert out.n_tokens.dtype == torch.int64 and torch.equal(out.n_tokens, ref_n)
    assert torch.equal(out.n_tokens, torch.tensor([8, 4, 9]))
    assert_close_to_reference(out.logp_sum, ref_sum, FP32, f"{arch} logp_sum")
    assert out.token_logp.shape == (3, 12)
    assert_close_to_reference(out.token_logp[:, 1:], ref_tok, FP32, f"{arch} token_logp")
    assert not out.token_logp[:, 0].any()


def test_padding_does_not_change_the_result():
    """Each sequence scored alone, unpadded, gives the same numbers as in a padded batch."""
    seed = fresh_seed()
    g = torch.Generator().manual_seed(seed)
    m = tiny.llama(seed)
    lengths, prompts = [11, 6, 9], [5, 2, 4]
    for left in (False, True):
        ids, mask, completion = _batch(g, lengths, prompts, seq=11, left=left)
        batched = sequence_log_probs(m, ids, mask, completion)
        for b in range(3):
            keep = mask[b].bool()
            alone = sequence_log_probs(m, ids[b:b + 1, keep], None, completion[b:b + 1, keep])
            assert alone.n_tokens.item() == batched.n_tokens[b].item() == lengths[b] - prompts[b]
            assert_close_to_reference(batched.logp_sum[b], alone.logp_sum[0].double(), FP32,
                                      f"row {b} {'left' if left else 'right'}-padded vs alone")


def test_gradients_equal_the_full_logits_path():
    seed = fresh_seed()
    g = torch.Generator().manual_seed(seed)
    ids, mask, completion = _batch(g, [9, 6], [3, 2], seq=9, left=True)
    fused_m, ref_m = tiny.gemma2(seed), tiny.gemma2(seed)
    upstream = torch.randn(2, generator=g)
    (sequence_log_probs(fused_m, ids, mask, completion).logp_sum * upstream).sum().backward()
    pos = (mask.cumsum(-1) - 1).clamp(min=0)
    (full_logits_log_probs(ref_m, ids, mask, completion, position_ids=pos)[0] * upstream).sum().backward()
    ref = {n: p.grad for n, p in ref_m.named_parameters() if p.grad is not None}
    got = {n: p.grad for n, p in fused_m.named_parameters() if p.grad is not None}
    assert ref.keys() == got.keys() and len(ref) > 0
    for n in ref:
        assert_close_to_reference(got[n], ref[n], FP32, f"grad {n}", factor=5)


def test_temperature_divides_the_models_logits():
    seed = fresh_seed()
    g = torch.Generator().manual_seed(seed)
    ids, mask, completion = _batch(g, [10, 8], [2, 5], seq=10, left=False)
    m = tiny.cohere(seed)  # its own logit scale, then the temperature
    out = sequence_log_probs(m, ids, mask, completion, temperature=1.7)
    with torch.no_grad():
        ref = full_logits_log_probs(m, ids, mask, completion, temperature=1.7)[0]
    assert_close_to_reference(out.logp_sum, ref, FP32, "temperature 1.7")


def test_bad_arguments_are_named():
    m = tiny.llama(fresh_seed())
    ids = torch.randint(0, tiny.VOCAB, (2, 5))
    ones = torch.ones_like(ids)
    with pytest.raises(ValueError, match="completion_mask"):
        sequence_log_probs(m, ids, ones, ones[:, :3])
    with pytest.raises(TypeError, match="completion_mask"):
        sequence_log_probs(m, ids, ones, ones.float())
    with pytest.raises(ValueError, match="attention_mask"):
        sequence_log_probs(m, ids, ones[:1], ones)
    with pytest.raises(ValueError, match="temperature"):
        sequence_log_probs(m, ids, ones, ones, temperature=0.0)
