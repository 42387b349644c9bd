"""GPU-only: the compiled Triton / CUDA kernels at real LPA sizes in bf16 and fp16.

Bound: the kernel's error against float64 is no worse than 2x the error PyTorch itself makes
computing the same two-GEMM chain in the same dtype (plus a small absolute floor).
"""

import pytest
import torch

from lmfuse.ops import (low_rank_linear, low_rank_linear_reference, lpa_qkv_projection,
                        lpa_qkv_projection_reference, use_backend)
from lmfuse.testing import rel_error

from .helpers import backend_params

pytestmark = pytest.mark.gpu


def _bounded(out, torch_out, ref, what):
    ours, theirs = rel_error(out, ref), rel_error(torch_out, ref)
    assert ours <= 2 * theirs + 1e-4, f"{what}: ours {ours:.2e} vs torch {theirs:.2e}"


@pytest.mark.parametrize("backend", backend_params(("triton", "cuda")))
@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
@pytest.mark.parametrize("T, d, r", [(2048, 4096, 128), (1000, 4096, 256), (333, 1000, 40)])
def test_low_rank_linear_real_sizes(backend, dtype, T, d, r):
    dev = "cuda"
    x = torch.randn(T, d, device=dev, dtype=dtype, requires_grad=True)
    a = (torch.randn(r, d, device=dev) / d**0.5).to(dtype).requires_grad_()
    b = (torch.randn(d, r, device=dev) / r**0.5).to(dtype).requires_grad_()
    c = torch.randn(d, device=dev, dtype=dtype, requires_grad=True)
    dy = torch.randn(T, d, device=dev, dtype=dtype)
    with use_backend(backend):
        y = low_rank_linear(x, a, b, c)
        grads = torch.autograd.grad(y, (x, a, b, c), dy)
    y_t = low_rank_linear_reference(x, a, b, c)
    grads_t = torch.autograd.grad(y_t, (x, a, b, c), dy)
    ins = [t.detach().double().requires_grad_() for t in (x, a, b, c)]
    y_r = low_rank_linear_reference(*ins)
    grads_r = torch.autograd.grad(y_r, ins, dy.double())
    _bounded(y, y_t, y_r, "y")
    for name, g, gt, gr in zip(("dx", "d_down", "d_up", "d_bias"), grads, grads_t, grads_r):
        _bounded(g, gt, gr, name)


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
def test_lpa_qkv_real_sizes(dtype):
    dev, T, d, r = "cuda", 4096, 4096, 128
    widths = (4096, 1024, 1024)
    x = torch.randn(T, d, device=dev, dtype=dtype, requires_grad=True)
    downs = [(torch.randn(r, d, device=dev) / d**0.5).to(dtype).requires_grad_() for _ in range(3)]
    ups = [(torch.randn(n, r, device=dev) / r**0.5).to(dtype).requires_grad_() for n in widths]
    with use_backend("triton"):
        out = lpa_qkv_projection(x, downs, ups)
    out_t = lpa_qkv_projection_reference(x, downs, ups)
    out_r = lpa_qkv_projection_reference(x.double(), [t.double() for t in downs], [t.double() for t in ups])
    for name, o, ot, orr in zip("qkv", out, out_t, out_r):
        _bounded(o, ot, orr, name)
