"""PROTEUS evaluation: planted-truth recovery with stated thresholds, the null cohort, the
unsupported-claim count, and the LLM judge with its control check (replay backend and a real
HTTP server on 127.0.0.1)."""

import json
import threading
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer

import pytest

from lmfuse.proteus.evaluate import (JUDGE_METRICS, check_judge, control_hypotheses, judge, judge_schema, score,
                                     unsupported_claims)
from lmfuse.proteus.llm import OpenAICompatBackend, ReplayBackend, validate_json

from ._runs import null, planted, session_seed


def test_planted_truth_recovery():
    # Thresholds for the 60-sample x 600-protein cohort (lfc 1, 15% MNAR missingness, batch effect):
    # seen over seeds: DE precision ~0.97, recall ~0.75-0.8, every planted pathway, ARI 1.0.
    c, res, _ = planted(session_seed())
    ev = res.findings["evaluation"]
    assert ev["de_precision"] >= 0.85, ev
    assert ev["de_recall"] >= 0.5, ev
    assert ev["de_sign_accuracy"] == 1.0
    assert ev["pathways_found"] >= max(1, ev["pathways_planted"] - 1) and ev["pathways_false"] <= 1, ev
    assert ev["subtype_ari"] is not None and ev["subtype_ari"] >= 0.8, ev
    assert ev["unsupported_claims"] == 0
    assert ev["n_hypotheses"] >= 4
    # the metrics are computed from the findings, independently of the run: recount one by hand
    de = next(d for d in res.findings["differential"] if d["case"] == "case")
    tp = sum(h["protein"] in c.truth.de for h in de["hits"])
    assert ev["de_tp"] == tp and ev["de_called"] == len(de["hits"])


def test_null_cohort_yields_no_hypotheses():
    # Every differential step is gated by a global test at level ~2e-3, the Cox and clinical
    # correlation steps by permutation tests at level 1e-3, and clusterings must beat a permutation
    # null and not coincide with batch (200 null cohorts, seeds 8-207: no step accepted).
    _, res = null(session_seed())
    f = res.findings
    assert f["hypotheses"] == [], [h["statement"] for h in f["hypotheses"]]
    assert f["evaluation"]["n_hypotheses"] == 0 and f["evaluation"]["null_cohort"]
    da = next(s for s in f["steps"] if s["tool"] == "differential_abundance")
    assert da["verdict"] == "reject" and any(g["name"] == "global_signal" and not g["passed"] for g in da["gates"])


def test_unsupported_claims_are_counted():
    _, res, _ = planted(session_seed())
    f = json.loads(json.dumps(res.findings))
    assert unsupported_claims(f) == 0
    h = f["hypotheses"][0]
    h["claims"][0]["direction"] = "down" if h["claims"][0]["direction"] == "up" else "up"  # contradicts its table
    h["statement"] += " The effect is 7.77-fold."  # a number no step produced
    assert unsupported_claims(f) == 2


def test_score_rejects_bad_truth():
    with pytest.raises(TypeError, match="truth"):
        score({"hypotheses": []}, 3)


def _scores(rel):
    return {m: {"score": rel if m == "reliability" else 3, "rationale": "r"} for m in JUDGE_METRICS}


def test_judge_not_run_without_endpoint():
    _, res, _ = planted(session_seed())
    assert judge(res.findings, None)["status"] == "not run"
    assert check_judge(res.findings, None)["status"] == "not run"


def test_controls_are_built_from_the_run():
    _, res, _ = planted(session_seed())
    ctrl = control_hypotheses(res.findings, seed=1)
    hyps = res.findings["hypotheses"]
    assert len(ctrl["shuffled"]) == len(hyps)  # a planted run has hypotheses from several steps
    assert all(s["evidence"] != h["evidence"] and s["statement"] == h["statement"]
               for s, h in zip(ctrl["shuffled"], hyps))
    flipped = {h["id"].split("-")[0]: h["statement"] for h in ctrl["flipped"]}
    for h in hyps:
        if "higher in" in h["statement"]:
            assert "lower in" in flipped[h["id"]]


def test_judge_check_with_replay_backend():
    _, res, _ = planted(session_seed())
    f = res.findings
    ctrl = control_hypotheses(f)
    n_real, n_ctrl = len(f["hypotheses"]), len(ctrl["shuffled"]) + len(ctrl["flipped"])
    good = ReplayBackend([_scores(5)] * n_real + [_scores(1)] * n_ctrl)
    out = check_judge(f, good)
    assert out["reliable"] and out["drop"]["shuffled"] == pytest.approx(4.0)
    assert validate_json(_scores(5), judge_schema()) == []
    blind = ReplayBackend([_scores(4)] * (n_real + n_ctrl))  # scores controls as high as real ones
    out = check_judge(f, blind)
    assert not out["reliable"] and out["drop"]["flipped"] == pytest.approx(0.0)


def test_judge_over_http_scores_controls_lower():
    """A scripted judge endpoint that reads the prompt: it gives reliability 5 when every
    protein named in the hypothesis appears in the evidence with the stated direction, else 1."""
    _, res, _ = planted(session_seed())
    f = res.findings

    class Handler(BaseHTTPRequestHandler):
        def log_message(self, *a):
            pass

        def do_POST(self):
            body = json.loads(self.rfile.read(int(self.headers["Content-Length"])))
            text = body["messages"][-1]["content"]
            evidence = text.split("Analysis results:\n", 1)[1].split("\n\nHypothesis:", 1)[0]
            statement = text.split("Hypothesis: ", 1)[1].split("\n\nRubric:", 1)[0]
            ok = True
            if "proteins are higher" in statement or "proteins are lower" in statement:
                up = "higher" in statement
                names = statement.split(": ", 1)[1].split(".")[0].split(" and ")[0].split(", ")
                lines = {l.split(":")[0]: l for l in evidence.splitlines()}
                ok = all(n in lines and (("log2FC -" in lines[n]) != up) for n in names)
            elif "gene set" in statement:
                name = statement.split("gene set ", 1)[1].split(" ")[0]
                lines = [l for l in evidence.splitlines() if f"gene set {name} " in l]
                ok = bool(lines) and all((" up " in statement) == (" up (" in l) for l in lines)
            content = json.dumps(_scores(5 if ok else 1))
            data = json.dumps({"choices": [{"message": {"role": "assistant", "content": content}}]}).encode()
            self.send_response(200)
            self.send_header("Content-Length", str(len(data)))
            self.end_headers()
            self.wfile.write(data)

    srv = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
    threading.Thread(target=srv.serve_forever, daemon=True).start()
    try:
        out = check_judge(f, OpenAICompatBackend(f"http://127.0.0.1:{srv.server_address[1]}/v1", retries=0))
    finally:
        srv.shutdown()
        srv.server_close()
    real = [s["reliability"] for s in out["real"].values()]
    assert real and min(real) == 5
    assert out["drop"]["flipped"] >= 1.5 and out["reliable"]
