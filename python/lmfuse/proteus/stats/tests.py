"""Two-sample tests per protein: Welch's t and the Wilcoxon–Mann–Whitney rank test."""

from __future__ import annotations

import numpy as np
from scipy import stats


def welch(A, B):
    """Welch's t-test per row. A [n_proteins, n_a], B [n_proteins, n_b], NaN ignored.

    Returns (t, p, diff) with diff = mean(A) − mean(B); NaN where a side has < 2 values."""
    A, B = np.asarray(A, dtype=np.float64), np.asarray(B, dtype=np.float64)
    na, nb = np.sum(~np.isnan(A), 1), np.sum(~np.isnan(B), 1)
    import warnings

    with np.errstate(invalid="ignore", divide="ignore"), warnings.catch_warnings():
        warnings.simplefilter("ignore", RuntimeWarning)
        ma, mb = np.nanmean(A, 1) if A.size else np.nan, np.nanmean(B, 1) if B.size else np.nan
        va = np.nansum((A - ma[:, None]) ** 2, 1) / (na - 1)
        vb = np.nansum((B - mb[:, None]) ** 2, 1) / (nb - 1)
        sa, sb = va / na, vb / nb
        t = (ma - mb) / np.sqrt(sa + sb)
        dof = (sa + sb) ** 2 / (sa ** 2 / (na - 1) + sb ** 2 / (nb - 1))
        p = 2 * stats.t.sf(np.abs(t), dof)
    bad = (na < 2) | (nb < 2)
    t[bad], p[bad] = np.nan, np.nan
    return t, p, ma - mb


def mann_whitney(A, B):
    """Two-sided Wilcoxon–Mann–Whitney test per row (normal approximation with tie correction and
    continuity correction). Returns (U of A, p, diff of medians)."""
    A, B = np.asarray(A, dtype=np.float64), np.asarray(B, dtype=np.float64)
    P = A.shape[0]
    U, p, d = np.full(P, np.nan), np.full(P, np.nan), np.full(P, np.nan)
    for i in range(P):
        a, b = A[i][~np.isnan(A[i])], B[i][~np.isnan(B[i])]
        n1, n2 = a.size, b.size
        if n1 < 1 or n2 < 1:
            continue
        r = stats.rankdata(np.concatenate([a, b]))
        u1 = r[:n1].sum() - n1 * (n1 + 1) / 2
        n = n1 + n2
        _, cnt = np.unique(r, return_counts=True)
        tie = np.sum(cnt ** 3 - cnt)
        sd = np.sqrt(n1 * n2 / 12 * ((n + 1) - tie / (n * (n - 1))))
        mu = n1 * n2 / 2
        if sd == 0:
            continue
        z = (abs(u1 - mu) - 0.5) / sd
        U[i], p[i] = u1, min(1.0, 2 * stats.norm.sf(z))
        d[i] = np.median(a) - np.median(b)
    return U, p, d
