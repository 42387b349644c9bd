"""Medical multiple-choice evaluation (MedQA, MedMCQA, PubMedQA, MMLU and lmfuse's own layout).

``evaluate_mcq(model, tokenizer, items, mode=...)`` scores a Hugging Face causal LM:

``mode="loglik"``    every option's continuation (the letter after ``answer_prefix`` in the
                     assistant turn) is scored by its log-probability through the fused
                     vocabulary kernels; the highest wins. No answer is ever invalid.
``mode="generate"``  the model answers (greedy, or self-consistency: ``n_samples`` answers at
                     ``temperature`` / ``top_p``, majority vote) through lmfuse's batched
                     sampler (:func:`lmfuse.collab.plain_generate`), and the letter is read by
                     :func:`extract_choice`; an answer with no letter counts as wrong.

The report has the accuracy per subset, their unweighted average (UltraMedical's "Avg"), the
invalid-answer rate and every item's prediction (``MCQReport.to_json``).
"""

from __future__ import annotations

import json
import os
from collections import defaultdict
from dataclasses import asdict, dataclass, field

import torch

from ._eval_extract import EXTRACTION_RULES, extract_choice, majority_vote
from ._eval_items import (FORMATS, LETTERS, MCQItem, format_question, from_medmcqa, from_medqa, from_mmlu,
                          from_pubmedqa, load_mcq, load_pubmedqa)

__all__ = [
    "MCQItem", "MCQReport", "evaluate_mcq", "build_prompt", "extract_choice", "majority_vote", "EXTRACTION_RULES",
    "load_mcq", "load_pubmedqa", "from_medqa", "from_medmcqa", "from_pubmedqa", "from_mmlu", "format_question",
    "FORMATS", "LETTERS", "MODES", "DECODINGS",
]

MODES = ("loglik", "generate")
DECODINGS = ("greedy", "self_consistency")


@dataclass
class MCQReport:
    """Result of :func:`evaluate_mcq`.

    ``accuracy``: subset → fraction correct; ``counts``: subset → items; ``average``: the
    unweighted mean of the subsets' accuracies; ``invalid_rate``: fraction of items with no
    extractable answer (always 0 in loglik mode); ``predictions``: one dict per item (``id``,
    ``subset``, ``answer``, ``prediction`` (None if invalid), ``correct``, and ``scores`` (loglik)
    or ``outputs`` / ``votes`` (generate)); ``settings``: the arguments of the run.
    """

    mode: str
    accuracy: dict[str, float]
    counts: dict[str, int]
    average: float
    invalid_rate: float
    predictions: list[dict]
    settings: dict = field(default_factory=dict)

    def to_dict(self) -> dict:
        return asdict(self)

    def to_json(self, path) -> str:
        """Write the report (predictions included) as JSON; returns the path."""
        path = os.fspath(path)
        os.makedirs(os.path.dirname(os.path.abspath(path)), exist_ok=True)
        with open(path, "w", encoding="utf-8") as f:
            json.dump(self.to_dict(), f, indent=1)
        return path

    def summary(self) -> str:
        lines = [f"{s:24s} {100 * a:6.2f}%  ({self.counts[s]} items)" for s, a in self.accuracy.items()]
        lines.append(f"{'average (unweighted)':24s} {100 * self.average:6.2f}%")
        lines.append(f"{'invalid answers':24s} {100 * self.invalid_rate:6.2f}%")
        return "\n".join(lines)


def build_prompt(item: MCQItem, tokenizer, *, chat_template: bool = True, system_prompt: str | None = None) -> str:
    """The text the model continues: the question (:func:`format_question`) as a user message
    through the tokenizer's chat template with the generation prompt (``system_prompt``, if
    given, as a system message first), or the bare question + a newline without the template."""
    question = format_question(item)
    if not chat_template:
        return question + "\n"
    messages = ([{"role": "system", "content": system_prompt}] if system_prompt else []) + \
        [{"role": "user", "content": question}]
    return tokenizer.apply_chat_template(messages, tokenize=False, add_generation_prompt=True)


def _check_args(items, mode, decoding, batch_size, n_samples, temperature, top_p, max_new_tokens):
    if mode not in MODES:
        raise ValueError(f"mode: expected one of {list(MODES)}, got {mode!r}")
    if decoding not in DECODINGS:
        raise ValueError(f"decoding: expected one of {list(DECODINGS)}, got {decoding!r}")
    if not isinstance(items, (list, tuple)) or not items or not all(isinstance(i, MCQItem) for i in items):
        raise TypeError("items: expected a non-empty list of MCQItem")
    for name, v in (("batch_size", batch_size), ("n_samples", n_samples), ("max_new_tokens", max_new_tokens)):
        if isinstance(v, bool) or not isinstance(v, int) or v < 1:
            raise ValueError(f"{name}: expected an int >= 1, got {v!r}")
    if isinstance(temperature, bool) or not isinstance(temperature, (int, float)) or not temperature > 0:
        raise ValueError(f"temperature: expected a number > 0, got {temperature!r}")
    if isinstance(top_p, bool) or not isinstance(top_p, (int, float)) or not 0 < top_p <= 1:
        raise ValueError(f"top_p: expected a number in (0, 1], got {top_p!r}")


