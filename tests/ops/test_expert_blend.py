"""expert_blend_cross_entropy: every path (concatenation route on each linear_cross_entropy backend,
the stage-1 statistics op, the probability mixture) against the float64 reference, every gradient
(hiddens, heads, biases, gate) with random upstream gradients, E = 1 against linear_cross_entropy,
the stage-1 gate gradient against the full path's, ignored rows, validation, registration."""

import pytest
import torch

from lmfuse.ops import (expert_blend_cross_entropy, expert_blend_cross_entropy_reference, linear_cross_entropy,
                        use_backend)
from lmfuse.ops import _expert_blend_chunked as _chunked
from lmfuse.ops import expert_blend as eb
from lmfuse.testing import assert_close_to_reference

from .helpers import backend_params, poisoned_outputs

BACKENDS = backend_params(("reference", "cpp", "triton"))
N, V, HS = 37, 1003, (24, 40, 48)  # odd shapes; the heads have 1003 / 1010 / 1005 rows, cut to V
F32 = torch.float32


def _gen():
    return torch.Generator().manual_seed(int(torch.randint(0, 2**31, ())))


def _inputs(hs=HS, n=N, v=V, bias=(True, False, True), dtype=F32, extra_rows=(0, 7, 2), ignore_frac=0.2,
            gate_kind="softmax", grad=True, gen=None):
    gen = gen or _gen()
    E = len(hs)
    hiddens = [torch.randn(n, h, generator=gen).to(dtype).requires_grad_(grad) for h in hs]
    weights = [(torch.randn(v + extra_rows[e], h, generator=gen) * h ** -0.5 * 3).to(dtype).requires_grad_(grad)
               for e, h in enumerate(hs)]
    biases = [(torch.randn(v + extra_rows[e], generator=gen) * 0.5).to(dtype).requires_grad_(grad)
              if bias[e] else None for e in range(E)]
    scores = torch.randn(n, E, generator=gen)
    gate = torch.softmax(scores, 1) if gate_kind == "softmax" else scores * 0.8  # "any": signs and sums vary
    gate = gate.requires_grad_()
    target = torch.randint(0, v, (n,), generator=gen)
    target[torch.rand(n, generator=gen) < ignore_frac] = -100
    return hiddens, weights, biases, gate, target


def _leaves(hiddens, weights, biases, gate):
    return [t for t in (*hiddens, *weights, *biases, gate) if t is not None and t.requires_grad]


def _double(hiddens, weights, biases, gate):
    d = lambda t: None if t is None else t.detach().double().requires_grad_(t.requires_grad)  # noqa: E731
    return [d(h) for h in hiddens], [d(w) for w in weights], [d(b) for b in biases], d(gate)


def _check(hiddens, weights, biases, gate, target, factor=1.0, with_lse=True, **kw):
    """Loss (and lse) and every gradient of the op against the float64 reference, random upstream
    gradients. ``with_lse=False`` (a scalar reduction) lets the gradient-in-forward path run."""
    outs = expert_blend_cross_entropy(hiddens, weights, gate, target, biases=biases, vocab_size=V,
                                      return_lse=with_lse, **kw)
    outs = outs if with_lse else (outs,)
    ups = tuple(torch.randn_like(o) for o in outs)
    leaves = _leaves(hiddens, weights, biases, gate)
    grads = torch.autograd.grad(outs, leaves, ups)
    r = _double(hiddens, weights, biases, gate)
    r_outs = expert_blend_cross_entropy_reference(*r[:2], r[3], target, biases=r[2], vocab_size=V,
                                                  return_lse=with_lse, **kw)
    r_outs = r_outs if with_lse else (r_outs,)
    r_grads = torch.autograd.grad(r_outs, _leaves(*r), tuple(u.double() for u in ups))
    loss, r_loss = outs[0], r_outs[0]
    assert loss.dtype == F32 and loss.shape == r_loss.shape
    assert_close_to_reference(loss, r_loss, F32, "loss", factor)
    if with_lse:
        assert outs[1].dtype == F32 and outs[1].shape == target.shape
        assert_close_to_reference(outs[1], r_outs[1], F32, "lse", factor)
    assert len(grads) == len(r_grads)
    for t, g, rg in zip(leaves, grads, r_grads):
        assert g.dtype == t.dtype and g.shape == t.shape
        assert_close_to_reference(g, rg, F32, f"grad {tuple(t.shape)}", factor)
    return loss, grads


