"""Triton kernels for the fused LPA q/k/v projection.

The three down projections are one GEMM, ``h = x @ [A_q; A_k; A_v]ᵀ`` (``[M, 3R]``), so ``x``
is read once. The three up projections are block-diagonal: output segment ``g`` (q, k or v)
only uses columns ``g·R … (g+1)·R`` of ``h``. ``_lpa_qkv_up_fwd_kernel`` computes all three in
one launch (grid axis 2 = the segment) and writes them into one packed ``[M, N_q+N_k+N_v]``
tensor; ``_lpa_qkv_bwd_kernel`` is its transpose, ``dh[:, g] = dy[:, seg g] @ B_g``.

The down GEMM and the weight gradients (``dA = dhᵀ x``, ``dB_g = dy_gᵀ h_g``) are plain GEMMs
and go to ``torch.mm`` (cuBLAS).
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl

from . import _common

from .low_rank_linear import (INTERPRETER_CONFIG, block_r, dot_precision, matmul_aot_jobs,
                              shrink_for_fp32)

MAX_FUSED_RANK = 256

# Keyed by BLOCK_R; compiled for sm_80 / sm_90 by the tests.
CONFIGS: dict[int, dict] = {
    16: dict(BLOCK_M=128, BLOCK_N=128, num_warps=4, num_stages=3),
    32: dict(BLOCK_M=128, BLOCK_N=128, num_warps=4, num_stages=3),
    64: dict(BLOCK_M=128, BLOCK_N=128, num_warps=8, num_stages=3),
    128: dict(BLOCK_M=128, BLOCK_N=128, num_warps=8, num_stages=3),
    256: dict(BLOCK_M=64, BLOCK_N=128, num_warps=8, num_stages=3),
}


def config_for(block_r_: int, dtype: torch.dtype) -> dict:
    """The shipped config for a padded rank and dtype (what the AOT test compiles)."""
    cfg = CONFIGS[block_r_]
    if dtype == torch.float32:  # fp32 tiles are twice the bytes: halve both tile dims
        cfg = shrink_for_fp32(cfg, keys=("BLOCK_N", "BLOCK_M"))
    return dict(cfg, BLOCK_R=block_r_)


def pick_config(rank: int, device: torch.device, dtype: torch.dtype) -> dict:
    if device.type != "cuda":
        cfg = {k: INTERPRETER_CONFIG[k] for k in ("BLOCK_M", "BLOCK_N", "num_warps", "num_stages")}
        return dict(cfg, BLOCK_R=block_r(rank))
    return config_for(block_r(rank), dtype)


@triton.jit
def _segment(g, n_q, n_k, n_v):
    """(first packed column, width) of segment g (0 = q, 1 = k, 2 = v)."""
    start = tl.where(g == 0, 0, tl.where(g == 1, n_q, n_q + n_k))
    width = tl.where(g == 0, n_q, tl.where(g == 1, n_k, n_v))
    return start, width


@triton.jit
def _lpa_qkv_up_fwd_kernel(
    h_ptr, b_ptr, bias_ptr, y_ptr,
    M, R, N_Q, N_K, N_V,
    stride_hm, stride_hr, stride_bn, stride_br, stride_ym, stride_yn,
    HAS_BIAS: tl.constexpr, PRECISION: tl.constexpr,
    BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_R: tl.constexpr,
):
    pid_m = tl.program_id(0)
    pid_n = tl.program_id(1)
    g = tl.program_id(2)
    start, width = _segment(g, N_Q, N_K, N_V)
    if pid_n * BLOCK_N < width:
        offs_m = (pid_m * BLOCK_M + tl.arange(0, BLOCK_M)).to(tl.int64)
        offs_r = tl.arange(0, BLOCK_R)
        local_n = pid_n * BLOCK_N + tl.arange(0, BLOCK_N)
        offs_n = start + local_n
        mask_m = offs_m < M
        mask_r = offs_r < R
        mask_n = local_n < width
        ht = tl.load(h_ptr + offs_m[:, None] * stride_hm + (g * R + offs_r)[None, :] * stride_hr,
                     mask=mask_m[:, None] & mask_r[None, :], other=0.0)
        bt = tl.load(b_ptr + offs_r[:, None] * stride_br + offs_n[None, :] * stride_bn,
                     mask=mask_r[:, None] & mask_n[None, :], other=0.0)
        acc = tl.dot(ht, bt, input_precision=PRECISION)
        if HAS_BIAS:
            acc += tl.load(bias_ptr + offs_n, mask=mask_n, other=0.0).to(tl.float32)[None, :]
        tl.store(y_ptr + offs_m[:, None] * stride_ym + offs_n[None, :] * stride_yn,
                 acc.to(y_ptr.dtype.element_ty), mask=mask_m[:, None] & mask_n[None, :])


@triton.jit
def _lpa_qkv_bwd_kernel(
    dy_ptr, b_ptr, dh_ptr,
    M, R, N_Q, N_K, N_V,
    stride_dym, stride_dyn, stride_bn, stride_br, stride_dhm, stride_dhr,
    PRECISION: tl.constexpr,
    BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_R: tl.constexpr,
):
    pid_m = tl.program_id(0)
    g = tl.program_id(1)
    start, width = _segment(g, N_Q, N_K, N_V)
    offs_m = (pid_m * BLOCK_M + tl.arange(0, BLOCK_M)).to(tl.int64)
    offs_r = tl.arange(0, BLOCK_R)
    mask_m = offs_m < M
    mask_r = offs_r < R
    dh = tl.zeros((BLOCK_M, BLOCK_R), dtype=tl.float32)
    for n0 in range(0, width, BLOCK_N):
        local_n = n0 + tl.arange(0, BLOCK_N)
        offs_n = start + local_n
        mask_n = local_n < width
        dyt = tl.load(dy_ptr + offs_m[:, None] * stride_dym + offs_n[None, :] * stride_dyn,
                      mask=mask_m[:, None] & mask_n[None, :], other=0.0)
        bt = tl.load(b_ptr + offs_n[:, None] * stride_bn + offs_r[None, :] * stride_br,
                     mask=mask_n[:, None] & mask_r[None, :], other=0.0)
        dh = tl.dot(dyt, bt, dh, input_precision=PRECISION)
    tl.store(dh_ptr + offs_m[:, None] * stride_dhm + (g * R + offs_r)[None, :] * stride_dhr,
             dh.to(dh_ptr.dtype.element_ty), mask=mask_m[:, None] & mask_r[None, :])


def lpa_qkv_up_fwd(h: torch.Tensor, up_cat: torch.Tensor, bias_cat: torch.Tensor | None,
                   widths: tuple[int, int, int]) -> torch.Tensor:
    """``h [M, 3R]``, ``up_cat [N_q+N_k+N_v, R]`` → packed ``y [M, N_q+N_k+N_v]``."""
    M = h.shape[0]
    R = up_cat.shape[1]
    cfg = pick_config(R, h.device, h.dtype)
    y = _common.new_output((M, sum(widths)), h)
    grid = (triton.cdiv(M, cfg["BLOCK_M"]), triton.cdiv(max(widths), cfg["BLOCK_N"]), 3)
    _lpa_qkv_up_fwd_kernel[grid](
        h, up_cat, bias_cat if bias_cat is not None else y, y,
        M, R, *widths,
        h.stride(0), h.stride(1), up_cat.stride(0), up_cat.stride(1), y.stride(0), y.stride(1),
        HAS_BIAS=bias_cat is not None, PRECISION=dot_precision(h.dtype), **cfg,
    )
    return y


def lpa_qkv_bwd_dh(dy: torch.Tensor, up_cat: torch.Tensor, widths: tuple[int, int, int]) -> torch.Tensor:
    """``dy [M, N_q+N_k+N_v]`` packed, ``up_cat [N_tot, R]`` → ``dh [M, 3R]``."""
    M = dy.shape[0]
    R = up_cat.shape[1]
    cfg = pick_config(R, dy.device, dy.dtype)
    dh = _common.new_output((M, 3 * R), dy)
    grid = (triton.cdiv(M, cfg["BLOCK_M"]), 3)
    _lpa_qkv_bwd_kernel[grid](
        dy, up_cat, dh,
        M, R, *widths,
        dy.stride(0), dy.stride(1), up_cat.stride(0), up_cat.stride(1), dh.stride(0), dh.stride(1),
        PRECISION=dot_precision(dy.dtype), **cfg,
    )
    return dh


def aot_jobs():
    """Every (kernel, shipped config, dtype) this module launches on a GPU."""
    specs = [
        (_lpa_qkv_up_fwd_kernel, ("h_ptr", "b_ptr", "bias_ptr", "y_ptr"), {"HAS_BIAS": True}),
        (_lpa_qkv_bwd_kernel, ("dy_ptr", "b_ptr", "dh_ptr"), {}),
    ]
    yield from matmul_aot_jobs(specs, CONFIGS, config_for)
