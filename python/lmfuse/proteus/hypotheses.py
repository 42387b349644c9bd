"""Grounded hypotheses: typed claims built from accepted analysis steps, re-verified by
recomputation, and written as text that contains no number that no step produced.

A :class:`Hypothesis` holds :class:`Claim` s (subject, relation, object, direction, effect, q,
the ids of the supporting steps). Claims come only from *accepted* steps' evidence (the
normalised tables the engine keeps, see :mod:`lmfuse.proteus.engine`): differential abundance
hits that passed the robustness gate, significant gene sets, Cox hits, robust subtypes.
:func:`verify` recomputes each supporting step and checks every claim again (same direction,
q within the threshold, same effect); failing claims are dropped, and a hypothesis left with
none is not reported. Statements come from templates, or from an LLM when one is configured; an
LLM statement that names a number absent from the evidence is replaced by the template
(:func:`numbers_supported`).
"""

from __future__ import annotations

import math
import re
from typing import Literal

from pydantic import BaseModel, Field

RELATIONS = ("higher_in", "lower_in", "enriched_in_up", "enriched_in_down", "associated_with_risk",
             "associated_with_protection", "defines_subtype")


class Claim(BaseModel):
    """One machine-checkable statement. ``subject``: ``protein:<id>``, ``gene_set:<name>``,
    ``clusters:<k>``; ``object``: ``contrast:<column>:<case> vs <control>`` or ``survival`` or
    ``samples``; ``effect``: log2 fold change / hazard ratio / NES or odds ratio / silhouette."""

    subject: str
    label: str = ""  # the display name (gene symbol, set name)
    relation: Literal[RELATIONS]
    object: str
    direction: Literal["up", "down", "none"] = "none"
    effect: float | None = None
    q: float | None = None
    statistic: str = ""  # what ``effect`` is: "log2 fold change", "NES", "fold enrichment", "hazard ratio", ...
    step_ids: list[str] = Field(default_factory=list)


class Hypothesis(BaseModel):
    id: str
    objective_id: str
    kind: Literal["differential", "enrichment", "survival", "subtype"]
    statement: str
    claims: list[Claim]
    entities: list[str]
    direction: Literal["up", "down", "none", "mixed"]
    q: float | None
    evidence: list[str]  # step ids
    prediction: str
    verified: bool = False
    text_source: Literal["template", "llm"] = "template"
    novelty: Literal["known", "unknown", "unassessed"] = "unassessed"
    scores: dict[str, float] = Field(default_factory=dict)


# ------------------------------------------------------------------------------- numbers

_NUMBER = re.compile(r"(?<![A-Za-z0-9_.\-:])[-+\u2212]?\d+(?:\.\d+)?(?:[eE][-+]?\d+)?(?![A-Za-z0-9_])")


def fmt(x: float) -> str:
    """The one way numbers are written into statements: 3 significant digits, ``e`` notation below
    1e-3."""
    if x is None or not math.isfinite(x):
        return "NA"
    if x != 0 and abs(x) < 1e-3:
        return f"{x:.2e}"
    return f"{x:.3g}"


def numbers_in(text: str) -> list[str]:
    """Numeric tokens of ``text`` (digits inside identifiers such as ``IGFBP3`` or ``T2D`` are not
    numbers)."""
    return [m.group(0).replace("\u2212", "-").lstrip("+") for m in _NUMBER.finditer(text)]


def _allowed_numbers(h: Hypothesis, extra: list[float] = ()) -> set[str]:
    vals = []
    for c in h.claims:
        vals += [v for v in (c.effect, c.q) if v is not None]
        if c.effect is not None:
            vals.append(abs(c.effect))
            if c.effect > 0:
                vals.append(math.log2(c.effect) if c.effect > 0 else c.effect)
    vals += list(extra)
    allowed = set()
    for v in vals:
        for s in (fmt(v), fmt(abs(v)), repr(v), str(v), f"{v:.2f}", f"{v:.1f}", f"{v:.3f}"):
            allowed.add(s)
        if float(v).is_integer():
            allowed.add(str(int(v)))
    # numbers that are part of names (levels such as "stage 2", set names, cluster counts)
    for c in h.claims:
        allowed.update(numbers_in(" ".join([c.subject, c.label, c.object]).replace(":", " ")))
    allowed.add(str(len(h.claims)))
    allowed.add(str(len(h.claims) - NAMES_SHOWN))  # "... and N more"
    return allowed


