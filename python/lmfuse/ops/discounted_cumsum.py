"""``discounted_cumsum``: the discounted suffix (or prefix) sum along one dimension.

Definition (``n = x.shape[dim]``, positions ``t, s`` along ``dim``, ``γ ∈ [0, 1]``)::

    reverse=True  (suffix, the default):  y_t = Σ_{s ≥ t} γ^(s−t) · x_s     y_t = x_t + γ·y_{t+1}
    reverse=False (prefix):               y_t = Σ_{s ≤ t} γ^(t−s) · x_s     y_t = x_t + γ·y_{t−1}

with ``0^0 = 1`` (γ = 0 gives ``y = x``; γ = 1 the plain reversed / forward cumulative sum).
``mask`` (bool, ``x``'s shape) zeroes the positions where it is False *before* the sum; masked
positions still count in the exponent (positions are raw indices along ``dim``), and their own
output is computed like any other. This is the weighting of IFT's propagated loss (see
:func:`lmfuse.align.ift_weights`), where holes in the loss mask keep their place in the sequence.

The op is linear, ``y = A·x`` with ``A`` triangular; its adjoint is the same sum in the other
direction, so the gradient of the suffix sum is the prefix sum of the upstream gradient and vice
versa (the backward calls the op itself, so it is twice differentiable).

Stability: the closed form ``γ^t · cumsum(γ^(−t)·x)`` overflows float32 once ``γ^(−t)`` passes
3.4e38 (t > 1730 at γ = 0.95) and loses everything to cancellation well before. No backend here
ever forms a negative power:

* ``reference``: a blocked scan. Inside blocks of ``BLOCK`` (64) positions, one product with the
  ``[BLOCK, BLOCK]`` matrix of ``γ^(s−t)`` (``s ≥ t``; entries in ``[0, 1]``); the block sums
  are then themselves a discounted sum with factor ``γ^BLOCK``, solved by the same function
  recursively (``n/64`` values, then ``n/4096``, ...), and added back times ``γ^(distance)``.
  Every multiplier lies in ``[0, 1]``, so the rounding error stays at a few units of the
  compute dtype relative to ``Σ γ^(s−t)·|x_s|`` at any length. Computes in float32 (float64
  for float64 inputs); any device.
* ``triton``: one program per row, a ``tl.associative_scan`` over the affine maps
  ``y ↦ x + γ·y`` inside blocks of 1024, and a carry between blocks (see
  :mod:`lmfuse.triton_kernels.discounted_cumsum`); float32 accumulation.

On CUDA the order is ``triton`` then ``reference``; on the CPU ``reference`` (the Triton
interpreter runs only when forced, for tests). float64 always takes ``reference``.
Registered as ``torch.ops.lmfuse.discounted_cumsum`` with a fake implementation and autograd.
"""

from __future__ import annotations

import math
from numbers import Real
from typing import Optional

import torch
from torch import Tensor

from ._common import check_tensor, cost_for_mode, dtype_limits, pick_backend

PREFERENCE = {"cuda": ("triton", "reference"), "cpu": ("reference",)}
BLOCK = 64  # block length of the reference's scan


# ----------------------------------------------------------------------------- reference
def _power_matrix(gamma: float, n: int, dtype: torch.dtype, device) -> Tensor:
    """``P[t, s] = γ^(s−t)`` for ``s ≥ t``, else 0 (``[n, n]``; the suffix-sum operator)."""
    idx = torch.arange(n, device=device)
    diff = idx[None, :] - idx[:, None]
    p = torch.pow(torch.tensor(gamma, dtype=dtype, device=device), diff.clamp(min=0).to(dtype))
    return torch.where(diff >= 0, p, torch.zeros((), dtype=dtype, device=device))


