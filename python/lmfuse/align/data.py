"""UltraMedical data: the SFT and preference record schemas, loaded from JSON / JSONL / Parquet,
validated, and turned into chat messages and tokenised examples.

SFT record (``load_ultramedical``)::

    {"id": "MedQA,1592", "type": "Exam",
     "conversations": [{"from": "human", "value": "..."}, {"from": "gpt", "value": "..."}],
     "answer": "C", "score": "This question would be rated as a 9. ..."}

Preference record (``load_ultramedical_preference``)::

    {"prompt_id": "MedQA,1234", "prompt": "...",
     "chosen": [{"role": "user", "content": "..."}, {"role": "assistant", "content": "..."}],
     "rejected": [...same shape...], "label_type": "...", "metadata": {...}}

Every validation error is a :class:`RecordError` (a ``ValueError``) naming the file, the record's
index and id, and the field. :func:`tokenize_chat` renders messages with the tokenizer's chat
template and puts labels on the assistant tokens only (``-100`` elsewhere).
"""

from __future__ import annotations

import json
import os
import re
from dataclasses import dataclass, field
from typing import Any, Iterable

__all__ = [
    "RecordError", "read_records", "UltraMedicalRecord", "PreferenceRecord", "load_ultramedical",
    "load_ultramedical_preference", "parse_difficulty", "tokenize_chat", "preference_features",
]

_ROLE_OF = {"human": "user", "user": "user", "gpt": "assistant", "assistant": "assistant", "system": "system"}
_SFT_TYPES = ("Exam", "Literature", "Open-End", "mc")


class RecordError(ValueError):
    """A record that does not follow its schema; the message names the record and the field."""


def read_records(path) -> list[dict]:
    """The records of a ``.json`` (a list of objects, or ``{"data": [...]}``), ``.jsonl`` (one
    object a line) or ``.parquet`` file, as a list of dicts.

    Raises ``FileNotFoundError`` for a missing file, ``ValueError`` for another suffix or a file
    that is not a list of objects (naming the line for JSONL).
    """
    path = os.fspath(path)
    if not os.path.isfile(path):
        raise FileNotFoundError(f"path: no such file {path!r}")
    low = path.lower()
    if low.endswith(".jsonl"):
        rows = []
        with open(path, encoding="utf-8") as f:
            for n, line in enumerate(f, 1):
                if not line.strip():
                    continue
                try:
                    rows.append(json.loads(line))
                except json.JSONDecodeError as e:
                    raise ValueError(f"{path}: line {n} is not valid JSON ({e.msg})") from None
    elif low.endswith(".json"):
        with open(path, encoding="utf-8") as f:
            rows = json.load(f)
        if isinstance(rows, dict) and isinstance(rows.get("data"), list):
            rows = rows["data"]
    elif low.endswith(".parquet"):
        import pandas as pd

        rows = [_plain(r) for r in pd.read_parquet(path).to_dict(orient="records")]
    else:
        raise ValueError(f"path: expected a .json, .jsonl or .parquet file, got {path!r}")
    if not isinstance(rows, list):
        raise ValueError(f"{path}: expected a list of records, got {type(rows).__name__}")
    for i, r in enumerate(rows):
        if not isinstance(r, dict):
            raise RecordError(f"{path}: record {i}: expected an object, got {type(r).__name__}")
    return rows


def _plain(value):
    """Parquet values (numpy arrays, numpy scalars) as plain Python lists / numbers."""
    import numpy as np

    if isinstance(value, dict):
        return {k: _plain(v) for k, v in value.items()}
    if isinstance(value, (list, tuple, np.ndarray)):
        return [_plain(v) for v in value]
    if isinstance(value, np.generic):
        return value.item()
    return value


def _where(src: str, i: int, rec: dict, id_key: str) -> str:
    rid = rec.get(id_key) if isinstance(rec, dict) else None
    return f"{src}: record {i}" + (f" (id {rid!r})" if rid is not None else "")


def _need_str(rec: dict, key: str, where: str, allow_none: bool = False) -> str | None:
    if key not in rec:
        raise RecordError(f"{where}: missing field {key!r}")
    value = rec[key]
    if value is None and allow_none:
        return None
    if not isinstance(value, str):
        raise RecordError(f"{where}: field {key!r}: expected a string, got {type(value).__name__}")
    return value


def parse_difficulty(score: str | None) -> int | None:
    """The 1-10 rating in an UltraMedical ``score`` string ("... would be rated as a 9 ..."),
    or None when there is none."""
    if not score:
        return None
    m = re.search(r"(?:rated|rating|score)\D{0,20}?\b(10|[1-9])\b", score, flags=re.IGNORECASE)
    return int(m.group(1)) if m else None


