"""SoRATrainer's optional L1 term: ``sora_l1_weight · Σ|g|`` is added to the training loss
(and its subgradient to the gates' gradients), never to the evaluation loss."""

import pytest
import torch

from lmfuse.modules import LoRALinear

from .helpers import attach, randomize_lora, tiny_llama


def _trainer(tmp_path, model, l1_weight):
    from transformers import TrainingArguments

    from lmfuse.sora import SoRATrainer

    args = TrainingArguments(output_dir=str(tmp_path), per_device_train_batch_size=4, max_steps=1,
                             report_to=[], save_strategy="no", use_cpu=True, disable_tqdm=True,
                             dataloader_num_workers=0)
    return SoRATrainer(model=model, args=args, sora_l1_weight=l1_weight)


def _gates(model):
    return [m.gate for m in model.modules() if isinstance(m, LoRALinear) and m.gate is not None]


@pytest.mark.parametrize("weight", [0.0, 0.05])
def test_l1_weight_adds_the_gate_norm_to_the_training_loss_and_its_gradient(tmp_path, weight):
    model = tiny_llama(torch.randint(0, 2**31, ()).item())
    attach(model, r=6, gated=True, generator=torch.Generator().manual_seed(1))
    randomize_lora(model, torch.Generator().manual_seed(torch.randint(0, 2**31, ()).item()))
    gates = _gates(model)
    with torch.no_grad():  # gates of both signs, none at 0 (where |g| has no gradient)
        for g in gates:
            g.copy_(torch.where(torch.rand(g.shape) < 0.5, -1.0, 1.0) * (0.2 + torch.rand(g.shape)))
    ids = torch.randint(0, 48, (3, 10))
    inputs = {"input_ids": ids, "labels": ids}
    # independent expectation: the model's own loss plus weight · Σ|g| summed entry by entry
    model.train()
    plain = model(**inputs).loss
    plain_grads = torch.autograd.grad(plain, gates)
    norm = sum(abs(v) for g in gates for v in g.detach().double().tolist())
    trainer = _trainer(tmp_path, model, weight)
    model.train()
    loss = trainer.compute_loss(model, dict(inputs))
    assert loss.item() == pytest.approx(plain.item() + weight * norm, rel=1e-6, abs=1e-6)
    grads = torch.autograd.grad(loss, gates)
    for g, got, base in zip(gates, grads, plain_grads):
        torch.testing.assert_close(got, base + weight * torch.sign(g.detach()), rtol=1e-5, atol=1e-6)
    loss2, outputs = trainer.compute_loss(model, dict(inputs), return_outputs=True)
    assert loss2.item() == pytest.approx(loss.item(), rel=1e-6)
    assert outputs.loss.item() == pytest.approx(plain.item(), rel=1e-6)  # the model's own loss, unchanged
    model.eval()  # evaluation reports the model's loss only
    with torch.no_grad():
        assert trainer.compute_loss(model, dict(inputs)).item() == pytest.approx(model(**inputs).loss.item(), rel=1e-6)
