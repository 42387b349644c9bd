"""The docs test's own machinery: block parsing, markers, shell commands and the page runner.

These pin the rules that keep a page from drifting silently: an unlabelled block, an unknown
marker or an unknown command is a failure, never a skip.
"""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest

sys.path.insert(0, str(Path(__file__).resolve().parent))
from . import test_docs_examples as docs_test  # noqa: E402
from doc_blocks import parse_blocks, shell_commands  # noqa: E402

RUNNER = Path(__file__).resolve().parent / "run_python_blocks.py"


def _blocks(text: str):
    return parse_blocks(Path("page.md"), text)


def test_languages_markers_and_line_numbers():
    text = ("# t\n\n<!-- docs-test: parse-only -->\n```bash\nmake test\n```\n\ntext\n\n"
            "<!-- docs-test: bundled-model, slow -->\n\n```python\nx = 1\n```\n"
            "````text\n```\nnested\n```\n````\n")
    b = _blocks(text)
    assert [(x.line, x.lang, x.markers, x.problems) for x in b] == [
        (4, "bash", {"parse-only"}, []),
        (12, "python", {"bundled-model", "slow"}, []),
        (15, "text", set(), []),
    ]
    assert b[1].source == "x = 1\n" and b[2].source == "```\nnested\n```\n"


@pytest.mark.parametrize("text, problem", [
    ("```\nls\n```\n", "needs a language"),
    ("```rust\nfn main() {}\n```\n", "unknown block language 'rust'"),
    ("<!-- docs-test: skip -->\n```python\npass\n```\n", "unknown docs-test marker 'skip'"),
    ("<!-- docs-test: parse-only -->\nsome prose\n\n```python\npass\n```\n", "not followed by a fenced block"),
    ("<!-- docs-test: parse-only -->\n```python\npass\n```\n", "shell blocks only"),
    ("<!-- docs-test: slow -->\n```text\noutput\n```\n", "runs nothing"),
    ("```python\npass\n", "never closed"),
    ("text\n<!-- docs-test: slow -->\n", "not followed by a fenced block"),
])
def test_problems_are_reported(text, problem):
    found = [p for b in _blocks(text) for p in b.problems]
    assert any(problem in p for p in found), found


def test_a_problem_block_becomes_a_failing_case(tmp_path, monkeypatch):
    page = tmp_path / "docs" / "bad.md"
    page.parent.mkdir()
    page.write_text("# x\n\n```\nlmfuse info\n```\n")
    (tmp_path / "README.md").write_text("# r\n\n```text\nnot code\n```\n")
    monkeypatch.setattr(docs_test, "REPO", tmp_path)
    monkeypatch.setattr(docs_test, "doc_files", lambda: [tmp_path / "README.md", page])
    cases = docs_test._cases()
    assert [c.id for c in cases] == ["docs/bad.md:3-none"]  # the text block is no test; the bad one is
    with pytest.raises(AssertionError, match="needs a language"):
        docs_test.test_doc_block("docs/bad.md", 3, None, None)


def test_shell_commands_console_continuations_env_and_comments():
    (b,) = _blocks("```console\n$ LMFUSE_BACKEND=cpp lmfuse info \\\n>   --json   # as JSON\n"
                   "{\"lmfuse\": ...}\n$ make -n test\n```\n")
    cmds = shell_commands(b)
    assert [(c.line, c.env, c.argv) for c in cmds] == [
        (2, {"LMFUSE_BACKEND": "cpp"}, ["lmfuse", "info", "--json"]),
        (5, {}, ["make", "-n", "test"]),
    ]


def _shell_block(text):
    (b,) = _blocks(text)
    return b


