"""``gated_lora_linear`` / ``lora_linear``: a frozen linear layer plus a (gated) LoRA term,

    y = x·Wᵀ + bias + scaling·((x·Aᵀ) ⊙ gate)·Bᵀ

(SoRA's gated low-rank update; ``lora_linear`` is the same op with no gate).

Backends: ``triton`` (CUDA, or CPU under ``TRITON_INTERPRET=1`` when forced) and ``reference`` (on the
CPU a fused PyTorch composition: one output buffer, ``addmm`` into it, scaling on ``alpha``).
The Triton path is two launches per direction: the skinny ``h = x·Aᵀ`` (cuBLAS), then one
kernel that is the base GEMM with the gated up-projection ``(h ⊙ gate·scaling)·Bᵀ`` and the bias
added in its epilogue. The backward uses the same kernel for ``dx = dy·W + (dhg ⊙ gate)·A``; the
LoRA weight gradients are long-reduction skinny GEMMs and go to cuBLAS. No gradient is
materialised for the frozen weight unless it requires grad.

At inference (no gradient needed for any LoRA tensor, not under ``torch.compile``), ranks whose
gate is exactly zero are dropped before the launch, so they cost nothing; an all-zero gate
runs the base GEMM alone.

Registered as ``torch.ops.lmfuse.gated_lora_linear_fwd`` / ``gated_lora_linear_bwd`` with fake
implementations (``torch.compile(fullgraph=True)`` traces through them).
"""

from __future__ import annotations

import math
from numbers import Real
from typing import Optional

import torch
from torch import Tensor

from ._common import (cost_for_mode, KERNEL_DTYPES, check_dim, check_same, check_tensor, dtype_limits,
                      empty_like_none, grad_or_none, pick_backend)

MAX_FUSED_RANK = 256
PREFERENCE = {"cuda": ("triton", "reference"), "cpu": ("reference",)}
# On the CPU the "reference" backend of the custom op is the fast composition (one addmm into the
# base output, the scaling on alpha, rank-first products); :func:`reference` is the readable one.


def reference(x: Tensor, weight: Tensor, bias: Optional[Tensor], lora_A: Tensor, lora_B: Tensor,
              gate: Optional[Tensor], scaling: float, lora_input: Optional[Tensor] = None) -> Tensor:
    """Plain PyTorch: base linear + ``scaling·((xl·Aᵀ) ⊙ gate)·Bᵀ`` with ``xl = lora_input or x``."""
    xl = x if lora_input is None else lora_input
    h = xl @ lora_A.t()
    if gate is not None:
        h = h * gate
    y = x @ weight.t() + (h @ lora_B.t()) * scaling
    return y if bias is None else y + bias


def cost(tokens: int, d_in: int, rank: int, d_out: int, dtype_bytes: int, mode: str = "full",
         weight_grad: bool = False) -> tuple[int, int]:
    """(flops, bytes) of the least work and traffic ``mode`` needs, base weight frozen.

    fwd: base GEMM + ``h = x·Aᵀ`` + up-projection; reads x (twice: once for h), W, A, B, writes y, h.
    bwd: ``dx = dy·W + dh·A``, ``dhg = dy·B``, ``dA = dhᵀx``, ``dB = dyᵀ(h⊙g)``; reads dy (twice), x,
    W, A, B, h; writes dh (the ``[T, r]`` gradient of h, shared by dx and dA), dx, dA, dB.  ``weight_grad`` adds ``dW = dyᵀx``.
    """
    T, K, R, N, b = tokens, d_in, rank, d_out, dtype_bytes
    fwd = (2 * T * N * K + 2 * T * R * (K + N),
           b * (2 * T * K + N * K + R * K + N * R + T * N + T * R))
    bwd_f = 2 * T * N * K + 2 * T * R * (2 * K + 2 * N)
    bwd_b = b * (2 * T * N + T * K + N * K + R * K + N * R + 2 * T * R + T * K + R * K + N * R)
    if weight_grad:
        bwd_f += 2 * T * N * K
        bwd_b += b * (T * N + T * K + N * K)
    return cost_for_mode(fwd, (bwd_f, bwd_b), mode)


