"""Reward models: the score equals LlamaForSequenceClassification's on the same weights, the
AutoModelForSequenceClassification round trip, the Bradley–Terry loss with margin and centring,
and a short RewardTrainer run that learns a synthetic preference."""

import math

import pytest
import torch
from transformers import (AutoModelForSequenceClassification, LlamaConfig, LlamaForCausalLM,
                          LlamaForSequenceClassification, TrainingArguments)

from lmfuse.align import RewardCollator, RewardModel, RewardTrainer, pairwise_accuracy

VOCAB, PAD = 61, 0


def tiny_lm(layers=2, hidden=32):
    cfg = LlamaConfig(vocab_size=VOCAB, hidden_size=hidden, intermediate_size=48, num_hidden_layers=layers,
                      num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=64, pad_token_id=PAD,
                      initializer_range=0.2)
    return LlamaForCausalLM(cfg)


def random_batch(B=5, T=11, left=False):
    ids = torch.randint(1, VOCAB, (B, T))
    lengths = torch.randint(3, T + 1, (B,))
    lengths[0] = T
    mask = torch.zeros(B, T, dtype=torch.long)
    for b, n in enumerate(lengths.tolist()):
        if left:
            mask[b, T - n:] = 1
        else:
            mask[b, :n] = 1
    return ids.masked_fill(mask == 0, PAD), mask


def hf_classifier(rm: RewardModel) -> LlamaForSequenceClassification:
    """An independent LlamaForSequenceClassification holding copies of the reward model's weights."""
    hf = LlamaForSequenceClassification(rm.config).double().eval()
    hf.model.load_state_dict(rm.backbone.state_dict())
    with torch.no_grad():
        hf.score.weight.copy_(rm.score.weight)
    return hf


@pytest.mark.parametrize("left", [False, True])
def test_score_equals_llama_for_sequence_classification(left):
    rm = RewardModel.from_causal_lm(tiny_lm()).double().eval()
    hf = hf_classifier(rm)
    ids, mask = random_batch(left=left)
    with torch.no_grad():
        got = rm(ids, mask)
        want = hf(input_ids=ids, attention_mask=mask).logits[:, 0]
        # without a mask: the last non-pad id, as the HF head reads it (right padding: the pads
        # come after the scored token, so a causal model's reward does not depend on them)
        got_no_mask = None if left else rm(ids)
    assert got.dtype == torch.float32 and got.shape == (5,)
    torch.testing.assert_close(got.double(), want, rtol=1e-6, atol=1e-6)
    if got_no_mask is not None:
        torch.testing.assert_close(got_no_mask.double(), want, rtol=1e-6, atol=1e-6)


def test_from_causal_lm_shares_the_backbone():
    lm = tiny_lm()
    rm = RewardModel.from_causal_lm(lm)
    assert rm.backbone.embed_tokens.weight is lm.model.embed_tokens.weight
    assert rm.config.num_labels == 1 and rm.config.pad_token_id == PAD
    assert rm.score.bias is None and rm.score.weight.shape == (1, 32)


def test_save_load_round_trip_as_sequence_classification(tmp_path):
    rm = RewardModel.from_causal_lm(tiny_lm()).eval()
    rm.save_pretrained(tmp_path)
    ids, mask = random_batch()
    auto = AutoModelForSequenceClassification.from_pretrained(tmp_path).eval()
    again = RewardModel.from_pretrained(tmp_path).eval()
    assert type(auto).__name__ == "LlamaForSequenceClassification" and auto.config.num_labels == 1
    with torch.no_grad():
        want = rm(ids, mask)
        # HF scores every position then picks one; the reward model picks then scores: the same
        # numbers up to fp32 rounding of a differently blocked matmul
        torch.testing.assert_close(auto(input_ids=ids, attention_mask=mask).logits[:, 0], want)
        torch.testing.assert_close(again(ids, mask), want, rtol=0, atol=0)
    saved = {**{f"model.{k}": v for k, v in rm.backbone.state_dict().items()}, "score.weight": rm.score.weight}
    loaded = auto.state_dict()
    assert set(saved) == set(loaded)
    assert all(torch.equal(saved[k], loaded[k]) for k in saved)            # the weights round-trip bit for bit


def test_from_pretrained_refuses_several_labels(tmp_path):
    cfg = tiny_lm().config
    cfg.num_labels = 3
    LlamaForSequenceClassification(cfg).save_pretrained(tmp_path)
    with pytest.raises(ValueError, match="num_labels=3"):
        RewardModel.from_pretrained(tmp_path)


