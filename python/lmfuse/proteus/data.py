"""Proteomics data model and readers.

A :class:`ProteomicsDataset` holds one protein x sample quantity matrix on the log2 scale (NaN =
missing), per-protein annotations (gene symbol, contaminant flags, ...) and per-sample metadata
columns, each with a *role* (group, batch, time, event, covariate, id, subject, other) and a *kind*
(categorical, numeric, binary). :meth:`ProteomicsDataset.profile` summarises it as a JSON-able
:class:`DataProfile` that drives planning and the narrowing of tool argument schemas.

Readers: :func:`read_maxquant` (``proteinGroups.txt``), :func:`read_diann` (``*.pg_matrix.tsv``),
:func:`read_wide_table` (TSV/CSV: id column, optional gene column, one column per sample),
:func:`read_metadata` (CSV/TSV/XLSX with a ``sample`` column) and :func:`load`, which reads both,
matches samples and infers roles (see :func:`infer_roles` for the rules).
"""

from __future__ import annotations

import hashlib
import json
import re
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import Literal, Mapping, Sequence

import numpy as np
import pandas as pd
from pydantic import BaseModel, Field

ROLES = ("group", "batch", "time", "event", "covariate", "id", "subject", "other")
KINDS = ("categorical", "numeric", "binary")
Role = Literal["group", "batch", "time", "event", "covariate", "id", "subject", "other"]
Kind = Literal["categorical", "numeric", "binary"]

# A categorical column is a group candidate when it has 2..MAX_GROUP_LEVELS levels of which at
# least two have MIN_GROUP_SIZE samples.
MIN_GROUP_SIZE = 3
MAX_GROUP_LEVELS = 8

_TIME_RE = re.compile(r"(^|[^a-z])(time|survival|os|pfs|dfs|rfs|months?|days?|follow[ _-]?up|futime|duration)($|[^a-z])", re.I)
_EVENT_RE = re.compile(r"(^|[^a-z])(event|status|death|dead|died|censor\w*|relapse|recurrence|fustat|vital)($|[^a-z])", re.I)
_BATCH_RE = re.compile(r"(^|[^a-z])(batch|plate|run|lane|instrument|center|centre|site|tmt[ _]?plex|lot)($|[^a-z])", re.I)
_SUBJECT_RE = re.compile(r"(^|[^a-z])(subject|patient|donor|individual|participant)($|[^a-z])", re.I)
_GROUP_PREF_RE = re.compile(r"(group|condition|disease|diagnosis|status|treatment|type|class|phenotype|arm|cohort)", re.I)


class DataError(ValueError):
    """Malformed input data; the message names the file, row or column."""


# --------------------------------------------------------------------------------------------
# data model
# --------------------------------------------------------------------------------------------


@dataclass(frozen=True)
class Column:
    """One sample-metadata column.

    ``values``: numpy array of length n_samples: object dtype (str or None for missing) for
    categorical/binary columns, float64 (NaN missing) for numeric ones.
    """

    name: str
    values: np.ndarray
    role: Role = "other"
    kind: Kind = "categorical"

    def levels(self) -> dict[str, int]:
        """Level -> sample count (categorical/binary columns; missing values excluded), in sorted order."""
        if self.kind == "numeric":
            return {}
        vals = [v for v in self.values if v is not None]
        out: dict[str, int] = {}
        for v in sorted(set(vals)):
            out[v] = sum(1 for x in vals if x == v)
        return out

    def numeric(self) -> np.ndarray:
        """float64 view (NaN missing); binary columns map their two sorted levels to 0/1."""
        if self.kind == "numeric":
            return np.asarray(self.values, dtype=np.float64)
        lv = list(self.levels())
        if self.kind == "binary" and len(lv) == 2:
            return np.array([np.nan if v is None else float(lv.index(v)) for v in self.values])
        raise TypeError(f"column {self.name!r} is categorical with levels {lv}; it has no numeric view")


class ColumnProfile(BaseModel):
    name: str
    role: str
    kind: str
    n_missing: int
    levels: dict[str, int] = Field(default_factory=dict)
    min: float | None = None
    max: float | None = None


