"""Evaluation of PROTEUS runs: recovery of planted truth on generated cohorts, and the
five-metric LLM judge with its control check.

:func:`score` compares a run's ``findings.json`` dict with the truth of
:func:`lmfuse.proteus.synth.make_cohort` (precision / recall / F1 of differential hits, sign
accuracy, planted pathways found and false ones reported, adjusted Rand index of the subtypes,
precision / recall of the survival signature, hypotheses made, claims not supported by their
evidence). :func:`seed_table` runs planted and null cohorts over several seeds.

The judge (:func:`judge`) scores hypotheses on five 1–5 anchored metrics (reliability, logical
coherence, consistency with the literature, novelty, evaluability) and only runs with an LLM
endpoint. :func:`check_judge` builds control hypotheses from the same run (evidence shuffled
between hypotheses; direction flipped) and reports the judge unreliable unless it scores the
controls' reliability lower by at least ``min_drop``.
"""

from __future__ import annotations

import random
from dataclasses import asdict, is_dataclass

import numpy as np

from .hypotheses import numbers_in

JUDGE_METRICS = ("reliability", "coherence", "literature", "novelty", "evaluability")
RUBRIC = {
    "reliability": ("claim contradicts or is absent from the cited results", "partly supported: direction right, "
                    "overreaching in magnitude or scope", "every claim matches the cited statistics and thresholds"),
    "coherence": ("non-sequitur or circular", "plausible with gaps", "each inference follows; alternatives acknowledged"),
    "literature": ("conflicts with well-established biology without saying so", "neutral or unclear",
                   "consistent with established knowledge, or explains a deviation"),
    "novelty": ("restates textbook knowledge or the input metadata", "incremental combination",
                "a non-obvious mechanism or association"),
    "evaluability": ("untestable or vague", "testable in principle, no design",
                     "a concrete falsifiable prediction and a feasible assay or cohort"),
}


def _truth_dict(truth) -> dict:
    if is_dataclass(truth):
        return asdict(truth)
    if isinstance(truth, dict):
        return truth
    raise TypeError(f"truth must be a SynthTruth or a dict, got {type(truth).__name__}")


def _prf(called: set, true: set) -> dict:
    tp = len(called & true)
    p = tp / len(called) if called else (1.0 if not true else 0.0)
    r = tp / len(true) if true else (1.0 if not called else 0.0)
    f = 2 * p * r / (p + r) if p + r else 0.0
    return {"precision": p, "recall": r, "f1": f, "called": len(called), "true": len(true), "tp": tp}


def unsupported_claims(findings: dict) -> int:
    """Claims of the reported hypotheses that the run's own result tables do not support (same
    entity, direction and q), plus numbers in statements that no claim carries."""
    from .hypotheses import Claim, Hypothesis, numbers_supported

    diff = {(d["step_id"], h["protein"]): h for d in findings["differential"] for h in d["hits"]}
    enr = {(e["step_id"], e["gene_set"], e["direction"]): e for e in findings["enrichment"]}
    surv = {(s["step_id"], s["protein"]): s for s in findings["survival"]}
    clus = {c["step_id"]: c for c in findings["clusters"]}
    bad = 0
    for hj in findings["hypotheses"]:
        for c in hj["claims"]:
            sid, subj = c["step_ids"][0], c["subject"].split(":", 1)[1]
            if c["relation"] in ("higher_in", "lower_in"):
                row = diff.get((sid, subj))
                ok = row is not None and (row["log2fc"] > 0) == (c["direction"] == "up") and row["q"] == c["q"]
            elif c["relation"].startswith("enriched_in"):
                row = enr.get((sid, subj, c["direction"]))
                ok = row is not None and row["q"] == c["q"]
            elif c["relation"].startswith("associated_with"):
                row = surv.get((sid, subj))
                ok = row is not None and (row["hazard_ratio"] > 1) == (c["relation"] == "associated_with_risk")
            else:
                row = clus.get(sid)
                ok = row is not None and row["robust"] and str(row["k"]) == subj
            bad += not ok
        h = Hypothesis(**{k: hj[k] for k in ("id", "objective_id", "kind", "statement", "entities", "direction", "q",
                                              "evidence", "prediction")}, claims=[Claim(**c) for c in hj["claims"]])
        bad += len(numbers_supported(h))
    return bad


