"""Per-protein correlation with a clinical variable, and protein–protein correlation modules."""

from __future__ import annotations

import numpy as np
from scipy import stats
from scipy.cluster import hierarchy
from scipy.spatial.distance import squareform


def correlate_rows(X, y, method: str = "spearman"):
    """Correlation of each row of X [n_proteins, n_samples] with y [n_samples] over the samples
    where both are observed. Returns (r, p, n) arrays; p from the t distribution with n−2 df
    (exact for Pearson under normality; the usual large-sample approximation for Spearman)."""
    X = np.asarray(X, dtype=np.float64)
    y = np.asarray(y, dtype=np.float64)
    if method not in ("pearson", "spearman"):
        raise ValueError(f"method must be 'pearson' or 'spearman', got {method!r}")
    P = X.shape[0]
    r, p, nn = np.full(P, np.nan), np.full(P, np.nan), np.zeros(P, dtype=int)
    for i in range(P):
        ok = ~np.isnan(X[i]) & ~np.isnan(y)
        m = int(ok.sum())
        nn[i] = m
        if m < 4:
            continue
        a, b = X[i, ok], y[ok]
        if method == "spearman":
            a, b = stats.rankdata(a), stats.rankdata(b)
        a, b = a - a.mean(), b - b.mean()
        den = np.sqrt((a * a).sum() * (b * b).sum())
        if den == 0:
            continue
        ri = float(np.clip((a * b).sum() / den, -1, 1))
        r[i] = ri
        tt = ri * np.sqrt((m - 2) / max(1e-300, 1 - ri * ri))
        p[i] = 2 * stats.t.sf(abs(tt), m - 2)
    return r, p, nn


def coabundance_modules(X, *, min_size: int = 10, cut: float = 0.7, method: str = "spearman"):
    """Co-abundance modules: average-linkage clustering of proteins on 1 − |r| (r = Pearson or
    Spearman across samples of a complete matrix X [n_proteins, n_samples]) cut at height ``cut``;
    clusters smaller than ``min_size`` get module 0 (unassigned). Returns (modules [n_proteins],
    R [n_proteins, n_proteins])."""
    X = np.asarray(X, dtype=np.float64)
    if np.isnan(X).any():
        raise ValueError("coabundance_modules needs a complete matrix; impute first")
    Z = np.apply_along_axis(stats.rankdata, 1, X) if method == "spearman" else X
    R = np.corrcoef(Z)
    R = np.nan_to_num(R)
    D = 1 - np.abs(R)
    np.fill_diagonal(D, 0)
    L = hierarchy.linkage(squareform(np.clip(D, 0, None), checks=False), method="average")
    lab = hierarchy.fcluster(L, cut, criterion="distance")
    mods = np.zeros(len(lab), dtype=int)
    nxt = 1
    for l, cnt in sorted(zip(*np.unique(lab, return_counts=True)), key=lambda x: (-x[1], x[0])):
        if cnt >= min_size:
            mods[lab == l] = nxt
            nxt += 1
    return mods, R


def module_eigengene(Xm):
    """First principal component (sample scores) of standardised module rows Xm [m, n]; sign set so
    it correlates positively with the module mean. Returns (eigengene [n], variance explained)."""
    Z = (Xm - Xm.mean(1, keepdims=True)) / np.where(Xm.std(1, keepdims=True) > 0, Xm.std(1, keepdims=True), 1)
    w, V = np.linalg.eigh(Z.T @ Z)  # [n, n]; top eigenvector = sample scores of PC1
    eg = V[:, -1] * np.sqrt(max(w[-1], 0))
    if np.corrcoef(eg, Z.mean(0))[0, 1] < 0:
        eg = -eg
    return eg, float(max(w[-1], 0) / np.clip(w, 0, None).sum())


def correlation_global_permutation_p(X, y, method: str = "spearman", *, n_perm: int = 999, seed: int = 0,
                                     stop_after: int = 10) -> tuple[float, float]:
    """Permutation test of the global null "no row of ``X`` is correlated with ``y``".

    ``X`` [P, n] (NaN = missing), ``y`` [n] (NaN = missing; those samples are left out). The
    statistic is the largest |r| over rows, each row over its observed samples (Spearman: the
    row ranked over its observed samples and ``y`` over all samples where it is observed, which
    equals :func:`correlate_rows` on complete rows). Its null distribution comes from permuting
    ``y`` among the samples; rows stay together, so their correlation (shared factors) is kept and
    the test stays exact where a binomial count of small p-values over-rejects. Returns ``(p,
    observed max |r|)``, with the sequential stop of
    :func:`lmfuse.proteus.stats.survival.cox_global_permutation_p`."""
    X = np.asarray(X, dtype=np.float64)
    y = np.asarray(y, dtype=np.float64)
    if X.ndim != 2 or y.shape != (X.shape[1],):
        raise ValueError(f"X must be [P, n] and y [n], got {X.shape} and {y.shape}")
    if method not in ("pearson", "spearman"):
        raise ValueError(f"method must be 'pearson' or 'spearman', got {method!r}")
    if n_perm < 1 or stop_after < 1:
        raise ValueError(f"n_perm and stop_after must be >= 1, got {n_perm} and {stop_after}")
    keep = ~np.isnan(y)
    X, y = X[:, keep], y[keep]
    M = (~np.isnan(X)).astype(np.float64)
    if method == "spearman":
        y = stats.rankdata(y)
        X = np.where(M > 0, stats.rankdata(np.where(M > 0, X, np.inf), axis=1), 0.0)
    Xm = np.where(M > 0, X, 0.0)
    n_i = M.sum(1)
    sx = Xm.sum(1)
    vx = (Xm * Xm).sum(1) - sx * sx / np.maximum(n_i, 1)
    usable = (n_i >= 4) & (vx > 1e-12 * np.maximum(1.0, (Xm * Xm).sum(1)))

    def max_abs_r(Y):  # Y [n, b] -> [b]
        sxy, sy, syy = Xm @ Y, M @ Y, M @ (Y * Y)
        with np.errstate(invalid="ignore", divide="ignore"):
            cov = sxy - sx[:, None] * sy / np.maximum(n_i, 1)[:, None]
            vy = syy - sy * sy / np.maximum(n_i, 1)[:, None]
            r = np.abs(cov) / np.sqrt(vx[:, None] * vy)
        r = np.where(usable[:, None] & (vy > 1e-12), r, 0.0)
        return r.max(0, initial=0.0)

    obs = float(max_abs_r(y[:, None])[0])
    rng = np.random.default_rng(seed)
    chunk = int(max(1, min(256, 4_000_000 // max(1, X.shape[0] * 4))))
    exceed = done = 0
    while done < n_perm:
        b = min(chunk, n_perm - done)
        Y = np.stack([y[rng.permutation(y.size)] for _ in range(b)], 1)
        hits = np.flatnonzero(max_abs_r(Y) >= obs - 1e-12)
        if exceed + hits.size >= stop_after:
            return stop_after / (done + int(hits[stop_after - exceed - 1]) + 1), obs
        exceed += hits.size
        done += b
    return (1 + exceed) / (n_perm + 1), obs
