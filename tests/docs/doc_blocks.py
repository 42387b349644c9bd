"""Fenced code blocks of the Markdown docs, and what the docs test does with each.

A block is a fenced block (```` ``` ```` or ``~~~``) with a language on its opening line. What
runs:

``python``
    executed; all Python blocks of one page run in order in one namespace, as a reader pasting
    them top to bottom would (see ``run_python_blocks.py``).
``bash`` / ``sh`` / ``console``
    each command is run or checked (``console``: only the lines starting with ``$ ``):
    ``make ...`` is always a dry run (``make -n``: the targets must exist); ``lmfuse ...`` /
    ``python -m lmfuse ...`` run; ``python ...`` runs; ``pytest ...`` is only collected
    (``--collect-only``: running the suite from inside the suite would recurse) and so needs the
    ``parse-only`` marker. Any other command is an error: the test cannot vouch for it.
``text``
    output, tables, synopses: not code, nothing runs.

Markers: an HTML comment ``<!-- docs-test: MARKER[, MARKER] -->`` on the line(s) just before the
opening fence (blank lines allowed between). Known markers:

``parse-only``
    shell blocks only: commands are checked without doing their work (``lmfuse`` arguments are
    parsed by its argument parser, ``pytest`` collects). For commands too slow or recursive to
    run inside the tests.
``bundled-model``
    the block loads the bundled SmolLM2-135M (``load_bundled_model`` or an ``lmfuse generate``
    that decodes); required exactly when it does, so the cost is visible in the source.
``slow``
    the test item gets ``pytest.mark.slow`` (still run by ``make test``).

A block without a language, an unknown language or an unknown marker is reported as a failing
test, so a page cannot drift out of the test silently.
"""

from __future__ import annotations

import re
import shlex
from dataclasses import dataclass, field
from pathlib import Path

REPO = Path(__file__).resolve().parents[2]

RUN_LANGS = {"python", "bash", "sh", "console"}
TEXT_LANGS = {"text"}
KNOWN_MARKERS = {"parse-only", "bundled-model", "slow"}

_FENCE = re.compile(r"^(?P<indent> {0,3})(?P<fence>`{3,}|~{3,})(?P<info>[^`]*)$")
_MARKER = re.compile(r"^\s*<!--\s*docs-test:(?P<body>.*?)-->\s*$")


@dataclass
class Block:
    """One fenced block: ``line`` is the 1-based line of its opening fence in ``path``."""

    path: Path
    line: int
    lang: str
    source: str
    markers: set[str] = field(default_factory=set)
    problems: list[str] = field(default_factory=list)

    @property
    def first_code_line(self) -> int:
        return self.line + 1

    @property
    def label(self) -> str:
        return f"{self.path.name}:{self.line}:{self.lang or 'no-language'}"


def doc_files() -> list[Path]:
    """``README.md`` and every ``docs/*.md``, as they are in the tree now."""
    return [REPO / "README.md"] + sorted((REPO / "docs").glob("*.md"))


def parse_blocks(path: Path, text: str | None = None) -> list[Block]:
    """Every fenced block of ``path`` (or of ``text``), with its markers and problems."""
    lines = (path.read_text(encoding="utf-8") if text is None else text).splitlines()
    blocks: list[Block] = []
    pending: list[tuple[int, str]] = []  # markers seen since the last non-blank, non-marker line
    i = 0
    while i < len(lines):
        m = _FENCE.match(lines[i])
        if m is None:
            mm = _MARKER.match(lines[i])
            if mm is not None:
                pending += [(i + 1, t.strip()) for t in mm.group("body").split(",")]
            elif lines[i].strip():
                if pending:
                    blocks.append(Block(path, pending[0][0], "marker", "", problems=[
                        f"marker(s) {[t for _, t in pending]} at line {pending[0][0]} are not "
                        f"followed by a fenced block"]))
                pending = []
            i += 1
            continue
        fence, info = m.group("fence"), m.group("info").strip()
        start = i
        body = []
        i += 1
        while i < len(lines) and not (lines[i].strip().startswith(fence[0] * len(fence))
                                      and lines[i].strip().strip(fence[0]) == ""):
            body.append(lines[i])
            i += 1
        closed = i < len(lines)
        i += 1
        lang = info.split()[0].lower() if info else ""
        block = Block(path, start + 1, lang, "\n".join(body) + "\n")
        for line_no, marker in pending:
            if marker in KNOWN_MARKERS:
                block.markers.add(marker)
            else:
                block.problems.append(f"unknown docs-test marker {marker!r} at line {line_no} "
                                      f"(known: {sorted(KNOWN_MARKERS)})")
        pending = []
        if not closed:
            block.problems.append("the fence is never closed")
        if not lang:
            block.problems.append("a fenced block needs a language: python / bash / sh / console "
                                  "(run) or text (output, tables, synopses)")
        elif lang not in RUN_LANGS | TEXT_LANGS:
            block.problems.append(f"unknown block language {lang!r} (known: "
                                  f"{sorted(RUN_LANGS | TEXT_LANGS)})")
        if "parse-only" in block.markers and lang not in {"bash", "sh", "console"}:
            block.problems.append("the parse-only marker applies to shell blocks only")
        if lang in TEXT_LANGS and block.markers:
            block.problems.append(f"a text block runs nothing; markers {sorted(block.markers)} make no sense")
        blocks.append(block)
    if pending:
        blocks.append(Block(path, pending[0][0], "marker", "", problems=[
            f"marker(s) {[t for _, t in pending]} at line {pending[0][0]} are not followed by a fenced block"]))
    return blocks


