"""``lmfuse fuse``: generate with several specialist models fused token by token (UltraFuser).

Experts are Hugging Face model directories (``--expert PATH``, repeated, in the order the gate was
trained with) or ``bundled``: the bundled SmolLM2-135M-Instruct as a *stand-in* expert (the same
model several times, which shows the mechanism, not a quality result; the command prints a
notice). ``--gate DIR`` is a directory written by ``UltraFuser.save_pretrained`` (the gate, any
LoRA deltas of the experts, the experts' fingerprints: other experts are refused); without it a
fresh gate weighs every expert equally (notice printed).

Every argument is checked before any model is loaded (exit code 2, one-line message): expert
paths, the gate directory and its expert count, template placeholders, sampling numbers.
Only the standard library is imported at module level (every ``lmfuse`` call imports this).
"""

from __future__ import annotations

import argparse
import json
import os

from .cli import command
from .cli_generate import float_in, int_at_least

BUNDLED = "bundled"
STAND_IN_NOTICE = ("note: {n} of the experts are the bundled model as a stand-in: this run demonstrates the "
                   "fusion mechanism, it is not a quality result")
FRESH_GATE_NOTICE = "note: no --gate given: a fresh gate weighs every expert equally (1/{n} each)"


def check_args(args: argparse.Namespace) -> str | None:
    """The error message for bad arguments (nothing is loaded), or None."""
    experts = args.expert or [BUNDLED, BUNDLED]
    for e, spec in enumerate(experts):
        if spec != BUNDLED and not os.path.isfile(os.path.join(spec, "config.json")):
            return f"--expert {spec!r} (expert {e}) is neither 'bundled' nor a model directory with a config.json"
    if args.template is not None:
        if len(args.template) != len(experts):
            return f"--template given {len(args.template)} times, expected once per expert ({len(experts)})"
        for t in args.template:
            if "{prompt}" not in t:
                return f"--template {t!r} has no '{{prompt}}' placeholder"
    if args.tokenizer is not None and not os.path.isdir(args.tokenizer):
        return f"--tokenizer {args.tokenizer!r} is not a directory"
    if args.gate is not None:
        path = os.path.join(args.gate, "fusion_config.json")
        if not os.path.isfile(path):
            return f"--gate {args.gate!r} has no fusion_config.json (write one with UltraFuser.save_pretrained)"
        try:
            with open(path) as f:
                meta = json.load(f)
            saved = len(meta["experts"])
        except (OSError, ValueError, KeyError, TypeError) as e:
            return f"--gate {args.gate!r}: unreadable fusion_config.json ({type(e).__name__}: {e})"
        if saved != len(experts):
            return f"--gate {args.gate!r} was trained with {saved} experts, got {len(experts)} --expert"
    return None


def _load_experts(specs: list[str], tokenizer_path: str | None, gate_dir: str | None):
    import copy

    from transformers import AutoModelForCausalLM, AutoTokenizer

    deltas = [False] * len(specs)
    if gate_dir is not None:
        with open(os.path.join(gate_dir, "fusion_config.json")) as f:
            deltas = [bool(x.get("deltas")) for x in json.load(f)["experts"]]
    bundled = tok = None
    models = []
    for spec in specs:
        if spec == BUNDLED:
            if bundled is None:
                from lmfuse.models import load_bundled_model

                bundled, tok_b = load_bundled_model()
                tok = tok or tok_b
                models.append(bundled)
            else:  # deltas attach in place, so an expert with deltas needs its own copy
                models.append(copy.deepcopy(bundled) if any(deltas) else bundled)
        else:
            models.append(AutoModelForCausalLM.from_pretrained(spec).eval())
    first_path = next((s for s in specs if s != BUNDLED), None)
    if tokenizer_path is not None or tok is None:
        tok = AutoTokenizer.from_pretrained(tokenizer_path or first_path)
    return models, tok


