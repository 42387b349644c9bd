"""contrastive_logits, proxy_logits and collab_decode_step against float64 formulas written here
independently; sampling distribution (chi-square), statistics, reproducibility, bad inputs; the
kernels (cpp, triton) against the reference backend token for token."""

import math

import pytest
import torch

from lmfuse.ops import collab_decode_step, contrastive_logits, proxy_logits, use_backend
from lmfuse.testing import assert_close_to_reference

from .helpers import backend_params, poisoned_outputs

scipy_stats = pytest.importorskip("scipy.stats")
# The interpreter evaluates both sides of tl.where on masked lanes (e.g. exp(-inf - -inf)); the
# kernel never uses those values, and the warnings they raise would only bury real ones.
pytestmark = pytest.mark.filterwarnings("ignore::RuntimeWarning:triton.runtime.interpreter")
BACKENDS = backend_params(("reference", "cpp", "triton"))
KERNELS = backend_params(("cpp", "triton"))
# The Triton interpreter runs one program at a time in Python: fewer rows there.
ROWS = {"triton": 400}


def _interpreted(backend, device):
    return backend == "triton" and device.type == "cpu"


def _lsm(x):
    x = x.double()
    return x - torch.logsumexp(x, -1, keepdim=True)


@pytest.mark.parametrize("dtype", [torch.float32, torch.float16, torch.bfloat16])
def test_contrastive_matches_formula(dtype):
    L, S = torch.randn(5, 3, 37).to(dtype) * 2, torch.randn(5, 3, 37).to(dtype) * 2
    alpha, wl, ws = 0.15, 1.5, 0.5
    out = contrastive_logits(L, S, alpha=alpha, large_weight=wl, small_weight=ws)
    pl = torch.softmax(L.double(), -1)
    plausible = pl >= alpha * pl.amax(-1, keepdim=True)
    ref = torch.where(plausible, wl * _lsm(L) - ws * _lsm(S), float("-inf"))
    assert out.dtype == torch.float32 and out.shape == L.shape
    assert torch.equal(torch.isinf(out), ~plausible)
    assert_close_to_reference(out[plausible], ref[plausible], torch.float32)
    # FS-GEN's s_S + β(s_L − s_S) is weights (β, β − 1)
    beta = 1.7
    fs = contrastive_logits(L, S, alpha=0.0, large_weight=beta, small_weight=beta - 1)
    assert_close_to_reference(fs, _lsm(S) + beta * (_lsm(L) - _lsm(S)), torch.float32)


def test_proxy_matches_formula_and_masks():
    Lb, St, Sb = (torch.randn(4, 29) for _ in range(3))
    Lb[0, 3] = float("-inf")
    St[1, 5] = Sb[1, 5] = float("-inf")  # masked in both small models: -inf, not NaN
    out = proxy_logits(Lb, St, Sb, alpha=0.8)
    ref = _lsm(Lb) + 0.8 * (_lsm(St) - _lsm(Sb))
    fin = torch.isfinite(ref)
    assert not torch.isnan(out).any()
    assert out[0, 3] == float("-inf") and out[1, 5] == float("-inf")
    assert_close_to_reference(out[fin], ref[fin], torch.float32)


