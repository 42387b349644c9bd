"""Run the Python blocks of one Markdown page, in order, in one namespace (a subprocess per page).

    python run_python_blocks.py PAGE.md RESULT.json [LAST_LINE]

Each block is compiled with the page's own line numbers (a traceback names ``PAGE.md`` and the
line in it). Blocks after a failing one are not run (they would fail for its reason); their
result says which block stopped them. ``LAST_LINE`` stops after the block that starts there.
The current directory is the caller's (the test gives a fresh temporary one, so files a page
writes land there). ``RESULT.json`` is ``[{"line", "status": "passed"|"failed"|"not run",
"error", "output", "seconds"}]``, written after every block.
"""

from __future__ import annotations

import contextlib
import io
import json
import sys
import time
import traceback
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
from doc_blocks import parse_blocks  # noqa: E402


class _Tee(io.TextIOBase):
    """Write to a buffer and to the real stream (the page's output is also visible live)."""

    def __init__(self, stream):
        self.stream, self.buffer_ = stream, io.StringIO()

    def write(self, s):
        self.stream.write(s)
        return self.buffer_.write(s)

    def flush(self):
        self.stream.flush()


def main(page: str, result_path: str, last_line: int | None) -> int:
    path = Path(page)
    blocks = [b for b in parse_blocks(path) if b.lang == "python" and not b.problems]
    results = [{"line": b.line, "status": "not run", "error": "", "output": "", "seconds": 0.0}
               for b in blocks]

    def dump():
        Path(result_path).write_text(json.dumps(results, indent=1))

    dump()
    namespace = {"__name__": "__main__"}
    for b, r in zip(blocks, results):
        if last_line is not None and b.line > last_line:
            break
        # pad with blank lines so the compiled code carries the page's line numbers
        code = compile("\n" * b.line + b.source, str(path), "exec")
        out, err = _Tee(sys.stdout), _Tee(sys.stderr)
        t0 = time.perf_counter()
        try:
            with contextlib.redirect_stdout(out), contextlib.redirect_stderr(err):
                exec(code, namespace)
        except BaseException:  # noqa: BLE001 -- report anything, SystemExit included
            r["status"] = "failed"
            r["error"] = traceback.format_exc()
        else:
            r["status"] = "passed"
        r["seconds"] = round(time.perf_counter() - t0, 2)
        r["output"] = (out.buffer_.getvalue() + err.buffer_.getvalue())[-6000:]
        dump()
        if r["status"] == "failed":
            for later in results[results.index(r) + 1:]:
                later["error"] = f"not run: the block at {path.name}:{b.line} failed before it"
            dump()
            return 1
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1], sys.argv[2], int(sys.argv[3]) if len(sys.argv) > 3 else None))