@command("fuse", help="generate with specialist models fused token by token by a gate (UltraFuser)")
def _fuse_command(p: argparse.ArgumentParser):
    p.add_argument("--expert", action="append", default=None, metavar="PATH|bundled",
                   help="an expert: a Hugging Face model directory or 'bundled' (repeat, in the gate's order; "
                        "default: two bundled stand-ins)")
    p.add_argument("--gate", default=None, metavar="DIR", help="a saved fuser (UltraFuser.save_pretrained)")
    p.add_argument("--tokenizer", default=None, metavar="DIR",
                   help="the shared tokenizer (default: the bundled one, else the first expert's)")
    p.add_argument("--template", action="append", default=None,
                   help="an expert's prompt template with {prompt} (repeat once per expert; default: the gate's "
                        "saved templates, else the tokenizer's chat template)")
    p.add_argument("--prompt", action="append", default=None, help="a prompt (repeat for a batch)")
    p.add_argument("--max-new-tokens", type=int_at_least(1), default=32, help="tokens to generate at most")
    p.add_argument("--temperature", type=float_in(0.0, None), default=0.0, help="sampling temperature; 0 = greedy")
    p.add_argument("--top-k", type=int_at_least(1), default=None, help="keep the k most likely tokens (sampling)")
    p.add_argument("--top-p", type=float_in(0.0, 1.0, low_open=True), default=None,
                   help="nucleus sampling: keep the smallest set of tokens with this total probability")
    p.add_argument("--seed", type=int, default=0, help="sampling seed")
    p.add_argument("--json", action="store_true", help="print one JSON object")

    def run(args: argparse.Namespace) -> int:
        import sys

        message = check_args(args)
        if message:
            print(f"lmfuse fuse: {message}", file=sys.stderr)
            return 2
        specs = args.expert or [BUNDLED, BUNDLED]
        notices = []
        n_bundled = sum(s == BUNDLED for s in specs)
        if n_bundled:
            notices.append(STAND_IN_NOTICE.format(n=n_bundled))
        if args.gate is None:
            notices.append(FRESH_GATE_NOTICE.format(n=len(specs)))
        for line in notices:
            print(line, file=sys.stderr)

        import torch

        from lmfuse.fusion import ExpertMismatchError, TokenizerMismatchError, UltraFuser

        models, tok = _load_experts(specs, args.tokenizer, args.gate)
        try:
            if args.gate is not None:
                kw = {"templates": args.template} if args.template is not None else {}
                fuser = UltraFuser.from_pretrained(args.gate, models, tok, **kw)
            else:
                fuser = UltraFuser(models, tok, templates=args.template)
        except (ExpertMismatchError, TokenizerMismatchError) as e:
            print(f"lmfuse fuse: {e}", file=sys.stderr)
            return 2
        prompts = args.prompt or ["What is 12 + 30?", "Write a haiku about the sea."]
        out = fuser.generate(prompts, max_new_tokens=args.max_new_tokens, temperature=args.temperature,
                             top_k=args.top_k, top_p=args.top_p, generator=torch.Generator().manual_seed(args.seed))
        mean_gate = [out.gate[b, :int(out.new_tokens[b])].mean(0).tolist() if int(out.new_tokens[b]) else None
                     for b in range(len(prompts))]
        if args.json:
            print(json.dumps({"experts": specs, "expert_names": fuser.expert_names, "prompts": prompts,
                              "texts": out.texts, "new_tokens": out.new_tokens.tolist(), "mean_gate": mean_gate,
                              "tokens_per_s": out.tokens_per_s, "notices": notices}, indent=1))
        else:
            for prompt, text, g in zip(prompts, out.texts, mean_gate):
                weights = ", ".join(f"{n} {w:.2f}" for n, w in zip(fuser.expert_names, g)) if g else "-"
                print(f">>> {prompt}\n{text}\n[mean gate: {weights}]\n")
            print(f"[fuse] {int(out.new_tokens.sum())} tokens in {out.wall_time_s:.2f} s "
                  f"({out.tokens_per_s:.1f} tokens/s), {fuser.num_experts} experts")
        return 0
    return run
