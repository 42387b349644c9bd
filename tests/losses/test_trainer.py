"""A stock ``transformers.Trainer`` trains on the fused loss after ``fused_causal_lm(model)``:
the same losses step for step as the model's own loss (fp32), with gradient accumulation,
``lmfuse.delta`` LoRA, gradient checkpointing and 2-process DDP, and no ``[B, T, V]`` tensor."""

import datetime
import os

import pytest
import torch
import torch.distributed as dist
from torch.utils._python_dispatch import TorchDispatchMode

from lmfuse import delta
from lmfuse.losses import fused_causal_lm
from lmfuse.testing import assert_close_to_reference, run_two_process_ddp

from . import tiny
from .tiny import fresh_seed, token_ids
from .trainer_utils import random_examples, train

FP32 = torch.float32
_SGD = dict(optim="sgd", lr=0.3)  # large enough that the parameters move well beyond their fp32 spacing


def _count_head_calls(monkeypatch, head):
    """Count the calls of ``head`` (a hook on it would be refused by the fused path: it could
    change the logits, which the fused path never computes)."""
    calls = []
    linear = torch.nn.functional.linear

    def counting(x, weight, bias=None):
        if weight is head.weight:
            calls.append(tuple(x.shape))
        return linear(x, weight, bias)

    monkeypatch.setattr(torch.nn.modules.linear.F, "linear", counting)
    return calls


def _assert_same_run(fused_losses, stock_losses, fused_model, stock_model, initial, what):
    assert len(fused_losses) == len(stock_losses) > 0
    # The two runs differ only in the summation order of the loss: a few fp32 ulps in each
    # gradient, which plain SGD carries forward linearly, so the fp32 bound holds after four
    # steps. (Adam is not used here: it divides each gradient element by that element's running
    # magnitude, so an element whose gradient is at rounding level takes a full step in either
    # direction and no fp32 bound holds; it would also hide a gradient-scale error entirely.)
    assert_close_to_reference(torch.tensor(fused_losses), torch.tensor(stock_losses, dtype=torch.float64),
                              FP32, f"{what}: per-step losses")
    stock, start = dict(stock_model.named_parameters()), dict(initial.named_parameters())
    moved = 0.0
    for name, p in fused_model.named_parameters():
        if p.requires_grad:
            assert_close_to_reference(p, stock[name].double(), FP32, f"{what}: {name} after training")
            moved = max(moved, (p - start[name]).abs().max().item())
    assert moved > 1e-3, "training did not move the parameters far beyond their fp32 spacing"


@pytest.mark.parametrize("accumulation", [1, 2])
def test_stock_trainer_losses_match_step_for_step(tmp_path, monkeypatch, accumulation):
    seed = fresh_seed()
    data = random_examples(16, 12, tiny.VOCAB, torch.Generator().manual_seed(seed))
    stock_model, fused_model, initial = tiny.llama(seed), tiny.llama(seed), tiny.llama(seed)
    stock_calls = _count_head_calls(monkeypatch, stock_model.lm_head)
    stock = train(stock_model, data, tmp_path / "stock", accumulation=accumulation, **_SGD)
    assert len(stock_calls) == 4 * accumulation  # the counter sees the stock head
    head_calls = _count_head_calls(monkeypatch, fused_model.lm_head)
    handle = fused_causal_lm(fused_model)
    fused = train(fused_model, data, tmp_path / "fused", accumulation=accumulation, **_SGD)
    assert handle.calls == 4 * accumulation and head_calls == []  # every step fused, head never run
    _assert_same_run(fused, stock, fused_model, stock_model, initial, f"accumulation={accumulation}")


def test_lora_and_gradient_checkpointing_through_the_trainer(tmp_path):
    seed = fresh_seed()
    data = random_examples(8, 12, tiny.VOCAB, torch.Generator().manual_seed(seed))
    models = []
    for _ in range(3):
        m = tiny.gemma2(seed)  # tied head + softcap, the head frozen under LoRA
        g = torch.Generator().manual_seed(seed)
        delta.attach(m, delta.LoRAConfig(r=4), "lora", g)
        delta.freeze(m)
        with torch.no_grad():
            for p in delta.delta_parameters(m):
                p.normal_(0.0, 0.1, generator=g)
        models.append(m)
    stock_model, fused_model, initial = models
    ckpt = dict(activation_checkpointing=True, activation_checkpointing_kwargs={"use_reentrant": False})
    stock = train(stock_model, data, tmp_path / "stock", **_SGD, **ckpt)
    handle = fused_causal_lm(fused_model)
    fused = train(fused_model, data, tmp_path / "fused", **_SGD, **ckpt)
    assert fused_model.model.gradient_checkpointing and handle.calls == 4
    assert not fused_model.lm_head.weight.requires_grad and fused_model.lm_head.weight.grad is None
    _assert_same_run(fused, stock, fused_model, stock_model, initial, "LoRA + checkpointing")


