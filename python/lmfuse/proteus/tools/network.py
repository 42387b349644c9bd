"""Co-abundance modules: protein–protein correlation network cut into modules; module eigengenes
tested against a group column or a numeric variable."""

from __future__ import annotations

from typing import Literal

import numpy as np
import pandas as pd
from pydantic import Field

from ..data import ProteomicsDataset
from ..stats.correlation import coabundance_modules as _modules
from ..stats.correlation import module_eigengene
from ..stats.multitest import bh
from ..stats.tests import welch
from .registry import ToolArgs, Finding, ToolContext, ToolResult, tool


class ModuleArgs(ToolArgs):
    n_features: int = Field(1000, ge=20, le=5000, description="most variable complete proteins used")
    min_size: int = Field(10, ge=3, le=500)
    cut: float = Field(0.6, gt=0.0, lt=1.0, description="tree cut height on 1 − |r|")
    method: Literal["spearman", "pearson"] = "spearman"
    group_column: str | None = Field(None, json_schema_extra={"narrow": "group_column"})
    case: str | None = Field(None, json_schema_extra={"narrow": "level"})
    control: str | None = Field(None, json_schema_extra={"narrow": "level"})
    fdr: Literal[0.01, 0.05, 0.1] = 0.05


@tool(name="coabundance_modules", level="analysis", args_model=ModuleArgs,
      summary="Find co-abundance modules of proteins (correlation network, hierarchical cut), hub proteins, and test module eigengenes",
      requires=[], produces=["module_table", "findings"], follow_ups=["enrichment_ora"])
def coabundance_modules(ds: ProteomicsDataset, a: ModuleArgs, ctx: ToolContext) -> ToolResult:
    complete = np.flatnonzero(~np.isnan(ds.X).any(1))
    if complete.size < a.min_size:
        raise ValueError("coabundance_modules: too few complete proteins; impute first")
    var = ds.X[complete].var(1)
    idx = complete[np.argsort(-var, kind="stable")[: a.n_features]]
    X = ds.X[idx]
    mods, R = _modules(X, min_size=a.min_size, cut=a.cut, method=a.method)
    rows, mrows = [], []
    egs = {}
    for m in range(1, mods.max() + 1):
        sel = mods == m
        eg, ve = module_eigengene(X[sel])
        egs[m] = eg
        kme = np.array([np.corrcoef(X[i], eg)[0, 1] for i in np.flatnonzero(sel)])
        hub = np.flatnonzero(sel)[np.argmax(kme)]
        mrows.append({"module": f"M{m}", "size": int(sel.sum()), "variance_explained": ve,
                      "hub_protein": ds.protein_ids[idx[hub]], "hub_gene": ds.genes[idx[hub]]})
        for i, k in zip(np.flatnonzero(sel), kme):
            rows.append({"protein": ds.protein_ids[idx[i]], "gene": ds.genes[idx[i]], "module": f"M{m}", "kME": float(k)})
    findings = []
    if egs and a.group_column and a.case and a.control:
        g = ds.column(a.group_column).values
        E = np.array([egs[m] for m in sorted(egs)])
        t, p, d = welch(E[:, g == a.case], E[:, g == a.control])
        q = bh(p)
        for j, m in enumerate(sorted(egs)):
            mrows[j].update(t=float(t[j]), p=float(p[j]), q=float(q[j]))
            if q[j] <= a.fdr:
                findings.append(Finding(entity=f"module:M{m}", relation="higher_in" if d[j] > 0 else "lower_in",
                                        object=f"group:{a.group_column}={a.case} vs {a.control}",
                                        direction="up" if d[j] > 0 else "down", effect=float(d[j]),
                                        statistic={"t": float(t[j])}, p=float(p[j]), q=float(q[j]), tool="coabundance_modules"))
    return ToolResult(tool="coabundance_modules", args=a.model_dump(),
                      tables={"modules": pd.DataFrame(mrows), "membership": pd.DataFrame(rows, columns=["protein", "gene", "module", "kME"])},
                      findings=findings,
                      summary={"n_modules": int(mods.max()), "n_proteins_used": int(idx.size),
                               "modules": [{k: r[k] for k in ("module", "size", "hub_gene")} for r in mrows[:10]]},
                      diagnostics={"unassigned": int((mods == 0).sum())})
