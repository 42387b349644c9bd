"""Preference losses against an independent scalar transcription of TRL 1.16's formulas (plain
Python floats and ``math``, one pair at a time), closed-form anchors, TRL's own loss methods where
they can be called alone, float64 gradient checks and input validation."""

import math
from types import SimpleNamespace

import pytest
import torch

from lmfuse.align import preference as P
from lmfuse.align import bt_loss, kto_loss, orpo_loss, preference_loss, simpo_loss
from lmfuse.testing import assert_close_to_reference

F64 = torch.float64
PAIR_TYPES = [t for t in P.PREFERENCE_LOSS_TYPES if t not in ("aot", "aot_unpaired", "kto_pair", "sft")]


def _ls(x):  # log σ(x), stable for both signs
    return -math.log1p(math.exp(-x)) if x >= 0 else x - math.log1p(math.exp(x))


def _sig(x):
    return math.exp(_ls(x))


def _score(r, f, a):
    if f == "reverse_kl":
        return r
    if f == "forward_kl":
        return 1 - math.exp(-r)
    if f == "js_divergence":
        return math.log(2) + _ls(r)
    return (math.exp((a - 1) * r) - 1) / (a - 1)


def _pair_loss(t, pc, pr, rc, rr, nc, nr, b, e, tau=0.05, f="reverse_kl", a=0.5):
    """One pair's loss, written from TRL 1.16 ``DPOTrainer._compute_loss`` (the loss switch)."""
    lc, lr = pc - rc, pr - rr
    d = _score(lc, f, a) - _score(lr, f, a)
    if t == "sigmoid":
        return -_ls(b * d)
    if t == "hinge":
        return max(0.0, 1 - b * d)
    if t == "ipo":
        return (_score(lc, f, a) / nc - _score(lr, f, a) / nr - 1 / (2 * b)) ** 2
    if t == "exo_pair":
        z = b * d
        return _sig(z) * (_ls(z) - math.log(1 - e)) + _sig(-z) * (_ls(-z) - math.log(e))
    if t == "nca_pair":
        return -_ls(b * lc) - 0.5 * _ls(-b * lc) - 0.5 * _ls(-b * lr)
    if t == "robust":
        return (-(1 - e) * _ls(b * d) + e * _ls(-b * d)) / (1 - 2 * e)
    if t == "bco_pair":
        return -_ls(b * lc) - _ls(-b * lr)
    if t == "sppo_hard":
        return (lc - 1 / (2 * b)) ** 2 + (lr + 1 / (2 * b)) ** 2
    if t == "apo_zero":
        return 1 - _sig(b * lc) + _sig(b * lr)
    if t == "apo_down":
        return _sig(b * lc) + 1 - _sig(b * (lc - lr))
    if t == "discopop":
        z = b * d
        m = _sig(z / tau)
        return -_ls(z) * (1 - m) + math.exp(-z) * m
    if t == "sigmoid_norm":
        return -_ls(b * (_score(lc, f, a) / nc - _score(lr, f, a) / nr))
    raise AssertionError(t)


def _inputs(B=13, low=-60.0, high=-5.0):
    """Random float64 summed log-probs, a reference near the policy, and completion lengths."""
    pc, pr = torch.empty(B, dtype=F64).uniform_(low, high), torch.empty(B, dtype=F64).uniform_(low, high)
    rc, rr = pc + torch.randn(B, dtype=F64) * 3, pr + torch.randn(B, dtype=F64) * 3
    nc, nr = torch.randint(1, 40, (B,)).to(F64), torch.randint(1, 40, (B,)).to(F64)
    return pc, pr, rc, rr, nc, nr


def _eps(t, eps):
    return 1e-3 if t == "exo_pair" and eps == 0 else eps


@pytest.mark.parametrize("beta", [0.1, 1.0])
@pytest.mark.parametrize("eps", [0.0, 0.2])
@pytest.mark.parametrize("loss_type", PAIR_TYPES)
def test_pair_types_match_the_scalar_transcription(loss_type, beta, eps):
    pc, pr, rc, rr, nc, nr = _inputs()
    e = _eps(loss_type, eps)
    losses, cr, rj = preference_loss(pc, pr, rc, rr, loss_type=loss_type, beta=beta, label_smoothing=e,
                                     chosen_lengths=nc, rejected_lengths=nr)
    want = torch.tensor([_pair_loss(loss_type, *map(float, row), beta, e)
                         for row in zip(pc, pr, rc, rr, nc, nr)], dtype=F64)
    assert losses.shape == (13,)
    assert_close_to_reference(losses, want, F64, f"{loss_type} losses")
    assert_close_to_reference(cr, beta * (pc - rc), F64, "chosen rewards")
    assert_close_to_reference(rj, beta * (pr - rr), F64, "rejected rewards")
    assert not cr.requires_grad


