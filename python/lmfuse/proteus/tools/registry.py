"""Tool registry: typed, JSON-schema'd analysis tools.

Every tool is a function ``f(dataset, args, ctx) -> ToolResult`` registered with :func:`tool`
under a :class:`ToolSpec` (name, one-line summary, level, pydantic argument model, affordances it
requires, what it produces, natural follow-ups). Argument fields that name metadata columns or
levels carry ``json_schema_extra={"narrow": KIND}``; :func:`narrowed_schema` replaces them with
enums of the valid values of one data set (from its :class:`~lmfuse.proteus.data.DataProfile`),
and :func:`run_tool` validates arguments against the model and the data before running.

Narrow kinds: ``group_column`` (categorical columns with >= 2 levels of >= 3 samples), ``level``
(levels of those columns), ``numeric_column`` (numeric covariates), ``covariates`` (list of
numeric or categorical covariate columns), ``protein`` (protein ids; not enumerated in schemas).
"""

from __future__ import annotations

import copy
import io
from dataclasses import dataclass, field
from typing import Any, Callable, Literal

import numpy as np
import pandas as pd
from pydantic import BaseModel, ConfigDict, Field

from ..data import DataProfile, ProteomicsDataset

Level = Literal["preprocess", "analysis", "interpretation"]
Relation = Literal["higher_in", "lower_in", "associated_with_risk", "associated_with_protection",
                   "enriched_in_up", "enriched_in_down", "defines_subtype", "correlates_with",
                   "anticorrelates_with", "differs_between", "member_of_module"]


class Finding(BaseModel):
    """A typed, machine-checkable claim produced by a tool.

    entity: "protein:<id>" | "gene_set:<name>" | "cluster:<k>" | "module:<k>".
    relation: see ``Relation``. object: what it is relative to, e.g.
    "group:disease=liver cirrhosis vs healthy", "survival", "covariate:ALT", "clustering".
    direction: "up" | "down" | None. effect: log2FC / log hazard ratio / NES / rho.
    statistic: named test statistics. p, q: raw and adjusted p-values."""

    entity: str
    gene: str = ""
    relation: Relation
    object: str
    direction: Literal["up", "down"] | None = None
    effect: float | None = None
    statistic: dict[str, float] = Field(default_factory=dict)
    p: float | None = None
    q: float | None = None
    tool: str = ""


@dataclass
class ToolResult:
    """What a tool returns.

    tables: name -> DataFrame (saved as TSV by an executor); figures: name -> PNG bytes;
    summary: small JSON-able dict (counts, top items) for planners/LLMs; findings: typed claims;
    diagnostics: JSON-able numbers for quality gates (prior d0, p-value histogram, group sizes,
    silhouette, events, ...); dataset: a new data view (preprocessing tools), else None;
    warnings: human-readable notes."""

    tool: str
    args: dict
    tables: dict[str, pd.DataFrame] = field(default_factory=dict)
    figures: dict[str, bytes] = field(default_factory=dict)
    summary: dict[str, Any] = field(default_factory=dict)
    findings: list[Finding] = field(default_factory=list)
    diagnostics: dict[str, Any] = field(default_factory=dict)
    dataset: ProteomicsDataset | None = None
    warnings: list[str] = field(default_factory=list)

    def to_json(self) -> dict:
        """JSON-able view without tables/figure bytes (their names are listed)."""
        return {"tool": self.tool, "args": self.args, "summary": _plain(self.summary),
                "findings": [f.model_dump() for f in self.findings], "diagnostics": _plain(self.diagnostics),
                "tables": {k: list(v.columns) for k, v in self.tables.items()}, "figures": sorted(self.figures),
                "dataset": self.dataset.fingerprint() if self.dataset is not None else None,
                "warnings": list(self.warnings)}


def _plain(x):
    if isinstance(x, dict):
        return {str(k): _plain(v) for k, v in x.items()}
    if isinstance(x, (list, tuple)):
        return [_plain(v) for v in x]
    if isinstance(x, (np.floating, float)):
        v = float(x)
        return None if np.isnan(v) else v
    if isinstance(x, np.integer):
        return int(x)
    if isinstance(x, np.bool_):
        return bool(x)
    if isinstance(x, np.ndarray):
        return _plain(x.tolist())
    return x