class DataProfile(BaseModel):
    """JSON-able summary of a data set (what planning and schema narrowing need)."""

    name: str
    kind: str
    n_proteins: int
    n_samples: int
    missing_fraction: float
    gene_coverage: float  # fraction of proteins with a gene symbol
    columns: list[ColumnProfile]
    group_columns: list[str]  # categorical columns with >=2 levels of >=3 samples
    primary_group: str | None
    contrasts: list[tuple[str, str, str]]  # (column, case, control) candidates
    numeric_covariates: list[str]
    categorical_covariates: list[str]
    batch_column: str | None
    survival: dict[str, str] | None  # {"time": col, "event": col}
    n_events: int | None
    history: list[str]

    def column(self, name: str) -> ColumnProfile:
        for c in self.columns:
            if c.name == name:
                return c
        raise KeyError(name)

    def levels_of(self, name: str) -> list[str]:
        return list(self.column(name).levels)


@dataclass
class ProteomicsDataset:
    """Protein x sample log2 quantities with annotations.

    X: float64 [n_proteins, n_samples], log2 scale, NaN = missing.
    protein_ids: unique ids (length n_proteins). protein_meta: name -> list (length n_proteins),
    e.g. ``gene``, ``description``, ``is_contaminant``, ``is_reverse``, ``only_by_site``.
    sample_ids: unique ids (length n_samples). sample_meta: column name -> :class:`Column`.
    history: provenance: the steps that produced this view, oldest first.
    """

    X: np.ndarray
    protein_ids: list[str]
    protein_meta: dict[str, list]
    sample_ids: list[str]
    sample_meta: dict[str, Column]
    scale: Literal["log2", "linear"] = "log2"
    kind: str = "bulk_ms"
    name: str = ""
    history: list[str] = field(default_factory=list)

    def __post_init__(self):
        self.X = np.asarray(self.X, dtype=np.float64)
        if self.X.ndim != 2:
            raise ValueError(f"X must be 2-D [n_proteins, n_samples], got shape {self.X.shape}")
        p, n = self.X.shape
        self.protein_ids = [str(x) for x in self.protein_ids]
        self.sample_ids = [str(x) for x in self.sample_ids]
        if len(self.protein_ids) != p:
            raise ValueError(f"protein_ids has {len(self.protein_ids)} entries for {p} rows of X")
        if len(self.sample_ids) != n:
            raise ValueError(f"sample_ids has {len(self.sample_ids)} entries for {n} columns of X")
        _check_unique(self.protein_ids, "protein id", where=self.name or "dataset")
        _check_unique(self.sample_ids, "sample id", where=self.name or "dataset")
        for k, v in self.protein_meta.items():
            if len(v) != p:
                raise ValueError(f"protein_meta[{k!r}] has {len(v)} entries for {p} proteins")
        for k, c in self.sample_meta.items():
            if len(c.values) != n:
                raise ValueError(f"sample_meta[{k!r}] has {len(c.values)} values for {n} samples")

    # --- shape and views -----------------------------------------------------------------
    @property
    def n_proteins(self) -> int:
        return self.X.shape[0]

    @property
    def n_samples(self) -> int:
        return self.X.shape[1]

    @property
    def genes(self) -> list[str]:
        """Gene symbol per protein ('' when unknown)."""
        g = self.protein_meta.get("gene")
        return [str(x) if x not in (None, "") and not (isinstance(x, float) and np.isnan(x)) else "" for x in g] if g else [""] * self.n_proteins

    def _index(self, sel, ids: list[str], what: str) -> np.ndarray:
        if sel is None:
            return np.arange(len(ids))
        arr = np.asarray(sel)
        if arr.dtype == bool:
            if arr.shape != (len(ids),):
                raise ValueError(f"boolean {what} mask has shape {arr.shape}, expected ({len(ids)},)")
            return np.flatnonzero(arr)
        if arr.dtype.kind in "iu":
            return arr.astype(np.int64)
        pos = {s: i for i, s in enumerate(ids)}
        missing = [str(s) for s in arr if str(s) not in pos]
        if missing:
            raise KeyError(f"unknown {what} ids: {missing[:5]}")
        return np.array([pos[str(s)] for s in arr], dtype=np.int64)

    def subset(self, proteins=None, samples=None, *, step: str | None = None) -> "ProteomicsDataset":
        """A view restricted to ``proteins`` / ``samples`` (ids, integer positions or boolean masks)."""
        pi = self._index(proteins, self.protein_ids, "protein")
        si = self._index(samples, self.sample_ids, "sample")
        return ProteomicsDataset(
            X=self.X[np.ix_(pi, si)],
            protein_ids=[self.protein_ids[i] for i in pi],
            protein_meta={k: [v[i] for i in pi] for k, v in self.protein_meta.items()},
            sample_ids=[self.sample_ids[i] for i in si],
            sample_meta={k: replace(c, values=c.values[si]) for k, c in self.sample_meta.items()},
            scale=self.scale, kind=self.kind, name=self.name,
            history=self.history + ([step] if step else []),
        )

    def with_X(self, X: np.ndarray, step: str) -> "ProteomicsDataset":
        """Same proteins and samples, new matrix (e.g. normalised); ``step`` is appended to history."""
        X = np.asarray(X, dtype=np.float64)
        if X.shape != self.X.shape:
            raise ValueError(f"new X has shape {X.shape}, expected {self.X.shape}")
        return replace(self, X=X, history=self.history + [step])

    def with_roles(self, roles: Mapping[str, str]) -> "ProteomicsDataset":
        """Override column roles: ``{column: role}``."""
        meta = dict(self.sample_meta)
        for col, role in roles.items():
            if col not in meta:
                raise KeyError(f"roles names column {col!r}, not in the sample metadata {list(meta)}")
            if role not in ROLES:
                raise ValueError(f"roles[{col!r}] = {role!r} is not one of {ROLES}")
            meta[col] = replace(meta[col], role=role)
        _check_role_columns(meta, self.name or "dataset")
        return replace(self, sample_meta=meta)

    def column(self, name: str) -> Column:
        if name not in self.sample_meta:
            raise KeyError(f"no sample-metadata column {name!r}; columns: {list(self.sample_meta)}")
        return self.sample_meta[name]

    def columns_with_role(self, role: str) -> list[str]:
        return [k for k, c in self.sample_meta.items() if c.role == role]

    def to_frame(self) -> pd.DataFrame:
        """The matrix as a DataFrame (rows = protein ids, columns = sample ids)."""
        return pd.DataFrame(self.X, index=self.protein_ids, columns=self.sample_ids)

    def meta_frame(self) -> pd.DataFrame:
        return pd.DataFrame({k: c.values for k, c in self.sample_meta.items()}, index=self.sample_ids)

    # --- identity and profile ---------------------------------------------------------------
    def fingerprint(self) -> str:
        """sha256 (hex) over the matrix, ids, protein annotations and sample metadata."""
        h = hashlib.sha256()
        X = np.where(np.isnan(self.X), np.nan, self.X)  # one NaN bit pattern
        h.update(np.ascontiguousarray(X).tobytes())
        h.update(json.dumps([self.protein_ids, self.sample_ids, self.scale, self.kind]).encode())
        for k in sorted(self.protein_meta):
            h.update(k.encode())
            h.update(json.dumps([_jsonable(v) for v in self.protein_meta[k]]).encode())
        for k in sorted(self.sample_meta):
            c = self.sample_meta[k]
            h.update(json.dumps([k, c.role, c.kind, [_jsonable(v) for v in c.values]]).encode())
        return h.hexdigest()

    def profile(self) -> DataProfile:
        cols = []
        group_cols = []
        for k, c in self.sample_meta.items():
            if c.kind == "numeric":
                v = c.numeric()
                ok = v[~np.isnan(v)]
                cols.append(ColumnProfile(name=k, role=c.role, kind=c.kind, n_missing=int(np.isnan(v).sum()),
                                          min=float(ok.min()) if ok.size else None, max=float(ok.max()) if ok.size else None))
            else:
                lv = c.levels()
                cols.append(ColumnProfile(name=k, role=c.role, kind=c.kind, levels=lv,
                                          n_missing=int(sum(v is None for v in c.values))))
                if c.role in ("group", "batch", "other", "covariate") and is_group_candidate(c):
                    group_cols.append(k)
        groups = [k for k in group_cols if self.sample_meta[k].role == "group"]
        groups += [k for k in group_cols if k not in groups]
        primary = next((k for k in groups if self.sample_meta[k].role == "group"), None)
        contrasts = []
        for k in groups:
            if self.sample_meta[k].role != "group":
                continue
            lv = [l for l, n in self.sample_meta[k].levels().items() if n >= MIN_GROUP_SIZE]
            ctrl = _control_level(lv)
            for case in lv:
                if case != ctrl:
                    contrasts.append((k, case, ctrl))
        num = [k for k, c in self.sample_meta.items() if c.role == "covariate" and c.kind == "numeric"]
        catcov = [k for k, c in self.sample_meta.items()
                  if c.kind != "numeric" and c.role in ("group", "batch", "covariate") and len(c.levels()) >= 2]
        batch = next(iter(self.columns_with_role("batch")), None)
        t, e = self.columns_with_role("time"), self.columns_with_role("event")
        surv = {"time": t[0], "event": e[0]} if t and e else None
        n_events = None
        if surv:
            ev = _event_values(self.sample_meta[e[0]])
            n_events = int(np.nansum(ev))
        genes = self.genes
        return DataProfile(
            name=self.name, kind=self.kind, n_proteins=self.n_proteins, n_samples=self.n_samples,
            missing_fraction=float(np.isnan(self.X).mean()) if self.X.size else 0.0,
            gene_coverage=float(np.mean([g != "" for g in genes])) if genes else 0.0,
            columns=cols, group_columns=groups, primary_group=primary, contrasts=contrasts,
            numeric_covariates=num, categorical_covariates=catcov, batch_column=batch,
            survival=surv, n_events=n_events, history=list(self.history),
        )


