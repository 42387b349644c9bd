"""Triton kernel for the gated LoRA linear layer: a GEMM with the LoRA term in its epilogue,

    out = X·W + ((H ⊙ gate)·scaling)·U + bias        X [M, K], W [K, N], H [M, R], U [R, N]

Forward:  X = x, W = weightᵀ, H = x·Aᵀ, U = Bᵀ, gate, bias  → y = x·Wᵀ + s·((x·Aᵀ) ⊙ g)·Bᵀ + b
Backward: X = dy, W = weight, H = dh = s·(dy·B) ⊙ g, U = A    → dx = dy·W + dh·A

One program owns a ``BLOCK_M × BLOCK_N`` output tile: the main loop is the base GEMM (the
``K``-long reduction that dominates the cost), and the epilogue adds one ``[BLOCK_M, R] ×
[R, BLOCK_N]`` product before the single store. The skinny ``H`` (``M × R``) is computed before
the launch by cuBLAS; it is read once per output-column tile, which for ``R ≤ 64`` is a few
percent of the base GEMM's traffic. Program ids are grouped along M (``GROUP_M``) so that
consecutive programs share the same ``X`` rows in L2.

All strides are arguments, so transposed views (``weightᵀ``, ``Bᵀ``) need no copy.
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl

from . import _common
from .low_rank_linear import block_r

MAX_FUSED_RANK = 256

# Shipped configs, keyed by BLOCK_R (the rank padded to a power of two, at least 16).
# Every entry is compiled for sm_80 and sm_90 by tests/ops/test_triton_compile.py.
CONFIGS: dict[int, dict] = {
    16: dict(BLOCK_M=128, BLOCK_N=128, BLOCK_K=64, GROUP_M=8, num_warps=8, num_stages=4),
    32: dict(BLOCK_M=128, BLOCK_N=128, BLOCK_K=64, GROUP_M=8, num_warps=8, num_stages=4),
    64: dict(BLOCK_M=128, BLOCK_N=128, BLOCK_K=64, GROUP_M=8, num_warps=8, num_stages=3),
    128: dict(BLOCK_M=128, BLOCK_N=128, BLOCK_K=64, GROUP_M=8, num_warps=8, num_stages=3),
    256: dict(BLOCK_M=64, BLOCK_N=128, BLOCK_K=64, GROUP_M=8, num_warps=8, num_stages=3),
}
# Under TRITON_INTERPRET=1 small tiles keep tests fast and make odd shapes span several tiles.
INTERPRETER_CONFIG = dict(BLOCK_M=16, BLOCK_N=16, BLOCK_K=16, GROUP_M=2, num_warps=4, num_stages=1)


def config_for(block_r_: int, dtype: torch.dtype) -> dict:
    """The shipped config for a padded rank and dtype (what the AOT test compiles)."""
    cfg = dict(CONFIGS[block_r_])
    if dtype == torch.float32:  # fp32 tiles take twice the shared memory
        cfg.update(BLOCK_K=32, num_stages=min(cfg["num_stages"], 3))
        if block_r_ >= 128:
            cfg.update(BLOCK_M=64, num_stages=2)
        if block_r_ >= 256:  # the epilogue's [R, BLOCK_N] fp32 tile alone would be 128 KiB
            cfg.update(BLOCK_N=64)
    return dict(cfg, BLOCK_R=block_r_)


def pick_config(rank: int, device: torch.device, dtype: torch.dtype) -> dict:
    if device.type != "cuda":
        return dict(INTERPRETER_CONFIG, BLOCK_R=block_r(rank))
    return config_for(block_r(rank), dtype)


def dot_precision(dtype: torch.dtype) -> str:
    """fp32 inputs follow torch's matmul setting: TF32 only where torch allows it."""
    if dtype == torch.float32 and torch.backends.cuda.matmul.allow_tf32:
        return "tf32"
    return "ieee"


