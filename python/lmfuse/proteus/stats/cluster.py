"""PCA, k-means, hierarchical clustering, silhouette, adjusted Rand index, bootstrap stability."""

from __future__ import annotations

import numpy as np
from scipy.cluster import hierarchy
from scipy.special import comb


def pca(Z, n_components: int = 2):
    """PCA of ``Z`` [n_samples, n_features] (complete). Returns (scores [n, k], loadings [k, f],
    explained_variance_ratio [k]); components are sign-fixed so the largest |loading| is positive."""
    Z = np.asarray(Z, dtype=np.float64)
    if np.isnan(Z).any():
        raise ValueError("pca needs a complete matrix; impute or drop missing values first")
    C = Z - Z.mean(0)
    n, f = C.shape
    k = min(n_components, n, f)
    # eigen-decomposition of the smaller Gram/covariance matrix (much faster than an SVD of C
    # when BLAS threads compete for cores)
    if n <= f:
        w, U = np.linalg.eigh(C @ C.T)
        order = np.argsort(w)[::-1]
        w, U = np.clip(w[order], 0, None), U[:, order]
        S = np.sqrt(w)
        Vt = (C.T @ U[:, :k] / np.where(S[:k] > 0, S[:k], 1)).T
    else:
        w, V = np.linalg.eigh(C.T @ C)
        order = np.argsort(w)[::-1]
        w = np.clip(w[order], 0, None)
        Vt = V[:, order[:k]].T
    sign = np.sign(Vt[np.arange(k), np.argmax(np.abs(Vt), axis=1)])
    Vt = Vt * sign[:, None]
    scores = C @ Vt.T
    var = w / max(n - 1, 1)
    return scores, Vt, var[:k] / var.sum()


def kmeans(Z, k: int, *, n_init: int = 10, max_iter: int = 300, seed: int = 0):
    """Lloyd's k-means with k-means++ seeding, best of ``n_init``. Returns (labels, centers, inertia)."""
    Z = np.asarray(Z, dtype=np.float64)
    n = Z.shape[0]
    if not 1 <= k <= n:
        raise ValueError(f"k must be in [1, n_samples={n}], got {k}")
    rng = np.random.default_rng(seed)
    best = None
    for _ in range(n_init):
        C = [Z[rng.integers(n)]]
        for _ in range(1, k):
            d2 = np.min(((Z[:, None, :] - np.array(C)[None]) ** 2).sum(-1), axis=1)
            tot = d2.sum()
            C.append(Z[rng.choice(n, p=d2 / tot)] if tot > 0 else Z[rng.integers(n)])
        C = np.array(C)
        for _ in range(max_iter):
            d = ((Z[:, None, :] - C[None]) ** 2).sum(-1)
            lab = d.argmin(1)
            newC = np.array([Z[lab == j].mean(0) if np.any(lab == j) else C[j] for j in range(k)])
            if np.allclose(newC, C):
                C = newC
                break
            C = newC
        d = ((Z[:, None, :] - C[None]) ** 2).sum(-1)
        lab = d.argmin(1)
        inertia = float(d[np.arange(n), lab].sum())
        if best is None or inertia < best[2] - 1e-12:
            best = (lab, C, inertia)
    return _relabel(best[0]), best[1], best[2]


def _relabel(lab):
    """Labels renumbered by first appearance (deterministic label names)."""
    lab = np.asarray(lab)
    order = {}
    for v in lab:
        order.setdefault(v, len(order))
    return np.array([order[v] for v in lab])


def hierarchical(Z, k: int, method: str = "ward"):
    """Agglomerative clustering cut into ``k`` clusters (scipy linkage)."""
    L = hierarchy.linkage(np.asarray(Z, dtype=np.float64), method=method)
    return _relabel(hierarchy.fcluster(L, k, criterion="maxclust"))


def silhouette(Z, labels) -> float:
    """Mean silhouette width (Euclidean); 0 for a single cluster; singletons score 0."""
    Z = np.asarray(Z, dtype=np.float64)
    labels = np.asarray(labels)
    u = np.unique(labels)
    if u.size < 2:
        return 0.0
    D = np.sqrt(np.maximum(((Z[:, None, :] - Z[None]) ** 2).sum(-1), 0))
    s = np.zeros(len(Z))
    for i in range(len(Z)):
        same = labels == labels[i]
        if same.sum() <= 1:
            continue
        a = D[i, same].sum() / (same.sum() - 1)
        b = min(D[i, labels == c].mean() for c in u if c != labels[i])
        s[i] = (b - a) / max(a, b) if max(a, b) > 0 else 0.0
    return float(s.mean())


def adjusted_rand(a, b) -> float:
    """Adjusted Rand index of two labelings (Hubert & Arabie)."""
    a, b = np.asarray(a), np.asarray(b)
    if a.shape != b.shape:
        raise ValueError("labelings must have the same length")
    _, ai = np.unique(a, return_inverse=True)
    _, bi = np.unique(b, return_inverse=True)
    M = np.zeros((ai.max() + 1, bi.max() + 1))
    np.add.at(M, (ai, bi), 1)
    sij = comb(M, 2).sum()
    sa, sb = comb(M.sum(1), 2).sum(), comb(M.sum(0), 2).sum()
    n2 = comb(len(a), 2)
    exp = sa * sb / n2 if n2 else 0.0
    mx = (sa + sb) / 2
    if mx == exp:
        return 1.0
    return float((sij - exp) / (mx - exp))


def bootstrap_stability(Z, k: int, *, n_boot: int = 20, method: str = "kmeans", seed: int = 0) -> float:
    """Mean ARI between the full-data clustering and clusterings of bootstrap resamples (compared
    on the distinct resampled samples)."""
    Z = np.asarray(Z, dtype=np.float64)
    rng = np.random.default_rng(seed)
    ref = kmeans(Z, k, seed=seed)[0] if method == "kmeans" else hierarchical(Z, k)
    aris = []
    for b in range(n_boot):
        idx = np.unique(rng.integers(0, len(Z), len(Z)))
        if idx.size <= k:
            continue
        lab = kmeans(Z[idx], k, seed=seed + b + 1, n_init=3)[0] if method == "kmeans" else hierarchical(Z[idx], k)
        aris.append(adjusted_rand(ref[idx], lab))
    return float(np.mean(aris)) if aris else float("nan")
