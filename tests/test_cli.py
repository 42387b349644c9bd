"""The ``lmfuse`` command line, run the way a user runs it (a subprocess)."""

import csv
import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[1]


def _env():
    env = dict(os.environ)
    env["PYTHONPATH"] = str(REPO / "python") + os.pathsep + env.get("PYTHONPATH", "")
    env.pop("TRITON_INTERPRET", None)  # conftest sets it for kernels; a user's shell does not
    env.pop("LMFUSE_BACKEND", None)
    return env


def _lmfuse(*args, timeout=120, cwd=None):
    return subprocess.run([sys.executable, "-m", "lmfuse", *args], capture_output=True, text=True,
                          env=_env(), timeout=timeout, cwd=cwd or REPO)


def test_import_cli_is_light():
    # tqdm is left out: torch itself may import it (torch.hub).
    code = ("import sys, lmfuse.cli, torch; "
            "heavy = [m for m in ('matplotlib', 'transformers', 'triton') if m in sys.modules]; "
            "print(heavy, torch.cuda.is_initialized())")
    r = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, env=_env(), timeout=120)
    assert r.returncode == 0, r.stderr
    assert r.stdout.strip() == "[] False"


def test_info_text():
    r = _lmfuse("info")
    assert r.returncode == 0, r.stderr
    for word in ("lmfuse", "torch", "triton", "transformers", "backends:", "reference", "extensions:"):
        assert word in r.stdout


def test_info_json_has_the_expected_keys():
    r = _lmfuse("info", "--json")
    assert r.returncode == 0, r.stderr
    info = json.loads(r.stdout)
    assert {"lmfuse", "python", "torch", "triton", "transformers", "devices", "backends", "extensions"} <= set(info)
    assert info["python"] == ".".join(map(str, sys.version_info[:3]))
    assert set(info["extensions"]) == {"_C", "_C_cuda"}
    assert {"built", "importable", "path"} <= set(info["extensions"]["_C"])
    assert isinstance(info["devices"]["cuda_available"], bool)
    if "error" not in info["backends"]:
        assert info["backends"]["reference"]["available"] is True
        assert set(info["backends"]) == {"cuda", "triton", "cpp", "reference"}


def test_no_subcommand_prints_help_and_fails():
    r = _lmfuse()
    assert r.returncode == 2
    assert "info" in r.stdout and "bench" in r.stdout


def test_command_registry_rejects_duplicates():
    from lmfuse import cli

    with pytest.raises(ValueError):
        cli.command("info", help="again")(lambda p: (lambda a: 0))


def test_bench_list_and_unknown_op(tmp_path):
    r = _lmfuse("bench", "--list")
    assert r.returncode == 0 and "low_rank_linear" in r.stdout
    r = _lmfuse("bench", "--ops", "no_such_op", "--out", str(tmp_path))
    assert r.returncode == 2
    assert "no_such_op" in r.stderr
    r = _lmfuse("bench", "--modes", "fwd,sideways", "--out", str(tmp_path))
    assert r.returncode == 2 and "sideways" in r.stderr
    assert not (tmp_path / "low_rank_linear.csv").exists()


def test_bench_quick_low_rank_linear_end_to_end(tmp_path):
    try:
        import lmfuse.ops as ops
    except Exception as e:
        pytest.skip(f"lmfuse.ops not importable: {e}")
    missing = [n for n in ("low_rank_linear", "lpa_qkv_projection", "low_rank_linear_reference",
                           "lpa_qkv_projection_reference", "low_rank_linear_cost") if not hasattr(ops, n)]
    if missing:
        pytest.skip(f"lmfuse.ops lacks {missing}")
    out = tmp_path / "res"
    r = _lmfuse("bench", "--quick", "--tiny", "--ops", "low_rank_linear", "--out", str(out),
                "--no-progress", timeout=300)
    assert r.returncode == 0, r.stdout + r.stderr
    assert "ceilings:" in r.stdout and "lpa-separate-linear ms" in r.stdout
    csv_path, png = out / "low_rank_linear.csv", out / "low_rank_linear.png"
    assert png.stat().st_size > 1000 and (out / "low_rank_linear.json").is_file()
    with open(csv_path) as f:
        rows = list(csv.DictReader(f))
    ok = {(row["provider"], row["mode"]) for row in rows if row["metric"] == "time_ms" and row["status"] == "ok"}
    for provider in ("reference", "lpa-fused", "lpa-separate-linear", "dense-linear"):
        for mode in ("fwd", "bwd", "full"):
            assert (provider, mode) in ok
    speed = [float(row["value"]) for row in rows if row["metric"] == "speedup" and row["provider"] == "lpa-fused"]
    assert len(speed) == 3 and all(s > 0 for s in speed)


def test_generate_rejects_bad_numbers_before_loading_a_model():
    for args, flag in ((["--max-new-tokens", "0"], "--max-new-tokens"),
                       (["--draft-confidence", "1.5"], "--draft-confidence")):
        r = _lmfuse("generate", *args, timeout=60)
        assert r.returncode == 2 and flag in r.stderr and "Traceback" not in r.stderr