@pytest.mark.parametrize("backend,reduction", [
    pytest.param(p.values[0], r, marks=p.marks, id=f"{p.values[0]}-{r}") for p in BACKENDS for r in ("mean", "none")
    if p.values[0] != "triton" or r == "none"])  # the interpreter is slow: one triton case
def test_logits_blend_full_path(backend, reduction):
    """Stage 2: every hidden, head and bias trains (the concatenation route on each forced backend)."""
    ins = _inputs()
    with use_backend(backend), poisoned_outputs():
        _check(*ins, reduction=reduction)


@pytest.mark.parametrize("option", [dict(reduction="mean"), dict(reduction="sum", label_smoothing=0.1)])
@pytest.mark.parametrize("gate_kind", ["softmax", "any"])
def test_logits_blend_gradient_in_forward_path(option, gate_kind):
    """Stage 2 with a scalar reduction and no backend forced: the per-expert chunked path (no
    concatenated heads), with a chunk smaller than N so that several chunks run."""
    ins = _inputs(gate_kind=gate_kind)
    old = _chunked.WORKSPACE_BYTES
    _chunked.WORKSPACE_BYTES = 5 * 4 * V * 10  # 10 tokens per chunk
    try:
        _check(*ins, with_lse=False, **option)
    finally:
        _chunked.WORKSPACE_BYTES = old


def test_gradient_in_forward_path_partial_needs():
    """Only some inputs need a gradient (a frozen head, a frozen hidden state): the others get none."""
    hiddens, weights, biases, gate, target = _inputs()
    weights[1].requires_grad_(False)
    hiddens[0].requires_grad_(False)
    biases[2].requires_grad_(False)
    _check(hiddens, weights, biases, gate, target, with_lse=False)


@pytest.mark.parametrize("option", [dict(label_smoothing=0.15, reduction="sum"), dict(reduction="mean"),
                                    dict(reduction="none", label_smoothing=0.05)])
@pytest.mark.parametrize("gate_kind", ["softmax", "any"])
@pytest.mark.parametrize("rows", [None, 10], ids=["one-chunk", "10-row-chunks"])
def test_logits_blend_stage1_path(option, gate_kind, rows, monkeypatch):
    """Only the gate trains: the statistics op (no concatenation, no backward GEMM), in one chunk
    and in chunks of 10 tokens (the last one short)."""
    from lmfuse.ops import _expert_blend_stats as st

    if rows is not None:
        monkeypatch.setattr(st, "MIN_ROWS", 1)
        monkeypatch.setattr(st, "WORKSPACE_BYTES", 4 * 4 * V * rows)  # E + 1 = 4 blocks of 10 rows
        assert st.chunk_rows(N, V, 3) == rows
    hiddens, weights, biases, gate, target = _inputs(grad=False, gate_kind=gate_kind)
    _check(hiddens, weights, biases, gate, target, **option)


def test_stage1_chunk_rows_rule():
    from lmfuse.ops import _expert_blend_stats as st

    assert st.chunk_rows(37, 1003, 3) == 37  # never more than N
    assert st.chunk_rows(4096, 49152, 3) == st.MIN_ROWS == 128  # 48 MiB holds 64 rows: the floor wins
    assert st.chunk_rows(4096, 1000, 3) == st.WORKSPACE_BYTES // (4 * 4 * 1000)  # the workspace wins
    assert st.chunk_rows(0, 1000, 3) == 1


@pytest.mark.parametrize("backend", [pytest.param(None, id="default")] + backend_params(("reference", "cpp")))
@pytest.mark.parametrize("reduction", ["sum", "none"])
def test_stage1_gate_gradient_equals_full_path(backend, reduction):
    """The full path (default: gradient in forward for "sum"; forced: the concatenation route) and
    the stage-1 statistics path give the same loss and gate gradient."""
    hiddens, weights, biases, gate, target = _inputs()
    kw = dict(biases=biases, vocab_size=V, reduction=reduction, label_smoothing=0.1)
    with use_backend(backend):
        full = expert_blend_cross_entropy(hiddens, weights, gate, target, **kw)
        up = torch.randn_like(full)
        g_full = torch.autograd.grad(full, gate, up)[0]
    frozen = dict(kw, biases=[None if b is None else b.detach() for b in biases])
    gate1 = gate.detach().clone().requires_grad_()
    stage1 = expert_blend_cross_entropy([h.detach() for h in hiddens], [w.detach() for w in weights], gate1,
                                        target, **frozen)
    g_stage1 = torch.autograd.grad(stage1, gate1, up)[0]
    assert_close_to_reference(stage1, full.detach().double(), F32, "loss")
    assert_close_to_reference(g_stage1, g_full.double(), F32, "gate gradient")


