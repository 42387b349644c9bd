"""Gene-set enrichment: over-representation (hypergeometric) and pre-ranked GSEA, plus GMT I/O."""

from __future__ import annotations

from pathlib import Path
from typing import Mapping, Sequence

import numpy as np
from scipy import special

from .multitest import bh


def read_gmt(path) -> dict[str, list[str]]:
    """Read a ``.gmt`` file: one set per line, ``name<TAB>description<TAB>gene<TAB>gene...``."""
    path = Path(path)
    out: dict[str, list[str]] = {}
    with open(path, encoding="utf-8") as f:
        for i, line in enumerate(f, start=1):
            line = line.rstrip("\r\n")
            if not line.strip():
                continue
            parts = line.split("\t")
            if len(parts) < 3:
                raise ValueError(f"{path}: line {i} has {len(parts)} tab-separated fields; a gene set needs name, description and genes")
            if parts[0] in out:
                raise ValueError(f"{path}: duplicate gene set {parts[0]!r} at line {i}")
            out[parts[0]] = [g for g in parts[2:] if g]
    return out


def write_gmt(sets: Mapping[str, Sequence[str]], path, descriptions: Mapping[str, str] | None = None) -> Path:
    """Write gene sets as a ``.gmt`` file."""
    path = Path(path)
    with open(path, "w", encoding="utf-8") as f:
        for k, genes in sets.items():
            f.write("\t".join([k, (descriptions or {}).get(k, "na"), *genes]) + "\n")
    return path


def hypergeom_sf(k, N, K, n) -> np.ndarray:
    """P(X >= k) for X ~ Hypergeometric(population N, K successes, n draws), summed in log space."""
    k, N, K, n = (np.atleast_1d(np.asarray(v, dtype=np.int64)) for v in (k, N, K, n))
    k, N, K, n = np.broadcast_arrays(k, N, K, n)
    out = np.empty(k.shape, dtype=np.float64)

    def lchoose(a, b):
        return special.gammaln(a + 1) - special.gammaln(b + 1) - special.gammaln(a - b + 1)

    for i in np.ndindex(k.shape):
        lo, hi = max(k[i], 0, n[i] - (N[i] - K[i])), min(K[i], n[i])
        if lo > hi:
            out[i] = 0.0 if k[i] > hi else 1.0
            continue
        x = np.arange(lo, hi + 1)
        lp = lchoose(K[i], x) + lchoose(N[i] - K[i], n[i] - x) - lchoose(N[i], n[i])
        out[i] = min(1.0, float(np.exp(special.logsumexp(lp))))
    return out


def ora(hits: Sequence[str], universe: Sequence[str], gene_sets: Mapping[str, Sequence[str]], *,
        min_size: int = 5, max_size: int = 500) -> list[dict]:
    """Over-representation of ``hits`` in each gene set, relative to ``universe`` (the tested genes).

    Sets are intersected with the universe; those with fewer than ``min_size`` or more than
    ``max_size`` members there are skipped. Returns rows sorted by p: gene_set, size (in universe),
    overlap, expected, fold, p (one-sided hypergeometric), q (BH over the tested sets), genes."""
    uni = list(dict.fromkeys(g for g in universe if g))
    U = set(uni)
    H = set(g for g in hits if g) & U
    N, n = len(U), len(H)
    rows = []
    for name, genes in gene_sets.items():
        S = set(genes) & U
        if not (min_size <= len(S) <= max_size):
            continue
        ov = sorted(S & H)
        rows.append({"gene_set": name, "size": len(S), "overlap": len(ov),
                     "expected": n * len(S) / N if N else 0.0, "genes": ov})
    if not rows:
        return []
    p = hypergeom_sf([r["overlap"] for r in rows], N, [r["size"] for r in rows], n)
    q = bh(p)
    for r, pi, qi in zip(rows, p, q):
        r["fold"] = r["overlap"] / r["expected"] if r["expected"] > 0 else float("nan")
        r["p"], r["q"] = float(pi), float(qi)
    rows.sort(key=lambda r: (r["p"], r["gene_set"]))
    return rows