def numbers_supported(h: Hypothesis, text: str | None = None, extra: list[float] = ()) -> list[str]:
    """The numbers in ``text`` (default: the statement and prediction) that no claim of ``h``
    produced; an empty list means every number is grounded."""
    text = (h.statement + " " + h.prediction) if text is None else text
    allowed = _allowed_numbers(h, extra)
    return [n for n in numbers_in(text) if n not in allowed]


# ------------------------------------------------------------------------------- templates


def _contrast_words(obj: str) -> tuple[str, str, str]:
    # "contrast:<column>:<case> vs <control>"
    body = obj.split(":", 2)[-1]
    case, _, control = body.partition(" vs ")
    column = obj.split(":", 2)[1] if obj.count(":") >= 2 else ""
    return column, case, control


NAMES_SHOWN = 8


def _names(claims: list[Claim], n: int = NAMES_SHOWN) -> str:
    names = [c.label or c.subject.split(":", 1)[-1] for c in claims[:n]]
    more = len(claims) - len(names)
    return ", ".join(names) + (f" and {more} more" if more > 0 else "")


def template_statement(h: Hypothesis) -> tuple[str, str]:
    """(statement, prediction) for ``h`` from its claims; every number comes from a claim."""
    c0 = h.claims[0]
    if h.kind == "differential":
        column, case, control = _contrast_words(c0.object)
        word = "higher" if c0.direction == "up" else "lower"
        lfcs = [c.effect for c in h.claims if c.effect is not None]
        strongest = max(h.claims, key=lambda c: abs(c.effect or 0))
        n = len(h.claims)
        st = (f"{n} protein{'s are' if n > 1 else ' is'} {word} in {case} than in {control} ({column}): "
              f"{_names(h.claims)}. The strongest is {strongest.label or strongest.subject} (log2 fold change "
              f"{fmt(strongest.effect)}, q {fmt(strongest.q)}); {'all are' if n > 1 else 'it is'} significant and "
              "stable under re-imputation and subsampling.")
        if n > 1:
            st += f" The log2 fold changes range from {fmt(min(lfcs))} to {fmt(max(lfcs))}."
        pred = (f"In an independent {case} vs {control} cohort, {strongest.label or strongest.subject} and the other "
                f"listed proteins will again be {word} in {case} (targeted assay, e.g. PRM or ELISA).")
    elif h.kind == "enrichment":
        column, case, control = _contrast_words(c0.object)
        word = "up" if c0.relation == "enriched_in_up" else "down"
        how = "; ".join(f"{c.statistic or 'enrichment'} {fmt(c.effect)}, q {fmt(c.q)}" for c in h.claims)
        st = (f"The gene set {c0.label} is coordinately shifted {word} in {case} vs {control} "
              f"({how}), suggesting altered {c0.label} activity in {case}.")
        pred = (f"Members of {c0.label} not measured here will also shift {word} in {case}; a perturbation of "
                f"this programme should reproduce part of the {case} profile.")
    elif h.kind == "survival":
        risk = [c for c in h.claims if c.relation == "associated_with_risk"]
        prot = [c for c in h.claims if c.relation == "associated_with_protection"]
        parts = []
        if risk:
            parts.append(f"higher levels of {_names(risk)} go with shorter survival")
        if prot:
            parts.append(f"higher levels of {_names(prot)} go with longer survival")
        best = min(h.claims, key=lambda c: c.q if c.q is not None else 1.0)
        text = "; ".join(parts)
        st = (text[:1].upper() + text[1:] +
              f" (Cox model per protein; strongest {best.label or best.subject}, hazard ratio {fmt(best.effect)} "
              f"per standard deviation, q {fmt(best.q)}).")
        pred = (f"A signature of these proteins will stratify survival in an independent cohort "
                f"(log-rank test of a median split).")
    else:  # subtype
        st = (f"The samples form {c0.subject.split(':', 1)[-1]} robust subtypes (silhouette {fmt(c0.effect)}, "
              f"bootstrap stability {fmt(c0.q)}), each with its own protein profile.")
        pred = "The subtypes will reappear when the clustering is repeated on an independent cohort."
    return st, pred


# ------------------------------------------------------------------------------- verification


