"""PROTEUS executor: validation, caching by content hash, error capture, quality gates and
revisions, the JSONL run log, and replay of a logged run reproducing findings.json exactly."""

import json

import numpy as np
import pytest

from lmfuse.proteus.engine import Engine
from lmfuse.proteus.planner import Action, Objective, RuleBasedPlanner
from lmfuse.proteus.synth import make_cohort

from ._runs import planted, session_seed


@pytest.fixture(scope="module")
def small():
    rng = np.random.default_rng()
    return make_cohort(seed=int(rng.integers(1000)), n_samples=24, n_proteins=150, n_pathways=20)


def test_step_cache_and_artifacts(small, tmp_path):
    eng = Engine(small.dataset, RuleBasedPlanner(), out_dir=tmp_path)
    act = Action("normalize", {"method": "median"})
    a = eng.execute(act, "O0")
    b = eng.execute(act, "O0")
    assert a.status == "ok" and not a.cached and b.cached and a.key == b.key
    c = eng.execute(Action("normalize", {"method": "quantile"}), "O0")
    assert c.key != a.key and not c.cached
    qc = eng.execute(Action("qc_summary", {}), "O0")
    for name, h in qc.artifacts.items():
        ext = "png" if name.startswith("figure:") else "tsv"
        p = tmp_path / "artifacts" / h[:2] / f"{h}.{ext}"
        import hashlib

        assert hashlib.sha256(p.read_bytes()).hexdigest() == h  # content-addressed


def test_invalid_actions_become_error_steps(small):
    eng = Engine(small.dataset, RuleBasedPlanner())
    bad_col = eng.execute(Action("differential_abundance", {"group_column": "nope", "case": "case",
                                                            "control": "control"}), "O1")
    assert bad_col.status == "error" and "group_column" in bad_col.error
    bad_tool = eng.execute(Action("rm_rf", {}), "O1")
    assert bad_tool.status == "error" and "unknown tool" in bad_tool.error
    gates, _ = eng.check(bad_col)
    assert not gates[0].passed
    with pytest.raises(ValueError, match="max_rounds"):
        Engine(small.dataset, RuleBasedPlanner(), max_rounds=-1)


def test_confounded_batch_is_rejected():
    c = make_cohort(seed=session_seed(), n_samples=24, n_proteins=150, n_pathways=20, batch_confounded=True)
    eng = Engine(c.dataset, RuleBasedPlanner())
    rec = eng.execute(Action("differential_abundance", {"group_column": "group", "case": "case",
                                                        "control": "control"}), "O1")
    verdict, sugg = eng.judge(rec, rounds_left=True)
    gate = next(g for g in rec.gates if g.name == "batch_confounding")
    assert gate.value == pytest.approx(1.0) and not gate.passed
    assert verdict == "reject" and sugg == []  # perfectly confounded: adjusting cannot help


def test_filter_gate_asks_for_a_revision(small):
    # a filter keeping too few proteins is revised to the relaxed 50% threshold, and accepted
    ds = small.dataset
    X = ds.X.copy()
    rng = np.random.default_rng(0)
    X[rng.random(X.shape) < 0.4] = np.nan  # ~40% missing: few proteins reach 70% valid
    eng = Engine(ds.with_X(X, "holes"), RuleBasedPlanner(), max_rounds=1)
    rec = eng._run_action(Action("filter_proteins", {"min_valid_fraction": 0.7}, "filter"),
                          Objective("O0", "preparation", "prep"), {}, "rules")
    first = eng.records[0]
    assert first.verdict == "revise" and not first.gates[0].passed
    assert rec.round == 1 and rec.args["min_valid_fraction"] == 0.5
    assert rec.result.dataset.n_proteins > first.result.dataset.n_proteins
    rev = [e for e in eng.log.events if e["event"] == "revision"]
    assert rev and "relax" in rev[0]["chosen"]