def score(findings: dict, truth) -> dict:
    """Recovery metrics of a run (its findings dict) against planted ``truth``."""
    from .stats.cluster import adjusted_rand

    t = _truth_dict(truth)
    out: dict = {"null_cohort": bool(t["null"]), "n_hypotheses": len(findings["hypotheses"]),
                 "unsupported_claims": unsupported_claims(findings)}
    col, case, ctrl = t["contrast"]
    de = next((d for d in findings["differential"] if (d["column"], d["case"], d["control"]) == (col, case, ctrl)), None)
    called = {h["protein"]: h["log2fc"] for h in de["hits"]} if de else {}
    m = _prf(set(called), set(t["de"]))
    out.update({f"de_{k}": v for k, v in m.items()})
    common = set(called) & set(t["de"])
    out["de_sign_accuracy"] = (float(np.mean([np.sign(called[p]) == np.sign(t["de"][p]) for p in common]))
                               if common else None)
    sig_sets = {(e["gene_set"], e["direction"]) for e in findings["enrichment"]}
    planted = set(t["pathways"].items())
    out["pathways_planted"] = len(planted)
    out["pathways_found"] = len(planted & sig_sets)
    out["pathways_false"] = len({s for s, _ in sig_sets} - set(t["pathways"]))
    cl = next((c for c in findings["clusters"] if c["robust"]), None)
    if cl and not t["null"] and t["subtype_markers"]:
        sample_ids = sorted(cl["labels"])
        # the truth lists subtypes in dataset sample order, which is the sorted id order of synth
        lab_true = np.array(t["subtypes"])
        lab_pred = np.array([cl["labels"][s] for s in sample_ids])
        out["subtype_ari"] = float(adjusted_rand(lab_true, lab_pred)) if len(lab_true) == len(lab_pred) else None
        out["subtype_k"] = cl["k"]
    else:
        out["subtype_ari"], out["subtype_k"] = None, None
    surv_called = {s["protein"]: s["hazard_ratio"] for s in findings["survival"]}
    ms = _prf(set(surv_called), set(t["survival"]))
    out.update({f"survival_{k}": v for k, v in ms.items()})
    return out


def seed_table(seeds=(0, 1, 2), *, progress: bool = False, **spec) -> list[dict]:
    """Planted and null cohorts for each seed, run without an LLM; one row of metrics per run."""
    from tqdm.auto import tqdm

    from .run import run
    from .synth import make_cohort, make_null_cohort

    rows = []
    jobs = [(s, null) for s in seeds for null in (False, True)]
    for s, null in tqdm(jobs, disable=not progress, desc="evaluation runs"):
        c = (make_null_cohort if null else make_cohort)(seed=s, **spec)
        r = run(c.dataset, gene_sets=c.gene_sets, seed=s, truth=c.truth)
        rows.append({"seed": s, "cohort": "null" if null else "planted", **r.findings["evaluation"]})
    return rows


# ------------------------------------------------------------------------------ LLM judge


def _evidence_text(findings: dict, step_ids: list[str], entities=(), limit: int = 8) -> str:
    """The results of ``step_ids`` a reviewer sees: rows of the named ``entities`` first, else
    the top rows."""
    lines = []
    names = set(entities)
    for d in findings["differential"]:
        if d["step_id"] in step_ids:
            rows = [h for h in d["hits"] if (h["gene"] or h["protein"]) in names] or d["hits"][:limit]
            lines += [f"{h['gene'] or h['protein']}: log2FC {h['log2fc']:.3g}, q {h['q']:.2g} ({d['contrast']})"
                      for h in rows[:limit * 2]]
    for e in findings["enrichment"]:
        if e["step_id"] in step_ids:
            lines.append(f"gene set {e['gene_set']} {e['direction']} ({e['method']}), q {e['q']:.2g}")
    for s in findings["survival"]:
        if s["step_id"] in step_ids:
            lines.append(f"{s['gene'] or s['protein']}: hazard ratio {s['hazard_ratio']:.3g}, q {s['q']:.2g}")
    for c in findings["clusters"]:
        if c["step_id"] in step_ids:
            lines.append(f"{c['k']} clusters, silhouette {c['silhouette']}, stability {c['stability']}")
    return "\n".join(lines[:limit * 3]) or "(no results)"


def judge_schema() -> dict:
    metric = {"type": "object", "required": ["score", "rationale"], "additionalProperties": False,
              "properties": {"score": {"type": "integer", "enum": [1, 2, 3, 4, 5]},
                             "rationale": {"type": "string", "maxLength": 400}}}
    return {"type": "object", "required": list(JUDGE_METRICS), "additionalProperties": False,
            "properties": {m: metric for m in JUDGE_METRICS}}


