"""spec_verify on every backend: output distribution (chi-square), acceptance rates, greedy,
ragged rows, masked vocabularies, reproducibility, registration and bad inputs."""

import importlib.util

import pytest
import torch

from lmfuse.ops import spec_verify, use_backend

from .helpers import backend_params, poisoned_outputs

scipy_stats = pytest.importorskip("scipy.stats")

_HAS_TRITON_KERNEL = importlib.util.find_spec("lmfuse.triton_kernels.spec_verify") is not None
BACKENDS = backend_params(("reference", "cpp", "cuda") + (("triton",) if _HAS_TRITON_KERNEL else ()))
# The Triton interpreter runs one program at a time in Python: fewer rows there.
ROWS = {"triton": 800}


def _rows(backend, device, n=12000):
    return ROWS.get(backend, n) if device.type == "cpu" else n


def _filtered_probs(logits, temperature, top_k=None, top_p=None):
    """float64 p from 1-D logits, written independently of lmfuse (sort-based filtering)."""
    x = logits.double() / temperature
    order = torch.argsort(x, descending=True)
    keep = torch.zeros_like(x, dtype=torch.bool)
    keep[order[: (top_k or x.numel())]] = True
    x = torch.where(keep, x, float("-inf"))
    if top_p is not None:
        p = torch.softmax(x, 0)[order]
        mass_before = torch.cumsum(p, 0) - p
        keep2 = torch.zeros_like(keep)
        keep2[order[mass_before < top_p]] = True
        x = torch.where(keep2, x, float("-inf"))
    return torch.softmax(x, 0)


def _chi2_pvalue(samples, probs):
    counts = torch.bincount(samples, minlength=probs.numel()).double()
    n = counts.sum()
    support = probs > 0
    assert counts[~support].sum() == 0, f"sampled tokens outside the support: {counts[~support]}"
    if int(support.sum()) == 1:  # a one-token support: nothing to test beyond the line above
        return 1.0
    return scipy_stats.chisquare(counts[support].numpy(), (probs[support] * n).numpy()).pvalue


def _case(rows, k, V, device, g, draft=True, dtype=torch.float32, scale=1.0):
    """Every row shares one (p, q) so the emitted tokens are i.i.d. draws to test."""
    t1 = torch.randn(k + 1, V, generator=g) * scale
    d1 = torch.randn(k, V, generator=g) * scale
    target = t1.expand(rows, k + 1, V).to(dtype).to(device)
    draft_logits = d1.expand(rows, k, V).to(dtype).to(device) if draft else None
    return t1.to(dtype).float(), d1.to(dtype).float(), target, draft_logits


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("filt", [dict(), dict(top_k=4), dict(top_p=0.7), dict(top_k=5, top_p=0.8)],
                         ids=["plain", "top_k", "top_p", "top_k+top_p"])
def test_first_token_is_distributed_as_p_and_acceptance_is_sum_min(backend, filt, device):
    if backend == "triton" and device.type == "cpu" and len(filt) == 1:
        pytest.skip("interpreter time: the filters are thresholds computed on the host, shared by every "
                    "backend; the interpreter runs the unfiltered and the combined case")
    g = torch.Generator().manual_seed(torch.randint(0, 2**31, ()).item())
    rows, k, V, temp = _rows(backend, device), 2, 7, 0.8
    t1, d1, target, draft = _case(rows, k, V, device, g)
    p0 = _filtered_probs(t1[0], temp, **filt)
    q0 = _filtered_probs(d1[0], temp, **filt)
    # the drafter samples its token from q (the other positions' drafts are irrelevant to token 0)
    ids = torch.stack([torch.multinomial(q0.float(), rows, replacement=True, generator=g),
                       torch.randint(0, V, (rows,), generator=g)], 1).to(device)
    with use_backend(backend), poisoned_outputs():
        out = spec_verify(ids, draft, target, temperature=temp, generator=g, **filt)
    first = out.tokens[:, 0].cpu()
    assert _chi2_pvalue(first, p0) > 1e-4
    acc = (out.num_accepted >= 1).double().mean().item()
    expect = torch.minimum(p0, q0).sum().item()
    assert abs(acc - expect) < 5 * (expect * (1 - expect) / rows) ** 0.5 + 1e-9, (acc, expect)


