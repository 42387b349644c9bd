"""``lmfuse.proteus.run``: data set → objectives → workflows → gated steps → verified hypotheses →
``findings.json`` + reports, in one call; and :func:`replay` of a logged run."""

from __future__ import annotations

import json
import sys
import types
from dataclasses import dataclass
from pathlib import Path

from .report import SCHEMA_VERSION, dumps_findings, write_reports

PLANNERS = ("auto", "rules", "llm", "hybrid")


@dataclass
class RunResult:
    """What :func:`run` returns: ``findings`` (the findings.json dict), ``hypotheses``, the
    ``engine`` (records, objectives, log) and the written ``paths`` (empty without ``out``)."""

    findings: dict
    hypotheses: list
    engine: object
    paths: dict


def _load(data, meta, roles, group):
    from .data import ProteomicsDataset, load

    if isinstance(data, ProteomicsDataset):
        ds = data
        if roles:
            ds = ds.with_roles(roles)
    else:
        p = Path(data)
        if not p.is_file():
            raise FileNotFoundError(f"data file not found: {p}")
        if isinstance(meta, (str, Path)) and not Path(meta).is_file():
            raise FileNotFoundError(f"metadata file not found: {meta}")
        ds = load(p, meta, roles=roles)
    if group is not None:
        if group not in ds.sample_meta:
            raise ValueError(f"group column {group!r} is not in the sample metadata; columns: {list(ds.sample_meta)}")
        # the chosen column becomes the (only) group column
        extra = {k: "other" for k, c in ds.sample_meta.items() if c.role == "group" and k != group}
        ds = ds.with_roles({**extra, group: "group"})
    return ds


OUTPUT_FILES = ("findings.json", "report.md", "report.html", "run_log.jsonl")


def _check_out(out: Path, inputs) -> None:
    """Refuse an output folder whose outputs would overwrite an input file."""
    o = out.resolve()
    for src in inputs:
        if not isinstance(src, (str, Path)):
            continue
        s = Path(src).resolve()
        if (s.parent == o and s.name in OUTPUT_FILES) or o / "artifacts" in s.parents or o / "figures" in s.parents:
            raise ValueError(f"out={out} would overwrite the input file {src}")


def _gene_sets(gene_sets):
    if gene_sets is None:
        return None
    if isinstance(gene_sets, (str, Path)):
        from .stats.enrich import read_gmt

        p = Path(gene_sets)
        if not p.is_file():
            raise FileNotFoundError(f"gene-set file not found: {p}")
        return read_gmt(p)
    if isinstance(gene_sets, dict):
        return {str(k): [str(g) for g in v] for k, v in gene_sets.items()}
    raise TypeError(f"gene_sets must be a .gmt path or a dict name -> genes, got {type(gene_sets).__name__}")


def make_planner(kind: str, backend, *, fdr: float = 0.05, max_contrasts: int = 4):
    from .planner import HybridPlanner, LLMPlanner, RuleBasedPlanner

    if kind not in PLANNERS:
        raise ValueError(f"planner must be one of {PLANNERS}, got {kind!r}")
    rules = RuleBasedPlanner(fdr=fdr, max_contrasts=max_contrasts)
    if kind == "auto":
        kind = "rules" if backend is None else "hybrid"
    if kind == "rules":
        return rules
    if backend is None:
        raise ValueError(f"planner {kind!r} needs a language model (llm='local' or an endpoint URL)")
    return LLMPlanner(backend, rules) if kind == "llm" else HybridPlanner(backend, rules)


