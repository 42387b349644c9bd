"""expert_blend_decode_step / expert_blend_logits: the blend against a float64 reference, greedy
(ties -> lowest index), the sampled distribution (chi-square), top-k / top-p support, generator
reproducibility across backends, the returned log-probs, validation, registration."""

import pytest
import torch
from scipy import stats as scipy_stats

from lmfuse.ops import expert_blend_decode_step, expert_blend_logits, use_backend
from lmfuse.ops.expert_blend import blend_log_scores_reference
from lmfuse.testing import assert_close_to_reference

from .helpers import backend_params

BACKENDS = backend_params(("reference", "cpp", "triton"))
F32 = torch.float32
ROWS = {"triton": 400}  # the interpreter runs one program per row: fewer draws there


def _gen():
    return torch.Generator().manual_seed(int(torch.randint(0, 2**31, ())))


def _inputs(B=5, widths=(301, 307, 303), gate_kind="softmax", gen=None, dtype=F32):
    gen = gen or _gen()
    logits = [(torch.randn(B, v, generator=gen) * 2).to(dtype) for v in widths]
    scores = torch.randn(B, len(widths), generator=gen)
    gate = {"softmax": torch.softmax(scores, 1), "any": scores,
            "positive": scores.abs() + 0.1}[gate_kind]  # positive: rows not summing to 1
    return logits, gate


def _ref_scores(logits, gate, blend, vs):
    return blend_log_scores_reference([o[:, :vs].double() for o in logits], gate.double(), blend)


@pytest.mark.parametrize("blend", ["logits", "probs"])
def test_blend_matches_reference(blend):
    logits, gate = _inputs(gate_kind="positive" if blend == "probs" else "any")
    s = expert_blend_logits(logits, gate, blend=blend, vocab_size=301)
    r = _ref_scores(logits, gate, blend, 301)
    assert s.dtype == F32 and s.shape == (5, 301)
    assert_close_to_reference(s, r, F32, "blended scores")
    if blend == "probs":  # a normalised log-mixture
        assert torch.allclose(torch.logsumexp(s.double(), 1), torch.zeros(5, dtype=torch.float64), atol=1e-5)


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("blend", ["logits", "probs"])
def test_greedy_and_log_probs(backend, blend):
    logits, gate = _inputs(B=7, gate_kind="positive")
    with use_backend(backend):
        out = expert_blend_decode_step(logits, gate, blend=blend, vocab_size=301, temperature=0)
    r = _ref_scores(logits, gate, blend, 301)
    assert out.tokens.dtype == torch.int64 and out.log_probs.dtype == F32 and out.gate.dtype == F32
    assert torch.equal(out.tokens, r.argmax(1))
    assert_close_to_reference(out.log_probs, torch.log_softmax(r, 1).gather(1, out.tokens[:, None]).squeeze(1),
                              F32, "log_probs")
    assert torch.equal(out.gate, gate)


@pytest.mark.parametrize("backend", BACKENDS)
def test_greedy_ties_take_lowest_index(backend):
    gen = _gen()
    B, V = 6, 50
    base = torch.randn(B, V, generator=gen)
    cols = torch.stack([torch.randperm(V, generator=gen)[:3].sort().values for _ in range(B)])
    # both experts put the same maximum on three columns: the blend ties there exactly
    logits = [base.clone(), base.clone() * 0.5]
    for b in range(B):
        for L in logits:
            L[b, cols[b]] = 10.0
    gate = torch.full((B, 2), 0.5)
    with use_backend(backend):
        out = expert_blend_decode_step(logits, gate, temperature=0)
    assert torch.equal(out.tokens, cols[:, 0])


_SAMPLE_CASES = [("logits", {}), ("probs", {}), ("logits", dict(top_k=4)), ("probs", dict(top_p=0.7))]


# The sampler is the shared one (collab_decode_step, tested on every backend in test_collab_logits);
# under the Triton interpreter one filtered case suffices here.
def _sample_params():
    out = []
    for p in BACKENDS:
        name = p.values[0]
        cases = _SAMPLE_CASES if name != "triton" else [("probs", dict(top_k=4, top_p=0.9))]
        for blend, filt in cases:
            out.append(pytest.param(name, blend, filt, marks=p.marks,
                                    id=f"{name}-{blend}-{'-'.join(filt) or 'unfiltered'}"))
    return out