def _control_level(levels: Sequence[str]) -> str:
    """The reference level of a contrast: a 'control'-like name when present, else the first."""
    for pat in (r"^(healthy|control|ctrl|normal|wt|wild[ -]?type|baseline|untreated|placebo|vehicle|reference|ref|none|no)$",
                r"(healthy|control|normal)"):
        for l in levels:
            if re.search(pat, l, re.I):
                return l
    return levels[0] if levels else ""


def _event_values(c: Column) -> np.ndarray:
    if c.kind == "numeric":
        return c.numeric()
    lv = c.levels()
    pos = {"1", "yes", "true", "dead", "deceased", "event", "died", "relapse", "progressed"}
    return np.array([np.nan if v is None else float(str(v).lower() in pos) for v in c.values])


def event_indicator(c: Column) -> np.ndarray:
    """A survival event column as float 0/1 (NaN missing)."""
    return _event_values(c)


def is_group_candidate(c: Column) -> bool:
    if c.kind == "numeric":
        return False
    lv = c.levels()
    return 2 <= len(lv) <= MAX_GROUP_LEVELS and sum(n >= MIN_GROUP_SIZE for n in lv.values()) >= 2


# --------------------------------------------------------------------------------------------
# helpers
# --------------------------------------------------------------------------------------------


