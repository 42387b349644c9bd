"""gated_lora_linear / lora_linear: every backend against the float64 reference, forward and all
gradients, odd shapes, strided inputs, poisoned outputs, zero-rank skipping, registration."""

import pytest
import torch

from lmfuse.ops import (BackendUnavailableError, available_backends, gated_lora_linear,
                        gated_lora_linear_reference, lora_linear, use_backend)
from lmfuse.testing import TOLERANCE, assert_close_to_reference, rel_error

from .helpers import backend_params, poisoned_outputs

BACKENDS = backend_params(("triton", "reference"))
SHAPES = [  # (tokens, d_in, rank, d_out): odd sizes spanning several interpreter tiles
    (37, 45, 7, 29),
    (5, 16, 16, 16),
    (50, 33, 20, 51),
]
NAMES = ("x", "weight", "bias", "lora_A", "lora_B", "gate")


def _inputs(shape, dtype, device, bias=True, gated=True, weight_grad=False, gen=None):
    M, K, R, N = shape
    gen = gen or torch.Generator(device="cpu").manual_seed(torch.randint(0, 2**31, ()).item())

    def rnd(*s, scale=1.0):
        return (torch.randn(*s, generator=gen) * scale).to(device=device, dtype=dtype)

    x = rnd(M, K).requires_grad_()
    w = rnd(N, K, scale=K ** -0.5).requires_grad_(weight_grad)
    c = rnd(N).requires_grad_() if bias else None
    a = rnd(R, K, scale=K ** -0.5).requires_grad_()
    b = rnd(N, R, scale=R ** -0.5).requires_grad_()
    g = rnd(R).requires_grad_() if gated else None
    return [x, w, c, a, b, g]


def _check_against_float64(backend, ins, scaling, dtype, lora_input=None):
    with use_backend(backend), poisoned_outputs():
        y = gated_lora_linear(*ins, scaling, lora_input=lora_input)
        dy = torch.randn_like(y)
        all_in = ins + [lora_input]
        wrt = [t for t in all_in if t is not None and t.requires_grad]
        grads = torch.autograd.grad(y, wrt, dy)
    ref_in = [t.detach().double().requires_grad_(t.requires_grad) if t is not None else None for t in all_in]
    y_ref = gated_lora_linear_reference(*ref_in[:6], scaling, lora_input=ref_in[6])
    ref_grads = torch.autograd.grad(y_ref, [t for t in ref_in if t is not None and t.requires_grad], dy.double())
    assert y.dtype == dtype and y.shape == y_ref.shape
    assert_close_to_reference(y, y_ref, dtype, "y")
    names = [n for n, t in zip(NAMES + ("lora_input",), all_in) if t is not None and t.requires_grad]
    torch_errs = [0.0] * len(names)
    if dtype in (torch.float16, torch.bfloat16):
        # The guide's bound for low precision: no worse than 2x PyTorch's own error in the same
        # dtype. Gradients that are long reductions (dgate sums over every token) can exceed the
        # table's per-dtype figure in PyTorch itself; the table stays the floor.
        same = [t.detach().requires_grad_(t.requires_grad) if t is not None else None for t in all_in]
        y_t = gated_lora_linear_reference(*same[:6], scaling, lora_input=same[6])
        t_grads = torch.autograd.grad(y_t, [t for t in same if t is not None and t.requires_grad], dy)
        torch_errs = [rel_error(g, r) for g, r in zip(t_grads, ref_grads)]
    for name, g, r, te in zip(names, grads, ref_grads, torch_errs):
        err = rel_error(g, r)
        assert err <= max(TOLERANCE[dtype], 2 * te), f"d{name}: rel. error {err:.3e} (PyTorch {te:.3e})"


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("dtype", [torch.float32, torch.float16])
@pytest.mark.parametrize("shape", SHAPES)
@pytest.mark.parametrize("gated,bias", [(True, True), (False, False), (True, False)])
def test_matches_float64_reference(backend, dtype, shape, gated, bias, device):
    ins = _inputs(shape, dtype, device, bias=bias, gated=gated)
    _check_against_float64(backend, ins, 1.75, dtype)


@pytest.mark.parametrize("backend", BACKENDS)
def test_bfloat16(backend, device):
    # the interpreter mishandles bf16 dot products: Triton's bf16 runs on the GPU only
    if backend == "triton" and device.type != "cuda":
        pytest.skip("Triton interpreter does not emulate bf16 tl.dot; tested on GPU")
    _check_against_float64(backend, _inputs((19, 24, 8, 21), torch.bfloat16, device), 2.0, torch.bfloat16)


@pytest.mark.parametrize("backend", BACKENDS)
def test_weight_gradient_only_when_asked(backend, device):
    ins = _inputs((23, 20, 5, 17), torch.float32, device, weight_grad=True)
    _check_against_float64(backend, ins, 0.5, torch.float32)
    frozen = _inputs((23, 20, 5, 17), torch.float32, device)
    with use_backend(backend):
        gated_lora_linear(*frozen, 0.5).sum().backward()
    assert frozen[1].grad is None and frozen[3].grad is not None and frozen[5].grad is not None