def _progress(total: int, enabled: bool, desc: str):
    from tqdm.auto import tqdm

    return tqdm(total=total, disable=not enabled, desc=desc, unit="item")


def _encode(tokenizer, text: str, special: bool) -> list[int]:
    return list(tokenizer(text, add_special_tokens=special)["input_ids"])


def _split_continuations(tokenizer, ctx: str, conts: list[str], special: bool):
    """Per option ``(context ids, continuation ids)``: the whole text is tokenised and split where
    its tokens stop matching the context's own tokenisation (so a merge across the boundary
    moves into the continuation)."""
    ctx_ids = _encode(tokenizer, ctx, special)
    out = []
    for c in conts:
        whole = _encode(tokenizer, ctx + c, special)
        n = 0
        while n < min(len(ctx_ids), len(whole) - 1) and whole[n] == ctx_ids[n]:
            n += 1
        out.append((whole[:n], whole[n:]))
    return out


@torch.no_grad()
def _loglik_scores(model, batch: list[list[tuple[list[int], list[int]]]], pad: int) -> list[list[float]]:
    """Log-probability of each option's continuation. ``batch``: per item, per option, (context
    ids, continuation ids). Single-token continuations after one shared context take one
    backbone pass per item and the fused log-prob op on the last hidden state; anything else
    scores every (context + continuation) row with :func:`lmfuse.losses.sequence_log_probs`."""
    from lmfuse import ops
    from lmfuse.losses import output_head, run_backbone, sequence_log_probs

    device = next(model.parameters()).device
    single = all(len(c) == 1 and ctx == opts[0][0] for opts in batch for ctx, c in opts)
    if single:
        head = output_head(model)
        ctxs = [opts[0][0] for opts in batch]
        T = max(map(len, ctxs))
        ids = torch.full((len(ctxs), T), pad, dtype=torch.long)
        mask = torch.zeros((len(ctxs), T), dtype=torch.long)
        for i, c in enumerate(ctxs):
            ids[i, :len(c)] = torch.tensor(c)
            mask[i, :len(c)] = 1
        hidden = run_backbone(head.backbone, ids.to(device), mask.to(device))
        last = hidden[torch.arange(len(ctxs), device=device), mask.sum(1).to(device) - 1]
        rows = torch.cat([last[i:i + 1].expand(len(opts), -1) for i, opts in enumerate(batch)])
        target = torch.tensor([c[0] for opts in batch for _, c in opts], device=device)
        w, b = head.weight.to(rows.dtype), None if head.bias is None else head.bias.to(rows.dtype)
        flat = ops.linear_log_probs(rows, w, target, bias=b, temperature=1.0 / head.logit_scale,
                                    softcap=head.softcap, vocab_size=head.vocab_size).tolist()
    else:
        seqs = [(ctx + c, len(ctx)) for opts in batch for ctx, c in opts]
        T = max(len(s) for s, _ in seqs)
        ids = torch.full((len(seqs), T), pad, dtype=torch.long)
        mask = torch.zeros_like(ids)
        comp = torch.zeros_like(ids)
        for i, (s, n) in enumerate(seqs):
            ids[i, :len(s)] = torch.tensor(s)
            mask[i, :len(s)] = 1
            comp[i, n:len(s)] = 1
        flat = sequence_log_probs(model, ids.to(device), mask.to(device), comp.to(device)).logp_sum.tolist()
    out, k = [], 0
    for opts in batch:
        out.append(flat[k:k + len(opts)])
        k += len(opts)
    return out


def _run_loglik(model, tokenizer, items, prompts, answer_prefix, batch_size, special, bar):
    sep = "" if not answer_prefix or answer_prefix[-1].isspace() else " "
    encoded = [_split_continuations(tokenizer, p + answer_prefix, [sep + L for L in it.options], special)
               for it, p in zip(items, prompts)]
    pad = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else 0
    order = sorted(range(len(items)), key=lambda i: -len(encoded[i][0][0]))  # similar lengths together
    scores: dict[int, list[float]] = {}
    for s in range(0, len(order), batch_size):
        idx = order[s:s + batch_size]
        for i, sc in zip(idx, _loglik_scores(model, [encoded[i] for i in idx], pad)):
            scores[i] = sc
        bar.update(len(idx))
    preds = []
    for i, it in enumerate(items):
        sc = scores[i]
        letters = list(it.options)
        preds.append({"prediction": letters[max(range(len(sc)), key=sc.__getitem__)],
                      "scores": dict(zip(letters, sc))})
    return preds


