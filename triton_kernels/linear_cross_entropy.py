"""Triton kernels of the fused vocabulary losses (see :mod:`lmfuse.ops.linear_cross_entropy` for the
semantics and the kernel contract).

Forward (``_linear_cross_entropy_fwd_kernel``): one program owns ``BLOCK_N`` tokens and one slice
of the vocabulary. It loops over ``BLOCK_V``-wide vocabulary tiles; each tile is a GEMM
``[BLOCK_N, H] × [H, BLOCK_V]`` with a ``BLOCK_K`` loop, kept in registers, and folded at once into
running per-token statistics (online max ``m``, ``Σ exp(z − m)``, ``Σ exp(z − m)·z``, ``Σ z``, the
target logit and the first argmax). No logits tile ever reaches memory. When there are too few
token blocks to fill the GPU, the vocabulary is split over programs (``grid[1]``) and the
per-slice partials ``(m, d, t, Σz, z_target, argmax)`` — O(splits × N) floats — are merged by
:func:`merge_partials` (a few PyTorch ops on ``[splits, N]``).

Backward: token-chunked. Per chunk of ``C`` tokens the logits are recomputed by one cuBLAS GEMM
into a float32 ``[C, V']`` workspace, ``_linear_cross_entropy_bwd_kernel`` turns it into the
gradient of the pre-scale logits ``G`` (``p`` normalised by the lse of the recomputed row, which
keeps Σp = 1 at any logit scale; then the per-token coefficients, the softcap derivative and the
scale) in the input dtype, and cuBLAS does
``dH = G·W`` and ``dW += Gᵀ·H`` (float32 accumulation across chunks). This is exact (no gradient
filtering), deterministic, and runs the two backward GEMMs (3/4 of the backward flops) at cuBLAS
speed; the workspace is bounded by the chunk size, not by N.
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl

from . import _common

# Shipped configs of the forward kernel, keyed by the dtype's width; compiled for sm_80 / sm_90 by
# tests/ops/test_triton_compile.py (every tl.dot dimension >= 16, powers of two).
FWD_CONFIGS: dict[str, dict] = {
    "16bit": dict(BLOCK_N=128, BLOCK_V=128, BLOCK_K=64, num_warps=8, num_stages=3),
    "fp32": dict(BLOCK_N=64, BLOCK_V=128, BLOCK_K=32, num_warps=8, num_stages=3),
}
BWD_CONFIG = dict(BLOCK_V=1024, num_warps=4, num_stages=1)
# Under TRITON_INTERPRET=1: small tiles, so that odd shapes span several tiles and slices.
INTERPRETER_FWD = dict(BLOCK_N=16, BLOCK_V=32, BLOCK_K=16, num_warps=4, num_stages=1)
INTERPRETER_BWD = dict(BLOCK_V=64, num_warps=4, num_stages=1)
INTERPRETER_SPLITS = 3


def fwd_config(dtype: torch.dtype, device: torch.device) -> dict:
    if device.type != "cuda":
        return dict(INTERPRETER_FWD)
    return dict(FWD_CONFIGS["fp32" if dtype == torch.float32 else "16bit"])


def dot_precision(dtype: torch.dtype) -> str:
    """fp32 inputs follow torch's matmul setting: TF32 only where torch allows it."""
    if dtype == torch.float32 and torch.backends.cuda.matmul.allow_tf32:
        return "tf32"
    return "ieee"


@triton.jit
def _tanh(x):
    # 1 − 2/(e^{2x} + 1): exact limits ±1 for large |x| (e^{2x} → inf or 0), no NaN
    return 1.0 - 2.0 / (tl.exp(2.0 * x) + 1.0)