def _jsonable(v):
    if v is None:
        return None
    if isinstance(v, (np.floating, float)):
        return None if np.isnan(v) else float(v)
    if isinstance(v, (np.integer,)):
        return int(v)
    if isinstance(v, (np.bool_, bool)):
        return bool(v)
    return str(v)


def _check_unique(ids: Sequence[str], what: str, where: str, rows: Sequence[int] | None = None):
    seen: dict[str, int] = {}
    for i, s in enumerate(ids):
        if s in seen:
            r0, r1 = (rows[seen[s]], rows[i]) if rows is not None else (seen[s], i)
            short = s if len(s) <= 60 else s[:57] + "..."
            if rows is None:
                raise DataError(f"{where}: duplicate {what} {short!r} (positions {r0 + 1} and {r1 + 1})")
            raise DataError(f"{where}: duplicate {what} {short!r} (lines {r0} and {r1})")
        seen[s] = i


def _read_table(path: Path) -> pd.DataFrame:
    path = Path(path)
    if not path.exists():
        raise FileNotFoundError(f"{path}: no such file")
    suf = "".join(path.suffixes[-2:]).lower()
    try:
        if path.suffix.lower() in (".xlsx", ".xlsm", ".xls"):
            # formulas are read as their cached values, never evaluated
            import warnings

            with warnings.catch_warnings():
                warnings.simplefilter("ignore")
                return pd.read_excel(path)
        sep = "," if path.suffix.lower() == ".csv" or suf.endswith(".csv.gz") else "\t"
        return pd.read_csv(path, sep=sep, low_memory=False)
    except (pd.errors.ParserError, UnicodeDecodeError, ValueError) as e:
        raise DataError(f"{path}: cannot be parsed as a table ({type(e).__name__}: {e})") from e


def _numeric_block(df: pd.DataFrame, cols: Sequence[str], path, rows: Sequence[int] | None = None) -> np.ndarray:
    """Columns ``cols`` as float64; a non-numeric cell raises naming the file, column and row.

    Row numbers are 1-based file lines (header = line 1)."""
    out = np.empty((len(df), len(cols)), dtype=np.float64)
    for j, c in enumerate(cols):
        s = df[c]
        if s.dtype.kind in "fiub":
            out[:, j] = s.to_numpy(dtype=np.float64)
            continue
        num = pd.to_numeric(s, errors="coerce")
        bad = num.isna() & s.notna() & (s.astype(str).str.strip().str.lower().isin(["", "nan", "na", "n/a", "null", "none"]) == False)  # noqa: E712
        if bad.any():
            i = int(np.flatnonzero(bad.to_numpy())[0])
            line = rows[i] if rows is not None else i + 2
            raise DataError(f"{path}: non-numeric value {s.iloc[i]!r} in column {c!r}, line {line}")
        out[:, j] = num.to_numpy(dtype=np.float64)
    return out