def test_stage1_path_uses_statistics_op(monkeypatch):
    """No hidden/head gradient wanted: the statistics op runs and linear_cross_entropy does not."""
    hiddens, weights, biases, gate, target = _inputs(grad=False)
    seen = []
    monkeypatch.setattr(eb, "linear_cross_entropy", lambda *a, **k: seen.append("lce"))
    real = eb._blend_stats
    monkeypatch.setattr(eb, "_blend_stats", lambda *a: seen.append("stats") or real(*a))
    expert_blend_cross_entropy(hiddens, weights, gate, target, biases=biases, vocab_size=V).backward()
    assert seen == ["stats"] and gate.grad is not None


@pytest.mark.parametrize("backend", backend_params(("reference", "cpp")))
@pytest.mark.parametrize("reduction", ["mean", "none"])
def test_probs_blend(backend, reduction):
    ins = _inputs()
    with use_backend(backend):
        _check(*ins, reduction=reduction)


def test_probs_blend_zero_gate_has_finite_gradients():
    hiddens, weights, biases, gate, target = _inputs()
    g = gate.detach().clone()
    g[:, 1] = 0.0  # the second expert is switched off on every token
    g.requires_grad_()
    _check(hiddens, weights, biases, g, target, blend="probs")


@pytest.mark.parametrize("backend", backend_params(("reference", "cpp")))
def test_single_expert_equals_linear_cross_entropy(backend):
    (h,), (w,), (b,), _, target = _inputs(hs=(40,), bias=(True,), extra_rows=(0,))
    gate = torch.ones(N, 1)
    with use_backend(backend):
        out = expert_blend_cross_entropy([h], [w], gate, target, biases=[b], reduction="none", label_smoothing=0.1)
        ref = linear_cross_entropy(h, w, target, bias=b, reduction="none", label_smoothing=0.1)
    up = torch.randn_like(out)
    g1 = torch.autograd.grad(out, (h, w, b), up)
    g2 = torch.autograd.grad(ref, (h, w, b), up)
    assert_close_to_reference(out, ref.detach().double(), F32, "loss")
    for a, r in zip(g1, g2):
        assert_close_to_reference(a, r.double(), F32, "grad")


def test_float64_inputs():
    ins = _inputs(dtype=torch.float64)
    loss = expert_blend_cross_entropy(ins[0], ins[1], ins[3], ins[4], biases=ins[2], vocab_size=V)
    r = expert_blend_cross_entropy_reference(ins[0], ins[1], ins[3], ins[4], biases=ins[2], vocab_size=V)
    assert loss.dtype == F32
    assert_close_to_reference(loss, r, F32, "loss")


@pytest.mark.parametrize("blend", ["logits", "probs"])
@pytest.mark.parametrize("grad", [True, False])
def test_all_ignored_and_empty(blend, grad):
    hiddens, weights, biases, gate, target = _inputs(grad=grad)
    target = torch.full_like(target, -100)
    loss = expert_blend_cross_entropy(hiddens, weights, gate, target, biases=biases, vocab_size=V, blend=blend)
    assert loss.item() == 0.0
    for g in torch.autograd.grad(loss, _leaves(hiddens, weights, biases, gate)):
        assert torch.count_nonzero(g) == 0
    e = _inputs(n=0, grad=grad)
    assert expert_blend_cross_entropy(e[0], e[1], e[3], e[4], biases=e[2], vocab_size=V, blend=blend).item() == 0.0


