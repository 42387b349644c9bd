"""Tiny specialists for the fusion tests: a character-level tokenizer, tiny Llamas, three
synthetic domains (arithmetic, bracket sequences, word-list prose) and a short trainer."""

from __future__ import annotations

import string

import torch
from transformers import LlamaConfig, LlamaForCausalLM

CHARS = sorted(set(string.ascii_lowercase + string.digits + "+-*=()[]{}<>;:,. \n?"))
SPECIALS = ["<pad>", "<s>", "</s>", "<unk>"]
WORDS = ["the", "quiet", "river", "walked", "slowly", "under", "green", "hills", "and", "old",
         "house", "she", "said", "every", "morning", "light"]
DOMAINS = ("math", "code", "prose")
TEMPLATES = ["q: {prompt}\na:", "<{prompt}>", "{prompt};"]  # one per expert, different lengths


def char_tokenizer(extra: str = ""):
    """A character-level fast tokenizer (pad 0, bos 1, eos 2, unk 3, then one id per character)."""
    from tokenizers import Regex, Tokenizer, decoders, models, pre_tokenizers
    from transformers import PreTrainedTokenizerFast

    vocab = {s: i for i, s in enumerate(SPECIALS)}
    for c in sorted(set(CHARS) | set(extra)):
        vocab[c] = len(vocab)
    t = Tokenizer(models.WordLevel(vocab, unk_token="<unk>"))
    t.pre_tokenizer = pre_tokenizers.Split(Regex("[\\s\\S]"), behavior="isolated")
    t.decoder = decoders.Fuse()
    return PreTrainedTokenizerFast(tokenizer_object=t, bos_token="<s>", eos_token="</s>", pad_token="<pad>",
                                   unk_token="<unk>")


def tiny_llama(vocab: int, *, hidden: int = 32, layers: int = 2, seed: int = 0, dtype=torch.float32,
               init_range: float = 0.02) -> LlamaForCausalLM:
    with torch.random.fork_rng():
        torch.manual_seed(seed)
        cfg = LlamaConfig(vocab_size=vocab, hidden_size=hidden, intermediate_size=2 * hidden, num_hidden_layers=layers,
                          num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=256,
                          initializer_range=init_range, bos_token_id=1, eos_token_id=2, pad_token_id=0,
                          tie_word_embeddings=False)
        model = LlamaForCausalLM(cfg).to(dtype).eval()
    model.generation_config.eos_token_id = 2
    return model


def make_example(domain: str, g: torch.Generator) -> dict:
    """One prompt/response pair of ``domain`` (deterministic given ``g``)."""
    r = lambda n: int(torch.randint(0, n, (1,), generator=g))  # noqa: E731
    if domain == "math":
        a, b = r(50), r(50)
        return {"prompt": f"{a}+{b}", "response": f"{a + b}", "domain": domain}
    if domain == "code":
        pairs = ["()", "[]", "{}"]
        opened = [pairs[r(3)] for _ in range(2 + r(4))]
        return {"prompt": "".join(p[0] for p in opened), "response": "".join(p[1] for p in reversed(opened)),
                "domain": domain}
    words = [WORDS[r(len(WORDS))] for _ in range(4)]
    return {"prompt": " ".join(words[:2]), "response": " ".join(words[2:]), "domain": domain}


def examples(domain: str, n: int, g: torch.Generator) -> list[dict]:
    return [make_example(domain, g) for _ in range(n)]


def mixed(n_per_domain: int, g: torch.Generator) -> list[dict]:
    return [ex for d in DOMAINS for ex in examples(d, n_per_domain, g)]


def train_specialist(model, tokenizer, template: str, data: list[dict], *, steps: int, batch: int = 32,
                     lr: float = 1e-2, g: torch.Generator) -> None:
    """Fine-tune ``model`` as a plain causal LM on its own domain's examples in its template
    (loss on the response, as an instruction-tuned specialist)."""
    from lmfuse.fusion.data import encode_examples

    model.train()
    opt = torch.optim.AdamW(model.parameters(), lr=lr)
    for _ in range(steps):
        idx = torch.randint(0, len(data), (batch,), generator=g).tolist()
        enc = encode_examples(tokenizer, [template], [data[i] for i in idx])
        out = model(input_ids=enc["input_ids"][0], attention_mask=enc["attention_mask"][0], labels=enc["labels"][0])
        opt.zero_grad()
        out.loss.backward()
        opt.step()
    model.eval()


def specialist_loss(model, tokenizer, template: str, data: list[dict]) -> float:
    """Mean response-token cross-entropy of one model alone (its HF loss, float64 accumulate)."""
    from lmfuse.fusion.data import encode_examples

    enc = encode_examples(tokenizer, [template], data)
    with torch.no_grad():
        logits = model(input_ids=enc["input_ids"][0], attention_mask=enc["attention_mask"][0]).logits.double()
    labels = enc["labels"][0][:, 1:]
    return float(torch.nn.functional.cross_entropy(logits[:, :-1].reshape(-1, logits.shape[-1]), labels.reshape(-1),
                                                   ignore_index=-100))


# ------------------------------------------------------------------ float64 oracles (independent of lmfuse)


def blended_ce_float64(hiddens, weights, gate, target, vocab_size) -> torch.Tensor:
    """Mean cross-entropy of softmax(Σ_e w_e · W_e h_e) over the first ``vocab_size`` rows."""
    z = sum(gate[:, e:e + 1].double() * (hiddens[e].double() @ weights[e][:vocab_size].double().T)
            for e in range(len(hiddens)))
    return torch.nn.functional.cross_entropy(z, target)