@pytest.mark.parametrize("f", ["forward_kl", "js_divergence", "alpha_divergence"])
@pytest.mark.parametrize("loss_type", ["sigmoid", "ipo", "hinge", "sigmoid_norm", "discopop"])
def test_f_divergence_scores(loss_type, f):
    pc, pr, rc, rr, nc, nr = _inputs(low=-12, high=-2)
    rc, rr = pc + torch.randn(13, dtype=F64) * 0.5, pr + torch.randn(13, dtype=F64) * 0.5
    losses, _, _ = preference_loss(pc, pr, rc, rr, loss_type=loss_type, beta=0.5, f_divergence=f, f_alpha=0.3,
                                   chosen_lengths=nc, rejected_lengths=nr)
    want = torch.tensor([_pair_loss(loss_type, *map(float, row), 0.5, 0.0, f=f, a=0.3)
                         for row in zip(pc, pr, rc, rr, nc, nr)], dtype=F64)
    assert_close_to_reference(losses, want, F64, f"{loss_type}/{f}")


@pytest.mark.parametrize("loss_type", ["aot", "aot_unpaired"])
def test_aot_sorts_over_the_batch(loss_type):
    pc, pr, rc, rr, _, _ = _inputs()
    b, e = 0.3, 0.1
    if loss_type == "aot":
        x, y = sorted((pc - pr).tolist()), sorted((rc - rr).tolist())
    else:
        x, y = sorted((pc - rc).tolist()), sorted((pr - rr).tolist())
    want = torch.tensor([-(1 - e) * _ls(b * (u - v)) - e * _ls(-b * (u - v)) for u, v in zip(x, y)], dtype=F64)
    losses, _, _ = preference_loss(pc, pr, rc, rr, loss_type=loss_type, beta=b, label_smoothing=e)
    assert_close_to_reference(losses, want, F64, loss_type)


def test_kto_pair_as_trl_0_9():
    """TRL ≤ 0.9: 2B terms with the clamped batch means, averaged over all 2B."""
    pc, pr, rc, rr, _, _ = _inputs()
    b = 0.5
    lc, lr = (pc - rc).tolist(), (pr - rr).tolist()
    zc, zr = max(sum(lc) / len(lc), 0.0), max(sum(lr) / len(lr), 0.0)
    terms = [1 - _sig(b * (x - zr)) for x in lc] + [1 - _sig(b * (zc - x)) for x in lr]
    mean, _, _ = preference_loss(pc, pr, rc, rr, loss_type="kto_pair", beta=b, reduction="mean")
    assert abs(mean.item() - sum(terms) / len(terms)) < 1e-12
    # the batch means are not detached: the gradient of one pair's log-prob reaches all pairs
    pc.requires_grad_(True)
    losses, _, _ = preference_loss(pc, pr, rc, rr, loss_type="kto_pair", beta=b)
    g, = torch.autograd.grad(losses[0], pc)
    assert (g[1:] != 0).any() == (sum(lc) > 0)


def test_sft_is_the_token_mean_nll_of_the_chosen():
    pc, pr, rc, rr, nc, nr = _inputs()
    losses, _, _ = preference_loss(pc, pr, rc, rr, loss_type="sft", chosen_lengths=nc, rejected_lengths=nr)
    assert_close_to_reference(losses, (-pc.sum() / nc.sum()).expand(13), F64, "sft")


def test_closed_form_anchors_at_policy_equal_to_reference():
    """π = ref ⇒ every log-ratio is 0: values worked out by hand."""
    x = torch.empty(5, dtype=F64).uniform_(-30, -1)
    y = torch.empty(5, dtype=F64).uniform_(-30, -1)
    n = torch.full((5,), 7.0, dtype=F64)
    b, e, L2 = 0.25, 0.1, math.log(2)
    anchors = {"sigmoid": L2, "hinge": 1.0, "ipo": 1 / (4 * b * b), "exo_pair": -L2 - 0.5 * math.log((1 - e) * e),
               "nca_pair": 2 * L2, "robust": L2, "bco_pair": 2 * L2, "sppo_hard": 2 / (4 * b * b),
               "aot": L2, "aot_unpaired": L2, "apo_zero": 1.0, "apo_down": 1.0, "discopop": 0.5 * L2 + 0.5,
               "sigmoid_norm": L2, "kto_pair": 0.5}
    assert set(anchors) | {"sft"} == set(P.PREFERENCE_LOSS_TYPES)
    for t, v in anchors.items():
        losses, _, _ = preference_loss(x, y, x.clone(), y.clone(), loss_type=t, beta=b, label_smoothing=e,
                                       chosen_lengths=n, rejected_lengths=n)
        assert torch.allclose(losses, torch.full_like(losses, v), rtol=1e-13, atol=0), t


