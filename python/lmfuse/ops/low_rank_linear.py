"""``low_rank_linear``: the LPA projection ``y = (x @ down_weightᵀ) @ up_weightᵀ + bias``.

Backends: ``triton`` (CUDA; ranks ≤ 256 fused with the ``[tokens, r]`` intermediate kept on
chip), ``cuda`` (compiled extension, forced only), ``cpp`` (CPU extension), ``reference``.
Ranks above 256 use the unfused two-GEMM path (``reference``) unless a fused backend is forced,
which then raises.

Registered as ``torch.ops.lmfuse.low_rank_linear_fwd`` / ``low_rank_linear_bwd`` with fake
implementations, so ``torch.compile`` traces through without graph breaks.
"""

from __future__ import annotations

import importlib
from typing import Optional

import torch
from torch import Tensor

from ._common import (cost_for_mode, KERNEL_DTYPES, check_dim, check_same, check_tensor, dtype_limits,
                      empty_like_none, grad_or_none, pick_backend)

MAX_FUSED_RANK = 256
# On CPU the fused C++ kernel beats PyTorch by 10x+ in bf16/fp16 (no fast CPU GEMM for them in
# the torch build) but only ties MKL in fp32, where the plain two-GEMM path stays the default.
PREFERENCE = {"cuda": ("triton", "cuda", "reference"), "cpu": ("cpp", "reference"),
              ("cpu", torch.float32): ("reference", "cpp")}
_FUSED = ("triton", "cuda", "cpp")


def reference(x: Tensor, down_weight: Tensor, up_weight: Tensor, bias: Optional[Tensor] = None) -> Tensor:
    """Plain PyTorch: two chained linear maps (the intermediate in ``x``'s dtype)."""
    h = x @ down_weight.transpose(0, 1)
    y = h @ up_weight.transpose(0, 1)
    return y if bias is None else y + bias


def cost(tokens: int, d_in: int, rank: int, d_out: int, dtype_bytes: int, mode: str = "full") -> tuple[int, int]:
    """(flops, bytes) of the least work and memory traffic ``mode`` needs.

    fwd: reads x, A, B, writes y.  bwd: reads dy, x, h, A, B; writes dx, dA, dB, and dh once
    (written and read back for the weight gradient).  full = fwd + bwd.
    """
    T, K, R, N, b = tokens, d_in, rank, d_out, dtype_bytes
    fwd = (2 * T * R * (K + N), b * (T * K + R * K + N * R + T * N))
    bwd = (4 * T * R * (K + N),
           b * (T * N + T * K + T * R + R * K + N * R + T * K + R * K + N * R + 2 * T * R))
    return cost_for_mode(fwd, bwd, mode)


def _validate(x, down_weight, up_weight, bias) -> None:
    check_tensor("x", x, min_ndim=1)
    check_tensor("down_weight", down_weight, ndim=2)
    check_tensor("up_weight", up_weight, ndim=2)
    if not x.is_floating_point():
        raise TypeError(f"x must be a floating-point tensor, got {x.dtype}")
    check_same("x", x, down_weight=down_weight, up_weight=up_weight, bias=bias)
    check_dim("down_weight", down_weight.shape[1], x.shape[-1], "down_weight.shape[1] (x's last dim, d_in)")
    check_dim("up_weight", up_weight.shape[1], down_weight.shape[0], "up_weight.shape[1] (the rank, down_weight.shape[0])")
    if down_weight.shape[0] < 1:
        raise ValueError(f"rank must be at least 1, got down_weight of shape {tuple(down_weight.shape)}")
    if bias is not None:
        check_tensor("bias", bias, ndim=1)
        check_dim("bias", bias.shape[0], up_weight.shape[0], "bias.shape[0] (d_out, up_weight.shape[0])")


def _backend_for(x2d: Tensor, rank: int) -> str:
    limits = dtype_limits(x2d, _FUSED)
    if rank > MAX_FUSED_RANK:
        for b in _FUSED:
            limits.setdefault(b, f"rank {rank} > {MAX_FUSED_RANK}, the largest fused rank")
    return pick_backend("low_rank_linear", x2d, PREFERENCE, limits)


@torch.library.custom_op("lmfuse::low_rank_linear_fwd", mutates_args=())
def _fwd_op(x2d: Tensor, down: Tensor, up: Tensor, bias: Optional[Tensor], save_h: bool) -> tuple[Tensor, Tensor]:
    M, R = x2d.shape[0], down.shape[0]
    if M == 0:
        return x2d.new_empty((0, up.shape[0])), x2d.new_empty((0, R))
    backend = _backend_for(x2d, R)
    if backend == "triton":
        from ..triton_kernels import low_rank_linear as tk

        return tk.low_rank_linear_fwd(x2d, down, up, bias, save_h)
    if backend == "cpp":
        from .. import _C

        y, h = _C.low_rank_linear_fwd(x2d.contiguous(), down.contiguous(), up.contiguous(),
                                      None if bias is None else bias.contiguous(), save_h)
        return y, (h if save_h else x2d.new_empty((0, R)))
    if backend == "cuda":
        from .. import _C_cuda

        h = x2d.new_empty((M if save_h else 0, R))
        y = _C_cuda.low_rank_linear_fwd(x2d.contiguous(), down.contiguous(), up.contiguous(),
                                        None if bias is None else bias.contiguous(), h if save_h else None)
        return y, h
    h = x2d @ down.t()
    y = h @ up.t()
    if bias is not None:
        y = y + bias
    return y, (h if save_h else x2d.new_empty((0, R)))