def _to_log2(V: np.ndarray, zero_is_missing: bool = True) -> np.ndarray:
    V = V.astype(np.float64, copy=True)
    if zero_is_missing:
        V[V == 0] = np.nan
    if np.nanmin(V, initial=np.inf) < 0:
        raise DataError("intensities must be non-negative on the linear scale")
    with np.errstate(divide="ignore"):
        return np.log2(V)


def _flag(s: pd.Series | None, n: int) -> list[bool]:
    if s is None:
        return [False] * n
    return [isinstance(v, str) and v.strip() == "+" for v in s]


def _first_token(s: str) -> str:
    return str(s).split(";")[0].strip() if isinstance(s, str) else ""


# --------------------------------------------------------------------------------------------
# readers
# --------------------------------------------------------------------------------------------


@dataclass
class Matrix:
    """What a matrix reader returns before metadata is attached.

    X: float64 [n_proteins, n_samples] log2 (NaN missing)."""

    X: np.ndarray
    protein_ids: list[str]
    protein_meta: dict[str, list]
    sample_ids: list[str]
    source: str
    notes: list[str] = field(default_factory=list)


def _read_maxquant_lines(path: Path, needed: Sequence[str]) -> tuple[pd.DataFrame, list[int], int]:
    """Tab-split a proteinGroups file. Rows with fewer fields than the last needed column are
    skipped (MaxQuant exports can hold broken lines); shorter trailing flag fields are padded."""
    with open(path, "r", encoding="utf-8", errors="replace") as f:
        text = f.read()
    lines = text.split("\n")
    header = lines[0].rstrip("\r").split("\t")
    pos = {h: i for i, h in enumerate(header)}
    last = max(pos[c] for c in needed)
    rows, line_no, skipped = [], [], 0
    for i, line in enumerate(lines[1:], start=2):
        line = line.rstrip("\r")
        if not line.strip():
            continue
        f = line.split("\t")
        if len(f) <= last:
            skipped += 1
            continue
        rows.append(f[: len(header)] + [""] * (len(header) - len(f)))
        line_no.append(i)
    df = pd.DataFrame(rows, columns=header)
    df = df.mask(df == "")
    return df, line_no, skipped


def read_maxquant(path, *, quantity: str = "LFQ intensity") -> Matrix:
    """Read a MaxQuant ``proteinGroups.txt``.

    quantity: prefix of the sample columns (``"LFQ intensity"``, ``"Intensity"``, ``"iBAQ"``).
    Zeros become NaN; values are log2-transformed. Protein ids are the first accession of
    ``Protein IDs`` (the full group when two rows share a first accession); ``gene`` is the first
    of ``Gene names``. Flags ``is_contaminant``, ``is_reverse``, ``only_by_site`` are kept (filter
    them with the ``filter_proteins`` tool). Lines too short to hold every sample column are
    skipped and counted in ``Matrix.notes``.
    """
    path = Path(path)
    if not path.exists():
        raise FileNotFoundError(f"{path}: no such file")
    with open(path, "r", encoding="utf-8", errors="replace") as f:
        header = f.readline().rstrip("\r\n").split("\t")
    if "Protein IDs" not in header:
        raise DataError(f"{path}: not a MaxQuant proteinGroups table (no 'Protein IDs' column)")
    pref = quantity.rstrip() + " "
    scols = [c for c in header if c.startswith(pref)]
    if not scols:
        raise DataError(f"{path}: no sample columns starting with {pref!r}")
    df, lines, skipped = _read_maxquant_lines(path, ["Protein IDs"] + scols)
    ok = df["Protein IDs"].notna().to_numpy()
    df = df.loc[ok].reset_index(drop=True)
    lines = [l for l, k in zip(lines, ok) if k]
    V = _numeric_block(df, scols, path, rows=lines)
    V[np.isnan(V)] = 0.0
    X = _to_log2(V)
    full = [str(x) for x in df["Protein IDs"]]
    first = [_first_token(x) for x in full]
    counts = pd.Series(first).value_counts()
    ids = [f if counts[f] == 1 else g for f, g in zip(first, full)]
    _check_unique(ids, "protein id ('Protein IDs')", str(path), rows=lines)
    n = len(df)
    meta = {
        "gene": [_first_token(g) for g in df.get("Gene names", pd.Series([""] * n))],
        "protein_group": full,
        "description": [_first_token(g) for g in df.get("Protein names", pd.Series([""] * n))],
        "is_contaminant": _flag(df.get("Potential contaminant"), n),
        "is_reverse": _flag(df.get("Reverse"), n),
        "only_by_site": _flag(df.get("Only identified by site"), n),
    }
    samples = [c[len(pref):].strip() for c in scols]
    _check_unique(samples, "sample column", str(path))
    notes = [f"skipped {skipped} line(s) too short to hold the sample columns"] if skipped else []
    return Matrix(X=X, protein_ids=ids, protein_meta=meta, sample_ids=samples, source=str(path), notes=notes)