def test_reference_free_is_a_zero_reference():
    pc, pr, _, _, nc, nr = _inputs()
    zero = torch.zeros_like(pc)
    for t in P.PREFERENCE_LOSS_TYPES:
        kw = dict(loss_type=t, beta=0.2, label_smoothing=0.1, chosen_lengths=nc, rejected_lengths=nr)
        a, ar, _ = preference_loss(pc, pr, **kw)
        b, br, _ = preference_loss(pc, pr, zero, zero, **kw)
        assert torch.equal(a, b) and torch.equal(ar, br), t


def test_weighted_list_of_types_is_the_weighted_sum():
    pc, pr, rc, rr, nc, nr = _inputs()
    kw = dict(beta=0.3, chosen_lengths=nc, rejected_lengths=nr)
    mix, _, _ = preference_loss(pc, pr, rc, rr, loss_type=["sigmoid", "sft", "ipo"], loss_weights=[0.8, 0.2, 1.5], **kw)
    want = torch.tensor([0.8 * _pair_loss("sigmoid", *map(float, r), 0.3, 0) + 1.5 * _pair_loss("ipo", *map(float, r), 0.3, 0)
                         for r in zip(pc, pr, rc, rr, nc, nr)], dtype=F64) + 0.2 * float(-pc.sum() / nc.sum())
    assert_close_to_reference(mix, want, F64, "weighted mix")
    mean, _, _ = preference_loss(pc, pr, rc, rr, loss_type=["sigmoid", "hinge"], reduction="mean", **kw)
    s1, _, _ = preference_loss(pc, pr, rc, rr, loss_type="sigmoid", reduction="sum", **kw)
    s2, _, _ = preference_loss(pc, pr, rc, rr, loss_type="hinge", reduction="sum", **kw)
    assert_close_to_reference(mean, (s1 + s2) / 13, F64, "mean of a list")


def test_wpo_pair_weights_closed_form():
    """WPO: each pair's loss (every type, including the batch-coupled sft and a list) times
    ``exp(mean(logp − logΣp²))`` of the chosen times that of the rejected, weights detached."""
    from lmfuse.align import wpo_weights

    pc, pr, rc, rr, nc, nr = _inputs()
    sc, sr = -torch.rand(13, dtype=F64) * nc, -torch.rand(13, dtype=F64) * nr  # Σ log Σp² ≤ 0
    w = wpo_weights(pc, sc, nc, pr, sr, nr)
    want_w = torch.tensor([math.exp((a - c) / n) * math.exp((b - d) / m)
                           for a, b, c, d, n, m in zip(*(t.tolist() for t in (pc, pr, sc, sr, nc, nr)))], dtype=F64)
    assert_close_to_reference(w, want_w, F64, "wpo weights")
    assert float(w.max() / w.min()) > 10  # a wrong weight cannot hide
    for t in ("sigmoid", "hinge", "sft", ["sigmoid", "sft"]):
        kw = dict(loss_type=t, beta=0.3, chosen_lengths=nc, rejected_lengths=nr)
        plain, _, _ = preference_loss(pc, pr, rc, rr, **kw)
        pcg = pc.clone().requires_grad_(True)
        weighted, _, _ = preference_loss(pcg, pr, rc, rr, pair_weights=wpo_weights(pcg, sc, nc, pr, sr, nr), **kw)
        assert_close_to_reference(weighted, plain * want_w, F64, f"wpo {t}")
        # the weights are constants: d(weighted)/d(pc) = w · d(plain)/d(pc)
        (g,) = torch.autograd.grad(weighted.sum(), pcg)
        pc2 = pc.clone().requires_grad_(True)
        (g2,) = torch.autograd.grad((preference_loss(pc2, pr, rc, rr, **kw)[0] * want_w).sum(), pc2)
        assert_close_to_reference(g, g2, F64, f"wpo grad {t}")
    with pytest.raises(ValueError, match="pair_weights"):
        preference_loss(pc, pr, rc, rr, loss_type="aot", pair_weights=want_w)
    with pytest.raises(ValueError, match="pair_weights"):
        preference_loss(pc, pr, rc, rr, pair_weights=want_w[:3])
    with pytest.raises(ValueError, match="chosen_lengths"):
        wpo_weights(pc, sc, nc[:2], pr, sr, nr)