@pytest.mark.parametrize("backend,blend,filt", _sample_params())
def test_sampled_distribution(backend, blend, filt):
    """Chi-square of the sampled tokens against softmax(blend/T) (top-k / top-p applied in float64);
    the p-value threshold 1e-4 makes a false failure negligible. Tokens outside the kept set never appear."""
    gen = _gen()
    rows, V, temp = ROWS.get(backend, 6000), 8, 0.8
    base, gate1 = [torch.randn(1, V, generator=gen) * 1.5 for _ in range(3)], torch.softmax(torch.randn(1, 3, generator=gen), 1)
    logits = [b.expand(rows, V).contiguous() for b in base]
    gate = gate1.expand(rows, 3).contiguous()
    with use_backend(backend):
        out = expert_blend_decode_step(logits, gate, blend=blend, temperature=temp, generator=gen, **filt)
    x = _ref_scores(base, gate1, blend, V)[0] / temp
    order = torch.argsort(x, descending=True)
    keep = torch.zeros(V, dtype=torch.bool)
    keep[order[: filt.get("top_k", V)]] = True
    if "top_p" in filt:  # top-p on the top-k renormalised distribution (top-k first)
        p = torch.softmax(torch.where(keep, x, float("-inf")), 0)[order]
        keep = torch.zeros(V, dtype=torch.bool)
        keep[order[(torch.cumsum(p, 0) - p) < filt["top_p"]]] = True
    probs = torch.softmax(torch.where(keep, x, float("-inf")), 0)
    counts = torch.bincount(out.tokens, minlength=V).double()
    assert counts[~keep].sum() == 0
    if int(keep.sum()) > 1:  # one kept token: every draw is it, checked just above
        assert scipy_stats.chisquare(counts[keep].numpy(), (probs[keep] * rows).numpy()).pvalue > 1e-4
    # log_probs: the unfiltered temperature-1 blended distribution
    lp = torch.log_softmax(_ref_scores(base, gate1, blend, V)[0], 0)
    assert_close_to_reference(out.log_probs, lp[out.tokens], F32, "log_probs")


def test_generator_reproducible_across_backends():
    logits, gate = _inputs(B=16)
    seed = int(torch.randint(0, 2**31, ()))
    outs = []
    for backend in [p.values[0] for p in backend_params(("reference", "cpp"))]:
        for _ in range(2):
            with use_backend(backend):
                outs.append(expert_blend_decode_step(logits, gate, vocab_size=301, temperature=1.3, top_p=0.95,
                                                     generator=torch.Generator().manual_seed(seed)).tokens)
    for o in outs[1:]:
        assert torch.equal(o, outs[0])
    # an int seed is a fresh generator with that seed
    assert torch.equal(expert_blend_decode_step(logits, gate, vocab_size=301, temperature=1.3, top_p=0.95,
                                                generator=seed).tokens, outs[0])


def test_validation():
    logits, gate = _inputs()
    f = expert_blend_decode_step
    cases = [
        (lambda: f(logits[0], gate, vocab_size=301), TypeError, "logits must be a list"),
        (lambda: f(logits, gate), ValueError, "different vocabulary sizes"),
        (lambda: f(logits, gate[:, :2], vocab_size=301), ValueError, "E = 3"),
        (lambda: f(logits, gate[:2], vocab_size=301), ValueError, "gate must have 5 rows"),
        (lambda: f([logits[0], logits[1].double(), logits[2]], gate, vocab_size=301), TypeError, "dtype"),
        (lambda: f([logits[0], logits[1][:3], logits[2]], gate, vocab_size=301), ValueError, "rows"),
        (lambda: f(logits, gate, vocab_size=302), ValueError, "vocab_size"),
        (lambda: f(logits, gate - 1, vocab_size=301, blend="probs"), ValueError, "non-negative"),
        (lambda: f(logits, gate, vocab_size=301, blend="geo"), ValueError, "blend"),
        (lambda: f(logits, gate, vocab_size=301, temperature=-1.0), ValueError, "temperature"),
        (lambda: f(logits, gate, vocab_size=301, top_k=0), ValueError, "top_k"),
        (lambda: f(logits, gate, vocab_size=301, top_p=1.5), ValueError, "top_p"),
    ]
    for fn, exc, msg in cases:
        with pytest.raises(exc, match=msg):
            fn()


def test_opcheck_and_compile():
    logits, gate = _inputs(B=4, widths=(40, 41))
    for blend in ("logits", "probs"):
        torch.library.opcheck(torch.ops.lmfuse.expert_blend_logits.default, (logits, gate, blend, 40))
    fn = torch.compile(lambda ls, g: expert_blend_decode_step(ls, g, vocab_size=40, temperature=0),
                       fullgraph=True, backend="aot_eager")
    out, ref = fn(logits, gate), expert_blend_decode_step(logits, gate, vocab_size=40, temperature=0)
    assert torch.equal(out.tokens, ref.tokens)
    assert_close_to_reference(out.log_probs, ref.log_probs.double(), F32, "log_probs")