def _suffix_rows(x: Tensor, gamma: float) -> Tensor:
    """Suffix discounted sum of every row of ``x [R, n]`` (compute dtype), blocked + recursive."""
    R, n = x.shape
    if n <= BLOCK:
        return x @ _power_matrix(gamma, n, x.dtype, x.device).t()
    nb = -(-n // BLOCK)
    xb = torch.nn.functional.pad(x, (0, nb * BLOCK - n)).reshape(R, nb, BLOCK)
    local = xb @ _power_matrix(gamma, BLOCK, x.dtype, x.device).t()  # sums inside each block
    # full[b] = y at the first position of block b = local first + γ^BLOCK · full[b+1]
    block_gamma = gamma ** BLOCK
    full = _suffix_rows(local[:, :, 0].contiguous(), block_gamma)
    nxt = torch.nn.functional.pad(full[:, 1:], (0, 1))  # y at the start of the next block (0 past the end)
    decay = torch.pow(torch.tensor(gamma, dtype=x.dtype, device=x.device),
                      torch.arange(BLOCK, 0, -1, device=x.device, dtype=x.dtype))  # γ^(BLOCK−i)
    y = local + nxt[:, :, None] * decay
    return y.reshape(R, nb * BLOCK)[:, :n]


def _compute_dtype(dtype: torch.dtype) -> torch.dtype:
    return torch.float64 if dtype == torch.float64 else torch.float32


def _reference_2d(x2d: Tensor, gamma: float, reverse: bool) -> Tensor:
    ct = _compute_dtype(x2d.dtype)
    x = x2d.to(ct)
    if not reverse:
        x = x.flip(-1)
    y = _suffix_rows(x, gamma)
    if not reverse:
        y = y.flip(-1)
    return y.to(x2d.dtype).contiguous()


def reference(x: Tensor, gamma: float, *, dim: int = -1, reverse: bool = True,
              mask: Optional[Tensor] = None) -> Tensor:
    """Plain PyTorch definition of :func:`discounted_cumsum` (the blocked scan; computed in
    float32, or float64 for float64 inputs; returns ``x``'s dtype). Same arguments."""
    if mask is not None:
        x = torch.where(mask, x, torch.zeros((), dtype=x.dtype, device=x.device))
    xt = x.movedim(dim, -1)
    y = _reference_2d(xt.reshape(math.prod(xt.shape[:-1]), xt.shape[-1]), float(gamma), reverse)
    return y.reshape(xt.shape).movedim(-1, dim)


# ----------------------------------------------------------------------------- cost
def cost(rows: int, length: int, dtype_bytes: int, mode: str = "full") -> tuple[int, int]:
    """(flops, bytes): the recurrence does one multiply-add per element (``2·R·n`` flops) and
    reads ``x`` / writes ``y`` once; the backward is the same sum of the upstream gradient."""
    n = rows * length
    one = (2 * n, 2 * dtype_bytes * n)
    return cost_for_mode(one, one, mode)


# ----------------------------------------------------------------------------- torch.library op
def _backend_for(x2d: Tensor) -> str:
    return pick_backend("discounted_cumsum", x2d, PREFERENCE, dtype_limits(x2d, ("triton",)))


@torch.library.custom_op("lmfuse::discounted_cumsum", mutates_args=())
def _op(x2d: Tensor, gamma: float, reverse: bool) -> Tensor:
    if x2d.numel() == 0:
        return torch.empty_like(x2d)
    if _backend_for(x2d) == "triton":
        from ..triton_kernels import discounted_cumsum as tk

        return tk.discounted_cumsum(x2d.contiguous(), gamma, reverse)
    return _reference_2d(x2d, gamma, reverse)


@_op.register_fake
def _fake(x2d, gamma, reverse):
    return torch.empty_like(x2d)


def _setup_context(ctx, inputs, output):
    _, ctx.gamma, ctx.reverse = inputs


def _backward(ctx, dy):
    # y = A x with A the (suffix / prefix) operator; dx = Aᵀ dy, the sum in the other direction
    return torch.ops.lmfuse.discounted_cumsum(dy.contiguous(), ctx.gamma, not ctx.reverse), None, None


_op.register_autograd(_backward, setup_context=_setup_context)


# ----------------------------------------------------------------------------- public op
def _validate(x, gamma, dim, reverse, mask) -> tuple[float, int]:
    check_tensor("x", x, min_ndim=1)
    if not x.is_floating_point():
        raise TypeError(f"x must be a floating-point tensor, got {x.dtype}")
    if isinstance(gamma, bool) or not isinstance(gamma, Real) or not math.isfinite(float(gamma)):
        raise TypeError(f"gamma must be a finite real number, got {gamma!r}")
    if not 0.0 <= float(gamma) <= 1.0:
        raise ValueError(f"gamma must be in [0, 1], got {gamma!r}")
    if isinstance(dim, bool) or not isinstance(dim, int):
        raise TypeError(f"dim must be an int, got {dim!r}")
    if not -x.dim() <= dim < x.dim():
        raise ValueError(f"dim must be in [{-x.dim()}, {x.dim()}) for x of shape {tuple(x.shape)}, got {dim}")
    if not isinstance(reverse, bool):
        raise TypeError(f"reverse must be a bool, got {reverse!r}")
    if mask is not None:
        check_tensor("mask", mask)
        if mask.dtype != torch.bool:
            raise TypeError(f"mask must have dtype torch.bool, got {mask.dtype}")
        if mask.shape != x.shape:
            raise ValueError(f"mask must have x's shape {tuple(x.shape)}, got {tuple(mask.shape)}")
        if mask.device != x.device:
            raise ValueError(f"mask is on {mask.device} but x is on {x.device}; they must match")
    return float(gamma), dim % x.dim()


def discounted_cumsum(x: Tensor, gamma: float, *, dim: int = -1, reverse: bool = True,
                      mask: Optional[Tensor] = None) -> Tensor:
    """Discounted cumulative sum of ``x`` along ``dim``.

    Args:
        x: ``[..., n, ...]`` float32 / float16 / bfloat16 / float64, any strides.
        gamma: the discount γ, a number in ``[0, 1]``.
        dim: the dimension summed along (default the last).
        reverse: True (default) for the suffix sum ``y_t = Σ_{s≥t} γ^(s−t) x_s``; False for the
            prefix sum ``y_t = Σ_{s≤t} γ^(t−s) x_s``.
        mask: bool, ``x``'s shape, or None: positions where it is False contribute nothing
            (their gradient is 0) but keep their place in the exponent.

    Returns:
        ``x``'s shape and dtype (float16 / bfloat16 accumulate in float32, rounded once).
        Differentiable in ``x``: the gradient is the discounted sum of the upstream gradient in
        the other direction. Stable at any length (no negative powers of γ; see the module doc).
    """
    gamma, dim = _validate(x, gamma, dim, reverse, mask)
    if mask is not None:
        x = torch.where(mask, x, torch.zeros((), dtype=x.dtype, device=x.device))
    xt = x.movedim(dim, -1)
    shape = xt.shape
    rows = math.prod(shape[:-1])
    y = torch.ops.lmfuse.discounted_cumsum(xt.reshape(rows, shape[-1]).contiguous(), gamma, reverse)
    return y.reshape(shape).movedim(-1, dim)


__all__ = ["discounted_cumsum", "reference", "cost", "BLOCK"]
