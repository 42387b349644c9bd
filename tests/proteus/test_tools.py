"""Tool registry (schemas narrowed to the data, validation) and every tool on small cohorts;
the liver-cirrhosis signature on the real plasma data."""

import json
from pathlib import Path

import numpy as np
import pytest
from pydantic import ValidationError
from scipy import stats

from lmfuse.proteus.synth import make_cohort
from lmfuse.proteus.tools import (ToolContext, action_schema, get_tool, list_tools, narrowed_schema, openai_tools,
                                  run_tool)

from . import PLASMA


@pytest.fixture
def cohort():
    import torch

    seed = int(torch.randint(0, 10_000, (1,)).item())
    c = make_cohort(n_samples=40, n_proteins=300, n_pathways=30, pathway_size=(8, 20), n_de_extra=10,
                    subtype_markers=20, seed=seed)
    filt = run_tool("filter_proteins", c.dataset, {"min_valid_fraction": 0.7}).dataset
    return c, filt


def test_registry_schemas_are_narrowed(cohort):
    c, ds = cohort
    prof = ds.profile()
    names = {s.name for s in list_tools()}
    assert {"differential_abundance", "enrichment_ora", "gsea_prerank", "survival_cox", "cluster_samples",
            "filter_proteins", "normalize", "impute", "correlate_clinical", "coabundance_modules"} <= names
    sch = narrowed_schema("differential_abundance", prof)
    assert sch["properties"]["group_column"]["enum"] == ["group", "sex", "batch"]
    assert set(sch["properties"]["case"]["enum"]) == {"case", "control", "F", "M", "B1", "B2"}
    assert sch["properties"]["covariates"]["items"]["enum"] == ["age", "group", "batch", "sex"]
    assert sch["additionalProperties"] is False
    sch = narrowed_schema("correlate_clinical", prof)
    assert sch["properties"]["variable"]["enum"] == ["age"]
    tools = openai_tools(prof)
    assert all(t["type"] == "function" and t["function"]["parameters"]["type"] == "object" for t in tools)
    listed = {t["function"]["name"] for t in tools}
    assert "survival_cox" in listed and "enrichment_ora" not in listed  # no gene sets given
    assert "enrichment_ora" in {t["function"]["name"] for t in openai_tools(prof, gene_sets=True)}
    act = action_schema(prof, gene_sets=True)
    json.dumps(act)
    assert act["properties"]["tool"]["enum"] == sorted(act["$defs"])
    assert {r["$ref"] for r in act["properties"]["args"]["oneOf"]} == {f"#/$defs/{n}" for n in act["$defs"]}


def test_plasma_like_profile_hides_unavailable_tools(cohort):
    c, ds = cohort
    ds2 = ds.with_roles({"time": "other", "event": "other", "age": "other"})
    names = {t["function"]["name"] for t in openai_tools(ds2.profile())}
    assert "survival_cox" not in names and "correlate_clinical" not in names
    assert "differential_abundance" in names


def test_invalid_arguments_are_rejected_with_their_name(cohort):
    c, ds = cohort
    base = {"group_column": "group", "case": "case", "control": "control"}
    with pytest.raises(ValueError, match=r"argument 'group_column' has invalid value\(s\) \['nope'\]"):
        run_tool("differential_abundance", ds, {**base, "group_column": "nope"})
    with pytest.raises(ValueError, match=r"argument 'case'='B1' is not a level of column 'group'"):
        run_tool("differential_abundance", ds, {**base, "case": "B1"})
    with pytest.raises(ValidationError, match="method"):
        run_tool("differential_abundance", ds, {**base, "method": "magic"})
    with pytest.raises(ValidationError, match="extra_field"):
        run_tool("differential_abundance", ds, {**base, "extra_field": 1})
    with pytest.raises(ValueError, match=r"argument 'variable' has invalid value\(s\) \['group'\]"):
        run_tool("correlate_clinical", ds, {"variable": "group"})
    with pytest.raises(ValueError, match=r"no gene sets in the context"):
        run_tool("enrichment_ora", ds, base)
    with pytest.raises(ValueError, match=r"argument 'protein': unknown protein id"):
        run_tool("survival_km", ds, {"protein": "XYZ"})
    with pytest.raises(KeyError, match="unknown tool"):
        get_tool("nonexistent")