@triton.jit
def _linear_cross_entropy_fwd_kernel(
    h_ptr, w_ptr, bias_ptr, t_ptr,
    m_ptr, d_ptr, zt_ptr, sz_ptr, pz_ptr, am_ptr,
    N, H, V, V_PER_SPLIT, logit_scale, softcap,
    stride_hn, stride_hk, stride_wv, stride_wk,
    HAS_BIAS: tl.constexpr, HAS_SOFTCAP: tl.constexpr, WANT_SUM_Z: tl.constexpr,
    WANT_SUM_PZ: tl.constexpr, WANT_ARGMAX: tl.constexpr, PRECISION: tl.constexpr,
    BLOCK_N: tl.constexpr, BLOCK_V: tl.constexpr, BLOCK_K: tl.constexpr,
):
    pid_n = tl.program_id(0)
    split = tl.program_id(1)
    offs_n = (pid_n * BLOCK_N + tl.arange(0, BLOCK_N)).to(tl.int64)
    mask_n = offs_n < N
    tgt = tl.load(t_ptr + offs_n, mask=mask_n, other=-1)
    v_begin = split * V_PER_SPLIT
    v_end = tl.minimum(v_begin + V_PER_SPLIT, V)

    m = tl.full((BLOCK_N,), float("-inf"), tl.float32)
    d = tl.zeros((BLOCK_N,), tl.float32)
    zt = tl.zeros((BLOCK_N,), tl.float32)
    sz = tl.zeros((BLOCK_N,), tl.float32)
    pz = tl.zeros((BLOCK_N,), tl.float32)
    am = tl.zeros((BLOCK_N,), tl.int32)
    for v0 in range(v_begin, v_end, BLOCK_V):
        offs_v = v0 + tl.arange(0, BLOCK_V)
        mask_v = offs_v < v_end
        acc = tl.zeros((BLOCK_N, BLOCK_V), tl.float32)
        for k0 in range(0, H, BLOCK_K):
            offs_k = k0 + tl.arange(0, BLOCK_K)
            mask_k = offs_k < H
            ht = tl.load(h_ptr + offs_n[:, None] * stride_hn + offs_k[None, :] * stride_hk,
                         mask=mask_n[:, None] & mask_k[None, :], other=0.0)
            wt = tl.load(w_ptr + offs_v.to(tl.int64)[None, :] * stride_wv + offs_k[:, None] * stride_wk,
                         mask=mask_k[:, None] & mask_v[None, :], other=0.0)
            acc = tl.dot(ht, wt, acc, input_precision=PRECISION)
        if HAS_BIAS:
            acc += tl.load(bias_ptr + offs_v, mask=mask_v, other=0.0).to(tl.float32)[None, :]
        z = acc * logit_scale
        if HAS_SOFTCAP:
            z = softcap * _tanh(z / softcap)
        zsafe = tl.where(mask_v[None, :], z, 0.0)
        z = tl.where(mask_v[None, :], z, float("-inf"))
        zt += tl.sum(tl.where(offs_v[None, :] == tgt[:, None], zsafe, 0.0), axis=1)
        bm = tl.max(z, axis=1)
        if WANT_ARGMAX:
            first = tl.min(tl.where(z == bm[:, None], offs_v[None, :], 2147483647), axis=1)
            am = tl.where(bm > m, first, am)  # strict: an earlier tile keeps a tie
        m_new = tl.maximum(m, bm)
        alpha = tl.exp(m - m_new)
        e = tl.exp(z - m_new[:, None])
        d = d * alpha + tl.sum(e, axis=1)
        if WANT_SUM_PZ:
            pz = pz * alpha + tl.sum(e * zsafe, axis=1)
        if WANT_SUM_Z:
            sz += tl.sum(zsafe, axis=1)
        m = m_new
    out = split * N + offs_n
    tl.store(m_ptr + out, m, mask=mask_n)
    tl.store(d_ptr + out, d, mask=mask_n)
    tl.store(zt_ptr + out, zt, mask=mask_n)
    if WANT_SUM_Z:
        tl.store(sz_ptr + out, sz, mask=mask_n)
    if WANT_SUM_PZ:
        tl.store(pz_ptr + out, pz, mask=mask_n)
    if WANT_ARGMAX:
        tl.store(am_ptr + out, am, mask=mask_n)


