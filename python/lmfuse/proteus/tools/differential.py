"""Differential abundance: moderated t (limma-style eBayes), Welch, rank test; multi-group
moderated F; covariate-adjusted designs."""

from __future__ import annotations

import warnings
from typing import Literal

import numpy as np
import pandas as pd
from pydantic import Field

from ..data import ProteomicsDataset
from ..stats.limma import lm_fit, moderated_f, moderated_t
from ..stats.multitest import bh
from ..stats.tests import mann_whitney, welch
from .registry import ToolArgs, Finding, ToolContext, ToolResult, figure, png, tool


def design_matrix(ds: ProteomicsDataset, group_column: str, levels: list[str], covariates: list[str] = ()):
    """Cell-means design for ``levels`` of ``group_column`` plus covariates (numeric: centred;
    categorical: treatment dummies, first sorted level dropped). Samples with a missing value in
    any used column are dropped. Returns (D [n_used, k], names, sample_index)."""
    g = ds.column(group_column).values
    keep = np.array([v in levels for v in g])
    covs = []
    for c in covariates:
        if c == group_column:
            raise ValueError(f"covariate {c!r} is the group column")
        col = ds.column(c)
        if col.kind == "numeric":
            v = col.numeric()
            keep &= ~np.isnan(v)
        else:
            keep &= np.array([x is not None for x in col.values])
        covs.append(col)
    idx = np.flatnonzero(keep)
    cols, names = [], []
    for l in levels:
        cols.append((g[idx] == l).astype(float))
        names.append(f"{group_column}={l}")
    for col in covs:
        if col.kind == "numeric":
            v = col.numeric()[idx]
            cols.append(v - v.mean())
            names.append(col.name)
        else:
            lv = sorted({x for x in col.values[idx]})
            for l in lv[1:]:
                cols.append((col.values[idx] == l).astype(float))
                names.append(f"{col.name}={l}")
    D = np.column_stack(cols) if cols else np.zeros((idx.size, 0))
    if np.linalg.matrix_rank(D) < D.shape[1]:
        raise ValueError(f"design for {group_column!r} with covariates {list(covariates)} is rank-deficient "
                         "(a covariate is confounded with the groups)")
    return D, names, idx


def differential(ds: ProteomicsDataset, group_column: str, case: str, control: str, *, covariates=(),
                 method: str = "moderated_t", fit_on: str = "contrast_groups", min_per_group: int = 2):
    """Per-protein case-vs-control statistics. Returns (table, diagnostics); table columns:
    protein, gene, log2fc (case − control), t, p, q, mean_case, mean_control, n_case, n_control."""
    g = ds.column(group_column).values
    lv_all = [l for l in ds.column(group_column).levels()]
    for name, l in (("case", case), ("control", control)):
        if l not in lv_all:
            raise ValueError(f"{name} level {l!r} is not a level of column {group_column!r}; levels: {lv_all}")
    if case == control:
        raise ValueError("case and control must differ")
    a, b = g == case, g == control
    if a.sum() == 0 or b.sum() == 0:
        raise ValueError(f"empty group: {group_column!r}={case if a.sum() == 0 else control!r} has no samples")
    X = ds.X
    na, nb = (~np.isnan(X[:, a])).sum(1), (~np.isnan(X[:, b])).sum(1)
    testable = (na >= min_per_group) & (nb >= min_per_group)
    with np.errstate(all="ignore"), warnings.catch_warnings():
        warnings.simplefilter("ignore", RuntimeWarning)  # all-missing rows: mean NaN
        mean_a = np.nanmean(X[:, a], 1)
        mean_b = np.nanmean(X[:, b], 1)
    diag: dict = {"n_case": int(a.sum()), "n_control": int(b.sum()), "method": method}
    if method == "moderated_t":
        levels = [case, control] if fit_on == "contrast_groups" else [l for l in lv_all]
        D, names, idx = design_matrix(ds, group_column, levels, list(covariates))
        Y = X[:, idx]
        fit = lm_fit(np.where(testable[:, None], Y, np.nan), D, names)
        c = np.zeros(D.shape[1])
        c[levels.index(case)], c[levels.index(control)] = 1.0, -1.0
        r = moderated_t(fit, c)
        lfc, t, p = r.estimate, r.t, r.p
        diag.update(prior_d0=r.d0, prior_s0sq=r.s0sq, design=names, n_fit_samples=int(idx.size))
    elif method in ("welch", "mannwhitney"):
        if covariates:
            raise ValueError(f"method {method!r} does not take covariates; use 'moderated_t'")
        if method == "welch":
            t, p, lfc = welch(X[:, a], X[:, b])
        else:
            t, p, _ = mann_whitney(X[:, a], X[:, b])
            lfc = mean_a - mean_b
    else:
        raise ValueError(f"method must be 'moderated_t', 'welch' or 'mannwhitney', got {method!r}")
    p = np.where(testable, p, np.nan)
    q = bh(p)
    tab = pd.DataFrame({"protein": ds.protein_ids, "gene": ds.genes, "log2fc": lfc, "t": t, "p": p, "q": q,
                        "mean_case": mean_a, "mean_control": mean_b, "n_case": na, "n_control": nb})
    tab = tab.sort_values(["p", "protein"], na_position="last", kind="mergesort").reset_index(drop=True)
    pv = p[~np.isnan(p)]
    diag["n_tested"] = int(pv.size)
    diag["pi0"] = float(min(1.0, 2 * np.mean(pv > 0.5))) if pv.size else None
    diag["p_histogram"] = np.histogram(pv, bins=10, range=(0, 1))[0].tolist() if pv.size else []
    return tab, diag


