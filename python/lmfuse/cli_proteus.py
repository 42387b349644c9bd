"""``lmfuse proteus``: automated proteomics discovery from the command line.

``lmfuse proteus run --data FILE --meta FILE --out DIR [--group COLUMN] [--gene-sets FILE.gmt]
[--llm none|local|URL] [--max-rounds N] [--seed S]`` reads a MaxQuant / DIA-NN / wide table and
its sample metadata, plans and runs the analyses, and writes ``findings.json``, ``report.md``,
``report.html``, ``figures/``, ``artifacts/`` and ``run_log.jsonl`` into DIR.

``lmfuse proteus demo [--out DIR] [--seed S] [--null]`` does the same on a generated cohort with
planted truth and prints the recovery metrics.

Every argument is checked before any work starts (bad values exit with code 2). Only the standard
library is imported at module level.
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

from .cli import command


def _existing_file(text: str) -> Path:
    p = Path(text)
    if not p.is_file():
        raise argparse.ArgumentTypeError(f"no such file: {text}")
    return p


def _llm(text: str) -> str:
    if text in ("none", "local") or text.startswith(("http://", "https://")):
        return text
    raise argparse.ArgumentTypeError(f"expected none, local or an http(s):// URL, got {text!r}")


def _int_range(low: int, high: int):
    def parse(text: str) -> int:
        try:
            v = int(text)
        except ValueError:
            raise argparse.ArgumentTypeError(f"expected an integer in [{low}, {high}], got {text!r}") from None
        if not low <= v <= high:
            raise argparse.ArgumentTypeError(f"expected an integer in [{low}, {high}], got {v}")
        return v
    parse.__name__ = f"int in [{low}, {high}]"
    return parse


def _common(p: argparse.ArgumentParser, out_required: bool) -> None:
    p.add_argument("--out", type=Path, required=out_required, default=None if out_required else Path("proteus-demo"),
                   help="output folder")
    p.add_argument("--llm", type=_llm, default="none", help="none, local (the bundled model) or an endpoint URL")
    p.add_argument("--planner", choices=("auto", "rules", "llm", "hybrid"), default="auto",
                   help="auto = rules without an LLM, hybrid with one")
    p.add_argument("--max-rounds", type=_int_range(0, 10), default=2, help="revision rounds per step")
    p.add_argument("--seed", type=_int_range(0, 2**31 - 1), default=0, help="random seed")
    p.add_argument("--fdr", type=float, choices=(0.01, 0.05, 0.1), default=0.05, help="false discovery rate")
    p.add_argument("--no-progress", action="store_true", help="no progress bar")


def _print_summary(res) -> None:
    f = res.findings
    print(f"steps: {len(f['steps'])} ({sum(s['verdict'] == 'accept' for s in f['steps'])} accepted), "
          f"hypotheses: {len(f['hypotheses'])}")
    for h in f["hypotheses"]:
        print(f"  {h['id']}: {h['statement']}")
    for k, p in res.paths.items():
        print(f"{k}: {p}")


@command("proteus", help="PROTEUS: automated proteomics discovery (run | demo)")
def _proteus(parser: argparse.ArgumentParser):
    sub = parser.add_subparsers(dest="action", required=True, metavar="{run,demo}")
    r = sub.add_parser("run", help="analyse a data set", description="Analyse a proteomics data set end to end.")
    r.add_argument("--data", type=_existing_file, required=True,
                   help="MaxQuant proteinGroups.txt, DIA-NN pg_matrix.tsv or a wide TSV/CSV")
    r.add_argument("--meta", type=_existing_file, default=None, help="sample metadata (CSV/TSV/XLSX, a 'sample' column)")
    r.add_argument("--group", default=None, help="metadata column to compare (default: inferred)")
    r.add_argument("--gene-sets", type=_existing_file, default=None, help="gene sets (.gmt) for enrichment")
    _common(r, out_required=True)
    d = sub.add_parser("demo", help="run on a generated cohort with planted truth",
                       description="Generate a cohort with planted truth, analyse it and score the recovery.")
    d.add_argument("--null", action="store_true", help="a null cohort (nothing planted)")
    d.add_argument("--samples", type=_int_range(12, 5000), default=60, help="samples in the generated cohort")
    d.add_argument("--proteins", type=_int_range(100, 50000), default=600, help="proteins in the generated cohort")
    _common(d, out_required=False)

    def handler(args: argparse.Namespace) -> int:
        from lmfuse.proteus.data import DataError
        from lmfuse.proteus.llm import LLMError
        from lmfuse.proteus.run import run

        try:
            if args.action == "run":
                res = run(args.data, args.meta, out=args.out, group=args.group, gene_sets=args.gene_sets,
                          llm=args.llm, planner=args.planner, max_rounds=args.max_rounds, seed=args.seed, fdr=args.fdr,
                          progress=not args.no_progress)
            else:
                from lmfuse.proteus.synth import make_cohort, make_null_cohort

                make = make_null_cohort if args.null else make_cohort
                c = make(seed=args.seed, n_samples=args.samples, n_proteins=args.proteins,
                         n_pathways=max(20, args.proteins // 10))
                res = run(c.dataset, out=args.out, gene_sets=c.gene_sets, llm=args.llm, planner=args.planner,
                          max_rounds=args.max_rounds, seed=args.seed, fdr=args.fdr, truth=c.truth,
                          progress=not args.no_progress)
        except (DataError, ValueError, FileNotFoundError, LLMError) as e:
            print(f"lmfuse proteus: error: {e}", file=sys.stderr)
            return 2
        _print_summary(res)
        if "evaluation" in res.findings:
            print("evaluation: " + json.dumps({k: v for k, v in res.findings["evaluation"].items()
                                               if not isinstance(v, (dict, list))}))
        return 0

    return handler
