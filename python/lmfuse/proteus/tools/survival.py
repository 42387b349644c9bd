"""Survival tools: per-protein Cox screening, Kaplan–Meier / log-rank by a protein's median split."""

from __future__ import annotations

from typing import Literal

import numpy as np
import pandas as pd
from pydantic import Field

from ..data import ProteomicsDataset, event_indicator
from ..stats.multitest import bh
from ..stats.survival import concordance_index, cox_fit, cox_global_permutation_p, kaplan_meier, logrank, ph_test
from .registry import ToolArgs, Finding, ToolContext, ToolResult, figure, png, tool


def _surv(ds: ProteomicsDataset):
    p = ds.profile()
    if not p.survival:
        raise ValueError("the data set has no survival time/event columns (roles 'time' and 'event')")
    t = ds.column(p.survival["time"]).numeric()
    e = event_indicator(ds.column(p.survival["event"]))
    return t, e, p.survival


class CoxArgs(ToolArgs):
    covariates: list[str] = Field(default_factory=list, description="numeric covariates added to every model",
                                  json_schema_extra={"narrow": "covariates"})
    fdr: Literal[0.01, 0.05, 0.1] = 0.05
    standardize: bool = Field(True, description="hazard ratio per standard deviation of the protein")
    min_observed: float = Field(0.5, ge=0.1, le=1.0, description="fraction of samples a protein must be observed in to be tested")


@tool(name="survival_cox", level="analysis", args_model=CoxArgs,
      summary="Screen every protein for association with survival (Cox proportional hazards, Efron ties, BH FDR)",
      requires=["survival"], produces=["protein_table", "findings"], follow_ups=["survival_km", "gsea_prerank"])
def survival_cox(ds: ProteomicsDataset, a: CoxArgs, ctx: ToolContext) -> ToolResult:
    t, e, cols = _surv(ds)
    covs = []
    for c in a.covariates:
        col = ds.column(c)
        if col.kind == "categorical":
            raise ValueError(f"survival_cox: covariate {c!r} is categorical with >2 levels; use a numeric or binary column")
        covs.append(col.numeric())
    ok = ~np.isnan(t) & ~np.isnan(e)
    for v in covs:
        ok &= ~np.isnan(v)
    X = ds.X[:, ok]
    C = np.column_stack(covs)[ok] if covs else np.zeros((int(ok.sum()), 0))
    obs = ~np.isnan(X)
    test = obs.mean(1) >= a.min_observed
    P = ds.n_proteins
    coef, se, p = np.full(P, np.nan), np.full(P, np.nan), np.full(P, np.nan)
    nconv = 0
    # proteins are fitted on their observed samples, batched by missingness pattern
    pats, inv = np.unique(obs[test], axis=0, return_inverse=True)
    rows_all = np.flatnonzero(test)
    inv = np.asarray(inv).ravel()
    for k, pat in enumerate(pats):
        rows = rows_all[inv == k]
        if e[ok][pat].sum() < 2:
            continue
        Xp = X[np.ix_(rows, np.flatnonzero(pat))]
        if a.standardize:
            sd = Xp.std(1, ddof=1, keepdims=True)
            Xp = (Xp - Xp.mean(1, keepdims=True)) / np.where(sd > 0, sd, 1)
        Cp = C[pat]
        B = np.concatenate([Xp[:, :, None], np.broadcast_to(Cp, (rows.size,) + Cp.shape)], axis=2)
        res = cox_fit(B, t[ok][pat], e[ok][pat])
        coef[rows], se[rows], p[rows] = res.coef[:, 0], res.se[:, 0], res.p[:, 0]
        nconv += int((~res.converged).sum())
    q = bh(p)
    tab = pd.DataFrame({"protein": ds.protein_ids, "gene": ds.genes, "log_hr": coef, "hazard_ratio": np.exp(coef),
                        "se": se, "p": p, "q": q})
    tab = tab.sort_values(["p", "protein"], na_position="last", kind="mergesort").reset_index(drop=True)
    sig = tab[tab.q <= a.fdr]
    findings = [Finding(entity=f"protein:{x.protein}", gene=x.gene,
                        relation="associated_with_risk" if x.log_hr > 0 else "associated_with_protection",
                        object="survival", direction="up" if x.log_hr > 0 else "down", effect=float(x.log_hr),
                        statistic={"hazard_ratio": float(x.hazard_ratio)}, p=float(x.p), q=float(x.q), tool="survival_cox")
                for x in sig.itertuples()]
    # proportional-hazards check (Schoenfeld residuals vs event-time rank) for up to 20 hits
    ph = {}
    for x in sig.head(20).itertuples():
        i = ds.protein_ids.index(x.protein)
        m = ~np.isnan(X[i])
        xi = X[i, m]
        if a.standardize:
            xi = (xi - xi.mean()) / (xi.std(ddof=1) or 1.0)
        ph[x.protein] = ph_test(xi, t[ok][m], e[ok][m], x.log_hr)[1]
    tab["ph_p"] = tab.protein.map(ph)
    n_ev = int(e[ok].sum())
    # the step's global test (the engine's gate): max |r| of the proteins with the log-rank scores
    # against permutations of the (time, event) pairs, which keep the correlation between proteins
    # (covariates not included)
    gp, gstat = (cox_global_permutation_p(X[test], t[ok], e[ok], seed=ctx.seed) if n_ev >= 2 and test.any()
                 else (float("nan"), float("nan")))
    r = ToolResult(tool="survival_cox", args=a.model_dump(), tables={"cox": tab}, findings=findings,
                   summary={"n_tested": int(test.sum()), "n_significant": len(sig), "n_events": n_ev,
                            "top": [{"protein": x.protein, "gene": x.gene, "hazard_ratio": round(float(x.hazard_ratio), 3)}
                                    for x in sig.head(10).itertuples()]},
                   diagnostics={"n_samples": int(ok.sum()), "n_events": n_ev, "time_column": cols["time"],
                                "event_column": cols["event"], "not_converged": nconv,
                                "ph_min_p": min(ph.values()) if ph else None,
                                "global_permutation_p": gp, "global_max_abs_r": gstat})
    if n_ev < 10:
        r.warnings.append(f"only {n_ev} events")
    return r