def test_validation():
    hiddens, weights, biases, gate, target = _inputs(grad=False)
    f = expert_blend_cross_entropy
    cases = [
        (lambda: f(hiddens[0], weights, gate, target, vocab_size=V), TypeError, "hiddens must be a list"),
        (lambda: f(hiddens, weights[:2], gate, target, vocab_size=V), ValueError, "weights has 2 heads"),
        (lambda: f(hiddens, weights, gate[:, :2], target, vocab_size=V), ValueError, "gate must be"),
        (lambda: f(hiddens, weights, gate[:5], target, vocab_size=V), ValueError, "gate must have 37 rows"),
        (lambda: f(hiddens, weights, gate, target), ValueError, "different vocabulary sizes"),
        (lambda: f(hiddens, weights, gate, target, vocab_size=1004), ValueError, "vocab_size must be in"),
        (lambda: f(hiddens, [weights[0], weights[2], weights[1]], gate, target, vocab_size=V), ValueError,
         r"weights\[1\] must be \[V_e, H_e\]"),
        (lambda: f([hiddens[0], hiddens[1].double(), hiddens[2]], weights, gate, target, vocab_size=V), TypeError,
         r"hiddens\[1\] has dtype"),
        (lambda: f([hiddens[0], hiddens[1].to("meta"), hiddens[2]], weights, gate, target, vocab_size=V),
         ValueError, r"hiddens\[1\] is on meta"),
        (lambda: f([hiddens[0], hiddens[1][:3], hiddens[2]], weights, gate, target, vocab_size=V), ValueError,
         "aligned"),
        (lambda: f(hiddens, weights, gate, target.int(), vocab_size=V), TypeError, "int64"),
        (lambda: f(hiddens, weights, gate, target.clamp_min(0) + V, vocab_size=V), ValueError, "target must be"),
        (lambda: f(hiddens, weights, gate, target, vocab_size=V, biases=biases[:2]), ValueError, "biases has 2"),
        (lambda: f(hiddens, weights, gate, target, vocab_size=V, blend="mean"), ValueError, "blend must be"),
        (lambda: f(hiddens, weights, gate, target, vocab_size=V, reduction="avg"), ValueError, "reduction"),
        (lambda: f(hiddens, weights, gate - 0.5, target, vocab_size=V, blend="probs"), ValueError, "non-negative"),
        (lambda: f(hiddens, weights, gate, target, vocab_size=V, blend="probs", label_smoothing=0.1), ValueError,
         "label_smoothing"),
        (lambda: f(hiddens, weights, gate, target, vocab_size=V, label_smoothing=1.5), ValueError,
         "label_smoothing"),
        (lambda: f(hiddens, weights, gate.long(), target, vocab_size=V), TypeError, "gate must be a floating"),
    ]
    for fn, exc, msg in cases:
        with pytest.raises(exc, match=msg):
            fn()


def test_opcheck_stats_op():
    hiddens, weights, biases, gate, target = _inputs(n=9, v=61, grad=False, extra_rows=(0, 3, 1))
    gate = gate.detach().requires_grad_()
    b = [hiddens[0].new_empty((0,)) if x is None else x for x in biases]
    target = target.clamp_min(0)
    torch.library.opcheck(torch.ops.lmfuse.expert_blend_stats.default, (hiddens, weights, b, gate, target, 61, True, 4))
    torch.library.opcheck(torch.ops.lmfuse.expert_blend_stats.default, (hiddens, weights, b, gate, target, 60, False, 9))


def test_opcheck_chunked_op():
    hiddens, weights, biases, gate, target = _inputs(n=9, v=61, extra_rows=(0, 3, 1))
    d = [t.detach().requires_grad_() for t in (*hiddens, *weights)]
    b = [hiddens[0].new_empty((0,)) if x is None else x.detach().requires_grad_() for x in biases]
    g = gate.detach().requires_grad_()
    target = target.clamp_min(0)
    tw = torch.rand(9)
    E = 3
    op = torch.ops.lmfuse.expert_blend_chunked.default
    torch.library.opcheck(op, (d[:E], d[E:], b, g, target, tw, 61, -100, 0.1, [True] * (3 * E + 1), 4))
    # vocab_size 60: targets in range (a valid target of 60 would make the loss NaN by design, and
    # opcheck's NaN != NaN comparison fails; seed 982637300 drew one)
    torch.library.opcheck(op, (d[:E], d[E:], b, g, target.clamp(0, 59), tw, 60, 3, 0.0,
                               [False, True, False] * 3 + [True], 9))


@pytest.mark.parametrize("frozen", [True, False])
def test_compile_matches_eager(frozen):
    hiddens, weights, biases, gate, target = _inputs(n=13, v=77, grad=not frozen, extra_rows=(0, 2, 1))
    fn = torch.compile(lambda hs, ws, bs, g, t: expert_blend_cross_entropy(hs, ws, g, t, biases=bs, vocab_size=77,
                                                                           label_smoothing=0.1),
                       fullgraph=True, backend="aot_eager")
    out = fn(hiddens, weights, biases, gate, target)
    leaves = _leaves(hiddens, weights, biases, gate)
    grads = torch.autograd.grad(out, leaves)
    r = _double(hiddens, weights, biases, gate)
    r_out = expert_blend_cross_entropy_reference(r[0], r[1], r[3], target, biases=r[2], vocab_size=77,
                                                 label_smoothing=0.1)
    r_grads = torch.autograd.grad(r_out, _leaves(*r))
    assert_close_to_reference(out, r_out, F32, "loss")
    for g, rg in zip(grads, r_grads):
        assert_close_to_reference(g, rg, F32, "grad")