def _validate(x, weight, bias, lora_A, lora_B, gate, scaling, lora_input) -> None:
    check_tensor("x", x, min_ndim=1)
    check_tensor("weight", weight, ndim=2)
    check_tensor("lora_A", lora_A, ndim=2)
    check_tensor("lora_B", lora_B, ndim=2)
    if not x.is_floating_point():
        raise TypeError(f"x must be a floating-point tensor, got {x.dtype}")
    if bias is not None:
        check_tensor("bias", bias, ndim=1)
    if gate is not None:
        check_tensor("gate", gate, ndim=1)
    if lora_input is not None:
        check_tensor("lora_input", lora_input, min_ndim=1)
        if lora_input.shape != x.shape:
            raise ValueError(f"lora_input must have x's shape {tuple(x.shape)}, got {tuple(lora_input.shape)}")
    check_same("x", x, weight=weight, bias=bias, lora_A=lora_A, lora_B=lora_B, gate=gate, lora_input=lora_input)
    d_out, d_in = weight.shape
    check_dim("weight", d_in, x.shape[-1], "weight.shape[1] (x's last dim, d_in)")
    check_dim("lora_A", lora_A.shape[1], d_in, "lora_A.shape[1] (d_in)")
    r = lora_A.shape[0]
    if r < 1:
        raise ValueError(f"rank must be at least 1, got lora_A of shape {tuple(lora_A.shape)}")
    check_dim("lora_B", lora_B.shape[0], d_out, "lora_B.shape[0] (d_out, weight.shape[0])")
    check_dim("lora_B", lora_B.shape[1], r, "lora_B.shape[1] (the rank, lora_A.shape[0])")
    if gate is not None:
        check_dim("gate", gate.shape[0], r, "gate.shape[0] (the rank, lora_A.shape[0])")
    if bias is not None:
        check_dim("bias", bias.shape[0], d_out, "bias.shape[0] (d_out, weight.shape[0])")
    if isinstance(scaling, bool) or not isinstance(scaling, Real) or not math.isfinite(float(scaling)):
        raise TypeError(f"scaling must be a finite real number, got {scaling!r}")
    if scaling <= 0:
        raise ValueError(f"scaling must be > 0 (LoRA's lora_alpha / r), got {scaling!r}; to switch the "
                         f"update off use a zero gate or detach the adapter, to flip its sign negate lora_B")


def _backend_for(x2d: Tensor, rank: int) -> str:
    limits = dtype_limits(x2d, ("triton",))
    if rank > MAX_FUSED_RANK:
        limits.setdefault("triton", f"rank {rank} > {MAX_FUSED_RANK}, the largest fused rank")
    return pick_backend("gated_lora_linear", x2d, PREFERENCE, limits)


@torch.library.custom_op("lmfuse::gated_lora_linear_fwd", mutates_args=())
def _fwd_op(x2d: Tensor, xl2d: Optional[Tensor], weight: Tensor, bias: Optional[Tensor], lora_A: Tensor,
            lora_B: Tensor, gate: Optional[Tensor], scaling: float, save_h: bool) -> tuple[Tensor, Tensor]:
    M, R = x2d.shape[0], lora_A.shape[0]
    if M == 0:
        return x2d.new_empty((0, weight.shape[0])), x2d.new_empty((0, R))
    xl = x2d if xl2d is None else xl2d
    h = xl @ lora_A.t()  # skinny [M, R]: cuBLAS on every backend
    if _backend_for(x2d, R) == "triton":
        from ..triton_kernels import gated_lora as tk

        y = tk.gemm_lora_epilogue(x2d, weight.t(), h, gate, scaling, lora_B.t(), bias)
    else:
        # One output buffer: the base GEMM writes it (bias folded in by addmm), the up-projection
        # accumulates into it; scaling rides on addmm's alpha, so nothing [M, d_out] is temporary.
        y = torch.addmm(bias, x2d, weight.t()) if bias is not None else x2d @ weight.t()
        y.addmm_(h if gate is None else h * gate, lora_B.t(), alpha=scaling)
    return y, (h if save_h else x2d.new_empty((0, R)))


