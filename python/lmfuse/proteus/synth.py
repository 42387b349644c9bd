"""Synthetic proteomics cohorts with planted truth, for evaluation and demos.

:func:`make_cohort` draws a log2 protein x sample matrix and plants, through separate channels so
that the truth is defined by what was injected:

* a case/control contrast: ``n_pathways_planted`` gene sets with ``pathway_fraction`` of their
  members shifted coherently (one direction per set) by ``lfc``, plus ``n_de_extra`` random
  differentially abundant proteins;
* ``n_subtypes`` hidden subtypes, each with a block of ``subtype_markers`` proteins raised by
  ``subtype_shift``;
* a survival signature: a per-sample risk z added (with a random sign) to ``n_survival`` proteins;
  event times are exponential with hazard ∝ exp(``survival_beta``·z), censored exponentially, and
  redrawn until group, batch and subtype show no survival difference (log-rank p > 0.3 each);
* a batch effect (``batch_sd`` per protein and batch; optionally confounded with the groups);
* abundance-dependent missingness (logistic in the log2 value, about ``missing_fraction``).

Per-protein variances follow a scaled inverse-χ² (``prior_df``, ``prior_sd``), the model the
moderated t assumes. :func:`make_null_cohort` keeps the noise and plants nothing.
"""

from __future__ import annotations

import json
from dataclasses import asdict, dataclass, field
from pathlib import Path

import numpy as np
import pandas as pd

from .data import Column, ProteomicsDataset
from .stats.enrich import write_gmt
from .stats.survival import logrank


@dataclass
class SynthSpec:
    """Parameters of a synthetic cohort (defaults: an easy, fast cohort)."""

    n_samples: int = 120
    n_proteins: int = 2000
    seed: int = 0
    # contrast
    lfc: float = 1.0
    n_pathways: int = 200
    pathway_size: tuple[int, int] = (15, 60)
    n_pathways_planted: int = 4
    pathway_fraction: float = 0.6
    n_de_extra: int = 20
    # subtypes
    n_subtypes: int = 3
    subtype_markers: int = 80
    subtype_shift: float = 2.0
    # survival
    n_survival: int = 8
    survival_effect: float = 1.0  # sd units of z added to signature proteins
    survival_beta: float = 1.5
    censoring: float = 0.3  # approximate censored fraction
    # nuisance
    batch_sd: float = 0.3
    n_batches: int = 2
    batch_confounded: bool = False
    missing_fraction: float = 0.15
    prior_df: float = 5.0
    prior_sd: float = 0.4
    n_latent: int = 2
    latent_sd: float = 0.1
    null: bool = False

    @classmethod
    def scale(cls, **kw) -> "SynthSpec":
        """The large benchmark cohort: 1,000 samples x 10,000 proteins."""
        base = dict(n_samples=1000, n_proteins=10000, n_pathways=500)
        base.update(kw)
        return cls(**base)


@dataclass
class SynthTruth:
    """What was planted.

    de: protein -> planted log2FC (case − control); contrast: (column, case, control);
    pathways: planted gene set -> 'up' | 'down'; subtypes: per-sample subtype label (str);
    subtype_markers: subtype -> protein ids; survival: protein -> +1 (higher = more risk) / −1;
    batch_column, group_column: metadata column names; null: True for a null cohort."""

    de: dict[str, float]
    contrast: tuple[str, str, str]
    pathways: dict[str, str]
    subtypes: list[str]
    subtype_markers: dict[str, list[str]]
    survival: dict[str, int]
    batch_column: str
    group_column: str
    null: bool
    spec: dict = field(default_factory=dict)

    def to_json(self) -> dict:
        return asdict(self)


@dataclass
class SynthCohort:
    dataset: ProteomicsDataset
    gene_sets: dict[str, list[str]]
    truth: SynthTruth

    def __iter__(self):  # dataset, gene_sets, truth = make_cohort(...)
        return iter((self.dataset, self.gene_sets, self.truth))

    def write(self, folder) -> dict[str, Path]:
        """Write data.tsv (wide, log2), meta.csv, gene_sets.gmt and truth.json into ``folder``."""
        d = Path(folder)
        d.mkdir(parents=True, exist_ok=True)
        ds = self.dataset
        df = pd.DataFrame(ds.X, columns=ds.sample_ids)
        df.insert(0, "gene", ds.genes)
        df.insert(0, "protein", ds.protein_ids)
        paths = {"data": d / "data.tsv", "meta": d / "meta.csv", "gene_sets": d / "gene_sets.gmt", "truth": d / "truth.json"}
        df.to_csv(paths["data"], sep="\t", index=False, float_format="%.6f")
        meta = ds.meta_frame()
        meta.insert(0, "sample", ds.sample_ids)
        meta.to_csv(paths["meta"], index=False)
        write_gmt(self.gene_sets, paths["gene_sets"])
        paths["truth"].write_text(json.dumps(self.truth.to_json(), indent=1))
        return paths


