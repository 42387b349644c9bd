"""``benchmarks/pubmedqa_report.py``: the Wilson interval and macro-F1 against hand-worked values,
and a whole summary of a made-up report on the real PubMedQA test split (skipped without it)."""

import importlib.util
import json
import os
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[2]
PUBMEDQA = Path(os.environ.get("LMFUSE_DATA", ROOT.parent / "shared" / "data")) / "pubmedqa"


def _module():
    spec = importlib.util.spec_from_file_location("pubmedqa_report", ROOT / "benchmarks" / "pubmedqa_report.py")
    mod = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(mod)
    return mod


def test_wilson_and_macro_f1_hand_values():
    m = _module()
    lo, hi = m.wilson(50, 100)  # centre 0.5, half-width 1.96·sqrt(0.0025 + 1.96²/4e4) / (1 + 1.96²/100)
    assert abs(lo - 0.40383) < 1e-4 and abs(hi - 0.59617) < 1e-4
    assert m.wilson(0, 10)[0] == 0.0 and m.wilson(10, 10)[1] > 0.999
    gold = ["yes", "yes", "no", "maybe"]
    pred = ["yes", "no", "no", None]
    # yes: tp 1 fp 0 fn 1 -> 2/3; no: tp 1 fp 1 fn 0 -> 2/3; maybe: 0
    assert abs(m.macro_f1(gold, pred, ["yes", "no", "maybe"]) - 4 / 9) < 1e-12


@pytest.mark.skipif(not (PUBMEDQA / "ori_pqal.json").exists(), reason="PubMedQA data folder absent")
def test_summary_of_a_made_up_report(tmp_path):
    from lmfuse.align import load_pubmedqa

    m = _module()
    items = load_pubmedqa(PUBMEDQA, split="test")
    yes = {it.id: next(L for L, t in it.options.items() if t == "yes") for it in items}
    rows = [{"id": it.id, "answer": it.answer, "prediction": None if i == 0 else yes[it.id]}
            for i, it in enumerate(items)]
    report = tmp_path / "r.json"
    report.write_text(json.dumps({"mode": "loglik", "predictions": rows, "settings": {"n_items": 500}}))
    out = tmp_path / "s.json"
    assert m.main([str(report), "--data", str(PUBMEDQA), "--out", str(out), "--device", "test"]) == 0
    s = json.loads(out.read_text())
    r = s["results"]["loglik"]
    n_yes = sum(dict(it.options)[it.answer] == "yes" for it in items)
    first_yes = dict(items[0].options)[items[0].answer] == "yes"
    assert r["n_items"] == 500 and r["invalid_rate"] == 0.002
    assert r["accuracy"] == round((n_yes - first_yes) / 500, 4)
    assert r["majority_class_baseline_same_items"] == round(n_yes / 500, 4)
    assert r["predicted"] == {"yes": 499, "invalid": 1}
    assert s["majority_class_baseline_full_test_split"] == {"answer": "yes", "accuracy": n_yes / 500, "n_items": 500}
