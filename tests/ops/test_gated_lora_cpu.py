"""gated_lora_linear / lora_linear on the CPU (the path the op picks there): every output and
gradient against a float64 reference at small SmolLM2-like shapes, in fp32 and low precision, and
the memory shape of the fast path (one ``[tokens, d_out]`` buffer forward, one ``[tokens, d_in]``
backward). Speed against PEFT is the benchmark's business (``benchmarks/bench_gated_lora.py``)."""

import pytest
import torch
from torch.profiler import ProfilerActivity, profile

from lmfuse.ops import gated_lora_linear, gated_lora_linear_reference, lora_linear

# (tokens, d_in, rank, d_out): SmolLM2's projections are 576→576 and 576→1536; scaled down, odd
SHAPES = [(96, 72, 8, 72), (61, 72, 16, 192), (40, 48, 64, 80)]


def _inputs(shape, dtype, *, bias=True, gated=True, weight_grad=False, seed=0, lead=()):
    M, K, R, N = shape
    g = torch.Generator().manual_seed(seed)

    def rnd(*s, scale=1.0):
        return (torch.randn(*s, generator=g, dtype=torch.float64) * scale).to(dtype)

    x = rnd(*lead, M, K).requires_grad_()
    w = rnd(N, K, scale=K ** -0.5).requires_grad_(weight_grad)
    c = rnd(N).requires_grad_() if bias else None
    a = rnd(R, K, scale=K ** -0.5).requires_grad_()
    b = rnd(N, R, scale=R ** -0.5).requires_grad_()
    gate = (rnd(R) + 0.5).requires_grad_() if gated else None
    return [x, w, c, a, b, gate]


def _run(fn, ins, scaling, dy, lora_input=None):
    y = fn(*ins, scaling, lora_input=lora_input)
    wrt = [t for t in ins + [lora_input] if t is not None and t.requires_grad]
    return y, torch.autograd.grad(y, wrt, dy)


def _rel(a, b):
    return ((a.double() - b.double()).norm() / b.double().norm().clamp_min(1e-30)).item()


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.float16], ids=str)
@pytest.mark.parametrize("shape", SHAPES, ids=str)
@pytest.mark.parametrize("bias, gated, weight_grad", [(True, True, False), (False, False, False), (True, False, True)])
def test_cpu_matches_float64_reference_with_every_gradient(dtype, shape, bias, gated, weight_grad):
    ins = _inputs(shape, dtype, bias=bias, gated=gated, weight_grad=weight_grad, seed=sum(shape))
    scaling = 2.0
    dy = torch.randn(shape[0], shape[3], generator=torch.Generator().manual_seed(1), dtype=torch.float64).to(dtype)
    y, grads = _run(gated_lora_linear, ins, scaling, dy)
    ref_ins = [t.detach().double().requires_grad_(t.requires_grad) if t is not None else None for t in ins]
    y_ref, ref_grads = _run(gated_lora_linear_reference, ref_ins, scaling, dy.double())
    assert y.dtype == dtype and y.shape == y_ref.shape
    if dtype == torch.float32:
        bounds = [1e-5] * (1 + len(grads))
    else:
        # no worse than twice PyTorch's own error with the plain composition in the same dtype
        same = [t.detach().requires_grad_(t.requires_grad) if t is not None else None for t in ins]
        y_t, t_grads = _run(gated_lora_linear_reference, same, scaling, dy)
        bounds = [2 * _rel(a, b) + 1e-3 for a, b in zip([y_t, *t_grads], [y_ref, *ref_grads])]
    errs = [_rel(a, b) for a, b in zip([y, *grads], [y_ref, *ref_grads])]
    assert all(e <= b for e, b in zip(errs, bounds)), list(zip(errs, bounds))
    assert all(g.dtype == dtype for g in grads)


def test_cpu_lora_input_three_dim_and_strided_inputs():
    M, K, R, N = 30, 40, 8, 24
    x, w, c, a, b, g = _inputs((M, K, R, N), torch.float32, lead=(2,))
    xl = torch.randn(2, M, K, dtype=torch.float32).requires_grad_()
    big = torch.randn(R, 2 * K)
    a_strided = big[:, ::2].requires_grad_()  # non-contiguous lora_A
    dy = torch.randn(2, M, N)
    ins = [x, w, c, a_strided, b, g]
    y, grads = _run(gated_lora_linear, ins, 0.5, dy, lora_input=xl)
    ref = [t.detach().double().requires_grad_(t.requires_grad) if t is not None else None for t in ins]
    xl_ref = xl.detach().double().requires_grad_()
    y_ref, ref_grads = _run(gated_lora_linear_reference, ref, 0.5, dy.double(), lora_input=xl_ref)
    assert y.shape == (2, M, N)
    for got, want in zip([y, *grads], [y_ref, *ref_grads]):
        assert _rel(got, want) < 1e-5


def test_cpu_float64_and_lora_linear_are_exact_compositions():
    x, w, c, a, b, _ = _inputs((17, 24, 4, 20), torch.float64)
    y = lora_linear(x, w, c, a, b, 3.0)
    torch.testing.assert_close(y, x @ w.t() + c + 3.0 * (x @ a.t()) @ b.t(), rtol=1e-12, atol=1e-12)


def _big_allocations(fn, nbytes):
    """Names of the operators that themselves allocated at least ``nbytes`` while ``fn`` ran."""
    with profile(activities=[ProfilerActivity.CPU], profile_memory=True) as prof:
        fn()
    return [e.name for e in prof.events() if e.self_cpu_memory_usage >= nbytes]


def test_cpu_path_allocates_one_output_sized_buffer_each_way():
    T, K, R, N = 256, 64, 8, 96
    x, w, c, a, b, g = _inputs((T, K, R, N), torch.float32)
    with torch.no_grad():
        fwd = _big_allocations(lambda: gated_lora_linear(x, w, c, a, b, g, 2.0), T * N * 4)
    assert len(fwd) == 1, fwd  # the base GEMM writes y; bias, LoRA term and scaling go into it
    y = gated_lora_linear(x, w, c, a, b, g, 2.0)
    dy = torch.randn(T, N)
    bwd = _big_allocations(lambda: torch.autograd.grad(y, [x, a, b, g], dy, retain_graph=True), T * K * 4)
    assert len(bwd) == 1, bwd  # dx = dy·W with dh·A accumulated into it