class _LargestTensor(TorchDispatchMode):
    """Records the largest tensor any op produces (outputs of every dispatched op)."""

    def __init__(self):
        super().__init__()
        self.largest, self.shape = 0, None

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        out = func(*args, **(kwargs or {}))
        for t in out if isinstance(out, (tuple, list)) else (out,):
            if isinstance(t, torch.Tensor) and t.numel() > self.largest:
                self.largest, self.shape = t.numel(), tuple(t.shape)
        return out


def test_no_batch_by_vocab_tensor_in_forward_and_backward():
    seed = fresh_seed()
    B, T = 4, 24  # B·T = 96 > hidden 48, so a [B, T, V] tensor is larger than any weight or gradient
    ids = token_ids(batch=B, seq=T, generator=torch.Generator().manual_seed(seed))
    m = tiny.llama(seed).train()
    bt_v = B * T * tiny.VOCAB
    with _LargestTensor() as stock:  # the control: the detector does see the stock logits
        m(input_ids=ids, labels=ids).loss.backward()
    assert stock.largest >= bt_v
    m.zero_grad()
    with fused_causal_lm(m), _LargestTensor() as fused:
        m(input_ids=ids, labels=ids).loss.backward()
    assert fused.largest < bt_v, f"a {fused.shape} tensor was built"


def test_remove_restores_the_models_own_forward():
    m = tiny.llama(fresh_seed())
    ids = token_ids()
    own = m(input_ids=ids, labels=ids)
    with fused_causal_lm(m) as handle:
        assert handle.active
        fused = m(input_ids=ids, labels=ids)
        assert fused.logits is None
        assert_close_to_reference(fused.loss, own.loss.double(), FP32, "fused loss")
        plain = m(input_ids=ids)  # no labels: the original forward, logits and all
        assert torch.equal(plain.logits, own.logits)
        assert m(ids, None, None, None, None, ids).loss is not None  # labels given positionally
        with pytest.raises(ValueError, match="already installed"):
            fused_causal_lm(m)
    assert "forward" not in m.__dict__ and not handle.active
    assert torch.equal(m(input_ids=ids, labels=ids).logits, own.logits)
    with pytest.raises(ValueError, match="reduction"):
        fused_causal_lm(m, reduction="none")
    with pytest.raises(TypeError, match="return_lse"):
        fused_causal_lm(m, return_lse=True)


def _ddp_worker(rank, world, port, seed, batches, out):
    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port))
    torch.set_num_threads(1)
    dist.init_process_group("gloo", rank=rank, world_size=world, timeout=datetime.timedelta(seconds=120))
    try:
        m = tiny.llama(seed).train()
        handle = fused_causal_lm(m)
        ddp = torch.nn.parallel.DistributedDataParallel(m)
        opt = torch.optim.SGD(ddp.parameters(), lr=0.1)
        per = batches[0].shape[0] // world
        for b in batches:
            ids = b[rank * per:(rank + 1) * per]
            opt.zero_grad()
            ddp(input_ids=ids, labels=ids).loss.backward()
            opt.step()
        if rank == 0:
            torch.save({"state": m.state_dict(), "calls": handle.calls}, out)
        dist.barrier()  # rank 0 hosts the store: nobody leaves before everyone is done
    finally:
        dist.destroy_process_group()



def test_ddp_two_processes_match_the_stock_loss_in_one_process(tmp_path):
    seed = fresh_seed()
    g = torch.Generator().manual_seed(seed)
    batches = [token_ids(batch=4, seq=9, generator=g) for _ in range(3)]  # equal rows: the mean of means is the mean
    out = str(tmp_path / "ddp.pt")
    run_two_process_ddp(_ddp_worker, (seed, batches, out,))  # a hung run fails, never hangs CI
    single = tiny.llama(seed).train()
    start = {k: v.clone() for k, v in single.state_dict().items()}
    opt = torch.optim.SGD(single.parameters(), lr=0.1)
    for ids in batches:
        opt.zero_grad()
        single(input_ids=ids, labels=ids).loss.backward()  # the model's own loss
        opt.step()
    got = torch.load(out)
    assert got["calls"] == len(batches)
    moved = 0.0
    for k, v in single.state_dict().items():
        assert_close_to_reference(got["state"][k], v.double(), FP32, f"{k} after DDP", factor=5)
        moved = max(moved, (v - start[k]).abs().max().item())
    assert moved > 1e-3