@_fwd_op.register_fake
def _fwd_fake(x2d, xl2d, weight, bias, lora_A, lora_B, gate, scaling, save_h):
    M = x2d.shape[0]
    return x2d.new_empty((M, weight.shape[0])), x2d.new_empty((M if save_h else 0, lora_A.shape[0]))


@torch.library.custom_op("lmfuse::gated_lora_linear_bwd", mutates_args=())
def _bwd_op(dy: Tensor, x2d: Tensor, xl2d: Optional[Tensor], weight: Tensor, lora_A: Tensor, lora_B: Tensor,
            gate: Optional[Tensor], h: Tensor, scaling: float, need: list[bool]) -> list[Tensor]:
    """Gradients for (x, lora_input, weight, bias, A, B, gate); empty where ``need`` is False."""
    need_x, need_xl, need_w, need_b, need_a, need_bb, need_g = need
    M, R = x2d.shape[0], lora_A.shape[0]
    e = lambda: empty_like_none(dy)  # noqa: E731 -- a fresh one each (outputs may not alias)
    xl = x2d if xl2d is None else xl2d
    if need_bb or need_g:
        if h.shape[0] != M:  # forward did not keep h: recompute it
            h = xl @ lora_A.t()
    dhg = torch.mm(dy, lora_B).mul_(scaling)  # gradient w.r.t. (h ⊙ gate): skinny [M, R]
    dh = dhg * gate if gate is not None else dhg
    backend = _backend_for(x2d, R) if M > 0 else "reference"
    dx, dxl = e(), e()
    if need_x and xl2d is None:  # one kernel: dx = dy·W + dh·A
        if backend == "triton":
            from ..triton_kernels import gated_lora as tk

            dx = tk.gemm_lora_epilogue(dy, weight, dh, None, 1.0, lora_A, None)
        else:  # dx = dy·W, then dh·A accumulated in place (no second [M, d_in] buffer)
            dx = torch.mm(dy, weight).addmm_(dh, lora_A)
    else:
        if need_x:
            dx = dy @ weight
        if need_xl:
            dxl = dh @ lora_A
    dw = dy.t() @ x2d if need_w else e()
    db = dy.sum(0) if need_b else e()
    da = dh.t() @ xl if need_a else e()
    # dB = dyᵀ·(h ⊙ gate·scaling) = (dyᵀ·h) ⊙ (gate·scaling): the [d_out, R] product is scaled, not [M, R]
    dbb = (dy.t() @ h).mul_(gate * scaling if gate is not None else scaling) if need_bb else e()
    dg = (dhg * h).sum(0) if (need_g and gate is not None) else e()
    return [dx, dxl, dw, db, da, dbb, dg]


@_bwd_op.register_fake
def _bwd_fake(dy, x2d, xl2d, weight, lora_A, lora_B, gate, h, scaling, need):
    shapes = [x2d, xl2d, weight, dy.new_empty((weight.shape[0],)), lora_A, lora_B, gate]
    return [torch.empty_like(s) if (n and s is not None) else dy.new_empty((0,)) for n, s in zip(need, shapes)]


def _setup_context(ctx, inputs, output):
    x2d, xl2d, weight, bias, lora_A, lora_B, gate, scaling, _ = inputs
    ctx.save_for_backward(x2d, xl2d, weight, lora_A, lora_B, gate, output[1])
    ctx.scaling = scaling
    ctx.has_bias, ctx.has_xl, ctx.has_gate = bias is not None, xl2d is not None, gate is not None


def _backward(ctx, dy, _dh):
    x2d, xl2d, weight, lora_A, lora_B, gate, h = ctx.saved_tensors
    n = ctx.needs_input_grad  # (x2d, xl2d, weight, bias, A, B, gate, scaling, save_h)
    need = [n[0], ctx.has_xl and n[1], n[2], ctx.has_bias and n[3], n[4], n[5], ctx.has_gate and n[6]]
    grads = torch.ops.lmfuse.gated_lora_linear_bwd(dy.contiguous(), x2d, xl2d, weight, lora_A, lora_B,
                                                   gate, h, ctx.scaling, need)
    return (*[grad_or_none(g, k) for g, k in zip(grads, need)], None, None)


