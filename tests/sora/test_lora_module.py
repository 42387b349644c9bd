"""LoRALinear: initialisation, agreement with peft's LoRA layer, merge / unmerge, compact."""

import copy

import pytest
import torch
from torch import nn

from lmfuse.modules import LoRALinear
from lmfuse.ops import gated_lora_linear_reference
from lmfuse.testing import assert_close_to_reference


def _gen():
    return torch.Generator().manual_seed(torch.randint(0, 2**31, ()).item())


def _layer(gated, d_in=27, d_out=19, r=6, dropout=0.0, bias=True, gen=None):
    base = nn.Linear(d_in, d_out, bias=bias)
    return LoRALinear(base, r, lora_alpha=12.0, dropout=dropout, gated=gated, generator=gen)


@pytest.mark.parametrize("gated", [True, False])
def test_fresh_layer_leaves_the_base_output_unchanged(gated):
    m = _layer(gated, gen=_gen())
    x = torch.randn(4, 7, 27)
    with torch.no_grad():  # B = 0: only the base term's rounding can differ
        assert_close_to_reference(m(x), m.base(x).double(), torch.float32)
    assert m.scaling == 12.0 / 6 and m.r == 6 and (m.in_features, m.out_features) == (27, 19)
    assert torch.count_nonzero(m.lora_B) == 0 and torch.count_nonzero(m.lora_A) == m.lora_A.numel()
    assert (m.gate is not None) == gated
    assert set(dict(m.named_children())) >= {"base"}
    assert "base.weight" in m.state_dict() and "lora_A" in m.state_dict()


def test_initialisation_is_reproducible_with_a_generator_and_gate_is_standard_normal():
    seed = torch.randint(0, 2**31, ()).item()
    a = _layer(True, r=256, gen=torch.Generator().manual_seed(seed))
    b = _layer(True, r=256, gen=torch.Generator().manual_seed(seed))
    assert torch.equal(a.lora_A, b.lora_A) and torch.equal(a.gate, b.gate)
    # SoRA's code: gate = randn(1, r); A Kaiming-uniform(a=√5) → U(−1/√d_in, 1/√d_in)
    assert abs(a.gate.mean().item()) < 0.3 and 0.8 < a.gate.std().item() < 1.2
    assert a.lora_A.abs().max().item() <= 27 ** -0.5


@pytest.mark.parametrize("gated", [True, False])
def test_forward_matches_the_float64_reference(gated):
    m = _layer(gated, gen=_gen())
    with torch.no_grad():
        m.lora_B.normal_()
    x = torch.randn(3, 11, 27)
    ref = gated_lora_linear_reference(x.double(), m.base.weight.double(), m.base.bias.double(), m.lora_A.double(),
                                      m.lora_B.double(), None if m.gate is None else m.gate.double(), m.scaling)
    assert_close_to_reference(m(x), ref, torch.float32)


@pytest.mark.parametrize("dropout", [0.0, 0.3])
def test_plain_lora_matches_peft_lora_layer(dropout):
    peft = pytest.importorskip("peft")

    class Net(nn.Module):
        def __init__(self):
            super().__init__()
            self.proj = nn.Linear(27, 19)

        def forward(self, x):
            return self.proj(x)

    net = Net()
    pm = peft.get_peft_model(copy.deepcopy(net), peft.LoraConfig(r=6, lora_alpha=12, lora_dropout=dropout,
                                                                  target_modules=["proj"]))
    ours = LoRALinear(copy.deepcopy(net.proj), 6, lora_alpha=12.0, dropout=dropout)
    layer = pm.base_model.model.proj
    with torch.no_grad():
        layer.lora_B["default"].weight.normal_()
        ours.lora_A.copy_(layer.lora_A["default"].weight)
        ours.lora_B.copy_(layer.lora_B["default"].weight)
    assert layer.scaling["default"] == ours.scaling
    x = torch.randn(5, 27, requires_grad=True)
    pm.train(), ours.train()
    seed = torch.randint(0, 2**31, ()).item()
    torch.manual_seed(seed)  # the same dropout mask: both draw it once, on the LoRA input only
    y_peft = pm(x)
    torch.manual_seed(seed)
    y_ours = ours(x)
    assert_close_to_reference(y_ours, y_peft.double(), torch.float32)
    g_peft = torch.autograd.grad(y_peft.square().sum(), (x, layer.lora_A["default"].weight, layer.lora_B["default"].weight))
    g_ours = torch.autograd.grad(y_ours.square().sum(), (x, ours.lora_A, ours.lora_B))
    for name, a, b in zip(("dx", "dA", "dB"), g_ours, g_peft):
        assert_close_to_reference(a, b.double(), torch.float32, name)


