"""Multiple-testing correction."""

from __future__ import annotations

import numpy as np


def bh(p) -> np.ndarray:
    """Benjamini–Hochberg adjusted p-values (q-values).

    p: array-like of p-values (any shape); NaN entries stay NaN and are not counted in m.
    Returns float64 array of the same shape, monotone in p, capped at 1."""
    p = np.asarray(p, dtype=np.float64)
    out = np.full(p.shape, np.nan)
    flat = p.ravel()
    ok = ~np.isnan(flat)
    v = flat[ok]
    if v.size == 0:
        return out
    if np.any((v < 0) | (v > 1)):
        raise ValueError("p-values must lie in [0, 1]")
    m = v.size
    order = np.argsort(v, kind="mergesort")
    ranked = v[order] * m / np.arange(1, m + 1)
    q = np.minimum.accumulate(ranked[::-1])[::-1]
    res = np.empty(m)
    res[order] = np.minimum(q, 1.0)
    o = out.ravel()
    o[ok] = res
    return o.reshape(p.shape)