def _stats64(small):
    p = torch.softmax(small.double(), -1)
    top = torch.topk(p, 2, -1).values
    ent = -(p * torch.log(p.clamp_min(1e-300))).sum(-1)
    return ent, top[:, 0], top[:, 0] - top[:, 1], small.argmax(-1)


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("mode", ["none", "contrastive", "proxy"])
def test_greedy_step_tokens_and_statistics(backend, mode, device):
    B, V = 13, 41
    S, L, Sb = (torch.randn(B, V, device=device) * 2 for _ in range(3))
    kw = dict(large_logits=L if mode != "none" or B % 2 else None, small_base_logits=Sb if mode == "proxy" else None)
    with use_backend(backend):
        out = collab_decode_step(S, **kw, mode=mode, alpha=0.1, large_weight=1.0, small_weight=0.5, proxy_alpha=0.7)
    if mode == "none":
        comb = (L if kw["large_logits"] is not None else S).double()
    elif mode == "contrastive":
        comb = contrastive_logits(L, S, alpha=0.1, large_weight=1.0, small_weight=0.5)
    else:
        comb = proxy_logits(L, S, Sb, alpha=0.7)
    assert torch.equal(out.tokens, comb.argmax(-1))
    ent, top1, margin, s_arg = _stats64(S)
    assert_close_to_reference(out.small_entropy, ent, torch.float32)
    assert_close_to_reference(out.small_top1_prob, top1, torch.float32)
    assert_close_to_reference(out.small_margin, margin, torch.float32, factor=10)  # a difference of two probs
    assert torch.equal(out.differs_from_small, out.tokens != s_arg)


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("filt", [dict(), dict(top_k=3), dict(top_p=0.6)], ids=["plain", "top_k", "top_p"])
def test_sampled_step_is_distributed_as_the_filtered_softmax(backend, filt, device):
    rows, V, temp = (ROWS.get(backend, 12000) if device.type == "cpu" else 12000), 6, 0.9
    g = torch.Generator().manual_seed(torch.randint(0, 2**31, ()).item())
    L1 = torch.randn(V, generator=g)
    L = L1.expand(rows, V).to(device)
    S = torch.randn(rows, V, device=device)
    with use_backend(backend):
        out = collab_decode_step(S, L, temperature=temp, generator=g, **filt)
    x = L1.double() / temp
    order = torch.argsort(x, descending=True)
    keep = torch.zeros(V, dtype=torch.bool)
    keep[order[: filt.get("top_k", V)]] = True
    if "top_p" in filt:
        p = torch.softmax(x, 0)[order]
        keep = torch.zeros(V, dtype=torch.bool)
        keep[order[(torch.cumsum(p, 0) - p) < filt["top_p"]]] = True
    probs = torch.softmax(torch.where(keep, x, float("-inf")), 0)
    counts = torch.bincount(out.tokens.cpu(), minlength=V).double()
    assert counts[~keep].sum() == 0
    if int(keep.sum()) > 1:
        assert scipy_stats.chisquare(counts[keep].numpy(), (probs[keep] * rows).numpy()).pvalue > 1e-4


def _inputs(mode, B, V, dtype, device, g):
    """Non-contiguous [B, V] rows (every other column of a wider tensor) with masked tokens."""
    def one(scale):
        x = (torch.randn(B, 2 * V, generator=g) * scale).to(dtype).to(device)[:, ::2]
        x[0, 3] = float("-inf")
        return x
    S, L, Sb = one(2.0), one(2.5), one(1.5)
    return S, (None if mode == "none-small" else L), (Sb if mode == "proxy" else None)


def _greedy_ties(S, L, Sb, kw, tol=1e-4):
    """[B, V] bool: the tokens whose combined score, in float64, is within ``tol`` of the row's best.
    Between two tokens of one row the score differs by a weighted sum of input differences (the
    log-sum-exps cancel), so on bf16/fp16 inputs it is either exactly 0 or far above ``tol``; an exact
    tie is then broken by the kernel's float32 rounding, which need not match the reference's."""
    from lmfuse.ops.collab_logits import combine_reference

    d = lambda x: None if x is None else x.cpu().double()  # noqa: E731
    comb = combine_reference(d(S), d(L), d(Sb), kw["mode"], kw["alpha"], kw["large_weight"], kw["small_weight"],
                             kw["proxy_alpha"])
    return comb >= comb.max(-1, keepdim=True).values - tol


@pytest.mark.parametrize("backend", KERNELS)
@pytest.mark.parametrize("mode", ["none-small", "none", "contrastive", "proxy"])
def test_kernels_match_reference_backend(backend, mode, device):
    """Same tokens as the reference backend for one generator state (greedy, temperature, top-k,
    top-p), statistics within the fp32 tolerance of a float64 formula, every output written."""
    g = torch.Generator().manual_seed(torch.randint(0, 2**31, ()).item())
    interp = _interpreted(backend, device)
    B, V = (5, 37) if interp else (23, 301)
    dtypes = [torch.float32, torch.float16] + ([] if interp else [torch.bfloat16])  # interpreter: no bf16
    samplings = [dict(), dict(temperature=0.7, top_k=4), dict(temperature=1.3, top_p=0.8)]
    if not interp:
        samplings += [dict(temperature=0.9), dict(temperature=1.0, top_k=9, top_p=0.6)]
    for dtype in dtypes:
        S, L, Sb = _inputs(mode, B, V, dtype, device, g)
        assert not S.is_contiguous()
        kw = dict(mode="none" if mode.startswith("none") else mode, alpha=0.1, large_weight=1.5,
                  small_weight=0.5, proxy_alpha=0.8)
        for smp in samplings:
            seed = int(torch.randint(0, 2**31, (), generator=g))
            with use_backend("reference"):
                ref = collab_decode_step(S, L, Sb, **kw, **smp, generator=seed)
            with use_backend(backend), poisoned_outputs():
                out = collab_decode_step(S, L, Sb, **kw, **smp, generator=seed)
            what = f"{dtype} {smp}"
            same = torch.ones(B, dtype=torch.bool)
            if not smp:  # greedy: rows whose best tokens tie exactly are decided by rounding
                tied = _greedy_ties(S, L, Sb, kw)
                same = tied.sum(-1) == 1
                rows = torch.arange(B)
                assert bool(tied[rows, out.tokens.cpu()].all() & tied[rows, ref.tokens.cpu()].all()), what
            assert torch.equal(out.tokens.cpu()[same], ref.tokens.cpu()[same]), what
            assert torch.equal(out.differs_from_small.cpu()[same], ref.differs_from_small.cpu()[same]), what
            ent, top1, margin, _ = _stats64(S.float())
            assert_close_to_reference(out.small_entropy, ent, torch.float32, f"entropy {what}")
            assert_close_to_reference(out.small_top1_prob, top1, torch.float32, f"top1 {what}")
            assert_close_to_reference(out.small_margin, margin, torch.float32, f"margin {what}", factor=10)


