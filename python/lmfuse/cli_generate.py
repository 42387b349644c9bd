"""``lmfuse generate``: decode prompts with the bundled SmolLM2-135M-Instruct and print text and
statistics.

``plain`` (the default) is the full model alone: on one model it is also the fastest method.
The other methods need a second, smaller model, and only one model ships offline, so they use
*stand-ins*: the full model truncated to its first layers (weights shared). A stand-in shows how
the method works; its output quality says nothing about the method with real model pairs, and
the command prints a notice saying so.

speculative   target = the full model, draft = its first ``--draft-layers`` layers, or
              ``--draft lookup`` for prompt lookup (no stand-in)
contrastive   large = the full model, small = its first ``--draft-layers`` layers
proxy         large_base = the full model, small_tuned = first ``--draft-layers`` layers,
              small_base = first ``--base-layers`` layers (a demonstration of the arithmetic)
plain         the full model alone

Every argument is checked before any model is loaded: bad values exit with code 2 and a
one-line message. Prompts go through the tokenizer's chat template unless ``--no-chat``;
generation stops at the model's end-of-sequence token(s) from its generation config.

Only the standard library is imported at module level (every ``lmfuse`` call imports this).
"""

from __future__ import annotations

import argparse
import json
import math
import struct

from .cli import command

METHODS = ("plain", "speculative", "contrastive", "proxy")
STAND_IN_NOTICE = ("note: the {what} is a stand-in (the bundled model truncated to its first {layers} layers): "
                   "this run demonstrates the {method} mechanism, it is not a quality result")


# ------------------------------------------------------------------------ argument types