@pytest.mark.parametrize("text, message", [
    ("```bash\nmake no-such-target\n```\n", "exited with"),
    ("```bash\npytest tests/docs\n```\n", "from inside it"),
    ("```bash\nrm -rf build\n```\n", "does not know how to run"),
    ("<!-- docs-test: parse-only -->\n```bash\npip install lmfuse\n```\n", "does not know how to check"),
    ("<!-- docs-test: parse-only -->\n```bash\nlmfuse no-such-command\n```\n", "exited with"),
    ("<!-- docs-test: parse-only -->\n```bash\nlmfuse bench --no-such-flag\n```\n", "exited with"),
    ("```bash\n# only a comment\n```\n", "no command"),
])
def test_shell_blocks_that_must_fail(text, message, tmp_path):
    with pytest.raises(AssertionError, match=message):
        docs_test._run_shell_block(_shell_block(text), tmp_path)


def test_shell_blocks_that_pass(tmp_path):
    docs_test._run_shell_block(_shell_block("```bash\nmake test   # dry run\n```\n"), tmp_path)
    docs_test._run_shell_block(_shell_block(
        "<!-- docs-test: parse-only -->\n```sh\nlmfuse bench --quick --ops spec_verify\n```\n"), tmp_path)


def test_bundled_model_marker_must_match_the_code():
    with pytest.raises(AssertionError, match="loads the bundled SmolLM2"):
        docs_test._check_markers(_shell_block("```python\nfrom lmfuse.models import load_bundled_model\n```\n"))
    with pytest.raises(AssertionError, match="loads the bundled SmolLM2"):
        docs_test._check_markers(_shell_block("```bash\nlmfuse generate --method plain\n```\n"))
    with pytest.raises(AssertionError, match="does not load"):
        docs_test._check_markers(_shell_block("<!-- docs-test: bundled-model -->\n```python\nx = 1\n```\n"))
    docs_test._check_markers(_shell_block("```bash\nlmfuse generate --help\n```\n"))
    docs_test._check_markers(_shell_block(
        "<!-- docs-test: bundled-model -->\n```python\nfrom lmfuse.models import load_bundled_model\n```\n"))


def test_runner_shares_one_namespace_and_names_the_failing_line(tmp_path):
    page = tmp_path / "page.md"
    page.write_text("# p\n\n```python\nx = 41\n```\n\n```python\ny = x + 1\nprint('y is', y)\n"
                    "raise KeyError(y)\n```\n\n```python\nprint('never')\n```\n")
    result = tmp_path / "r.json"
    proc = subprocess.run([sys.executable, str(RUNNER), str(page), str(result)], cwd=tmp_path,
                          capture_output=True, text=True, timeout=120)
    assert proc.returncode == 1
    r = json.loads(result.read_text())
    assert [x["status"] for x in r] == ["passed", "failed", "not run"]
    assert "y is 42" in r[1]["output"] and "KeyError: 42" in r[1]["error"]
    assert f'File "{page}", line 10' in r[1]["error"]  # the page's own line number
    assert "page.md:7 failed" in r[2]["error"] and "never" not in proc.stdout


def test_runner_stops_after_the_last_requested_block(tmp_path):
    page = tmp_path / "page.md"
    page.write_text("```python\nopen('first', 'w').close()\n```\n\n```python\nopen('second', 'w').close()\n```\n")
    result = tmp_path / "r.json"
    proc = subprocess.run([sys.executable, str(RUNNER), str(page), str(result), "1"], cwd=tmp_path,
                          capture_output=True, text=True, timeout=120)
    assert proc.returncode == 0, proc.stderr
    assert [x["status"] for x in json.loads(result.read_text())] == ["passed", "not run"]
    assert (tmp_path / "first").exists() and not (tmp_path / "second").exists()


def test_a_page_that_hangs_fails_the_running_block_once(tmp_path, monkeypatch):
    page = tmp_path / "docs" / "hang.md"
    page.parent.mkdir()
    page.write_text("```python\nx = 1\n```\n\n```python\nimport time\ntime.sleep(60)\n```\n")
    monkeypatch.setattr(docs_test, "REPO", tmp_path)
    monkeypatch.setattr(docs_test, "PAGE_TIMEOUT_S", 10)
    results, _ = docs_test._run_page_now("docs/hang.md", 5, tmp_path)
    assert results[1]["status"] == "passed"
    assert results[5]["status"] == "failed" and "did not finish within 10 s" in results[5]["error"]