@dataclass
class ToolContext:
    """Run-time context of a tool call.

    seed: base seed (tools are deterministic given it); gene_sets: name -> genes (for enrichment);
    results: earlier ToolResults by step id (for tools that take ``from_step``); figures: whether to
    render PNGs."""

    seed: int = 0
    gene_sets: dict[str, list[str]] | None = None
    results: dict[str, ToolResult] = field(default_factory=dict)
    figures: bool = True


class ToolArgs(BaseModel):
    """Base of tool argument models: unknown fields are rejected."""

    model_config = ConfigDict(extra="forbid")


class ToolSpec(BaseModel):
    model_config = ConfigDict(arbitrary_types_allowed=True)

    name: str
    summary: str
    level: Level
    args_model: type[BaseModel]
    requires: list[str] = Field(default_factory=list)
    produces: list[str] = Field(default_factory=list)
    follow_ups: list[str] = Field(default_factory=list)
    func: Callable[..., ToolResult] | None = Field(default=None, exclude=True)


REGISTRY: dict[str, ToolSpec] = {}


def tool(*, name: str, summary: str, level: Level, args_model: type[BaseModel], requires=(), produces=(),
         follow_ups=()):
    """Decorator registering ``f(dataset, args, ctx) -> ToolResult`` as a tool."""

    def deco(f):
        if name in REGISTRY:
            raise ValueError(f"tool {name!r} is already registered")
        REGISTRY[name] = ToolSpec(name=name, summary=summary, level=level, args_model=args_model,
                                  requires=list(requires), produces=list(produces), follow_ups=list(follow_ups),
                                  func=f)
        return f

    return deco


def _load_all():
    from . import clinical, clustering, differential, enrichment, network, preprocess, survival  # noqa: F401


def get_tool(name: str) -> ToolSpec:
    _load_all()
    if name not in REGISTRY:
        raise KeyError(f"unknown tool {name!r}; registered: {sorted(REGISTRY)}")
    return REGISTRY[name]


def list_tools() -> list[ToolSpec]:
    _load_all()
    return [REGISTRY[k] for k in sorted(REGISTRY)]


# --------------------------------------------------------------------------------------------
# affordances and schema narrowing
# --------------------------------------------------------------------------------------------


def _allowed(kind: str, profile: DataProfile) -> list[str] | None:
    if kind == "group_column":
        return list(profile.group_columns)
    if kind == "level":
        out: list[str] = []
        for c in profile.group_columns:
            out += [l for l, n in profile.column(c).levels.items() if n > 0 and l not in out]
        return out
    if kind == "numeric_column":
        return list(profile.numeric_covariates)
    if kind == "covariates":
        return list(dict.fromkeys(profile.numeric_covariates + profile.categorical_covariates))
    return None


def affordances(profile: DataProfile, *, gene_sets: bool = False) -> set[str]:
    """What a data set affords: 'group', 'survival', 'numeric_covariate', 'gene_sets',
    'gene_symbols', 'n>=20', 'missing'."""
    a = set()
    if profile.group_columns:
        a.add("group")
    if profile.survival:
        a.add("survival")
    if profile.numeric_covariates:
        a.add("numeric_covariate")
    if gene_sets:
        a.add("gene_sets")
    if profile.gene_coverage > 0.5:
        a.add("gene_symbols")
    if profile.n_samples >= 20:
        a.add("n>=20")
    if profile.missing_fraction > 0:
        a.add("missing")
    return a


def available(spec: ToolSpec, profile: DataProfile, *, gene_sets: bool = False) -> bool:
    return set(spec.requires) <= affordances(profile, gene_sets=gene_sets)


def narrowed_schema(spec: ToolSpec | str, profile: DataProfile) -> dict:
    """JSON schema of a tool's arguments with column/level fields restricted to ``profile``."""
    spec = get_tool(spec) if isinstance(spec, str) else spec
    sch = copy.deepcopy(spec.args_model.model_json_schema())
    for fname, prop in sch.get("properties", {}).items():
        kind = prop.pop("narrow", None)
        allowed = _allowed(kind, profile) if kind else None
        if allowed is None:
            continue
        if prop.get("type") == "array" or "items" in prop:
            prop["items"] = {"type": "string", "enum": allowed}
            prop.pop("anyOf", None)
        elif "anyOf" in prop:  # Optional[str]
            prop["anyOf"] = [{"type": "string", "enum": allowed}, {"type": "null"}]
        else:
            prop["enum"] = allowed
            prop["type"] = "string"
    sch["title"] = spec.name
    sch["additionalProperties"] = False
    return sch


