"""Synthetic cohorts: the planted truth is recovered by the tools (stated thresholds), the null
cohort yields nothing, files round-trip through the readers."""

import numpy as np
import pytest

from lmfuse.proteus.data import load
from lmfuse.proteus.stats import adjusted_rand, read_gmt
from lmfuse.proteus.synth import SynthSpec, make_cohort, make_null_cohort
from lmfuse.proteus.tools import ToolContext, run_tool

from . import test_rng

CONTRAST = {"group_column": "group", "case": "case", "control": "control"}


def test_planted_truth_is_recovered():
    rng, seed = test_rng()
    seed %= 100_000
    ds, sets, truth = make_cohort(seed=seed)
    ctx = ToolContext(seed=seed, gene_sets=sets, figures=False)
    filt = run_tool("filter_proteins", ds, {"min_valid_fraction": 0.7}, context=ctx).dataset
    da = run_tool("differential_abundance", filt, CONTRAST, context=ctx)
    called = {f.entity.split(":", 1)[1]: f.effect for f in da.findings}
    planted = set(truth.de) & set(filt.protein_ids)
    tp = set(called) & planted
    # DA: precision and recall >= 0.9 (measured 0.92-1.0 over 25 seeds), every true call has the planted sign
    assert len(tp) / len(called) >= 0.9 and len(tp) / len(planted) >= 0.9
    assert all(np.sign(called[p]) == np.sign(truth.de[p]) for p in tp)
    # pathways: ORA finds exactly the planted sets in their planted direction; GSEA finds all of them
    ctx.results["da"] = da
    ora = run_tool("enrichment_ora", filt, {"from_step": "da"}, context=ctx)
    assert {(f.entity[9:], f.direction) for f in ora.findings} == set(truth.pathways.items())
    gsea = run_tool("gsea_prerank", filt, {"from_step": "da", "permutations": 200, "min_size": 5, "fdr": 0.05}, context=ctx)
    found = {f.entity[9:]: f.direction for f in gsea.findings}
    assert all(found.get(k) == v for k, v in truth.pathways.items())
    # subtypes: ARI >= 0.9 with k chosen by silhouette
    imp = run_tool("impute", filt, {"method": "minprob"}, context=ctx).dataset
    cl = run_tool("cluster_samples", imp, {"n_boot": 5}, context=ctx)
    assert cl.summary["k"] == 3
    assert adjusted_rand(cl.tables["clusters"].cluster, truth.subtypes) >= 0.9
    assert cl.summary["stability_ari"] >= 0.6
    # survival signature: recall and precision >= 0.6 at FDR 0.05 (measured >= 0.86 over 13 seeds), signs right
    cox = run_tool("survival_cox", filt, {}, context=ctx)
    hits = {f.entity[8:]: f.effect for f in cox.findings}
    sv = set(truth.survival) & set(filt.protein_ids)
    good = set(hits) & sv
    assert len(good) >= 0.6 * len(sv) and len(good) >= 0.6 * len(hits)
    assert all(np.sign(hits[p]) == truth.survival[p] for p in good)
    # hazards are proportional by construction: the Schoenfeld check of <= 20 hits stays quiet
    # (a false alarm below 1e-5 has probability <= 2e-4)
    assert cox.diagnostics["ph_min_p"] > 1e-5


def test_null_cohort_gives_no_findings():
    rng, seed = test_rng()
    ds, sets, truth = make_null_cohort(seed=seed % 100_000, n_samples=60, n_proteins=800)
    assert truth.null and not truth.de and not truth.pathways and not truth.survival
    ctx = ToolContext(seed=1, gene_sets=sets, figures=False)
    filt = run_tool("filter_proteins", ds, {}, context=ctx).dataset
    da = run_tool("differential_abundance", filt, {**CONTRAST, "fdr": 0.01}, context=ctx)
    # under the global null BH at 1% makes >= 3 calls with probability ~(3·0.01)³/6 < 1e-5
    assert da.summary["n_significant"] <= 2
    cox = run_tool("survival_cox", filt, {"fdr": 0.01}, context=ctx)
    assert cox.summary["n_significant"] <= 2


def test_cohort_properties_and_file_roundtrip(tmp_path):
    rng, seed = test_rng()
    c = make_cohort(seed=seed % 100_000, n_samples=30, n_proteins=200, n_pathways=20, missing_fraction=0.2,
                    batch_confounded=True)
    ds = c.dataset
    assert ds.X.shape == (200, 30)
    assert abs(np.isnan(ds.X).mean() - 0.2) < 0.03
    g, b = ds.column("group").values, ds.column("batch").values
    assert ((g == "case") == (b == "B2")).all()  # confounded batch
    # the lower the abundance, the more often missing
    seen = ~np.isnan(ds.X).all(1)
    mu = np.nanmean(ds.X[seen], 1)
    miss = np.isnan(ds.X[seen]).mean(1)
    assert np.corrcoef(mu, miss)[0, 1] < -0.3
    paths = c.write(tmp_path)
    back = load(paths["data"], paths["meta"])
    np.testing.assert_allclose(back.X, ds.X, atol=1e-6, equal_nan=True)
    assert back.genes == ds.genes
    prof = back.profile()
    assert prof.survival == {"time": "time", "event": "event"} and prof.batch_column == "batch"
    assert ("group", "case", "control") in prof.contrasts
    assert read_gmt(paths["gene_sets"]) == c.gene_sets
    # deterministic given the seed
    again = make_cohort(seed=seed % 100_000, n_samples=30, n_proteins=200, n_pathways=20, missing_fraction=0.2,
                        batch_confounded=True)
    assert again.dataset.fingerprint() == ds.fingerprint() and again.truth.to_json() == c.truth.to_json()
    assert SynthSpec.scale().n_samples == 1000 and SynthSpec.scale().n_proteins == 10000
    with pytest.raises(ValueError, match="n_samples"):
        make_cohort(n_samples=4)