def claim_holds(claim: Claim, ev: dict, *, fdr: float, rtol: float = 1e-9) -> bool:
    """Whether ``claim`` holds in the evidence dict ``ev`` of a (recomputed) step: the subject is
    present, significant at ``fdr``, with the same direction and effect."""
    kind = ev.get("kind")
    if claim.relation in ("higher_in", "lower_in") and kind == "differential":
        pid = claim.subject.split(":", 1)[1]
        row = next((r for r in ev["rows"] if r["protein"] == pid), None)
        if row is None or row["q"] is None or not row["q"] <= fdr:
            return False
        if (row["log2fc"] > 0) != (claim.direction == "up"):
            return False
        return _close(row["log2fc"], claim.effect, rtol) and _close(row["q"], claim.q, rtol)
    if claim.relation in ("enriched_in_up", "enriched_in_down") and kind == "enrichment":
        name = claim.subject.split(":", 1)[1]
        direction = "up" if claim.relation == "enriched_in_up" else "down"
        row = next((r for r in ev["rows"] if r["gene_set"] == name and r["direction"] == direction), None)
        return row is not None and row["q"] is not None and row["q"] <= fdr and _close(row["q"], claim.q, rtol)
    if claim.relation.startswith("associated_with") and kind == "survival":
        pid = claim.subject.split(":", 1)[1]
        row = next((r for r in ev["rows"] if r["protein"] == pid), None)
        if row is None or row["q"] is None or not row["q"] <= fdr:
            return False
        return ((row["hr"] > 1) == (claim.relation == "associated_with_risk")) and _close(row["hr"], claim.effect, rtol)
    if claim.relation == "defines_subtype" and kind == "clusters":
        return bool(ev.get("robust")) and str(ev.get("k")) == claim.subject.split(":", 1)[1]
    return False


def _close(a, b, rtol) -> bool:
    if a is None or b is None:
        return a is None and b is None
    return abs(a - b) <= rtol * max(1.0, abs(a), abs(b))


# ------------------------------------------------------------------------------- building

MAX_CLAIMS = 12


def _direction(claims: list[Claim]) -> str:
    ds = {c.direction for c in claims}
    return ds.pop() if len(ds) == 1 else "mixed"


def build(records, objectives, *, fdr: float = 0.05) -> list[Hypothesis]:
    """Hypotheses from the accepted steps' evidence (see the module docstring); ids ``H1``...
    Only robust (non-fragile) differential hits, significant gene sets and Cox hits, and
    clusterings that passed every gate become claims."""
    out: list[Hypothesis] = []
    for rec in records:
        ev = rec.evidence
        if rec.verdict != "accept" or not ev:
            continue
        hs: list[tuple[str, list[Claim]]] = []
        if ev["kind"] == "differential":
            obj = f"contrast:{ev['column']}:{ev['case']} vs {ev['control']}"
            for d, rel in (("up", "higher_in"), ("down", "lower_in")):
                rows = sorted((r for r in ev["rows"] if (r["log2fc"] > 0) == (d == "up")), key=lambda r: (r["q"], r["protein"]))
                claims = [Claim(subject=f"protein:{r['protein']}", label=r["gene"] or r["protein"], relation=rel, object=obj,
                                direction=d, effect=r["log2fc"], q=r["q"], statistic="log2 fold change",
                                step_ids=[rec.step_id]) for r in rows]
                if claims:
                    hs.append(("differential", claims))
        elif ev["kind"] == "enrichment":
            # one hypothesis per (objective, gene set, direction); GSEA and ORA claims are merged
            for r in sorted(ev["rows"], key=lambda r: (r["q"], r["gene_set"]))[:MAX_CLAIMS]:
                claim = Claim(subject=f"gene_set:{r['gene_set']}", label=r["gene_set"],
                              relation="enriched_in_up" if r["direction"] == "up" else "enriched_in_down",
                              object=f"contrast:{ev.get('contrast', '')}", direction=r["direction"], effect=r["effect"],
                              q=r["q"], statistic="NES" if ev["method"] == "gsea_prerank" else "fold enrichment",
                              step_ids=[rec.step_id])
                same = next((h for h in out if h.kind == "enrichment" and h.objective_id == rec.objective_id
                             and h.claims[0].subject == claim.subject and h.direction == claim.direction), None)
                if same is not None:
                    same.claims.append(claim)
                    same.evidence = sorted(set(same.evidence) | {rec.step_id})
                    same.q = min(same.q, claim.q)
                else:
                    hs.append(("enrichment", [claim]))
        elif ev["kind"] == "survival":
            rows = sorted(ev["rows"], key=lambda r: (r["q"], r["protein"]))
            claims = [Claim(subject=f"protein:{r['protein']}", label=r["gene"] or r["protein"],
                            relation="associated_with_risk" if r["hr"] > 1 else "associated_with_protection",
                            object="survival", direction="up" if r["hr"] > 1 else "down", effect=r["hr"], q=r["q"],
                            statistic="hazard ratio", step_ids=[rec.step_id]) for r in rows]
            if claims:
                hs.append(("survival", claims))
        elif ev["kind"] == "clusters" and ev.get("robust") and ev.get("k"):
            hs.append(("subtype", [Claim(subject=f"clusters:{ev['k']}", relation="defines_subtype", object="samples",
                                         effect=ev["silhouette"], q=ev["stability"], step_ids=[rec.step_id])]))
        for kind, claims in hs:
            qs = [c.q for c in claims if c.q is not None and kind != "subtype"]
            h = Hypothesis(id=f"H{len(out) + 1}", objective_id=rec.objective_id, kind=kind, statement="", claims=claims,
                           entities=[c.label or c.subject for c in claims], direction=_direction(claims),
                           q=min(qs) if qs else None, evidence=sorted({s for c in claims for s in c.step_ids}),
                           prediction="")
            h.statement, h.prediction = template_statement(h)
            out.append(h)
    return out


