"""discounted_cumsum: every backend against float64 oracles written independently of the op (the
recurrence run by ``scipy.signal.lfilter``, and the explicit O(n²) sum), long sequences, the
float32 overflow of the rescaling trick, gradients, masks, strides, opcheck, compile, AOT."""

import json
import os
import subprocess
import sys

import numpy as np
import pytest
import torch

from lmfuse import ops
from lmfuse.ops import BackendUnavailableError, available_backends, discounted_cumsum, use_backend
from lmfuse.testing import assert_close_to_reference

from .helpers import backend_params, poisoned_outputs

signal = pytest.importorskip("scipy.signal")

BACKENDS = backend_params(("triton", "reference"))
GAMMAS = [0.0, 0.5, 0.95, 1.0]


def recurrence_oracle(x: torch.Tensor, gamma: float, reverse: bool = True, dim: int = -1) -> torch.Tensor:
    """float64 ``y_t = x_t + γ·y_{t±1}`` run sequentially (an IIR filter) along ``dim``."""
    xn = x.detach().double().movedim(dim, -1).cpu().numpy()
    if reverse:
        y = signal.lfilter([1.0], [1.0, -gamma], xn[..., ::-1], axis=-1)[..., ::-1]
    else:
        y = signal.lfilter([1.0], [1.0, -gamma], xn, axis=-1)
    return torch.from_numpy(np.ascontiguousarray(y)).movedim(-1, dim).to(x.device)


def explicit_sum(x: torch.Tensor, gamma: float, reverse: bool = True) -> torch.Tensor:
    """float64 ``Σ_s γ^|s−t| x_s`` over ``s ≥ t`` (reverse) or ``s ≤ t``, as a dense matrix (last dim)."""
    n = x.shape[-1]
    t = torch.arange(n, dtype=torch.float64)
    diff = t[None, :] - t[:, None]  # s − t
    if not reverse:
        diff = -diff
    a = torch.where(diff >= 0, torch.tensor(gamma, dtype=torch.float64) ** diff.clamp(min=0), 0.0)
    return x.detach().double().cpu() @ a.t()


def rescaled_closed_form(x: torch.Tensor, gamma: float) -> torch.Tensor:
    """The tempting one-liner ``γ^t · revcumsum(γ^(−t) x)`` in x's dtype (what the op avoids)."""
    t = torch.arange(x.shape[-1], dtype=x.dtype, device=x.device)
    scaled = x * gamma ** (-t)
    return gamma ** t * scaled.flip(-1).cumsum(-1).flip(-1)


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("dtype", [torch.float32, torch.float16])
@pytest.mark.parametrize("reverse", [True, False])
@pytest.mark.parametrize("gamma", GAMMAS)
def test_backends_match_float64_oracle(backend, dtype, reverse, gamma, device):
    x = torch.randn(3, 5, 203, device=device).to(dtype)  # several interpreter blocks, ragged tail
    with use_backend(backend), poisoned_outputs():
        y = discounted_cumsum(x, gamma, reverse=reverse)
    assert y.dtype == dtype and y.shape == x.shape
    assert_close_to_reference(y, recurrence_oracle(x, gamma, reverse), dtype, "y")


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("n", [1, 2, 63, 64, 65, 130])
def test_short_rows_match_explicit_sum(backend, n, device):
    gamma = float(torch.rand(()).item())
    x = torch.randn(4, n, device=device)
    for reverse in (True, False):
        with use_backend(backend), poisoned_outputs():
            y = discounted_cumsum(x, gamma, reverse=reverse)
        assert_close_to_reference(y, explicit_sum(x, gamma, reverse).to(device), torch.float32, f"n={n}")


@pytest.mark.parametrize("n", [4096, 9001, 16384])
def test_long_sequences_float32_and_float64(n, device):
    x = torch.randn(2, n, device=device)
    for reverse in (True, False):
        want = recurrence_oracle(x, 0.95, reverse)
        assert_close_to_reference(discounted_cumsum(x, 0.95, reverse=reverse), want, torch.float32, f"fp32 n={n}")
        assert_close_to_reference(discounted_cumsum(x.double(), 0.95, reverse=reverse), want, torch.float64,
                                  f"fp64 n={n}")


