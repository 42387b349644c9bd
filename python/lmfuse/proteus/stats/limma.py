"""limma-style linear models with empirical-Bayes moderated statistics (Smyth 2004).

Per protein: ordinary least squares on the observed samples with a design matrix; the residual
variances s² (df d) are shrunk towards a prior s0² with prior df d0 estimated by moments of
log s² (``fit_f_dist``); the moderated t for a contrast c is

    t = c'b / sqrt(s²_post · c'(D'D)⁻¹c),  s²_post = (d0·s0² + d·s²) / (d0 + d),  df = d + d0,

and the moderated F for several contrasts uses the same posterior variance. Written from the
published formulas.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
from scipy import special, stats


def trigamma_inverse(x) -> np.ndarray:
    """y with trigamma(y) = x (x > 0), by Newton's method on 1/trigamma."""
    x = np.atleast_1d(np.asarray(x, dtype=np.float64))
    y = np.empty_like(x)
    big, small = x > 1e7, x < 1e-6
    mid = ~(big | small)
    y[big] = 1.0 / np.sqrt(x[big])
    y[small] = 1.0 / x[small]
    ym = 0.5 + 1.0 / x[mid]
    for _ in range(50):
        tri = special.polygamma(1, ym)
        dif = tri * (1.0 - tri / x[mid]) / special.polygamma(2, ym)
        ym = ym + dif
        if np.all(-dif / ym < 1e-8):
            break
    y[mid] = ym
    return y


def fit_f_dist(s2, df) -> tuple[float, float]:
    """Prior (s0², d0) of a scaled inverse-χ² for variances ``s2`` with residual df ``df``
    (moments of log s²). Returns d0 = inf when the observed spread is no more than sampling."""
    s2 = np.asarray(s2, dtype=np.float64)
    df = np.broadcast_to(np.asarray(df, dtype=np.float64), s2.shape)
    ok = np.isfinite(s2) & (s2 > 0) & (df > 0)
    s2, df = s2[ok], df[ok]
    if s2.size < 2:
        return (float(np.exp(np.mean(np.log(s2)))) if s2.size else float("nan")), float("inf")
    z = np.log(s2)
    e = z - special.digamma(df / 2) + np.log(df / 2)
    emean = e.mean()
    evar = np.sum((e - emean) ** 2) / (e.size - 1) - np.mean(special.polygamma(1, df / 2))
    if evar > 0:
        d0 = 2.0 * float(trigamma_inverse(evar)[0])
        s0sq = float(np.exp(emean + special.digamma(d0 / 2) - np.log(d0 / 2)))
    else:
        d0, s0sq = float("inf"), float(np.exp(emean))
    return s0sq, d0


@dataclass
class LinearFit:
    """Per-protein OLS fit.

    coef: [n_proteins, n_coef]; cov_unscaled: [n_proteins, n_coef, n_coef] ((D'D)⁻¹ on each
    protein's observed samples); s2: [n_proteins] residual variance; df: [n_proteins] residual df;
    design: [n_samples, n_coef]; names: coefficient names."""

    coef: np.ndarray
    cov_unscaled: np.ndarray
    s2: np.ndarray
    df: np.ndarray
    design: np.ndarray
    names: list[str]


def lm_fit(Y, design, names=None) -> LinearFit:
    """OLS of every row of ``Y`` [n_proteins, n_samples] (NaN = missing: the row is fitted on its
    observed samples) on ``design`` [n_samples, n_coef]. Rows with fewer observations than
    coefficients + 1 get NaN."""
    Y = np.asarray(Y, dtype=np.float64)
    D = np.asarray(design, dtype=np.float64)
    if Y.ndim != 2 or D.ndim != 2 or D.shape[0] != Y.shape[1]:
        raise ValueError(f"design must be [n_samples={Y.shape[1]}, n_coef], got {D.shape}")
    P, k = Y.shape[0], D.shape[1]
    coef = np.full((P, k), np.nan)
    cov = np.full((P, k, k), np.nan)
    s2 = np.full(P, np.nan)
    df = np.zeros(P)
    obs = ~np.isnan(Y)
    patterns, inv = np.unique(obs, axis=0, return_inverse=True)
    inv = np.asarray(inv).ravel()
    for pi, pat in enumerate(patterns):
        rows = np.flatnonzero(inv == pi)
        Dp = D[pat]
        rank = np.linalg.matrix_rank(Dp) if Dp.shape[0] else 0
        d = int(pat.sum()) - rank
        if rank < k or d < 1:
            continue
        XtX_inv = np.linalg.inv(Dp.T @ Dp)
        Yp = Y[np.ix_(rows, np.flatnonzero(pat))]
        B = Yp @ Dp @ XtX_inv  # [r, k]
        R = Yp - B @ Dp.T
        coef[rows] = B
        cov[rows] = XtX_inv
        s2[rows] = np.sum(R * R, axis=1) / d
        df[rows] = d
    return LinearFit(coef, cov, s2, df, D, list(names) if names is not None else [f"b{i}" for i in range(k)])


