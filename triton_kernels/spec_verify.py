"""Triton kernel of ``spec_verify``: one program per request, passes over V in ``BLOCK_V`` blocks.

Per position the program needs (stopping at the first rejection) it makes two passes over the
target row (max, then the sum of exponentials — the row is in L2 for the second) and two over
the draft row, tests the draft token, and at the emitting position one more pass samples the
correction/bonus token with the exponential race ``argmax_v w_v / E_v``. ``E_v`` comes from the
counter-based hash shared with every backend (``lmfuse/ops/_sampling.py``), so this kernel
returns the same tokens as the ``cpp`` and ``reference`` backends for one generator state.
Nothing of size V is written to memory.
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl

from . import _common

BLOCK_V_GPU = 2048
NUM_WARPS = 8
BLOCK_V_INTERPRETER = 16  # small blocks so odd vocabularies span several blocks in tests


@triton.jit
def _mix32(x):
    x = x ^ (x >> 16)
    x = x * 0x7FEB352D
    x = x ^ (x >> 15)
    x = x * 0x846CA68B
    return x ^ (x >> 16)


@triton.jit
def _noise_exp(offs, s0, s1):
    h = _mix32(_mix32(offs.to(tl.uint32) ^ s0) ^ s1)
    u = ((h >> 9).to(tl.float32) + 0.5) * (1.0 / 8388608.0)
    return -tl.log(u)


@triton.jit
def _log_partition(row_ptr, V, inv_t, thr, BLOCK_V: tl.constexpr):
    """(lse, bad) of the scaled, filtered row; bad on NaN/+inf or no kept finite logit."""
    m = -float("inf")
    bad = 0
    for v0 in range(0, V, BLOCK_V):
        offs = v0 + tl.arange(0, BLOCK_V)
        x = tl.load(row_ptr + offs, mask=offs < V, other=-float("inf")).to(tl.float32)
        bad += tl.sum((~(x < float("inf"))).to(tl.int32), 0)
        s = x * inv_t
        m = tl.maximum(m, tl.max(tl.where(s >= thr, s, -float("inf")), 0))
    ok = (bad == 0) & (m > -float("inf"))
    m_safe = tl.where(ok, m, 0.0)
    acc = 0.0
    for v0 in range(0, V, BLOCK_V):
        offs = v0 + tl.arange(0, BLOCK_V)
        s = tl.load(row_ptr + offs, mask=offs < V, other=-float("inf")).to(tl.float32) * inv_t
        acc += tl.sum(tl.where(s >= thr, tl.exp(s - m_safe), 0.0), 0)
    return m_safe + tl.log(acc), ~ok


@triton.jit
def _row_argmax(row_ptr, V, BLOCK_V: tl.constexpr):
    """(first index of the max, bad) — bad on NaN/+inf or an all −inf row."""
    best = -float("inf")
    best_i = 0
    bad = 0
    for v0 in range(0, V, BLOCK_V):
        offs = v0 + tl.arange(0, BLOCK_V)
        x = tl.load(row_ptr + offs, mask=offs < V, other=-float("inf")).to(tl.float32)
        bad += tl.sum((~(x < float("inf"))).to(tl.int32), 0)
        bm = tl.max(x, 0)
        bi = v0 + tl.argmax(x, 0)
        better = bm > best
        best_i = tl.where(better, bi, best_i)
        best = tl.where(better, bm, best)
    return best_i, (bad > 0) | (best == -float("inf"))


@triton.jit
def _race(p_ptr, lse_p, thr_p, q_ptr, lse_q, thr_q, det_tok, inv_t, V, s0, s1,
          USE_Q: tl.constexpr, USE_DET: tl.constexpr, BLOCK_V: tl.constexpr):
    """argmax_v w_v / E_v with w = p, max(p − q, 0), or p without det_tok; -1 if every w is 0."""
    best = 0.0
    best_i = -1
    for v0 in range(0, V, BLOCK_V):
        offs = v0 + tl.arange(0, BLOCK_V)
        sp = tl.load(p_ptr + offs, mask=offs < V, other=-float("inf")).to(tl.float32) * inv_t
        w = tl.where(sp >= thr_p, tl.exp(sp - lse_p), 0.0)
        if USE_Q:
            sq = tl.load(q_ptr + offs, mask=offs < V, other=-float("inf")).to(tl.float32) * inv_t
            w = tl.maximum(w - tl.where(sq >= thr_q, tl.exp(sq - lse_q), 0.0), 0.0)
        if USE_DET:
            w = tl.where(offs == det_tok, 0.0, w)
        score = w / _noise_exp(offs, s0, s1)
        bm = tl.max(score, 0)
        bi = v0 + tl.argmax(score, 0)
        better = bm > best
        best_i = tl.where(better, bi, best_i)
        best = tl.where(better, bm, best)
    return best_i


@triton.jit
def _spec_verify_kernel(ids_ptr, draft_ptr, target_ptr, n_ptr, u_ptr, seeds_ptr, thr_t_ptr, thr_d_ptr,
                        tokens_ptr, nacc_ptr, k, V, inv_t,
                        HAS_DRAFT: tl.constexpr, HAS_THR_T: tl.constexpr, HAS_THR_D: tl.constexpr,
                        GREEDY: tl.constexpr, BLOCK_V: tl.constexpr, BLOCK_K: tl.constexpr):
    b = tl.program_id(0).to(tl.int64)
    n = tl.load(n_ptr + b)
    s0 = tl.load(seeds_ptr + 2 * b).to(tl.uint32)
    s1 = tl.load(seeds_ptr + 2 * b + 1).to(tl.uint32)
    t_row = target_ptr + b * (k + 1) * V
    acc_n = -2  # -2: still verifying; -1: invalid logits; >= 0: accepted count
    emitted = -1
    i = 0
    while acc_n == -2:
        tp = t_row + i * V
        x = tl.load(ids_ptr + b * k + i, mask=i < n, other=-1)
        if GREEDY:
            best, bad = _row_argmax(tp, V, BLOCK_V)
            if bad:
                acc_n = -1
            elif (i == n) | (best != x):
                acc_n = i
                emitted = best
        else:
            thr_t = -float("inf")
            if HAS_THR_T:
                thr_t = tl.load(thr_t_ptr + b * (k + 1) + i)
            lse_t, bad = _log_partition(tp, V, inv_t, thr_t, BLOCK_V)
            if bad:
                acc_n = -1
            elif i == n:  # every draft accepted: bonus from p_n
                acc_n = i
                emitted = _race(tp, lse_t, thr_t, tp, 0.0, 0.0, -1, inv_t, V, s0, s1, False, False, BLOCK_V)
            else:
                sx = tl.load(tp + x).to(tl.float32) * inv_t
                px = tl.where(sx >= thr_t, tl.exp(sx - lse_t), 0.0)
                qx = 1.0
                lse_d = 0.0
                thr_d = -float("inf")
                qp = draft_ptr + (b * k + i) * V
                if HAS_DRAFT:
                    if HAS_THR_D:
                        thr_d = tl.load(thr_d_ptr + b * k + i)
                    lse_d, bad_d = _log_partition(qp, V, inv_t, thr_d, BLOCK_V)
                    sq = tl.load(qp + x).to(tl.float32) * inv_t
                    qx = tl.where(sq >= thr_d, tl.exp(sq - lse_d), 0.0)
                    if bad_d:
                        acc_n = -1
                if acc_n == -2:
                    u = tl.load(u_ptr + b * k + i)
                    if not (u * qx < px):  # rejected: sample the residual
                        acc_n = i
                        emitted = _race(tp, lse_t, thr_t, qp, lse_d, thr_d, x, inv_t, V, s0, s1,
                                        HAS_DRAFT, not HAS_DRAFT, BLOCK_V)
                        if emitted < 0:  # p == q to rounding: sample from p
                            emitted = _race(tp, lse_t, thr_t, qp, 0.0, 0.0, -1, inv_t, V, s0, s1,
                                            False, False, BLOCK_V)
        i += 1
    offs_k = tl.arange(0, BLOCK_K)
    drafts = tl.load(ids_ptr + b * k + offs_k, mask=offs_k < k, other=-1)
    row = tl.where(offs_k < acc_n, drafts, tl.where(offs_k == acc_n, emitted, -1))
    tl.store(tokens_ptr + b * (k + 1) + offs_k, row, mask=offs_k < k + 1)
    tl.store(nacc_ptr + b, acc_n)


def _new_int_output(shape, like):
    """int64 output; under test poisoning filled with a sentinel no kernel would write."""
    out = torch.empty(shape, device=like.device, dtype=torch.int64)
    if _common.POISON_OUTPUTS:
        out.fill_(-(2**31) + 7)
    return out


def spec_verify(ids, draft, target, n, u, seeds, inv_t, thr_t, thr_d):
    """Launch one program per row. Inputs contiguous (the op layer ensures it); returns
    ``(tokens [B, k+1], num_accepted [B])`` int64, ``num_accepted = -1`` for invalid rows."""
    B, k = ids.shape
    V = target.shape[-1]
    tokens = _new_int_output((B, k + 1), ids)
    n_acc = _new_int_output((B,), ids)
    block_v = BLOCK_V_GPU if target.device.type == "cuda" else BLOCK_V_INTERPRETER
    _spec_verify_kernel[(B,)](
        ids, draft if draft is not None else target, target, n, u, seeds,
        thr_t if thr_t is not None else u, thr_d if thr_d is not None else u,
        tokens, n_acc, k, V, float(inv_t),
        HAS_DRAFT=draft is not None, HAS_THR_T=thr_t is not None, HAS_THR_D=thr_d is not None,
        GREEDY=inv_t == 0.0, BLOCK_V=block_v, BLOCK_K=triton.next_power_of_2(k + 1),
        num_warps=NUM_WARPS if target.device.type == "cuda" else 1,
    )
    return tokens, n_acc


def aot_jobs():
    """Every specialisation the launcher can produce on a GPU: dtype × greedy × draft × filters."""
    for dname in ("fp32", "fp16", "bf16"):
        for greedy in (True, False):
            for has_draft in (True, False):
                for has_thr in ((False,) if greedy else (False, True)):
                    types = {"ids_ptr": "*i64", "draft_ptr": _common.AOT_DTYPES[dname],
                             "target_ptr": _common.AOT_DTYPES[dname], "n_ptr": "*i64", "u_ptr": "*fp32",
                             "seeds_ptr": "*i64", "thr_t_ptr": "*fp32", "thr_d_ptr": "*fp32",
                             "tokens_ptr": "*i64", "nacc_ptr": "*i64", "inv_t": "fp32"}
                    yield _common.aot_job(
                        "_spec_verify_kernel", _spec_verify_kernel.arg_names, types,
                        dict(HAS_DRAFT=has_draft, HAS_THR_T=has_thr, HAS_THR_D=has_thr and has_draft,
                             GREEDY=greedy, BLOCK_V=BLOCK_V_GPU, BLOCK_K=8),
                        NUM_WARPS, 1, f"{dname} greedy={greedy} draft={has_draft} thr={has_thr}")
