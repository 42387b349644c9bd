"""UltraFuser on tiny random experts: encoding and response alignment, the blended loss against a
float64 oracle built from the experts' own logits, stage-1 gradients, the balanced sampler and
the argument errors."""

import pytest
import torch

from lmfuse.fusion import DomainBalancedSampler, TokenizerMismatchError, UltraFuser, encode_examples, set_stage
from lmfuse.testing import assert_close_to_reference

from .helpers import TEMPLATES, char_tokenizer, mixed, tiny_llama


@pytest.fixture
def tok():
    return char_tokenizer()


def _randomize_gate(fuser):
    with torch.no_grad():
        for p in fuser.gate.parameters():
            p.copy_(torch.randn_like(p) * 0.3)


def _fuser(tok, sizes=(32, 32, 32), vocab_extra=(0, 0, 0)):
    seed = int(torch.randint(0, 2**30, ()))
    experts = [tiny_llama(len(tok) + x, hidden=h, seed=seed + e, init_range=0.2)
               for e, (h, x) in enumerate(zip(sizes, vocab_extra))]
    return UltraFuser(experts, tok, templates=TEMPLATES)


def test_encoding_aligns_the_response_tokens_across_templates(tok):
    g = torch.Generator().manual_seed(int(torch.randint(0, 2**30, ())))
    ex = mixed(2, g)
    enc = encode_examples(tok, TEMPLATES, ex)
    for b, x in enumerate(ex):
        want = tok(x["response"], add_special_tokens=False)["input_ids"] + [tok.eos_token_id]
        for e, tpl in enumerate(TEMPLATES):
            prompt = tok(tpl.format(prompt=x["prompt"]), add_special_tokens=True)["input_ids"]
            n = len(prompt) + len(want)
            assert enc["input_ids"][e][b, :n].tolist() == prompt + want
            assert enc["attention_mask"][e][b].tolist() == [1] * n + [0] * (enc["input_ids"][e].shape[1] - n)
            lab = enc["labels"][e][b]
            assert lab[lab != -100].tolist() == want
            assert (lab[:len(prompt)] == -100).all()
    # max_length cuts every expert's response by the same amount
    longest = max(len(tok(t.format(prompt=x["prompt"]))["input_ids"]) for t in TEMPLATES for x in ex)
    cut = encode_examples(tok, TEMPLATES, ex, max_length=longest + 2)
    resp = [[(c[b] != -100).sum().item() for b in range(len(ex))] for c in cut["labels"]]
    assert resp[0] == resp[1] == resp[2]
    for b, x in enumerate(ex):
        full = len(tok(x["response"])["input_ids"]) + 1
        room = longest + 2 - max(len(tok(t.format(prompt=x["prompt"]))["input_ids"]) for t in TEMPLATES)
        assert resp[0][b] == min(full, room)
    assert max(c.shape[1] for c in cut["input_ids"]) == longest + 2
    with pytest.raises(ValueError, match="no room for a response"):
        encode_examples(tok, TEMPLATES, ex, max_length=longest)


def test_messages_and_chat_style_examples(tok):
    msgs = {"messages": [{"role": "system", "content": "be brief"}, {"role": "user", "content": "1+2"},
                         {"role": "assistant", "content": "3"}]}
    enc = encode_examples(tok, ["q: {prompt}\na:"], [msgs])
    text = tok.decode(enc["input_ids"][0][0].tolist())
    assert text == "be brief\nq: 1+2\na:3</s>"
    with pytest.raises(ValueError, match="no response"):
        encode_examples(tok, ["{prompt}"], [{"messages": [{"role": "user", "content": "x"}]}])
    with pytest.raises(ValueError, match="callable template"):
        encode_examples(tok, ["{prompt}"], [{"messages": [{"role": "user", "content": "a"}, {"role": "assistant",
                                                          "content": "b"}, {"role": "user", "content": "c"},
                                                          {"role": "assistant", "content": "d"}]}])
    callable_tpl = lambda m: ":".join(x["content"] for x in m) + ">"  # noqa: E731
    enc = encode_examples(tok, [callable_tpl], [msgs])
    assert tok.decode(enc["input_ids"][0][0].tolist()) == "be brief:1+2>3</s>"