class DifferentialArgs(ToolArgs):
    group_column: str = Field(description="sample-metadata column defining the groups", json_schema_extra={"narrow": "group_column"})
    case: str = Field(description="level compared against control", json_schema_extra={"narrow": "level"})
    control: str = Field(description="reference level", json_schema_extra={"narrow": "level"})
    covariates: list[str] = Field(default_factory=list, description="adjust for these columns (moderated_t only)",
                                  json_schema_extra={"narrow": "covariates"})
    method: Literal["moderated_t", "welch", "mannwhitney"] = "moderated_t"
    fdr: Literal[0.01, 0.05, 0.1] = 0.05
    min_abs_log2fc: Literal[0.0, 0.5, 1.0] = 0.0
    fit_on: Literal["contrast_groups", "all_groups"] = Field(
        "contrast_groups", description="fit the model on the two groups only or on all levels (more df)")
    min_per_group: int = Field(2, ge=2, le=10, description="observed values needed in each group to test a protein")


def _volcano(tab, fdr, title):
    fig, ax = figure()
    sig = (tab.q <= fdr).to_numpy()
    ax.scatter(tab.log2fc[~sig], -np.log10(tab.p[~sig]), s=6, c="0.6")
    ax.scatter(tab.log2fc[sig], -np.log10(tab.p[sig]), s=8, c="C3")
    for _, r in tab[sig].head(10).iterrows():
        ax.annotate(r.gene or r.protein, (r.log2fc, -np.log10(r.p)), fontsize=6)
    ax.set_xlabel("log2 fold change")
    ax.set_ylabel("-log10 p")
    ax.set_title(title, fontsize=9)
    return png(fig)


@tool(name="differential_abundance", level="analysis", args_model=DifferentialArgs,
      summary="Compare protein abundance between two groups (moderated t / Welch / rank test, BH FDR)",
      requires=["group"], produces=["protein_table", "findings"],
      follow_ups=["enrichment_ora", "gsea_prerank", "coabundance_modules"])
