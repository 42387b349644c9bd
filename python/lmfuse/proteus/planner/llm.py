"""Planners that use a language model: :class:`LLMPlanner` (the model chooses objectives and
writes each workflow's analysis action under a JSON schema narrowed to the data set) and
:class:`HybridPlanner` (the rule planner enumerates valid candidates, the model chooses among
them). Every reply is parsed as data and validated; an invalid reply is retried once, then the
rule planner decides. The model never decides acceptance: it only picks among the revisions the
quality gates suggest. Exchanges are kept in ``transcript`` (written to the run log).
"""

from __future__ import annotations

import json

from ..llm.backend import LLMError, ask_json
from .base import Action, Objective, Revision
from .rules import RuleBasedPlanner

SYSTEM = ("You plan proteomics data analyses. Choose only among the options the schema allows. "
          "Reply with one JSON object.")


def _profile_text(profile) -> str:
    cols = [f"{c.name} ({c.role}, {c.kind}{', levels ' + str(c.levels) if c.levels else ''})" for c in profile.columns]
    return (f"Data set: {profile.n_proteins} proteins x {profile.n_samples} samples, "
            f"{profile.missing_fraction:.0%} missing values. Sample columns: " + "; ".join(cols[:12]))


class _LLMBase:
    def __init__(self, backend, rules: RuleBasedPlanner | None = None):
        if not hasattr(backend, "chat"):
            raise TypeError(f"backend must have .chat(), got {type(backend).__name__}")
        self.backend = backend
        self.rules = rules or RuleBasedPlanner()
        self.transcript: list[dict] = []
        self.fallbacks = 0

    def _ask(self, prompt: str, schema: dict):
        msgs = [{"role": "system", "content": SYSTEM}, {"role": "user", "content": prompt}]
        try:
            return ask_json(self.backend, msgs, schema, transcript=self.transcript)
        except LLMError:
            self.fallbacks += 1
            return None

    def preprocessing(self, profile) -> list[Action]:
        return self.rules.preprocessing(profile)

    def objectives(self, profile, *, gene_sets: bool = False) -> list[Objective]:
        cands = self.rules.candidate_objectives(profile, gene_sets=gene_sets)
        default = self.rules.objectives(profile, gene_sets=gene_sets)
        n = len(default)
        if len(cands) <= n or n == 0:
            return default
        titles = [o.title for o in cands]
        schema = {"type": "object", "required": ["objectives"], "additionalProperties": False,
                  "properties": {"objectives": {"type": "array", "items": {"enum": titles}, "minItems": n,
                                                "maxItems": n, "uniqueItems": True}}}
        reply = self._ask(_profile_text(profile) + f"\nChoose the {n} most informative research objectives.", schema)
        if reply is None:
            return default
        chosen = [next(o for o in cands if o.title == t) for t in reply["objectives"]]
        for i, o in enumerate(chosen, 1):
            o.id = f"O{i}"
        return chosen

    def revise(self, objective: Objective, failed: dict, suggestions: list[Revision]) -> Revision | None:
        if len(suggestions) <= 1:
            return suggestions[0] if suggestions else None
        reasons = [s.reason for s in suggestions]
        gates = [g for g in failed.get("gates", []) if not g["passed"]]
        schema = {"type": "object", "required": ["revision"], "additionalProperties": False,
                  "properties": {"revision": {"enum": reasons}}}
        reply = self._ask(f"Objective: {objective.title}. Step {failed['tool']} failed the quality gates "
                          f"{json.dumps(gates)}. Choose a revision.", schema)
        if reply is None:
            return suggestions[0]
        return suggestions[reasons.index(reply["revision"])]


def _valid_for(action: Action, profile) -> bool:
    a = action.args
    col = a.get("group_column")
    if col is not None and {"case", "control"} <= set(a):
        levels = profile.levels_of(col) if col in profile.group_columns else []
        return a["case"] in levels and a["control"] in levels and a["case"] != a["control"]
    return True


class HybridPlanner(_LLMBase):
    """Rules propose every valid variant of each analysis step (e.g. the test used for a
    comparison); the model picks one by name. Follow-up steps come from the rule template."""

    name = "hybrid"

    def variants(self, action: Action, profile) -> list[Action]:
        if action.tool == "differential_abundance":
            out = []
            for m in ("moderated_t", "welch", "mannwhitney"):
                out.append(Action(action.tool, {**action.args, "method": m}, action.name, action.uses, action.purpose))
            return out
        if action.tool == "cluster_samples":
            return [Action(action.tool, {**action.args, "method": m}, action.name, action.uses, action.purpose)
                    for m in ("kmeans", "hierarchical")]
        return [action]

    def workflow(self, objective: Objective, profile, *, gene_sets: bool = False) -> list[Action]:
        acts = []
        for act in self.rules.workflow(objective, profile, gene_sets=gene_sets):
            cands = self.variants(act, profile)
            if len(cands) > 1:
                labels = [f"{c.tool} method={c.args.get('method')}" for c in cands]
                schema = {"type": "object", "required": ["choice"], "additionalProperties": False,
                          "properties": {"choice": {"enum": labels}}}
                reply = self._ask(_profile_text(profile) + f"\nObjective: {objective.title}. Which analysis fits best?",
                                  schema)
                act = cands[labels.index(reply["choice"])] if reply else act
            acts.append(act)
        return acts


class LLMPlanner(_LLMBase):
    """The model writes each workflow's first analysis action (tool + arguments) under a schema
    whose alternatives are the data set's valid tool calls; follow-ups come from the rule
    template. An action that does not fit the data falls back to the rule template's action."""

    name = "llm"

    def _schema(self, profile, tools: list[str]) -> dict:
        from ..tools.registry import narrowed_schema

        alts = []
        for t in tools:
            alts.append({"type": "object", "required": ["tool", "args"], "additionalProperties": False,
                         "properties": {"tool": {"const": t}, "args": narrowed_schema(t, profile)}})
        return {"oneOf": alts}

    def workflow(self, objective: Objective, profile, *, gene_sets: bool = False) -> list[Action]:
        template = self.rules.workflow(objective, profile, gene_sets=gene_sets)
        first = template[0]
        tools = {"group_comparison": ["differential_abundance", "multigroup_anova"],
                 "subtypes": ["cluster_samples"], "survival": ["survival_cox"],
                 "clinical_correlation": ["correlate_clinical"]}.get(objective.kind, [first.tool])
        from .rules import tool_exists

        tools = [t for t in tools if tool_exists(t)]
        reply = self._ask(_profile_text(profile) + f"\nObjective: {objective.title} ({json.dumps(objective.params)})."
                          f"\nExample action: {json.dumps({'tool': first.tool, 'args': first.args})}"
                          "\nWrite the analysis action.", self._schema(profile, tools))
        if reply is not None:
            act = Action(reply["tool"], reply["args"], first.name, None, "")
            if act.tool == first.tool and _valid_for(act, profile):
                return [act] + template[1:]
            self.fallbacks += 1
        return template
