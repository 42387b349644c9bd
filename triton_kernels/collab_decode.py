"""Triton kernel of ``collab_decode_step``: one program per row, two passes over V in blocks.

Pass 1 streams the small model's row (and, for contrastive / proxy, the other rows) once,
keeping online log-partitions (running max + rescaled sum of exponentials) and, for the small
model, the shifted entropy accumulator ``Σ e^{s−m}(s−m)``, its top-1 value/index and its top-2
value. Pass 2 streams the rows again (they are in L2 by then), forms the combined logit of each
token on the fly and keeps a running argmax: of the combined logit (greedy), or of
``scaled − log E`` (temperature), the exponential race ``argmax p/E`` in log space, with
``E`` from the counter hash shared with every backend (``lmfuse/ops/_sampling.py``). Nothing
of size V is written. A row whose inputs hold NaN/+inf, or whose combined logits are all −inf,
gets token −1 (the op layer raises).

Statistics, with ``m`` the row max, ``Z = Σ e^{s−m}``, ``A = Σ e^{s−m}(s−m)``:
entropy ``log Z − A/Z``, top-1 probability ``1/Z``, margin ``(1 − e^{t2−m})/Z``. The shifted
form keeps the entropy accurate for large logits (no cancellation of two big numbers).
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl

from . import _common
from .spec_verify import _noise_exp

BLOCK_V_GPU = 2048
NUM_WARPS = 8
BLOCK_V_INTERPRETER = 16  # small blocks so odd vocabularies span several blocks in tests
MODE_IDS = {"none": 0, "contrastive": 1, "proxy": 2}
NEG_INF = float("-inf")


@triton.jit
def _online_lse(m, z, x):
    """Fold block ``x`` into the running (max, Σ e^{x−max}); −inf entries contribute nothing."""
    m_new = tl.maximum(m, tl.max(x, 0))
    m_safe = tl.where(m_new == -float("inf"), 0.0, m_new)
    z = z * tl.exp(m - m_safe) + tl.sum(tl.where(x > -float("inf"), tl.exp(x - m_safe), 0.0), 0)
    return m_new, z


@triton.jit
def _bad_count(x):
    return tl.sum((~(x < float("inf"))).to(tl.int32), 0)  # NaN or +inf


@triton.jit
def _collab_decode_kernel(small_ptr, large_ptr, base_ptr, thr_ptr, seeds_ptr,
                          tok_ptr, ent_ptr, top1_ptr, margin_ptr, differs_ptr,
                          V, log_alpha, large_w, small_w, proxy_alpha, inv_t,
                          MODE: tl.constexpr, HAS_LARGE: tl.constexpr, HAS_THR: tl.constexpr,
                          GREEDY: tl.constexpr, BLOCK_V: tl.constexpr):
    b = tl.program_id(0).to(tl.int64)
    s_row = small_ptr + b * V
    l_row = large_ptr + b * V
    sb_row = base_ptr + b * V
    NEED_LSE: tl.constexpr = MODE != 0
    # ---- pass 1: small-model statistics (+ log-partitions of the other rows) ----------------
    m_s = -float("inf")
    z_s = 0.0
    a_s = 0.0
    t1_i = 0
    t2 = -float("inf")
    m_l = -float("inf")
    z_l = 0.0
    m_b = -float("inf")
    z_b = 0.0
    bad = 0
    for v0 in range(0, V, BLOCK_V):
        offs = v0 + tl.arange(0, BLOCK_V)
        inb = offs < V
        s = tl.load(s_row + offs, mask=inb, other=-float("inf")).to(tl.float32)
        if MODE != 0 or not HAS_LARGE:  # the small row feeds the combined logits
            bad += _bad_count(s)
        bm = tl.max(s, 0)
        bi = v0 + tl.argmax(s, 0)
        b2 = tl.max(tl.where(offs == bi, -float("inf"), s), 0)  # the block's second largest
        t2 = tl.maximum(tl.maximum(t2, b2), tl.minimum(m_s, bm))
        t1_i = tl.where(bm > m_s, bi, t1_i)
        m_new = tl.maximum(m_s, bm)
        m_safe = tl.where(m_new == -float("inf"), 0.0, m_new)
        shift = m_s - m_safe  # ≤ 0; rescales the old sums to the new max
        e = tl.where(s > -float("inf"), tl.exp(s - m_safe), 0.0)
        a_s = tl.exp(shift) * (a_s + tl.where(z_s > 0, shift * z_s, 0.0)) + \
            tl.sum(tl.where(e > 0, e * (s - m_safe), 0.0), 0)
        z_s = z_s * tl.exp(shift) + tl.sum(e, 0)
        m_s = m_new
        if HAS_LARGE:
            x = tl.load(l_row + offs, mask=inb, other=-float("inf")).to(tl.float32)
            bad += _bad_count(x)
            if NEED_LSE:
                m_l, z_l = _online_lse(m_l, z_l, x)
        if MODE == 2:
            x = tl.load(sb_row + offs, mask=inb, other=-float("inf")).to(tl.float32)
            bad += _bad_count(x)
            m_b, z_b = _online_lse(m_b, z_b, x)
    m_s_safe = tl.where(m_s == -float("inf"), 0.0, m_s)
    lse_s = m_s_safe + tl.log(z_s)
    lse_l = tl.where(m_l == -float("inf"), 0.0, m_l) + tl.log(z_l)
    lse_b = tl.where(m_b == -float("inf"), 0.0, m_b) + tl.log(z_b)
    cut = (m_l - lse_l) + log_alpha  # contrastive plausibility: log p_L ≥ max log p_L + log α
    thr = -float("inf")
    if HAS_THR:
        thr = tl.load(thr_ptr + b)
    # ---- pass 2: combined logits, argmax / exponential race --------------------------------
    s0 = tl.load(seeds_ptr + 2 * b).to(tl.uint32)
    s1 = tl.load(seeds_ptr + 2 * b + 1).to(tl.uint32)
    best = -float("inf")
    best_i = -1
    for v0 in range(0, V, BLOCK_V):
        offs = v0 + tl.arange(0, BLOCK_V)
        inb = offs < V
        if MODE == 0:
            if HAS_LARGE:
                c = tl.load(l_row + offs, mask=inb, other=-float("inf")).to(tl.float32)
            else:
                c = tl.load(s_row + offs, mask=inb, other=-float("inf")).to(tl.float32)
        else:
            lp_s = tl.load(s_row + offs, mask=inb, other=-float("inf")).to(tl.float32) - lse_s
            lp_l = tl.load(l_row + offs, mask=inb, other=-float("inf")).to(tl.float32) - lse_l
            if MODE == 1:
                c = large_w * lp_l - small_w * lp_s
                c = tl.where((lp_l >= cut) & (tl.abs(c) < float("inf")), c, -float("inf"))
            else:
                lp_b = tl.load(sb_row + offs, mask=inb, other=-float("inf")).to(tl.float32) - lse_b
                c = lp_l + proxy_alpha * (lp_s - lp_b)
                masked = (lp_l == -float("inf")) | (lp_s == -float("inf")) | (lp_b == -float("inf"))
                c = tl.where(masked, -float("inf"), c)
        c = tl.where(inb, c, -float("inf"))
        if GREEDY:
            score = c
        else:
            sc = c * inv_t
            score = tl.where((sc >= thr) & (sc > -float("inf")), sc - tl.log(_noise_exp(offs, s0, s1)),
                             -float("inf"))
        bm = tl.max(score, 0)
        bi = v0 + tl.argmax(score, 0)
        better = bm > best  # strict: the first block holding the max wins, like torch.argmax
        best_i = tl.where(better, bi, best_i)
        best = tl.where(better, bm, best)
    tok = tl.where((bad > 0) | (best_i < 0), -1, best_i)
    tl.store(tok_ptr + b, tok)
    tl.store(ent_ptr + b, tl.log(z_s) - a_s / z_s)
    tl.store(top1_ptr + b, 1.0 / z_s)
    tl.store(margin_ptr + b, (1.0 - tl.exp(t2 - m_s_safe)) / z_s)
    tl.store(differs_ptr + b, (tok != t1_i).to(tl.int8))


def collab_decode_step(small, large, base, mode: str, log_alpha: float, large_w: float, small_w: float,
                       proxy_alpha: float, inv_t: float, threshold, seeds):
    """Launch one program per row; inputs contiguous ``[B, V]`` of one dtype (the op layer
    ensures it). Returns ``(tokens [B] int64 (−1: invalid row), entropy, top1, margin [B] fp32,
    differs [B] bool)``."""
    B, V = small.shape
    f32 = small.new_empty((0,), dtype=torch.float32)
    tokens = torch.empty((B,), device=small.device, dtype=torch.int64)
    ent, top1, margin = (_common.new_output((B,), f32) for _ in range(3))
    differs = torch.empty((B,), device=small.device, dtype=torch.bool)
    if _common.POISON_OUTPUTS:  # sentinels no kernel would write
        tokens.fill_(-(2**31) + 7)
        differs.fill_(True)
    on_gpu = small.device.type == "cuda"
    _collab_decode_kernel[(B,)](
        small, large if large is not None else small, base if base is not None else small,
        threshold if threshold is not None else f32, seeds,
        tokens, ent, top1, margin, differs.view(torch.int8),
        V, float(log_alpha), float(large_w), float(small_w), float(proxy_alpha), float(inv_t),
        MODE=MODE_IDS[mode], HAS_LARGE=large is not None, HAS_THR=threshold is not None,
        GREEDY=inv_t == 0.0, BLOCK_V=BLOCK_V_GPU if on_gpu else BLOCK_V_INTERPRETER,
        num_warps=NUM_WARPS if on_gpu else 1,
    )
    return tokens, ent, top1, margin, differs


def aot_jobs():
    """Every specialisation the launcher produces on a GPU: dtype × mode × large × greedy × filter."""
    for dname in ("fp32", "fp16", "bf16"):
        for mode, mid in MODE_IDS.items():
            for has_large in ((False, True) if mode == "none" else (True,)):
                for greedy, has_thr in ((True, False), (False, False), (False, True)):
                    ptr = _common.AOT_DTYPES[dname]
                    types = {"small_ptr": ptr, "large_ptr": ptr, "base_ptr": ptr, "thr_ptr": "*fp32",
                             "seeds_ptr": "*i64", "tok_ptr": "*i64", "ent_ptr": "*fp32", "top1_ptr": "*fp32",
                             "margin_ptr": "*fp32", "differs_ptr": "*i8", "log_alpha": "fp32",
                             "large_w": "fp32", "small_w": "fp32", "proxy_alpha": "fp32", "inv_t": "fp32"}
                    yield _common.aot_job(
                        "_collab_decode_kernel", _collab_decode_kernel.arg_names, types,
                        dict(MODE=mid, HAS_LARGE=has_large, HAS_THR=has_thr, GREEDY=greedy, BLOCK_V=BLOCK_V_GPU),
                        NUM_WARPS, 1, f"{dname} mode={mode} large={has_large} greedy={greedy} thr={has_thr}")