def _num_splits(n_blocks: int, v_blocks: int, device: torch.device) -> int:
    if device.type != "cuda":
        return max(1, min(INTERPRETER_SPLITS, v_blocks))
    sms = torch.cuda.get_device_properties(device).multi_processor_count
    return max(1, min(v_blocks, -(-2 * sms // max(n_blocks, 1))))


def forward_stats(hidden2d: torch.Tensor, weight: torch.Tensor, bias, target: torch.Tensor, *, vocab_size: int,
                  logit_scale: float, softcap, want_sum_z: bool, want_sum_pz: bool, want_argmax: bool):
    """Launch the forward kernel and merge its slices. Shapes as the kernel contract:
    returns ``(lse, z_target, sum_z, sum_pz, argmax)`` ([N] float32 ×4, [N] int64; empty [0] where
    not wanted). ``z_target`` is 0 where the target is not in ``[0, vocab_size)``."""
    N, H = hidden2d.shape
    dev = hidden2d.device
    cfg = fwd_config(hidden2d.dtype, dev)
    target = target.contiguous()
    bias = bias.contiguous() if bias is not None else None
    n_blocks = triton.cdiv(N, cfg["BLOCK_N"])
    v_blocks = triton.cdiv(vocab_size, cfg["BLOCK_V"])
    splits = _num_splits(n_blocks, v_blocks, dev)
    v_per_split = triton.cdiv(v_blocks, splits) * cfg["BLOCK_V"]
    splits = triton.cdiv(vocab_size, v_per_split)  # no empty slice
    f32 = torch.float32

    def new(dt, want=True):
        shape = (splits, N) if want else (0,)
        if dt.is_floating_point:
            return _common.new_output(shape, torch.empty(0, dtype=dt, device=dev))
        out = torch.empty(shape, dtype=dt, device=dev)
        return out.fill_(-(2**31) + 7) if _common.POISON_OUTPUTS else out

    m, d, zt = new(f32), new(f32), new(f32)
    sz, pz, am = new(f32, want_sum_z), new(f32, want_sum_pz), new(torch.int32, want_argmax)
    if N > 0:
        _linear_cross_entropy_fwd_kernel[(n_blocks, splits)](
            hidden2d, weight, bias if bias is not None else weight, target,
            m, d, zt, sz if want_sum_z else m, pz if want_sum_pz else m, am if want_argmax else m,
            N, H, vocab_size, v_per_split, float(logit_scale), float(softcap or 1.0),
            hidden2d.stride(0), hidden2d.stride(1), weight.stride(0), weight.stride(1),
            HAS_BIAS=bias is not None, HAS_SOFTCAP=softcap is not None, WANT_SUM_Z=want_sum_z,
            WANT_SUM_PZ=want_sum_pz, WANT_ARGMAX=want_argmax, PRECISION=dot_precision(hidden2d.dtype), **cfg)
    return merge_partials(m, d, zt, sz, pz, am, want_sum_z, want_sum_pz, want_argmax)


def merge_partials(m, d, zt, sz, pz, am, want_sum_z, want_sum_pz, want_argmax):
    """Combine per-slice statistics ``[splits, N]`` into per-token ones ``[N]``."""
    mx = m.max(dim=0).values
    scale = torch.exp(m - mx)
    total = (d * scale).sum(0)
    lse = mx + torch.log(total)
    empty = m.new_empty((0,))
    sum_z = sz.sum(0) if want_sum_z else empty
    sum_pz = (pz * scale).sum(0) / total if want_sum_pz else m.new_empty((0,))
    if want_argmax:  # the first slice holding the maximum: slices are in vocabulary order
        first = (m == mx).to(torch.int8).argmax(dim=0, keepdim=True)
        argmax = am.gather(0, first).squeeze(0).to(torch.int64)
    else:
        argmax = torch.empty((0,), dtype=torch.int64, device=m.device)
    return lse, zt.sum(0), sum_z, sum_pz, argmax


@triton.jit
def _row_logits(u_ptr, row, stride_u, offs, mask, logit_scale, softcap, HAS_SOFTCAP: tl.constexpr):
    z = tl.load(u_ptr + row * stride_u + offs, mask=mask, other=0.0) * logit_scale
    if HAS_SOFTCAP:
        z = softcap * _tanh(z / softcap)
    return z


@triton.jit
def _linear_cross_entropy_bwd_kernel(
    u_ptr, g_ptr, a_ptr, b_ptr, c_ptr, d_ptr, t_ptr,
    V, stride_u, stride_g, ignore_index, logit_scale, softcap,
    HAS_SOFTCAP: tl.constexpr, BLOCK_V: tl.constexpr,
):
    # One program per token row of a chunk. u: fp32 pre-scale logits [C, V'] (cuBLAS);
    # g: the gradient w.r.t. u, in the input dtype. Pass 1 takes the row's log-sum-exp of *these*
    # logits, so p sums to 1 exactly as recomputed (the forward's fused GEMM rounds differently:
    # at |z| ~ 1e4 an fp32 difference of 1e-3 would otherwise scale every p by e^{1e-3}).
    row = tl.program_id(0).to(tl.int64)
    tgt = tl.load(t_ptr + row)
    m = tl.full((BLOCK_V,), float("-inf"), tl.float32)
    acc = tl.zeros((BLOCK_V,), tl.float32)
    for v0 in range(0, V, BLOCK_V):
        offs = v0 + tl.arange(0, BLOCK_V)
        mask = offs < V
        z = tl.where(mask, _row_logits(u_ptr, row, stride_u, offs, mask, logit_scale, softcap, HAS_SOFTCAP),
                     float("-inf"))
        m_new = tl.maximum(m, z)
        acc = acc * tl.exp(tl.where(m_new == float("-inf"), 0.0, m - m_new)) + \
            tl.where(mask, tl.exp(z - m_new), 0.0)
        m = m_new
    mx = tl.max(m, axis=0)
    lse = mx + tl.log(tl.sum(acc * tl.exp(tl.where(m == float("-inf"), float("-inf"), m - mx)), axis=0))
    a = tl.load(a_ptr + row)
    b = tl.load(b_ptr + row)
    c = tl.load(c_ptr + row)
    d = tl.load(d_ptr + row)
    keep = tgt != ignore_index
    for v0 in range(0, V, BLOCK_V):
        offs = v0 + tl.arange(0, BLOCK_V)
        mask = offs < V
        z = _row_logits(u_ptr, row, stride_u, offs, mask, logit_scale, softcap, HAS_SOFTCAP)
        p = tl.exp(z - lse)
        g = p * (a + d * z) + c + tl.where(offs == tgt, b, 0.0)
        if HAS_SOFTCAP:
            q = z / softcap
            g = g * (1.0 - q * q)
        g = tl.where(keep, g * logit_scale, 0.0)
        tl.store(g_ptr + row * stride_g + offs, g.to(g_ptr.dtype.element_ty), mask=mask)


def logits_grad(u: torch.Tensor, a, b, c, d, target, *, ignore_index: int, logit_scale: float,
                softcap, out_dtype: torch.dtype) -> torch.Tensor:
    """``G`` [C, V'] in ``out_dtype`` from the float32 pre-scale logits ``u`` [C, V'] of a chunk and
    its per-token coefficients / targets ([C] float32 each, target int64)."""
    C, V = u.shape
    cfg = dict(INTERPRETER_BWD if u.device.type != "cuda" else BWD_CONFIG)
    g = _common.new_output((C, V), torch.empty(0, dtype=out_dtype, device=u.device))
    if C == 0:
        return g
    _linear_cross_entropy_bwd_kernel[(C,)](
        u, g, a, b, c, d, target, V, u.stride(0), g.stride(0), int(ignore_index), float(logit_scale),
        float(softcap or 1.0), HAS_SOFTCAP=softcap is not None, **cfg)
    return g


def aot_jobs():
    """Every (kernel, shipped config, dtype, variant) launched on a GPU."""
    dtypes = {"fp16": torch.float16, "bf16": torch.bfloat16, "fp32": torch.float32}
    fn = _linear_cross_entropy_fwd_kernel
    for dname, dt in dtypes.items():
        cfg = FWD_CONFIGS["fp32" if dt == torch.float32 else "16bit"]
        meta = {k: v for k, v in cfg.items() if k not in ("num_warps", "num_stages")}
        types = {p: _common.AOT_DTYPES[dname] for p in ("h_ptr", "w_ptr", "bias_ptr")}
        types.update({p: "*fp32" for p in ("m_ptr", "d_ptr", "zt_ptr", "sz_ptr", "pz_ptr")},
                     t_ptr="*i64", am_ptr="*i32", logit_scale="fp32", softcap="fp32")
        precisions = ("ieee", "tf32") if dt == torch.float32 else ("ieee",)
        for prec in precisions:
            for full in (False, True):  # plain CE, and every option on
                flags = dict(HAS_BIAS=full, HAS_SOFTCAP=full, WANT_SUM_Z=full, WANT_SUM_PZ=full, WANT_ARGMAX=full)
                yield _common.aot_job(fn.__name__, fn.arg_names, types, dict(meta, PRECISION=prec, **flags),
                                      cfg["num_warps"], cfg["num_stages"], f"fwd {dname} {prec} all_options={full}")
    fn = _linear_cross_entropy_bwd_kernel
    meta = {k: v for k, v in BWD_CONFIG.items() if k not in ("num_warps", "num_stages")}
    for dname in dtypes:
        types = {p: "*fp32" for p in ("u_ptr", "a_ptr", "b_ptr", "c_ptr", "d_ptr")}
        types.update(g_ptr=_common.AOT_DTYPES[dname], t_ptr="*i64", ignore_index="i64",
                     logit_scale="fp32", softcap="fp32")
        for cap in (False, True):
            yield _common.aot_job(fn.__name__, fn.arg_names, types, dict(meta, HAS_SOFTCAP=cap),
                                  BWD_CONFIG["num_warps"], BWD_CONFIG["num_stages"], f"bwd {dname} softcap={cap}")