def _run_generate(model, tokenizer, items, prompts, decoding, n_samples, temperature, top_p,
                  max_new_tokens, batch_size, seed, special, bar):
    from lmfuse.collab import plain_generate
    from lmfuse.collab.kv_cache import left_padded

    device = next(model.parameters()).device
    sampled = decoding == "self_consistency"
    n = n_samples if sampled else 1
    pad = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else 0
    encoded = [torch.tensor(_encode(tokenizer, p, special)) for p in prompts]
    order = sorted(range(len(items)), key=lambda i: -len(encoded[i]))
    per_batch = max(1, batch_size // n)  # rows = items × samples
    generator = torch.Generator().manual_seed(seed)
    outputs: dict[int, list[str]] = {}
    for s in range(0, len(order), per_batch):
        idx = order[s:s + per_batch]
        rows = [encoded[i] for i in idx for _ in range(n)]
        ids, mask = left_padded(rows, pad, device)
        res = plain_generate(model, ids, mask, max_new_tokens=max_new_tokens,
                             temperature=temperature if sampled else 0.0, top_p=top_p if sampled else None,
                             pad_token_id=pad, generator=generator)
        P = ids.shape[1]
        texts = [tokenizer.decode(res.sequences[r, P:P + int(res.new_tokens[r])], skip_special_tokens=True)
                 for r in range(len(rows))]
        for j, i in enumerate(idx):
            outputs[i] = texts[j * n:(j + 1) * n]
        bar.update(len(idx))
    preds = []
    for i, it in enumerate(items):
        votes = [extract_choice(t, it.options) for t in outputs[i]]
        pred = votes[0] if not sampled else majority_vote(votes, "".join(it.options))
        preds.append({"prediction": pred, "outputs": outputs[i], "votes": votes})
    return preds


def evaluate_mcq(model, tokenizer, items: list[MCQItem], *, mode: str = "loglik", decoding: str = "greedy",
                 chat_template: bool = True, system_prompt: str | None = None,
                 answer_prefix: str = "The answer is", n_samples: int = 10, temperature: float = 0.7,
                 top_p: float = 0.9, max_new_tokens: int = 256, batch_size: int = 8, seed: int = 0,
                 progress: bool = True, predictions_path=None) -> MCQReport:
    """Evaluate ``model`` (a Hugging Face causal LM) on multiple-choice ``items``.

    ``mode``: "loglik" or "generate" (see the module docstring). ``decoding`` (generate mode):
    "greedy" (UltraMedical's default) or "self_consistency" (``n_samples`` answers per item at
    ``temperature`` / ``top_p``, seeded by ``seed``; majority vote, ties to the earliest letter;
    defaults n = 10, T = 0.7, top-p = 0.9, the paper's "(Ens)" setting). ``answer_prefix``
    (loglik mode) opens the assistant turn before the scored letter. ``chat_template``: render
    the question with the tokenizer's chat template (else the bare text). ``batch_size``: items
    per forward in loglik mode, rows (items × samples) per generation batch in generate mode.
    ``predictions_path``: also write the report as JSON there.
    """
    _check_args(items, mode, decoding, batch_size, n_samples, temperature, top_p, max_new_tokens)
    if chat_template and getattr(tokenizer, "chat_template", None) is None:
        raise ValueError("chat_template: the tokenizer has no chat template; pass chat_template=False")
    was_training = model.training
    model.eval()
    prompts = [build_prompt(it, tokenizer, chat_template=chat_template, system_prompt=system_prompt) for it in items]
    special = not chat_template  # the template already holds the special tokens it wants
    try:
        with _progress(len(items), progress, f"{mode} eval") as bar:
            if mode == "loglik":
                preds = _run_loglik(model, tokenizer, items, prompts, answer_prefix, batch_size, special, bar)
            else:
                preds = _run_generate(model, tokenizer, items, prompts, decoding, n_samples, temperature, top_p,
                                      max_new_tokens, batch_size, seed, special, bar)
    finally:
        model.train(was_training)
    settings = {"mode": mode, "chat_template": chat_template, "system_prompt": system_prompt, "n_items": len(items)}
    if mode == "loglik":
        settings["answer_prefix"] = answer_prefix
    else:
        settings.update(decoding=decoding, max_new_tokens=max_new_tokens)
        if decoding == "self_consistency":
            settings.update(n_samples=n_samples, temperature=temperature, top_p=top_p, seed=seed)
    report = _report(mode, items, preds, settings)
    if predictions_path is not None:
        report.to_json(predictions_path)
    return report


def _report(mode: str, items: list[MCQItem], preds: list[dict], settings: dict) -> MCQReport:
    right, total = defaultdict(int), defaultdict(int)
    rows, invalid = [], 0
    for it, p in zip(items, preds):
        ok = p["prediction"] == it.answer
        right[it.subset] += ok
        total[it.subset] += 1
        invalid += p["prediction"] is None
        rows.append({"id": it.id, "subset": it.subset, "answer": it.answer, **p, "correct": ok})
    acc = {s: right[s] / total[s] for s in total}
    return MCQReport(mode, acc, dict(total), sum(acc.values()) / len(acc), invalid / len(items), rows, settings)
