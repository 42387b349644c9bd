"""Test configuration.

Without CUDA, Triton kernels run under the interpreter: TRITON_INTERPRET must be set before the
first ``@triton.jit`` decorator runs, which is why it happens here, before lmfuse (and its
lazily imported Triton kernel modules) are imported by any test.
"""

import importlib
import json
import os
from pathlib import Path

import pytest


def _cuda_present() -> bool:
    try:
        import torch
    except ImportError:
        return False
    return torch.version.cuda is not None and torch.cuda.is_available()


HAS_CUDA = _cuda_present()
if not HAS_CUDA:
    os.environ.setdefault("TRITON_INTERPRET", "1")

TESTS_DIR = Path(__file__).resolve().parent
# Minimum number of collected tests per folder of tests/ ("." = files directly in tests/).
# Override the file with LMFUSE_COLLECTION_FLOORS=path (used by the test of this check).
COLLECTION_FLOORS = TESTS_DIR / "collection_counts.json"


def pytest_sessionstart(session):
    """Fail the run at once when the compiled CPU extension is missing: without it every cpp
    test skips and the run would look green. ``LMFUSE_ALLOW_MISSING_CPP=1`` opts out (for testing
    a pure-Python install on purpose)."""
    if os.environ.get("LMFUSE_ALLOW_MISSING_CPP") == "1":
        return
    try:
        importlib.import_module("lmfuse._C")
    except Exception as e:  # ImportError, or an undefined symbol in a stale build
        pytest.exit(
            f"lmfuse._C (the compiled CPU extension) is not importable: {type(e).__name__}: {e}\n"
            "Build it with `make build` (or `pip install --no-build-isolation .`), or set "
            "LMFUSE_ALLOW_MISSING_CPP=1 to run without it on purpose (every cpp-backend test then skips).",
            returncode=pytest.ExitCode.USAGE_ERROR,
        )


def folder_of(path: Path) -> str:
    """The folder of tests/ a test file belongs to: its first path part below tests/, or "." for
    a file directly in tests/."""
    rel = Path(path).resolve().relative_to(TESTS_DIR)
    return rel.parts[0] if len(rel.parts) > 1 else "."


def collection_shortfalls(counts: dict[str, int], floors: dict[str, int]) -> list[str]:
    """One message per folder whose collected count is below its recorded floor. Folders absent
    from ``floors`` (new ones) never fail; a recorded folder that collected nothing does."""
    return [
        f"tests/{name}: collected {counts.get(name, 0)} tests, below the recorded floor of {floor}"
        for name, floor in sorted(floors.items())
        if counts.get(name, 0) < floor
    ]


def _whole_tree_collected(config) -> bool:
    """True for a run over all of tests/ (no file or folder subset, no --ignore, no --lf).
    -k, -m and --deselect are fine: the counts are taken before they deselect anything."""
    args = [Path(str(a).split("::")[0]).resolve() for a in config.args]
    if args != [TESTS_DIR] or any("::" in str(a) for a in config.args):
        return False
    return not (config.getoption("lf", False) or config.getoption("ignore", None)
                or config.getoption("ignore_glob", None))


@pytest.hookimpl(tryfirst=True)
def pytest_collection_modifyitems(session, config, items):
    """Per-folder counts of everything collected, before -k/-m/--deselect remove any, checked
    against the floors of collection_counts.json; and without CUDA, tests marked gpu skip."""
    _skip_gpu_tests(items)
    config._lmfuse_collection_shortfalls = []
    if not _whole_tree_collected(config):
        return
    counts: dict[str, int] = {}
    for item in items:
        name = folder_of(item.path)
        counts[name] = counts.get(name, 0) + 1
    floors_file = Path(os.environ.get("LMFUSE_COLLECTION_FLOORS", COLLECTION_FLOORS))
    floors = {k: v for k, v in json.loads(floors_file.read_text()).items() if not k.startswith("_")}
    config._lmfuse_collection_shortfalls = collection_shortfalls(counts, floors)


def pytest_sessionfinish(session, exitstatus):
    if getattr(session.config, "_lmfuse_collection_shortfalls", None):
        session.exitstatus = pytest.ExitCode.TESTS_FAILED


def pytest_terminal_summary(terminalreporter, exitstatus, config):
    shortfalls = getattr(config, "_lmfuse_collection_shortfalls", None)
    if shortfalls:
        terminalreporter.section("collection floor", sep="=", red=True, bold=True)
        for line in shortfalls:
            terminalreporter.line(line, red=True)
        terminalreporter.line(f"(floors in {COLLECTION_FLOORS.relative_to(TESTS_DIR.parent)}; "
                              "lower one only when tests were removed on purpose, see docs/contributing.md)")


def _skip_gpu_tests(items) -> None:
    if HAS_CUDA:
        return
    skip = pytest.mark.skip(reason="needs a CUDA device")
    for item in items:
        if "gpu" in item.keywords:
            item.add_marker(skip)


@pytest.fixture
def device():
    import torch

    return torch.device("cuda" if HAS_CUDA else "cpu")


@pytest.fixture(autouse=True)
def _fresh_seed(request):
    """Fresh random inputs on every run; the seed is printed on failure to reproduce it."""
    import random

    import torch

    seed = int(os.environ.get("LMFUSE_TEST_SEED", random.SystemRandom().randrange(2**31)))
    torch.manual_seed(seed)
    request.node.user_properties.append(("seed", seed))
    yield


def pytest_runtest_makereport(item, call):
    if call.when == "call" and call.excinfo is not None:
        for k, v in item.user_properties:
            if k == "seed":
                item.add_report_section("call", "seed", f"LMFUSE_TEST_SEED={v}")