@pytest.mark.parametrize("frozen", [True, False])
def test_strided_inputs(frozen):
    """Hidden states and gate as column slices of wider tensors (non-contiguous), both logit paths."""
    gen = _gen()
    wide = [torch.randn(N, 2 * h, generator=gen)[:, ::2].requires_grad_(not frozen) for h in HS]
    _, weights, biases, gate, target = _inputs(grad=not frozen, gen=gen)
    gate_wide = torch.softmax(torch.randn(N, 6, generator=gen), 1)[:, ::2].detach().requires_grad_()
    assert not wide[0].is_contiguous() and not gate_wide.is_contiguous()
    _check(wide, weights, biases, gate_wide, target, reduction="none")


@pytest.mark.parametrize("frozen", [True, False])
def test_bfloat16(frozen, lowp_gemm):
    """bf16 experts: loss and gate gradient within the bf16 tolerance of the float64 reference (the
    stage-1 path rounds each expert's logits to bf16 once, as eager F.linear does; the concatenation
    route rounds the gate-scaled hidden states once)."""
    hiddens, weights, biases, gate, target = _inputs(dtype=torch.bfloat16, bias=(False, False, False),
                                                     grad=not frozen)
    loss = expert_blend_cross_entropy(hiddens, weights, gate, target, biases=biases, vocab_size=V)
    leaves = _leaves(hiddens, weights, biases, gate)
    grads = torch.autograd.grad(loss, leaves)
    r = _double(hiddens, weights, biases, gate)
    r_loss = expert_blend_cross_entropy_reference(r[0], r[1], r[3], target, biases=r[2], vocab_size=V)
    r_grads = torch.autograd.grad(r_loss, _leaves(*r))
    assert_close_to_reference(loss, r_loss, torch.bfloat16, "loss")
    for t, g, rg in zip(leaves, grads, r_grads):
        assert g.dtype == t.dtype
        assert_close_to_reference(g, rg, torch.bfloat16, f"grad {tuple(t.shape)}")


def test_gradient_in_forward_path_repeated_backward():
    """The stored gradients are scaled in place by the first backward: a second backward through the
    retained graph still gives the right gradients, and leaves the first call's results unchanged."""
    hiddens, weights, biases, gate, target = _inputs()
    leaves = _leaves(hiddens, weights, biases, gate)
    loss = expert_blend_cross_entropy(hiddens, weights, gate, target, biases=biases, vocab_size=V)
    up1, up2 = torch.rand(()) + 0.5, -torch.rand(()) - 0.5
    first = torch.autograd.grad(loss, leaves, up1, retain_graph=True)
    kept = [g.clone() for g in first]
    second = torch.autograd.grad(loss, leaves, up2)
    r = _double(hiddens, weights, biases, gate)
    r_loss = expert_blend_cross_entropy_reference(r[0], r[1], r[3], target, biases=r[2], vocab_size=V)
    r_grads = torch.autograd.grad(r_loss, _leaves(*r))
    for a, k, b, rg in zip(first, kept, second, r_grads):
        assert torch.equal(a, k)
        assert_close_to_reference(a, rg * up1.double(), F32, "first backward")
        assert_close_to_reference(b, rg * up2.double(), F32, "second backward")


def test_gradient_in_forward_path_zero_upstream_then_second_backward():
    """A retained backward with an upstream gradient of exactly 0, then another: the second is still
    right (the stored gradients are left unscaled while the graph is kept; a scheme that scales them
    in place and divides by the last factor later cannot recover from a factor of 0)."""
    hiddens, weights, biases, gate, target = _inputs()
    leaves = _leaves(hiddens, weights, biases, gate)
    loss = expert_blend_cross_entropy(hiddens, weights, gate, target, biases=biases, vocab_size=V)
    zero = torch.autograd.grad(loss, leaves, torch.zeros(()), retain_graph=True)
    up = torch.rand(()) + 0.5
    second = torch.autograd.grad(loss, leaves, up)
    r = _double(hiddens, weights, biases, gate)
    r_loss = expert_blend_cross_entropy_reference(r[0], r[1], r[3], target, biases=r[2], vocab_size=V)
    r_grads = torch.autograd.grad(r_loss, _leaves(*r))
    for z, b, rg in zip(zero, second, r_grads):
        assert torch.equal(z, torch.zeros_like(z))
        assert_close_to_reference(b, rg * up.double(), F32, "second backward")
