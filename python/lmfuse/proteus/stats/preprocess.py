"""Preprocessing of log2 protein x sample matrices: flag and valid-value filters, log2,
median / quantile normalisation, imputation (MinProb down-shift, KNN)."""

from __future__ import annotations

from typing import Sequence

import numpy as np


def log2_transform(V) -> np.ndarray:
    """log2 of linear intensities; zeros and negatives become NaN."""
    V = np.asarray(V, dtype=np.float64)
    with np.errstate(divide="ignore", invalid="ignore"):
        out = np.log2(V)
    out[~(V > 0)] = np.nan
    return out


def valid_value_mask(X, min_fraction: float = 0.7, groups: Sequence | None = None, mode: str = "any") -> np.ndarray:
    """Rows to keep: observed in at least ``min_fraction`` of all samples (groups None), or of the
    samples of any group (mode 'any') / every group (mode 'all'). Returns bool [n_proteins]."""
    if not 0 <= min_fraction <= 1:
        raise ValueError(f"min_fraction must be in [0, 1], got {min_fraction}")
    obs = ~np.isnan(np.asarray(X, dtype=np.float64))
    if groups is None:
        return obs.mean(1) >= min_fraction - 1e-12
    g = np.asarray(groups, dtype=object)
    lv = [l for l in dict.fromkeys(g) if l is not None]
    per = np.stack([obs[:, g == l].mean(1) >= min_fraction - 1e-12 for l in lv], 1)
    if mode == "any":
        return per.any(1)
    if mode == "all":
        return per.all(1)
    raise ValueError(f"mode must be 'any' or 'all', got {mode!r}")


def median_normalize(X) -> np.ndarray:
    """Subtract each sample's median (over observed values) and add back the mean of the medians."""
    X = np.asarray(X, dtype=np.float64)
    med = np.nanmedian(X, axis=0)
    return X - med[None, :] + np.nanmean(med)


def quantile_normalize(X) -> np.ndarray:
    """Quantile normalisation: every sample gets the same distribution (the mean of the sorted
    columns). Missing values stay missing; a column with m observed values is mapped onto the
    reference quantiles interpolated at its m plotting positions."""
    X = np.asarray(X, dtype=np.float64)
    P, n = X.shape
    obs = ~np.isnan(X)
    grid = np.linspace(0, 1, P)
    cols = []
    for j in range(n):
        v = np.sort(X[obs[:, j], j])
        cols.append(np.interp(grid, np.linspace(0, 1, v.size), v) if v.size > 1 else np.full(P, v[0] if v.size else np.nan))
    ref = np.nanmean(np.stack(cols, 1), 1)
    out = np.full_like(X, np.nan)
    for j in range(n):
        idx = np.flatnonzero(obs[:, j])
        m = idx.size
        if m == 0:
            continue
        # average ranks for ties
        from scipy.stats import rankdata

        r = rankdata(X[idx, j])
        pos = (r - 1) / max(m - 1, 1)
        out[idx, j] = np.interp(pos, grid, ref)
    return out


def impute_minprob(X, *, downshift: float = 1.8, width: float = 0.3, seed: int = 0) -> np.ndarray:
    """Left-censored (MNAR) imputation: missing values of sample j are drawn from
    N(mean_j − downshift·sd_j, (width·sd_j)²), mean/sd over the sample's observed values."""
    X = np.asarray(X, dtype=np.float64).copy()
    rng = np.random.default_rng(seed)
    for j in range(X.shape[1]):
        miss = np.isnan(X[:, j])
        if not miss.any():
            continue
        v = X[~miss, j]
        if v.size < 2:
            raise ValueError(f"sample column {j} has fewer than 2 observed values; cannot impute")
        mu, sd = v.mean(), v.std(ddof=1)
        X[miss, j] = rng.normal(mu - downshift * sd, width * sd, miss.sum())
    return X


def impute_knn(X, k: int = 5) -> np.ndarray:
    """KNN imputation over proteins: a missing X[i, j] is the mean of X[., j] over the k proteins
    nearest to protein i among those that observe sample j. Distance: Euclidean over the samples
    both observe, scaled by sqrt(n_samples / n_common) (the 'nan-Euclidean' distance). Rows with no
    usable neighbour get their own row mean; an all-missing row stays missing."""
    X = np.asarray(X, dtype=np.float64)
    out = X.copy()
    P, n = X.shape
    obs = ~np.isnan(X)
    Z = np.where(obs, X, 0.0)
    rows = np.flatnonzero((~obs).any(1))
    for i in rows:
        common = obs[i][None, :] & obs
        nc = common.sum(1)
        diff2 = ((Z[i][None, :] - Z) ** 2 * common).sum(1)
        with np.errstate(divide="ignore", invalid="ignore"):
            d = np.sqrt(n / nc * diff2)
        d[nc == 0] = np.inf
        d[i] = np.inf
        for j in np.flatnonzero(~obs[i]):
            donors = np.flatnonzero(obs[:, j] & np.isfinite(d))
            if donors.size == 0:
                out[i, j] = np.nanmean(X[i]) if obs[i].any() else np.nan
                continue
            sel = donors[np.argsort(d[donors], kind="stable")[:k]]
            out[i, j] = X[sel, j].mean()
    return out
