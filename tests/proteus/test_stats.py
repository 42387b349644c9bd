"""Statistics core against established implementations (statsmodels, scipy, scikit-learn,
lifelines, gseapy) and closed forms."""

import numpy as np
import pytest
from scipy import stats

from lmfuse.proteus import stats as S

from . import test_rng


def test_bh_matches_statsmodels():
    from statsmodels.stats.multitest import multipletests

    rng, _ = test_rng()
    p = np.concatenate([rng.uniform(0, 1, 300), rng.uniform(0, 1e-3, 20)])
    p[rng.integers(0, p.size, 5)] = np.nan
    q = S.bh(p)
    ok = ~np.isnan(p)
    np.testing.assert_allclose(q[ok], multipletests(p[ok], method="fdr_bh")[1], rtol=1e-12, atol=0)
    assert np.isnan(q[~ok]).all()


def _data(rng, P=60, n=14, k_cov=True):
    g = np.array([0] * (n // 2) + [1] * (n - n // 2))
    cov = rng.normal(0, 1, n)
    Y = rng.normal(10, 1, (P, n)) + 0.8 * g[None] + (0.5 * cov[None] if k_cov else 0)
    Y *= rng.uniform(0.5, 2, (P, 1))
    return Y, g, cov


def test_ordinary_t_with_covariate_matches_statsmodels_ols():
    import statsmodels.api as sm

    rng, _ = test_rng()
    Y, g, cov = _data(rng)
    Y[0, 3] = np.nan  # a protein fitted on its observed samples
    D = np.column_stack([1 - g, g, cov - cov.mean()])
    fit = S.lm_fit(Y, D)
    r = S.moderated_t(fit, [-1, 1, 0], prior="none")
    Xo = sm.add_constant(np.column_stack([g, cov]))
    for i in range(Y.shape[0]):
        ok = ~np.isnan(Y[i])
        o = sm.OLS(Y[i, ok], Xo[ok]).fit()
        assert r.estimate[i] == pytest.approx(o.params[1], rel=1e-9, abs=1e-12)
        assert r.t[i] == pytest.approx(o.tvalues[1], rel=1e-8)
        assert r.p[i] == pytest.approx(o.pvalues[1], rel=1e-6, abs=1e-14)
        assert fit.s2[i] == pytest.approx(o.scale, rel=1e-9)


def test_moderated_t_closed_forms():
    rng, _ = test_rng()
    Y, g, _ = _data(rng, k_cov=False)
    D = np.column_stack([1 - g, g])
    fit = S.lm_fit(Y, D)
    su = np.sqrt(1 / 7 + 1 / 7)
    est = Y[:, g == 1].mean(1) - Y[:, g == 0].mean(1)
    # explicit prior: posterior variance is the df-weighted mean, df = d + d0
    s0sq, d0 = 0.7, 4.0
    r = S.moderated_t(fit, [-1, 1], prior=(s0sq, d0))
    post = (d0 * s0sq + 12 * fit.s2) / (d0 + 12)
    np.testing.assert_allclose(r.t, est / (np.sqrt(post) * su), rtol=1e-10)
    np.testing.assert_allclose(r.p, 2 * stats.t.sf(np.abs(r.t), 12 + d0), rtol=1e-9)
    # d0 -> infinity: every protein gets s0² (limit of the formula), t-distribution df -> pooled
    big = S.moderated_t(fit, [-1, 1], prior=(s0sq, 1e12))
    inf = S.moderated_t(fit, [-1, 1], prior=(s0sq, np.inf))
    np.testing.assert_allclose(inf.t, est / (np.sqrt(s0sq) * su), rtol=1e-10)
    np.testing.assert_allclose(big.t, inf.t, rtol=1e-9)
    # d0 -> 0: the ordinary t
    small = S.moderated_t(fit, [-1, 1], prior=(s0sq, 1e-12))
    np.testing.assert_allclose(small.t, S.moderated_t(fit, [-1, 1], prior="none").t, rtol=1e-9)


def test_fit_f_dist_recovers_prior():
    rng, _ = test_rng()
    d, d0, s0sq = 6.0, 8.0, 0.5
    sig2 = s0sq * d0 / rng.chisquare(d0, 40000)
    s2 = sig2 * rng.chisquare(d, sig2.size) / d
    e_s0, e_d0 = S.fit_f_dist(s2, np.full(s2.size, d))
    # 40k proteins: the moment estimates are within ~5 standard errors of these bounds
    assert e_d0 == pytest.approx(d0, rel=0.2)
    assert e_s0 == pytest.approx(s0sq, rel=0.05)
    # no extra spread beyond sampling: d0 = inf, s0² = common variance
    s2 = 0.3 * rng.chisquare(d, 40000) / d
    e_s0, e_d0 = S.fit_f_dist(s2, d)
    assert e_d0 > 100 and e_s0 == pytest.approx(0.3, rel=0.02)
    # trigamma inverse
    y = np.array([0.05, 0.7, 3.0, 40.0])
    from scipy.special import polygamma

    np.testing.assert_allclose(polygamma(1, S.trigamma_inverse(polygamma(1, y))), polygamma(1, y), rtol=1e-8)


def test_moderated_f_without_prior_matches_statsmodels_f_test():
    import statsmodels.api as sm

    rng, _ = test_rng()
    n = 15
    g = np.repeat([0, 1, 2], 5)
    Y = rng.normal(0, 1, (8, n)) + 0.7 * (g == 2)[None]
    D = np.eye(3)[g]
    fit = S.lm_fit(Y, D)
    C = np.array([[-1, -1], [1, 0], [0, 1]], dtype=float)
    F, p, df1, df2 = S.moderated_f(fit, C, prior="none")
    Xo = sm.add_constant(np.column_stack([g == 1, g == 2]).astype(float))
    for i in range(8):
        o = sm.OLS(Y[i], Xo).fit()
        assert F[i] == pytest.approx(o.fvalue, rel=1e-8)
        assert p[i] == pytest.approx(o.f_pvalue, rel=1e-6)


def test_welch_and_rank_tests_match_scipy():
    rng, _ = test_rng()
    A = rng.normal(0, 1, (20, 9))
    B = rng.normal(0.5, 2, (20, 7))
    A[0, 0] = np.nan
    B = np.round(B, 1)  # ties for the rank test
    t, p, d = S.welch(A, B)
    for i in range(20):
        a = A[i][~np.isnan(A[i])]
        ref = stats.ttest_ind(a, B[i], equal_var=False)
        assert t[i] == pytest.approx(ref.statistic, rel=1e-10)
        assert p[i] == pytest.approx(ref.pvalue, rel=1e-8)
        u, pu, _ = S.mann_whitney(A[i:i + 1], B[i:i + 1])
        ref = stats.mannwhitneyu(a, B[i], alternative="two-sided", method="asymptotic", use_continuity=True)
        assert u[0] == pytest.approx(ref.statistic)
        assert pu[0] == pytest.approx(ref.pvalue, rel=1e-9)


def test_correlation_matches_scipy():
    rng, _ = test_rng()
    X = rng.normal(0, 1, (10, 25))
    y = X[3] * 0.8 + rng.normal(0, 1, 25)
    X[2, :3] = np.nan
    for method, ref in (("pearson", stats.pearsonr), ("spearman", stats.spearmanr)):
        r, p, n = S.correlate_rows(X, y, method)
        for i in range(10):
            ok = ~np.isnan(X[i])
            rr = ref(X[i, ok], y[ok])
            assert r[i] == pytest.approx(rr[0], rel=1e-10, abs=1e-12)
            assert p[i] == pytest.approx(rr[1], rel=1e-7)
            assert n[i] == ok.sum()


def test_hypergeom_and_ora_against_scipy_and_gseapy():
    rng, _ = test_rng()
    for _ in range(20):
        N = int(rng.integers(50, 400))
        K = int(rng.integers(1, N // 2))
        n = int(rng.integers(1, N // 2))
        k = int(rng.integers(0, min(K, n) + 1))
        assert S.hypergeom_sf(k, N, K, n)[0] == pytest.approx(stats.hypergeom.sf(k - 1, N, K, n), rel=1e-9, abs=1e-300)
    universe = [f"G{i}" for i in range(300)]
    sets = {f"S{j}": list(rng.choice(universe, int(rng.integers(8, 40)), replace=False)) for j in range(12)}
    hits = list(rng.choice(sets["S0"], 6, replace=False)) + list(rng.choice(universe, 20, replace=False))
    res = {r["gene_set"]: r for r in S.ora(hits, universe, sets)}
    for name, genes in sets.items():
        r = res[name]
        k = len(set(genes) & set(hits))
        assert r["overlap"] == k
        assert r["p"] == pytest.approx(stats.hypergeom.sf(k - 1, 300, len(genes), len(set(hits))), rel=1e-9)
    gp = pytest.importorskip("gseapy")
    enr = gp.enrich(gene_list=hits, gene_sets=sets, background=universe, outdir=None, no_plot=True, cutoff=1.0).res2d
    compared = 0
    for _, row in enr.iterrows():
        if row["Term"] in res and res[row["Term"]]["overlap"] > 0:
            assert row["P-value"] == pytest.approx(res[row["Term"]]["p"], rel=1e-6)
            compared += 1
    assert compared >= 1 and res["S0"]["overlap"] >= 6


def test_gsea_es_matches_gseapy_and_finds_planted_set():
    gp = pytest.importorskip("gseapy")
    import pandas as pd

    rng, seed = test_rng()
    genes = [f"G{i}" for i in range(400)]
    score = rng.normal(0, 1, 400)
    sets = {f"S{j}": list(rng.choice(genes, int(rng.integers(15, 40)), replace=False)) for j in range(10)}
    for g in sets["S0"]:
        score[genes.index(g)] += 2.0
    mine = {r["gene_set"]: r for r in S.gsea_prerank(dict(zip(genes, score)), sets, permutations=200, seed=seed % 1000)}
    rnk = pd.DataFrame({"gene": genes, "score": score}).sort_values("score", ascending=False)
    res = gp.prerank(rnk=rnk, gene_sets=sets, permutation_num=100, min_size=15, max_size=500, outdir=None,
                     no_plot=True, seed=1, threads=1, verbose=False).res2d
    for row in res.itertuples():
        assert mine[row.Term]["es"] == pytest.approx(float(row.ES), rel=1e-6, abs=1e-9)
    top = max(mine.values(), key=lambda r: r["nes"])
    assert top["gene_set"] == "S0" and top["fdr"] < 0.05


def test_pca_kmeans_silhouette_ari_against_sklearn():
    from sklearn.cluster import KMeans
    from sklearn.decomposition import PCA
    from sklearn.metrics import adjusted_rand_score, silhouette_score

    rng, seed = test_rng()
    centers = 12.0 * np.eye(3, 5) + rng.normal(0, 1, (1, 5))  # well separated: 12 sd apart
    lab = np.repeat([0, 1, 2], 20)
    Z = centers[lab] + rng.normal(0, 1, (60, 5))
    sc, load, evr = S.pca(Z, 3)
    ref = PCA(3).fit(Z)
    np.testing.assert_allclose(evr, ref.explained_variance_ratio_, rtol=1e-9)
    np.testing.assert_allclose(np.abs(sc), np.abs(ref.transform(Z)), rtol=1e-7, atol=1e-9)
    km, _, inertia = S.kmeans(Z, 3, seed=seed % 1000)
    sk = KMeans(3, n_init=10, random_state=0).fit(Z)
    assert inertia == pytest.approx(sk.inertia_, rel=1e-9)
    assert S.adjusted_rand(km, lab) == pytest.approx(1.0)
    rand = rng.integers(0, 4, 60)
    assert S.adjusted_rand(rand, lab) == pytest.approx(adjusted_rand_score(lab, rand), rel=1e-12, abs=1e-14)
    assert S.silhouette(Z, rand) == pytest.approx(silhouette_score(Z, rand), rel=1e-10)
    assert S.silhouette(Z, lab) == pytest.approx(silhouette_score(Z, lab), rel=1e-10)
    assert S.bootstrap_stability(Z, 3, n_boot=5, seed=1) > 0.95
    assert S.adjusted_rand(S.hierarchical(Z, 3), lab) == pytest.approx(1.0)


def test_survival_against_lifelines_rossi():
    lifelines = pytest.importorskip("lifelines")
    from lifelines.datasets import load_rossi
    from lifelines.statistics import logrank_test, multivariate_logrank_test

    r = load_rossi()
    cph = lifelines.CoxPHFitter().fit(r, "week", "arrest")
    X = r.drop(columns=["week", "arrest"]).to_numpy(float)
    res = S.cox_fit(X, r.week, r.arrest)
    np.testing.assert_allclose(res.coef[0], cph.params_.values, rtol=1e-6, atol=1e-8)
    np.testing.assert_allclose(res.se[0], cph.standard_errors_.values, rtol=1e-6)
    np.testing.assert_allclose(res.p[0], cph.summary["p"].values, rtol=1e-5)
    assert res.loglik[0] == pytest.approx(cph.log_likelihood_, rel=1e-10)
    ut, Sv, _, _ = S.kaplan_meier(r.week, r.arrest)
    km = lifelines.KaplanMeierFitter().fit(r.week, r.arrest)
    np.testing.assert_allclose(Sv, km.survival_function_at_times(ut).values, rtol=1e-12)
    chi2, p, df, _, _ = S.logrank(r.week, r.arrest, r.fin)
    ref = logrank_test(r.week[r.fin == 0], r.week[r.fin == 1], r.arrest[r.fin == 0], r.arrest[r.fin == 1])
    assert chi2 == pytest.approx(ref.test_statistic, rel=1e-10) and p == pytest.approx(ref.p_value, rel=1e-9)
    g = r.prio.clip(0, 3)
    chi2, p, df, _, _ = S.logrank(r.week, r.arrest, g)
    ref = multivariate_logrank_test(r.week, g, r.arrest)
    assert chi2 == pytest.approx(ref.test_statistic, rel=1e-9) and df == 3
    # batched univariate fits equal one-at-a-time fits; C-index vs lifelines
    B = np.stack([X[:, [j]] for j in range(X.shape[1])])
    rb = S.cox_fit(B, r.week, r.arrest)
    for j in (0, 3):
        one = lifelines.CoxPHFitter().fit(r[["week", "arrest", r.columns[2 + j]]], "week", "arrest")
        assert rb.coef[j, 0] == pytest.approx(one.params_.values[0], rel=1e-6)
    from lifelines.utils import concordance_index

    risk = X @ res.coef[0]
    assert S.concordance_index(r.week, risk, r.arrest) == pytest.approx(concordance_index(r.week, -risk, r.arrest), rel=1e-12)


def test_preprocessing_against_sklearn_and_closed_forms():
    from sklearn.impute import KNNImputer

    rng, seed = test_rng()
    X = rng.normal(20, 2, (40, 8))
    M = X.copy()
    M[rng.random(M.shape) < 0.15] = np.nan
    M[:, 0][np.isnan(M[:, 0])] = 20.0  # keep every row with >= 1 shared observed column
    imp = S.impute_knn(M, k=3)
    ref = KNNImputer(n_neighbors=3).fit_transform(M)
    np.testing.assert_allclose(imp, ref, rtol=1e-12)
    # median normalisation: equal sample medians, preserved mean of medians
    sh = M + rng.normal(0, 1, 8)[None]
    nm = S.median_normalize(sh)
    med = np.nanmedian(nm, 0)
    np.testing.assert_allclose(med, med[0], atol=1e-12)
    assert med.mean() == pytest.approx(np.nanmedian(sh, 0).mean())
    # quantile normalisation of a complete matrix: identical sorted columns = mean of sorted columns
    q = S.quantile_normalize(X)
    np.testing.assert_allclose(np.sort(q, 0), np.repeat(np.sort(X, 0).mean(1, keepdims=True), 8, 1), rtol=1e-12)
    np.testing.assert_array_equal(np.argsort(q, 0), np.argsort(X, 0))
    # MinProb: only missing cells change, drawn below the sample mean, deterministic per seed
    mp = S.impute_minprob(M, seed=seed)
    obs = ~np.isnan(M)
    np.testing.assert_array_equal(mp[obs], M[obs])
    assert np.all(mp[~obs] < np.nanmean(M, 0)[np.where(~obs)[1]])
    np.testing.assert_array_equal(mp, S.impute_minprob(M, seed=seed))
    vv = S.valid_value_mask(M, 0.9)
    np.testing.assert_array_equal(vv, (~np.isnan(M)).mean(1) >= 0.9)
    grp = np.array(["a"] * 4 + ["b"] * 4, dtype=object)
    both = S.valid_value_mask(M, 1.0, grp, "all")
    np.testing.assert_array_equal(both, ~np.isnan(M).any(1))


def test_coabundance_modules_recover_planted_blocks():
    rng, _ = test_rng()
    n = 40
    f1, f2 = rng.normal(0, 1, n), rng.normal(0, 1, n)
    X = np.vstack([f1 + rng.normal(0, 0.3, (15, n)), f2 + rng.normal(0, 0.3, (12, n)), rng.normal(0, 1, (30, n))])
    mods, R = S.coabundance_modules(X, min_size=8, cut=0.6)
    truth = np.r_[np.full(15, 1), np.full(12, 2), np.zeros(30)]
    assert S.adjusted_rand(mods, truth) > 0.9
    eg, ve = S.module_eigengene(X[:15])
    assert abs(np.corrcoef(eg, f1)[0, 1]) > 0.95 and ve > 0.5


def test_ph_test_flags_crossing_hazards_only():
    rng, _ = test_rng()
    n = 300
    x = rng.normal(0, 1, n)
    C = rng.exponential(2, n)
    T = rng.exponential(1 / np.exp(0.8 * x))
    t, e = np.minimum(T, C), (T <= C).astype(float)
    b = S.cox_fit(x[:, None], t, e).coef[0, 0]
    # proportional hazards hold: a false alarm at p < 1e-4 has probability 1e-4
    assert S.ph_test(x, t, e, b)[1] > 1e-4
    # effect +1.5 before time 0.5 and -1.5 after: measured p ~1e-18 at this size
    T1 = rng.exponential(1 / np.exp(1.5 * x))
    T = np.where(T1 < 0.5, T1, 0.5 + rng.exponential(1 / np.exp(-1.5 * x)))
    t, e = np.minimum(T, C), (T <= C).astype(float)
    b = S.cox_fit(x[:, None], t, e).coef[0, 0]
    rho, p = S.ph_test(x, t, e, b)
    assert p < 1e-6 and rho < 0


def _breslow_score_by_differences(x, t, e):
    """U(0) and I(0) of the Breslow log partial likelihood of one covariate, by central
    differences (an independent transcription of the definition)."""
    def logpl(b):
        return sum(b * x[i] - np.log(np.exp(b * x[t >= t[i]]).sum()) for i in np.flatnonzero(e))
    h = 1e-4
    U = (logpl(h) - logpl(-h)) / (2 * h)
    I = -(logpl(h) - 2 * logpl(0.0) + logpl(-h)) / h**2
    return U, I


def test_cox_score_test_against_logrank_and_the_partial_likelihood():
    lifelines = pytest.importorskip("lifelines")
    from lifelines.statistics import logrank_test

    rng, _ = test_rng()
    n = 57
    t = rng.permutation(np.arange(1.0, n + 1))  # no ties: the score test of a binary row is the log-rank test
    e = rng.random(n) < 0.7
    g = (rng.random((3, n)) < 0.4).astype(float)
    chi2, p = S.cox_score_test(g, t, e)
    for k in range(3):
        lr = logrank_test(t[g[k] == 1], t[g[k] == 0], e[g[k] == 1], e[g[k] == 0])
        np.testing.assert_allclose(chi2[k], lr.test_statistic, rtol=1e-10)
        np.testing.assert_allclose(p[k], lr.p_value, rtol=1e-8)
    # continuous rows, tied times (Breslow), missing values: each row on its observed samples only
    tt = np.round(rng.exponential(5.0, n))
    X = rng.standard_normal((4, n))
    X[1, rng.random(n) < 0.3] = np.nan
    chi2, _ = S.cox_score_test(X, tt, e)
    scores = S.logrank_scores(tt, e)
    for k in range(4):
        m = ~np.isnan(X[k])
        U, I = _breslow_score_by_differences(X[k, m], tt[m], e[m])
        np.testing.assert_allclose(chi2[k], U * U / I, rtol=1e-5)
        if m.all():  # the log-rank scores give the same U for a complete row
            np.testing.assert_allclose(X[k] @ scores, U, rtol=1e-5, atol=1e-8)
    with pytest.raises(ValueError, match="X must be"):
        S.cox_score_test(X[:, :-1], tt, e)


def test_cox_global_permutation_test_is_calibrated_under_correlated_nulls_and_has_power():
    rng, seed = test_rng()
    n, P = 40, 60
    p_perm = []
    for rep in range(60):
        F = rng.standard_normal(n)  # one strong shared factor: the rows' tests are highly correlated
        X = rng.standard_normal((P, n)) * 0.5 + F[None, :]
        t, e = rng.exponential(1.0, n), rng.random(n) < 0.8
        p_perm.append(S.cox_global_permutation_p(X, t, e, n_perm=99, seed=seed + rep, stop_after=1000)[0])
    p_perm = np.array(p_perm)
    # exact under exchangeability: #{p <= 0.1} ~ Binomial(60, 0.1), #{p >= 0.5} ~ Binomial(60, 0.51);
    # each bound fails a correct test with probability < 4e-6
    assert (p_perm <= 0.1).sum() <= 18, np.sort(p_perm)
    assert (p_perm >= 0.5).sum() >= 14, np.sort(p_perm)  # and not conservative (expected 30)
    # a planted association: the smallest possible p; the sequential stop on a null
    t = rng.exponential(1.0, n) * np.exp(-3.0 * (X[0] - X[0].mean()) / X[0].std())  # 0 misses in 300 seeds
    e = np.ones(n, bool)
    assert S.cox_global_permutation_p(X, t, e, n_perm=199, seed=seed)[0] == 1 / 200
    Xn = rng.standard_normal((P, n))
    p, _ = S.cox_global_permutation_p(Xn, rng.exponential(1.0, n), e, n_perm=999, seed=seed, stop_after=5)
    assert p > 1e-3
    with pytest.raises(ValueError, match="n_perm"):
        S.cox_global_permutation_p(Xn, t, e, n_perm=0)


@pytest.mark.parametrize("method", ["pearson", "spearman"])
def test_correlation_global_permutation_test(method):
    rng, seed = test_rng()
    n, P = 30, 40
    X = rng.standard_normal((P, n)) + rng.standard_normal(n)[None, :]  # a shared factor
    y = rng.standard_normal(n)
    r, _, _ = S.correlate_rows(X, y, method)
    p, stat = S.correlation_global_permutation_p(X, y, method, n_perm=99, seed=seed)
    np.testing.assert_allclose(stat, np.abs(r).max(), rtol=1e-10)  # complete rows: the tool's own r
    ps = []
    for rep in range(60):
        F = rng.standard_normal(n)
        Xr = rng.standard_normal((P, n)) * 0.5 + F[None, :]
        Xr[rng.random((P, n)) < 0.1] = np.nan
        yr = rng.standard_normal(n)
        yr[rng.random(n) < 0.1] = np.nan
        ps.append(S.correlation_global_permutation_p(Xr, yr, method, n_perm=99, seed=seed + rep, stop_after=1000)[0])
    ps = np.array(ps)
    assert (ps <= 0.1).sum() <= 18 and (ps >= 0.5).sum() >= 14, np.sort(ps)  # as in the Cox test above
    y2 = X[3] + 0.3 * rng.standard_normal(n)
    assert S.correlation_global_permutation_p(X, y2, method, n_perm=199, seed=seed)[0] == 1 / 200
    with pytest.raises(ValueError, match="y"):
        S.correlation_global_permutation_p(X, y[:-1], method)
