"""Multiple-choice items for :mod:`lmfuse.align.medeval`: the :class:`MCQItem` record, adapters
from the MedQA / MedMCQA / PubMedQA / MMLU record formats, file loaders and the prompt format."""

from __future__ import annotations

import json
import os
import random
from dataclasses import dataclass

from .data import RecordError, read_records

LETTERS = "ABCDEFGHIJ"
PUBMEDQA_OPTIONS = ("yes", "no", "maybe")
FORMATS = ("medqa", "medmcqa", "pubmedqa", "mmlu", "mcq")


@dataclass
class MCQItem:
    """One multiple-choice question. ``options``: letter → option text, in letter order;
    ``answer``: the gold letter; ``context``: passages shown before the question (PubMedQA)."""

    id: str
    question: str
    options: dict[str, str]
    answer: str
    subset: str
    context: list[str] | None = None

    def __post_init__(self):
        if not isinstance(self.question, str) or not self.question.strip():
            raise ValueError(f"item {self.id!r}: question: expected a non-empty string")
        if not isinstance(self.options, dict) or len(self.options) < 2:
            raise ValueError(f"item {self.id!r}: options: expected at least 2 options, got {self.options!r}")
        if list(self.options) != list(LETTERS[:len(self.options)]):
            raise ValueError(f"item {self.id!r}: options: expected the letters {list(LETTERS[:len(self.options)])}, "
                             f"got {list(self.options)}")
        if self.answer not in self.options:
            raise ValueError(f"item {self.id!r}: answer: expected one of {list(self.options)}, got {self.answer!r}")


def _get(row: dict, key: str, where: str):
    if key not in row:
        raise RecordError(f"{where}: missing field {key!r}")
    return row[key]


def _letter(value, n: int, where: str, key: str, one_based: bool = False) -> str:
    if isinstance(value, str) and len(value) == 1 and value.upper() in LETTERS[:n]:
        return value.upper()
    if isinstance(value, int) and not isinstance(value, bool):
        i = value - 1 if one_based else value
        if 0 <= i < n:
            return LETTERS[i]
    raise RecordError(f"{where}: field {key!r}: expected a letter or an index of one of {n} options, got {value!r}")


def from_medqa(row: dict, *, index: int = 0, subset: str = "MedQA") -> MCQItem:
    """MedQA: ``{question, options: {A: .., B: ..}, answer_idx}`` or the ``-hf`` layout
    ``{sent1, ending0.., label}``."""
    where = f"MedQA record {index}"
    if "sent1" in row:
        endings = [row[k] for k in sorted((k for k in row if k.startswith("ending")), key=lambda k: int(k[6:]))]
        options = dict(zip(LETTERS, endings))
        answer = _letter(_get(row, "label", where), len(options), where, "label")
        question = row["sent1"]
    else:
        opts = _get(row, "options", where)
        if isinstance(opts, list):
            opts = {o["key"]: o["value"] for o in opts}
        if not isinstance(opts, dict):
            raise RecordError(f"{where}: field 'options': expected a letter → text object")
        options = {k: opts[k] for k in sorted(opts)}
        answer = _letter(row.get("answer_idx", row.get("answer")), len(options), where, "answer_idx")
        question = _get(row, "question", where)
    return MCQItem(str(row.get("id", index)), question, options, answer, subset)


def from_medmcqa(row: dict, *, index: int = 0, subset: str = "MedMCQA") -> MCQItem:
    """MedMCQA: ``{question, opa, opb, opc, opd, cop}`` with ``cop`` in 0..3."""
    where = f"MedMCQA record {index}"
    options = {L: _get(row, f"op{c}", where) for L, c in zip("ABCD", "abcd")}
    answer = _letter(_get(row, "cop", where), 4, where, "cop")
    return MCQItem(str(row.get("id", index)), _get(row, "question", where), options, answer, subset)


def from_pubmedqa(row: dict, *, index: int = 0, subset: str = "PubMedQA") -> MCQItem:
    """PubMedQA: the original layout ``{QUESTION, CONTEXTS, final_decision}`` or the hub layout
    ``{pubid, question, context: {contexts}, final_decision}``; options yes / no / maybe."""
    where = f"PubMedQA record {index}"
    if "QUESTION" in row:
        question, contexts = row["QUESTION"], _get(row, "CONTEXTS", where)
    else:
        question = _get(row, "question", where)
        ctx = _get(row, "context", where)
        contexts = ctx.get("contexts") if isinstance(ctx, dict) else ctx
    if not isinstance(contexts, list) or not all(isinstance(c, str) for c in contexts):
        raise RecordError(f"{where}: field 'contexts': expected a list of strings")
    decision = _get(row, "final_decision", where)
    if decision not in PUBMEDQA_OPTIONS:
        raise RecordError(f"{where}: field 'final_decision': expected one of {list(PUBMEDQA_OPTIONS)}, got {decision!r}")
    options = dict(zip("ABC", PUBMEDQA_OPTIONS))
    rid = row.get("pubid", row.get("id", index))
    return MCQItem(str(rid), question, options, "ABC"[PUBMEDQA_OPTIONS.index(decision)], subset, list(contexts))