@pytest.mark.parametrize("backend", BACKENDS)
def test_separate_lora_input_gets_its_own_gradient(backend, device):
    """The dropout path: base term reads x, LoRA term reads lora_input; both differentiable."""
    ins = _inputs((21, 18, 6, 19), torch.float32, device)
    xl = (torch.randn_like(ins[0]) * 0.5).requires_grad_()
    _check_against_float64(backend, ins, 1.25, torch.float32, lora_input=xl)


@pytest.mark.parametrize("backend", BACKENDS)
def test_non_contiguous_and_batched_inputs(backend, device):
    base = torch.randn(3, 40, 2 * 23, device=device)
    x = base[..., ::2].transpose(0, 1).requires_grad_()  # [40, 3, 23], non-contiguous
    w = torch.randn(23, 31, device=device).t()  # [31, 23] transposed view, frozen
    c = torch.randn(62, device=device)[::2].requires_grad_()
    a = torch.randn(23, 9, device=device).t().requires_grad_()  # [9, 23] transposed view
    b = torch.randn(31, 18, device=device)[:, ::2].requires_grad_()  # [31, 9] strided
    g = torch.randn(18, device=device)[::2].requires_grad_()
    assert not any(t.is_contiguous() for t in (x, w, c, a, b, g))
    _check_against_float64(backend, [x, w, c, a, b, g], 3.0, torch.float32)


def test_gradcheck_float64_gate_and_all_inputs(device):
    x, w, c, a, b, g = [t.detach().double() for t in _inputs((6, 7, 3, 5), torch.float32, device)]
    # the gate's gradient alone, then every input together
    assert torch.autograd.gradcheck(lambda g_: gated_lora_linear(x, w, c, a, b, g_, 1.5), (g.requires_grad_(),))
    ins = [t.requires_grad_() for t in (x, w, c, a, b, g)]
    assert torch.autograd.gradcheck(lambda *t: gated_lora_linear(*t, 1.5), tuple(ins))


@pytest.mark.parametrize("backend", BACKENDS)
def test_lora_linear_is_the_ungated_op(backend, device):
    x, w, c, a, b, _ = _inputs((13, 17, 4, 11), torch.float32, device, gated=False)
    with use_backend(backend), torch.no_grad():
        y = lora_linear(x, w, c, a, b, 2.0)
        y_gated_ones = gated_lora_linear(x, w, c, a, b, torch.ones(4, device=device), 2.0)
    y_ref = gated_lora_linear_reference(*[t.double() for t in (x, w, c, a, b)], None, 2.0)
    assert_close_to_reference(y, y_ref, torch.float32)
    assert_close_to_reference(y_gated_ones, y_ref, torch.float32)


@pytest.mark.parametrize("backend", BACKENDS)
def test_zero_gate_ranks_are_skipped_at_inference(backend, device, monkeypatch):
    from lmfuse.ops import gated_lora as op_mod

    x, w, c, a, b, g = [t.detach() for t in _inputs((29, 24, 12, 19), torch.float32, device)]
    g[torch.tensor([0, 3, 4, 10])] = 0.0
    ranks_seen = []
    real_drop = op_mod._drop_zero_ranks

    def spy(a_, b_, g_):
        out = real_drop(a_, b_, g_)
        ranks_seen.append(out[0].shape[0])
        return out

    monkeypatch.setattr(op_mod, "_drop_zero_ranks", spy)
    with use_backend(backend), poisoned_outputs():
        with torch.no_grad():
            y = gated_lora_linear(x, w, c, a, b, g, 2.0)
        g_off = torch.zeros_like(g)
        with torch.no_grad():
            y_off = gated_lora_linear(x, w, c, a, b, g_off, 2.0)
    assert ranks_seen == [8, 0]
    y_ref = gated_lora_linear_reference(*[t.double() for t in (x, w, c, a, b, g)], 2.0)
    assert_close_to_reference(y, y_ref, torch.float32)
    assert_close_to_reference(y_off, x.double() @ w.double().t() + c.double(), torch.float32)
    # with gradients needed for the gate, all ranks stay (the zero ones still get a gradient)
    g.requires_grad_()
    with use_backend(backend):
        gated_lora_linear(x, w, c, a, b, g, 2.0).sum().backward()
    assert len(ranks_seen) == 2 and torch.count_nonzero(g.grad[torch.tensor([0, 3, 4, 10])]) == 4


@pytest.mark.parametrize("backend", BACKENDS)
def test_empty_tokens(backend, device):
    x, w, c, a, b, g = _inputs((0, 12, 4, 9), torch.float32, device)
    with use_backend(backend):
        y = gated_lora_linear(x, w, c, a, b, g, 1.0)
        y.sum().backward()
    assert y.shape == (0, 9)
    assert a.grad is not None and torch.count_nonzero(a.grad) == 0 and torch.count_nonzero(g.grad) == 0