def test_rescaling_trick_overflows_float32_but_the_op_does_not(device):
    n = 2048  # 0.95^(−t) passes float32's 3.4e38 at t ≈ 1730
    x = torch.rand(2, n, device=device) + 0.5
    naive = rescaled_closed_form(x, 0.95)
    assert not torch.isfinite(naive).all()
    # and in float64 it is already far less accurate than the op is in float32
    y = discounted_cumsum(x, 0.95)
    want = recurrence_oracle(x, 0.95)
    assert torch.isfinite(y).all()
    assert_close_to_reference(y, want, torch.float32, "op fp32")
    naive64 = rescaled_closed_form(x.double(), 0.95)
    assert (naive64 - want).abs().max() > 100 * (y.double() - want).abs().max()


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("reverse", [True, False])
def test_gradient_is_the_sum_in_the_other_direction(backend, reverse, device):
    gamma = 0.9
    x = torch.randn(3, 150, device=device, requires_grad=True)
    dy = torch.randn(3, 150, device=device)
    with use_backend(backend):
        (dx,) = torch.autograd.grad(discounted_cumsum(x, gamma, reverse=reverse), x, dy)
    assert_close_to_reference(dx, recurrence_oracle(dy, gamma, not reverse), torch.float32, "dx")


def test_gradcheck_and_gradgradcheck_float64(device):
    # fast mode (random projections): the full Jacobian of 420 inputs takes minutes on this CPU
    x = torch.randn(2, 3, 70, dtype=torch.float64, device=device, requires_grad=True)
    m = torch.rand(2, 3, 70, device=device) > 0.3
    assert torch.autograd.gradcheck(lambda t: discounted_cumsum(t, 0.8, mask=m), (x,), fast_mode=True)
    assert torch.autograd.gradgradcheck(lambda t: discounted_cumsum(t, 0.7, reverse=False), (x,), fast_mode=True)
    assert torch.autograd.gradcheck(lambda t: discounted_cumsum(t, 0.8, dim=1), (x,), fast_mode=True)


@pytest.mark.parametrize("backend", BACKENDS)
def test_mask_zeroes_positions_but_keeps_their_place(backend, device):
    x = torch.randn(4, 97, device=device, requires_grad=True)
    mask = torch.rand(4, 97, device=device) > 0.4
    mask[0] = False  # a fully masked row
    mask[1, :30] = False  # leading hole
    mask[2, -30:] = False  # trailing hole
    with use_backend(backend):
        y = discounted_cumsum(x, 0.95, mask=mask)
        (dx,) = torch.autograd.grad(y.sum(), x)
    want = recurrence_oracle(torch.where(mask, x, 0.0), 0.95)
    assert_close_to_reference(y, want, torch.float32, "y")
    assert torch.equal(y[0], torch.zeros_like(y[0]))
    assert torch.all(dx[~mask] == 0) and torch.all(dx[mask] != 0)


@pytest.mark.parametrize("backend", BACKENDS)
def test_non_contiguous_inputs_and_other_dims(backend, device):
    base = torch.randn(70, 3, 2 * 5, device=device)
    x = base[..., ::2].transpose(0, 2)  # [5, 3, 70], non-contiguous
    xt = torch.randn(3, 70, device=device).t()  # [70, 3], summed along dim 0
    assert not (x.is_contiguous() or xt.is_contiguous())
    cases = [(xt, 0), (xt, -2), (x, 2), (x, -1)]
    if not (backend == "triton" and device.type == "cpu"):  # the interpreter runs one program per row
        cases += [(x, 0), (x, 1)]
    for t, dim in cases:
        for reverse in (True, False):
            with use_backend(backend), poisoned_outputs():
                y = discounted_cumsum(t, 0.85, dim=dim, reverse=reverse)
            assert_close_to_reference(y, recurrence_oracle(t, 0.85, reverse, dim), torch.float32, f"dim={dim}")


def test_bfloat16_and_float64_dtypes(device):
    x = torch.randn(3, 300, device=device)
    want = recurrence_oracle(x.bfloat16(), 0.95)
    y = discounted_cumsum(x.bfloat16(), 0.95)
    assert y.dtype == torch.bfloat16
    assert_close_to_reference(y, want, torch.bfloat16, "bf16")
    assert discounted_cumsum(x.double(), 0.95).dtype == torch.float64
    if available_backends()["triton"]:
        with use_backend("triton"), pytest.raises(BackendUnavailableError, match="float64"):
            discounted_cumsum(x.double(), 0.95)


@pytest.mark.parametrize("shape", [(0, 7), (5, 0), (0, 0)])
def test_empty(shape, device):
    x = torch.randn(shape, device=device, requires_grad=True)
    y = discounted_cumsum(x, 0.9)
    y.sum().backward()
    assert y.shape == x.shape and x.grad.shape == x.shape


