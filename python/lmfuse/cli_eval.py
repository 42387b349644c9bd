"""``lmfuse eval``: multiple-choice evaluation of a causal LM on local medical benchmark files.

    lmfuse eval --task pubmedqa=../shared/data/pubmedqa --mode loglik --out preds.json
    lmfuse eval --task medqa=medqa_test.jsonl --task mmlu=mmlu_anatomy.jsonl --mode generate

``--task FORMAT=PATH`` (repeatable): FORMAT is one of medqa, medmcqa, pubmedqa, mmlu, mcq (see
``docs/medical.md``); PATH a JSON / JSONL / Parquet file, or for pubmedqa also the folder of the
original PubMedQA files (``ori_pqal.json`` + ``test_ground_truth.json``; ``--split`` picks the
official test split by default). The model is the bundled SmolLM2-135M-Instruct unless
``--model`` names a local Hugging Face model folder. Every argument and every data file is
checked before the model is loaded: a bad one exits with code 2 and a one-line message.

Only the standard library is imported at module level (every ``lmfuse`` call imports this).
"""

from __future__ import annotations

import argparse
import os
import sys

from .cli import command
from .cli_generate import float_in, int_at_least

# lmfuse.align.medeval.FORMATS, repeated because this module may import only the standard library
_FORMATS = ("medqa", "medmcqa", "pubmedqa", "mmlu", "mcq")


def task_spec(text: str) -> tuple[str, str]:
    """An argparse ``type=``: ``FORMAT=PATH`` with a known format (the path is checked later)."""
    fmt, sep, path = text.partition("=")
    if not sep or not path:
        raise argparse.ArgumentTypeError(f"expected FORMAT=PATH, got {text!r}")
    if fmt not in _FORMATS:
        raise argparse.ArgumentTypeError(f"format must be one of {', '.join(_FORMATS)}, got {fmt!r}")
    return fmt, path


def check_task_path(fmt: str, path: str) -> str | None:
    """The error message for a task path that does not exist or is a folder where a file is
    needed, or None."""
    if not os.path.exists(path):
        return f"--task {fmt}: no such file or folder: {path!r}"
    if os.path.isdir(path) and fmt != "pubmedqa":
        return f"--task {fmt}: expected a file, got the folder {path!r}"
    return None


def load_items(tasks, *, split: str, limit: int | None, seed: int | None):
    """The items of every ``(format, path)`` task, in order (``limit`` items per task)."""
    from lmfuse.align.medeval import load_mcq, load_pubmedqa

    items = []
    for fmt, path in tasks:
        if fmt == "pubmedqa" and os.path.isdir(path):
            items += load_pubmedqa(path, split=split, limit=limit, seed=seed)
        else:
            items += load_mcq(path, fmt, limit=limit, seed=seed)
    return items


def _load_model(name: str):
    if name == "bundled":
        from lmfuse.models import load_bundled_model

        return load_bundled_model()
    from transformers import AutoModelForCausalLM, AutoTokenizer

    return AutoModelForCausalLM.from_pretrained(name).eval(), AutoTokenizer.from_pretrained(name)


@command("eval", help="multiple-choice evaluation (MedQA / MedMCQA / PubMedQA / MMLU files)")
def _eval_command(p: argparse.ArgumentParser):
    p.add_argument("--task", type=task_spec, action="append", required=True, metavar="FORMAT=PATH",
                   help=f"a benchmark file (repeatable); FORMAT one of {', '.join(_FORMATS)}")
    p.add_argument("--model", default="bundled",
                   help="'bundled' (SmolLM2-135M-Instruct) or a local Hugging Face model folder")
    p.add_argument("--mode", choices=("loglik", "generate"), default="loglik",
                   help="score each option's log-likelihood, or generate and extract the answer")
    p.add_argument("--decoding", choices=("greedy", "self_consistency"), default="greedy",
                   help="generate mode: greedy, or majority vote over --n-samples sampled answers")
    p.add_argument("--n-samples", type=int_at_least(1), default=10, help="answers per item (self_consistency)")
    p.add_argument("--temperature", type=float_in(0.0, None, low_open=True), default=0.7,
                   help="sampling temperature (self_consistency)")
    p.add_argument("--top-p", type=float_in(0.0, 1.0, low_open=True), default=0.9, help="nucleus (self_consistency)")
    p.add_argument("--max-new-tokens", type=int_at_least(1), default=256, help="generate mode: tokens per answer")
    p.add_argument("--answer-prefix", default="The answer is", help="loglik mode: text before the scored letter")
    p.add_argument("--batch-size", type=int_at_least(1), default=8, help="items (loglik) or rows (generate) per batch")
    p.add_argument("--split", choices=("test", "train", "all"), default="test",
                   help="PubMedQA folder: which split of the expert-labelled set")
    p.add_argument("--limit", type=int_at_least(1), default=None, help="at most this many items per task")
    p.add_argument("--seed", type=int, default=0, help="sampling seed, and the seed of the --limit sample")
    p.add_argument("--no-chat", action="store_true", help="bare question text, without the chat template")
    p.add_argument("--out", default=None, help="write the report with per-item predictions to this JSON file")
    p.add_argument("--no-progress", action="store_true", help="no progress bar")

    def run(args: argparse.Namespace) -> int:
        for fmt, path in args.task:
            message = check_task_path(fmt, path)
            if message:
                print(f"lmfuse eval: {message}", file=sys.stderr)
                return 2
        if args.out is not None:
            folder = os.path.dirname(os.path.abspath(args.out))
            if os.path.isdir(args.out) or (os.path.exists(folder) and not os.path.isdir(folder)):
                print(f"lmfuse eval: --out must be a file path, got {args.out!r}", file=sys.stderr)
                return 2
        if args.model != "bundled" and not os.path.isdir(args.model):
            print(f"lmfuse eval: --model must be 'bundled' or a model folder, got {args.model!r}", file=sys.stderr)
            return 2
        try:
            items = load_items(args.task, split=args.split, limit=args.limit,
                               seed=args.seed if args.limit is not None else None)
        except (OSError, ValueError) as e:
            print(f"lmfuse eval: {e}", file=sys.stderr)
            return 2
        if not items:
            print("lmfuse eval: the tasks hold no items", file=sys.stderr)
            return 2

        from lmfuse.align.medeval import evaluate_mcq

        model, tok = _load_model(args.model)
        report = evaluate_mcq(model, tok, items, mode=args.mode, decoding=args.decoding, chat_template=not args.no_chat,
                              answer_prefix=args.answer_prefix, n_samples=args.n_samples,
                              temperature=args.temperature, top_p=args.top_p, max_new_tokens=args.max_new_tokens,
                              batch_size=args.batch_size, seed=args.seed, progress=not args.no_progress,
                              predictions_path=args.out)
        print(report.summary())
        if args.out:
            print(f"predictions: {args.out}")
        return 0
    return run
