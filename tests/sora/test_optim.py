"""Proximal step semantics on hand-made gates, the optimizer, the L1 penalty, the schedule."""

import math

import pytest
import torch
from torch import nn

from lmfuse.modules import LoRALinear
from lmfuse.sora import (SparseGateOptimizer, SparsifyScheduler, l1_penalty, sequential_threshold_,
                         soft_threshold_, sparsity_stats, xi_values)

HAND = [0.5, -0.5, 0.15, -0.15, 0.25, -0.25, 0.05, -0.05, 0.0, 0.3]


def test_soft_threshold_on_hand_made_gates():
    g = torch.tensor(HAND, dtype=torch.float64)
    soft_threshold_(g, 0.1)
    expected = [0.4, -0.4, 0.05, -0.05, 0.15, -0.15, 0.0, 0.0, 0.0, 0.2]
    assert torch.allclose(g, torch.tensor(expected, dtype=torch.float64), rtol=0, atol=1e-15)
    assert torch.count_nonzero(g) == 7


def test_sequential_three_mask_version_zeroes_below_twice_xi():
    g = torch.tensor(HAND, dtype=torch.float64)
    sequential_threshold_(g, 0.1)
    # 0.15 → 0.05 by the first mask, then zeroed by the third: everything with |g| < 2ξ goes
    expected = [0.4, -0.4, 0.0, 0.0, 0.15, -0.15, 0.0, 0.0, 0.0, 0.2]
    assert torch.allclose(g, torch.tensor(expected, dtype=torch.float64), rtol=0, atol=1e-15)


def test_threshold_of_a_parameter_in_place_and_bad_xi():
    p = nn.Parameter(torch.tensor([1.0, -0.01]))
    soft_threshold_(p, 0.5)
    assert torch.equal(p.data, torch.tensor([0.5, 0.0]))
    for bad in (-1.0, float("nan"), "0.1"):
        with pytest.raises(ValueError, match="xi"):
            soft_threshold_(p, bad)


def _zero_grad_step(opt, params):
    for p in params:
        p.grad = torch.zeros_like(p)
    opt.step()


@pytest.mark.parametrize("mode,threshold", [("absolute", "soft"), ("lr_scaled", "soft"), ("absolute", "sequential")])
def test_optimizer_applies_the_proximal_step_after_adamw(mode, threshold):
    g = nn.Parameter(torch.tensor(HAND))
    lr, xi = 0.5, 0.1
    opt = SparseGateOptimizer([g], lr=lr, xi=xi, xi_mode=mode, threshold=threshold)
    _zero_grad_step(opt, [g])  # zero gradient: AdamW moves nothing, only the threshold acts
    # Hand-computed from HAND = [0.5, -0.5, 0.15, -0.15, 0.25, -0.25, 0.05, -0.05, 0.0, 0.3]:
    # soft with ξ=0.1 shrinks by 0.1 and zeroes |g| ≤ 0.1; lr_scaled uses ξ·lr = 0.05 (0.05 → 0);
    # the sequential masks zero everything below 2ξ = 0.2 and shrink the rest by 0.1.
    expected = {
        ("absolute", "soft"): [0.4, -0.4, 0.05, -0.05, 0.15, -0.15, 0.0, 0.0, 0.0, 0.2],
        ("lr_scaled", "soft"): [0.45, -0.45, 0.1, -0.1, 0.2, -0.2, 0.0, 0.0, 0.0, 0.25],
        ("absolute", "sequential"): [0.4, -0.4, 0.0, 0.0, 0.15, -0.15, 0.0, 0.0, 0.0, 0.2],
    }[(mode, threshold)]
    assert torch.allclose(g.data, torch.tensor(expected), rtol=0, atol=1e-7)


def test_optimizer_adam_update_matches_adamw_then_threshold():
    torch.manual_seed(torch.randint(0, 2**31, ()).item())
    g1 = nn.Parameter(torch.randn(12))
    g2 = nn.Parameter(g1.detach().clone())
    w = nn.Parameter(torch.randn(5))
    w2 = nn.Parameter(w.detach().clone())
    ours = SparseGateOptimizer([{"params": [w], "gate": False}, {"params": [g1]}], lr=0.05, xi=0.02)
    ref = torch.optim.AdamW([w2, g2], lr=0.05, weight_decay=0.0)
    for _ in range(3):
        grads = torch.randn(12), torch.randn(5)
        g1.grad, g2.grad, w.grad, w2.grad = grads[0].clone(), grads[0].clone(), grads[1].clone(), grads[1].clone()
        ours.step()
        ref.step()
        with torch.no_grad():  # the proximal step of 0.02·‖·‖₁, written out: shrink toward 0, clip at 0
            g2.copy_(torch.where(g2 > 0.02, g2 - 0.02, torch.where(g2 < -0.02, g2 + 0.02, torch.zeros_like(g2))))
    assert torch.allclose(g1, g2, atol=1e-7) and torch.allclose(w, w2, atol=1e-7)
    assert ours.xi == 0.02
    ours.xi = 0.5
    assert ours.param_groups[1]["xi"] == 0.5 and ours.param_groups[0]["xi"] == 0.02  # non-gate group untouched


