"""Survival analysis: Kaplan–Meier, log-rank (k groups), Cox proportional hazards (Efron ties),
Harrell's C-index. Written from the textbook formulas."""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
from scipy import stats


def _check(time, event):
    t = np.asarray(time, dtype=np.float64)
    e = np.asarray(event, dtype=np.float64)
    if t.shape != e.shape or t.ndim != 1:
        raise ValueError(f"time and event must be 1-D of equal length, got {t.shape} and {e.shape}")
    if np.isnan(t).any() or np.isnan(e).any():
        raise ValueError("time and event must not contain NaN; drop those samples first")
    if np.any(t < 0):
        raise ValueError("time must be non-negative")
    if not np.all(np.isin(e, (0, 1))):
        raise ValueError("event must be 0 (censored) or 1 (event)")
    return t, e.astype(bool)


def kaplan_meier(time, event):
    """Kaplan–Meier estimate. Returns (times, survival, n_at_risk, n_events) at the distinct
    observed times (sorted), survival being S(t) just after t."""
    t, e = _check(time, event)
    ut = np.unique(t)
    at_risk = np.array([(t >= u).sum() for u in ut])
    d = np.array([(e & (t == u)).sum() for u in ut])
    S = np.cumprod(1.0 - d / at_risk)
    return ut, S, at_risk, d


def median_survival(time, event) -> float:
    ut, S, _, _ = kaplan_meier(time, event)
    below = np.flatnonzero(S <= 0.5)
    return float(ut[below[0]]) if below.size else float("inf")


def logrank(time, event, groups):
    """Log-rank test of equal survival across the levels of ``groups``.

    Returns (chi2, p, df, observed [k], expected [k]) with levels in sorted order."""
    t, e = _check(time, event)
    g = np.asarray(groups)
    lv, gi = np.unique(g, return_inverse=True)
    k = lv.size
    if k < 2:
        raise ValueError("logrank needs at least two groups")
    ut = np.unique(t[e])
    O = np.zeros(k)
    E = np.zeros(k)
    V = np.zeros((k, k))
    for u in ut:
        risk = t >= u
        n = risk.sum()
        nj = np.bincount(gi[risk], minlength=k).astype(float)
        dev = e & (t == u)
        d = dev.sum()
        dj = np.bincount(gi[dev], minlength=k).astype(float)
        O += dj
        E += d * nj / n
        if n > 1:
            f = d * (n - d) / (n * n * (n - 1))
            V += f * (np.diag(nj * n) - np.outer(nj, nj))
    diff = (O - E)[:-1]
    chi2 = float(diff @ np.linalg.solve(V[:-1, :-1], diff))
    return chi2, float(stats.chi2.sf(chi2, k - 1)), k - 1, O, E


@dataclass
class CoxResult:
    """Cox PH fit for B independent models (B=1 for a single multivariable model).

    coef, se, z, p: [B, n_cov]; loglik: [B]; hazard ratio = exp(coef)."""

    coef: np.ndarray
    se: np.ndarray
    z: np.ndarray
    p: np.ndarray
    loglik: np.ndarray
    n_iter: int
    converged: np.ndarray

    @property
    def hazard_ratio(self):
        return np.exp(self.coef)