_fwd_op.register_autograd(_backward, setup_context=_setup_context)


def _drop_zero_ranks(lora_A: Tensor, lora_B: Tensor, gate: Tensor):
    """Inference only: keep the ranks whose gate is non-zero (one host sync for the count)."""
    idx = torch.nonzero(gate).flatten()
    if idx.numel() == gate.numel():
        return lora_A, lora_B, gate
    return lora_A.index_select(0, idx), lora_B.index_select(1, idx), gate.index_select(0, idx)


def gated_lora_linear(x: Tensor, weight: Tensor, bias: Optional[Tensor], lora_A: Tensor, lora_B: Tensor,
                      gate: Optional[Tensor], scaling: float, *, lora_input: Optional[Tensor] = None) -> Tensor:
    """Frozen linear layer plus a gated LoRA term (SoRA):
    ``x·weightᵀ + bias + scaling·((x·lora_Aᵀ) ⊙ gate)·lora_Bᵀ``.

    Args:
        x: ``[..., d_in]``, float32 / float16 / bfloat16 (float64 runs on the reference).
        weight: ``[d_out, d_in]``, the base weight (usually frozen: its gradient is computed only
            when it requires grad).
        bias: ``[d_out]`` or ``None``.
        lora_A: ``[r, d_in]``; lora_B: ``[d_out, r]``; gate: ``[r]`` or ``None`` (plain LoRA).
            Every tensor has ``x``'s dtype and device.
        scaling: a finite real number ``> 0`` (``lora_alpha / r``). Zero or negative raises
            ``ValueError``: LoRA's ``alpha / r`` is positive, and a non-positive value is almost
            always a wrong argument; a sign flip belongs in ``lora_B``, switching off in the gate.
        lora_input: optional ``[..., d_in]`` fed to the LoRA term instead of ``x`` (e.g. ``x``
            after dropout, as PEFT applies it); the base term still reads ``x``.

    Returns:
        ``[..., d_out]`` in ``x``'s dtype, differentiable in every tensor argument. At inference,
        ranks whose gate is exactly zero are skipped (they cost nothing).
    """
    _validate(x, weight, bias, lora_A, lora_B, gate, scaling, lora_input)
    lead, d_out = x.shape[:-1], weight.shape[0]
    x2d = x.reshape(lead.numel(), x.shape[-1])  # explicit M: d_in = 0 is valid (y = bias or 0)
    xl2d = None if lora_input is None else lora_input.reshape(lead.numel(), x.shape[-1])
    # Dropping zero ranks is exact for y and dx; only the LoRA tensors' own gradients need them.
    lora_grad = torch.is_grad_enabled() and any(
        t is not None and t.requires_grad for t in (lora_A, lora_B, gate))
    if gate is not None and not lora_grad and not torch.compiler.is_compiling():
        lora_A, lora_B, gate = _drop_zero_ranks(lora_A, lora_B, gate)
        if gate.numel() == 0:  # every rank is off: the base layer alone
            y = torch.nn.functional.linear(x, weight, bias)
            return y
    save_h = torch.is_grad_enabled() and (lora_B.requires_grad or (gate is not None and gate.requires_grad))
    y, _ = torch.ops.lmfuse.gated_lora_linear_fwd(x2d, xl2d, weight, bias, lora_A, lora_B, gate,
                                                  float(scaling), save_h)
    return y.reshape(*lead, d_out)


def lora_linear(x: Tensor, weight: Tensor, bias: Optional[Tensor], lora_A: Tensor, lora_B: Tensor,
                scaling: float, *, lora_input: Optional[Tensor] = None) -> Tensor:
    """Plain LoRA: ``x·weightᵀ + bias + scaling·(x·lora_Aᵀ)·lora_Bᵀ`` — :func:`gated_lora_linear`
    with no gate (same kernels, same arguments otherwise)."""
    return gated_lora_linear(x, weight, bias, lora_A, lora_B, None, scaling, lora_input=lora_input)


__all__ = ["gated_lora_linear", "lora_linear", "reference", "cost", "MAX_FUSED_RANK", "KERNEL_DTYPES"]