def _balanced(rng, group, k):
    """Labels 0..k-1 assigned in equal proportions within each group, shuffled within the group."""
    out = np.zeros(len(group), dtype=int)
    for g in sorted(set(group)):
        idx = np.flatnonzero(group == g)
        lab = np.arange(idx.size) % k
        rng.shuffle(lab)
        out[idx] = lab
    return out


def make_cohort(spec: SynthSpec | None = None, **overrides) -> SynthCohort:
    """Draw a cohort. ``make_cohort(seed=3, lfc=0.8)`` overrides fields of the default spec.

    Returns a :class:`SynthCohort` (unpacks as ``dataset, gene_sets, truth``). Metadata columns:
    ``group`` (control/case), ``batch`` (B1..), ``time``, ``event``, ``age`` (numeric, unrelated),
    ``sex`` (F/M, unrelated). Subtype labels are hidden (in the truth only)."""
    spec = spec or SynthSpec()
    if overrides:
        spec = SynthSpec(**{**asdict(spec), **overrides})
    s = spec
    if s.n_samples < 8 or s.n_proteins < 50:
        raise ValueError("n_samples must be >= 8 and n_proteins >= 50")
    rng = np.random.default_rng(s.seed)
    P, n = s.n_proteins, s.n_samples
    pid = [f"P{i:05d}" for i in range(P)]
    genes = [f"G{i:05d}" for i in range(P)]
    # gene sets
    lo, hi = s.pathway_size
    gene_sets = {}
    for k in range(s.n_pathways):
        size = int(rng.integers(lo, hi + 1))
        gene_sets[f"PATHWAY_{k:03d}"] = sorted(rng.choice(P, size=min(size, P), replace=False).tolist())
    # baseline
    mu = rng.normal(22.0, 2.0, P)
    var = s.prior_sd ** 2 * s.prior_df / rng.chisquare(s.prior_df, P)
    sd = np.sqrt(var)
    X = mu[:, None] + rng.standard_normal((P, n)) * sd[:, None]
    if s.n_latent:
        F = rng.standard_normal((s.n_latent, n))
        L = rng.normal(0, s.latent_sd, (P, s.n_latent))
        X += L @ F
    group = np.array(["control"] * (n // 2) + ["case"] * (n - n // 2), dtype=object)
    rng.shuffle(group)
    case = group == "case"
    if s.batch_confounded:
        batch = np.array(["B2" if c else "B1" for c in case], dtype=object)
    else:
        batch = np.array([f"B{1 + k}" for k in _balanced(rng, group, s.n_batches)], dtype=object)
    used = np.zeros(P, dtype=bool)
    de: dict[str, float] = {}
    pathways: dict[str, str] = {}
    subtypes = np.zeros(n, dtype=int)
    sub_markers: dict[str, list[str]] = {}
    surv_sign: dict[str, int] = {}
    if not s.null:
        # pathway-coherent shifts: planted sets are chosen among sets that share no members
        names = list(gene_sets)
        med = np.median([len(v) for v in gene_sets.values()])
        # planted sets come from the larger half, so enough members survive filtering
        order = [j for j in rng.permutation(len(names)) if len(gene_sets[names[j]]) >= med]
        for j in order:
            if len(pathways) >= s.n_pathways_planted:
                break
            mem = np.array(gene_sets[names[j]])
            if used[mem].any():
                continue
            direction = "up" if len(pathways) % 2 == 0 else "down"
            k = max(1, int(round(s.pathway_fraction * mem.size)))
            hit = rng.choice(mem, size=k, replace=False)
            sign = 1.0 if direction == "up" else -1.0
            X[np.ix_(hit, np.flatnonzero(case))] += sign * s.lfc
            for h in hit:
                de[pid[h]] = sign * s.lfc
            used[mem] = True
            pathways[names[j]] = direction
        free = np.flatnonzero(~used)
        extra = rng.choice(free, size=min(s.n_de_extra, free.size), replace=False)
        for h in extra:
            sign = rng.choice([-1.0, 1.0])
            X[h, case] += sign * s.lfc
            de[pid[h]] = sign * s.lfc
        used[extra] = True
        # keep the collection honest: an unplanted set holds at most 2 planted proteins (a random
        # set sharing many of them would be enriched for real, blurring the truth)
        de_idx = {int(i) for i in range(P) if pid[i] in de}
        non_de = np.array(sorted(set(range(P)) - de_idx))
        for name, mem in gene_sets.items():
            if name in pathways:
                continue
            inside = [m for m in mem if m in de_idx]
            if len(inside) > 2:
                keep = [m for m in mem if m not in de_idx] + inside[:2]
                pool = np.setdiff1d(non_de, keep)
                gene_sets[name] = sorted(keep + rng.choice(pool, size=len(inside) - 2, replace=False).tolist())
        # subtypes
        if s.n_subtypes >= 2:
            subtypes = _balanced(rng, group, s.n_subtypes)  # same subtype mix in both groups
            for k in range(s.n_subtypes):
                free = np.flatnonzero(~used)
                mk = rng.choice(free, size=min(s.subtype_markers, free.size), replace=False)
                used[mk] = True
                X[np.ix_(mk, np.flatnonzero(subtypes == k))] += s.subtype_shift
                sub_markers[f"S{k + 1}"] = [pid[i] for i in mk]
        # survival signature through a private risk variable z
        z = rng.standard_normal(n)
        # the risk is uncorrelated with group, batch and subtype by construction
        cells = np.array([f"{a}|{b}|{c}" for a, b, c in zip(group, batch, subtypes)])
        for cell in set(cells):
            z[cells == cell] -= z[cells == cell].mean()
        free = np.flatnonzero(~used)
        sv = rng.choice(free, size=min(s.n_survival, free.size), replace=False)
        used[sv] = True
        for i in sv:
            sg = int(rng.choice([-1, 1]))
            X[i] += sg * s.survival_effect * sd[i] * z * 2.0
            surv_sign[pid[i]] = sg
        hazard = 0.1 * np.exp(s.survival_beta * z)
    else:
        hazard = np.full(n, 0.1)
    # re-randomisation: event and censoring times are redrawn until group, batch and subtype show
    # no survival difference (log-rank p > 0.3 each), so that proteins carrying group, batch or
    # subtype effects are not survival-associated by chance
    cens_rate = s.censoring / max(1e-9, 1 - s.censoring) * np.median(hazard)
    factors = [f for f in (group, batch, np.array([str(v) for v in subtypes], dtype=object)) if len(set(f)) > 1]
    for _ in range(200):
        T = rng.exponential(1.0, n) / hazard
        C = rng.exponential(1.0 / cens_rate, n) if s.censoring > 0 else np.full(n, np.inf)
        ev = (T <= C).astype(float)
        if ev.sum() < 2 or all(logrank(np.minimum(T, C), ev, f)[1] > 0.3 for f in factors):
            break
    time = np.minimum(T, C)
    event = (T <= C).astype(float)
    # batch
    if s.batch_sd > 0 and s.n_batches > 1:
        for b in sorted(set(batch)):
            X[:, batch == b] += rng.normal(0, s.batch_sd, P)[:, None]
    # abundance-dependent missingness
    if s.missing_fraction > 0:
        scale = 1.0
        thr = np.quantile(X, s.missing_fraction)
        for _ in range(30):  # calibrate the logistic midpoint to the target fraction
            pm = 1 / (1 + np.exp((X - thr) / scale))
            f = pm.mean()
            if abs(f - s.missing_fraction) < 0.002:
                break
            thr += (s.missing_fraction - f) * 4
        X = np.where(rng.random(X.shape) < pm, np.nan, X)
    meta = {
        "group": Column("group", group, "group", "binary"),
        "batch": Column("batch", batch, "batch", "binary" if len(set(batch)) == 2 else "categorical"),
        "time": Column("time", np.round(time, 4), "time", "numeric"),
        "event": Column("event", np.array([str(int(e)) for e in event], dtype=object), "event", "binary"),
        "age": Column("age", np.round(rng.normal(60, 10, n), 1), "covariate", "numeric"),
        "sex": Column("sex", rng.choice(np.array(["F", "M"], dtype=object), n), "group", "binary"),
    }
    ds = ProteomicsDataset(X=X, protein_ids=pid, protein_meta={"gene": genes}, sample_ids=[f"S{i:04d}" for i in range(n)],
                           sample_meta=meta, name=f"synthetic{'-null' if s.null else ''}-seed{s.seed}",
                           history=[f"synth:seed={s.seed}"])
    sets = {k: [genes[i] for i in v] for k, v in gene_sets.items()}
    truth = SynthTruth(de=de, contrast=("group", "case", "control"), pathways=pathways,
                       subtypes=[f"S{k + 1}" for k in subtypes] if sub_markers else ["S1"] * n,
                       subtype_markers=sub_markers, survival=surv_sign, batch_column="batch", group_column="group",
                       null=s.null, spec=asdict(s))
    return SynthCohort(ds, sets, truth)


def make_null_cohort(spec: SynthSpec | None = None, **overrides) -> SynthCohort:
    """The same noise model with nothing planted (no contrast, subtypes, survival signature;
    times independent of the proteins)."""
    overrides["null"] = True
    return make_cohort(spec, **overrides)