def test_reference_function_agrees_with_oracle(device):
    x = torch.randn(3, 500, dtype=torch.float64, device=device)
    m = torch.rand(3, 500, device=device) > 0.5
    assert_close_to_reference(ops.discounted_cumsum_reference(x, 0.95, mask=m),
                              recurrence_oracle(torch.where(m, x, 0.0), 0.95), torch.float64, "reference")


def test_bad_arguments_raise_clear_errors():
    x = torch.randn(2, 5)
    with pytest.raises(ValueError, match="gamma"):
        discounted_cumsum(x, 1.5)
    with pytest.raises(ValueError, match="gamma"):
        discounted_cumsum(x, -0.1)
    with pytest.raises(TypeError, match="gamma"):
        discounted_cumsum(x, float("nan"))
    with pytest.raises(TypeError, match="gamma"):
        discounted_cumsum(x, True)
    with pytest.raises(TypeError, match="x must be a floating-point"):
        discounted_cumsum(torch.ones(2, 5, dtype=torch.int64), 0.5)
    with pytest.raises(TypeError, match="x must be a torch.Tensor"):
        discounted_cumsum([1.0, 2.0], 0.5)
    with pytest.raises(ValueError, match="dim"):
        discounted_cumsum(x, 0.5, dim=2)
    with pytest.raises(TypeError, match="mask must have dtype torch.bool"):
        discounted_cumsum(x, 0.5, mask=torch.ones(2, 5))
    with pytest.raises(ValueError, match="mask must have x's shape"):
        discounted_cumsum(x, 0.5, mask=torch.ones(2, 4, dtype=torch.bool))
    with pytest.raises(TypeError, match="reverse"):
        discounted_cumsum(x, 0.5, reverse=1)


@pytest.mark.parametrize("backend", BACKENDS)
def test_opcheck(backend, device):
    x = torch.randn(2, 70, device=device, requires_grad=True)
    with use_backend(backend):
        for reverse in (True, False):
            torch.library.opcheck(torch.ops.lmfuse.discounted_cumsum.default, (x, 0.95, reverse))


def test_torch_compile_fullgraph(device):
    x = torch.randn(2, 130, device=device, requires_grad=True)
    mask = torch.rand(2, 130, device=device) > 0.3

    def f(t):
        w = discounted_cumsum(t * 2.0, 0.95, mask=mask)
        return (w * t).sum()

    torch._dynamo.reset()
    compiled = torch.compile(f, fullgraph=True, backend="aot_eager")
    out = compiled(x)
    (g,) = torch.autograd.grad(out, x)
    x64 = x.detach().double().requires_grad_()
    (g_ref,) = torch.autograd.grad(f(x64), x64)
    assert_close_to_reference(out.detach(), f(x64).detach(), torch.float32, "out")
    assert_close_to_reference(g, g_ref, torch.float32, "grad")


def test_cost_formula():
    flops, nbytes = ops.discounted_cumsum_cost(4, 512, 4, "fwd")
    assert (flops, nbytes) == (2 * 4 * 512, 2 * 4 * 4 * 512)
    assert ops.discounted_cumsum_cost(4, 512, 4, "full") == (2 * flops, 2 * nbytes)


def test_triton_kernel_compiles_for_sm80_and_sm90():
    pytest.importorskip("triton")
    here = os.path.dirname(__file__)
    code = (f"import sys, json; sys.path.insert(0, {here!r}); import triton_aot\n"
            "from lmfuse.triton_kernels import discounted_cumsum as m\n"
            "for j in m.aot_jobs():\n"
            "    for arch in triton_aot.ARCHS:\n"
            "        print(json.dumps(triton_aot.compile_job(dict(j, module=m.__name__, arch=arch))))\n")
    env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}
    env.setdefault("TRITON_DEFAULT_FP_FUSION", "1")
    r = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, env=env, timeout=600)
    assert r.returncode == 0, r.stderr[-3000:]
    recs = [json.loads(line) for line in r.stdout.splitlines() if line.startswith("{")]
    assert len(recs) == 12, r.stdout[-2000:]  # 3 dtypes × 2 directions × 2 archs
    bad = [f"{x['label']} {x['arch']}: {x.get('error')}" for x in recs if not x["ok"]]
    assert not bad, "\n".join(bad)
    assert {x["arch"] for x in recs} == {"sm_80", "sm_90"}