def cox_fit(X, time, event, *, max_iter: int = 50, tol: float = 1e-9, ridge: float = 0.0) -> CoxResult:
    """Cox PH by Newton–Raphson with Efron's tie handling, batched.

    X: [n, p] (one model) or [B, n, p] (B independent models on the same survival data, e.g. one
    protein each). time, event: [n]. ridge: optional L2 penalty (0 = none). Rows with NaN are not
    allowed (drop them first)."""
    t, e = _check(time, event)
    X = np.asarray(X, dtype=np.float64)
    single = X.ndim == 2
    if single:
        X = X[None]
    if X.ndim != 3 or X.shape[1] != t.size:
        raise ValueError(f"X must be [n={t.size}, p] or [B, n, p], got {np.shape(X)}")
    if np.isnan(X).any():
        raise ValueError("X contains NaN; drop or impute those samples first")
    B, n, p = X.shape
    order = np.argsort(-t, kind="mergesort")
    t, e, X = t[order], e[order], X[:, order, :]
    ut = np.unique(t[e])[::-1]  # decreasing
    last = np.searchsorted(-t, -ut, side="right") - 1  # last index with t >= u
    G = (e[None, :] & (t[None, :] == ut[:, None])).astype(np.float64)  # [g, n]
    dcount = G.sum(1)
    maxd = int(dcount.max()) if dcount.size else 0
    mean = X.mean(1, keepdims=True)
    Xc = X - mean  # centring improves conditioning; coefficients are unchanged

    def terms(beta):
        eta = np.einsum("bnp,bp->bn", Xc, beta)
        c = eta.max(1, keepdims=True)
        w = np.exp(eta - c)
        wx = w[..., None] * Xc
        wxx = wx[..., :, None] * Xc[..., None, :]
        R0 = np.cumsum(w, 1)[:, last]
        R1 = np.cumsum(wx, 1)[:, last]
        R2 = np.cumsum(wxx, 1)[:, last]
        D0 = w @ G.T
        D1 = np.einsum("gn,bnp->bgp", G, wx)
        D2 = np.einsum("gn,bnpq->bgpq", G, wxx)
        ll = (eta * e[None]).sum(1)
        grad = (Xc * e[None, :, None]).sum(1)
        H = np.zeros((B, p, p))
        for l in range(maxd):
            act = (l < dcount).astype(np.float64)
            phi = np.where(dcount > 0, l / np.maximum(dcount, 1), 0.0)
            s0 = R0 - phi * D0
            s1 = R1 - phi[None, :, None] * D1
            s2 = R2 - phi[None, :, None, None] * D2
            s0s = np.where(act > 0, s0, 1.0)
            ll -= ((np.log(s0s) + c) * act).sum(1)
            m1 = s1 / s0s[..., None]
            grad -= (m1 * act[None, :, None]).sum(1)
            H -= ((s2 / s0s[..., None, None] - m1[..., :, None] * m1[..., None, :]) * act[None, :, None, None]).sum(1)
        if ridge:
            ll -= 0.5 * ridge * (beta ** 2).sum(1)
            grad -= ridge * beta
            H -= ridge * np.eye(p)[None]
        return ll, grad, H

    beta = np.zeros((B, p))
    ll, grad, H = terms(beta)
    conv = np.zeros(B, dtype=bool)
    it = 0
    for it in range(1, max_iter + 1):
        step = np.linalg.solve(-H + 1e-12 * np.eye(p)[None], grad[..., None])[..., 0]
        step = np.where(conv[:, None], 0.0, step)
        new = beta + step
        nll, ng, nH = terms(new)
        # step halving where the likelihood fell
        for _ in range(20):
            worse = (nll < ll - 1e-12) & ~conv
            if not worse.any():
                break
            step = np.where(worse[:, None], step / 2, step)
            new = beta + step
            nll, ng, nH = terms(new)
        done = np.abs(nll - ll) < tol * (1 + np.abs(ll))
        beta, ll, grad, H = new, nll, ng, nH
        conv |= done & (np.abs(step).max(1) < 1e-6)
        if conv.all():
            break
    cov = np.linalg.inv(-H)
    se = np.sqrt(np.clip(np.einsum("bii->bi", cov), 0, None))
    z = beta / se
    pv = 2 * stats.norm.sf(np.abs(z))
    return CoxResult(beta, se, z, pv, ll, it, conv)


def concordance_index(time, score, event) -> float:
    """Harrell's C: fraction of comparable pairs where the higher risk ``score`` fails first
    (ties in score count 1/2). Comparable: the earlier time is an event, or both times are equal
    and only one of them is an event (the censored one is taken to outlive it)."""
    t, e = _check(time, event)
    s = np.asarray(score, dtype=np.float64)
    num = den = 0.0
    for i in np.flatnonzero(e):
        later = (t > t[i]) | ((t == t[i]) & ~e)
        den += later.sum()
        num += (s[i] > s[later]).sum() + 0.5 * (s[i] == s[later]).sum()
    return float(num / den) if den else float("nan")


def ph_test(x, time, event, beta: float):
    """Proportional-hazards check for one covariate of a fitted Cox model (coefficient ``beta``):
    the correlation of the Schoenfeld residuals (x of the failing sample minus the risk-weighted
    mean of x in its risk set) with the rank of the event time, tested with the Pearson t test.
    Returns (rho, p); a small p means the effect drifts over time."""
    t, e = _check(time, event)
    x = np.asarray(x, dtype=np.float64)
    w = np.exp(beta * (x - x.mean()))
    ti, res = [], []
    for i in np.flatnonzero(e):
        risk = t >= t[i]
        res.append(x[i] - np.sum(w[risk] * x[risk]) / np.sum(w[risk]))
        ti.append(t[i])
    if len(res) < 4:
        return float("nan"), float("nan")
    rk = stats.rankdata(ti)
    r, p = stats.pearsonr(rk, res)
    return float(r), float(p)


