"""Triton kernel for the discounted cumulative sum (:mod:`lmfuse.ops.discounted_cumsum`).

One program owns one row of ``x [R, T]`` and walks it in blocks of ``BLOCK_T`` positions in scan
order (right to left for the suffix sum ``reverse=True``, left to right for the prefix sum). The
recurrence ``y_i = x_i + γ·y_{i−1}`` (i counted in scan order) is an affine map per position, so
inside a block it is one ``tl.associative_scan`` over pairs ``(a, b)`` with the composition

    (a_p, b_p) ∘ (a_c, b_c) = (a_p·a_c, b_p·a_c + b_c)

which leaves ``a_i = γ^(i+1)`` (the decay from the block's start) and ``b_i`` = the block-local
sum. The carry from the previous block enters as ``y_i = b_i + a_i·carry``. Every multiplier is
a power of ``γ ∈ [0, 1]``, so nothing grows: no ``γ^(−t)`` rescaling, no overflow at any length.
Positions past the row's end get ``(a, b) = (1, 0)``, so the block's last scan element is the
carry for the next block. Accumulation is float32; loads and stores in the tensor's dtype.
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl

from . import _common

# (BLOCK_T, num_warps) shipped for the GPU; the interpreter uses a small block to cover several
# blocks per row in tests.
CONFIGS = {"gpu": dict(BLOCK_T=1024, num_warps=4), "interpreter": dict(BLOCK_T=64, num_warps=1)}


@triton.jit
def _affine_compose(a_p, b_p, a_c, b_c):
    return a_p * a_c, b_p * a_c + b_c


@triton.jit
def _discounted_cumsum_fwd_kernel(
    x_ptr, y_ptr, T, stride_xr, stride_yr, gamma,
    REVERSE: tl.constexpr, BLOCK_T: tl.constexpr,
):
    row = tl.program_id(0).to(tl.int64)
    x_row = x_ptr + row * stride_xr
    y_row = y_ptr + row * stride_yr
    lane = tl.arange(0, BLOCK_T)
    carry = tl.zeros((), dtype=tl.float32)
    for start in range(0, T, BLOCK_T):
        k = start + lane  # index in scan order
        valid = k < T
        if REVERSE:
            pos = T - 1 - k
        else:
            pos = k
        pos = tl.where(valid, pos, 0)
        x = tl.load(x_row + pos, mask=valid, other=0.0).to(tl.float32)
        a = tl.where(valid, gamma, 1.0)
        a_scan, b_scan = tl.associative_scan((a, x), 0, _affine_compose)
        y = b_scan + a_scan * carry
        tl.store(y_row + pos, y.to(y_ptr.dtype.element_ty), mask=valid)
        carry = tl.sum(tl.where(lane == BLOCK_T - 1, y, 0.0), axis=0)


def discounted_cumsum(x2d: torch.Tensor, gamma: float, reverse: bool) -> torch.Tensor:
    """``x2d [R, T]`` (float32 / float16 / bfloat16, last dim contiguous) -> ``[R, T]`` in its
    dtype: the discounted suffix (``reverse``) or prefix sum along the last dim."""
    R, T = x2d.shape
    y = _common.new_output((R, T), x2d)
    if R == 0 or T == 0:
        return y
    cfg = CONFIGS["gpu" if x2d.is_cuda else "interpreter"]
    _discounted_cumsum_fwd_kernel[(R,)](
        x2d, y, T, x2d.stride(0), y.stride(0), float(gamma),
        REVERSE=bool(reverse), BLOCK_T=cfg["BLOCK_T"], num_warps=cfg["num_warps"])
    return y


def aot_jobs():
    """Every specialisation the launcher produces on a GPU: dtype × direction."""
    cfg = CONFIGS["gpu"]
    for dname in ("fp32", "fp16", "bf16"):
        for reverse in (True, False):
            types = {"x_ptr": _common.AOT_DTYPES[dname], "y_ptr": _common.AOT_DTYPES[dname],
                     "gamma": "fp32", "stride_xr": "i64", "stride_yr": "i64"}
            yield _common.aot_job(
                "_discounted_cumsum_fwd_kernel", _discounted_cumsum_fwd_kernel.arg_names, types,
                dict(REVERSE=reverse, BLOCK_T=cfg["BLOCK_T"]), cfg["num_warps"], 1,
                f"{dname} reverse={reverse}")
