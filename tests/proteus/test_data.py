"""Readers, role inference, validation errors, dataset views and profile."""

from pathlib import Path

import numpy as np
import pandas as pd
import pytest

from lmfuse.proteus.data import DataError, load, read_diann, read_maxquant, read_metadata, read_wide_table

from . import PLASMA, test_rng


def _mq(tmp_path, rng, n_prot=12, samples=("s1", "s2", "s3", "s4", "s5", "s6"), extra_rows=()):
    V = rng.lognormal(20, 1, (n_prot, len(samples)))
    V[rng.random(V.shape) < 0.2] = 0
    rows = []
    for i in range(n_prot):
        rows.append([f"P{i:04d};Q{i:04d}", f"GENE{i};ALT{i}", f"protein {i}"] + [f"{v:.1f}" for v in V[i]]
                    + ["", "+" if i == 0 else "", "+" if i == 1 else ""])
    header = ["Protein IDs", "Gene names", "Protein names"] + [f"LFQ intensity {s}" for s in samples] + \
             ["Only identified by site", "Reverse", "Potential contaminant"]
    lines = ["\t".join(header)] + ["\t".join(r) for r in rows] + list(extra_rows)
    p = tmp_path / "proteinGroups.txt"
    p.write_text("\n".join(lines) + "\n")
    return p, V


