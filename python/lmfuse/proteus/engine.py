"""The PROTEUS executor: every planned step is validated, run, cached by content hash and logged;
after each step code-decided quality gates accept it, ask for a revision (up to ``max_rounds``
per step), or reject it.

* Validation: the tool registry validates arguments against the tool's pydantic model and the
  data (columns, levels) before anything runs; an invalid action becomes an ``error`` step.
* Caching: a step's key is sha256 over (tool, canonical args, input view fingerprint, the step it
  reads, lmfuse version); a repeated key reuses the result (``cached: true`` in the log).
* Artifacts: tables (TSV) and figures (PNG) are stored content-addressed under
  ``artifacts/<hash[:2]>/<hash>.<ext>``; steps list the hashes.
* Run log: ``run_log.jsonl``, one JSON line per event (run start, objective, step, verdict, LLM
  exchange, hypothesis, run end). :func:`replay` re-executes a run from its log alone (no planner,
  no LLM) and reproduces ``findings.json`` byte for byte.
* Gates (see :mod:`lmfuse.proteus._gates`): proteins kept after filtering, group sizes,
  confounding of group with batch (Cramér's V), the p-value histogram, hit stability under another
  imputation and under subsampling, cluster silhouette / bootstrap stability / a permutation null,
  survival event counts and proportional hazards. The planner (rules or an LLM) chooses among the
  revisions the gates suggest; code decides acceptance.
"""

from __future__ import annotations

import hashlib
import json
import time
from dataclasses import dataclass, field, replace
from pathlib import Path

import numpy as np

from . import _gates as G
from .planner.base import Action, Objective, Revision


def _canon(obj) -> str:
    return json.dumps(obj, sort_keys=True, separators=(",", ":"), default=str)


def _sha(text: str | bytes) -> str:
    return hashlib.sha256(text.encode() if isinstance(text, str) else text).hexdigest()


def _lmfuse_version() -> str:
    try:
        import importlib.metadata

        return importlib.metadata.version("lmfuse")
    except Exception:
        return "dev"


def _num(x):
    """A JSON-safe float (NaN/inf → None), rounded to 12 significant digits so text is stable."""
    if x is None:
        return None
    x = float(x)
    return float(f"{x:.12g}") if np.isfinite(x) else None


class ArtifactStore:
    """Content-addressed files under ``root`` (None: keep nothing on disk, hashes only)."""

    def __init__(self, root=None):
        self.root = Path(root) if root is not None else None

    def put(self, data: bytes, ext: str) -> str:
        h = _sha(data)
        if self.root is not None:
            p = self.root / h[:2] / f"{h}.{ext}"
            if not p.exists():
                p.parent.mkdir(parents=True, exist_ok=True)
                p.write_bytes(data)
        return h

    def path(self, h: str, ext: str) -> Path | None:
        return None if self.root is None else self.root / h[:2] / f"{h}.{ext}"


class RunLog:
    """Append-only JSONL log (kept in memory too: ``events``)."""

    def __init__(self, path=None):
        self.path = Path(path) if path is not None else None
        self.events: list[dict] = []
        if self.path is not None:
            self.path.parent.mkdir(parents=True, exist_ok=True)
            self.path.write_text("")

    def write(self, event: str, **fields) -> None:
        rec = {"event": event, **fields}
        self.events.append(rec)
        if self.path is not None:
            with open(self.path, "a") as f:
                f.write(json.dumps(rec, sort_keys=True, default=str) + "\n")