def test_run_log_and_replay_reproduce_findings(tmp_path):
    from lmfuse.proteus.run import replay

    c, res, out = planted(session_seed())
    lines = [json.loads(l) for l in open(f"{out}/run_log.jsonl")]
    kinds = {e["event"] for e in lines}
    assert {"run_start", "objective", "plan", "step", "hypothesis", "run_end"} <= kinds
    steps = [e for e in lines if e["event"] == "step"]
    assert [s["id"] for s in steps] == [s["id"] for s in res.findings["steps"]]
    original = open(f"{out}/findings.json").read()
    again = replay(out, c.dataset, gene_sets=c.gene_sets, truth=c.truth, out=tmp_path / "replayed")
    assert (tmp_path / "replayed" / "findings.json").read_text() == original
    assert again.findings["hypotheses"] == res.findings["hypotheses"]
    # every artifact of the original run is reproduced with the same hash
    arts = {h for s in res.findings["steps"] for h in s["artifacts"].values()}
    assert arts and arts == {h for s in again.findings["steps"] for h in s["artifacts"].values()}
    with pytest.raises(ValueError, match="fingerprint"):
        replay(out, c.dataset.with_X(c.dataset.X + 1.0, "shifted"), gene_sets=c.gene_sets)


def test_robustness_gate_marks_hits(small):
    _, res, _ = planted(session_seed())
    da = next(s for s in res.findings["steps"] if s["tool"] == "differential_abundance")
    stab = next(g for g in da["gates"] if g["name"] == "hit_stability")
    assert "re-tests" in stab["note"]
    hits = res.findings["differential"][0]["hits"]
    assert hits and all(h["stability"] >= 0.7 for h in hits)


class _SchemaBackend:
    """A deterministic stand-in model: picks the last allowed option of every enum it is asked
    about and words hypotheses without numbers."""

    name = "schema-bot"

    def __init__(self):
        self.calls = 0

    def chat(self, messages, *, schema=None, **kw):
        self.calls += 1
        props = schema["properties"]
        if "statement" in props:
            return json.dumps({"statement": "A reworded hypothesis that states no number."})
        key = next(iter(props))
        p = props[key]
        if "enum" in p:
            return json.dumps({key: p["enum"][-1]})
        return json.dumps({key: list(reversed(p["items"]["enum"]))[: p["minItems"]]})


def test_llm_run_is_replayed_without_the_llm(small, tmp_path):
    from lmfuse.proteus.run import replay, run

    be = _SchemaBackend()
    res = run(small.dataset, gene_sets=small.gene_sets, llm=be, planner="hybrid", out=tmp_path / "a",
              robustness_subsamples=3)
    assert be.calls > 0 and res.findings["config"]["planner"] == "hybrid"
    da = [s for s in res.findings["steps"] if s["tool"] == "differential_abundance"]
    assert da and all(s["args"]["method"] == "mannwhitney" for s in da)  # the model's choice was used
    assert all(h["text_source"] == "llm" for h in res.findings["hypotheses"])
    again = replay(tmp_path / "a", small.dataset, gene_sets=small.gene_sets, out=tmp_path / "b")
    assert (tmp_path / "b" / "findings.json").read_text() == (tmp_path / "a" / "findings.json").read_text()
    assert again.engine.planner.name == "replay:hybrid"


def test_survival_hits_with_drifting_hazards_are_not_claimed():
    from types import SimpleNamespace

    import pandas as pd

    from lmfuse.proteus.engine import extract_evidence

    tab = pd.DataFrame({"protein": ["P1", "P2", "P3", "P4"], "gene": ["A", "B", "C", "D"],
                        "hazard_ratio": [2.0, 0.5, 1.8, 1.1], "p": [1e-5, 2e-5, 3e-5, 0.3],
                        "q": [0.001, 0.001, 0.001, 0.6], "ph_p": [0.4, 0.004, np.nan, np.nan]})
    ev = extract_evidence("survival_cox", SimpleNamespace(args={"fdr": 0.05}, tables={"cox": tab}), 0.05)
    assert [r["protein"] for r in ev["rows"]] == ["P1", "P3"]
    assert ev["excluded_nonproportional"] == ["P2"]
    assert ev["rows"][0]["ph_p"] == 0.4 and ev["rows"][1]["ph_p"] is None
