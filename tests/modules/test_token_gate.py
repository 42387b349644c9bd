"""TokenGate: the shared scorer's math against a float64 computation written out here, the
per-expert projections, the uniform start, gradients and argument errors."""

import pytest
import torch

from lmfuse.modules import TokenGate
from lmfuse.testing import assert_close_to_reference


def _randomize(gate: TokenGate) -> None:
    with torch.no_grad():
        for p in gate.parameters():
            p.copy_(torch.randn_like(p) * 0.5)


def _oracle(gate: TokenGate, hiddens) -> torch.Tensor:
    """softmax_e( W2·relu(W1·P_e h_e + b1) + b2 ) in float64, from the raw parameters."""
    sd = {k: v.double() for k, v in gate.state_dict().items()}
    scores = []
    for e, h in enumerate(hiddens):
        x = h.double()
        if f"proj.{e}.weight" in sd:
            x = x @ sd[f"proj.{e}.weight"].T
        inner = torch.clamp(x @ sd["scorer.0.weight"].T + sd["scorer.0.bias"], min=0)
        scores.append(inner @ sd["scorer.2.weight"][0] + sd["scorer.2.bias"][0])
    s = torch.stack(scores, -1)
    return torch.exp(s - s.logsumexp(-1, keepdim=True))


@pytest.mark.parametrize("lead", [(13,), (3, 7)], ids=["N", "B,T"])
def test_weights_match_a_float64_oracle(lead):
    gate = TokenGate(24, 3, inner_size=40)
    _randomize(gate)
    hiddens = [torch.randn(*lead, 24) for _ in range(3)]
    w = gate(hiddens)
    assert w.shape == (*lead, 3) and w.dtype == torch.float32
    ref = _oracle(gate, hiddens)
    assert_close_to_reference(w, ref, torch.float32, "gate weights")
    assert torch.allclose(w.sum(-1).double(), torch.ones(lead, dtype=torch.float64), atol=1e-6)


def test_scorer_is_shared_so_equal_hiddens_get_equal_weights():
    gate = TokenGate(16, 4, inner_size=8)
    _randomize(gate)
    h = torch.randn(5, 16)
    other = torch.randn(5, 16)
    w = gate([h, other, h, other])
    torch.testing.assert_close(w[:, 0], w[:, 2], rtol=0, atol=0)
    torch.testing.assert_close(w[:, 1], w[:, 3], rtol=0, atol=0)
    assert not torch.allclose(w[:, 0], w[:, 1])


def test_fresh_gate_is_uniform():
    gate = TokenGate(16, 3)
    w = gate([torch.randn(6, 16) for _ in range(3)])
    torch.testing.assert_close(w, torch.full((6, 3), 1 / 3), rtol=0, atol=1e-7)


def test_experts_of_other_hidden_sizes_get_projections():
    gate = TokenGate(12, 3, inner_size=20, expert_hidden_sizes=[12, 7, 30])
    assert sorted(gate.proj.keys()) == ["1", "2"]
    assert gate.proj["2"].weight.shape == (12, 30) and gate.proj["2"].bias is None
    _randomize(gate)
    hiddens = [torch.randn(9, 12), torch.randn(9, 7), torch.randn(9, 30)]
    assert_close_to_reference(gate(hiddens), _oracle(gate, hiddens), torch.float32, "projected gate")


def test_gradients_match_finite_differences():
    gate = TokenGate(6, 3, inner_size=5, expert_hidden_sizes=[6, 4, 6], dtype=torch.float64)
    _randomize(gate)
    hiddens = [torch.randn(4, s, dtype=torch.float64, requires_grad=True) for s in (6, 4, 6)]
    assert torch.autograd.gradcheck(lambda *h: gate(list(h)), hiddens)
    w = gate(hiddens)
    assert w.dtype == torch.float64
    (w[:, 1] * torch.randn(4, dtype=torch.float64)).sum().backward()
    for name, p in gate.named_parameters():
        if name == "scorer.2.bias":  # a shift shared by every expert's score: the softmax ignores it
            assert p.grad.abs().max() < 1e-12
        else:
            assert p.grad is not None and p.grad.abs().sum() > 0, name


def test_lower_precision_hiddens_are_cast_to_the_gate_dtype():
    gate = TokenGate(16, 2)
    _randomize(gate)
    h = [torch.randn(5, 16).to(torch.bfloat16) for _ in range(2)]
    assert_close_to_reference(gate(h), _oracle(gate, [x.float() for x in h]), torch.float32, "bf16 input")


@pytest.mark.parametrize("make, match", [
    (lambda: TokenGate(0, 2), "hidden_size"),
    (lambda: TokenGate(8, 0), "num_experts"),
    (lambda: TokenGate(8, 2, inner_size=2.5), "inner_size"),
    (lambda: TokenGate(8, 2, expert_hidden_sizes=[8]), "expert_hidden_sizes"),
    (lambda: TokenGate(8, 2, expert_hidden_sizes=[8, -1]), r"expert_hidden_sizes\[1\]"),
])
def test_bad_constructor_arguments(make, match):
    with pytest.raises(ValueError, match=match):
        make()


def test_bad_inputs_name_the_argument():
    gate = TokenGate(8, 2)
    with pytest.raises(TypeError, match="hiddens"):
        gate(torch.randn(3, 8))
    with pytest.raises(ValueError, match="expected 2 tensors"):
        gate([torch.randn(3, 8)])
    with pytest.raises(ValueError, match=r"hiddens\[1\].*\[\.\.\., 8\]"):
        gate([torch.randn(3, 8), torch.randn(3, 9)])
    with pytest.raises(ValueError, match="aligned"):
        gate([torch.randn(3, 8), torch.randn(4, 8)])
    with pytest.raises(TypeError, match=r"hiddens\[0\]"):
        gate([torch.ones(3, 8, dtype=torch.long), torch.randn(3, 8)])