@dataclass
class UltraMedicalRecord:
    """One SFT record. ``messages``: the conversation as ``[{"role", "content"}]`` chat messages."""

    id: str
    type: str
    messages: list[dict]
    answer: str | None
    score: str | None

    @property
    def source(self) -> str:
        """The source data set, the part of ``id`` before the comma ("MedQA", "PubMedQA", ...)."""
        return self.id.split(",")[0]

    @property
    def difficulty(self) -> int | None:
        return parse_difficulty(self.score)


def _conversation(turns, where: str, key: str, role_key: str, text_key: str) -> list[dict]:
    if not isinstance(turns, list) or not turns:
        raise RecordError(f"{where}: field {key!r}: expected a non-empty list of turns, got "
                          f"{type(turns).__name__ if not isinstance(turns, list) else 'an empty list'}")
    out = []
    for j, t in enumerate(turns):
        at = f"{where}: field {key!r}[{j}]"
        if not isinstance(t, dict):
            raise RecordError(f"{at}: expected an object, got {type(t).__name__}")
        for k in (role_key, text_key):
            if k not in t:
                raise RecordError(f"{at}: missing {k!r}")
        role = _ROLE_OF.get(t[role_key]) if isinstance(t[role_key], str) else None
        if role is None:
            raise RecordError(f"{at}.{role_key}: expected one of {sorted(_ROLE_OF)}, got {t[role_key]!r}")
        if not isinstance(t[text_key], str):
            raise RecordError(f"{at}.{text_key}: expected a string, got {type(t[text_key]).__name__}")
        out.append({"role": role, "content": t[text_key]})
    if out[-1]["role"] != "assistant":
        raise RecordError(f"{where}: field {key!r}: the last turn must be the assistant's, got {out[-1]['role']!r}")
    if not any(m["role"] == "user" for m in out):
        raise RecordError(f"{where}: field {key!r}: no user turn")
    return out


def load_ultramedical(path, *, types: Iterable[str] | None = None,
                      sources: Iterable[str] | None = None) -> list[UltraMedicalRecord]:
    """Load and validate UltraMedical SFT records (``id``, ``type``, ``conversations`` of
    ``from`` / ``value``, ``answer``, ``score``) from a JSON / JSONL / Parquet file.

    ``types`` / ``sources`` keep only records of those types ("Exam", "Literature",
    "Open-End") / sources (the ``id`` prefix, e.g. "MedQA"). Raises :class:`RecordError`.
    """
    src = os.fspath(path)
    out = []
    ids = set()
    for i, rec in enumerate(read_records(path)):
        where = _where(src, i, rec, "id")
        rid = _need_str(rec, "id", where)
        if rid in ids:
            raise RecordError(f"{where}: field 'id': duplicate id {rid!r}")
        ids.add(rid)
        rtype = _need_str(rec, "type", where)
        if rtype not in _SFT_TYPES:
            raise RecordError(f"{where}: field 'type': expected one of {list(_SFT_TYPES)}, got {rtype!r}")
        if "conversations" not in rec:
            raise RecordError(f"{where}: missing field 'conversations'")
        messages = _conversation(rec["conversations"], where, "conversations", "from", "value")
        answer = _need_str(rec, "answer", where, allow_none=True) if "answer" in rec else None
        score = _need_str(rec, "score", where, allow_none=True) if "score" in rec else None
        out.append(UltraMedicalRecord(rid, rtype, messages, answer, score))
    if types is not None:
        types = set(types)
        out = [r for r in out if r.type in types]
    if sources is not None:
        sources = set(sources)
        out = [r for r in out if r.source in sources]
    return out


@dataclass
class PreferenceRecord:
    """One preference pair: ``chosen`` / ``rejected`` are full conversations (the prompt turns,
    then the assistant's answer); ``metadata`` is kept as it is."""

    prompt_id: str | None
    prompt: str
    chosen: list[dict]
    rejected: list[dict]
    label_type: str | None = None
    metadata: Any = field(default=None)

    def to_trl(self) -> dict:
        """The TRL conversational preference layout: ``{"prompt": [turns before the answer],
        "chosen": [answer], "rejected": [answer]}``."""
        return {"prompt": self.chosen[:-1], "chosen": self.chosen[-1:], "rejected": self.rejected[-1:]}


