"""SparseGateOptimizer thresholds SoRA gates only: the obvious call on ``model.parameters()`` (or
on the model) leaves every other parameter to plain AdamW, and a list of model weights without
any gate is refused instead of being shrunk."""

import copy

import pytest
import torch
from torch import nn

from lmfuse import delta
from lmfuse.modules import LoRALinear
from lmfuse.sora import SparseGateOptimizer, gate_parameters, is_gate, mark_gate, soft_threshold_

from ..delta.tiny import tiny_llama, token_ids


def _sora_model(seed):
    model = tiny_llama(seed)
    delta.attach(model, delta.SoRAConfig(r=4), generator=torch.Generator().manual_seed(seed))
    with torch.no_grad():  # B starts at 0: give the LoRA term a value so gates get gradients
        for m in model.modules():
            if isinstance(m, LoRALinear):
                m.lora_B.normal_(0, 0.1)
    return model


def _grads(model, ids):
    model.zero_grad()
    model(input_ids=ids, labels=ids).loss.backward()


@pytest.mark.parametrize("form", ["parameters", "model", "trainable"])
def test_only_the_gates_are_thresholded(form):
    seed = torch.randint(0, 2**31, ()).item()
    ours, ref = _sora_model(seed), _sora_model(seed)
    ids = token_ids(generator=torch.Generator().manual_seed(seed))
    if form == "trainable":
        delta.freeze(ours)
        delta.freeze(ref)
    lr, xi = 1e-2, 0.3  # a large ξ: a shrunk base weight would show at once
    params = {"parameters": ours.parameters(), "model": ours,
              "trainable": [p for p in ours.parameters() if p.requires_grad]}[form]
    opt = SparseGateOptimizer(params, lr=lr, xi=xi)
    ref_opt = torch.optim.AdamW([p for p in ref.parameters() if p.requires_grad], lr=lr, weight_decay=0.0)
    for _ in range(2):
        _grads(ours, ids)
        _grads(ref, ids)
        opt.step()
        ref_opt.step()
        for g in gate_parameters(ref):
            soft_threshold_(g, xi)
    gate_ids = {id(g) for g in gate_parameters(ours)}
    assert len(gate_ids) == 4  # q_proj, v_proj of 2 layers
    for (name, p), q in zip(ours.named_parameters(), ref.parameters()):
        assert torch.allclose(p, q, rtol=0, atol=1e-6), name  # AdamW everywhere, prox on the gates only
    # the prox did act: every non-gate matrix kept entries far below ξ in magnitude
    w = ours.model.layers[0].self_attn.q_proj.base.weight
    assert bool(((w.abs() < xi) & (w != 0)).any())
    assert all(is_gate(p) == (id(p) in gate_ids) for p in ours.parameters())
    flags = [g["gate"] for g in opt.param_groups]
    assert flags.count(True) == 1 and sum(len(g["params"]) for g in opt.param_groups if g["gate"]) == 4


def test_model_weights_without_gates_are_refused():
    model = tiny_llama(0)
    with pytest.raises(ValueError, match=r"params: found no SoRA gate.*shape \["):
        SparseGateOptimizer(model.parameters(), xi=0.1)
    with pytest.raises(ValueError, match="params: LlamaForCausalLM has no trainable SoRA gate"):
        SparseGateOptimizer(model, xi=0.1)
    with pytest.raises(TypeError, match="params: a group's 'gate' must be True or False"):
        SparseGateOptimizer([{"params": [nn.Parameter(torch.ones(3))], "gate": 1}])
    with pytest.raises(TypeError, match="single tensor"):
        SparseGateOptimizer(nn.Parameter(torch.ones(3)))


def test_explicit_flags_and_hand_made_gates_still_work():
    w = nn.Parameter(torch.randn(3, 4))
    g = nn.Parameter(torch.tensor([0.5, -0.05, 0.2]))
    opt = SparseGateOptimizer([{"params": [w], "gate": False}, {"params": [g], "gate": True}], lr=0.1, xi=0.1)
    w0 = w.detach().clone()
    w.grad, g.grad = torch.zeros_like(w), torch.zeros_like(g)
    opt.step()
    assert torch.equal(w, w0) and torch.allclose(g, torch.tensor([0.4, 0.0, 0.1]))
    # a marked tensor of your own is a gate in a flat list next to other parameters
    g2 = mark_gate(nn.Parameter(torch.tensor([0.05, 0.9])))
    other = nn.Parameter(torch.tensor([0.05, 0.9]))
    opt = SparseGateOptimizer([other, g2], lr=0.1, xi=0.1)
    other.grad, g2.grad = torch.zeros(2), torch.zeros(2)
    opt.step()
    assert torch.equal(other.detach(), torch.tensor([0.05, 0.9]))
    assert torch.allclose(g2, torch.tensor([0.0, 0.8]))


def test_gate_mark_survives_deepcopy_and_pickling():
    import pickle

    layer = LoRALinear(nn.Linear(5, 3), 2, gated=True)
    for clone in (copy.deepcopy(layer), pickle.loads(pickle.dumps(layer))):
        assert is_gate(clone.gate) and not is_gate(clone.lora_A) and not is_gate(clone.base.weight)
    assert LoRALinear(nn.Linear(5, 3), 2).gate is None