def findings_dict(engine, hypotheses, *, llm_name: str = "none", evaluation: dict | None = None) -> dict:
    """The findings.json dict (schema version ``SCHEMA_VERSION``; see docs/proteus.md)."""
    ds = engine.dataset
    steps, differential, enrichment, clusters, survival, correlation = [], [], [], [], [], []
    for r in engine.records:
        j = r.to_json()
        j["summary_text"] = _summary_text(r)
        steps.append({k: j[k] for k in ("id", "objective_id", "round", "tool", "args", "view", "status", "error",
                                        "verdict", "gates", "summary", "summary_text", "artifacts")})
        ev = r.evidence
        if r.verdict != "accept" or not ev:
            continue
        if ev["kind"] == "differential":
            differential.append({"step_id": r.step_id, "contrast": ev["contrast"], "column": ev["column"],
                                 "case": ev["case"], "control": ev["control"], "n_tested": ev["n_tested"],
                                 "hits": ev["rows"], "fragile": ev.get("fragile", [])})
        elif ev["kind"] == "enrichment":
            enrichment += [{"step_id": r.step_id, "contrast": ev.get("contrast", ""), "method": ev["method"], **row}
                           for row in ev["rows"]]
        elif ev["kind"] == "clusters":
            clusters.append({"step_id": r.step_id, **{k: ev[k] for k in ("k", "silhouette", "stability", "robust",
                                                                          "sizes", "labels")}})
        elif ev["kind"] == "survival":
            survival += [{"step_id": r.step_id, "protein": x["protein"], "gene": x["gene"], "hazard_ratio": x["hr"],
                          "p": x["p"], "q": x["q"], "ph_p": x.get("ph_p")} for x in ev["rows"]]
        elif ev["kind"] == "correlation":
            correlation += [{"step_id": r.step_id, "variable": ev["variable"], **x} for x in ev["rows"]]
    cfg = engine.log.events[0] if engine.log.events else {}
    return {
        "schema_version": SCHEMA_VERSION,
        "dataset": {"name": ds.name, "n_proteins": ds.n_proteins, "n_samples": ds.n_samples,
                    "fingerprint": ds.fingerprint()},
        "config": {"planner": engine.planner.name.replace("replay:", ""), "llm": llm_name, "seed": engine.seed,
                   "max_rounds": engine.max_rounds, "fdr": engine.fdr, "lmfuse": cfg.get("lmfuse", ""),
                   "gene_sets": len(engine.gene_sets or {})},
        "objectives": [{**o.to_json(), "status": getattr(o, "status", "")} for o in engine.objectives],
        "steps": steps,
        "differential": differential,
        "enrichment": enrichment,
        "clusters": clusters,
        "survival": survival,
        "correlation": correlation,
        "hypotheses": [{"id": h.id, "objective_id": h.objective_id, "kind": h.kind, "statement": h.statement,
                        "entities": h.entities, "direction": h.direction, "q": h.q, "evidence": h.evidence,
                        "claims": [c.model_dump() for c in h.claims], "prediction": h.prediction,
                        "verified": h.verified, "text_source": h.text_source, "novelty": h.novelty}
                       for h in hypotheses],
        **({"evaluation": evaluation} if evaluation else {}),
    }


def _summary_text(r) -> str:
    if r.status != "ok":
        return r.error[:160]
    s = r.summary
    bits = [f"{k} {s[k]}" for k in ("kept", "n_tested", "n_significant", "n_up", "n_down", "k", "silhouette",
                                    "n_events", "n_sets_tested") if k in s]
    failed = [g.name for g in r.gates if not g.passed]
    if failed:
        bits.append("failed gates: " + ", ".join(failed))
    return "; ".join(str(b) for b in bits)


def _figures(engine) -> dict[str, bytes]:
    figs = {}
    for r in engine.records:
        if r.verdict == "accept" and r.result is not None:
            for name, png in sorted(r.result.figures.items()):
                figs[f"{r.step_id}_{r.tool}_{name}"] = png
    return figs


def _finish(engine, backend, out, truth, progress) -> RunResult:
    from . import hypotheses as H

    hyps = H.build(engine.records, engine.objectives, fdr=engine.fdr)
    hyps = H.verify(hyps, engine, fdr=engine.fdr)
    transcript: list = []
    if backend is not None and hyps and getattr(backend, "writes_text", True):
        hyps = H.llm_wording(hyps, backend, transcript=transcript)
    for t in transcript:
        engine.log.write("llm", **t)
    for h in hyps:
        engine.log.write("hypothesis", id=h.id, statement=h.statement, evidence=h.evidence, verified=h.verified)
    findings = findings_dict(engine, hyps, llm_name=getattr(backend, "name", "none") if backend else "none")
    if truth is not None:
        from .evaluate import score

        findings["evaluation"] = score(findings, truth)
    paths = write_reports(findings, out, _figures(engine)) if out is not None else {}
    engine.log.write("run_end", n_steps=len(engine.records), n_hypotheses=len(hyps))
    return RunResult(findings, hyps, engine, paths)