@pytest.mark.parametrize("gated", [True, False])
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_merge_then_unmerge(gated, dtype):
    m = _layer(gated, gen=_gen()).to(dtype)
    with torch.no_grad():
        m.lora_B.normal_()
    w0 = m.base.weight.detach().clone()
    x = torch.randn(9, 27, dtype=dtype)
    with torch.no_grad():
        y = m(x)
        m.merge()
        assert m.merged
        y_merged = m(x)
        assert torch.equal(y_merged, m.base(x))  # merged forward is the base layer alone
        m.unmerge()
        y_back = m(x)
    assert torch.equal(m.base.weight, w0)  # exact, even in bf16
    assert torch.equal(y_back, y)
    ref = gated_lora_linear_reference(x.double(), w0.double(), m.base.bias.double(), m.lora_A.double(),
                                      m.lora_B.double(), None if m.gate is None else m.gate.double(), m.scaling)
    assert_close_to_reference(y_merged, ref, dtype, "merged output")


def test_compact_keeps_outputs_and_drops_zero_ranks():
    m = _layer(True, r=9, gen=_gen())
    with torch.no_grad():
        m.lora_B.normal_()
        m.gate[torch.tensor([1, 4, 5, 8])] = 0.0
    x = torch.randn(13, 27)
    with torch.no_grad():
        y = m(x)
        a_keep = m.lora_A[torch.tensor([0, 2, 3, 6, 7])].clone()
        scaling = m.scaling
        m.compact()
        y2 = m(x)
    assert m.gate is None and m.r == 5 and m.lora_A.shape == (5, 27) and m.lora_B.shape == (19, 5)
    assert torch.equal(m.lora_A, a_keep) and m.scaling == scaling
    assert_close_to_reference(y2, y.double(), torch.float32)
    assert m.lora_A.requires_grad and m.lora_B.requires_grad


def test_compact_with_every_gate_zero_keeps_one_inert_rank():
    m = _layer(True, r=4, gen=_gen())
    with torch.no_grad():
        m.lora_B.normal_()
        m.gate.zero_()
        x = torch.randn(3, 27)
        m.compact()
        assert m.r == 1 and torch.count_nonzero(m.lora_B) == 0
        assert torch.equal(m(x), m.base(x))


def test_merged_layer_refuses_compact_and_bad_arguments_raise():
    m = _layer(True, gen=_gen())
    m.merge()
    with pytest.raises(RuntimeError, match="unmerge"):
        m.compact()
    with pytest.raises(TypeError, match="nn.Linear"):
        LoRALinear(nn.Conv1d(3, 3, 1), 4)
    with pytest.raises(ValueError, match="r must be a positive int"):
        LoRALinear(nn.Linear(3, 3), 0)
    with pytest.raises(ValueError, match="dropout"):
        LoRALinear(nn.Linear(3, 3), 2, dropout=1.0)
    for alpha in (0.0, -8.0, float("nan"), float("inf")):
        with pytest.raises(ValueError, match="lora_alpha"):
            LoRALinear(nn.Linear(3, 3), 2, lora_alpha=alpha)
