"""Preference data: tokenising prompt / chosen / rejected examples and collating them into TRL 1.16's
batch layout (``[chosen rows; rejected rows]``, right padding, a completion mask)."""

from __future__ import annotations

from typing import Any

import torch

__all__ = ["tokenize_preference", "PreferenceCollator", "TOKENIZED_KEYS"]

TOKENIZED_KEYS = ("prompt_ids", "chosen_ids", "rejected_ids")
_REF_KEYS = ("ref_chosen_logps", "ref_rejected_logps")


def _is_messages(x) -> bool:
    return isinstance(x, list) and all(isinstance(m, dict) and "role" in m for m in x)


def _common_prefix(a: list[int], b: list[int]) -> int:
    n = 0
    for x, y in zip(a, b):
        if x != y:
            break
        n += 1
    return n


def _ids(out) -> list[int]:
    ids = out["input_ids"] if isinstance(out, dict) or hasattr(out, "keys") else out
    return list(ids.tolist() if isinstance(ids, torch.Tensor) else ids)


def _split_implicit_prompt(example: dict) -> tuple[Any, Any, Any]:
    """``chosen`` / ``rejected`` message lists that share their leading turns: the shared turns
    are the prompt."""
    chosen, rejected = example["chosen"], example["rejected"]
    n = 0
    while n < min(len(chosen), len(rejected)) and chosen[n] == rejected[n]:
        n += 1
    return chosen[:n], chosen[n:], rejected[n:]


def tokenize_preference(example: dict, tokenizer, index: int | None = None) -> dict[str, list[int]]:
    """``{"prompt_ids", "chosen_ids", "rejected_ids"}`` (lists of int) from one example, as TRL 1.16's
    ``DPOTrainer`` tokenises it.

    ``example``: already tokenised (those three keys), or ``prompt`` / ``chosen`` / ``rejected`` as
    strings (the tokenizer's EOS is appended to the completions when missing) or as message lists
    (``[{"role", "content"}, ...]``, rendered with the tokenizer's chat template: the prompt with the
    generation prompt, prompt + completion without). Without ``prompt``, message-list ``chosen`` /
    ``rejected`` give their shared leading turns as the prompt. The completion starts where the
    tokenised prompt and prompt + completion first differ.
    """
    where = f"example {index}" if index is not None else "example"
    if not isinstance(example, dict):
        raise TypeError(f"{where}: expected a dict, got {type(example).__name__}")
    if all(k in example for k in TOKENIZED_KEYS):
        out = {}
        for k in TOKENIZED_KEYS:
            v = example[k]
            v = v.tolist() if isinstance(v, torch.Tensor) else list(v)
            if not all(isinstance(t, int) for t in v):
                raise TypeError(f"{where}: field {k!r} must be a list of token ids")
            out[k] = v
        if not out["chosen_ids"] or not out["rejected_ids"]:
            raise ValueError(f"{where}: chosen_ids and rejected_ids must not be empty")
        for k in _REF_KEYS:
            if k in example:
                out[k] = float(example[k])
        return out
    missing = [k for k in ("chosen", "rejected") if k not in example]
    if missing:
        raise ValueError(f"{where}: missing field(s) {missing}; expected prompt/chosen/rejected or "
                         f"{list(TOKENIZED_KEYS)}")
    if tokenizer is None:
        raise ValueError(f"{where}: text examples need a tokenizer (processing_class)")
    if "prompt" in example:
        prompt, chosen, rejected = example["prompt"], example["chosen"], example["rejected"]
    elif _is_messages(example["chosen"]) and _is_messages(example["rejected"]):
        prompt, chosen, rejected = _split_implicit_prompt(example)
    else:
        raise ValueError(f"{where}: missing field 'prompt' (only message lists can carry it implicitly)")
    if _is_messages(prompt) and _is_messages(chosen) and _is_messages(rejected):
        render = lambda m, **kw: _ids(tokenizer.apply_chat_template(m, tokenize=True, return_dict=True, **kw))  # noqa: E731
        p = render(prompt, add_generation_prompt=True)
        pc, pr = render(prompt + chosen), render(prompt + rejected)
    elif all(isinstance(x, str) for x in (prompt, chosen, rejected)):
        eos = tokenizer.eos_token or ""
        chosen = chosen if chosen.endswith(eos) else chosen + eos
        rejected = rejected if rejected.endswith(eos) else rejected + eos
        p = _ids(tokenizer(text=prompt))
        pc, pr = _ids(tokenizer(text=prompt + chosen)), _ids(tokenizer(text=prompt + rejected))
    else:
        raise TypeError(f"{where}: prompt, chosen and rejected must all be strings or all message lists "
                        f"([{{'role': ..., 'content': ...}}])")
    n = min(_common_prefix(p, pc), _common_prefix(p, pr))
    if n == len(pc) or n == len(pr):
        raise ValueError(f"{where}: the chosen or rejected completion tokenises to nothing")
    return {"prompt_ids": p[:n], "chosen_ids": pc[n:], "rejected_ids": pr[n:]}


