"""The test infrastructure itself: the shared comparison helper (norm-wise and elementwise
bounds), the per-folder collection floor, and the missing-extension check of tests/conftest.py."""

import json
import os
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest
import torch

from lmfuse.testing import (ELEMENTWISE_ATOL_SCALE, TOLERANCE, assert_close_to_reference, elementwise_excess,
                            rel_error)

from .conftest import COLLECTION_FLOORS, collection_shortfalls

ROOT = Path(__file__).resolve().parents[1]


def test_a_local_error_the_norm_wise_bound_misses_is_caught():
    ref = torch.randn(128, 128, dtype=torch.float64)
    tol = TOLERANCE[torch.float32]
    out = ref.clone()
    # three small entries off by 10·tol·max|ref|: far outside what rounding does to an entry,
    # diluted below tol in the whole-tensor norm
    small = ref.abs().flatten().argsort()[:3]
    out.view(-1)[small] += 10 * tol * ref.abs().max()
    assert rel_error(out, ref) <= tol  # the norm-wise bound alone lets it through
    n_bad, worst, idx = elementwise_excess(out, ref, tol)
    assert n_bad == 3 and worst > 1
    assert idx[0] * 128 + idx[1] in small.tolist()  # the worst entry is one of the perturbed ones
    with pytest.raises(AssertionError, match="3 of 16384 elements exceed the elementwise bound"):
        assert_close_to_reference(out.float(), ref, torch.float32)


def test_rounding_to_the_dtype_passes_both_bounds():
    ref = torch.randn(300, 50, dtype=torch.float64) * torch.logspace(-3, 0, 50, dtype=torch.float64)
    for dtype in (torch.float32, torch.float16, torch.bfloat16):
        assert_close_to_reference(ref.to(dtype), ref, dtype, str(dtype))


def test_elementwise_bound_scales_with_the_reference():
    ref = torch.tensor([1000.0, 1.0, -2.0], dtype=torch.float64)
    tol = 1e-5
    # the absolute part is tol·scale·max|ref| = 4e-2 here: an error just under passes, over fails
    ok = ref + torch.tensor([0.0, 0.99 * ELEMENTWISE_ATOL_SCALE * tol * 1000, 0.0], dtype=torch.float64)
    bad = ref + torch.tensor([0.0, 0.0, 1.2 * (ELEMENTWISE_ATOL_SCALE * tol * 1000 + 8 * tol)], dtype=torch.float64)
    assert elementwise_excess(ok, ref, tol)[0] == 0
    assert elementwise_excess(bad, ref, tol)[:1] == (1,) and elementwise_excess(bad, ref, tol)[2] == (2,)
    zero = torch.zeros(4, dtype=torch.float64)
    assert elementwise_excess(zero, zero, tol)[0] == 0
    assert elementwise_excess(zero + 1e-30, zero, tol)[0] == 4  # an all-zero reference needs exact zeros
    with pytest.raises(AssertionError, match="non-finite"):
        elementwise_excess(torch.tensor([float("nan")]), torch.tensor([1.0]), tol)


def test_collection_shortfalls_only_flag_a_drop_below_a_recorded_floor():
    floors = {"build": 58, "ops": 100}
    assert collection_shortfalls({"build": 58, "ops": 120, "new_folder": 3}, floors) == []
    msgs = collection_shortfalls({"ops": 99}, floors)
    assert msgs == ["tests/build: collected 0 tests, below the recorded floor of 58",
                    "tests/ops: collected 99 tests, below the recorded floor of 100"]


def test_collection_floor_file_covers_the_build_folder():
    floors = json.loads(COLLECTION_FLOORS.read_text())
    assert floors["build"] >= 58, floors  # the nvcc compile and host-emulation tests


def _pytest(args, env_extra, cwd=ROOT, timeout=600):
    env = dict(os.environ, **env_extra)
    env.pop("PYTEST_ADDOPTS", None)
    return subprocess.run([sys.executable, "-m", "pytest", "-p", "no:cacheprovider", *args], cwd=cwd, env=env,
                          capture_output=True, text=True, timeout=timeout)


