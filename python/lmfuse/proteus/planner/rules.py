"""The deterministic rule-based planner (the default; no language model).

Objectives follow from the data profile's affordances: a group comparison per candidate contrast
of the primary group column (up to ``max_contrasts``), subtype discovery when there are >= 20
samples, survival biomarkers when survival time and event columns exist, and correlation with up
to ``max_covariates`` numeric clinical covariates. Each objective has a fixed workflow template;
arguments are taken from the profile and passed through :func:`fit_args`, which keeps only the
fields the tool's argument model declares (so a template never sends an unknown argument).
"""

from __future__ import annotations

from .base import Action, Objective, Revision

PREPROCESS = ("qc_summary", "filter_proteins", "normalize", "impute")


def fit_args(tool: str, **wanted) -> dict:
    """``wanted`` restricted to the argument fields of ``tool`` (None values dropped)."""
    from ..tools.registry import get_tool

    fields = get_tool(tool).args_model.model_fields
    return {k: v for k, v in wanted.items() if k in fields and v is not None}


def tool_exists(tool: str) -> bool:
    from ..tools.registry import get_tool

    try:
        get_tool(tool)
        return True
    except KeyError:
        return False


class RuleBasedPlanner:
    """Deterministic planning from the profile. ``fdr``: the FDR used by analysis steps;
    ``max_contrasts`` / ``max_covariates``: caps on the number of objectives."""

    name = "rules"

    def __init__(self, *, fdr: float = 0.05, max_contrasts: int = 4, max_covariates: int = 2,
                 subtypes: bool = True):
        self.fdr, self.max_contrasts, self.max_covariates, self.subtypes = fdr, max_contrasts, max_covariates, subtypes

    # ------------------------------------------------------------------ objectives
    def candidate_objectives(self, profile, *, gene_sets: bool = False) -> list[Objective]:
        """Every objective the data affords, in a fixed order."""
        out: list[Objective] = []
        for col, case, ctrl in profile.contrasts:
            out.append(Objective("", "group_comparison", f"Proteins that differ between {case} and {ctrl} ({col})",
                                 {"column": col, "case": case, "control": ctrl},
                                 "a group column with >= 3 samples per level"))
        if self.subtypes and profile.n_samples >= 20:
            out.append(Objective("", "subtypes", "Robust sample subtypes and the proteins that define them", {},
                                 f"{profile.n_samples} samples (>= 20)"))
        if profile.survival:
            out.append(Objective("", "survival", "Proteins associated with survival", dict(profile.survival),
                                 f"survival columns with {profile.n_events} events"))
        for cov in profile.numeric_covariates:
            out.append(Objective("", "clinical_correlation", f"Proteins that correlate with {cov}",
                                 {"covariate": cov}, "a numeric clinical covariate"))
        return out

    def objectives(self, profile, *, gene_sets: bool = False) -> list[Objective]:
        cands = self.candidate_objectives(profile, gene_sets=gene_sets)
        chosen, n_cmp, n_cov = [], 0, 0
        primary = profile.primary_group
        for o in cands:
            if o.kind == "group_comparison":
                if o.params["column"] != primary or n_cmp >= self.max_contrasts:
                    continue
                n_cmp += 1
            if o.kind == "clinical_correlation":
                if n_cov >= self.max_covariates:
                    continue
                n_cov += 1
            chosen.append(o)
        for i, o in enumerate(chosen, 1):
            o.id = f"O{i}"
        return chosen

    # ------------------------------------------------------------------ workflows
    def preprocessing(self, profile) -> list[Action]:
        """The shared data preparation (objective ``O0``)."""
        acts = []
        if tool_exists("qc_summary"):
            acts.append(Action("qc_summary", fit_args("qc_summary", color_by=profile.primary_group), "qc"))
        acts.append(Action("filter_proteins", fit_args("filter_proteins", min_valid_fraction=0.7,
                                                       group_column=profile.primary_group), "filter"))
        acts.append(Action("normalize", fit_args("normalize", method="median"), "normalize"))
        if profile.missing_fraction > 0:
            acts.append(Action("impute", fit_args("impute", method="minprob"), "impute"))
        return acts

    def workflow(self, objective: Objective, profile, *, gene_sets: bool = False) -> list[Action]:
        p, fdr = objective.params, self.fdr
        if objective.kind == "group_comparison":
            acts = [Action("differential_abundance",
                           fit_args("differential_abundance", group_column=p["column"], case=p["case"],
                                    control=p["control"], method="moderated_t", fdr=fdr), "da")]
            if gene_sets:
                if tool_exists("gsea_prerank"):
                    acts.append(Action("gsea_prerank", fit_args("gsea_prerank", fdr=0.05), "gsea", uses="da"))
                if tool_exists("enrichment_ora"):
                    acts.append(Action("enrichment_ora", fit_args("enrichment_ora", fdr=fdr, set_fdr=0.05), "ora",
                                       uses="da"))
            return acts
        if objective.kind == "subtypes":
            return [Action("cluster_samples", fit_args("cluster_samples", k_min=2, k_max=6), "cluster")]
        if objective.kind == "survival":
            return [Action("survival_cox", fit_args("survival_cox", fdr=fdr), "cox")]
        if objective.kind == "clinical_correlation":
            return [Action("correlate_clinical", fit_args("correlate_clinical", variable=p["covariate"], fdr=fdr), "corr")]
        raise ValueError(f"unknown objective kind {objective.kind!r}")

    # ------------------------------------------------------------------ refinement
    def revise(self, objective: Objective, failed: dict, suggestions: list[Revision]) -> Revision | None:
        """The first suggestion the gates made (they are ordered by preference)."""
        return suggestions[0] if suggestions else None
