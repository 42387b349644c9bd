"""Summarise ``lmfuse eval`` reports on PubMedQA into one results file, next to the majority-class
baseline.

Run the evaluations first (each writes its per-item predictions), then this script::

    lmfuse eval --task pubmedqa=../shared/data/pubmedqa --mode loglik --out loglik.json
    lmfuse eval --task pubmedqa=../shared/data/pubmedqa --mode generate --max-new-tokens 64 --out generate.json
    python benchmarks/pubmedqa_report.py --data ../shared/data/pubmedqa loglik.json generate.json \\
        --out benchmarks/results/<device>/pubmedqa_smollm2.json --device "..."

Per report: accuracy with its 95 % Wilson interval, macro-F1 over yes / no / maybe, the invalid
rate, the "always yes" accuracy on the same items, and the predicted and gold answer counts.
"""

from __future__ import annotations

import argparse
import json
import math
import os
import platform
import subprocess
from collections import Counter


def wilson(k: int, n: int, z: float = 1.959964) -> tuple[float, float]:
    """95 % Wilson score interval of a proportion k / n."""
    if n == 0:
        return (0.0, 1.0)
    p = k / n
    centre = (p + z * z / (2 * n)) / (1 + z * z / n)
    half = z * math.sqrt(p * (1 - p) / n + z * z / (4 * n * n)) / (1 + z * z / n)
    return (centre - half, centre + half)


def macro_f1(gold: list[str], pred: list[str | None], labels: list[str]) -> float:
    """Unweighted mean over ``labels`` of each label's F1 (0 for a label never predicted nor gold)."""
    scores = []
    for lab in labels:
        tp = sum(g == lab and p == lab for g, p in zip(gold, pred))
        fp = sum(g != lab and p == lab for g, p in zip(gold, pred))
        fn = sum(g == lab and p != lab for g, p in zip(gold, pred))
        scores.append(0.0 if tp == 0 else 2 * tp / (2 * tp + fp + fn))
    return sum(scores) / len(scores)


def summarise(report: dict, letter_to_text: dict[str, dict[str, str]]) -> dict:
    """One ``lmfuse eval`` report (``MCQReport.to_json``) → the summary row."""
    rows = report["predictions"]
    gold = [letter_to_text[r["id"]][r["answer"]] for r in rows]
    pred = [None if r["prediction"] is None else letter_to_text[r["id"]][r["prediction"]] for r in rows]
    n = len(rows)
    k = sum(g == p for g, p in zip(gold, pred))
    lo, hi = wilson(k, n)
    settings = {key: v for key, v in report.get("settings", {}).items() if key != "n_items"}
    return {
        "n_items": n,
        "accuracy": round(k / n, 4),
        "accuracy_95ci_wilson": [round(lo, 4), round(hi, 4)],
        "macro_f1": round(macro_f1(gold, pred, ["yes", "no", "maybe"]), 4),
        "invalid_rate": round(sum(p is None for p in pred) / n, 4),
        "majority_class_baseline_same_items": round(sum(g == "yes" for g in gold) / n, 4),
        "always_yes_macro_f1": round(macro_f1(gold, ["yes"] * n, ["yes", "no", "maybe"]), 4),
        "predicted": dict(Counter("invalid" if p is None else p for p in pred).most_common()),
        "gold": dict(Counter(gold).most_common()),
        "settings": settings,
    }


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("reports", nargs="+", help="JSON reports written by `lmfuse eval --out` (one per mode)")
    ap.add_argument("--data", required=True, help="the PubMedQA folder the reports were run on")
    ap.add_argument("--out", required=True, help="summary JSON to write")
    ap.add_argument("--device", default=f"cpu: {platform.processor() or platform.machine()}",
                    help="free text: the machine the evaluations ran on")
    args = ap.parse_args(argv)

    from lmfuse.align import load_pubmedqa

    items = load_pubmedqa(args.data, split="test")
    letter_to_text = {it.id: dict(it.options) for it in items}
    results = {}
    for path in args.reports:
        with open(path, encoding="utf-8") as f:
            report = json.load(f)
        results[report["mode"]] = summarise(report, letter_to_text)
    gold_all = Counter(dict(it.options)[it.answer] for it in items)
    majority, count = gold_all.most_common(1)[0]
    try:
        commit = subprocess.run(["git", "rev-parse", "HEAD"], capture_output=True, text=True,
                                cwd=os.path.dirname(os.path.abspath(__file__))).stdout.strip() or None
    except OSError:
        commit = None
    import torch
    import transformers

    summary = {
        "benchmark": "PubMedQA (expert-labelled, reasoning-required), official 500-item test split",
        "model": "SmolLM2-135M-Instruct (bundled GGUF Q4_1, dequantised to float32)",
        "majority_class_baseline_full_test_split": {"answer": majority, "accuracy": count / len(items),
                                                    "n_items": len(items)},
        "results": results,
        "device": args.device,
        "versions": {"torch": torch.__version__, "transformers": transformers.__version__,
                     "python": platform.python_version()},
        "git_commit": commit,
        "written_by": "benchmarks/pubmedqa_report.py from lmfuse eval reports",
    }
    os.makedirs(os.path.dirname(os.path.abspath(args.out)), exist_ok=True)
    with open(args.out, "w", encoding="utf-8") as f:
        json.dump(summary, f, indent=1)
        f.write("\n")
    for mode, r in results.items():
        print(f"{mode}: {r['n_items']} items, accuracy {r['accuracy']:.3f} {r['accuracy_95ci_wilson']}, "
              f"macro-F1 {r['macro_f1']:.3f}, invalid {r['invalid_rate']:.3f}, "
              f"'yes' baseline {r['majority_class_baseline_same_items']:.3f}, predicted {r['predicted']}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