def test_a_whole_tree_run_fails_when_a_folder_drops_below_its_floor(tmp_path):
    floors = json.loads(COLLECTION_FLOORS.read_text())
    inflated = dict(floors, build=10**6)
    (tmp_path / "floors.json").write_text(json.dumps(inflated))
    r = _pytest(["--collect-only", "-q", "tests"], {"LMFUSE_COLLECTION_FLOORS": str(tmp_path / "floors.json")})
    assert r.returncode == 1, r.stdout[-3000:] + r.stderr[-3000:]
    assert "tests/build: collected" in r.stdout and "below the recorded floor of 1000000" in r.stdout
    # the committed floors hold for the tree as it is
    ok = _pytest(["--collect-only", "-q", "tests"], {})
    assert ok.returncode == 0, ok.stdout[-3000:] + ok.stderr[-3000:]
    assert "tests/build/test_nvcc_compile.py::" in ok.stdout  # tests/build/ is collected
    # a subset (one folder) is never checked against the floors
    sub = _pytest(["--collect-only", "-q", "tests/lpa"], {"LMFUSE_COLLECTION_FLOORS": str(tmp_path / "floors.json")})
    assert sub.returncode == 0, sub.stdout[-3000:]


_BLOCKER = """
import sys

class _Block:
    def find_spec(self, name, path=None, target=None):
        if name == "lmfuse._C":
            raise ImportError("lmfuse._C blocked for this test")
        return None

sys.meta_path.insert(0, _Block())
"""


@pytest.mark.parametrize("allow", [False, True])
def test_missing_extension_fails_the_run_unless_allowed(tmp_path, allow):
    shim = tmp_path / "shim"
    shim.mkdir()
    (shim / "sitecustomize.py").write_text(_BLOCKER)
    tiny = tmp_path / "test_tiny.py"
    tiny.write_text(textwrap.dedent("""
        def test_tiny():
            assert 1 + 1 == 2
    """))
    env = {"PYTHONPATH": os.pathsep.join([str(shim), str(ROOT)])}
    if allow:
        env["LMFUSE_ALLOW_MISSING_CPP"] = "1"
    else:
        env["LMFUSE_ALLOW_MISSING_CPP"] = ""
    # load this suite's conftest as a plugin, on a test file outside tests/
    r = _pytest(["-p", "tests.conftest", "-q", str(tiny), "--rootdir", str(tmp_path)], env)
    out = r.stdout + r.stderr
    if allow:
        assert r.returncode == 0 and "1 passed" in out, out[-3000:]
    else:
        assert r.returncode != 0, out[-3000:]
        assert "lmfuse._C (the compiled CPU extension) is not importable" in out
        assert "LMFUSE_ALLOW_MISSING_CPP=1" in out and "1 passed" not in out


# -- run_two_process_ddp -------------------------------------------------------------------------

def _ddp_writes(rank, world, port, out):
    with open(f"{out}.{rank}", "w") as f:
        f.write(f"{world} {port > 0}")


def _ddp_raises(rank, world, port):
    raise ValueError(f"rank {rank} failed on purpose")


def _ddp_hangs(rank, world, port, out):
    import os
    import time

    with open(f"{out}.{rank}.{os.getpid()}", "w"):
        pass
    time.sleep(60)


def test_two_process_ddp_runs_raises_and_retries_a_hang(tmp_path, capfd):
    from lmfuse.testing import run_two_process_ddp

    out = str(tmp_path / "ok")
    run_two_process_ddp(_ddp_writes, (out,))
    assert [open(f"{out}.{r}").read() for r in (0, 1)] == ["2 True", "2 True"]
    with pytest.raises(Exception, match="failed on purpose"):
        run_two_process_ddp(_ddp_raises)
    hang = str(tmp_path / "hang")
    with pytest.raises(AssertionError, match="did not finish within 2 s in 2 attempts"):
        run_two_process_ddp(_ddp_hangs, (hang,), timeout_s=2.0, attempts=2)
    started = sorted(p.name for p in tmp_path.iterdir() if p.name.startswith("hang."))
    assert len(started) == 4  # two ranks, two attempts
    assert "_ddp_hangs" in capfd.readouterr().err  # each hung rank printed its stack