def verify(hyps: list[Hypothesis], engine, *, fdr: float = 0.05) -> list[Hypothesis]:
    """Re-verify every claim by recomputing its supporting steps from scratch (no cache); drop
    claims that no longer hold, drop hypotheses left without claims, rewrite statements from the
    surviving claims, and renumber. Every kept hypothesis has ``verified=True``."""
    recs = {r.step_id: r for r in engine.records}
    fresh: dict[str, dict] = {}
    kept: list[Hypothesis] = []
    for h in hyps:
        good = []
        for c in h.claims:
            ok = True
            for sid in c.step_ids:
                if sid not in fresh:
                    ev = engine.recompute(recs[sid])
                    if ev is not None and ev.get("kind") == "clusters":
                        ev["robust"] = recs[sid].evidence.get("robust", False)
                    fresh[sid] = ev
                ev = fresh[sid]
                limit = fdr if ev is None or ev.get("kind") != "enrichment" else max(fdr, max((r["q"] for r in ev["rows"]), default=fdr))
                ok &= ev is not None and claim_holds(c, ev, fdr=limit)
            if ok:
                good.append(c)
        if not good:
            continue
        h = h.model_copy(update={"claims": good, "entities": [c.label or c.subject for c in good],
                                 "direction": _direction(good), "verified": True})
        h.statement, h.prediction = template_statement(h)
        kept.append(h)
    for i, h in enumerate(kept, 1):
        h.id = f"H{i}"
    return kept


def llm_wording(hyps: list[Hypothesis], backend, *, transcript: list | None = None) -> list[Hypothesis]:
    """Ask ``backend`` to reword each statement; a rewording that states a number no claim
    produced (or that fails) is discarded and the template kept."""
    from .llm.backend import LLMError, ask_json

    schema = {"type": "object", "properties": {"statement": {"type": "string", "maxLength": 800}},
              "required": ["statement"]}
    out = []
    for h in hyps:
        facts = [c.model_dump(include={"label", "relation", "object", "effect", "q"}) for c in h.claims]
        msgs = [{"role": "system", "content": "You write one-paragraph scientific hypotheses from verified results. "
                 "Use only the numbers given; do not invent values."},
                {"role": "user", "content": f"Verified claims: {facts}\nTemplate: {h.statement}\n"
                 "Rewrite it as a clear hypothesis with a plausible mechanism. Reply as JSON {\"statement\": ...}."}]
        try:
            text = ask_json(backend, msgs, schema, transcript=transcript)["statement"]
        except LLMError:
            out.append(h)
            continue
        if text.strip() and not numbers_supported(h, text):
            h = h.model_copy(update={"statement": text.strip(), "text_source": "llm"})
        out.append(h)
    return out