def _meta(tmp_path, samples, groups, name="meta.csv"):
    df = pd.DataFrame({"sample": samples, "condition": groups, "age": np.linspace(30, 70, len(samples)),
                       "batch": ["b1", "b2"] * (len(samples) // 2) + ["b1"] * (len(samples) % 2)})
    p = tmp_path / name
    if name.endswith(".xlsx"):
        df.to_excel(p, index=False)
    else:
        df.to_csv(p, index=False, sep="\t" if name.endswith(".tsv") else ",")
    return p


def test_read_maxquant_values_flags_and_short_lines(tmp_path):
    rng, _ = test_rng()
    p, V = _mq(tmp_path, rng, extra_rows=["broken\tline"])
    m = read_maxquant(p)
    assert m.sample_ids == ["s1", "s2", "s3", "s4", "s5", "s6"]
    assert m.protein_ids[:2] == ["P0000", "P0001"]
    assert m.protein_meta["gene"][3] == "GENE3"
    assert m.protein_meta["is_reverse"][0] and m.protein_meta["is_contaminant"][1]
    assert not m.protein_meta["is_reverse"][1]
    with np.errstate(divide="ignore"):
        expect = np.where(V > 0, np.log2(np.round(V, 1)), np.nan)
    np.testing.assert_allclose(m.X, expect, rtol=0, atol=1e-12, equal_nan=True)
    assert m.notes and "skipped 1" in m.notes[0]


def test_read_diann_and_wide(tmp_path):
    rng, _ = test_rng()
    V = rng.lognormal(18, 1, (5, 3))
    V[0, 1] = np.nan
    df = pd.DataFrame(V, columns=[r"D:\runs\A.raw", "/data/B.mzML", "C.d"])
    df.insert(0, "Genes", [f"G{i}" for i in range(5)])
    df.insert(0, "Protein.Ids", [f"X{i}" for i in range(5)])
    df.insert(0, "Protein.Group", [f"X{i}" for i in range(5)])
    p = tmp_path / "report.pg_matrix.tsv"
    df.to_csv(p, sep="\t", index=False)
    m = read_diann(p)
    assert m.sample_ids == ["A", "B", "C"]
    np.testing.assert_allclose(m.X, np.log2(V), equal_nan=True)
    assert m.protein_meta["gene"] == [f"G{i}" for i in range(5)]
    # wide, already log2 (max < 100) and linear (auto log2)
    W = pd.DataFrame({"id": ["a", "b"], "symbol": ["GA", "GB"], "x1": [20.0, 21.0], "x2": [19.5, np.nan]})
    pw = tmp_path / "w.csv"
    W.to_csv(pw, index=False)
    m = read_wide_table(pw)
    assert m.protein_meta["gene"] == ["GA", "GB"] and m.sample_ids == ["x1", "x2"]
    np.testing.assert_array_equal(m.X, W[["x1", "x2"]].to_numpy())
    W[["x1", "x2"]] = 2.0 ** W[["x1", "x2"]]
    W.to_csv(pw, index=False)
    np.testing.assert_allclose(read_wide_table(pw).X, [[20.0, 19.5], [21.0, np.nan]], equal_nan=True)


@pytest.mark.parametrize("ext", ["csv", "tsv", "xlsx"])
def test_load_roles_and_metadata_formats(tmp_path, ext):
    rng, _ = test_rng()
    samples = ["s1", "s2", "s3", "s4", "s5", "s6"]
    p, _ = _mq(tmp_path, rng, samples=samples)
    mp = _meta(tmp_path, samples[::-1] + ["unused"], ["ctrl", "ctrl", "ctrl", "dis", "dis", "dis", "dis"], f"meta.{ext}")
    ds = load(p, mp)
    assert ds.sample_ids == samples  # matrix order; the metadata row absent from the matrix is dropped
    assert ds.column("condition").values.tolist() == ["dis", "dis", "dis", "ctrl", "ctrl", "ctrl"]
    roles = {k: c.role for k, c in ds.sample_meta.items()}
    assert roles == {"condition": "group", "age": "covariate", "batch": "batch"}
    prof = ds.profile()
    assert prof.contrasts == [("condition", "dis", "ctrl")]
    assert prof.batch_column == "batch" and prof.numeric_covariates == ["age"]
    ds2 = load(p, mp, roles={"batch": "other", "age": "other"})
    assert ds2.profile().batch_column is None and ds2.profile().numeric_covariates == []


def test_survival_roles(tmp_path):
    W = pd.DataFrame({"id": ["a", "b", "c"], **{f"s{i}": [20.0 + i, 21.0, 19.0] for i in range(8)}})
    W.to_csv(tmp_path / "w.tsv", sep="\t", index=False)
    meta = pd.DataFrame({"sample": [f"s{i}" for i in range(8)], "OS_months": np.arange(8) * 3.5 + 1,
                         "death": [1, 0] * 4, "patient": [f"p{i}" for i in range(8)]})
    meta.to_csv(tmp_path / "m.csv", index=False)
    ds = load(tmp_path / "w.tsv", tmp_path / "m.csv")
    prof = ds.profile()
    assert prof.survival == {"time": "OS_months", "event": "death"} and prof.n_events == 4
    assert ds.column("patient").role == "id"


def test_ignore_marked_columns_are_not_analysed(tmp_path):
    W = pd.DataFrame({"id": ["a", "b", "c"], **{f"s{i}": [20.0 + i, 21.0, 19.0] for i in range(8)}})
    W.to_csv(tmp_path / "w.tsv", sep="\t", index=False)
    meta = pd.DataFrame({"sample": [f"s{i}" for i in range(8)], "_IGNORE_site": ["x", "y"] * 4,
                         "_ignore_BMI": np.arange(8) * 1.5 + 20, "disease": ["a"] * 4 + ["b"] * 4,
                         "BMI": np.arange(8) * 1.1 + 18})
    meta.to_csv(tmp_path / "m.csv", index=False)
    ds = load(tmp_path / "w.tsv", tmp_path / "m.csv")
    assert ds.column("_IGNORE_site").role == "other" and ds.column("_ignore_BMI").role == "other"
    prof = ds.profile()
    assert prof.numeric_covariates == ["BMI"] and ds.column("disease").role == "group"
    assert load(tmp_path / "w.tsv", tmp_path / "m.csv", roles={"_ignore_BMI": "covariate"}).profile() \
        .numeric_covariates == ["_ignore_BMI", "BMI"]


def test_malformed_inputs_name_file_row_column(tmp_path):
    rng, _ = test_rng()
    samples = ["s1", "s2", "s3", "s4", "s5", "s6"]
    p, _ = _mq(tmp_path, rng, samples=samples)
    # samples missing from the metadata
    mp = _meta(tmp_path, samples[:4], ["a", "a", "b", "b"])
    with pytest.raises(DataError, match=r"meta\.csv: 2 sample\(s\) of .*proteinGroups\.txt missing .*'s5', 's6'"):
        load(p, mp)
    # duplicate sample ids in the metadata
    bad = tmp_path / "dup.csv"
    pd.DataFrame({"sample": ["s1", "s2", "s1"], "g": [1, 2, 3]}).to_csv(bad, index=False)
    with pytest.raises(DataError, match=r"dup\.csv: duplicate sample id \(column 'sample'\) 's1' \(lines 2 and 4\)"):
        read_metadata(bad)
    # no sample column
    nos = tmp_path / "nos.csv"
    pd.DataFrame({"name": ["s1"]}).to_csv(nos, index=False)
    with pytest.raises(DataError, match=r"nos\.csv: no 'sample' column"):
        read_metadata(nos)
    # duplicate protein ids and a non-numeric cell in a wide table
    w = tmp_path / "w.tsv"
    w.write_text("id\tx1\tx2\na\t1\t2\nb\t3\t4\na\t5\t6\n")
    with pytest.raises(DataError, match=r"w\.tsv: duplicate protein id \(column 'id'\) 'a' \(lines 2 and 4\)"):
        read_wide_table(w)
    w.write_text("id\tx1\tx2\na\t1\t2\nb\t3\thigh\n")
    with pytest.raises(DataError, match=r"w\.tsv: non-numeric value 'high' in column 'x2', line 3"):
        read_wide_table(w)
    # empty group: a forced group column with a single non-empty level
    mp = _meta(tmp_path, samples, ["a"] * 6)
    with pytest.raises(DataError, match=r"group column 'condition' has 1 non-empty level"):
        load(p, mp, roles={"condition": "group"})
    with pytest.raises(DataError, match=r"roles name column\(s\) \['nope'\]"):
        load(p, _meta(tmp_path, samples, ["a", "a", "a", "b", "b", "b"]), roles={"nope": "group"})


def test_subset_fingerprint_profile(tmp_path):
    rng, _ = test_rng()
    samples = ["s1", "s2", "s3", "s4", "s5", "s6"]
    p, _ = _mq(tmp_path, rng, samples=samples)
    ds = load(p, _meta(tmp_path, samples, ["a", "a", "a", "b", "b", "b"]))
    fp = ds.fingerprint()
    assert fp == load(p, _meta(tmp_path, samples, ["a", "a", "a", "b", "b", "b"])).fingerprint()
    sub = ds.subset(proteins=["P0003", "P0005"], samples=[True, False, True, True, False, True], step="x")
    assert sub.X.shape == (2, 4) and sub.history[-1] == "x"
    np.testing.assert_array_equal(sub.X, ds.X[np.ix_([3, 5], [0, 2, 3, 5])])
    assert sub.column("condition").values.tolist() == ["a", "a", "b", "b"]
    X2 = ds.X.copy()
    X2[0, 0] = 1.0
    assert ds.with_X(X2, "edit").fingerprint() != fp
    import json

    json.dumps(ds.profile().model_dump())  # JSON-able


@pytest.mark.skipif(not Path(PLASMA).exists(), reason="shared plasma data not present")
def test_real_plasma_files():
    ds = load(f"{PLASMA}/proteinGroups.txt", f"{PLASMA}/metadata.xlsx")
    assert ds.n_samples == 48 and ds.n_proteins > 2000
    prof = ds.profile()
    assert prof.primary_group == "disease"
    lv = prof.column("disease").levels
    assert lv["healthy"] == 10 and lv["liver cirrhosis"] == 10
    assert ("disease", "liver cirrhosis", "healthy") in prof.contrasts
    assert sum(ds.protein_meta["is_contaminant"]) == 81
    assert "IGFALS" in ds.genes