@pytest.mark.parametrize("backend", KERNELS)
def test_kernels_reject_nan_and_fully_masked_rows(backend, device):
    S, L = torch.randn(3, 19, device=device), torch.randn(3, 19, device=device)
    L_nan = L.clone()
    L_nan[2, 5] = math.nan
    masked = torch.full_like(S, float("-inf"))
    with use_backend(backend):
        with pytest.raises(ValueError, match="NaN"):
            collab_decode_step(S, L_nan, mode="contrastive")
        with pytest.raises(ValueError, match="no finite logit"):
            collab_decode_step(masked, temperature=1.0, generator=1)
        # the small model's row only feeds statistics in mode "none" with large_logits: no error
        S_nan = S.clone()
        S_nan[1, 0] = math.nan
        assert torch.equal(collab_decode_step(S_nan, L).tokens, L.argmax(-1))


def test_sampling_is_reproducible():
    S, L = torch.randn(9, 50), torch.randn(9, 50)
    a = collab_decode_step(S, L, mode="contrastive", alpha=0.0, temperature=1.0, generator=torch.Generator().manual_seed(3))
    b = collab_decode_step(S, L, mode="contrastive", alpha=0.0, temperature=1.0, generator=3)
    assert torch.equal(a.tokens, b.tokens)


def test_bad_inputs_raise_clear_errors():
    S, L = torch.randn(3, 10), torch.randn(3, 10)
    cases = [
        (lambda: collab_decode_step(S, mode="contrastive"), ValueError, "needs large_logits"),
        (lambda: collab_decode_step(S, L, mode="proxy"), ValueError, "small_base_logits"),
        (lambda: collab_decode_step(S, L, S, mode="none"), ValueError, "only used by mode='proxy'"),
        (lambda: collab_decode_step(S, L[:, :9]), ValueError, "shape"),
        (lambda: collab_decode_step(S, L.half()), TypeError, "dtype"),
        (lambda: collab_decode_step(S, L, mode="bogus"), ValueError, "mode must be"),
        (lambda: collab_decode_step(S[0], L[0]), ValueError, "2-D"),
        (lambda: collab_decode_step(S, L, alpha=2.0, mode="contrastive"), ValueError, "alpha"),
        (lambda: collab_decode_step(S, L, temperature=-1.0), ValueError, "temperature"),
        (lambda: contrastive_logits(S, L[:2]), ValueError, "shape"),
        (lambda: proxy_logits(S, L, S.long()), TypeError, "floating-point"),
        (lambda: collab_decode_step(S.masked_fill(torch.ones_like(S, dtype=torch.bool), math.nan)),
         ValueError, "NaN"),
    ]
    for fn, exc, msg in cases:
        with pytest.raises(exc, match=msg):
            fn()


def test_opcheck_and_compile():
    S, L = torch.randn(4, 16), torch.randn(4, 16)
    seeds = torch.randint(0, 2**32, (4, 2))
    torch.library.opcheck(torch.ops.lmfuse.collab_decode_step.default,
                          (S, L, None, "contrastive", 0.1, 1.0, 1.0, 1.0, 0.8, None, seeds))
    fn = torch.compile(lambda s, l: collab_decode_step(s, l, mode="contrastive"), fullgraph=True, backend="aot_eager")
    assert torch.equal(fn(S, L).tokens, collab_decode_step(S, L, mode="contrastive").tokens)