def test_collator_layout_and_margin():
    feats = [{"chosen_input_ids": [5, 6, 7], "rejected_input_ids": [5, 8], "margin": 0.5},
             {"chosen_input_ids": [9], "rejected_input_ids": [9, 10, 11, 12], "margin": 1}]
    b = RewardCollator(PAD)(feats)
    assert b["input_ids"].tolist() == [[5, 6, 7, 0], [9, 0, 0, 0], [5, 8, 0, 0], [9, 10, 11, 12]]
    assert b["attention_mask"].sum(1).tolist() == [3, 1, 2, 4]
    assert b["margin"].tolist() == [0.5, 1.0]
    assert "margin" not in RewardCollator(PAD)([{k: v for k, v in f.items() if k != "margin"} for f in feats])
    with pytest.raises(KeyError, match="rejected_input_ids"):
        RewardCollator(PAD)([{"chosen_input_ids": [1]}])


def test_trainer_loss_with_margin_and_centring_matches_the_closed_form(tmp_path):
    rm = RewardModel.from_causal_lm(tiny_lm()).eval()
    args = TrainingArguments(output_dir=str(tmp_path), report_to=[], use_cpu=True)
    coef = 0.01
    trainer = RewardTrainer(rm, args, center_rewards_coefficient=coef)
    feats = [{"chosen_input_ids": torch.randint(1, VOCAB, (n,)).tolist(),
              "rejected_input_ids": torch.randint(1, VOCAB, (m,)).tolist(), "margin": float(g)}
             for n, m, g in [(4, 6, 0.3), (7, 2, -1.0), (5, 5, 2.0)]]
    batch = trainer.data_collator(feats)
    with torch.no_grad():
        loss = trainer.compute_loss(rm, batch)
        rc = torch.stack([rm(torch.tensor([f["chosen_input_ids"]]))[0] for f in feats]).double()
        rr = torch.stack([rm(torch.tensor([f["rejected_input_ids"]]))[0] for f in feats]).double()
    margin = torch.tensor([0.3, -1.0, 2.0], dtype=torch.float64)
    # −log σ(x) = log(1 + e^(−x)), written out independently of bt_loss
    want = torch.log1p(torch.exp(-(rc - rr - margin))).mean() + coef * ((rc + rr) ** 2).mean()
    assert float(loss) == pytest.approx(float(want), rel=1e-5, abs=1e-6)


def _pairs(n, good, bad, T=6):
    """Pairs whose sequences differ only in their last token: a token of ``good`` (chosen) or of
    ``bad`` (rejected) after a shared random prefix."""
    out = []
    for _ in range(n):
        prefix = torch.randint(1, VOCAB, (T - 1,)).tolist()
        g = good[int(torch.randint(0, len(good), ()))]
        b = bad[int(torch.randint(0, len(bad), ()))]
        out.append({"chosen_input_ids": prefix + [g], "rejected_input_ids": prefix + [b]})
    return out


def test_reward_trainer_learns_a_synthetic_preference(tmp_path):
    torch.manual_seed(int(torch.randint(0, 2**31, ())))
    rm = RewardModel.from_causal_lm(tiny_lm(layers=1))
    # the preference runs against the untrained model: "good" are the last tokens it scores lowest
    with torch.no_grad():
        rm.eval()
        r = rm(torch.arange(1, VOCAB)[:, None].repeat(1, 2))
    order = (torch.argsort(r) + 1).tolist()
    good, bad = order[:4], order[-4:]
    train, held_out = _pairs(64, good, bad), _pairs(48, good, bad)
    before = pairwise_accuracy(rm, held_out)
    args = TrainingArguments(output_dir=str(tmp_path), per_device_train_batch_size=8, per_device_eval_batch_size=16,
                             learning_rate=5e-3, num_train_epochs=6, logging_steps=4, report_to=[], use_cpu=True,
                             save_strategy="no", disable_tqdm=True)
    trainer = RewardTrainer(rm, args, train_dataset=train, eval_dataset=held_out)
    trainer.train()
    losses = [h["loss"] for h in trainer.state.log_history if "loss" in h]
    metrics = trainer.evaluate()
    after = pairwise_accuracy(rm, held_out)
    assert metrics["eval_accuracy"] == pytest.approx(after)
    assert losses[-1] < 0.5 * losses[0] and losses[0] > math.log(2) * 0.5
    assert after >= 0.9 and after - before >= 0.4, (before, after)
    trainer.save_model(str(tmp_path / "rm"))
    again = RewardModel.from_pretrained(tmp_path / "rm")
    assert pairwise_accuracy(again, held_out) == after


def test_bad_arguments():
    rm = RewardModel.from_causal_lm(tiny_lm())
    with pytest.raises(ValueError, match="input_ids"):
        rm(torch.zeros(3, dtype=torch.long))
    with pytest.raises(ValueError, match="attention_mask"):
        rm(torch.ones(2, 3, dtype=torch.long), torch.ones(2, 4))
    with pytest.raises(TypeError, match="RewardModel"):
        RewardTrainer(tiny_lm())
    with pytest.raises(ValueError, match="center_rewards_coefficient"):
        RewardTrainer(rm, center_rewards_coefficient=-1.0)
    with pytest.raises(ValueError, match="pairs"):
        pairwise_accuracy(rm, [])
