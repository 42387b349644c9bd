"""Correlation of protein abundance with numeric clinical variables."""

from __future__ import annotations

from typing import Literal

import numpy as np
import pandas as pd
from pydantic import Field

from ..data import ProteomicsDataset
from ..stats.correlation import correlate_rows, correlation_global_permutation_p
from ..stats.multitest import bh
from .registry import ToolArgs, Finding, ToolContext, ToolResult, tool


class ClinicalArgs(ToolArgs):
    variable: str = Field(description="numeric clinical column", json_schema_extra={"narrow": "numeric_column"})
    method: Literal["spearman", "pearson"] = "spearman"
    fdr: Literal[0.01, 0.05, 0.1] = 0.05
    min_samples: int = Field(8, ge=4, le=1000, description="paired observations needed to test a protein")


@tool(name="correlate_clinical", level="analysis", args_model=ClinicalArgs,
      summary="Correlate every protein with a numeric clinical variable (Spearman or Pearson, BH FDR)",
      requires=["numeric_covariate"], produces=["protein_table", "findings"], follow_ups=["enrichment_ora", "gsea_prerank"])
def correlate_clinical(ds: ProteomicsDataset, a: ClinicalArgs, ctx: ToolContext) -> ToolResult:
    y = ds.column(a.variable).numeric()
    r, p, n = correlate_rows(ds.X, y, a.method)
    p = np.where(n >= a.min_samples, p, np.nan)
    q = bh(p)
    tab = pd.DataFrame({"protein": ds.protein_ids, "gene": ds.genes, "r": r, "p": p, "q": q, "n": n})
    tab = tab.sort_values(["p", "protein"], na_position="last", kind="mergesort").reset_index(drop=True)
    sig = tab[tab.q <= a.fdr]
    obj = f"covariate:{a.variable}"
    # the step's global test (the engine's gate): max |r| against permutations of the variable,
    # which keep the correlation between proteins
    tested = n >= a.min_samples
    gp, gr = (correlation_global_permutation_p(ds.X[tested], y, a.method, seed=ctx.seed) if tested.any()
              else (float("nan"), float("nan")))
    findings = [Finding(entity=f"protein:{x.protein}", gene=x.gene,
                        relation="correlates_with" if x.r > 0 else "anticorrelates_with", object=obj,
                        direction="up" if x.r > 0 else "down", effect=float(x.r), statistic={"r": float(x.r)},
                        p=float(x.p), q=float(x.q), tool="correlate_clinical") for x in sig.itertuples()]
    return ToolResult(tool="correlate_clinical", args=a.model_dump(), tables={"correlation": tab}, findings=findings,
                      summary={"variable": a.variable, "n_tested": int(np.sum(~np.isnan(p))), "n_significant": len(sig),
                               "top": [{"protein": x.protein, "gene": x.gene, "r": round(float(x.r), 3)} for x in sig.head(10).itertuples()]},
                      diagnostics={"n_samples_with_value": int(np.sum(~np.isnan(y))),
                                   "global_permutation_p": gp, "global_max_abs_r": gr})
