"""Every Triton kernel, at every shipped config and dtype, compiles for sm_80 and sm_90 and fits
in the chip's shared memory — so a kernel that only works in the interpreter fails CI."""

import json
import os
import subprocess
import sys

import pytest

pytest.importorskip("triton")

# opt-in shared memory per block (bytes): A100 (sm_80) 163 KiB, H100 (sm_90) 227 KiB
SHARED_LIMIT = {"sm_80": 166912, "sm_90": 232448}
SCRIPT = os.path.join(os.path.dirname(__file__), "triton_aot.py")


def _count_jobs():
    """The job list, computed in a subprocess (this process runs Triton in interpreter mode)."""
    code = f"import sys; sys.path.insert(0, {os.path.dirname(SCRIPT)!r}); import triton_aot; print(len(list(triton_aot.jobs())))"
    env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}
    r = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, env=env, timeout=600)
    assert r.returncode == 0, r.stderr[-3000:]
    return range(int(r.stdout.strip().splitlines()[-1]))


@pytest.fixture(scope="module")
def aot_records():
    env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}
    env.setdefault("TRITON_DEFAULT_FP_FUSION", "1")
    r = subprocess.run([sys.executable, SCRIPT], capture_output=True, text=True, env=env, timeout=3000)
    assert r.returncode == 0, r.stderr[-4000:]
    return [json.loads(line) for line in r.stdout.splitlines() if line.startswith("{")]


def test_every_config_compiles_and_fits(aot_records):
    expected = sum(1 for _ in _count_jobs())
    assert expected > 0 and len(aot_records) == expected
    failed = [r for r in aot_records if not r["ok"]]
    assert not failed, "\n".join(f"{r['kernel']} {r['label']} {r['arch']}: {r['error']}" for r in failed)
    too_big = [r for r in aot_records if r["shared"] > SHARED_LIMIT[r["arch"]]]
    assert not too_big, "\n".join(f"{r['kernel']} {r['label']} {r['arch']}: "
                                  f"{r['shared']} B shared > {SHARED_LIMIT[r['arch']]}" for r in too_big)
    kernels = {r["kernel"] for r in aot_records}
    assert {"_low_rank_linear_fwd_kernel", "_low_rank_linear_bwd_kernel",
            "_lpa_qkv_up_fwd_kernel", "_lpa_qkv_bwd_kernel", "_discounted_cumsum_fwd_kernel"} <= kernels