@dataclass
class ModeratedResult:
    """Moderated statistics for one contrast (arrays of length n_proteins)."""

    estimate: np.ndarray
    se: np.ndarray
    t: np.ndarray
    p: np.ndarray
    df_total: np.ndarray
    s2_post: np.ndarray
    s0sq: float
    d0: float


def squeeze_var(s2, df, s0sq, d0) -> np.ndarray:
    """Posterior variances (d0·s0² + d·s²)/(d0 + d); s0² when d0 = inf; s² when d0 = 0."""
    s2 = np.asarray(s2, dtype=np.float64)
    if np.isinf(d0):
        return np.where(np.isfinite(s2), s0sq, np.nan)
    return (d0 * s0sq + df * s2) / (d0 + df)


def moderated_t(fit: LinearFit, contrast, *, prior: str | tuple[float, float] = "ebayes") -> ModeratedResult:
    """Moderated t for ``contrast`` (vector of length n_coef).

    prior: "ebayes" (estimate s0², d0 from all proteins), "none" (ordinary t, d0 = 0) or an
    explicit ``(s0sq, d0)``."""
    c = np.asarray(contrast, dtype=np.float64)
    if c.shape != (fit.coef.shape[1],):
        raise ValueError(f"contrast must have length {fit.coef.shape[1]} (one per coefficient), got shape {c.shape}")
    if prior == "ebayes":
        s0sq, d0 = fit_f_dist(fit.s2, fit.df)
    elif prior == "none":
        s0sq, d0 = 0.0, 0.0
    else:
        s0sq, d0 = float(prior[0]), float(prior[1])
    est = fit.coef @ c
    su = np.sqrt(np.einsum("i,pij,j->p", c, fit.cov_unscaled, c))
    post = squeeze_var(fit.s2, fit.df, s0sq, d0)
    se = np.sqrt(post) * su
    t = est / se
    df_pooled = np.nansum(fit.df)
    dft = np.minimum(fit.df + d0, df_pooled)
    if np.isinf(d0):
        p = 2 * stats.norm.sf(np.abs(t)) if df_pooled == np.inf else 2 * stats.t.sf(np.abs(t), dft)
    else:
        p = 2 * stats.t.sf(np.abs(t), dft)
    p = np.where(fit.df > 0, p, np.nan)
    return ModeratedResult(est, se, t, p, dft, post, s0sq, d0)


def moderated_f(fit: LinearFit, contrasts, *, prior: str | tuple[float, float] = "ebayes"):
    """Moderated F over the columns of ``contrasts`` [n_coef, r]. Returns (F, p, df1, df2)."""
    C = np.asarray(contrasts, dtype=np.float64)
    if C.ndim == 1:
        C = C[:, None]
    if prior == "ebayes":
        s0sq, d0 = fit_f_dist(fit.s2, fit.df)
    elif prior == "none":
        s0sq, d0 = 0.0, 0.0
    else:
        s0sq, d0 = float(prior[0]), float(prior[1])
    post = squeeze_var(fit.s2, fit.df, s0sq, d0)
    est = fit.coef @ C  # [P, r]
    V = np.einsum("ai,pab,bj->pij", C, fit.cov_unscaled, C)
    r = C.shape[1]
    F = np.full(fit.coef.shape[0], np.nan)
    ok = fit.df > 0
    sol = np.linalg.solve(V[ok], est[ok][..., None])[..., 0]
    F[ok] = np.einsum("pi,pi->p", est[ok], sol) / (r * post[ok])
    df2 = np.minimum(fit.df + d0, np.nansum(fit.df))
    p = np.where(ok, stats.f.sf(F, r, np.where(np.isinf(df2), 1e12, df2)), np.nan)
    return F, p, r, df2
