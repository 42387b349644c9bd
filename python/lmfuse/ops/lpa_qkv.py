"""``lpa_qkv_projection``: q, k and v through their own low-rank factors, reading x once.

``h = x @ [A_q; A_k; A_v]ᵀ`` is one GEMM (``[tokens, 3r]``); then ``q = h_q B_qᵀ + b_q``,
``k = h_k B_kᵀ + b_k``, ``v = h_v B_vᵀ + b_v`` in one grouped launch writing a packed
``[tokens, d_q + d_k + d_v]`` tensor (returned as three views). The three ranks must be equal.

Backends: ``triton`` (CUDA; rank ≤ 256), ``reference``. Registered as
``torch.ops.lmfuse.lpa_qkv_fwd`` / ``lpa_qkv_bwd`` with fake implementations.
"""

from __future__ import annotations

from typing import Optional, Sequence

import torch
from torch import Tensor

from ._common import (cost_for_mode, check_dim, check_same, check_tensor, dtype_limits, empty_like_none,
                      grad_or_none, pick_backend)
from .low_rank_linear import MAX_FUSED_RANK

PREFERENCE = {"cuda": ("triton", "reference"), "cpu": ("reference",)}
NAMES = ("q", "k", "v")


def reference(x: Tensor, down_weights: Sequence[Tensor], up_weights: Sequence[Tensor],
              biases: Optional[Sequence[Optional[Tensor]]] = None) -> tuple[Tensor, Tensor, Tensor]:
    """Plain PyTorch: three independent low-rank projections."""
    biases = biases or (None, None, None)
    out = []
    for a, b, c in zip(down_weights, up_weights, biases):
        y = (x @ a.transpose(0, 1)) @ b.transpose(0, 1)
        out.append(y if c is None else y + c)
    return tuple(out)


def cost(tokens: int, d_in: int, rank: int, widths: Sequence[int], dtype_bytes: int,
         mode: str = "full") -> tuple[int, int]:
    """(flops, bytes) of the least work and traffic: x read once, h ``[T, 3r]`` kept for backward."""
    T, K, R, b = tokens, d_in, rank, dtype_bytes
    Nt = sum(widths)
    w = b * (3 * R * K + Nt * R)  # all weights once
    fwd = (2 * T * 3 * R * K + 2 * T * R * Nt, b * (T * K + T * Nt) + w)
    # bwd: read dy, x, h; write dx; dh [T, 3r] written and read once; weight grads written.
    bwd = (2 * fwd[0], b * (T * Nt + 2 * T * K + T * 3 * R + 2 * T * 3 * R) + 2 * w)
    return cost_for_mode(fwd, bwd, mode)


def _validate(x, down_weights, up_weights, biases) -> None:
    check_tensor("x", x, min_ndim=1)
    if not x.is_floating_point():
        raise TypeError(f"x must be a floating-point tensor, got {x.dtype}")
    for what, seq in (("down_weights", down_weights), ("up_weights", up_weights)):
        if not isinstance(seq, (list, tuple)) or len(seq) != 3:
            raise TypeError(f"{what} must be a sequence of 3 tensors (q, k, v), got {type(seq).__name__}"
                            + (f" of length {len(seq)}" if isinstance(seq, (list, tuple)) else ""))
    if biases is not None and (not isinstance(biases, (list, tuple)) or len(biases) != 3):
        raise TypeError("biases must be None or a sequence of 3 tensors-or-None (q, k, v)")
    rank = None
    for i, n in enumerate(NAMES):
        a, b = down_weights[i], up_weights[i]
        check_tensor(f"down_weights[{i}] ({n})", a, ndim=2)
        check_tensor(f"up_weights[{i}] ({n})", b, ndim=2)
        check_same("x", x, **{f"down_weights[{i}]": a, f"up_weights[{i}]": b})
        check_dim(f"down_weights[{i}] ({n})", a.shape[1], x.shape[-1], "shape[1] (x's last dim)")
        if rank is None:
            rank = a.shape[0]
            if rank < 1:
                raise ValueError(f"rank must be at least 1, got down_weights[{i}] ({n}) of shape {tuple(a.shape)}")
        check_dim(f"down_weights[{i}] ({n})", a.shape[0], rank, "rank (all three ranks must be equal)")
        check_dim(f"up_weights[{i}] ({n})", b.shape[1], a.shape[0], "shape[1] (its rank)")
        if biases is not None and biases[i] is not None:
            c = biases[i]
            check_tensor(f"biases[{i}] ({n})", c, ndim=1)
            check_same("x", x, **{f"biases[{i}]": c})
            check_dim(f"biases[{i}] ({n})", c.shape[0], b.shape[0], "length (its up_weight's rows)")


def _backend_for(x2d: Tensor, rank: int) -> str:
    limits = dtype_limits(x2d, ("triton",))
    if rank > MAX_FUSED_RANK:
        limits.setdefault("triton", f"rank {rank} > {MAX_FUSED_RANK}, the largest fused rank")
    return pick_backend("lpa_qkv_projection", x2d, PREFERENCE, limits)


def _segments(n_q: int, n_k: int, n_v: int):
    return ((0, n_q), (n_q, n_q + n_k), (n_q + n_k, n_q + n_k + n_v))