class PreferenceCollator:
    """Batches preference examples in TRL 1.16's layout.

    ``__call__(examples)`` → ``input_ids [2B, T]`` int64 (rows ``0..B-1`` prompt + chosen, rows
    ``B..2B-1`` prompt + rejected, right-padded with ``pad_token_id``), ``attention_mask [2B, T]`` and
    ``completion_mask [2B, T]`` int64, plus ``ref_chosen_logps`` / ``ref_rejected_logps`` ``[B]``
    float32 when every example carries them. Examples are tokenised ones or text / message-list
    ones (tokenised here with ``tokenizer``, see :func:`tokenize_preference`). ``max_length``
    truncates each sequence (``truncation_mode`` "keep_start" or "keep_end") before padding.
    """

    def __init__(self, pad_token_id: int | None = None, *, tokenizer=None, max_length: int | None = None,
                 truncation_mode: str = "keep_start", pad_to_multiple_of: int | None = None):
        if pad_token_id is None and tokenizer is not None:
            pad_token_id = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else tokenizer.eos_token_id
        if isinstance(pad_token_id, bool) or not isinstance(pad_token_id, int):
            raise ValueError(f"pad_token_id: expected an int (or a tokenizer with a pad or EOS token), got {pad_token_id!r}")
        if max_length is not None and (isinstance(max_length, bool) or not isinstance(max_length, int) or max_length < 2):
            raise ValueError(f"max_length: expected an int >= 2 or None, got {max_length!r}")
        if truncation_mode not in ("keep_start", "keep_end"):
            raise ValueError(f"truncation_mode: expected 'keep_start' or 'keep_end', got {truncation_mode!r}")
        if pad_to_multiple_of is not None and (not isinstance(pad_to_multiple_of, int) or pad_to_multiple_of < 1):
            raise ValueError(f"pad_to_multiple_of: expected a positive int or None, got {pad_to_multiple_of!r}")
        self.pad_token_id, self.tokenizer = pad_token_id, tokenizer
        self.max_length, self.truncation_mode, self.pad_to_multiple_of = max_length, truncation_mode, pad_to_multiple_of

    def _cut(self, seq: list) -> list:
        if self.max_length is None:
            return seq
        return seq[:self.max_length] if self.truncation_mode == "keep_start" else seq[-self.max_length:]

    def __call__(self, examples: list[dict]) -> dict[str, torch.Tensor]:
        if not examples:
            raise ValueError("examples: expected a non-empty list")
        toks = [tokenize_preference(ex, self.tokenizer, i) for i, ex in enumerate(examples)]
        rows, masks = [], []
        for side in ("chosen_ids", "rejected_ids"):
            for t in toks:
                rows.append(self._cut(t["prompt_ids"] + t[side]))
                masks.append(self._cut([0] * len(t["prompt_ids"]) + [1] * len(t[side])))
        T = max(len(r) for r in rows)
        if self.pad_to_multiple_of:
            T = -(-T // self.pad_to_multiple_of) * self.pad_to_multiple_of
        n = len(rows)
        input_ids = torch.full((n, T), self.pad_token_id, dtype=torch.long)
        attention_mask = torch.zeros((n, T), dtype=torch.long)
        completion_mask = torch.zeros((n, T), dtype=torch.long)
        for i, (r, m) in enumerate(zip(rows, masks)):
            input_ids[i, :len(r)] = torch.tensor(r, dtype=torch.long)
            attention_mask[i, :len(r)] = 1
            completion_mask[i, :len(m)] = torch.tensor(m, dtype=torch.long)
        out = {"input_ids": input_ids, "attention_mask": attention_mask, "completion_mask": completion_mask}
        if all(all(k in t for k in _REF_KEYS) for t in toks):
            for k in _REF_KEYS:
                out[k] = torch.tensor([t[k] for t in toks], dtype=torch.float32)
        return out
