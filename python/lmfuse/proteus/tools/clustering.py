"""Sample clustering (subtype discovery): PCA, k-means or hierarchical, k chosen by silhouette,
bootstrap stability, association of clusters with metadata."""

from __future__ import annotations

from typing import Literal

import numpy as np
import pandas as pd
from pydantic import Field
from scipy import stats

from ..data import ProteomicsDataset
from ..stats.cluster import bootstrap_stability, hierarchical, kmeans, pca, silhouette
from .registry import ToolArgs, Finding, ToolContext, ToolResult, figure, png, step_seed, tool


class ClusterArgs(ToolArgs):
    n_features: int = Field(500, ge=10, le=20000, description="most variable complete proteins used")
    n_components: int = Field(10, ge=2, le=50, description="principal components clustered")
    k: int | None = Field(None, ge=2, le=10, description="number of clusters; None = choose by silhouette in k_min..k_max")
    k_min: int = Field(2, ge=2, le=10)
    k_max: int = Field(6, ge=2, le=10)
    method: Literal["kmeans", "hierarchical"] = "kmeans"
    n_boot: int = Field(20, ge=0, le=200, description="bootstrap resamples for the stability ARI")


@tool(name="cluster_samples", level="analysis", args_model=ClusterArgs,
      summary="Find sample subtypes: PCA of variable proteins, k-means/hierarchical clustering, silhouette and bootstrap stability",
      requires=["n>=20"], produces=["sample_labels", "findings"], follow_ups=["differential_abundance"])
def cluster_samples(ds: ProteomicsDataset, a: ClusterArgs, ctx: ToolContext) -> ToolResult:
    X = ds.X[~np.isnan(ds.X).any(1)]
    if X.shape[0] < 10:
        raise ValueError("cluster_samples: fewer than 10 complete proteins; impute first")
    var = X.var(1)
    top = np.argsort(-var, kind="stable")[: a.n_features]
    Z = X[top].T
    Z = (Z - Z.mean(0)) / np.where(Z.std(0) > 0, Z.std(0), 1)
    sc, _, evr = pca(Z, min(a.n_components, Z.shape[0] - 1, Z.shape[1]))
    seed = step_seed(ctx, "cluster")
    ks = [a.k] if a.k else list(range(a.k_min, max(a.k_min, a.k_max) + 1))
    sil = {}
    labels = {}
    for k in ks:
        if k >= ds.n_samples:
            continue
        lab = kmeans(sc, k, seed=seed)[0] if a.method == "kmeans" else hierarchical(sc, k)
        labels[k], sil[k] = lab, silhouette(sc, lab)
    k = max(sil, key=lambda kk: (sil[kk], -kk))
    lab = labels[k]
    stab = bootstrap_stability(sc, k, n_boot=a.n_boot, method=a.method, seed=seed) if a.n_boot else None
    tab = pd.DataFrame({"sample": ds.sample_ids, "cluster": [f"C{l + 1}" for l in lab], "pc1": sc[:, 0], "pc2": sc[:, 1]})
    # association of clusters with categorical columns (chi-square) and numeric ones (Kruskal-Wallis)
    assoc = []
    for name, col in ds.sample_meta.items():
        if col.role in ("id", "subject"):
            continue
        if col.kind == "numeric":
            v = col.numeric()
            groups = [v[(lab == l) & ~np.isnan(v)] for l in np.unique(lab)]
            if sum(g.size > 1 for g in groups) >= 2 and np.unique(v[~np.isnan(v)]).size > 1:
                s, p = stats.kruskal(*[g for g in groups if g.size > 0])
                assoc.append({"column": name, "test": "kruskal", "statistic": float(s), "p": float(p)})
        else:
            ok = np.array([x is not None for x in col.values])
            lv = sorted({x for x in col.values[ok]})
            if len(lv) < 2 or len(lv) > 20:
                continue
            M = np.array([[np.sum((lab[ok] == l) & (col.values[ok] == c)) for c in lv] for l in np.unique(lab)])
            M = M[M.sum(1) > 0][:, M.sum(0) > 0]
            if M.shape[0] > 1 and M.shape[1] > 1:
                s, p, _, _ = stats.chi2_contingency(M)
                assoc.append({"column": name, "test": "chi2", "statistic": float(s), "p": float(p)})
    assoc_tab = pd.DataFrame(assoc, columns=["column", "test", "statistic", "p"])
    findings = []
    robust = sil[k] >= 0.1 and (stab is None or stab >= 0.6)
    if robust:
        for r in assoc_tab.itertuples():
            if r.p < 0.05:
                findings.append(Finding(entity=f"clustering:k={k}", relation="defines_subtype", object=f"column:{r.column}",
                                        statistic={r.test: r.statistic}, p=r.p, tool="cluster_samples"))
    figs = {}
    if ctx.figures:
        fig, ax = figure()
        for l in np.unique(lab):
            ax.scatter(sc[lab == l, 0], sc[lab == l, 1], s=12, label=f"C{l + 1}")
        ax.set_xlabel(f"PC1 ({evr[0]:.0%})")
        ax.set_ylabel(f"PC2 ({evr[1]:.0%})")
        ax.legend(fontsize=7)
        figs["clusters"] = png(fig)
    sizes = {f"C{l + 1}": int((lab == l).sum()) for l in np.unique(lab)}
    return ToolResult(tool="cluster_samples", args=a.model_dump(), tables={"clusters": tab, "association": assoc_tab},
                      figures=figs, findings=findings,
                      summary={"k": k, "silhouette": round(sil[k], 4), "stability_ari": stab, "sizes": sizes, "robust": robust},
                      diagnostics={"silhouette_by_k": {str(kk): v for kk, v in sil.items()}, "stability_ari": stab,
                                   "n_features": int(len(top)), "explained": evr.tolist()})
