"""PROTEUS end to end on the real plasma cohort (48 samples, five disease groups) without an LLM:
the run must find the known liver cirrhosis signature, lower plasma levels of liver-made
proteins. Skipped when ../shared/data/plasma-proteomics is absent."""

from pathlib import Path

import pytest

from ._runs import session_seed

DATA = Path(__file__).resolve().parents[3] / "shared" / "data" / "plasma-proteomics"
LIVER_MADE = {"IGFALS", "IGFBP3", "CPB2", "KLKB1", "F2", "KNG1", "APOM", "ITIH2", "HPX", "SERPINF2", "C6", "AZGP1"}


@pytest.fixture(scope="module")
def plasma_run(tmp_path_factory):
    if not (DATA / "proteinGroups.txt").is_file():
        pytest.skip(f"real data not found: {DATA}")
    from lmfuse.proteus.run import run

    out = tmp_path_factory.mktemp("plasma")
    return run(DATA / "proteinGroups.txt", DATA / "metadata.xlsx", out=out, seed=session_seed()), out


def test_plasma_finds_the_cirrhosis_signature(plasma_run):
    res, out = plasma_run
    f = res.findings
    de = next(d for d in f["differential"] if d["case"] == "liver cirrhosis" and d["control"] == "healthy")
    hits = de["hits"]
    assert len(hits) >= 8
    down = [h for h in hits if h["log2fc"] < 0]
    assert len(down) >= 0.7 * len(hits)  # the signature is a fall in plasma levels
    found = {h["gene"].split(";")[0] for h in down} & LIVER_MADE
    assert len(found) >= 5, found
    hyp = next(h for h in f["hypotheses"] if "lower in liver cirrhosis than in healthy" in h["statement"])
    assert hyp["verified"] and hyp["direction"] == "down" and de["step_id"] in hyp["evidence"]
    assert len(set(hyp["entities"]) & LIVER_MADE) >= 5
    assert (out / "report.html").stat().st_size > 10_000


def test_plasma_steps_are_gated(plasma_run):
    res, _ = plasma_run
    steps = res.findings["steps"]
    assert [s["tool"] for s in steps[:4]] == ["qc_summary", "filter_proteins", "normalize", "impute"]
    for s in steps:
        if s["tool"] == "differential_abundance":
            assert {"group_size", "global_signal", "p_histogram"} <= {g["name"] for g in s["gates"]}
            assert s["verdict"] in ("accept", "reject")
            if s["verdict"] == "accept":
                assert all(g["passed"] for g in s["gates"] if g["severity"] == "fail")