def _score_chi2(Xs: np.ndarray, Ms: np.ndarray, ev: np.ndarray, first: np.ndarray) -> np.ndarray:
    """Cox score statistic at beta = 0 (Breslow ties), U^2 / I, for every row of ``Xs`` [..., P, n]
    whose columns are in increasing-time order; ``Ms`` marks observed values (0 where missing),
    ``ev`` the events [n] and ``first`` the first column of each column's tie group. A row with no
    information (I = 0) gives 0."""
    Xm = Xs * Ms
    S0 = np.flip(np.cumsum(np.flip(Ms, -1), -1), -1)[..., first]
    S1 = np.flip(np.cumsum(np.flip(Xm, -1), -1), -1)[..., first]
    S2 = np.flip(np.cumsum(np.flip(Xm * Xs, -1), -1), -1)[..., first]
    with np.errstate(invalid="ignore", divide="ignore"):
        mean = np.where(S0 > 0, S1 / S0, 0.0)
        var = np.where(S0 > 0, S2 / S0 - mean * mean, 0.0)
    w = Ms * ev  # an event contributes where the protein is observed
    U = ((Xs - mean) * w).sum(-1)
    info = (np.clip(var, 0.0, None) * w).sum(-1)
    return np.where(info > 1e-12, U * U / np.where(info > 1e-12, info, 1.0), 0.0)


def _time_order(t: np.ndarray, e: np.ndarray):
    order = np.argsort(t, kind="stable")
    ts = t[order]
    return order, e[order].astype(np.float64), np.searchsorted(ts, ts, side="left")


def _centred(X) -> tuple[np.ndarray, np.ndarray]:
    X = np.asarray(X, dtype=np.float64)
    M = (~np.isnan(X)).astype(np.float64)
    mu = np.nansum(X, -1, keepdims=True) / np.maximum(M.sum(-1, keepdims=True), 1)
    return np.where(M > 0, X - mu, 0.0), M  # centred: better conditioned sums; the statistic is shift-free


def cox_score_test(X, time, event) -> tuple[np.ndarray, np.ndarray]:
    """Per-row Cox score test of beta = 0 (Breslow ties): ``(chi2 [P], p [P])`` for ``X`` [P, n]
    (NaN = missing: a row's test uses its observed samples only). chi2 = U(0)^2 / I(0), 1 df; a
    row without information gives chi2 = 0, p = 1."""
    t, e = _check(time, event)
    X = np.atleast_2d(np.asarray(X, dtype=np.float64))
    if X.shape[-1] != t.size:
        raise ValueError(f"X must be [P, n] with n = {t.size} samples, got {X.shape}")
    order, ev, first = _time_order(t, e)
    Xc, M = _centred(X)
    chi2 = _score_chi2(Xc[:, order], M[:, order], ev, first)
    return chi2, stats.chi2.sf(chi2, 1)


def logrank_scores(time, event) -> np.ndarray:
    """Log-rank scores (null martingale residuals) ``e_j − Λ(t_j)`` [n], ``Λ`` the Nelson–Aalen
    cumulative hazard (ties: all samples with time t_j at risk at t_j). For a covariate x with
    no missing values, Σ_j x_j·score_j is the Cox score U(0) with Breslow ties."""
    t, e = _check(time, event)
    ut, inv = np.unique(t, return_inverse=True)
    d = np.bincount(inv, weights=e.astype(np.float64), minlength=ut.size)
    at_risk = np.cumsum(np.bincount(inv, minlength=ut.size)[::-1])[::-1]
    return e.astype(np.float64) - np.cumsum(d / at_risk)[inv]


def cox_global_permutation_p(X, time, event, *, n_perm: int = 999, seed: int = 0,
                             stop_after: int = 10) -> tuple[float, float]:
    """Permutation test of the global null "no row of ``X`` is associated with survival".

    ``X`` [P, n] (NaN = missing), ``time``, ``event`` [n]. The statistic is the largest |Pearson r|
    between a row (over its observed samples) and the samples' log-rank scores
    (:func:`logrank_scores`); for a complete row, r² is proportional to the row's Cox score
    statistic with the permutation variance. Its null distribution comes from permuting the
    samples' (time, event) pairs, i.e. their scores, against the columns of ``X``; rows stay
    together, so their correlation through shared factors (batch, latent biology) is kept. (A count
    of small per-row p-values against a binomial assumes independent rows and over-rejects.) The
    permutations are matrix products, ``O(P·n)`` each; see
    :func:`lmfuse.proteus.stats.correlation.correlation_global_permutation_p` for the p-value and
    the sequential stop. Returns ``(p, observed max |r|)``."""
    from .correlation import correlation_global_permutation_p

    t, e = _check(time, event)
    X = np.asarray(X, dtype=np.float64)
    if X.ndim != 2 or X.shape[1] != t.size:
        raise ValueError(f"X must be [P, n] with n = {t.size} samples, got {X.shape}")
    return correlation_global_permutation_p(X, logrank_scores(t, e), "pearson", n_perm=n_perm, seed=seed,
                                            stop_after=stop_after)
