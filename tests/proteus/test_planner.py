"""PROTEUS planners: rule objectives and workflows from the data profile (every action valid for
the tool registry), the hybrid and LLM planners with scripted replies, and their fallback."""

import json

import pytest

from lmfuse.proteus.llm import LLMError, ReplayBackend
from lmfuse.proteus.planner import HybridPlanner, LLMPlanner, Objective, Revision, RuleBasedPlanner, Action
from lmfuse.proteus.synth import make_cohort
from lmfuse.proteus.tools import get_tool


@pytest.fixture(scope="module")
def profile():
    return make_cohort(seed=3, n_samples=30, n_proteins=120, n_pathways=20).dataset.profile()


def _valid(action, profile):
    spec = get_tool(action.tool)
    args = {k: v for k, v in action.args.items() if k != "from_step"}
    spec.args_model.model_validate(args)
    return True


def test_rule_objectives_follow_affordances(profile):
    pl = RuleBasedPlanner()
    objs = pl.objectives(profile, gene_sets=True)
    kinds = [o.kind for o in objs]
    assert kinds == ["group_comparison", "subtypes", "survival", "clinical_correlation"]
    assert objs[0].params == {"column": "group", "case": "case", "control": "control"}
    assert [o.id for o in objs] == ["O1", "O2", "O3", "O4"]
    # no survival columns, few samples: those objectives disappear
    small = profile.model_copy(update={"survival": None, "n_samples": 12, "numeric_covariates": []})
    assert [o.kind for o in pl.objectives(small)] == ["group_comparison"]


def test_rule_workflows_are_valid_tool_calls(profile):
    pl = RuleBasedPlanner()
    for a in pl.preprocessing(profile):
        assert _valid(a, profile)
    for o in pl.objectives(profile, gene_sets=True):
        acts = pl.workflow(o, profile, gene_sets=True)
        assert acts and all(_valid(a, profile) for a in acts)
        names = {a.name for a in acts}
        assert all(a.uses is None or a.uses in names for a in acts)
    da = pl.workflow(pl.objectives(profile)[0], profile, gene_sets=False)
    assert [a.tool for a in da] == ["differential_abundance"]  # no gene sets, no enrichment


def test_hybrid_planner_chooses_among_rule_candidates(profile):
    be = ReplayBackend([{"choice": "differential_abundance method=welch"}])
    pl = HybridPlanner(be)
    o = RuleBasedPlanner().objectives(profile)[0]
    acts = pl.workflow(o, profile)
    assert acts[0].args["method"] == "welch"
    # the model only saw valid candidates, as an enum
    enum = be.calls[0]["schema"]["properties"]["choice"]["enum"]
    assert enum == [f"differential_abundance method={m}" for m in ("moderated_t", "welch", "mannwhitney")]


def test_invalid_llm_replies_fall_back_to_rules(profile):
    be = ReplayBackend(['{"choice": "drop table"}', "not json at all"])
    pl = HybridPlanner(be)
    o = RuleBasedPlanner().objectives(profile)[0]
    assert pl.workflow(o, profile)[0].args["method"] == "moderated_t"
    assert pl.fallbacks == 1 and len(pl.transcript) == 2 and pl.transcript[0]["errors"]
    down = HybridPlanner(ReplayBackend([LLMError("endpoint down")]))
    assert down.workflow(o, profile)[0].args["method"] == "moderated_t"


def test_llm_planner_writes_a_schema_valid_action(profile):
    o = RuleBasedPlanner().objectives(profile)[0]
    reply = {"tool": "differential_abundance",
             "args": {"group_column": "group", "case": "case", "control": "control", "method": "welch"}}
    pl = LLMPlanner(ReplayBackend([reply]))
    acts = pl.workflow(o, profile)
    assert acts[0].args["method"] == "welch" and acts[0].tool == "differential_abundance"
    schema = pl.backend.calls[0]["schema"]
    tools = [alt["properties"]["tool"]["const"] for alt in schema["oneOf"]]
    assert "differential_abundance" in tools
    # case == control passes the schema but not the data check: the rule action is used
    bad = {"tool": "differential_abundance", "args": {"group_column": "group", "case": "case", "control": "case"}}
    pl = LLMPlanner(ReplayBackend([bad]))
    assert pl.workflow(o, profile)[0].args["control"] == "control" and pl.fallbacks == 1


def test_llm_objectives_and_revisions(profile):
    rules = RuleBasedPlanner(max_covariates=0)
    cands = rules.candidate_objectives(profile)
    n = len(rules.objectives(profile))
    pick = [cands[-1].title] + [c.title for c in cands[:n - 1]]
    pl = LLMPlanner(ReplayBackend([{"objectives": pick}]), rules)
    objs = pl.objectives(profile)
    assert [o.title for o in objs] == pick and [o.id for o in objs] == [f"O{i}" for i in range(1, n + 1)]
    sugg = [Revision("a", Action("normalize", {"method": "median"})), Revision("b", Action("normalize", {"method": "quantile"}))]
    pl = HybridPlanner(ReplayBackend([{"revision": "b"}]))
    assert pl.revise(Objective("O1", "group_comparison", "t"), {"tool": "x", "gates": []}, sugg).reason == "b"
    assert RuleBasedPlanner().revise(None, {}, sugg).reason == "a"