def judge_prompt(objective: str, evidence: str, statement: str) -> list[dict]:
    rubric = "\n".join(f"- {m}: 1 = {a}; 3 = {b}; 5 = {c}" for m, (a, b, c) in RUBRIC.items())
    return [{"role": "system", "content": "You are a careful reviewer of scientific hypotheses. Score each metric "
             "from 1 to 5 using the anchors, and give a one-sentence rationale. Reply with JSON only."},
            {"role": "user", "content": f"Research objective: {objective}\n\nAnalysis results:\n{evidence}\n\n"
             f"Hypothesis: {statement}\n\nRubric:\n{rubric}"}]


def judge(findings: dict, backend, *, hypotheses: list[dict] | None = None, samples: int = 1,
          transcript: list | None = None) -> dict:
    """Scores ``{hypothesis id: {metric: mean score}}`` from ``backend`` (``samples`` replies per
    hypothesis, averaged). Without a backend: ``{"status": "not run"}``. A reply that does not
    validate after one retry leaves that hypothesis unscored."""
    from .llm.backend import LLMError, ask_json

    if backend is None:
        return {"status": "not run", "reason": "no LLM endpoint configured"}
    objectives = {o["id"]: o["title"] for o in findings["objectives"]}
    hyps = findings["hypotheses"] if hypotheses is None else hypotheses
    scores = {}
    for h in hyps:
        msgs = judge_prompt(objectives.get(h["objective_id"], ""),
                            _evidence_text(findings, h["evidence"], h.get("entities", ())), h["statement"])
        got = []
        for i in range(samples):
            try:
                got.append(ask_json(backend, msgs, judge_schema(), temperature=0.7 if samples > 1 else 0.0,
                                    seed=i, transcript=transcript))
            except LLMError:
                pass
        if got:
            scores[h["id"]] = {m: float(np.mean([g[m]["score"] for g in got])) for m in JUDGE_METRICS}
    return {"status": "ok", "scores": scores}


def control_hypotheses(findings: dict, seed: int = 0) -> dict[str, list[dict]]:
    """Controls built from the run's own hypotheses: ``shuffled`` pairs each statement with
    the evidence steps of another hypothesis (from different steps); ``flipped`` reverses every stated direction
    (higher ↔ lower, up ↔ down, risk ↔ protection) with the evidence unchanged."""
    hyps = findings["hypotheses"]
    rng = random.Random(seed)
    shuffled = []
    for h in hyps:  # evidence from a different step (hypotheses of one step share their evidence)
        others = sorted({tuple(o["evidence"]) for o in hyps if o["evidence"] != h["evidence"]})
        if others:
            shuffled.append({**h, "id": f"{h['id']}-shuffled", "evidence": list(rng.choice(others))})
    swaps = [("higher", "lower"), ("shorter", "longer"), (" up ", " down "), ("risk", "protection")]
    flipped = []
    for h in hyps:
        text = h["statement"]
        for a, b in swaps:
            text = text.replace(a, "\0").replace(b, a).replace("\0", b)
        if text != h["statement"]:
            flipped.append({**h, "id": f"{h['id']}-flipped", "statement": text})
    return {"shuffled": shuffled, "flipped": flipped}


def check_judge(findings: dict, backend, *, min_drop: float = 1.0, seed: int = 0) -> dict:
    """Judge the real hypotheses and the controls; the judge is ``reliable`` when the mean
    reliability of each control kind is at least ``min_drop`` below the real hypotheses'."""
    if backend is None:
        return {"status": "not run", "reason": "no LLM endpoint configured"}
    real = judge(findings, backend)["scores"]
    ctrl = control_hypotheses(findings, seed)
    out = {"status": "ok", "real": real, "controls": {}, "drop": {}}
    base = np.mean([s["reliability"] for s in real.values()]) if real else float("nan")
    reliable = bool(real)
    for kind, hyps in ctrl.items():
        if not hyps:
            continue
        sc = judge(findings, backend, hypotheses=hyps)["scores"]
        out["controls"][kind] = sc
        drop = float(base - np.mean([s["reliability"] for s in sc.values()])) if sc else float("nan")
        out["drop"][kind] = drop
        reliable &= bool(np.isfinite(drop) and drop >= min_drop)
    out["reliable"] = reliable
    return out


__all__ = ["score", "seed_table", "unsupported_claims", "judge", "check_judge", "control_hypotheses", "JUDGE_METRICS",
           "RUBRIC", "judge_schema", "numbers_in"]