def test_rank_above_fused_limit_falls_back(device):
    ins = [t.detach() for t in _inputs((9, 40, 260, 11), torch.float32, device)]
    y = gated_lora_linear(*ins, 1.0)  # automatic choice: the reference path
    assert_close_to_reference(y, gated_lora_linear_reference(*[t.double() for t in ins], 1.0), torch.float32)
    if available_backends()["triton"]:
        with use_backend("triton"), pytest.raises(BackendUnavailableError, match="rank 260 > 256"):
            gated_lora_linear(*ins, 1.0)


def test_float64_runs_on_reference_and_refuses_triton(device):
    ins = [t.detach().double() for t in _inputs((4, 8, 3, 5), torch.float32, device)]
    assert gated_lora_linear(*ins, 1.0).dtype == torch.float64
    if available_backends()["triton"]:
        with use_backend("triton"), pytest.raises(BackendUnavailableError, match="float64"):
            gated_lora_linear(*ins, 1.0)


def test_opcheck_and_compile_fullgraph(device):
    x, w, c, a, b, g = _inputs((11, 16, 4, 13), torch.float32, device)
    d = [t.detach() for t in (x, w, c, a, b, g)]
    torch.library.opcheck(torch.ops.lmfuse.gated_lora_linear_fwd, (d[0], None, d[1], d[2], d[3], d[4], d[5], 1.5, True))
    torch.library.opcheck(torch.ops.lmfuse.gated_lora_linear_fwd, (d[0], d[0] * 0.5, d[1], None, d[3], d[4], None, 2.0, False))
    fn = torch.compile(lambda *t: gated_lora_linear(*t, 1.5), fullgraph=True, backend="aot_eager")
    y = fn(x, w, c, a, b, g)
    ga, gg = torch.autograd.grad(y.square().sum(), (a, g))
    ref_in = [t.detach().double().requires_grad_() for t in (x, w, c, a, b, g)]
    y_ref = gated_lora_linear_reference(*ref_in, 1.5)
    ra, rg = torch.autograd.grad(y_ref.square().sum(), (ref_in[3], ref_in[5]))
    assert_close_to_reference(y, y_ref, torch.float32)
    assert_close_to_reference(ga, ra, torch.float32, "dA")
    assert_close_to_reference(gg, rg, torch.float32, "dgate")


@pytest.mark.parametrize("make_bad, exc, match", [
    (lambda x, w, c, a, b, g, s: (x[:, :-1], w, c, a, b, g, s), ValueError, "x's last dim"),
    (lambda x, w, c, a, b, g, s: (x, w, c, a[:, :-1], b, g, s), ValueError, "lora_A.shape\\[1\\]"),
    (lambda x, w, c, a, b, g, s: (x, w, c, a, b[:-1], g, s), ValueError, "lora_B.shape\\[0\\]"),
    (lambda x, w, c, a, b, g, s: (x, w, c, a, b[:, :-1], g, s), ValueError, "the rank"),
    (lambda x, w, c, a, b, g, s: (x, w, c, a, b, g[:-1], s), ValueError, "gate.shape"),
    (lambda x, w, c, a, b, g, s: (x, w, c[:-1], a, b, g, s), ValueError, "bias.shape"),
    (lambda x, w, c, a, b, g, s: (x, w, c, a, b, g.half(), s), TypeError, "gate has dtype"),
    (lambda x, w, c, a, b, g, s: (x.long(), w, c, a, b, g, s), TypeError, "floating-point"),
    (lambda x, w, c, a, b, g, s: (x, w, c, a, b, g[None], s), ValueError, "gate must be 1-D"),
    (lambda x, w, c, a, b, g, s: (x, w.numpy(), c, a, b, g, s), TypeError, "weight must be a torch.Tensor"),
    (lambda x, w, c, a, b, g, s: (x, w, c, a, b, g, "2"), TypeError, "scaling"),
    (lambda x, w, c, a, b, g, s: (x, w, c, a, b, g, float("nan")), TypeError, "scaling"),
    (lambda x, w, c, a, b, g, s: (x, w, c, a[:0], b[:, :0], g[:0], s), ValueError, "rank must be at least 1"),
])
def test_bad_inputs_raise_clear_errors(make_bad, exc, match):
    ins = [t.detach() for t in _inputs((5, 6, 3, 4), torch.float32, "cpu")]
    with pytest.raises(exc, match=match):
        gated_lora_linear(*make_bad(*ins, 1.0))


def test_bad_lora_input_shape():
    x, w, c, a, b, g = [t.detach() for t in _inputs((5, 6, 3, 4), torch.float32, "cpu")]
    with pytest.raises(ValueError, match="lora_input must have x's shape"):
        gated_lora_linear(x, w, c, a, b, g, 1.0, lora_input=x[:-1])
