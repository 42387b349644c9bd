"""low_rank_linear: every backend against the float64 reference, forward and all gradients."""

import pytest
import torch

import lmfuse
from lmfuse.ops import (BackendUnavailableError, available_backends, low_rank_linear,
                        low_rank_linear_reference, use_backend)
from lmfuse.testing import assert_close_to_reference

from .helpers import backend_params, poisoned_outputs

BACKENDS = backend_params(("triton", "cpp", "reference", "cuda"))
SHAPES = [  # (tokens, d_in, rank, d_out): odd sizes spanning several interpreter tiles
    (37, 45, 7, 29),
    (5, 16, 16, 16),
    (70, 33, 40, 51),
]


def _inputs(shape, dtype, device, bias=True):
    M, K, R, N = shape
    x = torch.randn(M, K, device=device).to(dtype)
    a = (torch.randn(R, K, device=device) / K**0.5).to(dtype)
    b = (torch.randn(N, R, device=device) / R**0.5).to(dtype)
    c = torch.randn(N, device=device).to(dtype) if bias else None
    return [t.requires_grad_() if t is not None else None for t in (x, a, b, c)]


def _check_against_float64(backend, x, a, b, c, dtype):
    with use_backend(backend), poisoned_outputs():
        y = low_rank_linear(x, a, b, c)
        dy = torch.randn_like(y)
        wrt = [t for t in (x, a, b, c) if t is not None]
        grads = torch.autograd.grad(y, wrt, dy)
    ref_in = [t.detach().double().requires_grad_() if t is not None else None for t in (x, a, b, c)]
    y_ref = low_rank_linear_reference(*ref_in)
    ref_grads = torch.autograd.grad(y_ref, [t for t in ref_in if t is not None], dy.double())
    assert y.dtype == dtype and y.shape == y_ref.shape
    assert_close_to_reference(y, y_ref, dtype, "y")
    for name, g, r in zip(("dx", "d_down", "d_up", "d_bias"), grads, ref_grads):
        assert_close_to_reference(g, r, dtype, name)


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("dtype", [torch.float32, torch.float16])
@pytest.mark.parametrize("shape", SHAPES)
@pytest.mark.parametrize("bias", [True, False])
def test_matches_float64_reference(backend, dtype, shape, bias, device):
    _check_against_float64(backend, *_inputs(shape, dtype, device, bias), dtype)


@pytest.mark.parametrize("backend", BACKENDS)
def test_bfloat16(backend, device):
    # the interpreter mishandles bf16 dot products: Triton's bf16 runs on the GPU only
    if backend == "triton" and device.type != "cuda":
        pytest.skip("Triton interpreter does not emulate bf16 tl.dot; tested on GPU")
    _check_against_float64(backend, *_inputs((19, 24, 8, 21), torch.bfloat16, device), torch.bfloat16)


@pytest.mark.parametrize("backend", BACKENDS)
def test_non_contiguous_and_batched_inputs(backend, device):
    dtype = torch.float32
    base = torch.randn(3, 40, 2 * 23, device=device)
    x = base[..., ::2].transpose(0, 1).requires_grad_()  # [40, 3, 23], non-contiguous
    a = torch.randn(23, 9, device=device).t().requires_grad_()  # [9, 23] transposed view
    b = torch.randn(31, 18, device=device)[:, ::2].requires_grad_()  # [31, 9] strided
    c = torch.randn(62, device=device)[::2].requires_grad_()
    assert not (x.is_contiguous() or a.is_contiguous() or b.is_contiguous() or c.is_contiguous())
    _check_against_float64(backend, x, a, b, c, dtype)


@pytest.mark.parametrize("backend", BACKENDS)
def test_only_some_inputs_need_grad(backend, device):
    x, a, b, c = _inputs((17, 20, 6, 13), torch.float32, device)
    x = x.detach()
    b = b.detach()
    with use_backend(backend):
        y = low_rank_linear(x, a, b, c)
        ga, gc = torch.autograd.grad(y.square().sum(), (a, c))
    y_ref = low_rank_linear_reference(x.double(), a.double(), b.double(), c.double())
    ra, rc = torch.autograd.grad(y_ref.square().sum(), (a, c))
    assert_close_to_reference(ga, ra, torch.float32, "d_down")
    assert_close_to_reference(gc, rc, torch.float32, "d_bias")


def test_gradcheck_float64(device):
    x, a, b, c = [t.detach().double().requires_grad_() for t in _inputs((6, 7, 3, 5), torch.float32, device)]
    assert torch.autograd.gradcheck(low_rank_linear, (x, a, b, c))


@pytest.mark.parametrize("backend", BACKENDS)
def test_empty_tokens(backend, device):
    x, a, b, c = _inputs((0, 12, 4, 9), torch.float32, device)
    with use_backend(backend):
        y = low_rank_linear(x, a, b, c)
        y.sum().backward()
    assert y.shape == (0, 9)
    assert a.grad is not None and torch.count_nonzero(a.grad) == 0