@pytest.mark.parametrize("backend", BACKENDS)
def test_deterministic_drafter_accepts_with_probability_p_of_draft(backend, device):
    g = torch.Generator().manual_seed(torch.randint(0, 2**31, ()).item())
    rows, k, V, temp = _rows(backend, device), 1, 6, 1.2
    t1, _, target, _ = _case(rows, k, V, device, g, draft=False)
    p0 = _filtered_probs(t1[0], temp)
    x = int(torch.argsort(p0)[V // 2])  # a mid-probability draft token
    ids = torch.full((rows, k), x, dtype=torch.int64, device=device)
    with use_backend(backend):
        out = spec_verify(ids, None, target, temperature=temp, generator=g)
    acc = (out.num_accepted == 1).double().mean().item()
    expect = p0[x].item()
    assert abs(acc - expect) < 5 * (expect * (1 - expect) / rows) ** 0.5, (acc, expect)
    assert _chi2_pvalue(out.tokens[:, 0].cpu(), p0) > 1e-4
    # after a rejection the correction never repeats the rejected token
    rejected = out.num_accepted == 0
    assert not (out.tokens[rejected, 0] == x).any()


@pytest.mark.parametrize("backend", BACKENDS)
def test_greedy_accepts_the_matching_prefix(backend, device):
    B, k, V = 9, 4, 23
    target = torch.randn(B, k + 1, V, device=device)
    best = target.argmax(-1)
    n_match = torch.randint(0, k + 1, (B,), device=device)
    ids = torch.where(torch.arange(k, device=device)[None] < n_match[:, None], best[:, :k], (best[:, :k] + 1) % V)
    with use_backend(backend):
        out = spec_verify(ids, torch.randn(B, k, V, device=device), target, temperature=0.0)
    assert out.num_accepted.tolist() == n_match.tolist()
    for b in range(B):
        j = int(n_match[b])
        assert out.tokens[b, :j].tolist() == ids[b, :j].tolist()
        assert int(out.tokens[b, j]) == int(best[b, j])
        assert (out.tokens[b, j + 1:] == -1).all()


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("dtype", [torch.float32, torch.float16, torch.bfloat16])
@pytest.mark.parametrize("temperature", [0.0, 0.9])
def test_ragged_rows_and_masked_vocab_match_reference(backend, dtype, temperature, device):
    B, k, V = 11, 5, 45
    target = (torch.randn(B, k + 1, V, device=device) * 2).to(dtype)
    draft = (target[:, :k].float() + torch.randn(B, k, V, device=device)).to(dtype)
    mask = torch.rand(B, 1, V, device=device) < 0.4  # a masked vocabulary per row
    mask[..., 0] = False                             # keep one token everywhere
    target = target.masked_fill(mask, float("-inf"))
    draft = draft.masked_fill(mask[:, :, :].expand(B, k, V), float("-inf"))
    n = torch.randint(0, k + 1, (B,), device=device)
    ids = torch.multinomial(torch.softmax(draft.float().reshape(-1, V), -1), 1).reshape(B, k)
    outs = {}
    for be in dict.fromkeys((backend, "reference")):
        with use_backend(be):
            outs[be] = spec_verify(ids, draft, target, temperature=temperature, num_draft_tokens=n,
                                   generator=torch.Generator().manual_seed(123))
    out = outs[backend]
    if backend != "reference":  # same generator, same draws: token-exact agreement with the reference
        ref = outs["reference"]
        assert torch.equal(out.tokens, ref.tokens) and torch.equal(out.num_accepted, ref.num_accepted)
    assert (out.num_accepted <= n).all()
    for b in range(B):  # accepted drafts are kept as proposed
        a = int(out.num_accepted[b])
        assert out.tokens[b, :a].tolist() == ids[b, :a].tolist()
    if temperature == 0.0:
        # Greedy, computed here without lmfuse: every accepted draft is a maximiser of its target row;
        # the first unaccepted draft (if any) is not the row's unique maximiser (at a tie, possible in
        # half precision, the argmax may pick another maximiser); the emitted token is a maximiser.
        t = target.float().cpu()
        is_max = t == t.max(-1, keepdim=True).values
        tied = is_max.sum(-1) > 1
        for b in range(B):
            a = int(out.num_accepted[b])
            assert all(is_max[b, j, int(ids[b, j])] for j in range(a)), f"row {b}: accepted a non-argmax draft"
            if a < int(n[b]):
                assert tied[b, a] or not is_max[b, a, int(ids[b, a])], f"row {b}: rejected the unique argmax"
            assert is_max[b, a, int(out.tokens[b, a])], f"row {b}: emitted token is not a target argmax"
    rows = torch.arange(B, device=device)
    emitted = out.tokens[rows, out.num_accepted]
    assert not mask[rows, 0, emitted].any(), "a masked (-inf) token was emitted"
    pos = torch.arange(k + 1, device=device)[None]
    assert ((out.tokens == -1) == (pos > out.num_accepted[:, None])).all()


@pytest.mark.parametrize("backend", BACKENDS)
def test_all_and_none_accepted_and_k1(backend, device):
    B, k, V = 6, 1, 19
    target = torch.randn(B, k + 1, V, device=device)
    ids = torch.randint(0, V, (B, k), device=device)
    with use_backend(backend):
        same = spec_verify(ids, target[:, :k].clone(), target, generator=1)  # q == p: u·q < p always
        assert same.num_accepted.tolist() == [k] * B and (same.tokens[:, k] >= 0).all()
        blocked = target.clone()
        blocked[torch.arange(B), 0, ids[:, 0]] = float("-inf")  # p(draft) = 0: always rejected
        none = spec_verify(ids, target[:, :k].clone(), blocked, generator=1)
        assert none.num_accepted.tolist() == [0] * B
        assert (none.tokens[:, 0] != ids[:, 0]).all() and (none.tokens[:, 1] == -1).all()


@pytest.mark.parametrize("backend", BACKENDS)
def test_reproducible_with_generator_and_non_contiguous(backend, device):
    B, k, V = 7, 3, 33
    base = torch.randn(V, B, k + 1, device=device)
    target = base.permute(1, 2, 0)  # non-contiguous [B, k+1, V]
    draft = torch.randn(B, k, V, device=device)[:, :, :]
    ids = torch.randint(0, V, (B, k), device=device)
    with use_backend(backend):
        a = spec_verify(ids, draft, target, generator=torch.Generator().manual_seed(7), top_p=0.9)
        b = spec_verify(ids, draft, target.contiguous(), generator=torch.Generator().manual_seed(7), top_p=0.9)
        c = spec_verify(ids, draft, target, generator=7, top_p=0.9)  # an int seed works too
    assert torch.equal(a.tokens, b.tokens) and torch.equal(a.tokens, c.tokens)


@pytest.mark.parametrize("backend", BACKENDS)
def test_nan_and_inf_logits_raise(backend, device):
    B, k, V = 3, 2, 10
    target = torch.randn(B, k + 1, V, device=device)
    ids = target[:, :k].argmax(-1)  # greedy accepts everything: every position is read
    for bad in (float("nan"), float("inf")):
        t = target.clone()
        t[1, 2, 4] = bad
        with use_backend(backend), pytest.raises(ValueError, match="NaN or \\+inf"):
            spec_verify(ids, None, t, temperature=0.0)
    t = target.clone()
    t[0, 0] = float("-inf")  # a position with no finite logit
    with use_backend(backend), pytest.raises(ValueError, match="no finite logit"):
        spec_verify(ids, None, t, temperature=1.0, generator=0)


def test_bad_inputs_raise_clear_errors():
    B, k, V = 2, 3, 8
    t, d = torch.randn(B, k + 1, V), torch.randn(B, k, V)
    ids = torch.randint(0, V, (B, k))
    cases = [
        ((ids, d, t[:, :k]), {}, ValueError, "k\\+1"),
        ((ids, d[:, :, :5], t), {}, ValueError, "draft_logits must be"),
        ((ids[:1], d, t), {}, ValueError, "target_logits must be"),
        ((ids.float(), d, t), {}, TypeError, "draft_token_ids must be int64"),
        ((ids, d.half(), t), {}, TypeError, "draft_logits has dtype"),
        ((ids, d, t.long()), {}, TypeError, "target_logits must be float"),
        ((ids + V, d, t), {}, ValueError, "must be in \\[0, V"),
        ((ids, d, t), dict(num_draft_tokens=torch.tensor([4, 1])), ValueError, "num_draft_tokens"),
        ((ids, d, t), dict(temperature=-1.0), ValueError, "temperature"),
        ((ids, d, t), dict(top_k=0), ValueError, "top_k"),
        ((ids, d, t), dict(top_p=1.5), ValueError, "top_p"),
        ((ids, d, t), dict(generator="x"), TypeError, "generator"),
        ((ids[:, :0], d[:, :0], t[:, :1]), {}, ValueError, "k >= 1"),
    ]
    for args, kw, exc, msg in cases:
        with pytest.raises(exc, match=msg):
            spec_verify(*args, **kw)
    # ids past a row's count are ignored, even when out of range
    bad_tail = ids.clone()
    bad_tail[:, 2] = 10**6
    out = spec_verify(bad_tail, d, t, num_draft_tokens=torch.tensor([2, 1]), generator=0)
    assert (out.num_accepted <= torch.tensor([2, 1])).all()


def test_opcheck_and_compile():
    B, k, V = 3, 2, 12
    t, d = torch.randn(B, k + 1, V), torch.randn(B, k, V)
    ids, n = torch.randint(0, V, (B, k)), torch.tensor([2, 0, 1])
    u, seeds = torch.rand(B, k), torch.randint(0, 2**32, (B, 2))
    torch.library.opcheck(torch.ops.lmfuse.spec_verify.default, (ids, d, t, n, u, seeds, 0.9, None, None))
    fn = torch.compile(lambda a, b, c: spec_verify(a, b, c, temperature=0.0), fullgraph=True, backend="aot_eager")
    assert torch.equal(fn(ids, d, t).tokens, spec_verify(ids, d, t, temperature=0.0).tokens)