_DIANN_ANNOT = ("Protein.Group", "Protein.Ids", "Protein.Names", "Genes", "First.Protein.Description",
                "N.Sequences", "N.Proteotypic.Sequences")
_RUN_EXT = re.compile(r"\.(raw|d|mzml|wiff|wiff2|dia|mzxml)$", re.I)


def read_diann(path) -> Matrix:
    """Read a DIA-NN protein-group matrix (``report.pg_matrix.tsv``).

    Annotation columns are ``Protein.Group``, ``Protein.Ids``, ``Protein.Names``, ``Genes``,
    ``First.Protein.Description``; every other column is a run. A run's sample id is its file
    name without directory and extension. Values are linear (NaN missing) and get log2."""
    path = Path(path)
    df = _read_table(path)
    if "Protein.Group" not in df.columns:
        raise DataError(f"{path}: not a DIA-NN pg_matrix (no 'Protein.Group' column)")
    runs = [c for c in df.columns if c not in _DIANN_ANNOT]
    if not runs:
        raise DataError(f"{path}: no run columns")
    V = _numeric_block(df, runs, path)
    X = _to_log2(V)
    ids = [str(x) for x in df["Protein.Group"]]
    _check_unique(ids, "protein id ('Protein.Group')", str(path), rows=list(range(2, len(ids) + 2)))
    samples = [_RUN_EXT.sub("", re.split(r"[\\/]", str(c))[-1]) for c in runs]
    _check_unique(samples, "run (sample) column", str(path))
    n = len(df)
    meta = {"gene": [_first_token(g) for g in df.get("Genes", pd.Series([""] * n))],
            "description": [_first_token(g) for g in df.get("First.Protein.Description", pd.Series([""] * n))]}
    return Matrix(X=X, protein_ids=ids, protein_meta=meta, sample_ids=samples, source=str(path))


_GENE_COL = re.compile(r"^(gene|genes|gene[ _.]?names?|gene[ _.]?symbols?|symbol)$", re.I)


def read_wide_table(path, *, id_column: str | None = None, gene_column: str | None = None,
                    log2: bool | None = None) -> Matrix:
    """Read a wide TSV/CSV: one protein id column (``id_column``, default the first), an optional
    gene column (``gene_column``, default a column named gene/genes/gene_names/symbol), and one
    numeric column per sample.

    log2: True = values are linear and get log2; False = already log2; None = decide from the
    data (linear when the largest value exceeds 100). Zeros are missing on the linear scale."""
    path = Path(path)
    df = _read_table(path)
    if df.shape[1] < 2:
        raise DataError(f"{path}: needs an id column and at least one sample column")
    idc = id_column or str(df.columns[0])
    if idc not in df.columns:
        raise DataError(f"{path}: id column {idc!r} not found; columns: {list(df.columns)[:10]}")
    gc = gene_column
    if gc is None:
        gc = next((c for c in df.columns if c != idc and _GENE_COL.match(str(c))), None)
    elif gc not in df.columns:
        raise DataError(f"{path}: gene column {gc!r} not found")
    scols = [c for c in df.columns if c not in (idc, gc)]
    V = _numeric_block(df, scols, path)
    if log2 is None:
        log2 = bool(np.nanmax(V, initial=0.0) > 100)
    X = _to_log2(V) if log2 else V
    ids = [str(x) for x in df[idc]]
    if df[idc].isna().any():
        i = int(np.flatnonzero(df[idc].isna().to_numpy())[0])
        raise DataError(f"{path}: empty protein id in column {idc!r}, line {i + 2}")
    _check_unique(ids, f"protein id (column {idc!r})", str(path), rows=list(range(2, len(ids) + 2)))
    samples = [str(c) for c in scols]
    meta = {"gene": [_first_token(g) if isinstance(g, str) else "" for g in df[gc]]} if gc else {}
    return Matrix(X=X, protein_ids=ids, protein_meta=meta, sample_ids=samples, source=str(path))