@dataclass
class StepRecord:
    """One executed step. ``result`` (the tool's ToolResult) and ``evidence`` (normalised tables
    for findings and hypotheses) stay in memory; the rest is logged."""

    step_id: str
    objective_id: str
    round: int
    tool: str
    args: dict
    view: str
    from_step: str | None
    key: str
    status: str = "ok"  # ok | error
    error: str = ""
    verdict: str = "accept"  # accept | revise | reject | error
    gates: list = field(default_factory=list)
    summary: dict = field(default_factory=dict)
    artifacts: dict = field(default_factory=dict)
    cached: bool = False
    duration_s: float = 0.0
    planner: str = "rules"
    result: object = None
    evidence: dict | None = None

    def to_json(self) -> dict:
        return {"id": self.step_id, "objective_id": self.objective_id, "round": self.round, "tool": self.tool,
                "args": self.args, "view": self.view, "from_step": self.from_step, "key": self.key,
                "status": self.status, "error": self.error, "verdict": self.verdict,
                "gates": G.gate_dict(self.gates), "summary": self.summary, "artifacts": self.artifacts,
                "planner": self.planner}


# ------------------------------------------------------------------------------ evidence


def extract_evidence(tool: str, res, fdr: float) -> dict | None:
    """Normalised evidence of a step (the tables findings.json and hypotheses are built from)."""
    a = res.args
    if tool == "differential_abundance":
        tab = res.tables["differential"]
        thr = float(a.get("min_abs_log2fc", 0.0) or 0.0)
        use_fdr = float(a.get("fdr", fdr))
        sig = tab[(tab.q <= use_fdr) & (tab.log2fc.abs() >= thr)]
        rows = [{"protein": str(r.protein), "gene": str(r.gene or ""), "log2fc": _num(r.log2fc), "p": _num(r.p),
                 "q": _num(r.q)} for r in sig.itertuples()]
        return {"kind": "differential", "contrast": f"{a['group_column']}:{a['case']} vs {a['control']}",
                "column": a["group_column"], "case": a["case"], "control": a["control"], "fdr": use_fdr,
                "n_tested": int(tab.p.notna().sum()), "rows": rows}
    if tool in ("gsea_prerank", "enrichment_ora"):
        tab = next(iter(res.tables.values()), None)
        if tab is None or len(tab) == 0:
            return {"kind": "enrichment", "method": tool, "rows": []}
        cols = set(tab.columns)
        name_col = next(c for c in ("gene_set", "term", "name", "set") if c in cols)
        qcol = next(c for c in ("q", "fdr", "FDR", "qvalue") if c in cols)
        eff = next((c for c in ("nes", "NES", "fold", "odds_ratio", "es", "effect") if c in cols), None)
        thr = float(a.get("set_fdr", a.get("fdr", fdr)))
        rows = []
        for r in tab.to_dict("records"):
            q = _num(r.get(qcol))
            if q is None or q > thr:
                continue
            e = _num(r.get(eff)) if eff else None
            d = r.get("direction")
            if d not in ("up", "down"):
                d = "up" if (e is None or e >= 0 or tool == "enrichment_ora") else "down"
            rows.append({"gene_set": str(r[name_col]), "direction": d, "effect": e, "p": _num(r.get("p")),
                         "q": q, "size": int(r["size"]) if "size" in r and r["size"] == r["size"] else None})
        return {"kind": "enrichment", "method": tool, "contrast": _contrast_of(res), "rows": rows}
    if tool == "cluster_samples":
        s, d = res.summary, res.diagnostics
        k = s.get("k")
        tab = res.tables["clusters"]
        labels = {str(smp): int(str(lab).lstrip("C")) - 1 for smp, lab in zip(tab["sample"], tab["cluster"])}
        sizes = sorted(np.bincount(list(labels.values())).tolist(), reverse=True) if labels else []
        sil = d.get("silhouette_by_k", {}).get(str(k), s.get("silhouette"))
        return {"kind": "clusters", "k": int(k) if k is not None else None, "silhouette": _num(sil),
                "stability": _num(d.get("stability_ari")), "labels": labels, "sizes": sizes, "robust": False}
    if tool == "survival_cox":
        tab = next(iter(res.tables.values()))
        hr_col = next(c for c in ("hazard_ratio", "hr", "HR") if c in tab.columns)
        rows, drifting = [], []
        for r in tab.to_dict("records"):
            if not (r["q"] == r["q"] and r["q"] <= float(a.get("fdr", fdr))):
                continue
            ph = _num(r.get("ph_p"))
            if ph is not None and ph <= G.MIN_PH_P:  # hazard ratio drifts over time: not a claimable constant effect
                drifting.append(str(r["protein"]))
                continue
            rows.append({"protein": str(r["protein"]), "gene": str(r.get("gene") or ""), "hr": _num(r[hr_col]),
                         "p": _num(r["p"]), "q": _num(r["q"]), "ph_p": ph})
        return {"kind": "survival", "rows": rows, "excluded_nonproportional": drifting}
    if tool == "correlate_clinical":
        tab = res.tables["correlation"]
        sig = tab[tab.q <= float(a.get("fdr", fdr))]
        return {"kind": "correlation", "variable": a["variable"],
                "rows": [{"protein": str(r.protein), "gene": str(r.gene or ""), "r": _num(r.r), "p": _num(r.p),
                          "q": _num(r.q)} for r in sig.itertuples()]}
    return None