def run(data, meta=None, *, out=None, group: str | None = None, gene_sets=None, llm=None, planner: str = "auto",
        max_rounds: int = 2, seed: int = 0, fdr: float = 0.05, roles: dict | None = None, truth: dict | None = None,
        progress: bool = False, max_contrasts: int = 4, robustness_subsamples: int = 10) -> RunResult:
    """Run PROTEUS end to end.

    data: a :class:`~lmfuse.proteus.data.ProteomicsDataset` or a path (MaxQuant / DIA-NN / wide
    table); meta: sample metadata path (CSV/TSV/XLSX) when ``data`` is a path. out: output folder
    (``findings.json``, ``report.md``, ``report.html``, ``figures/``, ``artifacts/``,
    ``run_log.jsonl``); None keeps everything in memory. group: the metadata column to compare.
    gene_sets: a ``.gmt`` path or ``{name: [genes]}``. llm: None/"none", "local" (the bundled
    model), an ``http(s)://`` endpoint, or a backend object. planner: "auto" (rules without an LLM,
    hybrid with one), "rules", "llm", "hybrid". max_rounds: revision rounds per step. truth:
    planted truth of a generated cohort (adds an ``evaluation`` section).
    """
    from .engine import Engine
    from .llm import make_backend

    if not (isinstance(seed, int) and seed >= 0):
        raise ValueError(f"seed must be an int >= 0, got {seed!r}")
    if out is not None:
        out = Path(out)
        _check_out(out, (data, meta, gene_sets))
    ds = _load(data, meta, roles, group)
    sets = _gene_sets(gene_sets)
    backend = make_backend(llm)
    pl = make_planner(planner, backend, fdr=fdr, max_contrasts=max_contrasts)
    engine = Engine(ds, pl, gene_sets=sets, out_dir=out, seed=seed, max_rounds=max_rounds, fdr=fdr,
                    robustness_subsamples=robustness_subsamples, progress=progress)
    engine.run()
    return _finish(engine, backend, out, truth, progress)


def replay(run_dir, data, meta=None, *, out=None, group=None, gene_sets=None, roles=None, truth=None) -> RunResult:
    """Re-execute a logged run (``run_dir/run_log.jsonl``) on the same data: the objectives,
    actions and revision choices come from the log (no planner, no LLM); every step, gate and
    hypothesis is recomputed. Hypothesis wording from an LLM is replayed from the log. With the
    same ``gene_sets`` (and ``truth`` for a generated cohort) the result's ``findings.json``
    equals the original's byte for byte."""
    from .engine import Engine, LoggedPlanner
    from .llm import ReplayBackend

    log = Path(run_dir) / "run_log.jsonl"
    if not log.is_file():
        raise FileNotFoundError(f"run log not found: {log}")
    events = [json.loads(line) for line in log.read_text().splitlines() if line.strip()]
    pl = LoggedPlanner(events)
    start = pl.start
    ds = _load(data, meta, roles, group)
    if ds.fingerprint() != start["fingerprint"]:
        raise ValueError(f"data fingerprint {ds.fingerprint()[:12]} differs from the logged run's {start['fingerprint'][:12]}")
    engine = Engine(ds, pl, gene_sets=_gene_sets(gene_sets), out_dir=out, seed=start["seed"],
                    max_rounds=start["max_rounds"], fdr=start["fdr"],
                    robustness_subsamples=start.get("robustness_subsamples", 10))
    engine.run()
    wording = [e for e in events if e["event"] == "llm" and e.get("reply") is not None
               and '"statement"' in str(e.get("reply"))]
    backend = ReplayBackend([e["reply"] for e in wording], name=_logged_llm(run_dir)) if wording else None
    return _finish(engine, backend, out, truth, False)


def _logged_llm(run_dir) -> str:
    try:
        return json.loads((Path(run_dir) / "findings.json").read_text())["config"]["llm"]
    except (OSError, ValueError, KeyError):
        return "replay"


__all__ = ["run", "replay", "RunResult", "findings_dict", "dumps_findings", "make_planner"]


class _CallableModule(types.ModuleType):
    """``lmfuse.proteus.run`` is both this module and the function: once the submodule is imported,
    Python binds the package attribute ``run`` to the module, so the module forwards calls."""

    def __call__(self, *args, **kwargs):
        return run(*args, **kwargs)


sys.modules[__name__].__class__ = _CallableModule
