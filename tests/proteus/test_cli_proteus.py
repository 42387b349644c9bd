"""``lmfuse proteus``: arguments are checked before any work, ``run`` on files written by the
synthetic generator, and ``demo``."""

import json
import pytest

from lmfuse.cli import main
from lmfuse.proteus.synth import make_cohort


class _Result:
    def __init__(self, code, out, err):
        self.returncode, self.stdout, self.stderr = code, out, err


def _cli(capsys, *args):
    code = main(["proteus", *args])
    got = capsys.readouterr()
    return _Result(code, got.out, got.err)


@pytest.mark.parametrize("args, message", [
    (["run", "--data", "/nonexistent.tsv", "--out", "x"], "no such file"),
    (["run", "--out", "x"], "--data"),
    (["demo", "--llm", "gpt4"], "none, local or an http"),
    (["demo", "--max-rounds", "11"], "integer in [0, 10]"),
    (["demo", "--samples", "5"], "integer in [12, 5000]"),
])
def test_bad_arguments_exit_2_before_work(args, message, capsys):
    with pytest.raises(SystemExit) as e:
        main(["proteus", *args])
    assert e.value.code == 2
    assert message in capsys.readouterr().err


def test_run_on_files(tmp_path, capsys):
    c = make_cohort(seed=int(tmp_path.stat().st_ino % 1000), n_samples=24, n_proteins=150, n_pathways=20)
    paths = c.write(tmp_path / "in")
    out = tmp_path / "out"
    r = _cli(capsys, "run", "--data", str(paths["data"]), "--meta", str(paths["meta"]), "--group", "group",
             "--gene-sets", str(paths["gene_sets"]), "--out", str(out), "--max-rounds", "1", "--seed", "3")
    assert r.returncode == 0, r.stderr
    assert "proteus steps" in r.stderr  # the progress bar
    f = json.loads((out / "findings.json").read_text())
    assert f["config"]["seed"] == 3 and f["config"]["max_rounds"] == 1 and f["config"]["gene_sets"] == 20
    assert f["objectives"][0]["params"]["column"] == "group"
    assert (out / "report.html").is_file() and (out / "run_log.jsonl").is_file()
    bad = _cli(capsys, "run", "--data", str(paths["data"]), "--meta", str(paths["meta"]), "--group", "nope", "--out", str(out))
    assert bad.returncode == 2 and "nope" in bad.stderr
    (out / "figures").mkdir(exist_ok=True)
    clash = out / "figures" / "meta.csv"
    clash.write_text(paths["meta"].read_text())
    refused = _cli(capsys, "run", "--data", str(paths["data"]), "--meta", str(clash), "--out", str(out))
    assert refused.returncode == 2 and "overwrite" in refused.stderr


def test_demo_null(tmp_path, capsys):
    r = _cli(capsys, "demo", "--null", "--samples", "24", "--proteins", "150", "--out", str(tmp_path), "--no-progress")
    assert r.returncode == 0, r.stderr
    assert "hypotheses: 0" in r.stdout and '"null_cohort": true' in r.stdout