class KMArgs(ToolArgs):
    protein: str = Field(description="protein id split at its median", json_schema_extra={"narrow": "protein"})


@tool(name="survival_km", level="analysis", args_model=KMArgs,
      summary="Kaplan–Meier curves and log-rank test for samples above vs below a protein's median",
      requires=["survival"], produces=["figure", "statistic"], follow_ups=[])
def survival_km(ds: ProteomicsDataset, a: KMArgs, ctx: ToolContext) -> ToolResult:
    t, e, cols = _surv(ds)
    x = ds.X[ds.protein_ids.index(a.protein)]
    ok = ~np.isnan(t) & ~np.isnan(e) & ~np.isnan(x)
    hi = x[ok] > np.median(x[ok])
    grp = np.where(hi, "high", "low")
    chi2, p, _, O, E = logrank(t[ok], e[ok], grp)
    cidx = concordance_index(t[ok], x[ok], e[ok])
    rows = []
    figs = {}
    if ctx.figures:
        fig, ax = figure()
    for lab in ("high", "low"):
        m = grp == lab
        ut, S, nr, d = kaplan_meier(t[ok][m], e[ok][m])
        rows += [{"group": lab, "time": u, "survival": s, "at_risk": int(n), "events": int(dd)} for u, s, n, dd in zip(ut, S, nr, d)]
        if ctx.figures:
            ax.step(np.r_[0, ut], np.r_[1, S], where="post", label=f"{lab} (n={m.sum()})")
    if ctx.figures:
        ax.set_xlabel(cols["time"])
        ax.set_ylabel("survival")
        ax.legend(fontsize=7)
        figs["km"] = png(fig)
    gene = ds.genes[ds.protein_ids.index(a.protein)]
    direction = "up" if O[0] > E[0] else "down"  # levels sorted: 'high' first
    f = Finding(entity=f"protein:{a.protein}", gene=gene,
                relation="associated_with_risk" if direction == "up" else "associated_with_protection",
                object="survival", direction=direction, statistic={"chi2": chi2, "c_index": cidx}, p=p, q=None,
                tool="survival_km")
    return ToolResult(tool="survival_km", args=a.model_dump(), tables={"km": pd.DataFrame(rows)}, figures=figs,
                      findings=[f] if p < 0.05 else [], summary={"protein": a.protein, "gene": gene, "logrank_p": p, "c_index": cidx},
                      diagnostics={"observed": O.tolist(), "expected": E.tolist(), "chi2": chi2})