def test_differential_tool_matches_scipy_welch_and_is_deterministic(cohort):
    c, ds = cohort
    args = {"group_column": "group", "case": "case", "control": "control", "method": "welch"}
    r = run_tool("differential_abundance", ds, args, context=ToolContext(figures=False))
    tab = r.tables["differential"].set_index("protein")
    g = ds.column("group").values
    for i in range(0, ds.n_proteins, 37):
        a, b = ds.X[i, g == "case"], ds.X[i, g == "control"]
        ref = stats.ttest_ind(a[~np.isnan(a)], b[~np.isnan(b)], equal_var=False)
        assert tab.loc[ds.protein_ids[i], "p"] == pytest.approx(ref.pvalue, rel=1e-9)
    for f in r.findings:
        assert f.q <= 0.05 and (f.direction == "up") == (f.effect > 0)
    mod = run_tool("differential_abundance", ds, {**args, "method": "moderated_t", "covariates": ["age"]})
    again = run_tool("differential_abundance", ds, {**args, "method": "moderated_t", "covariates": ["age"]})
    assert mod.to_json() == again.to_json()
    assert mod.figures["volcano"][:8] == b"\x89PNG\r\n\x1a\n"
    assert mod.diagnostics["design"] == ["group=case", "group=control", "age"]


def test_every_tool_runs_on_a_small_cohort(cohort):
    c, ds = cohort
    ctx = ToolContext(seed=3, gene_sets=c.gene_sets, figures=False)
    out = {}
    out["qc"] = run_tool("qc_summary", ds, {"color_by": "group"}, context=ctx)
    out["norm"] = run_tool("normalize", ds, {"method": "quantile"}, context=ctx)
    out["imp"] = run_tool("impute", out["norm"].dataset, {"method": "knn"}, context=ctx)
    full = out["imp"].dataset
    assert not np.isnan(full.X).any() and full.history[-2:] == ["normalize:quantile", "impute:knn"]
    ctx.results["da"] = run_tool("differential_abundance", ds, {"group_column": "group", "case": "case", "control": "control"}, context=ctx)
    out["ora"] = run_tool("enrichment_ora", ds, {"from_step": "da", "set_fdr": 0.25, "min_size": 3}, context=ctx)
    out["gsea"] = run_tool("gsea_prerank", ds, {"from_step": "da", "permutations": 100, "min_size": 5}, context=ctx)
    out["anova"] = run_tool("multigroup_anova", ds, {"group_column": "batch"}, context=ctx)
    out["corr"] = run_tool("correlate_clinical", ds, {"variable": "age"}, context=ctx)
    out["cl"] = run_tool("cluster_samples", full, {"n_boot": 3, "k_max": 4}, context=ctx)
    out["cox"] = run_tool("survival_cox", ds, {}, context=ctx)
    top = out["cox"].tables["cox"].protein[0]
    out["km"] = run_tool("survival_km", ds, {"protein": top}, context=ctx)
    out["mod"] = run_tool("coabundance_modules", full, {"min_size": 5, "group_column": "group", "case": "case", "control": "control"}, context=ctx)
    for name, r in out.items():
        json.dumps(r.to_json())
        assert r.tool and isinstance(r.summary, dict), name
    assert len(out["gsea"].tables["gsea"]) > 0 and len(out["ora"].tables["ora"]) > 0
    assert sum(out["cl"].summary["sizes"].values()) == full.n_samples and len(out["cl"].tables["clusters"]) == full.n_samples
    assert set(out["cox"].tables["cox"].columns) >= {"protein", "hazard_ratio", "p", "q"}
    # tools are deterministic given the context seed
    again = run_tool("gsea_prerank", ds, {"from_step": "da", "permutations": 100, "min_size": 5}, context=ctx)
    assert again.to_json() == out["gsea"].to_json()


@pytest.mark.skipif(not Path(PLASMA).exists(), reason="shared plasma data not present")
def test_liver_cirrhosis_signature_on_real_plasma():
    from lmfuse.proteus.data import load

    ds = load(f"{PLASMA}/proteinGroups.txt", f"{PLASMA}/metadata.xlsx")
    keep = [v in ("healthy", "liver cirrhosis") for v in ds.column("disease").values]
    ds = ds.subset(samples=keep)
    ds = run_tool("filter_proteins", ds, {"min_valid_fraction": 0.7}).dataset
    ds = run_tool("normalize", ds, {"method": "median"}).dataset
    r = run_tool("differential_abundance", ds, {"group_column": "disease", "case": "liver cirrhosis", "control": "healthy"},
                 context=ToolContext(figures=False))
    assert ds.n_proteins > 250
    assert r.summary["n_significant"] >= 20
    down = {f.gene for f in r.findings if f.direction == "down"}
    # liver-made plasma proteins fall in cirrhosis
    assert {"IGFALS", "IGFBP3", "CPB2", "KLKB1", "F2"} <= down
    top15 = r.tables["differential"].head(15)
    assert (top15.log2fc < 0).mean() >= 0.7
