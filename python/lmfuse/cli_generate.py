"""``lmfuse generate``: decode prompts with the bundled SmolLM2-135M-Instruct and print text and
statistics. Stand-ins for the collaborating models, since only one model ships offline:

speculative   target = the full model, draft = its first ``--draft-layers`` layers (weights
              shared), or ``--draft lookup`` for prompt lookup
contrastive   large = the full model, small = its first ``--draft-layers`` layers
proxy         large_base = the full model, small_tuned = first ``--draft-layers`` layers,
              small_base = first ``--base-layers`` layers (a demonstration of the arithmetic)
plain         the full model alone

Only the standard library is imported at module level (every ``lmfuse`` call imports this).
"""

from __future__ import annotations

import argparse
import json

from .cli import command

METHODS = ("speculative", "contrastive", "proxy", "plain")


def _build_models(args):
    from lmfuse.collab import PromptLookupDrafter, truncate_layers
    from lmfuse.models import load_bundled_model

    model, tok = load_bundled_model()
    small = None if args.draft == "lookup" else truncate_layers(model, args.draft_layers)
    if args.method == "speculative":
        return tok, (model, small if small is not None else PromptLookupDrafter())
    if args.method == "contrastive":
        return tok, (model, small)
    if args.method == "proxy":
        return tok, (model, small, truncate_layers(model, args.base_layers))
    return tok, (model,)


def _encode(tok, prompts: list[str], chat: bool):
    tok.padding_side = "left"
    if tok.pad_token_id is None:
        tok.pad_token = tok.eos_token
    texts = [tok.apply_chat_template([{"role": "user", "content": p}], tokenize=False, add_generation_prompt=True)
             if chat else p for p in prompts]
    return tok(texts, return_tensors="pt", padding=True)


@command("generate", help="generate text with speculative / contrastive / proxy / plain decoding")
def _generate_command(p: argparse.ArgumentParser):
    p.add_argument("--method", choices=METHODS, default="speculative")
    p.add_argument("--prompt", action="append", default=None,
                   help="a prompt (repeat for a batch; default: two example prompts)")
    p.add_argument("--max-new-tokens", type=int, default=48)
    p.add_argument("--num-draft-tokens", type=int, default=5, help="drafts per step (speculative)")
    p.add_argument("--draft-confidence", type=float, default=0.4,
                   help="stop a step's drafting after a draft token below this draft probability (0 = never)")
    p.add_argument("--draft", choices=("layers", "lookup"), default="layers",
                   help="speculative drafter: truncated model or prompt lookup")
    p.add_argument("--draft-layers", type=int, default=20, help="layers of the truncated small model")
    p.add_argument("--base-layers", type=int, default=4, help="layers of the proxy's small base model")
    p.add_argument("--temperature", type=float, default=0.0, help="0 = greedy")
    p.add_argument("--top-k", type=int, default=None)
    p.add_argument("--top-p", type=float, default=None)
    p.add_argument("--alpha", type=float, default=None,
                   help="contrastive plausibility alpha (default 0.1) or proxy alpha (default 1.0)")
    p.add_argument("--seed", type=int, default=0, help="sampling seed")
    p.add_argument("--no-chat", action="store_true", help="feed prompts raw, without the chat template")
    p.add_argument("--json", action="store_true", help="print one JSON object")

    def run(args: argparse.Namespace) -> int:
        import sys

        import torch

        from lmfuse import collab

        if args.max_new_tokens < 1:
            print("lmfuse generate: --max-new-tokens must be >= 1", file=sys.stderr)
            return 2
        if not 0 <= args.draft_confidence <= 1:
            print("lmfuse generate: --draft-confidence must be in [0, 1]", file=sys.stderr)
            return 2
        prompts = args.prompt or ["What is the capital of France?", "Write a haiku about the sea."]
        tok, models = _build_models(args)
        enc = _encode(tok, prompts, chat=not args.no_chat)
        gen = torch.Generator().manual_seed(args.seed)
        common = dict(max_new_tokens=args.max_new_tokens, temperature=args.temperature, top_k=args.top_k,
                      top_p=args.top_p, eos_token_id=tok.eos_token_id, pad_token_id=tok.pad_token_id, generator=gen)
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
            print(json.dumps({"method": args.method, "prompts": prompts, "texts": texts, "stats": stats}, indent=1))
        else:
            for prompt, text in zip(prompts, texts):
                print(f">>> {prompt}\n{text}\n")
            print(f"[{args.method}] {out.stats.summary()}")
        return 0
    return run
