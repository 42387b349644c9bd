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
    assert isinstance(info["devices"]["cpu_isa"], str)
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


# ------------------------------------------------------------------ bench: budget, empty requests


def test_bench_request_that_measures_nothing_is_an_error(tmp_path):
    r = _lmfuse("bench", "--ops", "spec_verify", "--modes", "bwd", "--tiny", "--out", str(tmp_path), "--no-progress")
    assert r.returncode == 2, r.stdout + r.stderr
    assert "not differentiable" in r.stderr and "spec_verify" in r.stderr and "Traceback" not in r.stderr
    assert not (tmp_path / "spec_verify.csv").exists()


def test_bench_budget_argument_is_checked():
    for bad in ("0", "-3", "soon", "inf"):
        r = _lmfuse("bench", "--budget", bad, timeout=60)
        assert r.returncode == 2 and "--budget" in r.stderr and "Traceback" not in r.stderr, (bad, r.stderr)


def test_bench_budget_end_to_end_writes_results_and_the_budget_record(tmp_path):
    r = _lmfuse("bench", "--tiny", "--ops", "spec_verify", "--budget", "600", "--no-plot", "--no-progress",
                "--out", str(tmp_path), timeout=600)
    assert r.returncode == 0, r.stdout + r.stderr
    record = json.loads((tmp_path / "budget.json").read_text())
    assert record["budget_s"] == 600 and record["skipped"] == []
    assert "budget:" in r.stdout and "every case ran" in r.stdout
    with open(tmp_path / "spec_verify.csv") as f:
        assert any(row["metric"] == "time_ms" and row["status"] == "ok" for row in csv.DictReader(f))


# ------------------------------------------------------------------ generate: arguments, defaults


def test_generate_help_shows_the_defaults():
    r = _lmfuse("generate", "--help", timeout=60)
    assert r.returncode == 0
    text = " ".join(r.stdout.split())
    for fragment in ("(default: plain)", "(default: 48)", "(default: 20)", "(default: 4)", "(default: 0.0)",
                     "--no-chat"):
        assert fragment in text, fragment


@pytest.mark.parametrize("args, flag", [
    (["--top-p", "1.5"], "--top-p"), (["--top-p", "0"], "--top-p"), (["--top-p", "nan"], "--top-p"),
    (["--temperature", "-1"], "--temperature"), (["--temperature", "hot"], "--temperature"),
    (["--draft-layers", "0"], "--draft-layers"), (["--draft-layers", "2.5"], "--draft-layers"),
    (["--num-draft-tokens", "0"], "--num-draft-tokens"), (["--num-draft-tokens", "-2"], "--num-draft-tokens"),
    (["--top-k", "0"], "--top-k"), (["--base-layers", "-1"], "--base-layers"),
    (["--max-new-tokens", "0"], "--max-new-tokens"), (["--draft-confidence", "1.5"], "--draft-confidence"),
    (["--alpha", "inf"], "--alpha"),
])
def test_generate_bad_argument_exits_2_without_loading_a_model(args, flag, monkeypatch, capsys):
    import lmfuse.models
    from lmfuse import cli

    monkeypatch.setattr(lmfuse.models, "load_bundled_model", lambda *a, **k: pytest.fail("model loaded"))
    with pytest.raises(SystemExit) as e:
        cli.main(["generate", *args])
    err = capsys.readouterr().err
    assert e.value.code == 2 and flag in err and "expected" in err


@pytest.mark.parametrize("args, flag", [
    (["--method", "proxy", "--base-layers", "30"], "--base-layers"),
    (["--method", "contrastive", "--draft-layers", "30"], "--draft-layers"),
    (["--method", "speculative", "--draft-layers", "99"], "--draft-layers"),
])
def test_generate_layer_counts_are_checked_against_the_model_before_loading(args, flag, monkeypatch, capsys):
    import lmfuse.models
    from lmfuse import cli

    monkeypatch.setattr(lmfuse.models, "load_bundled_model", lambda *a, **k: pytest.fail("model loaded"))
    assert cli.main(["generate", *args]) == 2
    err = capsys.readouterr().err
    assert flag in err and "[1, 29]" in err and "30-layer" in err