def load_ultramedical_preference(path) -> list[PreferenceRecord]:
    """Load and validate UltraMedical preference records (``prompt``, ``chosen``, ``rejected`` as
    lists of ``role`` / ``content`` messages, optional ``prompt_id``, ``label_type``,
    ``metadata``) from a JSON / JSONL / Parquet file.

    Checks: both conversations end with an assistant turn and share every turn before it, the
    first user turn equals ``prompt``, and the two answers differ. Raises :class:`RecordError`.
    """
    src = os.fspath(path)
    out = []
    for i, rec in enumerate(read_records(path)):
        where = _where(src, i, rec, "prompt_id")
        prompt = _need_str(rec, "prompt", where)
        conv = {}
        for key in ("chosen", "rejected"):
            if key not in rec:
                raise RecordError(f"{where}: missing field {key!r}")
            conv[key] = _conversation(rec[key], where, key, "role", "content")
        chosen, rejected = conv["chosen"], conv["rejected"]
        if chosen[:-1] != rejected[:-1]:
            raise RecordError(f"{where}: fields 'chosen' / 'rejected': the turns before the answer differ")
        first_user = next(m["content"] for m in chosen if m["role"] == "user")
        if first_user != prompt:
            raise RecordError(f"{where}: field 'prompt': differs from the first user turn of 'chosen'")
        if chosen[-1]["content"] == rejected[-1]["content"]:
            raise RecordError(f"{where}: fields 'chosen' / 'rejected': the two answers are identical")
        pid = rec.get("prompt_id")
        if pid is not None and not isinstance(pid, str):
            raise RecordError(f"{where}: field 'prompt_id': expected a string, got {type(pid).__name__}")
        label = rec.get("label_type")
        if label is not None and not isinstance(label, str):
            raise RecordError(f"{where}: field 'label_type': expected a string, got {type(label).__name__}")
        out.append(PreferenceRecord(pid, prompt, chosen, rejected, label, rec.get("metadata")))
    return out


def _render(tokenizer, messages, add_generation_prompt: bool) -> list[int]:
    text = tokenizer.apply_chat_template(messages, tokenize=False, add_generation_prompt=add_generation_prompt)
    return list(tokenizer(text, add_special_tokens=False)["input_ids"])


def tokenize_chat(messages: list[dict], tokenizer, *, max_length: int | None = None) -> dict:
    """Tokenise a conversation with ``tokenizer``'s chat template, the loss on assistant tokens.

    Returns ``{"input_ids": list[int], "attention_mask": list[int], "labels": list[int]}``:
    ``labels`` equals ``input_ids`` on the tokens of every assistant turn (its text and the
    template's end-of-turn tokens after it) and is ``-100`` elsewhere (system, user, the
    template's role headers). Each assistant span is found by rendering the conversation up to
    the turn with the generation prompt and up to its end; a template whose rendering of a
    prefix is not a prefix of the whole is refused (``ValueError``). ``max_length`` truncates
    on the right.
    """
    if not isinstance(messages, list) or not messages:
        raise ValueError("messages: expected a non-empty list of {'role', 'content'} dicts")
    if getattr(tokenizer, "chat_template", None) is None:
        raise ValueError("tokenizer: has no chat_template")
    if max_length is not None and (not isinstance(max_length, int) or max_length < 1):
        raise ValueError(f"max_length: expected None or an int >= 1, got {max_length!r}")
    ids = _render(tokenizer, messages, add_generation_prompt=False)
    labels = [-100] * len(ids)
    for k, m in enumerate(messages):
        if m.get("role") != "assistant":
            continue
        start = _render(tokenizer, messages[:k], add_generation_prompt=True)
        end = _render(tokenizer, messages[:k + 1], add_generation_prompt=False)
        if ids[:len(start)] != start or ids[:len(end)] != end:
            raise ValueError("tokenizer: its chat template does not render a conversation's prefix as a prefix "
                             "of the whole, so the assistant tokens cannot be located")
        labels[len(start):len(end)] = ids[len(start):len(end)]
    if max_length is not None:
        ids, labels = ids[:max_length], labels[:max_length]
    return {"input_ids": ids, "attention_mask": [1] * len(ids), "labels": labels}


def preference_features(record: PreferenceRecord, tokenizer, *, max_length: int | None = None) -> dict:
    """A preference pair as reward-model features: ``chosen_input_ids``,
    ``chosen_attention_mask``, ``rejected_input_ids``, ``rejected_attention_mask`` (lists of int),
    each the whole conversation rendered with the chat template. ``max_length`` truncates on the
    left (keeping the answer, as reward-model training usually does)."""
    out = {}
    for key in ("chosen", "rejected"):
        ids = _render(tokenizer, getattr(record, key), add_generation_prompt=False)
        if max_length is not None:
            ids = ids[-max_length:]
        out[f"{key}_input_ids"] = ids
        out[f"{key}_attention_mask"] = [1] * len(ids)
    return out