def openai_tools(profile: DataProfile, *, gene_sets: bool = False) -> list[dict]:
    """The tools available for ``profile`` in the OpenAI ``tools=[...]`` shape."""
    return [{"type": "function", "function": {"name": s.name, "description": s.summary,
                                              "parameters": narrowed_schema(s, profile)}}
            for s in list_tools() if available(s, profile, gene_sets=gene_sets)]


def action_schema(profile: DataProfile, *, gene_sets: bool = False, tools: list[str] | None = None) -> dict:
    """One JSON schema for a planner action ``{"tool": ..., "args": ..., "rationale": ...}`` over
    the available tools (optionally restricted to ``tools``)."""
    specs = [s for s in list_tools() if available(s, profile, gene_sets=gene_sets) and (tools is None or s.name in tools)]
    defs = {s.name: narrowed_schema(s, profile) for s in specs}
    return {"type": "object",
            "properties": {"tool": {"type": "string", "enum": [s.name for s in specs]},
                           "args": {"oneOf": [{"$ref": f"#/$defs/{s.name}"} for s in specs]},
                           "rationale": {"type": "string", "maxLength": 400}},
            "required": ["tool", "args"], "additionalProperties": False, "$defs": defs}


def _check_against_data(spec: ToolSpec, args: BaseModel, dataset: ProteomicsDataset, profile: DataProfile):
    fields = spec.args_model.model_fields
    for fname, finfo in fields.items():
        extra = finfo.json_schema_extra if isinstance(finfo.json_schema_extra, dict) else {}
        kind = extra.get("narrow")
        if not kind:
            continue
        val = getattr(args, fname)
        if val is None:
            continue
        if kind == "protein":
            vals = val if isinstance(val, list) else [val]
            bad = [v for v in vals if v not in set(dataset.protein_ids)]
            if bad:
                raise ValueError(f"{spec.name}: argument {fname!r}: unknown protein id(s) {bad[:5]}")
            continue
        if kind == "level":
            col = getattr(args, extra.get("column_field", "group_column"), None)
            levels = profile.column(col).levels if col else {}
            if val not in levels:
                raise ValueError(f"{spec.name}: argument {fname!r}={val!r} is not a level of column {col!r}; levels: {list(levels)}")
            if levels[val] == 0:
                raise ValueError(f"{spec.name}: argument {fname!r}: group {val!r} of column {col!r} is empty")
            continue
        allowed = _allowed(kind, profile) or []
        vals = val if isinstance(val, list) else [val]
        bad = [v for v in vals if v not in allowed]
        if bad:
            raise ValueError(f"{spec.name}: argument {fname!r} has invalid value(s) {bad}; allowed: {allowed}")


def run_tool(name: str, dataset: ProteomicsDataset, args: dict | BaseModel | None = None, *,
             context: ToolContext | None = None, seed: int | None = None) -> ToolResult:
    """Validate ``args`` (pydantic model, then against the data: columns, levels, proteins) and run
    tool ``name`` on ``dataset``. Raises ``ValueError`` naming the argument on bad input."""
    spec = get_tool(name)
    ctx = context or ToolContext()
    if seed is not None:
        ctx = ToolContext(seed=seed, gene_sets=ctx.gene_sets, results=ctx.results, figures=ctx.figures)
    raw = args.model_dump() if isinstance(args, BaseModel) else dict(args or {})
    a = spec.args_model.model_validate(raw)
    profile = dataset.profile()
    _check_against_data(spec, a, dataset, profile)
    res = spec.func(dataset, a, ctx)
    res.args = a.model_dump()
    res.tool = name
    return res


# --------------------------------------------------------------------------------------------
# small shared helpers for tools
# --------------------------------------------------------------------------------------------


def png(fig) -> bytes:
    """Render a matplotlib figure to PNG bytes and close it."""
    import matplotlib.pyplot as plt

    buf = io.BytesIO()
    fig.savefig(buf, format="png", dpi=90, bbox_inches="tight")
    plt.close(fig)
    return buf.getvalue()


def figure(w=5.0, h=4.0):
    import matplotlib

    matplotlib.use("Agg", force=False)
    import matplotlib.pyplot as plt

    return plt.subplots(figsize=(w, h))


def step_seed(ctx: ToolContext, name: str) -> int:
    """A seed derived from the context seed and a label (stable across processes)."""
    import hashlib

    return int.from_bytes(hashlib.sha256(f"{ctx.seed}:{name}".encode()).digest()[:4], "little")
