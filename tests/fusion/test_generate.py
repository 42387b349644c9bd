"""Fused generation: batched, left-padded, one KV cache per expert, per-row EOS; greedy must equal
a step-by-step eager reference that recomputes every expert from scratch at every token (float64
experts and gate, so argmax ties between the two are practically impossible). One expert is a
GPT-2 (absolute position embeddings: a wrong position id under left padding changes its output,
which rotary Llamas would not show)."""

import pytest
import torch

from lmfuse.fusion import UltraFuser
from lmfuse.fusion.data import prompt_ids
from lmfuse.modules import TokenGate

from .helpers import CHARS, TEMPLATES, char_tokenizer, tiny_llama


@pytest.fixture
def fuser():
    tok = char_tokenizer()
    seed = int(torch.randint(0, 2**30, ()))
    sizes = [32, 24, 32]
    experts = [tiny_llama(len(tok), hidden=32, seed=seed, dtype=torch.float64, init_range=0.3),
               tiny_gpt2(len(tok) + 3, hidden=24, seed=seed + 1),
               tiny_llama(len(tok) + 1, hidden=32, seed=seed + 2, dtype=torch.float64, init_range=0.3)]
    gate = TokenGate(32, 3, inner_size=16, expert_hidden_sizes=sizes, dtype=torch.float64)
    with torch.no_grad():
        for p in gate.parameters():
            p.copy_(torch.randn_like(p))
    return UltraFuser(experts, tok, templates=TEMPLATES, gate=gate)


def _prompts(n):
    letters = [c for c in CHARS if c.isalnum()]
    lengths = torch.randint(1, 9, (n,)).tolist()
    return ["".join(letters[int(i)] for i in torch.randint(0, len(letters), (k,))) for k in lengths]


def tiny_gpt2(vocab, hidden, seed):
    from transformers import GPT2Config, GPT2LMHeadModel

    with torch.random.fork_rng():
        torch.manual_seed(seed)
        cfg = GPT2Config(vocab_size=vocab, n_embd=hidden, n_layer=2, n_head=4, n_positions=256, initializer_range=0.3,
                         bos_token_id=1, eos_token_id=2, pad_token_id=0)
        return GPT2LMHeadModel(cfg).double().eval()


@torch.no_grad()
def eager_greedy(fuser, prompt: str, max_new: int, eos: set) -> list[int]:
    """One row, no cache: every step runs every expert on its whole sequence (its HF logits and
    its backbone's last hidden state), weighs them with the gate and takes the argmax of the
    blended logits over the common vocabulary."""
    seqs = prompt_ids(fuser.tokenizer, fuser.templates, [{"role": "user", "content": prompt}])
    out = []
    for _ in range(max_new):
        hiddens, logits = [], []
        for m, s in zip(fuser.experts, seqs):
            ids = torch.tensor([s + out])
            logits.append(m(input_ids=ids).logits[0, -1, :fuser.vocab_size].double())
            hiddens.append(m.base_model(input_ids=ids).last_hidden_state[:, -1])
        w = fuser.gate(hiddens)[0].double()
        z = sum(w[e] * logits[e] for e in range(len(logits)))
        tok = int(z.argmax())
        out.append(tok)
        if tok in eos:
            break
    return out


def test_greedy_equals_the_step_by_step_reference(fuser):
    prompts = _prompts(4)
    max_new = 7
    free = fuser.generate(prompts, max_new_tokens=max_new, eos_token_id=[])
    refs = [eager_greedy(fuser, p, max_new, set()) for p in prompts]
    for b, ref in enumerate(refs):
        assert int(free.new_tokens[b]) == max_new
        assert free.tokens[b].tolist() == ref, f"row {b}"
    # per-row EOS: stop at a token the first row emits at its third step
    eos = refs[0][2]
    out = fuser.generate(prompts, max_new_tokens=max_new, eos_token_id=eos, pad_token_id=0)
    for b, p in enumerate(prompts):
        ref = eager_greedy(fuser, p, max_new, {eos})
        n = int(out.new_tokens[b])
        assert out.tokens[b, :n].tolist() == ref, f"row {b}"
        assert (out.tokens[b, n:] == 0).all()
    assert int(out.new_tokens[0]) <= 3 and out.tokens[0, int(out.new_tokens[0]) - 1] == eos
    # the gate trace: rows sum to 1 where a token was emitted, and match the reference's weights
    for b in range(len(prompts)):
        n = int(out.new_tokens[b])
        torch.testing.assert_close(out.gate[b, :n].sum(-1), torch.ones(n), rtol=0, atol=1e-5)
    assert (out.log_probs <= 0).all()
    assert out.texts[0] == fuser.tokenizer.decode(out.tokens[0, :int(out.new_tokens[0])].tolist(),
                                                  skip_special_tokens=True)


def test_sampling_is_reproducible_with_a_generator(fuser):
    prompts = _prompts(3)
    kw = dict(max_new_tokens=5, temperature=1.3, top_k=20, eos_token_id=[])
    a = fuser.generate(prompts, generator=torch.Generator().manual_seed(7), **kw)
    b = fuser.generate(prompts, generator=torch.Generator().manual_seed(7), **kw)
    assert torch.equal(a.tokens, b.tokens)
    assert (a.tokens < fuser.vocab_size).all()


def test_generate_argument_errors(fuser):
    with pytest.raises(ValueError, match="prompts"):
        fuser.generate("a string, not a list")
    with pytest.raises(ValueError, match="max_new_tokens"):
        fuser.generate(["ab"], max_new_tokens=0)
    with pytest.raises(ValueError, match="top_p"):
        fuser.generate(["ab"], temperature=1.0, top_p=1.5)


def test_chat_template_prompts_are_used_when_no_template_is_given():
    tok = char_tokenizer()
    tok.chat_template = "{% for m in messages %}{{ m['content'] }};{% endfor %}{% if add_generation_prompt %}>{% endif %}"
    experts = [tiny_llama(len(tok), seed=e) for e in range(2)]
    fuser = UltraFuser(experts, tok)
    ids = prompt_ids(tok, fuser.templates, [{"role": "user", "content": "ab"}])
    assert [tok.decode(i) for i in ids] == ["ab;>", "ab;>"]
