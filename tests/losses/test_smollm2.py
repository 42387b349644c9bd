"""End-to-end on the bundled SmolLM2-135M (real weights, V = 49152, tied head): the fused loss,
the sequence log-probs and a short fine-tune with a stock Trainer match the model's own numbers."""

import copy

import pytest
import torch

from lmfuse.losses import causal_lm_loss, fused_causal_lm, sequence_log_probs
from lmfuse.testing import assert_close_to_reference

from .test_sequence_log_probs import full_logits_log_probs
from .trainer_utils import Examples, train

FP32 = torch.float32

PROMPTS = ["The capital of France is", "Water boils at a temperature of", "def add(a, b):"]
ANSWERS = [" Paris, a city on the Seine.", " one hundred degrees Celsius at sea level.", " return a + b"]


@pytest.fixture(scope="module")
def smollm2():
    from lmfuse.models import load_bundled_model

    try:
        return load_bundled_model()
    except FileNotFoundError as e:
        pytest.skip(f"bundled model unavailable: {e}")


def _encode(tok, left):
    """Prompt + answer, padded to the longest (left or right); the completion is the answer."""
    rows = [(tok(p).input_ids, tok(a).input_ids) for p, a in zip(PROMPTS, ANSWERS)]
    T = max(len(p) + len(a) for p, a in rows)
    pad = tok.pad_token_id if tok.pad_token_id is not None else 0
    ids = torch.full((len(rows), T), pad)
    mask = torch.zeros_like(ids)
    completion = torch.zeros_like(ids)
    for b, (p, a) in enumerate(rows):
        n = len(p) + len(a)
        start = T - n if left else 0
        ids[b, start:start + n] = torch.tensor(p + a)
        mask[b, start:start + n] = 1
        completion[b, start + len(p):start + n] = 1
    return ids, mask, completion


def test_loss_equals_the_models_own(smollm2):
    model, tok = smollm2
    ids, mask, _ = _encode(tok, left=False)
    labels = ids.masked_fill(mask == 0, -100)
    with torch.no_grad():
        own = model(input_ids=ids, attention_mask=mask, labels=labels).loss
        fused = causal_lm_loss(model, ids, labels, mask)
    assert_close_to_reference(fused, own.double(), FP32, "SmolLM2 loss")


@pytest.mark.parametrize("left", [False, True], ids=["right-pad", "left-pad"])
def test_sequence_log_probs_equal_full_logits(smollm2, left):
    model, tok = smollm2
    ids, mask, completion = _encode(tok, left)
    with torch.no_grad():
        out = sequence_log_probs(model, ids, mask, completion)
        ref_sum, ref_n, _ = full_logits_log_probs(model, ids, mask, completion,
                                                 position_ids=(mask.cumsum(-1) - 1).clamp(min=0))
    assert torch.equal(out.n_tokens, ref_n)
    assert_close_to_reference(out.logp_sum, ref_sum, FP32, "SmolLM2 sequence log-probs")


def test_short_fine_tune_matches_the_stock_loss(smollm2, tmp_path):
    model, tok = smollm2
    ids, mask, _ = _encode(tok, left=False)
    data = Examples(ids, mask)
    stock_model, fused_model = copy.deepcopy(model), copy.deepcopy(model)
    for m in (stock_model, fused_model):  # the last block and the final norm train: a short backward
        for name, p in m.named_parameters():
            p.requires_grad_(name.startswith(("model.layers.29.", "model.norm.")))
    kw = dict(steps=3, batch=1, lr=1e-2, optim="sgd")
    stock = train(stock_model, data, tmp_path / "stock", **kw)
    handle = fused_causal_lm(fused_model)
    fused = train(fused_model, data, tmp_path / "fused", **kw)
    assert handle.calls == 3 and len(fused) == len(stock) == 3
    assert_close_to_reference(torch.tensor(fused), torch.tensor(stock, dtype=torch.float64), FP32,
                              "SmolLM2 per-step losses", factor=5)
    stock_params = dict(stock_model.named_parameters())
    for name, p in fused_model.named_parameters():
        if p.requires_grad:
            assert_close_to_reference(p, stock_params[name].double(), FP32, f"SmolLM2 {name} after training", factor=5)
    assert not torch.equal(fused_model.model.norm.weight, model.model.norm.weight)
