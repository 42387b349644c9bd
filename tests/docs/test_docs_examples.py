"""Every fenced code block of ``README.md`` and ``docs/*.md`` runs (or is checked) here.

One test per block, named ``<page>:<line>-<language>``, so a failure names the page and the line
of the block's opening fence. The rules (languages, markers, what each command does) are in
``doc_blocks.py``. In short:

* ``python`` blocks of one page run in order in one namespace, in a subprocess per page (a
  reader pastes them top to bottom; the subprocess keeps the page's imports, globals and
  environment away from the test process). The page runs once, in a fresh temporary directory;
  each block's test reports that block's own result and a block after a failing one fails
  with "not run". Tracebacks carry the page's line numbers.
* shell blocks: ``make`` lines are dry runs, ``lmfuse`` runs (or only parses its arguments under
  ``<!-- docs-test: parse-only -->``), ``pytest`` only collects.
* ``text`` blocks are output or tables and are not tests; a block without a language, an unknown
  language or an unknown marker is a failing test.

Nothing is skipped: the pages that use the bundled SmolLM2 say so with a marker, and run.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

sys.path.insert(0, str(Path(__file__).resolve().parent))
from doc_blocks import (REPO, RUN_LANGS, Block, block_needs_bundled_model, doc_files,  # noqa: E402
                        is_python, lmfuse_argv, parse_blocks, pytest_argv, shell_commands)

RUNNER = Path(__file__).resolve().parent / "run_python_blocks.py"
PAGE_TIMEOUT_S = 900     # a hang guard for one page's Python blocks, not a speed requirement
COMMAND_TIMEOUT_S = 300


def _cases():
    cases = []
    for path in doc_files():
        for block in parse_blocks(path):
            if block.lang not in RUN_LANGS and not block.problems:
                continue  # text: output and tables
            marks = [pytest.mark.slow] if "slow" in block.markers else []
            rel = path.relative_to(REPO).as_posix()
            cases.append(pytest.param(rel, block.line, id=f"{rel}:{block.line}-{block.lang or 'none'}",
                                      marks=marks))
    return cases


def _block(rel: str, line: int) -> Block:
    for b in parse_blocks(REPO / rel):
        if b.line == line:
            return b
    raise AssertionError(f"{rel} no longer has a block at line {line} (the page changed during the run)")


def _env() -> dict:
    env = dict(os.environ)
    env["PYTHONPATH"] = str(REPO / "python") + os.pathsep + env.get("PYTHONPATH", "")
    env["PATH"] = str(Path(sys.executable).parent) + os.pathsep + env.get("PATH", "")
    env.setdefault("MPLBACKEND", "Agg")
    env.setdefault("HF_HUB_OFFLINE", "1")
    # the pages run as a user's shell runs them: conftest's Triton interpreter switch (a testing
    # tool, never picked unless forced) and a forced backend are not inherited
    env.pop("TRITON_INTERPRET", None)
    env.pop("LMFUSE_BACKEND", None)
    for var in ("MAKEFLAGS", "MFLAGS", "MAKELEVEL"):  # under `make test`: a dry run is not a sub-make
        env.pop(var, None)
    return env


_PAGES: dict[tuple[str, int], tuple[dict, str]] = {}


def _run_page(rel: str, last_line: int, workdir: Path) -> tuple[dict, str]:
    """Run the page's Python blocks up to the one at ``last_line``, once per session;
    ``({line: result}, log)``."""
    if (rel, last_line) not in _PAGES:
        _PAGES[rel, last_line] = _run_page_now(rel, last_line, workdir)
    return _PAGES[rel, last_line]


def _run_page_now(rel: str, last_line: int, workdir: Path) -> tuple[dict, str]:
    result = workdir / "result.json"
    argv = [sys.executable, str(RUNNER), str(REPO / rel), str(result), str(last_line)]
    try:
        proc = subprocess.run(argv, cwd=workdir, env=_env(), capture_output=True, text=True,
                              timeout=PAGE_TIMEOUT_S)
        log, code = proc.stdout + proc.stderr, proc.returncode
    except subprocess.TimeoutExpired as e:  # the results so far stay; the block running is to blame
        log, code = f"{e.stdout or ''}{e.stderr or ''}", None
    if isinstance(log, bytes):
        log = log.decode(errors="replace")
    log = log[-8000:]
    if not result.exists():
        raise AssertionError(f"the runner for {rel} wrote no result (exit {code}):\n{log}")
    results = json.loads(result.read_text())
    if code is None:
        for r in results:
            if r["status"] == "not run":
                r["status"], r["error"] = "failed", f"the page did not finish within {PAGE_TIMEOUT_S} s"
                break
    return {r["line"]: r for r in results}, log


def _last_selected_python_line(request, rel: str) -> int:
    """The last Python block of this page that the session will test (earlier ones must run
    first; later ones, deselected, need not run at all)."""
    lines = []
    for item in request.session.items:
        cs = getattr(item, "callspec", None)
        if cs is not None and item.originalname == "test_doc_block" and cs.params.get("rel") == rel:
            b = _block(rel, cs.params["line"])
            if b.lang == "python":
                lines.append(b.line)
    return max(lines)


def _check_markers(block: Block) -> None:
    needs = block_needs_bundled_model(block)
    has = "bundled-model" in block.markers
    if needs and not has:
        raise AssertionError(f"{block.label}: the block loads the bundled SmolLM2; say so with "
                             f"<!-- docs-test: bundled-model --> before it")
    if has and not needs:
        raise AssertionError(f"{block.label}: marked bundled-model but does not load the bundled model")


def _run(cmd, argv, cwd, block) -> None:
    proc = subprocess.run(argv, cwd=cwd, env={**_env(), **cmd.env}, capture_output=True, text=True,
                          timeout=COMMAND_TIMEOUT_S)
    if proc.returncode != 0:
        raise AssertionError(f"{block.path.name}:{cmd.line}: `{cmd.text}` exited with {proc.returncode} "
                             f"(ran: {' '.join(argv)})\n{(proc.stdout + proc.stderr)[-6000:]}")


_PARSE_ONLY = ("import sys; from lmfuse.cli import build_parser; "
               "build_parser().parse_args(sys.argv[1:])")


def _run_shell_block(block: Block, tmp_path: Path) -> None:
    parse_only = "parse-only" in block.markers
    commands = shell_commands(block)
    if not commands:
        raise AssertionError(f"{block.label}: a shell block with no command (use a text block for output)")
    for cmd in commands:
        argv = cmd.argv
        if Path(argv[0]).name == "make":
            _run(cmd, ["make", "-n", *argv[1:]], REPO, block)      # always a dry run: targets must exist
        elif (args := lmfuse_argv(argv)) is not None:
            if parse_only:
                _run(cmd, [sys.executable, "-c", _PARSE_ONLY, *args], tmp_path, block)
            else:
                _run(cmd, [sys.executable, "-m", "lmfuse", *args], tmp_path, block)
        elif (args := pytest_argv(argv)) is not None:
            if not parse_only:
                raise AssertionError(f"{block.path.name}:{cmd.line}: `{cmd.text}` would run the test suite "
                                     f"from inside it; mark the block <!-- docs-test: parse-only --> "
                                     f"(it is then collected, not run)")
            _run(cmd, [sys.executable, "-m", "pytest", "--collect-only", "-q", "-p", "no:cacheprovider",
                       *args], REPO, block)
        elif is_python(argv) and not parse_only:
            _run(cmd, [sys.executable, *argv[1:]], REPO, block)
        else:
            raise AssertionError(f"{block.path.name}:{cmd.line}: the docs test does not know how to "
                                 f"{'check' if parse_only else 'run'} `{cmd.text}` (known: make, lmfuse, "
                                 f"python, pytest under parse-only); use a text block if it is not a command")


@pytest.mark.parametrize("rel, line", _cases())
def test_doc_block(rel, line, request, tmp_path_factory):
    block = _block(rel, line)
    assert not block.problems, f"{block.label}: " + "; ".join(block.problems)
    _check_markers(block)
    if block.lang == "python":
        last = _last_selected_python_line(request, rel)
        if (rel, last) in _PAGES:
            results, log = _PAGES[rel, last]
        else:
            results, log = _run_page(rel, last, tmp_path_factory.mktemp(Path(rel).stem))
        r = results[line]
        if r["status"] != "passed":
            raise AssertionError(f"{block.label} {r['status']}:\n{r['error']}\n--- output ---\n{r['output']}"
                                 + ("" if r["error"] else f"\n--- runner log ---\n{log}"))
    else:
        _run_shell_block(block, tmp_path_factory.mktemp("shell"))