def test_gguf_block_count_reads_the_header(tmp_path):
    import struct

    from lmfuse.cli_generate import bundled_num_layers, gguf_block_count

    def kv_string(key, value):
        k, v = key.encode(), value.encode()
        return struct.pack("<Q", len(k)) + k + struct.pack("<I", 8) + struct.pack("<Q", len(v)) + v

    def kv_u32(key, value):
        k = key.encode()
        return struct.pack("<Q", len(k)) + k + struct.pack("<I", 4) + struct.pack("<I", value)

    arr_key = b"tok.scores"
    array = struct.pack("<Q", len(arr_key)) + arr_key + struct.pack("<IIQ", 9, 6, 3) + struct.pack("<3f", 1, 2, 3)
    body = kv_string("general.architecture", "llama") + array + kv_u32("llama.block_count", 7)
    path = tmp_path / "m.gguf"
    path.write_bytes(b"GGUF" + struct.pack("<IQQ", 3, 0, 3) + body)
    assert gguf_block_count(str(path)) == 7
    path.write_bytes(b"GGUF" + struct.pack("<IQQ", 3, 0, 1) + kv_string("general.architecture", "llama"))
    with pytest.raises(ValueError, match="block_count"):
        gguf_block_count(str(path))
    assert bundled_num_layers() == 30  # SmolLM2-135M


def test_generate_defaults_to_plain_and_names_stand_ins():
    from lmfuse import cli
    from lmfuse.cli_generate import stand_in_notices

    parser = cli.build_parser()
    args = parser.parse_args(["generate"])
    assert args.method == "plain" and stand_in_notices(args) == []
    assert stand_in_notices(parser.parse_args(["generate", "--method", "speculative", "--draft", "lookup"])) == []
    for method, n in (("speculative", 1), ("contrastive", 1), ("proxy", 2)):
        notes = stand_in_notices(parser.parse_args(["generate", "--method", method]))
        assert len(notes) == n and all("stand-in" in s and "not a quality result" in s for s in notes)


class _FakeTokenizer:
    chat_template = "{{ messages }}"
    pad_token_id = 0
    eos_token = "</s>"

    def __init__(self):
        self.seen = []

    def apply_chat_template(self, messages, tokenize, add_generation_prompt):
        return f"<user>{messages[0]['content']}<assistant>"

    def __call__(self, texts, return_tensors, padding):
        import torch

        self.seen = list(texts)
        return {"input_ids": torch.ones(len(texts), 3, dtype=torch.long),
                "attention_mask": torch.ones(len(texts), 3, dtype=torch.long)}


@pytest.mark.parametrize("extra, chat", [([], True), (["--no-chat"], False)])
def test_generate_applies_the_chat_template_and_leaves_eos_to_the_model(extra, chat, monkeypatch):
    from lmfuse import cli, cli_generate, collab

    tok, calls = _FakeTokenizer(), {}

    class Stop(Exception):
        pass

    def fake_plain(model, ids, mask, **kw):
        calls.update(kw)
        raise Stop

    monkeypatch.setattr(cli_generate, "_build_models", lambda args: (tok, ("model",)))
    monkeypatch.setattr(collab, "plain_generate", fake_plain)
    with pytest.raises(Stop):
        cli.main(["generate", "--prompt", "hi", *extra])
    assert tok.seen == (["<user>hi<assistant>"] if chat else ["hi"])
    assert "eos_token_id" in calls and calls["eos_token_id"] is None  # the model's generation_config decides


def test_generate_stand_in_end_to_end_prints_the_notice():
    r = _lmfuse("generate", "--method", "contrastive", "--draft-layers", "4", "--max-new-tokens", "2",
                "--prompt", "Hi", "--json", timeout=600)
    assert r.returncode == 0, r.stderr
    assert "stand-in" in r.stderr and "not a quality result" in r.stderr
    out = json.loads(r.stdout)
    assert out["method"] == "contrastive" and len(out["texts"]) == 1 and out["notices"]