def test_rank_above_fused_limit_falls_back(device):
    x, a, b, c = _inputs((9, 300, 260, 11), torch.float32, device)
    y = low_rank_linear(x, a, b, c)  # automatic choice: the unfused path
    assert_close_to_reference(y, low_rank_linear_reference(*[t.double() for t in (x, a, b, c)]),
                              torch.float32, "y")
    if available_backends()["triton"]:
        with use_backend("triton"), pytest.raises(BackendUnavailableError, match="rank 260 > 256"):
            low_rank_linear(x, a, b, c)


def test_float64_runs_on_reference_and_refuses_kernels(device):
    x, a, b, c = [t.detach().double() for t in _inputs((4, 8, 3, 5), torch.float32, device)]
    y = low_rank_linear(x, a, b, c)
    assert y.dtype == torch.float64
    if available_backends()["cpp"] and device.type == "cpu":
        with use_backend("cpp"), pytest.raises(BackendUnavailableError, match="float64"):
            low_rank_linear(x, a, b, c)


@pytest.mark.parametrize("make_bad, exc, match", [
    (lambda x, a, b, c: (x[:, :-1], a, b, c), ValueError, "x's last dim"),
    (lambda x, a, b, c: (x, a, b[:, :-1], c), ValueError, "the rank"),
    (lambda x, a, b, c: (x, a, b, c[:-1]), ValueError, "bias.shape"),
    (lambda x, a, b, c: (x, a.half(), b, c), TypeError, "down_weight has dtype"),
    (lambda x, a, b, c: (x.long(), a, b, c), TypeError, "floating-point"),
    (lambda x, a, b, c: (x, a[None], b, c), ValueError, "down_weight must be 2-D"),
    (lambda x, a, b, c: (x.numpy(), a, b, c), TypeError, "x must be a torch.Tensor"),
    (lambda x, a, b, c: (x, a[:0], b[:, :0], c), ValueError, "rank must be at least 1"),
])
def test_bad_inputs_raise_clear_errors(make_bad, exc, match):
    x, a, b, c = [t.detach() for t in _inputs((5, 6, 3, 4), torch.float32, "cpu")]
    with pytest.raises(exc, match=match):
        low_rank_linear(*make_bad(x, a, b, c))


def test_forcing_an_unusable_backend_raises():
    x, a, b, c = [t.detach() for t in _inputs((5, 6, 3, 4), torch.float32, "cpu")]
    with use_backend("cuda"), pytest.raises(BackendUnavailableError, match="cuda"):
        low_rank_linear(x, a, b, c)
    with pytest.raises(ValueError, match="unknown backend"):
        with use_backend("nope"):
            pass


def test_env_var_forces_backend(monkeypatch):
    x, a, b, c = [t.detach() for t in _inputs((5, 6, 3, 4), torch.float32, "cpu")]
    monkeypatch.setenv("LMFUSE_BACKEND", "cuda")
    with pytest.raises(BackendUnavailableError):
        low_rank_linear(x, a, b, c)
    monkeypatch.setenv("LMFUSE_BACKEND", "bogus")
    with pytest.raises(ValueError, match="LMFUSE_BACKEND"):
        low_rank_linear(x, a, b, c)


@pytest.mark.parametrize("backend", [b for b in BACKENDS if b.values[0] in ("reference", "cpp", "triton")])
def test_opcheck(backend, device):
    x, a, b, c = _inputs((9, 16, 4, 12), torch.float32, device)
    with use_backend(backend):
        for save_h in (True, False):
            torch.library.opcheck(torch.ops.lmfuse.low_rank_linear_fwd.default, (x, a, b, c, save_h))
        dy = torch.randn(9, 12, device=device)
        h = (x @ a.t()).detach()
        torch.library.opcheck(torch.ops.lmfuse.low_rank_linear_bwd.default,
                              (dy, x.detach(), a.detach(), b.detach(), h, True, True, True, True),
                              test_utils=("test_schema", "test_faketensor"))


def test_torch_compile_full_graph(device):
    x, a, b, c = _inputs((10, 16, 4, 12), torch.float32, device)

    def f(x, a, b, c):
        return torch.nn.functional.gelu(low_rank_linear(x, a, b, c)).sum()

    compiled = torch.compile(f, fullgraph=True, backend="aot_eager")
    out = compiled(x, a, b, c)
    grads = torch.autograd.grad(out, (x, a, b, c))
    ref = f(x, a, b, c)
    ref_grads = torch.autograd.grad(ref, (x, a, b, c))
    torch.testing.assert_close(out, ref)
    for g, r in zip(grads, ref_grads):
        torch.testing.assert_close(g, r)


def test_import_is_side_effect_free():
    import subprocess
    import sys

    code = ("import sys, torch, lmfuse\n"
            "assert not torch.cuda.is_initialized(), 'CUDA initialised'\n"
            "bad = [m for m in sys.modules if m.startswith(('triton', 'transformers', 'lmfuse.triton_kernels'))]\n"
            "assert not bad, bad\n"
            "print('clean')\n")
    r = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120)
    assert r.returncode == 0 and "clean" in r.stdout, r.stderr


def test_available_backends_reports_reasons():
    st = available_backends()
    assert set(st) == {"cuda", "triton", "cpp", "reference"}
    assert st["reference"].available
    for s in st.values():
        assert isinstance(s.reason, str) and s.reason
    assert lmfuse.ops.BACKENDS == ("cuda", "triton", "cpp", "reference")
