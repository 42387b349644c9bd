"""PROTEUS output: ``findings.json`` (the documented schema, see ``docs/proteus.md``), a Markdown
report and a self-contained HTML report (figures inlined as base64 PNG).

Every piece of text that comes from data (protein and gene names, metadata levels) or from a model
is escaped in the HTML; figure file names derive from step ids only.
"""

from __future__ import annotations

import base64
import html
import json
from pathlib import Path

SCHEMA_VERSION = 1
TOP_ROWS = 15


def dumps_findings(findings: dict) -> str:
    """The canonical text of ``findings.json`` (sorted keys, fixed float repr): two runs with the
    same inputs and decisions give byte-identical files."""
    return json.dumps(findings, indent=1, sort_keys=True, allow_nan=False, default=_default) + "\n"


def _default(o):
    import numpy as np

    if isinstance(o, np.generic):
        return o.item()
    if isinstance(o, np.ndarray):
        return o.tolist()
    raise TypeError(f"not JSON-serialisable: {type(o).__name__}")


def _f(x, digits: int = 3) -> str:
    if x is None:
        return "NA"
    if isinstance(x, float):
        return f"{x:.2e}" if x != 0 and abs(x) < 1e-3 else f"{x:.{digits}g}"
    return str(x)


def _md_table(header: list[str], rows: list[list]) -> str:
    esc = lambda s: str(s).replace("|", "\\|").replace("\n", " ")
    lines = ["| " + " | ".join(header) + " |", "|" + "---|" * len(header)]
    lines += ["| " + " | ".join(esc(_f(c)) for c in r) + " |" for r in rows]
    return "\n".join(lines)


def _sections(f: dict) -> list[tuple[str, str, list[str], list[list]]]:
    """(title, intro, header, rows) of every table in the report, shared by Markdown and HTML."""
    out = []
    ds = f["dataset"]
    cfg = f["config"]
    out.append(("Run", "", ["item", "value"], [
        ["data set", ds.get("name", "")], ["proteins × samples", f"{ds['n_proteins']} × {ds['n_samples']}"],
        ["fingerprint", ds["fingerprint"][:16]], ["planner", cfg["planner"]], ["language model", cfg["llm"]],
        ["seed", cfg["seed"]], ["max revision rounds", cfg["max_rounds"]], ["FDR", cfg["fdr"]],
        ["lmfuse", cfg.get("lmfuse", "")]]))
    out.append(("Objectives", "", ["id", "objective", "status"],
                [[o["id"], o["title"], o["status"]] for o in f["objectives"]]))
    out.append(("Steps", "Every step as executed, with the verdict of the quality gates.",
                ["step", "objective", "round", "tool", "verdict", "summary"],
                [[s["id"], s["objective_id"], s["round"], s["tool"], s["verdict"], s["summary_text"]]
                 for s in f["steps"]]))
    for d in f["differential"]:
        hits = sorted(d["hits"], key=lambda r: r["q"])
        out.append((f"Differential abundance: {d['contrast']}",
                    f"{len(hits)} proteins at q ≤ {cfg['fdr']} (of {d['n_tested']} tested; step {d['step_id']}).",
                    ["protein", "gene", "log2fc", "p", "q", "stability"],
                    [[r["protein"], r["gene"], r["log2fc"], r["p"], r["q"], r.get("stability")]
                     for r in hits[:TOP_ROWS]]))
    if f["enrichment"]:
        rows = sorted(f["enrichment"], key=lambda r: r["q"])
        out.append(("Enrichment", "", ["contrast", "gene set", "direction", "method", "effect", "q"],
                    [[r["contrast"], r["gene_set"], r["direction"], r["method"], r["effect"], r["q"]]
                     for r in rows[:TOP_ROWS]]))
    for c in f["clusters"]:
        out.append(("Subtypes", f"step {c['step_id']}", ["k", "silhouette", "bootstrap stability", "robust", "sizes"],
                    [[c["k"], c["silhouette"], c["stability"], c["robust"], c["sizes"]]]))
    if f["survival"]:
        rows = sorted(f["survival"], key=lambda r: r["q"])
        out.append(("Survival (Cox per protein)", "", ["protein", "gene", "hazard ratio", "p", "q"],
                    [[r["protein"], r["gene"], r["hazard_ratio"], r["p"], r["q"]] for r in rows[:TOP_ROWS]]))
    out.append(("Hypotheses", "Each is re-verified by recomputing its evidence steps before it is reported.",
                ["id", "statement", "q", "evidence", "verified"],
                [[h["id"], h["statement"], h["q"], ", ".join(h["evidence"]), h["verified"]]
                 for h in f["hypotheses"]]))
    if f.get("evaluation"):
        ev = f["evaluation"]
        out.append(("Evaluation against planted truth", "", ["metric", "value"],
                    [[k, v] for k, v in sorted(ev.items()) if not isinstance(v, (dict, list))]))
    return out