def read_metadata(path, *, sample_column: str = "sample") -> pd.DataFrame:
    """Read sample metadata (CSV/TSV/XLSX) with one row per sample and a ``sample`` column
    (matched case-insensitively). Returns a DataFrame indexed by sample id (str)."""
    path = Path(path)
    df = _read_table(path)
    col = next((c for c in df.columns if str(c).strip().lower() == sample_column.lower()), None)
    if col is None:
        raise DataError(f"{path}: no {sample_column!r} column; columns: {list(df.columns)[:10]}")
    if df[col].isna().any():
        i = int(np.flatnonzero(df[col].isna().to_numpy())[0])
        raise DataError(f"{path}: empty sample id in column {col!r}, line {i + 2}")
    ids = [str(x).strip() for x in df[col]]
    _check_unique(ids, f"sample id (column {col!r})", str(path), rows=list(range(2, len(ids) + 2)))
    df = df.drop(columns=[col])
    df.index = pd.Index(ids, name="sample")
    return df


# --------------------------------------------------------------------------------------------
# roles
# --------------------------------------------------------------------------------------------


def _to_column(name: str, s: pd.Series) -> Column:
    """Kind inference: numeric when every non-missing value parses as a number and there are more
    than two distinct values; binary when exactly two distinct values; else categorical."""
    vals = s.to_numpy(dtype=object)
    miss = np.array([v is None or (isinstance(v, float) and np.isnan(v)) or (isinstance(v, str) and v.strip() == "") for v in vals])
    num = pd.to_numeric(pd.Series(vals), errors="coerce").to_numpy(dtype=np.float64)
    present = ~miss
    is_num = present.any() and not np.isnan(num[present]).any()
    distinct = {(_norm_level(v)) for v in vals[present]}
    if is_num and len(distinct) > 2:
        return Column(name, np.where(present, num, np.nan).astype(np.float64), "other", "numeric")
    out = np.array([None if m else _norm_level(v) for v, m in zip(vals, miss)], dtype=object)
    return Column(name, out, "other", "binary" if len(distinct) == 2 else "categorical")


def _norm_level(v) -> str:
    if isinstance(v, (float, np.floating)) and float(v).is_integer():
        return str(int(v))
    return str(v).strip()


def infer_roles(columns: Mapping[str, Column]) -> dict[str, str]:
    """Role per column, by these rules (first match wins, per column):

    0. ``other``: a name starting with ``_IGNORE_`` (any case), the marker some metadata exports
       (e.g. Clinical Knowledge Graph / AlphaPeptStats tables) put on columns not meant for
       analysis; override with :meth:`ProteomicsDataset.with_roles` to use one.
    1. ``id``: categorical with a distinct value per sample, or a name matching subject/patient/donor
       (then ``subject`` when values repeat).
    2. ``time``: numeric, name matches time/survival/OS/PFS/months/days/follow-up, and an
       ``event`` column exists too (else it is a covariate).
    3. ``event``: binary (0/1, yes/no, dead/alive, ...), name matches event/status/death/censor/
       relapse/vital, and a ``time`` column exists.
    4. ``batch``: categorical/binary, name matches batch/plate/run/lane/instrument/center/site.
    5. ``group``: categorical/binary with 2..8 levels of which >= 2 have >= 3 samples.
    6. ``covariate``: numeric (more than two distinct values).
    7. ``other``: anything else (e.g. a single level).
    """
    roles: dict[str, str] = {}
    n = len(next(iter(columns.values())).values) if columns else 0
    times = [k for k, c in columns.items() if c.kind == "numeric" and _TIME_RE.search(k)]
    events = [k for k, c in columns.items() if c.kind == "binary" and _EVENT_RE.search(k)]
    for k, c in columns.items():
        distinct = len({v for v in c.values if v is not None}) if c.kind != "numeric" else 0
        if k.upper().startswith("_IGNORE_"):
            roles[k] = "other"
        elif _SUBJECT_RE.search(k) and c.kind != "numeric":
            roles[k] = "id" if distinct == n else "subject"
        elif c.kind != "numeric" and distinct == n and n > MAX_GROUP_LEVELS:
            roles[k] = "id"
        elif k in times and events:
            roles[k] = "time"
        elif k in events and times:
            roles[k] = "event"
        elif c.kind != "numeric" and _BATCH_RE.search(k) and distinct >= 2:
            roles[k] = "batch"
        elif is_group_candidate(c):
            roles[k] = "group"
        elif c.kind == "numeric":
            v = c.numeric()
            roles[k] = "id" if (_SUBJECT_RE.search(k) or re.search(r"(^|[^a-z])id($|[^a-z])", k, re.I)) and len(np.unique(v[~np.isnan(v)])) == n else "covariate"
        else:
            roles[k] = "other"
    return roles