@torch.library.custom_op("lmfuse::lpa_qkv_fwd", mutates_args=())
def _fwd_op(x2d: Tensor, down_cat: Tensor, up_cat: Tensor, bias_cat: Optional[Tensor],
            n_q: int, n_k: int, n_v: int) -> tuple[Tensor, Tensor]:
    R = up_cat.shape[1]
    h = x2d @ down_cat.t()  # the one down GEMM, [M, 3R]
    if x2d.shape[0] == 0:
        return x2d.new_empty((0, n_q + n_k + n_v)), h
    if _backend_for(x2d, R) == "triton":
        from ..triton_kernels import lpa_qkv as tk

        return tk.lpa_qkv_up_fwd(h, up_cat, bias_cat, (n_q, n_k, n_v)), h
    ys = [h[:, g * R:(g + 1) * R] @ up_cat[s:e].t() for g, (s, e) in enumerate(_segments(n_q, n_k, n_v))]
    y = torch.cat(ys, dim=1)
    return (y if bias_cat is None else y + bias_cat), h


@_fwd_op.register_fake
def _fwd_fake(x2d, down_cat, up_cat, bias_cat, n_q, n_k, n_v):
    M = x2d.shape[0]
    return x2d.new_empty((M, n_q + n_k + n_v)), x2d.new_empty((M, down_cat.shape[0]))


@torch.library.custom_op("lmfuse::lpa_qkv_bwd", mutates_args=())
def _bwd_op(dy: Tensor, x2d: Tensor, down_cat: Tensor, up_cat: Tensor, h: Tensor,
            n_q: int, n_k: int, n_v: int, has_bias: bool) -> tuple[Tensor, Tensor, Tensor, Tensor]:
    R = up_cat.shape[1]
    segs = _segments(n_q, n_k, n_v)
    if x2d.shape[0] == 0:
        dh = dy.new_zeros((0, 3 * R))
    elif _backend_for(x2d, R) == "triton":
        from ..triton_kernels import lpa_qkv as tk

        dh = tk.lpa_qkv_bwd_dh(dy, up_cat, (n_q, n_k, n_v))
    else:
        dh = torch.cat([dy[:, s:e] @ up_cat[s:e] for s, e in segs], dim=1)
    dx = dh @ down_cat
    d_down = dh.t() @ x2d
    d_up = torch.cat([dy[:, s:e].t() @ h[:, g * R:(g + 1) * R] for g, (s, e) in enumerate(segs)], dim=0)
    d_bias = dy.sum(0) if has_bias else empty_like_none(dy)
    return dx, d_down, d_up, d_bias


@_bwd_op.register_fake
def _bwd_fake(dy, x2d, down_cat, up_cat, h, n_q, n_k, n_v, has_bias):
    return (torch.empty_like(x2d), torch.empty_like(down_cat), torch.empty_like(up_cat),
            dy.new_empty((n_q + n_k + n_v,)) if has_bias else dy.new_empty((0,)))


def _setup_context(ctx, inputs, output):
    x2d, down_cat, up_cat, bias_cat, n_q, n_k, n_v = inputs
    ctx.save_for_backward(x2d, down_cat, up_cat, output[1])
    ctx.widths = (n_q, n_k, n_v)
    ctx.has_bias = bias_cat is not None


def _backward(ctx, dy, _dh):
    x2d, down_cat, up_cat, h = ctx.saved_tensors
    need = ctx.needs_input_grad
    dx, dd, du, db = torch.ops.lmfuse.lpa_qkv_bwd(dy.contiguous(), x2d, down_cat, up_cat, h,
                                                  *ctx.widths, ctx.has_bias)
    return (grad_or_none(dx, need[0]), grad_or_none(dd, need[1]), grad_or_none(du, need[2]),
            grad_or_none(db, ctx.has_bias and need[3]), None, None, None)


_fwd_op.register_autograd(_backward, setup_context=_setup_context)


def lpa_qkv_projection(x: Tensor, down_weights: Sequence[Tensor], up_weights: Sequence[Tensor],
                       biases: Optional[Sequence[Optional[Tensor]]] = None) -> tuple[Tensor, Tensor, Tensor]:
    """Fused low-rank q/k/v projections sharing one read of ``x``.

    Args:
        x: ``[..., d]``, float32 / float16 / bfloat16.
        down_weights: ``(A_q, A_k, A_v)``, each ``[r, d]`` (equal ranks).
        up_weights: ``(B_q, B_k, B_v)``, each ``[d_j, r]``.
        biases: ``None`` or ``(b_q, b_k, b_v)``, each ``[d_j]`` or ``None``.

    Returns:
        ``(q [..., d_q], k [..., d_k], v [..., d_v])``: views into one packed output.
        Differentiable in ``x`` and every weight and bias.
    """
    _validate(x, down_weights, up_weights, biases)
    widths = tuple(int(b.shape[0]) for b in up_weights)
    lead = x.shape[:-1]
    if x.shape[-1] == 0:  # d = 0: each projection is its bias (or zeros); see low_rank_linear
        from .low_rank_linear import low_rank_linear

        return tuple(low_rank_linear(x, a, b, None if biases is None else biases[i])
                     for i, (a, b) in enumerate(zip(down_weights, up_weights)))
    x2d = x.reshape(-1, x.shape[-1])
    down_cat = torch.cat(list(down_weights), dim=0)
    up_cat = torch.cat(list(up_weights), dim=0)
    bias_cat = None
    if biases is not None and any(b is not None for b in biases):
        bias_cat = torch.cat([b if b is not None else x.new_zeros(w) for b, w in zip(biases, widths)])
    y, _ = torch.ops.lmfuse.lpa_qkv_fwd(x2d, down_cat, up_cat, bias_cat, *widths)
    q, k, v = y.split(widths, dim=-1)
    return tuple(t.reshape(*lead, t.shape[-1]) for t in (q, k, v))


__all__ = ["lpa_qkv_projection", "reference", "cost"]
