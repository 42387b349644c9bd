"""FS-GEN analysis: routers, collaboration measures, bucketed frequencies, scaling fit, plots."""

import numpy as np
import pytest
import torch

from lmfuse.collab import analysis as an


def test_routers_threshold_strictly_below():
    p = torch.tensor([0.1, 0.5, 0.9])
    assert an.max_prob_router(p, 0.5).tolist() == [True, False, False]
    assert an.margin_router(torch.tensor([0.0, 0.3]), 0.31).tolist() == [True, True]
    with pytest.raises(ValueError, match="threshold"):
        an.max_prob_router(p, 1.5)


def test_router_curve_hand_counts():
    score = torch.tensor([[0.1, 0.2, 0.8, 0.9]])
    differs = torch.tensor([[True, False, True, False]])
    c = an.router_curve(score, differs, [0.0, 0.15, 0.5, 1.0])
    assert c.call_rate.tolist() == [0.0, 0.25, 0.5, 1.0]
    assert c.recall.tolist() == [0.0, 0.5, 0.5, 1.0]
    assert np.isnan(c.precision[0].item()) and c.precision[1:].tolist() == [1.0, 0.5, 0.5]
    masked = an.router_curve(score, differs, [1.0], valid=torch.tensor([[True, True, False, False]]))
    assert masked.recall.tolist() == [1.0] and masked.call_rate.tolist() == [1.0]


def test_collaboration_frequency_respects_valid():
    d = torch.tensor([[True, False, True], [False, False, True]])
    v = torch.tensor([[True, True, False], [True, False, False]])
    assert an.collaboration_frequency(d, v) == pytest.approx(1 / 3)
    assert an.collaboration_frequency(d) == pytest.approx(0.5)
    with pytest.raises(ValueError, match="no valid"):
        an.collaboration_frequency(d, torch.zeros_like(v))


def test_frequency_by_position_uses_each_rows_own_length():
    # row 0: 10 tokens, disagreement only at the first; row 1: 5 tokens, only at the last
    d = torch.zeros(2, 10, dtype=torch.bool)
    v = torch.zeros(2, 10, dtype=torch.bool)
    v[0] = True
    v[1, :5] = True
    d[0, 0] = True
    d[1, 4] = True
    freq, counts = an.frequency_by_position(d, v, num_buckets=10)
    # row 1's 5 tokens fall in buckets 0, 2, 4, 6, 8
    assert counts.tolist() == [2, 1, 2, 1, 2, 1, 2, 1, 2, 1]
    assert freq[0].item() == 0.5 and freq[8].item() == 0.5
    assert freq[[1, 2, 3, 4, 5, 6, 7, 9]].sum().item() == 0.0


def test_frequency_by_entropy_bins():
    e = torch.tensor([0.1, 0.2, 1.1, 1.5, 2.5])
    d = torch.tensor([False, False, True, False, True])
    edges, freq, counts = an.frequency_by_entropy(d, e, edges=[0.0, 1.0, 2.0, 3.0])
    assert counts.tolist() == [2, 2, 1]
    assert freq.tolist() == [0.0, 0.5, 1.0]
    edges, freq, counts = an.frequency_by_entropy(d, e, num_bins=2)  # quantile edges
    assert int(counts.sum()) == 5 and edges.numel() == 3
    with pytest.raises(ValueError, match="increasing"):
        an.frequency_by_entropy(d, e, edges=[1.0, 0.5])


def test_scaling_fit_recovers_known_parameters():
    rng = np.random.default_rng(int(torch.randint(0, 2**31, ())))
    a, b, alpha = 0.3, 0.45, 0.6
    ratios = np.array([2.0, 4.0, 8.0, 16.0, 32.0, 64.0, 128.0])
    freqs = an.scaling_law(ratios, a, b, alpha) + rng.normal(0, 1e-4, ratios.size)
    fit = an.fit_scaling(ratios, freqs)
    assert fit.a == pytest.approx(a, abs=0.02) and fit.b == pytest.approx(b, abs=0.01)
    assert fit.alpha == pytest.approx(alpha, abs=0.05) and fit.residual_rms < 1e-3
    # the bounds hold even when the data would like to leave them (an increasing trend)
    bounded = an.fit_scaling(ratios, 0.9 - an.scaling_law(ratios, a, 0.5, alpha))
    assert 0 <= bounded.a <= 1 and 0 <= bounded.b <= 1 and 0 <= bounded.alpha <= 5
    with pytest.raises(ValueError, match=">= 3"):
        an.fit_scaling([1.0, 2.0], [0.1, 0.2])


def test_plots_are_written(tmp_path):
    d = torch.rand(3, 12) < 0.3
    v = torch.ones(3, 12, dtype=torch.bool)
    e = torch.rand(3, 12) * 3
    files = [an.plot_position(*an.frequency_by_position(d, v), tmp_path / "pos.png"),
             an.plot_entropy(*an.frequency_by_entropy(d, e, v), tmp_path / "ent.png"),
             an.plot_router({"max-prob": an.router_curve(torch.rand(3, 12), d, [0.2, 0.5, 0.8])}, 0.3,
                            tmp_path / "router.png")]
    r = np.array([2.0, 4.0, 8.0, 16.0])
    f = an.scaling_law(r, 0.2, 0.4, 0.5)
    files.append(an.plot_scaling(r, f, an.fit_scaling(r, f), tmp_path / "fit.png"))
    for name in files:
        data = open(name, "rb").read()
        assert data[:8] == b"\x89PNG\r\n\x1a\n" and len(data) > 2000


def test_analyze_an_oracle_trace_of_tiny_models(tmp_path):
    from lmfuse.collab import oracle_trace, truncate_layers

    from .helpers import ragged_prompts, tiny_llama

    large = tiny_llama(layers=3, seed=0)
    g = torch.Generator().manual_seed(int(torch.randint(0, 2**31, ())))
    ids, mask = ragged_prompts([5, 3, 7, 4], g)
    out = oracle_trace(large, truncate_layers(large, 1), ids, mask, max_new_tokens=10)
    rep = an.analyze_trace(out.trace, tmp_path, num_entropy_bins=4)
    assert rep["tokens"] == 40 and rep["collaboration_frequency"] == pytest.approx(out.stats.collaboration_frequency)
    assert sum(rep["by_position"]["counts"]) == 40 and sum(rep["by_entropy"]["counts"]) == 40
    # routing every token catches every disagreement
    assert rep["routers"]["max-prob"]["call_rate"][-1] == 1.0
    for f in rep["files"]:
        assert open(f, "rb").read(4) == b"\x89PNG"
