"""Top-k / top-p thresholds: the C++ selection (``lmfuse._C.filter_thresholds``, used for CPU
tensors) against the PyTorch definition (``filter_thresholds_reference``, a full sort per row),
on peaked, flat, masked and tied rows in every logits dtype."""

import pytest
import torch

from lmfuse import _backend
from lmfuse.ops import _sampling

ext = _backend.cpu_extension()
pytestmark = pytest.mark.skipif(ext is None or not hasattr(ext, "filter_thresholds"),
                                reason="lmfuse._C not built with filter_thresholds")


def _rows(g: torch.Generator, V: int) -> torch.Tensor:
    """Rows of very different shapes: peaked (a few tokens hold the mass), flat (top-p keeps most
    of the vocabulary, so the block search runs many rounds), −inf masked, heavily tied."""
    peaked = torch.randn(6, V, generator=g) * 4
    flat = torch.randn(4, V, generator=g) * 0.05
    masked = torch.randn(4, V, generator=g) * 2
    masked[torch.rand(4, V, generator=g) < 0.7] = float("-inf")
    masked[0, 1:] = float("-inf")  # a single finite token
    masked[0, 0] = 1.0
    masked[1:, 0] = 0.0  # every masked row keeps something finite (all −inf is tested separately)
    tied = torch.randint(0, 4, (4, V), generator=g).float()
    return torch.cat([peaked, flat, masked, tied])


def _mass_above(x: torch.Tensor, thr: torch.Tensor, top_k, V: int) -> tuple[torch.Tensor, torch.Tensor]:
    """(mass strictly above the kept set's smallest value, mass of what a threshold keeps), in
    float64, of the top-k-filtered softmax of each row of scaled logits ``x``."""
    x = x.double()
    if top_k is not None and top_k < V:  # exactly k tokens, as the definition (ties at the k-th cut)
        keep = torch.zeros_like(x, dtype=torch.bool).scatter_(1, torch.topk(x, top_k, dim=-1).indices, True)
        x = x.masked_fill(~keep, float("-inf"))
    p = torch.softmax(x, dim=-1)
    above = (p * (x > thr[:, None].double())).sum(-1)
    kept = (p * (x >= thr[:, None].double())).sum(-1)
    return above, kept


@pytest.mark.parametrize("dtype", [torch.float32, torch.float16, torch.bfloat16, torch.float64])
@pytest.mark.parametrize("top_k,top_p", [(None, 0.9), (None, 0.5), (None, 0.999), (50, None), (1, None),
                                         (40, 0.8), (2000, 0.95), (None, 1e-6)])
def test_cpp_thresholds_match_the_reference(dtype, top_k, top_p):
    g = torch.Generator().manual_seed(torch.randint(0, 2**31, ()).item())
    V = 3001
    logits = _rows(g, V).to(dtype)
    inv_t = _sampling.inv_temperature(0.7)
    got = _sampling.filter_thresholds(logits, inv_t, top_k, top_p)
    ref = _sampling.filter_thresholds_reference(logits, inv_t, top_k, top_p)
    assert got.dtype == torch.float32 and got.shape == (logits.shape[0],)
    same = got == ref
    if top_p is None:
        assert bool(same.all())  # top-k alone is exact: the k-th largest value
        return
    # Both sum the mass in float64 (in different orders), so a row may differ only where the
    # mass above a token is within rounding of top_p. Check such rows are near-ties and that the
    # C++ threshold obeys the definition (mass above < p <= mass kept) up to rounding.
    x = logits.float() * inv_t
    above, kept = _mass_above(x, got, top_k, V)
    assert bool((above < top_p + 1e-9).all()) and bool((kept >= top_p - 1e-9).all())
    ref_above, ref_kept = _mass_above(x, ref, top_k, V)
    near = ((ref_above - top_p).abs() < 1e-9) | ((ref_kept - top_p).abs() < 1e-9)
    assert bool((same | near).all()), (got[~same], ref[~same])
    assert int(same.sum()) >= logits.shape[0] - 1


def test_all_masked_row_and_leading_shapes():
    x = torch.full((2, 3, 17), float("-inf"))
    x[1] = torch.randn(3, 17)
    got = _sampling.filter_thresholds(x, 1.0, None, 0.9)
    ref = _sampling.filter_thresholds_reference(x, 1.0, None, 0.9)
    assert got.shape == (2, 3) and torch.equal(got, ref)
    assert bool(torch.isneginf(got[0]).all())


def test_bad_inputs_are_rejected_by_the_extension():
    with pytest.raises(RuntimeError, match="contiguous CPU"):
        ext.filter_thresholds(torch.randn(4, 10).t(), 1.0, 0.9)
    with pytest.raises(RuntimeError, match="float32/float16/bfloat16"):
        ext.filter_thresholds(torch.zeros(2, 10, dtype=torch.int32), 1.0, 0.9)
    with pytest.raises(RuntimeError, match="top_p"):
        ext.filter_thresholds(torch.randn(2, 10), 1.0, 1.0)
    with pytest.raises(RuntimeError, match="inv_temperature"):
        ext.filter_thresholds(torch.randn(2, 10), float("inf"), 0.9)