def _number(text: str, kind, what: str):
    try:
        value = kind(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected {what}, got {text!r}") from None
    if kind is float and not math.isfinite(value):
        raise argparse.ArgumentTypeError(f"expected {what}, got {text!r}")
    return value


def int_at_least(low: int):
    """An argparse ``type=``: an int ``>= low``."""
    def parse(text: str) -> int:
        value = _number(text, int, f"an integer >= {low}")
        if value < low:
            raise argparse.ArgumentTypeError(f"expected an integer >= {low}, got {value}")
        return value
    parse.__name__ = f"int>={low}"
    return parse


def float_in(low: float, high: float | None, low_open: bool = False):
    """An argparse ``type=``: a finite float in ``[low, high]`` (``(low, high]`` if ``low_open``)."""
    span = f"{'(' if low_open else '['}{low:g}, {'inf)' if high is None else f'{high:g}]'}"

    def parse(text: str) -> float:
        value = _number(text, float, f"a number in {span}")
        if value < low or (low_open and value == low) or (high is not None and value > high):
            raise argparse.ArgumentTypeError(f"expected a number in {span}, got {value:g}")
        return value
    parse.__name__ = f"float in {span}"
    return parse


def finite_float(text: str) -> float:
    """An argparse ``type=``: any finite float."""
    return _number(text, float, "a finite number")


# ------------------------------------------------------------------------ layer count


_GGUF_SCALARS = {0: "<B", 1: "<b", 2: "<H", 3: "<h", 4: "<I", 5: "<i", 6: "<f", 7: "<?", 10: "<Q", 11: "<q", 12: "<d"}


def gguf_block_count(path: str) -> int:
    """The layer count (``<arch>.block_count``) from a GGUF file's metadata header, reading only
    the key/value pairs before it (no tensor data, no tokenizer arrays). Raises ``ValueError``
    when the file is not GGUF v2/v3 or has no block count."""
    with open(path, "rb") as f:
        def read(fmt):
            size = struct.calcsize(fmt)
            data = f.read(size)
            if len(data) != size:
                raise ValueError(f"{path}: truncated GGUF header")
            return struct.unpack(fmt, data)[0]

        def string() -> str:
            return f.read(read("<Q")).decode("utf-8", "replace")

        def skip(kind: int) -> None:
            if kind in _GGUF_SCALARS:
                f.seek(struct.calcsize(_GGUF_SCALARS[kind]), 1)
            elif kind == 8:
                f.seek(read("<Q"), 1)
            elif kind == 9:
                item, n = read("<I"), read("<Q")
                if item in _GGUF_SCALARS:
                    f.seek(n * struct.calcsize(_GGUF_SCALARS[item]), 1)
                else:
                    for _ in range(n):
                        skip(item)
            else:
                raise ValueError(f"{path}: unknown GGUF value type {kind}")

        if f.read(4) != b"GGUF" or read("<I") not in (2, 3):
            raise ValueError(f"{path} is not a GGUF v2/v3 file")
        read("<Q")  # tensor count
        for _ in range(read("<Q")):
            key, kind = string(), read("<I")
            if key.endswith(".block_count") and kind in _GGUF_SCALARS:
                return int(read(_GGUF_SCALARS[kind]))
            skip(kind)
    raise ValueError(f"{path}: no <arch>.block_count in the GGUF metadata")


def bundled_num_layers() -> int:
    """Layer count of the bundled model, from its GGUF header (no weights are read)."""
    from lmfuse.models import bundled_gguf_path

    return gguf_block_count(bundled_gguf_path())


def check_layers(args: argparse.Namespace, total: int) -> str | None:
    """The error message for a stand-in layer count outside ``[1, total - 1]``, or None."""
    wanted = []
    if args.method in ("contrastive", "proxy") or (args.method == "speculative" and args.draft == "layers"):
        wanted.append(("--draft-layers", args.draft_layers))
    if args.method == "proxy":
        wanted.append(("--base-layers", args.base_layers))
    for flag, value in wanted:
        if not 1 <= value <= total - 1:
            return (f"{flag} must be in [1, {total - 1}] (a stand-in is a strict truncation of the "
                    f"{total}-layer bundled model), got {value}")
    return None


# ------------------------------------------------------------------------ models and prompts


def _build_models(args):
    from lmfuse.collab import PromptLookupDrafter, truncate_layers
    from lmfuse.models import load_bundled_model

    model, tok = load_bundled_model()
    if args.method == "plain":
        return tok, (model,)
    small = None if args.draft == "lookup" and args.method == "speculative" else truncate_layers(model, args.draft_layers)
    if args.method == "speculative":
        return tok, (model, small if small is not None else PromptLookupDrafter())
    if args.method == "contrastive":
        return tok, (model, small)
    return tok, (model, small, truncate_layers(model, args.base_layers))


def stand_in_notices(args: argparse.Namespace) -> list[str]:
    """One line per truncated-layer stand-in model the method uses (none for plain or lookup)."""
    m = args.method
    if m == "speculative" and args.draft == "layers":
        return [STAND_IN_NOTICE.format(what="draft model", layers=args.draft_layers, method="speculative decoding")]
    if m == "contrastive":
        return [STAND_IN_NOTICE.format(what="small (amateur) model", layers=args.draft_layers,
                                       method="contrastive decoding")]
    if m == "proxy":
        return [STAND_IN_NOTICE.format(what="tuned small model", layers=args.draft_layers, method="proxy tuning"),
                STAND_IN_NOTICE.format(what="base small model", layers=args.base_layers, method="proxy tuning")]
    return []


def _encode(tok, prompts: list[str], chat: bool):
    tok.padding_side = "left"
    if tok.pad_token_id is None:
        tok.pad_token = tok.eos_token
    chat = chat and bool(getattr(tok, "chat_template", None))
    texts = [tok.apply_chat_template([{"role": "user", "content": p}], tokenize=False, add_generation_prompt=True)
             if chat else p for p in prompts]
    return tok(texts, return_tensors="pt", padding=True)


@command("generate", help="generate text with plain / speculative / contrastive / proxy decoding")
def _generate_command(p: argparse.ArgumentParser):
    p.add_argument("--method", choices=METHODS, default="plain",
                   help="decoding method; all but plain use truncated stand-in models (a demonstration)")
    p.add_argument("--prompt", action="append", default=None,
                   help="a prompt (repeat for a batch; default: two example prompts)")
    p.add_argument("--max-new-tokens", type=int_at_least(1), default=48, help="tokens to generate at most")
    p.add_argument("--num-draft-tokens", type=int_at_least(1), default=5, help="drafts per step (speculative)")
    p.add_argument("--draft-confidence", type=float_in(0.0, 1.0), default=0.4,
                   help="stop a step's drafting after a draft token below this draft probability (0 = never)")
    p.add_argument("--draft", choices=("layers", "lookup"), default="layers",
                   help="speculative drafter: truncated model or prompt lookup")
    p.add_argument("--draft-layers", type=int_at_least(1), default=20,
                   help="layers of the truncated small model (speculative draft, contrastive small, proxy small_tuned)")
    p.add_argument("--base-layers", type=int_at_least(1), default=4, help="layers of the proxy's small base model")
    p.add_argument("--temperature", type=float_in(0.0, None), default=0.0, help="sampling temperature; 0 = greedy")
    p.add_argument("--top-k", type=int_at_least(1), default=None, help="keep the k most likely tokens (sampling)")
    p.add_argument("--top-p", type=float_in(0.0, 1.0, low_open=True), default=None,
                   help="nucleus sampling: keep the smallest set of tokens with this total probability")
    p.add_argument("--alpha", type=finite_float, default=None,
                   help="contrastive plausibility alpha (default 0.1) or proxy alpha (default 1.0)")
    p.add_argument("--seed", type=int, default=0, help="sampling seed")
    p.add_argument("--no-chat", action="store_true",
                   help="feed prompts raw, without the tokenizer's chat template")
    p.add_argument("--json", action="store_true", help="print one JSON object")

    def run(args: argparse.Namespace) -> int:
        import sys

        if args.method == "contrastive" and args.alpha is not None and not 0 <= args.alpha <= 1:
            print(f"lmfuse generate: --alpha for contrastive must be in [0, 1], got {args.alpha:g}", file=sys.stderr)
            return 2
        try:
            total = bundled_num_layers()
        except (OSError, ValueError) as e:  # no readable header: truncate_layers checks after loading
            total = None
            print(f"lmfuse generate: could not read the bundled model's layer count ({e})", file=sys.stderr)
        message = check_layers(args, total) if total is not None else None
        if message:
            print(f"lmfuse generate: {message}", file=sys.stderr)
            return 2
        notices = stand_in_notices(args)
        for line in notices:
            print(line, file=sys.stderr)

        import torch

        from lmfuse import collab

        prompts = args.prompt or ["What is the capital of France?", "Write a haiku about the sea."]
        tok, models = _build_models(args)
        enc = _encode(tok, prompts, chat=not args.no_chat)
        gen = torch.Generator().manual_seed(args.seed)
        # eos_token_id=None: stop at the model's own EOS (its generation config), as generate() does
        common = dict(max_new_tokens=args.max_new_tokens, temperature=args.temperature, top_k=args.top_k,
                      top_p=args.top_p, eos_token_id=None, pad_token_id=tok.pad_token_id, generator=gen)
        ids, mask = enc["input_ids"], enc["attention_mask"]
        if args.method == "speculative":
            out = collab.speculative_generate(*models, ids, mask, num_draft_tokens=args.num_draft_tokens,
                                              draft_confidence_threshold=args.draft_confidence, **common)
        elif args.method == "contrastive":
            out = collab.contrastive_generate(*models, ids, mask, alpha=0.1 if args.alpha is None else args.alpha, **common)
        elif args.method == "proxy":
            out = collab.proxy_generate(*models, ids, mask, alpha=1.0 if args.alpha is None else args.alpha, **common)
        else:
            out = collab.plain_generate(*models, ids, mask, **common)
        P = ids.shape[1]
        texts = [tok.decode(out.sequences[b, P:P + int(out.new_tokens[b])], skip_special_tokens=True)
                 for b in range(len(prompts))]

        def plain(v):  # JSON has no NaN: a row with no drafts has no acceptance rate
            v = v.tolist() if isinstance(v, torch.Tensor) else v
            if isinstance(v, list):
                return [plain(x) for x in v]
            return None if isinstance(v, float) and v != v else v
        stats = {k: plain(v) for k, v in vars(out.stats).items()}
        if args.json:
            print(json.dumps({"method": args.method, "prompts": prompts, "texts": texts, "stats": stats,
                              "notices": notices}, indent=1))
        else:
            for b, (prompt, text) in enumerate(zip(prompts, texts)):
                shown = text if text.strip() else (
                    f"(no text: {int(out.new_tokens[b])} new token(s), "
                    + ("the first was end-of-sequence)" if int(out.new_tokens[b]) <= 1 else "all special tokens)"))
                print(f">>> {prompt}\n{shown}\n")
            print(f"[{args.method}] {out.stats.summary()}")
        return 0
    return run
