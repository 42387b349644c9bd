"""Preprocessing tools: QC summary, protein filtering, normalisation, imputation. Each returns a
new data view in ``ToolResult.dataset``."""

from __future__ import annotations

from typing import Literal

import numpy as np
import pandas as pd
from pydantic import Field

from ..data import ProteomicsDataset
from ..stats.cluster import pca
from ..stats.preprocess import impute_knn, impute_minprob, median_normalize, quantile_normalize, valid_value_mask
from .registry import ToolArgs, ToolContext, ToolResult, figure, png, step_seed, tool


class QCArgs(ToolArgs):
    color_by: str | None = Field(None, description="group column to colour the PCA by", json_schema_extra={"narrow": "group_column"})


@tool(name="qc_summary", level="preprocess", args_model=QCArgs,
      summary="Quality control: missingness per sample and protein, sample medians, PCA of complete proteins, outlier samples",
      requires=[], produces=["sample_table"], follow_ups=["filter_proteins", "normalize"])
def qc_summary(ds: ProteomicsDataset, a: QCArgs, ctx: ToolContext) -> ToolResult:
    X = ds.X
    miss_s = np.isnan(X).mean(0)
    med = np.nanmedian(X, 0)
    tab = pd.DataFrame({"sample": ds.sample_ids, "missing_fraction": miss_s, "median": med,
                        "n_observed": (~np.isnan(X)).sum(0)})
    complete = ~np.isnan(X).any(1)
    diag = {"n_proteins": ds.n_proteins, "n_samples": ds.n_samples, "missing_fraction": float(np.isnan(X).mean()),
            "n_complete_proteins": int(complete.sum())}
    figs = {}
    outliers = []
    if complete.sum() >= 3 and ds.n_samples >= 3:
        sc, _, evr = pca(X[complete].T, 2)
        tab["pc1"], tab["pc2"] = sc[:, 0], sc[:, 1] if sc.shape[1] > 1 else 0.0
        d = np.sqrt(((sc - np.median(sc, 0)) ** 2).sum(1))
        mad = np.median(np.abs(d - np.median(d))) * 1.4826
        outliers = [s for s, v in zip(ds.sample_ids, d) if mad > 0 and (v - np.median(d)) / mad > 5]
        diag["pca_explained"] = evr.tolist()
        if ctx.figures:
            fig, ax = figure()
            if a.color_by:
                g = ds.column(a.color_by).values
                for l in sorted({v for v in g if v is not None}):
                    m = g == l
                    ax.scatter(sc[m, 0], sc[m, 1], s=12, label=str(l))
                ax.legend(fontsize=6)
            else:
                ax.scatter(sc[:, 0], sc[:, 1], s=12)
            ax.set_xlabel(f"PC1 ({evr[0]:.0%})")
            ax.set_ylabel(f"PC2 ({evr[1]:.0%})" if len(evr) > 1 else "PC2")
            figs["pca"] = png(fig)
    mz = (miss_s - np.median(miss_s)) / (np.median(np.abs(miss_s - np.median(miss_s))) * 1.4826 + 1e-12)
    outliers += [s for s, v in zip(ds.sample_ids, mz) if v > 5 and s not in outliers]
    diag["outlier_samples"] = outliers
    return ToolResult(tool="qc_summary", args=a.model_dump(), tables={"samples": tab}, figures=figs,
                      summary={"n_proteins": ds.n_proteins, "n_samples": ds.n_samples,
                               "missing_fraction": round(diag["missing_fraction"], 4), "outlier_samples": outliers},
                      diagnostics=diag)


class FilterArgs(ToolArgs):
    remove_contaminants: bool = True
    remove_reverse: bool = True
    remove_only_by_site: bool = True
    min_valid_fraction: float = Field(0.7, ge=0.0, le=1.0, description="fraction of samples a protein must be observed in")
    group_column: str | None = Field(None, description="apply the fraction within groups of this column",
                                     json_schema_extra={"narrow": "group_column"})
    group_mode: Literal["any", "all"] = Field("any", description="fraction reached in any group or in every group")


