"""Triton kernels for the fused low-rank projection ``y = (x @ Aᵀ) @ Bᵀ + bias``.

Forward (``_low_rank_linear_fwd_kernel``): one program owns a ``BLOCK_M`` row tile. It
computes the ``[BLOCK_M, R]`` intermediate ``h = x @ Aᵀ`` in registers (fp32 accumulation,
rounded to the input dtype like two chained ``nn.Linear`` layers), then streams over its share
of the output columns, ``y = h @ Bᵀ``. The intermediate never goes to memory, except once when
the caller needs it saved for the backward pass (``h_out``).

When there are fewer row tiles than SMs, the output columns are split over ``split_n``
programs per row tile; each recomputes ``h`` (extra ``split_n - 1`` times ``M·K·R`` MACs,
with ``x`` re-read mostly from L2). The split is capped so that this never more than doubles
the total work.

Backward (``_low_rank_linear_bwd_kernel``): one program per row tile computes
``dh = dy @ B`` on chip, writes it once (it is needed for ``dA = dhᵀ x``), and then
``dx = dh @ A`` for its share of the input columns. The two weight gradients are plain GEMMs
with a long reduction over tokens and go to ``torch.mm`` (cuBLAS), which is what those shapes want.

Ranks up to :data:`MAX_FUSED_RANK` are fused; the op layer falls back above that.
"""

from __future__ import annotations

import functools
import os

import torch
import triton
import triton.language as tl

from . import _common

MAX_FUSED_RANK = 256

# Shipped configs, keyed by BLOCK_R (the rank padded to a power of two, at least 16).
# Every entry is compiled for sm_80 and sm_90 by tests/ops/test_triton_compile.py.
CONFIGS: dict[int, dict] = {
    16: dict(BLOCK_M=128, BLOCK_N=128, BLOCK_K=64, num_warps=8, num_stages=3),
    32: dict(BLOCK_M=128, BLOCK_N=128, BLOCK_K=64, num_warps=8, num_stages=3),
    64: dict(BLOCK_M=128, BLOCK_N=128, BLOCK_K=64, num_warps=8, num_stages=3),
    128: dict(BLOCK_M=64, BLOCK_N=128, BLOCK_K=64, num_warps=8, num_stages=3),
    256: dict(BLOCK_M=64, BLOCK_N=64, BLOCK_K=32, num_warps=8, num_stages=3),
}
# Under TRITON_INTERPRET=1 small tiles keep tests fast and make odd shapes span several tiles.
INTERPRETER_CONFIG = dict(BLOCK_M=16, BLOCK_N=16, BLOCK_K=16, num_warps=4, num_stages=1)


def block_r(rank: int) -> int:
    return max(16, triton.next_power_of_2(rank))