def from_mmlu(row: dict, *, index: int = 0, subset: str | None = None) -> MCQItem:
    """MMLU: ``{question, choices: [..], answer (index or letter), subject}``; the subset is the
    subject unless given."""
    where = f"MMLU record {index}"
    choices = _get(row, "choices", where)
    if not isinstance(choices, list):
        raise RecordError(f"{where}: field 'choices': expected a list of strings")
    options = dict(zip(LETTERS, choices))
    answer = _letter(_get(row, "answer", where), len(options), where, "answer")
    return MCQItem(str(row.get("id", index)), _get(row, "question", where), options, answer,
                   subset or str(row.get("subject", "MMLU")))


def from_mcq(row: dict, *, index: int = 0, subset: str | None = None) -> MCQItem:
    """lmfuse's own layout: ``{id, question, options: {A: ..}, answer, subset, context?}``."""
    where = f"record {index}"
    return MCQItem(str(row.get("id", index)), _get(row, "question", where), dict(_get(row, "options", where)),
                   _get(row, "answer", where), subset or row.get("subset", "default"), row.get("context"))


_ADAPTERS = {"medqa": from_medqa, "medmcqa": from_medmcqa, "pubmedqa": from_pubmedqa, "mmlu": from_mmlu,
             "mcq": from_mcq}


def load_mcq(path, format: str, *, subset: str | None = None, limit: int | None = None,
             seed: int | None = None) -> list[MCQItem]:
    """Items from a local JSON / JSONL / Parquet file in one of the record formats ``FORMATS``.

    ``subset`` names the items' subset (default: the format's benchmark name, or the MMLU
    subject). ``limit`` keeps that many items: the first ones, or a random sample drawn with
    ``seed`` when a seed is given. A bad record raises ``RecordError`` naming its index.
    """
    if format not in _ADAPTERS:
        raise ValueError(f"format: expected one of {list(FORMATS)}, got {format!r}")
    kw = {} if subset is None else {"subset": subset}
    items = [_ADAPTERS[format](row, index=i, **kw) for i, row in enumerate(read_records(path))]
    return _limit(items, limit, seed)


def _limit(items: list[MCQItem], limit, seed) -> list[MCQItem]:
    if limit is None:
        return items
    if isinstance(limit, bool) or not isinstance(limit, int) or limit < 1:
        raise ValueError(f"limit: expected None or an int >= 1, got {limit!r}")
    if seed is None:
        return items[:limit]
    keep = sorted(random.Random(seed).sample(range(len(items)), min(limit, len(items))))
    return [items[i] for i in keep]


def load_pubmedqa(folder, *, split: str = "test", limit: int | None = None, seed: int | None = None) -> list[MCQItem]:
    """PubMedQA's expert-labelled set from its original files in ``folder``
    (``ori_pqal.json``, ``test_ground_truth.json``): ``split="test"`` is the official 500-item
    test split, ``"train"`` the other 500, ``"all"`` all 1,000 (in file order)."""
    folder = os.fspath(folder)
    if split not in ("test", "train", "all"):
        raise ValueError(f"split: expected 'test', 'train' or 'all', got {split!r}")
    path = os.path.join(folder, "ori_pqal.json")
    if not os.path.isfile(path):
        raise FileNotFoundError(f"folder: no ori_pqal.json in {folder!r}")
    with open(path, encoding="utf-8") as f:
        data = json.load(f)
    if split != "all":
        with open(os.path.join(folder, "test_ground_truth.json"), encoding="utf-8") as f:
            test = json.load(f)
        for pmid, decision in test.items():
            if pmid not in data or data[pmid]["final_decision"] != decision:
                raise RecordError(f"test_ground_truth.json: id {pmid!r} is missing from ori_pqal.json or disagrees")
        data = {k: v for k, v in data.items() if (k in test) == (split == "test")}
    items = [from_pubmedqa({**row, "pubid": pmid}, index=i) for i, (pmid, row) in enumerate(data.items())]
    return _limit(items, limit, seed)


def format_question(item: MCQItem) -> str:
    """The user message, in UltraMedical's layout: ``"Context: ..\\n" * k + question +
    "\\n\\nA. ..\\nB. .."``."""
    head = "".join(f"Context: {c}\n" for c in (item.context or []))
    options = "\n".join(f"{L}. {text}" for L, text in item.options.items())
    return f"{head}{item.question}\n\n{options}"