@tool(name="filter_proteins", level="preprocess", args_model=FilterArgs,
      summary="Remove contaminant, reverse and site-only protein groups and proteins with too few valid values",
      requires=[], produces=["dataset"], follow_ups=["normalize"])
def filter_proteins(ds: ProteomicsDataset, a: FilterArgs, ctx: ToolContext) -> ToolResult:
    keep = np.ones(ds.n_proteins, dtype=bool)
    counts = {}
    for flag, on in (("is_contaminant", a.remove_contaminants), ("is_reverse", a.remove_reverse),
                     ("only_by_site", a.remove_only_by_site)):
        if on and flag in ds.protein_meta:
            f = np.array(ds.protein_meta[flag], dtype=bool)
            counts[flag] = int((f & keep).sum())
            keep &= ~f
    groups = ds.column(a.group_column).values if a.group_column else None
    vv = valid_value_mask(ds.X, a.min_valid_fraction, groups, a.group_mode)
    counts["too_few_valid"] = int((keep & ~vv).sum())
    keep &= vv
    new = ds.subset(proteins=keep, step=f"filter_proteins:{a.model_dump_json()}")
    return ToolResult(tool="filter_proteins", args=a.model_dump(), dataset=new,
                      summary={"kept": int(keep.sum()), "removed": counts},
                      diagnostics={"n_before": ds.n_proteins, "n_after": int(keep.sum()), **counts})


class NormalizeArgs(ToolArgs):
    method: Literal["median", "quantile", "none"] = "median"


@tool(name="normalize", level="preprocess", args_model=NormalizeArgs,
      summary="Normalise samples on the log2 scale: median centring or quantile normalisation",
      requires=[], produces=["dataset"], follow_ups=["impute"])
def normalize(ds: ProteomicsDataset, a: NormalizeArgs, ctx: ToolContext) -> ToolResult:
    if a.method == "median":
        X = median_normalize(ds.X)
    elif a.method == "quantile":
        X = quantile_normalize(ds.X)
    else:
        X = ds.X.copy()
    med = np.nanmedian(X, 0)
    return ToolResult(tool="normalize", args=a.model_dump(), dataset=ds.with_X(X, f"normalize:{a.method}"),
                      summary={"method": a.method, "median_spread_before": float(np.ptp(np.nanmedian(ds.X, 0))),
                               "median_spread_after": float(np.ptp(med))},
                      diagnostics={"sample_medians": med.tolist()})


class ImputeArgs(ToolArgs):
    method: Literal["minprob", "knn", "none"] = "minprob"
    knn_k: int = Field(5, ge=1, le=50)
    downshift: float = Field(1.8, ge=0.0, le=5.0)
    width: float = Field(0.3, gt=0.0, le=2.0)


@tool(name="impute", level="preprocess", args_model=ImputeArgs,
      summary="Impute missing values: MinProb down-shifted draws (missing-not-at-random) or KNN over proteins",
      requires=["missing"], produces=["dataset"], follow_ups=["differential_abundance", "cluster_samples"])
def impute(ds: ProteomicsDataset, a: ImputeArgs, ctx: ToolContext) -> ToolResult:
    n_miss = int(np.isnan(ds.X).sum())
    if a.method == "minprob":
        X = impute_minprob(ds.X, downshift=a.downshift, width=a.width, seed=step_seed(ctx, "impute"))
    elif a.method == "knn":
        X = impute_knn(ds.X, a.knn_k)
    else:
        X = ds.X.copy()
    return ToolResult(tool="impute", args=a.model_dump(), dataset=ds.with_X(X, f"impute:{a.method}"),
                      summary={"method": a.method, "n_imputed": n_miss - int(np.isnan(X).sum())},
                      diagnostics={"n_missing_before": n_miss, "n_missing_after": int(np.isnan(X).sum())})