def shrink_for_fp32(cfg: dict, keys=("BLOCK_N", "BLOCK_K")) -> dict:
    """fp32 tiles take twice the shared memory: halve the streamed tile, two stages."""
    out = dict(cfg, num_stages=min(cfg["num_stages"], 2))
    for k in keys:
        if k in out:
            out[k] = max(16, out[k] // 2)
    return out


def config_for(block_r_: int, dtype: torch.dtype) -> dict:
    """The shipped config for a padded rank and dtype (what the AOT test compiles)."""
    cfg = CONFIGS[block_r_]
    return dict(shrink_for_fp32(cfg) if dtype == torch.float32 else cfg, BLOCK_R=block_r_)


def pick_config(rank: int, device: torch.device, dtype: torch.dtype) -> dict:
    if device.type != "cuda":
        return dict(INTERPRETER_CONFIG, BLOCK_R=block_r(rank))
    return config_for(block_r(rank), dtype)


def dot_precision(dtype: torch.dtype) -> str:
    """fp32 inputs follow torch's matmul setting: TF32 only where torch allows it."""
    if dtype == torch.float32 and torch.backends.cuda.matmul.allow_tf32:
        return "tf32"
    return "ieee"


@functools.lru_cache(maxsize=None)
def _num_sms(index: int) -> int:
    return torch.cuda.get_device_properties(index).multi_processor_count


def split_count(row_tiles: int, col_tiles: int, device: torch.device) -> tuple[int, int]:
    """How many programs share one row tile's output columns: (split, tiles per program)."""
    if device.type == "cuda":
        sms = _num_sms(device.index if device.index is not None else torch.cuda.current_device())
        want = max(1, min(2, sms // max(row_tiles, 1)))
    else:  # interpreter: exercise the split path in tests
        want = int(os.environ.get("LMFUSE_INTERPRETER_SPLIT", "2"))
    want = max(1, min(want, col_tiles))
    per = triton.cdiv(col_tiles, want)
    return triton.cdiv(col_tiles, per), per


@triton.jit
def _low_rank_linear_fwd_kernel(
    x_ptr, a_ptr, b_ptr, bias_ptr, y_ptr, h_ptr,
    M, N, K, R,
    stride_xm, stride_xk, stride_ar, stride_ak, stride_bn, stride_br,
    stride_ym, stride_yn, stride_hm, stride_hr,
    tiles_per_prog,
    HAS_BIAS: tl.constexpr, WRITE_H: tl.constexpr, PRECISION: tl.constexpr,
    BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr, BLOCK_R: tl.constexpr,
):
    pid_m = tl.program_id(0)
    pid_s = tl.program_id(1)
    offs_m = (pid_m * BLOCK_M + tl.arange(0, BLOCK_M)).to(tl.int64)
    offs_r = tl.arange(0, BLOCK_R)
    mask_m = offs_m < M
    mask_r = offs_r < R

    h = tl.zeros((BLOCK_M, BLOCK_R), dtype=tl.float32)
    for k0 in range(0, K, BLOCK_K):
        offs_k = k0 + tl.arange(0, BLOCK_K)
        mask_k = offs_k < K
        xt = tl.load(x_ptr + offs_m[:, None] * stride_xm + offs_k[None, :] * stride_xk,
                     mask=mask_m[:, None] & mask_k[None, :], other=0.0)
        at = tl.load(a_ptr + offs_r[None, :] * stride_ar + offs_k[:, None] * stride_ak,
                     mask=mask_r[None, :] & mask_k[:, None], other=0.0)
        h = tl.dot(xt, at, h, input_precision=PRECISION)
    hc = h.to(y_ptr.dtype.element_ty)
    if WRITE_H:
        if pid_s == 0:
            tl.store(h_ptr + offs_m[:, None] * stride_hm + offs_r[None, :] * stride_hr, hc,
                     mask=mask_m[:, None] & mask_r[None, :])

    t_start = pid_s * tiles_per_prog
    t_end = tl.minimum(t_start + tiles_per_prog, tl.cdiv(N, BLOCK_N))
    for t in range(t_start, t_end):
        offs_n = t * BLOCK_N + tl.arange(0, BLOCK_N)
        mask_n = offs_n < N
        bt = tl.load(b_ptr + offs_r[:, None] * stride_br + offs_n[None, :] * stride_bn,
                     mask=mask_r[:, None] & mask_n[None, :], other=0.0)
        acc = tl.dot(hc, bt, input_precision=PRECISION)
        if HAS_BIAS:
            acc += tl.load(bias_ptr + offs_n, mask=mask_n, other=0.0).to(tl.float32)[None, :]
        tl.store(y_ptr + offs_m[:, None] * stride_ym + offs_n[None, :] * stride_yn,
                 acc.to(y_ptr.dtype.element_ty), mask=mask_m[:, None] & mask_n[None, :])


@triton.jit
def _low_rank_linear_bwd_kernel(
    dy_ptr, a_ptr, b_ptr, dx_ptr, dh_ptr,
    M, N, K, R,
    stride_dym, stride_dyn, stride_ar, stride_ak, stride_bn, stride_br,
    stride_dxm, stride_dxk, stride_dhm, stride_dhr,
    tiles_per_prog,
    PRECISION: tl.constexpr,
    BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr, BLOCK_R: tl.constexpr,
):
    pid_m = tl.program_id(0)
    pid_s = tl.program_id(1)
    offs_m = (pid_m * BLOCK_M + tl.arange(0, BLOCK_M)).to(tl.int64)
    offs_r = tl.arange(0, BLOCK_R)
    mask_m = offs_m < M
    mask_r = offs_r < R

    dh = tl.zeros((BLOCK_M, BLOCK_R), dtype=tl.float32)
    for n0 in range(0, N, BLOCK_N):
        offs_n = n0 + tl.arange(0, BLOCK_N)
        mask_n = offs_n < N
        dyt = tl.load(dy_ptr + offs_m[:, None] * stride_dym + offs_n[None, :] * stride_dyn,
                      mask=mask_m[:, None] & mask_n[None, :], other=0.0)
        bt = tl.load(b_ptr + offs_n[:, None] * stride_bn + offs_r[None, :] * stride_br,
                     mask=mask_n[:, None] & mask_r[None, :], other=0.0)
        dh = tl.dot(dyt, bt, dh, input_precision=PRECISION)
    dhc = dh.to(dx_ptr.dtype.element_ty)
    if pid_s == 0:
        tl.store(dh_ptr + offs_m[:, None] * stride_dhm + offs_r[None, :] * stride_dhr, dhc,
                 mask=mask_m[:, None] & mask_r[None, :])

    t_start = pid_s * tiles_per_prog
    t_end = tl.minimum(t_start + tiles_per_prog, tl.cdiv(K, BLOCK_K))
    for t in range(t_start, t_end):
        offs_k = t * BLOCK_K + tl.arange(0, BLOCK_K)
        mask_k = offs_k < K
        at = tl.load(a_ptr + offs_r[:, None] * stride_ar + offs_k[None, :] * stride_ak,
                     mask=mask_r[:, None] & mask_k[None, :], other=0.0)
        dxt = tl.dot(dhc, at, input_precision=PRECISION)
        tl.store(dx_ptr + offs_m[:, None] * stride_dxm + offs_k[None, :] * stride_dxk,
                 dxt.to(dx_ptr.dtype.element_ty), mask=mask_m[:, None] & mask_k[None, :])


def low_rank_linear_fwd(x2d: torch.Tensor, down: torch.Tensor, up: torch.Tensor,
                        bias: torch.Tensor | None, write_h: bool) -> tuple[torch.Tensor, torch.Tensor]:
    """Launch the fused forward. ``x2d [M, K]``, ``down [R, K]``, ``up [N, R]`` (any strides).

    Returns ``(y [M, N], h [M, R])``; ``h`` is an empty tensor unless ``write_h``.
    """
    M, K = x2d.shape
    R, N = down.shape[0], up.shape[0]
    cfg = pick_config(R, x2d.device, x2d.dtype)
    y = _common.new_output((M, N), x2d)
    h = _common.new_output((M, R) if write_h else (0, R), x2d)
    row_tiles = triton.cdiv(M, cfg["BLOCK_M"])
    split, per = split_count(row_tiles, triton.cdiv(N, cfg["BLOCK_N"]), x2d.device)
    _low_rank_linear_fwd_kernel[(row_tiles, split)](
        x2d, down, up, bias.contiguous() if bias is not None else y, y, h,
        M, N, K, R,
        x2d.stride(0), x2d.stride(1), down.stride(0), down.stride(1), up.stride(0), up.stride(1),
        y.stride(0), y.stride(1), h.stride(0), h.stride(1),
        per,
        HAS_BIAS=bias is not None, WRITE_H=write_h, PRECISION=dot_precision(x2d.dtype), **cfg,
    )
    return y, h


def low_rank_linear_bwd_dx(dy: torch.Tensor, down: torch.Tensor, up: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Launch the fused data-gradient kernel. Returns ``(dx [M, K], dh [M, R])``."""
    M, N = dy.shape
    R, K = down.shape
    cfg = pick_config(R, dy.device, dy.dtype)
    dx = _common.new_output((M, K), dy)
    dh = _common.new_output((M, R), dy)
    row_tiles = triton.cdiv(M, cfg["BLOCK_M"])
    split, per = split_count(row_tiles, triton.cdiv(K, cfg["BLOCK_K"]), dy.device)
    _low_rank_linear_bwd_kernel[(row_tiles, split)](
        dy, down, up, dx, dh,
        M, N, K, R,
        dy.stride(0), dy.stride(1), down.stride(0), down.stride(1), up.stride(0), up.stride(1),
        dx.stride(0), dx.stride(1), dh.stride(0), dh.stride(1),
        per,
        PRECISION=dot_precision(dy.dtype), **cfg,
    )
    return dx, dh


def aot_jobs():
    """Every (kernel, shipped config, dtype) this module launches on a GPU."""
    specs = [
        (_low_rank_linear_fwd_kernel, ("x_ptr", "a_ptr", "b_ptr", "bias_ptr", "y_ptr", "h_ptr"),
         {"HAS_BIAS": True, "WRITE_H": True}),
        (_low_rank_linear_bwd_kernel, ("dy_ptr", "a_ptr", "b_ptr", "dx_ptr", "dh_ptr"), {}),
    ]
    yield from matmul_aot_jobs(specs, CONFIGS, config_for)


def matmul_aot_jobs(specs, configs, config_for_):
    """AOT jobs of matmul-like kernels: one per kernel × BLOCK_R config × dtype."""
    dtypes = {"fp16": torch.float16, "bf16": torch.bfloat16, "fp32": torch.float32}
    for fn, ptrs, extra in specs:
        for br in configs:
            for dname, dt in dtypes.items():
                cfg = config_for_(br, dt)
                meta = {k: v for k, v in cfg.items() if k not in ("num_warps", "num_stages")}
                yield _common.aot_job(fn.__name__, fn.arg_names, {p: _common.AOT_DTYPES[dname] for p in ptrs},
                                      dict(meta, PRECISION="ieee", **extra), cfg["num_warps"],
                                      cfg["num_stages"], f"R{br} {dname}")