@pytest.mark.parametrize("loss_type", P.PREFERENCE_LOSS_TYPES)
def test_gradients_float64_gradcheck(loss_type):
    pc, pr, rc, rr, nc, nr = _inputs(B=5, low=-8, high=-1)
    args = [t.clone().requires_grad_(True) for t in (pc, pr, rc, rr)]
    e = 0.1 if loss_type != "hinge" else 0.0

    def f(a, b, c, d):
        return preference_loss(a, b, c, d, loss_type=loss_type, beta=0.7, label_smoothing=e,
                               chosen_lengths=nc, rejected_lengths=nr)[0]

    if loss_type == "hinge":  # keep away from the kink at βΔ = 1
        assert (torch.abs(1 - 0.7 * ((pc - rc) - (pr - rr))) > 1e-3).all()
    assert torch.autograd.gradcheck(f, args, eps=1e-6, atol=1e-7, rtol=1e-6)


def test_kto_loss_closed_form_and_weights():
    p, r = torch.empty(9, dtype=F64).uniform_(-40, -5), torch.empty(9, dtype=F64).uniform_(-40, -5)
    desirable = torch.rand(9) < 0.5
    desirable[0], desirable[1] = True, False
    b, z0, wd, wu = 0.4, 0.7, 1.3, 0.8
    losses, rewards = kto_loss(p, r, desirable, torch.tensor(z0, dtype=F64), beta=b, desirable_weight=wd,
                               undesirable_weight=wu)
    want = [wd * (1 - _sig(b * (x - y - z0))) if d else wu * (1 - _sig(b * (z0 - (x - y))))
            for x, y, d in zip(p.tolist(), r.tolist(), desirable.tolist())]
    assert_close_to_reference(losses, torch.tensor(want, dtype=F64), F64, "kto")
    assert_close_to_reference(rewards, b * (p - r), F64, "kto rewards")
    apo, _ = kto_loss(p, r, desirable, loss_type="apo_zero_unpaired", beta=b)
    want = [1 - _sig(b * (x - y)) if d else _sig(b * (x - y)) for x, y, d in zip(p.tolist(), r.tolist(), desirable.tolist())]
    assert_close_to_reference(apo, torch.tensor(want, dtype=F64), F64, "apo_zero_unpaired")
    z = torch.tensor(z0, dtype=F64, requires_grad=True)  # the reference point is detached
    p.requires_grad_(True)
    kto_loss(p, r, desirable, z, beta=b, reduction="mean")[0].backward()
    assert z.grad is None and p.grad is not None


def _trl_stub(**kw):
    return SimpleNamespace(accelerator=SimpleNamespace(device=torch.device("cpu")), **kw)


def test_simpo_matches_trl_cpo_loss():
    cpo = pytest.importorskip("trl.experimental.cpo.cpo_trainer")
    pc, pr = torch.empty(11, dtype=F64).uniform_(-3, -0.1), torch.empty(11, dtype=F64).uniform_(-3, -0.1)
    stub = _trl_stub(beta=2.0, simpo_gamma=0.7, label_smoothing=0.15, alpha=0.0, loss_type="simpo")
    want, wc, wr = cpo.CPOTrainer.cpo_loss(stub, pc, pr)
    got, gc, gr = simpo_loss(pc, pr, beta=2.0, gamma=0.7, label_smoothing=0.15)
    assert_close_to_reference(got, want, F64, "simpo vs TRL")
    assert_close_to_reference(gc, wc, F64, "simpo chosen rewards")
    assert_close_to_reference(gr, wr, F64, "simpo rejected rewards")
    z = [2.0 * (x - y) - 0.7 for x, y in zip(pc.tolist(), pr.tolist())]  # hand transcription
    assert_close_to_reference(got, torch.tensor([-0.85 * _ls(v) - 0.15 * _ls(-v) for v in z], dtype=F64), F64, "simpo")
    nll = torch.rand(11, dtype=F64)
    withbc, _, _ = simpo_loss(pc, pr, beta=2.0, gamma=0.7, label_smoothing=0.15, chosen_nll=nll, cpo_alpha=0.5)
    assert_close_to_reference(withbc, got + 0.5 * nll, F64, "simpo + cpo_alpha·nll")