@_fwd_op.register_fake
def _fwd_fake(x2d, down, up, bias, save_h):
    M = x2d.shape[0]
    return x2d.new_empty((M, up.shape[0])), x2d.new_empty((M if save_h else 0, down.shape[0]))


@torch.library.custom_op("lmfuse::low_rank_linear_bwd", mutates_args=())
def _bwd_op(dy: Tensor, x2d: Tensor, down: Tensor, up: Tensor, h: Tensor, has_bias: bool,
            need_x: bool, need_down: bool, need_up: bool) -> tuple[Tensor, Tensor, Tensor, Tensor]:
    M, R = x2d.shape[0], down.shape[0]
    if M == 0:
        return (torch.zeros_like(x2d), torch.zeros_like(down), torch.zeros_like(up),
                dy.new_zeros((up.shape[0],)) if has_bias else empty_like_none(dy))
    backend = _backend_for(x2d, R)
    if backend == "triton":
        from ..triton_kernels import low_rank_linear as tk

        dx, dh = tk.low_rank_linear_bwd_dx(dy, down, up)
    elif backend in ("cpp", "cuda"):
        ext = importlib.import_module("lmfuse._C" if backend == "cpp" else "lmfuse._C_cuda")
        dx, dh = ext.low_rank_linear_bwd_dx(dy.contiguous(), down.contiguous(), up.contiguous())
    else:
        dh = dy @ up
        dx = dh @ down
    if need_up and h.shape[0] != M:  # forward did not keep h: recompute it
        h = x2d @ down.t()
    d_down = dh.t() @ x2d if need_down else empty_like_none(dy)
    d_up = dy.t() @ h if need_up else empty_like_none(dy)
    d_bias = dy.sum(0) if has_bias else empty_like_none(dy)
    return (dx if need_x else empty_like_none(dy)), d_down, d_up, d_bias


@_bwd_op.register_fake
def _bwd_fake(dy, x2d, down, up, h, has_bias, need_x, need_down, need_up):
    e = dy.new_empty((0,))
    return (torch.empty_like(x2d) if need_x else e, torch.empty_like(down) if need_down else e,
            torch.empty_like(up) if need_up else e, dy.new_empty((up.shape[0],)) if has_bias else e)


def _setup_context(ctx, inputs, output):
    x2d, down, up, bias, _save_h = inputs
    ctx.save_for_backward(x2d, down, up, output[1])
    ctx.has_bias = bias is not None


def _backward(ctx, dy, _dh):
    x2d, down, up, h = ctx.saved_tensors
    need = ctx.needs_input_grad
    dx, dd, du, db = torch.ops.lmfuse.low_rank_linear_bwd(
        dy.contiguous(), x2d, down, up, h, ctx.has_bias, need[0], need[1], need[2])
    return (grad_or_none(dx, need[0]), grad_or_none(dd, need[1]), grad_or_none(du, need[2]),
            grad_or_none(db, ctx.has_bias and need[3]), None)


_fwd_op.register_autograd(_backward, setup_context=_setup_context)


def low_rank_linear(x: Tensor, down_weight: Tensor, up_weight: Tensor, bias: Optional[Tensor] = None) -> Tensor:
    """Low-rank linear map ``(x @ down_weightᵀ) @ up_weightᵀ + bias``.

    Args:
        x: ``[..., d_in]``, float32 / float16 / bfloat16 (float64 runs on the reference).
        down_weight: ``[r, d_in]``, same dtype and device as ``x``.
        up_weight: ``[d_out, r]``.
        bias: ``[d_out]`` or ``None``.

    Raises:
        ValueError: rank 0 (``down_weight`` of shape ``[0, d_in]``), as every low-rank op does.
        ``d_in = 0`` is valid: the result is ``bias`` (or zeros) broadcast to ``[..., d_out]``.

    Returns:
        ``[..., d_out]`` in ``x``'s dtype. Differentiable in every tensor argument; the
        ``[tokens, r]`` intermediate is rounded to ``x``'s dtype, as two ``nn.Linear`` would.
    """
    _validate(x, down_weight, up_weight, bias)
    lead = x.shape[:-1]
    if x.shape[-1] == 0:
        # d_in = 0: an empty sum, so y = bias (or zeros). The plain composition gives that and
        # the right gradients (zero for up_weight, the sum of dy for bias, empty for x and down).
        y = (x @ down_weight.t()) @ up_weight.t()
        return y if bias is None else y + bias
    x2d = x.reshape(-1, x.shape[-1])
    save_h = torch.is_grad_enabled() and up_weight.requires_grad
    y, _ = torch.ops.lmfuse.low_rank_linear_fwd(x2d, down_weight, up_weight, bias, save_h)
    return y.reshape(*lead, up_weight.shape[0])


__all__ = ["low_rank_linear", "reference", "cost", "MAX_FUSED_RANK", "KERNEL_DTYPES"]