def _es(ranked_scores: np.ndarray, member: np.ndarray, weight: float = 1.0):
    """Running-sum enrichment score for membership matrix ``member`` [S, N] (bool) along a ranking
    sorted by decreasing score. Returns (ES [S], index of the extreme [S])."""
    w = np.abs(ranked_scores) ** weight
    hit = member * w[None, :]
    nr = hit.sum(1, keepdims=True)
    nh = member.shape[1] - member.sum(1, keepdims=True)
    step = np.where(member, hit / np.where(nr == 0, 1, nr), -1.0 / np.where(nh == 0, 1, nh))
    run = np.cumsum(step, axis=1)
    mx, mn = run.max(1), run.min(1)
    es = np.where(np.abs(mx) >= np.abs(mn), mx, mn)
    idx = np.where(np.abs(mx) >= np.abs(mn), run.argmax(1), run.argmin(1))
    return es, idx


def gsea_prerank(scores: Mapping[str, float] | Sequence[tuple[str, float]], gene_sets: Mapping[str, Sequence[str]], *,
                 permutations: int = 1000, min_size: int = 15, max_size: int = 500, weight: float = 1.0,
                 seed: int = 0) -> list[dict]:
    """Pre-ranked GSEA (Subramanian et al. 2005) with gene-set permutation.

    scores: gene -> ranking statistic (e.g. moderated t). For each set: ES (weighted KS running
    sum), NES = ES / mean |null ES| of the same sign, nominal p (fraction of same-signed null ES at
    least as extreme) and FDR from the pooled NES null (fraction of null NES beyond the observed
    NES over the fraction of observed NES beyond it, per sign). Returns rows sorted by |NES|."""
    items = list(scores.items()) if isinstance(scores, Mapping) else list(scores)
    items = [(g, float(s)) for g, s in items if g and np.isfinite(s)]
    seen: dict[str, float] = {}
    for g, s in items:  # keep the most extreme score per gene
        if g not in seen or abs(s) > abs(seen[g]):
            seen[g] = s
    genes = sorted(seen, key=lambda g: (-seen[g], g))
    sc = np.array([seen[g] for g in genes])
    pos = {g: i for i, g in enumerate(genes)}
    names, members = [], []
    for name, gs in gene_sets.items():
        idx = sorted({pos[g] for g in gs if g in pos})
        if min_size <= len(idx) <= max_size:
            m = np.zeros(len(genes), dtype=bool)
            m[idx] = True
            names.append(name)
            members.append(m)
    if not names:
        return []
    M = np.array(members)
    es, at = _es(sc, M, weight)
    rng = np.random.default_rng(seed)
    sizes = M.sum(1)
    null = np.empty((len(names), permutations))
    N = len(genes)
    for b in range(permutations):
        # one random ordering per permutation; set i takes its first size_i genes
        rank = np.empty(N, dtype=np.int64)
        rank[rng.permutation(N)] = np.arange(N)
        R = rank[None, :] < sizes[:, None]
        null[:, b] = _es(sc, R, weight)[0]
    rows = []
    nes = np.empty(len(names))
    null_nes = np.empty_like(null)
    pval = np.empty(len(names))
    for i in range(len(names)):
        npos, nneg = null[i][null[i] >= 0], null[i][null[i] < 0]
        mp = npos.mean() if npos.size else np.nan
        mn = -nneg.mean() if nneg.size else np.nan
        if es[i] >= 0:
            nes[i] = es[i] / mp
            pval[i] = (np.sum(npos >= es[i]) + 1) / (npos.size + 1)
        else:
            nes[i] = es[i] / mn
            pval[i] = (np.sum(nneg <= es[i]) + 1) / (nneg.size + 1)
        null_nes[i] = np.where(null[i] >= 0, null[i] / mp, null[i] / mn)
    allnull = null_nes.ravel()
    npos_all, nneg_all = allnull[allnull >= 0], allnull[allnull < 0]
    fdr = np.empty(len(names))
    for i in range(len(names)):
        if nes[i] >= 0:
            num = np.mean(npos_all >= nes[i]) if npos_all.size else 0.0
            den = np.mean(nes[nes >= 0] >= nes[i])
        else:
            num = np.mean(nneg_all <= nes[i]) if nneg_all.size else 0.0
            den = np.mean(nes[nes < 0] <= nes[i])
        fdr[i] = min(1.0, num / den) if den > 0 else 1.0
    for i, name in enumerate(names):
        midx = np.flatnonzero(M[i])
        lead = [genes[j] for j in midx if (j <= at[i] if es[i] >= 0 else j >= at[i])]
        rows.append({"gene_set": name, "size": int(sizes[i]), "es": float(es[i]), "nes": float(nes[i]),
                     "p": float(pval[i]), "fdr": float(fdr[i]), "leading_edge": lead})
    rows.sort(key=lambda r: (-abs(r["nes"]), r["gene_set"]))
    return rows