def test_orpo_matches_trl_odds_ratio_loss():
    orpo = pytest.importorskip("trl.experimental.orpo.orpo_trainer")
    pc, pr = torch.empty(11, dtype=F64).uniform_(-4, -0.05), torch.empty(11, dtype=F64).uniform_(-4, -0.05)
    trl_losses, wc, wr, _, _ = orpo.ORPOTrainer.odds_ratio_loss(_trl_stub(beta=0.25), pc, pr)
    nll = torch.tensor(1.7, dtype=F64)
    got, gc, gr = orpo_loss(pc, pr, nll, beta=0.25)
    # TRL's total: NLL − mean(β·logσ(log-odds)); the per-pair losses here are NLL − β·logσ(log-odds)
    # TRL computes in fp32 (it casts the log-probs with .float()); here float64 stays float64
    assert_close_to_reference(got, nll - trl_losses.double(), torch.float32, "orpo vs TRL")
    assert_close_to_reference(gc, wc.double(), torch.float32, "orpo rewards")
    lo = [(x - y) - (math.log(1 - math.exp(x)) - math.log(1 - math.exp(y))) for x, y in zip(pc.tolist(), pr.tolist())]
    assert_close_to_reference(got, torch.tensor([1.7 - 0.25 * _ls(v) for v in lo], dtype=F64), F64, "orpo hand")


def test_bt_loss_closed_form():
    rc, rr, m = torch.randn(10, dtype=F64) * 3, torch.randn(10, dtype=F64) * 3, torch.rand(10, dtype=F64)
    want = [-_ls(a - b - c) + 0.01 * (a + b) ** 2 for a, b, c in zip(rc.tolist(), rr.tolist(), m.tolist())]
    got = bt_loss(rc, rr, m, center_rewards_coefficient=0.01, reduction="none")
    assert_close_to_reference(got, torch.tensor(want, dtype=F64), F64, "bt")
    assert abs(bt_loss(rc, rr).item() - sum(-_ls(a - b) for a, b in zip(rc.tolist(), rr.tolist())) / 10) < 1e-12


def test_low_precision_inputs_keep_their_dtype():
    pc, pr, rc, rr, _, _ = _inputs()
    losses, cr, _ = preference_loss(pc.float(), pr.float(), rc.float(), rr.float(), beta=0.1)
    ref, _, _ = preference_loss(pc.float().double(), pr.float().double(), rc.float().double(), rr.float().double(),
                                beta=0.1)
    assert losses.dtype == cr.dtype == torch.float32
    assert_close_to_reference(losses, ref, torch.float32, "fp32 sigmoid")


def test_bad_inputs_name_the_argument():
    x = torch.randn(4, dtype=F64)
    with pytest.raises(ValueError, match="loss_type"):
        preference_loss(x, x, loss_type="dpo")
    with pytest.raises(ValueError, match="loss_type"):
        preference_loss(x, x, loss_type=[])
    with pytest.raises(ValueError, match="policy_rejected_logps"):
        preference_loss(x, torch.randn(5, dtype=F64))
    with pytest.raises(TypeError, match="policy_chosen_logps"):
        preference_loss(torch.ones(4, dtype=torch.long), x)
    with pytest.raises(ValueError, match="ref_chosen_logps"):
        preference_loss(x, x, x, None)
    with pytest.raises(ValueError, match="chosen_lengths"):
        preference_loss(x, x, loss_type="ipo")
    with pytest.raises(ValueError, match="label_smoothing"):
        preference_loss(x, x, loss_type="exo_pair")
    with pytest.raises(ValueError, match="label_smoothing"):
        preference_loss(x, x, loss_type="robust", label_smoothing=0.5)
    with pytest.raises(ValueError, match="beta"):
        preference_loss(x, x, beta=0.0)
    with pytest.raises(ValueError, match="loss_weights"):
        preference_loss(x, x, loss_type=["sigmoid", "hinge"], loss_weights=[1.0])
    with pytest.raises(ValueError, match="f_divergence"):
        preference_loss(x, x, f_divergence="kl")
    with pytest.raises(ValueError, match="reduction"):
        preference_loss(x, x, reduction="avg")
    with pytest.raises(ValueError, match="desirable"):
        kto_loss(x, x, torch.ones(4))
    with pytest.raises(ValueError, match="loss_type"):
        kto_loss(x, x, torch.ones(4, dtype=torch.bool), loss_type="sigmoid")
    with pytest.raises(ValueError, match="chosen_nll"):
        simpo_loss(x, x, cpo_alpha=1.0)
    with pytest.raises(ValueError, match="margin"):
        bt_loss(x, x, torch.randn(3, dtype=F64))
