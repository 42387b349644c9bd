"""Gene-set enrichment tools: over-representation of significant proteins and pre-ranked GSEA,
on user gene sets (``ToolContext.gene_sets``, e.g. from :func:`lmfuse.proteus.stats.read_gmt`)."""

from __future__ import annotations

from typing import Literal

import pandas as pd
from pydantic import Field

from ..data import ProteomicsDataset
from ..stats.enrich import gsea_prerank as _gsea
from ..stats.enrich import ora
from .differential import differential
from .registry import ToolArgs, Finding, ToolContext, ToolResult, step_seed, tool


class _Source(ToolArgs):
    from_step: str | None = Field(None, description="id of an earlier differential_abundance step in the context")
    group_column: str | None = Field(None, description="or compute the contrast here", json_schema_extra={"narrow": "group_column"})
    case: str | None = Field(None, json_schema_extra={"narrow": "level"})
    control: str | None = Field(None, json_schema_extra={"narrow": "level"})


def _table(ds, a: _Source, ctx: ToolContext, tool_name: str) -> tuple[pd.DataFrame, str]:
    if a.from_step:
        if a.from_step not in ctx.results:
            raise ValueError(f"{tool_name}: argument 'from_step'={a.from_step!r} is not a step in the context; known: {sorted(ctx.results)}")
        r = ctx.results[a.from_step]
        if "differential" not in r.tables:
            raise ValueError(f"{tool_name}: step {a.from_step!r} ({r.tool}) has no 'differential' table")
        return r.tables["differential"], r.summary.get("contrast", a.from_step)
    if not (a.group_column and a.case and a.control):
        raise ValueError(f"{tool_name}: give 'from_step' or all of 'group_column', 'case', 'control'")
    tab, _ = differential(ds, a.group_column, a.case, a.control)
    return tab, f"group:{a.group_column}={a.case} vs {a.control}"


def _sets(ctx: ToolContext, tool_name: str):
    if not ctx.gene_sets:
        raise ValueError(f"{tool_name}: no gene sets in the context (load a .gmt with read_gmt)")
    return ctx.gene_sets


class ORAArgs(_Source):
    direction: Literal["up", "down", "both"] = "both"
    fdr: Literal[0.01, 0.05, 0.1] = Field(0.05, description="FDR that defines the protein hits")
    set_fdr: Literal[0.01, 0.05, 0.1, 0.25] = Field(0.05, description="FDR for calling a gene set enriched")
    min_size: int = Field(5, ge=1, le=1000)
    max_size: int = Field(500, ge=2, le=10000)


@tool(name="enrichment_ora", level="analysis", args_model=ORAArgs,
      summary="Over-representation of significant proteins in gene sets (hypergeometric, universe = tested proteins, BH)",
      requires=["group", "gene_sets"], produces=["gene_set_table", "findings"], follow_ups=[])
def enrichment_ora(ds: ProteomicsDataset, a: ORAArgs, ctx: ToolContext) -> ToolResult:
    sets = _sets(ctx, "enrichment_ora")
    tab, contrast = _table(ds, a, ctx, "enrichment_ora")
    tested = tab.dropna(subset=["p"])
    universe = [g for g in tested.gene if g]
    rows, findings = [], []
    for d in (["up", "down"] if a.direction == "both" else [a.direction]):
        sig = tested[(tested.q <= a.fdr) & ((tested.log2fc > 0) if d == "up" else (tested.log2fc < 0))]
        res = ora(list(sig.gene), universe, sets, min_size=a.min_size, max_size=a.max_size)
        for r in res:
            r["direction"] = d
            r["n_hits"] = int(len(set(sig.gene) & set(universe)))
            rows.append(r)
            if r["q"] <= a.set_fdr:
                findings.append(Finding(entity=f"gene_set:{r['gene_set']}", relation=f"enriched_in_{d}", object=contrast,
                                        direction=d, effect=float(r["fold"]), statistic={"overlap": r["overlap"]},
                                        p=r["p"], q=r["q"], tool="enrichment_ora"))
    out = pd.DataFrame(rows, columns=["gene_set", "direction", "size", "overlap", "expected", "fold", "p", "q", "n_hits", "genes"])
    if len(out):
        out["genes"] = out.genes.map(lambda g: ",".join(g))
    return ToolResult(tool="enrichment_ora", args=a.model_dump(), tables={"ora": out}, findings=findings,
                      summary={"contrast": contrast, "n_sets_tested": int(len(out)), "n_significant": len(findings),
                               "top": [f.entity for f in findings[:10]]},
                      diagnostics={"universe": len(set(universe))})


class GSEAArgs(_Source):
    permutations: int = Field(1000, ge=50, le=10000)
    min_size: int = Field(15, ge=2, le=1000)
    max_size: int = Field(500, ge=5, le=10000)
    fdr: Literal[0.05, 0.1, 0.25] = 0.25
    rank_by: Literal["t", "log2fc"] = "t"


@tool(name="gsea_prerank", level="analysis", args_model=GSEAArgs,
      summary="Pre-ranked GSEA of all tested proteins ordered by their statistic (weighted KS, pooled-NES FDR)",
      requires=["group", "gene_sets"], produces=["gene_set_table", "findings"], follow_ups=[])
def gsea_prerank(ds: ProteomicsDataset, a: GSEAArgs, ctx: ToolContext) -> ToolResult:
    sets = _sets(ctx, "gsea_prerank")
    tab, contrast = _table(ds, a, ctx, "gsea_prerank")
    tested = tab.dropna(subset=["p"])
    col = a.rank_by if a.rank_by in tested.columns and tested[a.rank_by].notna().any() else "log2fc"
    scores = [(g, s) for g, s in zip(tested.gene, tested[col]) if g]
    rows = _gsea(scores, sets, permutations=a.permutations, min_size=a.min_size, max_size=a.max_size,
                 seed=step_seed(ctx, "gsea"))
    findings = [Finding(entity=f"gene_set:{r['gene_set']}", relation="enriched_in_up" if r["nes"] > 0 else "enriched_in_down",
                        object=contrast, direction="up" if r["nes"] > 0 else "down", effect=r["nes"],
                        statistic={"es": r["es"], "nes": r["nes"]}, p=r["p"], q=r["fdr"], tool="gsea_prerank")
                for r in rows if r["fdr"] <= a.fdr]
    out = pd.DataFrame(rows, columns=["gene_set", "size", "es", "nes", "p", "fdr", "leading_edge"])
    if len(out):
        out["leading_edge"] = out.leading_edge.map(lambda g: ",".join(g))
    return ToolResult(tool="gsea_prerank", args=a.model_dump(), tables={"gsea": out}, findings=findings,
                      summary={"contrast": contrast, "n_sets_tested": int(len(out)), "n_significant": len(findings),
                               "top": [{"gene_set": r["gene_set"], "nes": round(r["nes"], 3), "fdr": r["fdr"]} for r in rows[:10]]},
                      diagnostics={"ranked_by": col, "n_ranked": len(scores), "permutations": a.permutations})