def differential_abundance(ds: ProteomicsDataset, a: DifferentialArgs, ctx: ToolContext) -> ToolResult:
    if a.case == a.control:
        raise ValueError("differential_abundance: arguments 'case' and 'control' must differ")
    tab, diag = differential(ds, a.group_column, a.case, a.control, covariates=a.covariates, method=a.method,
                             fit_on=a.fit_on, min_per_group=a.min_per_group)
    obj = f"group:{a.group_column}={a.case} vs {a.control}"
    sig = tab[(tab.q <= a.fdr) & (tab.log2fc.abs() >= a.min_abs_log2fc)]
    findings = [Finding(entity=f"protein:{r.protein}", gene=r.gene, relation="higher_in" if r.log2fc > 0 else "lower_in",
                        object=obj, direction="up" if r.log2fc > 0 else "down", effect=float(r.log2fc),
                        statistic={"t": float(r.t)}, p=float(r.p), q=float(r.q), tool="differential_abundance")
                for r in sig.itertuples()]
    diag.update(n_significant=len(sig), n_up=int((sig.log2fc > 0).sum()), n_down=int((sig.log2fc < 0).sum()))
    top = [{"protein": r.protein, "gene": r.gene, "log2fc": round(float(r.log2fc), 3), "q": float(r.q)} for r in sig.head(10).itertuples()]
    res = ToolResult(tool="differential_abundance", args=a.model_dump(), tables={"differential": tab},
                     summary={"contrast": obj, "n_tested": diag["n_tested"], "n_significant": len(sig),
                              "n_up": diag["n_up"], "n_down": diag["n_down"], "top": top},
                     findings=findings, diagnostics=diag)
    if diag["n_case"] < 3 or diag["n_control"] < 3:
        res.warnings.append(f"small groups: {diag['n_case']} case vs {diag['n_control']} control samples")
    if ctx.figures:
        res.figures["volcano"] = _volcano(tab.dropna(subset=["p"]), a.fdr, obj)
    return res


class MultiGroupArgs(ToolArgs):
    group_column: str = Field(description="column whose levels are compared jointly", json_schema_extra={"narrow": "group_column"})
    covariates: list[str] = Field(default_factory=list, json_schema_extra={"narrow": "covariates"})
    fdr: Literal[0.01, 0.05, 0.1] = 0.05
    min_per_group: int = Field(2, ge=1, le=10)


@tool(name="multigroup_anova", level="analysis", args_model=MultiGroupArgs,
      summary="Test every protein for any difference among all levels of a group column (moderated F, BH FDR)",
      requires=["group"], produces=["protein_table", "findings"], follow_ups=["differential_abundance", "enrichment_ora"])
def multigroup_anova(ds: ProteomicsDataset, a: MultiGroupArgs, ctx: ToolContext) -> ToolResult:
    col = ds.column(a.group_column)
    lv = [l for l, n in col.levels().items() if n > 0]
    D, names, idx = design_matrix(ds, a.group_column, lv, a.covariates)
    Y = ds.X[:, idx]
    g = col.values[idx]
    ok = np.all([(~np.isnan(Y[:, g == l])).sum(1) >= a.min_per_group for l in lv], axis=0)
    fit = lm_fit(np.where(ok[:, None], Y, np.nan), D, names)
    C = np.zeros((D.shape[1], len(lv) - 1))
    for j in range(1, len(lv)):
        C[0, j - 1], C[j, j - 1] = -1.0, 1.0
    F, p, df1, df2 = moderated_f(fit, C)
    p = np.where(ok, p, np.nan)
    q = bh(p)
    with np.errstate(all="ignore"), warnings.catch_warnings():
        warnings.simplefilter("ignore", RuntimeWarning)
        means = {f"mean_{l}": np.nanmean(Y[:, g == l], 1) for l in lv}
    tab = pd.DataFrame({"protein": ds.protein_ids, "gene": ds.genes, "F": F, "p": p, "q": q, **means})
    tab = tab.sort_values(["p", "protein"], na_position="last", kind="mergesort").reset_index(drop=True)
    sig = tab[tab.q <= a.fdr]
    obj = f"group:{a.group_column}"
    findings = [Finding(entity=f"protein:{r.protein}", gene=r.gene, relation="differs_between", object=obj,
                        statistic={"F": float(r.F)}, p=float(r.p), q=float(r.q), tool="multigroup_anova")
                for r in sig.itertuples()]
    return ToolResult(tool="multigroup_anova", args=a.model_dump(), tables={"anova": tab},
                      summary={"column": a.group_column, "levels": lv, "n_tested": int(np.sum(~np.isnan(p))),
                               "n_significant": len(sig), "top": sig.protein.head(10).tolist()},
                      findings=findings, diagnostics={"df1": df1, "levels": lv, "n_fit_samples": int(idx.size)})