def test_optimizer_rejects_bad_options():
    p = nn.Parameter(torch.ones(3))
    with pytest.raises(ValueError, match="xi_mode"):
        SparseGateOptimizer([p], xi_mode="relative")
    with pytest.raises(ValueError, match="threshold"):
        SparseGateOptimizer([p], threshold="hard")


def _gated_model(r=5):
    return nn.Sequential(LoRALinear(nn.Linear(7, 6), r, gated=True), nn.ReLU(), LoRALinear(nn.Linear(6, 3), r, gated=True),
                         LoRALinear(nn.Linear(3, 3), 2))


def test_l1_penalty_and_sparsity_stats():
    m = _gated_model()
    with torch.no_grad():
        m[0].gate.copy_(torch.tensor([1.0, -2.0, 0.0, 0.5, 0.0]))
        m[2].gate.copy_(torch.tensor([0.0, 0.0, 0.0, 3.0, -1.0]))
    pen = l1_penalty(m, 0.1)
    assert math.isclose(pen.item(), 0.1 * 7.5, rel_tol=1e-6)
    pen.backward()
    assert torch.equal(m[0].gate.grad, 0.1 * torch.sign(m[0].gate.detach()))
    s = sparsity_stats(m)
    assert s["gates"] == 10 and s["nonzero_gates"] == 5 and math.isclose(s["sparsity"], 0.5)
    assert s["nonzero_params"] == 3 * (7 + 6) + 2 * (6 + 3) and s["params"] == 5 * 13 + 5 * 9
    with pytest.raises(ValueError, match="no gates"):
        l1_penalty(nn.Linear(2, 2), 1.0)


def test_xi_schedules():
    assert xi_values(0.0, 0.3, 4, "linear") == pytest.approx([0.0, 0.1, 0.2, 0.3])
    exp = xi_values(1e-3, 1e-1, 3, "exp")
    assert exp == pytest.approx([1e-3, 1e-2, 1e-1])
    log = xi_values(0.0, 2.0, 3, "log")
    assert log[0] == pytest.approx(0.0) and log[-1] == pytest.approx(2.0)
    assert log[1] == pytest.approx(math.log((1 + math.exp(2)) / 2))
    for kind in ("linear", "log", "exp"):
        v = xi_values(1e-3, 1.0, 6, kind)
        assert all(b > a for a, b in zip(v, v[1:]))
    with pytest.raises(ValueError, match="start > 0"):
        xi_values(0.0, 1.0, 3, "exp")
    with pytest.raises(ValueError, match="kind"):
        xi_values(0.0, 1.0, 3, "cubic")


def test_scheduler_raises_xi_in_stages_and_records_each(tmp_path):
    m = _gated_model()
    opt = SparseGateOptimizer([l.gate for l in (m[0], m[2])], lr=1e-3)
    metric = iter(range(100))
    sched = SparsifyScheduler(m, [0.0, 0.4, 0.8, 1.6], steps_per_stage=2, metric_fn=lambda: next(metric), optimizer=opt)
    assert opt.xi == 0.0
    seen = []
    while not sched.done:
        _zero_grad_step(opt, [m[0].gate, m[2].gate])
        rec = sched.step()
        seen.append(opt.xi)
    assert seen == [0.0, 0.4, 0.4, 0.8, 0.8, 1.6, 1.6, 1.6]
    assert [r["xi"] for r in sched.history] == [0.0, 0.4, 0.8, 1.6] and rec["stage"] == 3
    assert [r["metric"] for r in sched.history] == [0, 1, 2, 3]
    sparsity = [r["sparsity"] for r in sched.history]
    assert sparsity[0] == 0.0 and all(b >= a for a, b in zip(sparsity, sparsity[1:])) and sparsity[-1] > 0.5
    assert sched.step() is None
    sched.plot(str(tmp_path / "s.png"))
    assert (tmp_path / "s.png").stat().st_size > 1000