def _check_role_columns(meta: Mapping[str, Column], where: str):
    for k, c in meta.items():
        if c.role == "group":
            if c.kind == "numeric":
                raise DataError(f"{where}: column {k!r} is numeric and cannot be a group column")
            lv = c.levels()
            if len(lv) < 2:
                raise DataError(f"{where}: group column {k!r} has {len(lv)} non-empty level(s) {list(lv)}; a group needs >= 2")
        if c.role == "time" and c.kind != "numeric":
            raise DataError(f"{where}: survival time column {k!r} is not numeric")
        if c.role == "event" and c.kind == "categorical":
            raise DataError(f"{where}: event column {k!r} must be binary (two levels), has {list(c.levels())}")


# --------------------------------------------------------------------------------------------
# load
# --------------------------------------------------------------------------------------------


def detect_format(path) -> str:
    """'maxquant' | 'diann' | 'wide' from the header line."""
    path = Path(path)
    with open(path, "r", encoding="utf-8", errors="replace") as f:
        head = f.readline()
    if "Protein IDs" in head and ("LFQ intensity" in head or "Intensity" in head or "iBAQ" in head):
        return "maxquant"
    if "Protein.Group" in head:
        return "diann"
    return "wide"


def from_frames(matrix: Matrix, meta: pd.DataFrame | None, *, roles: Mapping[str, str] | None = None,
                name: str = "", meta_source: str = "metadata") -> ProteomicsDataset:
    """Attach metadata (DataFrame indexed by sample id) to a :class:`Matrix` and infer roles.

    Every matrix sample must be in the metadata (else :class:`DataError` naming the missing
    samples); metadata rows for samples absent from the matrix are dropped."""
    if meta is None:
        meta = pd.DataFrame(index=pd.Index(matrix.sample_ids, name="sample"))
    idx = [str(s) for s in meta.index]
    missing = [s for s in matrix.sample_ids if s not in set(idx)]
    if missing:
        raise DataError(f"{meta_source}: {len(missing)} sample(s) of {matrix.source} missing from the metadata "
                        f"'sample' column: {missing[:8]}")
    meta = meta.copy()
    meta.index = idx
    meta = meta.loc[matrix.sample_ids]
    cols = {str(k): _to_column(str(k), meta[k]) for k in meta.columns}
    inferred = infer_roles(cols)
    cols = {k: replace(c, role=inferred[k]) for k, c in cols.items()}
    ds = ProteomicsDataset(X=matrix.X, protein_ids=matrix.protein_ids, protein_meta=matrix.protein_meta,
                           sample_ids=matrix.sample_ids, sample_meta=cols, name=name,
                           history=[f"read:{Path(matrix.source).name}"] + [f"note:{n}" for n in matrix.notes])
    if roles:
        unknown = [k for k in roles if k not in cols]
        if unknown:
            raise DataError(f"{meta_source}: roles name column(s) {unknown} not in the metadata columns {list(cols)[:12]}")
        ds = ds.with_roles(roles)
    else:
        _check_role_columns(ds.sample_meta, meta_source)
    return ds


def load(data, meta=None, roles: Mapping[str, str] | None = None, *, format: str = "auto",
         quantity: str = "LFQ intensity", name: str | None = None) -> ProteomicsDataset:
    """Read a quantity matrix and its sample metadata into a :class:`ProteomicsDataset`.

    data: path of a MaxQuant ``proteinGroups.txt``, a DIA-NN ``pg_matrix.tsv`` or a wide TSV/CSV
    (``format`` = 'auto' | 'maxquant' | 'diann' | 'wide'). meta: CSV/TSV/XLSX path with a
    ``sample`` column, a DataFrame indexed by sample id, or None. roles: ``{column: role}``
    overrides of the inferred roles (see :func:`infer_roles`), e.g. ``{"disease": "group"}``.
    """
    fmt = detect_format(data) if format == "auto" else format
    if fmt == "maxquant":
        m = read_maxquant(data, quantity=quantity)
    elif fmt == "diann":
        m = read_diann(data)
    elif fmt == "wide":
        m = read_wide_table(data)
    else:
        raise ValueError(f"format must be 'auto', 'maxquant', 'diann' or 'wide', got {format!r}")
    if meta is None or isinstance(meta, pd.DataFrame):
        md, src = meta, "metadata"
    else:
        md, src = read_metadata(meta), str(meta)
    return from_frames(m, md, roles=roles, name=name if name is not None else Path(data).stem, meta_source=src)