def _contrast_of(res) -> str:
    c = str(res.summary.get("contrast", ""))  # "group:<column>=<case> vs <control>"
    if c.startswith("group:") and "=" in c:
        col, rest = c[6:].split("=", 1)
        return f"{col}:{rest}"
    return c


# ------------------------------------------------------------------------------ engine


class Engine:
    """Runs a plan on ``dataset``: preprocessing (objective ``O0``), then each objective's
    workflow, with gates and bounded revisions. ``gene_sets``: name → genes for enrichment.
    ``out_dir``: where ``artifacts/`` and ``run_log.jsonl`` go (None: in memory only).
    ``robustness_subsamples``: 80% subsamples used by the hit-stability gate."""

    def __init__(self, dataset, planner, *, gene_sets=None, out_dir=None, seed: int = 0, max_rounds: int = 2,
                 fdr: float = 0.05, robustness_subsamples: int = 10, progress: bool = False, max_steps: int = 80):
        from .tools.registry import ToolContext

        if not (isinstance(max_rounds, int) and 0 <= max_rounds <= 10):
            raise ValueError(f"max_rounds must be an int in [0, 10], got {max_rounds!r}")
        if fdr not in (0.01, 0.05, 0.1):
            raise ValueError(f"fdr must be 0.01, 0.05 or 0.1, got {fdr!r}")
        self.dataset, self.planner = dataset, planner
        self.gene_sets = dict(gene_sets) if gene_sets else None
        self.seed, self.max_rounds, self.fdr = int(seed), max_rounds, fdr
        self.subsamples, self.max_steps = int(robustness_subsamples), int(max_steps)
        out = Path(out_dir) if out_dir is not None else None
        self.store = ArtifactStore(out / "artifacts" if out else None)
        self.log = RunLog(out / "run_log.jsonl" if out else None)
        self.ctx = ToolContext(seed=self.seed, gene_sets=self.gene_sets, figures=True)
        self.records: list[StepRecord] = []
        self.objectives: list[Objective] = []
        self.views: dict[str, object] = {"raw": dataset, "main": dataset}
        self._cache: dict[str, object] = {}
        self._bar = None
        self.progress = progress
        self.version = _lmfuse_version()

    # ------------------------------------------------------------------ execution
    def _view_dataset(self, view: str):
        if view in self.views:
            return self.views[view]
        if view in ("knn", "minprob", "complete"):  # alternative imputations of the prepared data
            from .tools.registry import run_tool

            base = self.views.get("pre_impute", self.views["main"])
            if view == "complete":
                self.views[view] = base
            else:
                res = run_tool("impute", base, {"method": view}, seed=self.seed)
                self.views[view] = res.dataset
            return self.views[view]
        raise KeyError(f"unknown data view {view!r}")

    def execute(self, action: Action, objective_id: str, round_: int = 0, view: str = "main",
                from_step: str | None = None, planner: str = "rules") -> StepRecord:
        """Validate and run one action (cached), store its artifacts, log it. Never raises for a
        tool error: the record has ``status="error"``."""
        from .tools.registry import ToolContext, run_tool

        if len(self.records) >= self.max_steps:
            raise RuntimeError(f"step budget of {self.max_steps} steps exhausted")
        ds = self._view_dataset(view)
        step_id = f"S{len(self.records) + 1}"
        key = _sha(_canon([action.tool, action.args, ds.fingerprint(), self._key_of(from_step), self.version,
                           self.seed]))
        rec = StepRecord(step_id, objective_id, round_, action.tool, dict(action.args), view, from_step, key,
                         planner=planner)
        t0 = time.perf_counter()
        if key in self._cache:
            res, rec.cached = self._cache[key], True
        else:
            ctx = ToolContext(seed=int(key[:8], 16), gene_sets=self.gene_sets,
                              results=self._results_for(from_step), figures=True)
            try:
                res = run_tool(action.tool, ds, action.args, context=ctx)
                self._cache[key] = res
            except Exception as e:  # a tool or validation error is a step outcome, not a crash
                res = None
                rec.status, rec.verdict, rec.error = "error", "error", f"{type(e).__name__}: {e}"
        rec.duration_s = time.perf_counter() - t0
        rec.result = res
        if res is not None:
            rec.args = dict(res.args)
            rec.summary = _plain(res.summary)
            rec.artifacts = self._store(res)
            try:
                rec.evidence = extract_evidence(action.tool, res, self.fdr)
            except (KeyError, StopIteration, AttributeError) as e:
                rec.evidence = None
                rec.summary = {**rec.summary, "evidence_error": f"{type(e).__name__}: {e}"}
        self.records.append(rec)
        if self._bar is not None:
            self._bar.update(1)
            self._bar.set_postfix_str(f"{step_id} {action.tool}")
        return rec

    def _key_of(self, step_id):
        if step_id is None:
            return None
        return next(r.key for r in self.records if r.step_id == step_id)

    def _results_for(self, from_step):
        if from_step is None:
            return {}
        rec = next(r for r in self.records if r.step_id == from_step)
        return {from_step: rec.result} if rec.result is not None else {}

    def _store(self, res) -> dict:
        arts = {}
        for name, tab in sorted(res.tables.items()):
            data = tab.to_csv(sep="\t", index=False, float_format="%.10g").encode()
            arts[f"table:{name}"] = self.store.put(data, "tsv")
        for name, png in sorted(res.figures.items()):
            arts[f"figure:{name}"] = self.store.put(png, "png")
        return arts

    def _log_step(self, rec: StepRecord) -> None:
        self.log.write("step", **rec.to_json(), cached=rec.cached, duration_s=round(rec.duration_s, 4))

    # ------------------------------------------------------------------ gates
    def check(self, rec: StepRecord) -> tuple[list[G.Gate], list[Revision]]:
        """Gates for a finished step and the revisions they suggest (best first)."""
        if rec.status != "ok":
            return [G.Gate("ran", rec.error, "no error", False)], []
        res, d = rec.result, rec.result.diagnostics
        gates: list[G.Gate] = []
        sugg: list[Revision] = []
        tool, args = rec.tool, rec.args
        if tool == "filter_proteins" and res.dataset is not None:
            kept = res.dataset.n_proteins
            need = min(G.MIN_PROTEINS_KEPT, max(1, self.dataset.n_proteins // 2))
            gates.append(G.Gate("proteins_kept", kept, f">= {need}", kept >= need))
            frac = args.get("min_valid_fraction")
            if kept < need and frac is not None and frac > 0.5:
                sugg.append(Revision("too few proteins kept: relax the valid-value filter to 50%",
                                     Action(tool, {**args, "min_valid_fraction": 0.5}, "filter")))
        elif tool == "differential_abundance":
            n_case, n_ctrl = d.get("n_case", 0), d.get("n_control", 0)
            gates.append(G.Gate("group_size", min(n_case, n_ctrl), f">= {G.MIN_GROUP} per group",
                                min(n_case, n_ctrl) >= G.MIN_GROUP))
            ds = self._view_dataset(rec.view)
            prof_batch = ds.profile().batch_column
            if prof_batch and prof_batch != args["group_column"]:
                g = ds.column(args["group_column"]).values
                keep = np.isin(g.astype(str), [args["case"], args["control"]])
                v = G.cramers_v(g[keep], ds.column(prof_batch).values[keep])
                ok = v < G.MAX_CRAMERS_V or prof_batch in args.get("covariates", [])
                gates.append(G.Gate("batch_confounding", v, f"Cramér's V < {G.MAX_CRAMERS_V} or batch adjusted", ok,
                                    note=f"batch column {prof_batch}"))
                if not ok and v < 0.999 and "covariates" in args:
                    sugg.append(Revision(f"group is confounded with {prof_batch}: adjust for it",
                                         Action(tool, {**args, "covariates": list(args["covariates"]) + [prof_batch]}, "da")))
            gates.append(G.global_signal_gate(res.tables["differential"].p))
            ph = G.p_histogram_gate(d.get("p_histogram"))
            gates.append(ph)
            if not ph.passed and ph.severity == "fail" and rec.view == "main":
                sugg.append(Revision("p-value histogram is anomalous: re-test on KNN-imputed data",
                                     Action(tool, dict(args), "da", purpose="view:knn")))
            d0 = d.get("prior_d0")
            if d0 is not None:
                gates.append(G.Gate("ebayes_prior_d0", _num(d0), "finite", bool(np.isfinite(d0)), "warn"))
        elif tool == "cluster_samples":
            ev = rec.evidence or {}
            sil, stab = ev.get("silhouette"), ev.get("stability")
            gates.append(G.Gate("silhouette", sil, f">= {G.MIN_SILHOUETTE}", sil is not None and sil >= G.MIN_SILHOUETTE))
            gates.append(G.Gate("bootstrap_stability", stab, f">= {G.MIN_CLUSTER_STABILITY}",
                                stab is not None and stab >= G.MIN_CLUSTER_STABILITY))
            batch = self._view_dataset(rec.view).profile().batch_column
            if batch and ev.get("labels"):
                ds = self._view_dataset(rec.view)
                lab = np.array([str(ev["labels"].get(sm)) for sm in ds.sample_ids], dtype=object)
                v = G.cramers_v(lab, ds.column(batch).values)
                gates.append(G.Gate("clusters_vs_batch", v, f"Cramér's V < {G.MAX_CRAMERS_V}", v < G.MAX_CRAMERS_V,
                                    note=f"batch column {batch}"))
            if any(not g.passed for g in gates):
                return gates, sugg  # the permutation null is costly: only for otherwise-passing clusterings
            pnull = self._cluster_null_p(rec)
            gates.append(G.Gate("silhouette_vs_permutation_null", pnull, "<= 0.05", pnull is not None and pnull <= 0.05))
        elif tool == "survival_cox":
            ev = d.get("n_events")
            gates.append(G.Gate("events", ev, f">= {G.MIN_EVENTS}", ev is not None and ev >= G.MIN_EVENTS))
            # per-protein Cox p-values are correlated through shared factors, so a binomial count of
            # small p-values over-rejects on a null cohort: the tool's permutation test decides
            # (the same for correlate_clinical below)
            gates.append(G.permutation_global_gate(
                d.get("global_permutation_p"), "max |r| of proteins with the log-rank scores vs permuted (time, event) pairs"))
            php = d.get("ph_min_p")
            if php is not None:  # per hit: a hit that fails it is left out of the evidence (extract_evidence)
                gates.append(G.Gate("proportional_hazards", _num(php), f"min Schoenfeld p > {G.MIN_PH_P}",
                                    php > G.MIN_PH_P, "warn", note="hits at or below the threshold are not claimed"))
        elif tool in ("correlate_clinical",):
            pv = res.tables["correlation"].p.dropna().to_numpy()
            gates.append(G.permutation_global_gate(d.get("global_permutation_p"),
                                                   "max |r| over proteins vs permutations of the variable"))
            gates.append(G.p_histogram_gate(np.histogram(pv, bins=10, range=(0, 1))[0].tolist()))
        return gates, sugg

    def _cluster_null_p(self, rec: StepRecord, n_perm: int = 19) -> float | None:
        """Permutation p of the clustering structure: the best silhouette over the step's k range
        (same features, PCA and k-means as the tool) on the real data, ranked among the same
        statistic on data whose proteins are each permuted across samples independently (which
        keeps every protein's distribution and destroys joint structure). 19 permutations: the
        smallest p is 0.05."""
        ds = self._view_dataset(rec.view)
        a = rec.args
        ks = [a["k"]] if a.get("k") else list(range(a.get("k_min", 2), a.get("k_max", 6) + 1))
        X = ds.X[~np.isnan(ds.X).any(1)]
        if X.shape[0] < 10:
            return None
        X = X[np.argsort(-X.var(1), kind="stable")[: a.get("n_features", 500)]]
        rng = np.random.default_rng(int(rec.key[:8], 16))
        obs = _best_silhouette(X, ks, a.get("n_components", 10), seed=0)
        exceed = 0
        for i in range(n_perm):
            Xp = np.array([row[rng.permutation(row.size)] for row in X])
            exceed += _best_silhouette(Xp, ks, a.get("n_components", 10), seed=i + 1) >= obs
        return (exceed + 1) / (n_perm + 1)

    def _robustness(self, rec: StepRecord) -> G.Gate:
        """Hit stability of a differential step: each hit is re-tested on data imputed another
        way (must stay at q <= fdr with the same sign) and on ``subsamples`` random 80% subsets of
        the samples of each group (must stay at nominal p <= 0.05 with the same sign, the power
        being lower); a hit's stability is the fraction of these re-tests it passes, and hits
        below 0.7 are marked fragile and leave the evidence."""
        from .tools.registry import ToolContext, run_tool

        ev = rec.evidence
        hits = ev["rows"] if ev else []
        if not hits:
            return G.Gate("hit_stability", None, f">= {G.MIN_HIT_STABILITY}", True, "warn", "no hits")
        ds = self._view_dataset(rec.view)
        args = rec.args
        sign = {h["protein"]: np.sign(h["log2fc"]) for h in hits}
        passed = {p: 0 for p in sign}
        n = 0
        alt_view = {"main": "knn", "knn": "minprob"}.get(rec.view) if "pre_impute" in self.views else None
        if alt_view is not None:
            res = run_tool(rec.tool, self._view_dataset(alt_view), args, context=ToolContext(seed=self.seed, figures=False))
            tab = res.tables["differential"].set_index("protein")
            for p in sign:
                if p in tab.index and tab.at[p, "q"] <= args["fdr"] and np.sign(tab.at[p, "log2fc"]) == sign[p]:
                    passed[p] += 1
            n += 1
        g = ds.column(args["group_column"]).values
        rng = np.random.default_rng(int(rec.key[8:16], 16))
        for _ in range(self.subsamples):
            keep = []
            for lvl in (args["case"], args["control"]):
                idx = np.flatnonzero(g == lvl)
                keep += rng.choice(idx, size=max(G.MIN_GROUP, int(round(0.8 * idx.size))), replace=False).tolist()
            sub = ds.subset(samples=np.sort(np.array(keep)))
            res = run_tool(rec.tool, sub, args, context=ToolContext(seed=self.seed, figures=False))
            tab = res.tables["differential"].set_index("protein")
            for p in sign:
                if p in tab.index and tab.at[p, "p"] <= 0.05 and np.sign(tab.at[p, "log2fc"]) == sign[p]:
                    passed[p] += 1
            n += 1
        stable = 0
        for h in hits:
            h["stability"] = _num(passed[h["protein"]] / n) if n else None
            stable += n == 0 or passed[h["protein"]] / n >= G.MIN_HIT_STABILITY
        ev["fragile"] = [h["protein"] for h in hits if n and passed[h["protein"]] / n < G.MIN_HIT_STABILITY]
        ev["rows"] = [h for h in hits if h["protein"] not in set(ev["fragile"])]
        frac = stable / len(hits)
        return G.Gate("hit_stability", _num(frac), f"fraction of hits with stability >= {G.MIN_HIT_STABILITY}",
                      True, "warn", f"{stable} of {len(hits)} hits stable over {n} re-tests")

    def judge(self, rec: StepRecord, rounds_left: bool) -> tuple[str, list[Revision]]:
        gates, sugg = self.check(rec)
        rec.gates = gates
        failed = [g for g in gates if not g.passed and g.severity == "fail"]
        if rec.status != "ok":
            return "error", []
        if not failed:
            if rec.tool == "differential_abundance":
                rec.gates.append(self._robustness(rec))
            if rec.tool == "cluster_samples" and rec.evidence is not None:
                rec.evidence["robust"] = True
            return "accept", []
        if sugg and rounds_left:
            return "revise", sugg
        return "reject", []

    # ------------------------------------------------------------------ the loop
    def _run_action(self, act: Action, obj: Objective, uses: dict, planner_name: str) -> StepRecord:
        round_ = 0
        view = "main"
        while True:
            from_step = uses.get(act.uses) if act.uses else None
            if act.uses and from_step is None:
                rec = StepRecord(f"S{len(self.records) + 1}", obj.id, round_, act.tool, act.args, view, None, "",
                                 status="skipped", verdict="skipped",
                                 error=f"skipped: needs step {act.uses!r}, which was not accepted")
                self.records.append(rec)
                self._log_step(rec)
                return rec
            if from_step is not None:
                act = Action(act.tool, {**act.args, "from_step": from_step}, act.name, act.uses, act.purpose)
            if act.purpose.startswith("view:"):
                view = act.purpose[5:]
            rec = self.execute(act, obj.id, round_, view, from_step, planner_name)
            verdict, sugg = self.judge(rec, round_ < self.max_rounds)
            rec.verdict = verdict
            self._log_step(rec)
            if verdict != "revise":
                return rec
            choice = self.planner.revise(obj, rec.to_json(), sugg)
            self.log.write("revision", step_id=rec.step_id, options=[s.reason for s in sugg],
                           chosen=choice.reason if choice else None, action=choice.action.to_json() if choice else None)
            if choice is None:
                rec.verdict = "reject"
                return rec
            act, round_ = choice.action, round_ + 1

    def run(self) -> "Engine":
        """Plan and execute everything; returns self (``records``, ``objectives``)."""
        profile = self.dataset.profile()
        has_sets = bool(self.gene_sets)
        self.log.write("run_start", dataset=self.dataset.name, fingerprint=self.dataset.fingerprint(),
                       n_proteins=self.dataset.n_proteins, n_samples=self.dataset.n_samples,
                       planner=self.planner.name, seed=self.seed, max_rounds=self.max_rounds, fdr=self.fdr,
                       robustness_subsamples=self.subsamples,
                       gene_sets=sorted(self.gene_sets) if self.gene_sets else [], lmfuse=self.version)
        self.objectives = self.planner.objectives(profile, gene_sets=has_sets)
        for o in self.objectives:
            self.log.write("objective", **o.to_json())
        if self.progress:
            from tqdm.auto import tqdm

            self._bar = tqdm(desc="proteus steps", unit="step")
        try:
            prep = Objective("O0", "preparation", "Data preparation", {})
            current = self.dataset
            self.views["main"] = current
            for act in self.planner.preprocessing(profile):
                self.log.write("plan", objective_id="O0", action=act.to_json())
                if act.tool == "impute":
                    self.views["pre_impute"] = current
                rec = self._run_action(act, prep, {}, "rules")
                if rec.verdict == "accept" and rec.result is not None and rec.result.dataset is not None:
                    current = rec.result.dataset
                    self.views["main"] = current
                    for alt in ("knn", "minprob", "complete"):
                        self.views.pop(alt, None)
            for obj in self.objectives:
                actions = self.planner.workflow(obj, current.profile(), gene_sets=has_sets)
                uses: dict[str, str] = {}
                for act in actions:
                    self.log.write("plan", objective_id=obj.id, action=act.to_json())
                    rec = self._run_action(act, obj, uses, self.planner.name)
                    if rec.verdict == "accept":
                        uses[act.name] = rec.step_id
        finally:
            if self._bar is not None:
                self._bar.close()
                self._bar = None
        for o in self.objectives:
            recs = [r for r in self.records if r.objective_id == o.id]
            o.status = "completed" if any(r.verdict == "accept" for r in recs) else "no accepted result"
        for t in getattr(self.planner, "transcript", []):
            self.log.write("llm", **t)
        return self

    def recompute(self, rec: StepRecord) -> dict | None:
        """The step's evidence recomputed from scratch (no cache), for hypothesis verification."""
        from .tools.registry import ToolContext, run_tool

        res = run_tool(rec.tool, self._view_dataset(rec.view), rec.args,
                       context=ToolContext(seed=int(rec.key[:8], 16), gene_sets=self.gene_sets,
                                           results=self._results_for(rec.from_step), figures=False))
        return extract_evidence(rec.tool, res, self.fdr)


def _best_silhouette(X: np.ndarray, ks: list[int], n_components: int, seed: int) -> float:
    """Max over k of the k-means silhouette on the first principal components of the z-scored
    samples x proteins matrix (PCA through the n x n Gram matrix: cheap for n << proteins)."""
    from .stats.cluster import kmeans, silhouette

    Z = X.T
    sd = Z.std(0)
    Z = (Z - Z.mean(0)) / np.where(sd > 0, sd, 1)
    from scipy.linalg import eigh

    n = Z.shape[0]
    k = min(n_components, n - 1)
    w, V = eigh(Z @ Z.T, subset_by_index=[n - k, n - 1])  # only the top k eigenpairs
    order = np.argsort(-w)
    sc = V[:, order] * np.sqrt(np.maximum(w[order], 0))
    best = -1.0
    for k in ks:
        if k < Z.shape[0]:
            best = max(best, silhouette(sc, kmeans(sc, k, n_init=3, seed=seed)[0]))
    return best


def _plain(x):
    from .tools.registry import _plain as plain

    return json.loads(json.dumps(plain(x), default=str))


# ------------------------------------------------------------------------------ replay


class LoggedPlanner:
    """Replays the objectives, actions and revision choices of a run log (no LLM needed)."""

    def __init__(self, events: list[dict]):
        start = next((e for e in events if e["event"] == "run_start"), None)
        if start is None:
            raise ValueError("run log has no run_start event")
        self.name = "replay:" + start["planner"]
        self.start = start
        self._objs = [Objective(e["id"], e["kind"], e["title"], e["params"], e.get("rationale", ""))
                      for e in events if e["event"] == "objective"]
        self._plans: dict[str, list[Action]] = {}
        for e in events:
            if e["event"] == "plan":
                self._plans.setdefault(e["objective_id"], []).append(Action(**e["action"]))
        self._revisions = [e for e in events if e["event"] == "revision"]

    def objectives(self, profile, *, gene_sets=False):
        return [replace(o) for o in self._objs]

    def preprocessing(self, profile):
        return list(self._plans.get("O0", []))

    def workflow(self, objective, profile, *, gene_sets=False):
        return list(self._plans.get(objective.id, []))

    def revise(self, objective, failed, suggestions):
        rev = self._revisions.pop(0)
        if rev["chosen"] is None:
            return None
        return next(s for s in suggestions if s.reason == rev["chosen"])
