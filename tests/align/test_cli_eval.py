"""``lmfuse eval`` run as a user runs it (a subprocess): argument checks before any model is
loaded, and a full run on a saved planted tiny model."""

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

from .test_medeval import planted_model, tiny_tokenizer

REPO = Path(__file__).resolve().parents[2]


@pytest.fixture(scope="module")
def data_file(tmp_path_factory):
    rows = [{"question": "which drug treats pain ?", "opa": "aspirin", "opb": "water", "opc": "salt",
             "opd": "morphine", "cop": c} for c in (1, 0, 1, 3, 1)]
    path = tmp_path_factory.mktemp("data") / "medmcqa.jsonl"
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))
    return path


@pytest.fixture
def no_model_loading(monkeypatch):
    """Fail the test if the command gets as far as loading a model."""
    from lmfuse import cli_eval

    def refuse(name):
        raise AssertionError(f"a model was loaded ({name}) although an argument was bad")
    monkeypatch.setattr(cli_eval, "_load_model", refuse)


@pytest.mark.parametrize("args,message", [
    (["--task", "usmle=x.json"], "format must be one of"),
    (["--task", "medqa"], "expected FORMAT=PATH"),
    (["--task", "medqa=/no/such/file.json"], "no such file"),
    (["--task", "medmcqa=DATA", "--mode", "ranking"], "invalid choice"),
    (["--task", "medmcqa=DATA", "--top-p", "1.5"], "--top-p"),
    (["--task", "medmcqa=DATA", "--batch-size", "0"], "--batch-size"),
    (["--task", "medmcqa=DATA", "--model", "/no/such/model"], "--model must be"),
    (["--task", "medqa=DATA"], "MedQA record 0"),   # a MedMCQA file read as MedQA
    (["--task", "mmlu=DATADIR"], "expected a file"),
])
def test_bad_arguments_exit_2_before_loading_a_model(args, message, data_file, no_model_loading, capsys):
    from lmfuse.cli import main

    args = [a.replace("=DATADIR", f"={data_file.parent}").replace("=DATA", f"={data_file}") for a in args]
    try:
        code = main(["eval", *args])
    except SystemExit as e:  # argparse's own errors
        code = e.code
    assert code == 2
    assert message in capsys.readouterr().err


def test_broken_data_file_exits_2_naming_the_record(tmp_path, no_model_loading, capsys):
    from lmfuse.cli import main

    path = tmp_path / "bad.jsonl"
    path.write_text(json.dumps({"question": "q", "opa": "a", "opb": "b", "opc": "c", "opd": "d", "cop": 9}) + "\n")
    assert main(["eval", "--task", f"medmcqa={path}"]) == 2
    err = capsys.readouterr().err
    assert "record 0" in err and "cop" in err


def test_eval_runs_on_a_saved_model_and_writes_predictions(tmp_path, data_file, capsys):
    from lmfuse.cli import main

    model, _ = planted_model({"A": 0.0, "B": 2.0})
    model.save_pretrained(tmp_path / "model")
    tiny_tokenizer().save_pretrained(tmp_path / "model")
    out = tmp_path / "preds.json"
    code = main(["eval", "--task", f"medmcqa={data_file}", "--model", str(tmp_path / "model"), "--mode", "generate",
                 "--max-new-tokens", "6", "--out", str(out)])
    std = capsys.readouterr()
    assert code == 0, std.err
    assert "MedMCQA" in std.out and "60.00%" in std.out       # gold B in 3 of 5 items; the model says B
    assert "generate eval" in std.err                            # the progress bar
    rep = json.loads(out.read_text())
    assert rep["accuracy"] == {"MedMCQA": 0.6} and rep["invalid_rate"] == 0.0
    assert [p["prediction"] for p in rep["predictions"]] == ["B"] * 5


def test_help_runs_as_a_subprocess():
    env = dict(os.environ)
    env["PYTHONPATH"] = str(REPO / "python") + os.pathsep + env.get("PYTHONPATH", "")
    r = subprocess.run([sys.executable, "-m", "lmfuse", "eval", "--help"], capture_output=True, text=True,
                       env=env, timeout=300, cwd=REPO)
    assert r.returncode == 0 and "FORMAT=PATH" in r.stdout and "self_consistency" in r.stdout


def test_cli_formats_match_the_evaluator():
    from lmfuse import cli_eval
    from lmfuse.align import medeval

    assert cli_eval._FORMATS == medeval.FORMATS
