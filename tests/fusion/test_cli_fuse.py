"""``lmfuse fuse``: argument checks before loading, and an end-to-end run on tiny saved experts
that prints what ``UltraFuser.generate`` gives in process."""

import json

import pytest
import torch

from lmfuse import cli, cli_fuse
from lmfuse.fusion import UltraFuser

from .helpers import TEMPLATES, char_tokenizer, tiny_llama


@pytest.fixture
def saved(tmp_path):
    tok = char_tokenizer()
    seed = int(torch.randint(0, 2**30, ()))
    paths = []
    experts = []
    for e in range(2):
        m = tiny_llama(len(tok), seed=seed + e, init_range=0.3)
        m.save_pretrained(tmp_path / f"expert{e}")
        paths.append(str(tmp_path / f"expert{e}"))
        experts.append(m)
    tok.save_pretrained(tmp_path / "tok")
    fuser = UltraFuser(experts, tok, templates=TEMPLATES[:2])
    with torch.no_grad():
        for p in fuser.gate.parameters():
            p.copy_(torch.randn_like(p) * 0.3)
    fuser.save_pretrained(str(tmp_path / "gate"))
    return {"paths": paths, "tok": str(tmp_path / "tok"), "gate": str(tmp_path / "gate"), "fuser": fuser}


def test_end_to_end_matches_the_in_process_fuser(saved, capsys):
    prompts = ["12+3", "(["]
    argv = ["fuse", "--expert", saved["paths"][0], "--expert", saved["paths"][1], "--gate", saved["gate"],
            "--tokenizer", saved["tok"], "--max-new-tokens", "6", "--json"]
    for p in prompts:
        argv += ["--prompt", p]
    assert cli.main(argv) == 0
    got = json.loads(capsys.readouterr().out)
    want = saved["fuser"].generate(prompts, max_new_tokens=6)
    assert got["texts"] == want.texts
    assert got["new_tokens"] == want.new_tokens.tolist()
    assert got["expert_names"] == ["expert0", "expert1"] and got["notices"] == []
    for g in got["mean_gate"]:
        assert g is None or abs(sum(g) - 1) < 1e-5


@pytest.mark.parametrize("extra, message", [
    (["--expert", "/no/such/dir"], "neither 'bundled' nor a model directory"),
    (["--expert", "bundled", "--expert", "bundled", "--template", "x {prompt}"], "once per expert"),
    (["--expert", "bundled", "--template", "no placeholder"], "no '{prompt}' placeholder"),
    (["--gate", "/no/such/gate"], "no fusion_config.json"),
    (["--tokenizer", "/no/such/tok"], "not a directory"),
])
def test_bad_arguments_exit_2_before_loading(extra, message, monkeypatch, capsys):
    monkeypatch.setattr(cli_fuse, "_load_experts", lambda *a: pytest.fail("a model was loaded"))
    assert cli.main(["fuse", *extra]) == 2
    assert message in capsys.readouterr().err


def test_gate_expert_count_is_checked_before_loading(saved, monkeypatch, capsys):
    monkeypatch.setattr(cli_fuse, "_load_experts", lambda *a: pytest.fail("a model was loaded"))
    assert cli.main(["fuse", "--expert", saved["paths"][0], "--gate", saved["gate"]]) == 2
    assert "trained with 2 experts, got 1" in capsys.readouterr().err


@pytest.mark.parametrize("argv", [["--max-new-tokens", "0"], ["--top-p", "0"], ["--temperature", "-1"]])
def test_bad_numbers_are_argparse_errors(argv):
    with pytest.raises(SystemExit) as e:
        cli.main(["fuse", *argv])
    assert e.value.code == 2


def test_other_experts_than_the_gate_was_trained_with_are_refused(saved, tmp_path, capsys):
    other = tiny_llama(len(char_tokenizer()), seed=12345, init_range=0.3)
    other.save_pretrained(tmp_path / "other")
    assert cli.main(["fuse", "--expert", saved["paths"][0], "--expert", str(tmp_path / "other"), "--gate",
                     saved["gate"], "--tokenizer", saved["tok"], "--max-new-tokens", "2"]) == 2
    err = capsys.readouterr().err
    assert "expert 1 (expert1): weights differ" in err and "expert 0" not in err
