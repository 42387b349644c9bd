"""Answer extraction for generated multiple-choice answers: an ordered table of rules, the first
rule that yields a valid letter wins (a rule's *last* match in the text counts, since a model
that reasons first states its answer last)."""

from __future__ import annotations

import re

# (name, pattern): group 1 is the letter. Tried in order; flags: case-insensitive phrases, but the
# letter itself must be a capital (so "a" in "is a drug" is not read as option A).
EXTRACTION_RULES: tuple[tuple[str, str], ...] = (
    ("answer is", r"answer\s+is\s*:?\s*(?:option\s+)?\(?\**\s*([A-J])\b"),
    ("answer:", r"answer\s*:\s*(?:option\s+)?\(?\**\s*([A-J])\b"),
    ("option X is correct", r"(?:option|choice)\s+\(?([A-J])\)?\s+is\s+(?:the\s+)?(?:correct|right|best)"),
    ("leading letter", r"\A\s*\(?([A-J])(?:[.):]|\s*\Z|\s)"),
)


def _letters_re(pattern: str) -> re.Pattern:
    # phrases case-insensitive, the captured letter upper case only
    return re.compile(pattern.replace("([A-J])", "((?-i:[A-J]))"), flags=re.IGNORECASE | re.MULTILINE)


_COMPILED = tuple((name, _letters_re(p)) for name, p in EXTRACTION_RULES)


def extract_choice(text: str, options: dict[str, str] | str = "ABCD") -> str | None:
    """The option letter a generated answer commits to, or None (an invalid answer).

    ``options``: the item's ``{letter: text}`` (or just the letters). Rules, in order: the
    rules of ``EXTRACTION_RULES`` (last match of "answer is X", "answer: X", "option X is
    correct", a leading "X." / "(X)"); then, with option texts, the text that opens the answer
    ("Yes, ..." → the "yes" option); then the one option text mentioned as a whole word if
    exactly one is. Letters outside ``options`` are ignored.
    """
    if not isinstance(text, str):
        raise TypeError(f"text: expected a str, got {type(text).__name__}")
    letters = options if isinstance(options, str) else "".join(options)
    for _, rx in _COMPILED:
        hits = [m.group(1) for m in rx.finditer(text) if m.group(1) in letters]
        if hits:
            return hits[-1]
    if isinstance(options, dict):
        low = text.strip().lower()
        texts = {L: t.strip().lower() for L, t in options.items() if t.strip()}
        for L, t in sorted(texts.items(), key=lambda kv: -len(kv[1])):
            if re.match(rf"\W*{re.escape(t)}\b", low):
                return L
        seen = [L for L, t in texts.items() if re.search(rf"\b{re.escape(t)}\b", low)]
        if len(seen) == 1:
            return seen[0]
    return None


def majority_vote(votes: list[str | None], letters: str) -> str | None:
    """The most frequent valid letter (ties: the earliest letter); None when no vote is valid."""
    counts = {L: 0 for L in letters}
    for v in votes:
        if v in counts:
            counts[v] += 1
    best = max(counts.values(), default=0)
    if best == 0:
        return None
    return next(L for L in letters if counts[L] == best)