@pytest.mark.parametrize("sizes", [(32, 32, 32), (32, 24, 40)], ids=["same-H", "mixed-H"])
def test_loss_matches_a_float64_oracle_from_the_experts_own_logits(tok, sizes):
    fuser = _fuser(tok, sizes, vocab_extra=(0, 5, 2))  # heads of 59 / 64 / 61 rows: cut to 59
    _randomize_gate(fuser)
    assert fuser.vocab_size == len(tok)
    g = torch.Generator().manual_seed(int(torch.randint(0, 2**30, ())))
    ex = mixed(2, g)
    enc = fuser.encode(ex)
    out = fuser(**enc)
    gw = fuser.gate_weights(ex)
    # oracle: each expert's own HF logits at the positions predicting the response, blended in float64
    z, target = 0, None
    for e, m in enumerate(fuser.experts):
        with torch.no_grad():
            logits = m(input_ids=enc["input_ids"][e], attention_mask=enc["attention_mask"][e]).logits.double()
        nxt = enc["labels"][e][:, 1:]
        sel = nxt != -100
        z = z + gw.flat[:, e:e + 1].double() * logits[:, :-1][sel][:, :fuser.vocab_size]
        target = nxt[sel]
    ref = torch.nn.functional.cross_entropy(z, target)
    assert_close_to_reference(out.loss, ref, torch.float32, "blended loss")
    assert out.n_tokens == target.numel() and torch.equal(out.target, target)
    assert [w.shape[0] for w in gw.weights] == [len(tok(x["response"])["input_ids"]) + 1 for x in ex]


def test_stage_one_trains_the_gate_only(tok):
    fuser = _fuser(tok)
    _randomize_gate(fuser)
    counts = set_stage(fuser, 1)
    assert counts["trainable"] == sum(p.numel() for p in fuser.gate.parameters())
    ex = mixed(1, torch.Generator().manual_seed(0))
    fuser(**fuser.encode(ex)).loss.backward()
    assert all(p.grad is None for m in fuser.experts for p in m.parameters())
    assert fuser.gate.scorer[0].weight.grad.abs().sum() > 0


def test_misaligned_responses_are_refused(tok):
    fuser = _fuser(tok)
    enc = fuser.encode(mixed(1, torch.Generator().manual_seed(1)))
    enc["labels"][1] = enc["labels"][1].clone()
    row = enc["labels"][1][0]
    row[(row != -100).nonzero()[0]] = 5
    with pytest.raises(ValueError, match=r"labels\[1\].*do not match expert 0"):
        fuser(**enc)
    with pytest.raises(ValueError, match="input_ids: expected a list of 3"):
        fuser(input_ids=enc["input_ids"][:2], attention_mask=enc["attention_mask"], labels=enc["labels"])


def test_tokenizer_mismatch_is_a_clear_error(tok):
    experts = [tiny_llama(len(tok) + 3, seed=e) for e in range(2)]
    other = char_tokenizer(extra="#")  # one more token: ids shift
    with pytest.raises(TokenizerMismatchError, match="expert 1's tokenizer differs"):
        UltraFuser(experts, [tok, other])
    with pytest.raises(TokenizerMismatchError, match=r"experts\[1\] embeds 50 tokens"):
        UltraFuser([experts[0], tiny_llama(50, seed=3)], tok)
    with pytest.raises(ValueError, match="expected one tokenizer or 2"):
        UltraFuser(experts, [tok])
    with pytest.raises(ValueError, match=r"templates\[0\]"):
        UltraFuser(experts, tok, templates=["no placeholder", None])
    with pytest.raises(ValueError, match="vocab_size"):
        UltraFuser(experts, tok, vocab_size=len(tok) + 4)
    same = UltraFuser(experts, [tok, char_tokenizer()])  # equal tokenizers are fine
    assert same.vocab_size == len(tok) + 3


# ------------------------------------------------------------------ DomainBalancedSampler


def test_sampler_batches_are_balanced_and_cover_without_repeats():
    g = torch.Generator().manual_seed(int(torch.randint(0, 2**30, ())))
    sizes = {"a": 13, "b": 9, "c": 20}
    domains = [d for d, n in sizes.items() for _ in range(n)]
    domains = [domains[i] for i in torch.randperm(len(domains), generator=g).tolist()]
    s = DomainBalancedSampler(domains, 6, seed=3)
    assert s.num_batches == 4 and len(s) == 24  # domain b (9 rows) allows 4 batches of 2
    batches = list(s.batches())
    assert len(batches) == 4
    for b in batches:
        assert sorted(domains[i] for i in b) == ["a", "a", "b", "b", "c", "c"]
    flat = [i for b in batches for i in b]
    assert len(set(flat)) == len(flat)
    assert list(DomainBalancedSampler(domains, 6, seed=3)) == flat  # reproducible
    assert list(s) != flat  # the next epoch reshuffles


def test_sampler_errors():
    domains = ["x"] * 5 + ["y"] * 3
    with pytest.raises(ValueError, match="not a multiple of the number of domains"):
        DomainBalancedSampler(domains, 5)
    with pytest.raises(ValueError, match="domain 'y' runs out"):
        DomainBalancedSampler(domains, 4, num_batches=2)
    with pytest.raises(ValueError, match="domain 'y' runs out"):
        DomainBalancedSampler(domains, 8)
    with pytest.raises(ValueError, match="batch_size"):
        DomainBalancedSampler(domains, 0)
    assert DomainBalancedSampler(domains, 4).num_batches == 1