@triton.jit
def _gated_lora_gemm_kernel(
    x_ptr, w_ptr, h_ptr, g_ptr, u_ptr, bias_ptr, out_ptr,
    M, N, K, R, scaling,
    stride_xm, stride_xk, stride_wk, stride_wn, stride_hm, stride_hr,
    stride_ur, stride_un, stride_om, stride_on,
    HAS_GATE: tl.constexpr, HAS_BIAS: tl.constexpr, PRECISION: tl.constexpr,
    BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr, BLOCK_R: tl.constexpr,
    GROUP_M: tl.constexpr,
):
    # grouped ordering: GROUP_M row tiles sweep the columns together (X rows stay in L2)
    pid = tl.program_id(0)
    tiles_m = tl.cdiv(M, BLOCK_M)
    tiles_n = tl.cdiv(N, BLOCK_N)
    per_group = GROUP_M * tiles_n
    first_m = (pid // per_group) * GROUP_M
    group_size = tl.minimum(tiles_m - first_m, GROUP_M)
    pid_m = first_m + (pid % per_group) % group_size
    pid_n = (pid % per_group) // group_size

    offs_m = (pid_m * BLOCK_M + tl.arange(0, BLOCK_M)).to(tl.int64)
    offs_n = (pid_n * BLOCK_N + tl.arange(0, BLOCK_N)).to(tl.int64)
    mask_m = offs_m < M
    mask_n = offs_n < N

    acc = tl.zeros((BLOCK_M, BLOCK_N), dtype=tl.float32)
    for k0 in range(0, K, BLOCK_K):
        offs_k = k0 + tl.arange(0, BLOCK_K)
        mask_k = offs_k < K
        xt = tl.load(x_ptr + offs_m[:, None] * stride_xm + offs_k[None, :] * stride_xk,
                     mask=mask_m[:, None] & mask_k[None, :], other=0.0)
        wt = tl.load(w_ptr + offs_k[:, None] * stride_wk + offs_n[None, :] * stride_wn,
                     mask=mask_k[:, None] & mask_n[None, :], other=0.0)
        acc = tl.dot(xt, wt, acc, input_precision=PRECISION)

    # epilogue: the LoRA term, gate and scaling folded into H's rows before one small dot
    offs_r = tl.arange(0, BLOCK_R)
    mask_r = offs_r < R
    ht = tl.load(h_ptr + offs_m[:, None] * stride_hm + offs_r[None, :] * stride_hr,
                 mask=mask_m[:, None] & mask_r[None, :], other=0.0).to(tl.float32)
    if HAS_GATE:
        ht = ht * tl.load(g_ptr + offs_r, mask=mask_r, other=0.0).to(tl.float32)[None, :]
    ht = (ht * scaling).to(out_ptr.dtype.element_ty)
    ut = tl.load(u_ptr + offs_r[:, None] * stride_ur + offs_n[None, :] * stride_un,
                 mask=mask_r[:, None] & mask_n[None, :], other=0.0)
    acc = tl.dot(ht, ut, acc, input_precision=PRECISION)
    if HAS_BIAS:
        acc += tl.load(bias_ptr + offs_n, mask=mask_n, other=0.0).to(tl.float32)[None, :]
    tl.store(out_ptr + offs_m[:, None] * stride_om + offs_n[None, :] * stride_on,
             acc.to(out_ptr.dtype.element_ty), mask=mask_m[:, None] & mask_n[None, :])


def gemm_lora_epilogue(x: torch.Tensor, w: torch.Tensor, h: torch.Tensor, gate: torch.Tensor | None,
                       scaling: float, u: torch.Tensor, bias: torch.Tensor | None) -> torch.Tensor:
    """``x [M, K] · w [K, N] + ((h [M, R] ⊙ gate [R])·scaling)·u [R, N] + bias [N]`` in one launch.

    Any strides (views such as ``weight.t()`` are read in place); returns a new ``[M, N]`` tensor
    in ``x``'s dtype. ``R`` ≤ :data:`MAX_FUSED_RANK`.
    """
    M, K = x.shape
    N, R = w.shape[1], h.shape[1]
    if R > MAX_FUSED_RANK:
        raise ValueError(f"rank {R} > {MAX_FUSED_RANK}, the largest fused rank")
    cfg = pick_config(R, x.device, x.dtype)
    # the kernel reads the two vectors with unit stride; they are tiny, so copy if strided
    gate = gate.contiguous() if gate is not None else None
    bias = bias.contiguous() if bias is not None else None
    out = _common.new_output((M, N), x)
    if M == 0 or N == 0:
        return out
    grid = (triton.cdiv(M, cfg["BLOCK_M"]) * triton.cdiv(N, cfg["BLOCK_N"]),)
    _gated_lora_gemm_kernel[grid](
        x, w, h, gate if gate is not None else h, u, bias if bias is not None else out, out,
        M, N, K, R, float(scaling),
        x.stride(0), x.stride(1), w.stride(0), w.stride(1), h.stride(0), h.stride(1),
        u.stride(0), u.stride(1), out.stride(0), out.stride(1),
        HAS_GATE=gate is not None, HAS_BIAS=bias is not None, PRECISION=dot_precision(x.dtype), **cfg,
    )
    return out


def aot_jobs():
    """Every (shipped config, dtype, gate/bias variant) this module launches on a GPU."""
    fn = _gated_lora_gemm_kernel
    ptrs = ("x_ptr", "w_ptr", "h_ptr", "g_ptr", "u_ptr", "bias_ptr", "out_ptr")
    dtypes = {"fp16": torch.float16, "bf16": torch.bfloat16, "fp32": torch.float32}
    for br in CONFIGS:
        for dname, dt in dtypes.items():
            cfg = config_for(br, dt)
            meta = {k: v for k, v in cfg.items() if k not in ("num_warps", "num_stages")}
            types = {p: _common.AOT_DTYPES[dname] for p in ptrs}
            types["scaling"] = "fp32"
            for gate, bias in ((True, True), (False, False)):  # forward with gate+bias; dx
                yield _common.aot_job(fn.__name__, fn.arg_names, types,
                                      dict(meta, PRECISION="ieee", HAS_GATE=gate, HAS_BIAS=bias),
                                      cfg["num_warps"], cfg["num_stages"],
                                      f"R{br} {dname} gate={gate} bias={bias}")