def render_markdown(findings: dict, figures: dict[str, str] | None = None) -> str:
    """The Markdown report; ``figures`` maps a caption to a path relative to the report."""
    parts = [f"# PROTEUS report: {findings['dataset'].get('name') or 'data set'}", ""]
    for title, intro, header, rows in _sections(findings):
        parts += [f"## {title}", ""] + ([intro, ""] if intro else [])
        parts += [_md_table(header, rows) if rows else "(none)", ""]
    for h in findings["hypotheses"]:
        parts += [f"### {h['id']}", "", h["statement"], "", f"Prediction: {h['prediction']}", "",
                  "Evidence: " + ", ".join(f"step {s}" for s in h["evidence"]), ""]
    if figures:
        parts += ["## Figures", ""] + [f"![{cap}]({path})" for cap, path in figures.items()] + [""]
    return "\n".join(parts)


_CSS = ("body{font-family:sans-serif;max-width:1100px;margin:2em auto;color:#222}"
        "table{border-collapse:collapse;margin:.5em 0 1.5em}td,th{border:1px solid #ccc;padding:3px 7px;"
        "font-size:13px;text-align:left}th{background:#f3f3f3}img{max-width:520px;margin:4px}")


def render_html(findings: dict, figures: dict[str, bytes] | None = None) -> str:
    """One self-contained HTML page; ``figures`` maps a caption to PNG bytes (inlined)."""
    e = lambda s: html.escape(_f(s))
    body = [f"<h1>PROTEUS report: {html.escape(findings['dataset'].get('name') or 'data set')}</h1>"]
    for title, intro, header, rows in _sections(findings):
        body.append(f"<h2>{html.escape(title)}</h2>")
        if intro:
            body.append(f"<p>{html.escape(intro)}</p>")
        if not rows:
            body.append("<p>(none)</p>")
            continue
        body.append("<table><tr>" + "".join(f"<th>{html.escape(h)}</th>" for h in header) + "</tr>")
        for r in rows:
            cells = []
            for h_, c in zip(header, r):
                if h_ == "step" or (h_ == "evidence" and c):
                    ids = [x.strip() for x in str(c).split(",")]
                    link = ", ".join(f'<a href="#step-{html.escape(i)}">{html.escape(i)}</a>' for i in ids)
                    anchor = f' id="step-{html.escape(str(c))}"' if h_ == "step" else ""
                    cells.append(f"<td{anchor}>{link}</td>")
                else:
                    cells.append(f"<td>{e(c)}</td>")
            body.append("<tr>" + "".join(cells) + "</tr>")
        body.append("</table>")
    for h in findings["hypotheses"]:
        body.append(f"<h3>{html.escape(h['id'])}</h3><p>{html.escape(h['statement'])}</p>"
                    f"<p><i>Prediction:</i> {html.escape(h['prediction'])}</p>")
    if figures:
        body.append("<h2>Figures</h2>")
        for cap, png in figures.items():
            b64 = base64.b64encode(png).decode("ascii")
            body.append(f'<figure><img alt="{html.escape(cap)}" src="data:image/png;base64,{b64}">'
                        f"<figcaption>{html.escape(cap)}</figcaption></figure>")
    return ("<!DOCTYPE html><html><head><meta charset='utf-8'><title>PROTEUS report</title>"
            f"<style>{_CSS}</style></head><body>" + "\n".join(body) + "</body></html>\n")


def write_reports(findings: dict, out_dir, figures: dict[str, bytes] | None = None) -> dict[str, Path]:
    """Write ``findings.json``, ``report.md``, ``report.html`` and ``figures/*.png`` under
    ``out_dir``; returns their paths. Figure captions must be step-derived (``<step>_<name>``)."""
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    figs = figures or {}
    fig_dir = out / "figures"
    rel = {}
    if figs:
        fig_dir.mkdir(exist_ok=True)
        for cap, png in figs.items():
            safe = "".join(ch if ch.isalnum() or ch in "-_" else "_" for ch in cap)[:80]
            (fig_dir / f"{safe}.png").write_bytes(png)
            rel[cap] = f"figures/{safe}.png"
    paths = {"findings": out / "findings.json", "markdown": out / "report.md", "html": out / "report.html"}
    paths["findings"].write_text(dumps_findings(findings))
    paths["markdown"].write_text(render_markdown(findings, rel))
    paths["html"].write_text(render_html(findings, figs))
    return paths