# ----------------------------------------------------------------------------- shell commands


@dataclass
class Command:
    """One shell command of a block: ``env`` assignments, ``argv``, the doc ``line`` it starts on."""

    line: int
    env: dict[str, str]
    argv: list[str]
    text: str


def shell_commands(block: Block) -> list[Command]:
    """The commands of a ``bash`` / ``sh`` / ``console`` block (``\\`` continuations joined,
    comments dropped; ``console``: ``$ `` lines only, the rest is output)."""
    lines = block.source.splitlines()
    out: list[Command] = []
    i = 0
    while i < len(lines):
        line_no = block.first_code_line + i
        text = lines[i]
        i += 1
        if block.lang == "console":
            if not text.startswith("$ "):
                continue
            text = text[2:]
        while text.rstrip().endswith("\\") and i < len(lines):
            nxt = lines[i]
            i += 1
            if block.lang == "console" and nxt.startswith("> "):
                nxt = nxt[2:]
            text = text.rstrip()[:-1] + " " + nxt
        words = shlex.split(text, comments=True)
        if not words:
            continue
        env = {}
        while words and re.fullmatch(r"[A-Za-z_][A-Za-z0-9_]*=.*", words[0]):
            k, v = words.pop(0).split("=", 1)
            env[k] = v
        if not words:
            raise ValueError(f"{block.path.name}:{line_no}: a line of variable assignments only")
        out.append(Command(line_no, env, words, text.strip()))
    return out


def block_needs_bundled_model(block: Block) -> bool:
    """Whether the block itself loads the bundled SmolLM2 (see the ``bundled-model`` marker)."""
    if block.lang == "python":
        return "load_bundled_model" in block.source
    if block.lang in {"bash", "sh", "console"} and "parse-only" not in block.markers:
        for cmd in shell_commands(block):
            argv = lmfuse_argv(cmd.argv)
            if argv and argv[0] == "generate" and not ({"-h", "--help"} & set(argv)):
                return True
    return False


_PYTHONS = re.compile(r"^(?:.*/)?python(?:3(?:\.\d+)?)?$")


def lmfuse_argv(argv: list[str]) -> list[str] | None:
    """The arguments after ``lmfuse`` / ``python -m lmfuse``, or None for another command."""
    if argv and Path(argv[0]).name == "lmfuse":
        return argv[1:]
    if len(argv) >= 3 and _PYTHONS.match(argv[0]) and argv[1:3] == ["-m", "lmfuse"]:
        return argv[3:]
    return None


def pytest_argv(argv: list[str]) -> list[str] | None:
    """The arguments after ``pytest`` / ``python -m pytest``, or None for another command."""
    if argv and Path(argv[0]).name in {"pytest", "py.test"}:
        return argv[1:]
    if len(argv) >= 3 and _PYTHONS.match(argv[0]) and argv[1:3] == ["-m", "pytest"]:
        return argv[3:]
    return None


def is_python(argv: list[str]) -> bool:
    return bool(argv) and _PYTHONS.match(argv[0]) is not None
