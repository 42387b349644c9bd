"""PROTEUS output: findings.json schema, the self-contained HTML report (inlined figures, escaped
text, step anchors for every evidence link) and the Markdown report."""

import json
import re

from lmfuse.proteus.report import dumps_findings, render_html, render_markdown

from ._runs import planted, session_seed

REQUIRED = {
    "objectives": {"id", "kind", "title", "status"},
    "steps": {"id", "tool", "args", "status", "verdict", "summary", "gates"},
    "differential": {"contrast", "hits", "step_id"},
    "enrichment": {"contrast", "gene_set", "direction", "q"},
    "clusters": {"k", "labels", "silhouette", "stability"},
    "hypotheses": {"statement", "entities", "direction", "q", "evidence", "claims", "verified"},
}


def test_findings_schema():
    _, res, out = planted(session_seed())
    f = json.loads(open(f"{out}/findings.json").read())
    assert f == json.loads(dumps_findings(res.findings))
    for key, fields in REQUIRED.items():
        assert f[key], key
        for item in f[key]:
            assert fields <= set(item), (key, fields - set(item))
    assert "survival" in f and isinstance(f["survival"], list)
    for d in f["differential"]:
        for h in d["hits"]:
            assert {"protein", "gene", "log2fc", "p", "q"} <= set(h) and h["q"] <= f["config"]["fdr"]
    step_ids = {s["id"] for s in f["steps"]}
    assert all(set(h["evidence"]) <= step_ids for h in f["hypotheses"])


def test_html_is_self_contained_and_linked():
    _, res, out = planted(session_seed())
    page = open(f"{out}/report.html").read()
    assert "data:image/png;base64," in page
    assert not re.search(r'src="(?!data:)', page) and "<script" not in page
    anchors = set(re.findall(r'id="step-([^"]+)"', page))
    links = set(re.findall(r'href="#step-([^"]+)"', page))
    assert links and links <= anchors
    md = open(f"{out}/report.md").read()
    assert "## Hypotheses" in md and "| step |" in md and "figures/" in md


def test_text_from_data_is_escaped():
    _, res, _ = planted(session_seed())
    f = json.loads(json.dumps(res.findings))
    f["dataset"]["name"] = "<script>alert(1)</script>"
    f["hypotheses"][0]["statement"] = "x <img src=x onerror=alert(1)> y"
    f["differential"][0]["hits"][0]["gene"] = "<b>G</b>"
    page = render_html(f, {"S1_fig": b"\x89PNG"})
    assert "<script>" not in page and "<img src=x" not in page and "<b>G</b>" not in page
    assert "&lt;script&gt;" in page and "&lt;b&gt;G&lt;/b&gt;" in page
    assert "<script>" in render_markdown(f) or "alert" in render_markdown(f)  # Markdown keeps text as is


def test_run_is_callable_however_imported():
    import lmfuse.proteus.run as module  # binds the package attribute `run` to the submodule
    from lmfuse.proteus import run

    assert callable(run) and callable(module)
    assert module.run.__name__ == "run"
