"""Code-decided quality gates of the PROTEUS refinement loop.

Each gate returns a :class:`Gate` (name, measured value, threshold, passed, severity). A failed
``fail``-severity gate makes the step's verdict ``revise`` when a revision is suggested and rounds
are left, ``reject`` otherwise; a failed ``warn`` gate is recorded and does not block. Numbers and
thresholds are logged so a reader can check every decision.
"""

from __future__ import annotations

from dataclasses import asdict, dataclass

import numpy as np

MIN_GROUP = 3
MAX_CRAMERS_V = 0.5
MIN_PROTEINS_KEPT = 100
MIN_SILHOUETTE = 0.10
MIN_CLUSTER_STABILITY = 0.6
MIN_EVENTS = 10
MIN_PH_P = 0.01
MIN_HIT_STABILITY = 0.7


@dataclass
class Gate:
    name: str
    value: float | str | None
    threshold: str
    passed: bool
    severity: str = "fail"  # "fail" blocks acceptance, "warn" is only recorded
    note: str = ""

    def to_json(self) -> dict:
        d = asdict(self)
        if isinstance(d["value"], float):
            d["value"] = round(d["value"], 6) if np.isfinite(d["value"]) else None
        return d


def cramers_v(a, b) -> float:
    """Cramér's V between two categorical vectors (missing = None skipped); 0 = independent, 1 =
    one determines the other."""
    a, b = np.asarray(a, dtype=object), np.asarray(b, dtype=object)
    keep = np.array([x is not None and y is not None for x, y in zip(a, b)])
    a, b = a[keep], b[keep]
    la, lb = sorted(set(a)), sorted(set(b))
    if len(la) < 2 or len(lb) < 2:
        return 0.0
    T = np.array([[np.sum((a == x) & (b == y)) for y in lb] for x in la], dtype=float)
    n = T.sum()
    E = T.sum(1, keepdims=True) * T.sum(0, keepdims=True) / n
    chi2 = float(((T - E) ** 2 / E).sum())
    return float(np.sqrt(chi2 / (n * (min(len(la), len(lb)) - 1))))


def p_histogram_gate(hist: list[int] | None) -> Gate:
    """The p-value histogram must not pile up near 1 (a sign of a broken model, bad imputation or
    normalisation): the last decile must hold at most twice the mean decile mass, and the estimated
    null fraction must lie in (0.2, 1]."""
    if not hist or sum(hist) == 0:
        return Gate("p_histogram", None, "not empty", False, "warn", "no p-values")
    h = np.asarray(hist, float) / sum(hist)
    pi0 = min(1.0, float(h[5:].mean() * 10))  # mass in (0.5, 1] doubled
    spike = float(h[-1] / max(h.mean(), 1e-12))
    ok = spike <= 2.0 and 0.2 < pi0 <= 1.0
    return Gate("p_histogram", round(spike, 4), "last-decile / mean <= 2 and pi0 in (0.2, 1]", ok,
                note=f"pi0 {pi0:.3f}")


GLOBAL_P_LEVEL = 0.01
GLOBAL_ALPHA = 1e-3


def global_signal_gate(p_values) -> Gate:
    """Gatekeeping test before any per-protein hit is reported: is there more signal than the
    complete null allows? Two global tests, each at level 1e-3: the count of p-values <= 0.01
    against Binomial(m, 0.01) (power for many small effects) and Simes' test, min_i m p_(i) / i
    (power for a few strong ones). Under the complete null the step reports nothing except with
    probability about 2e-3, so a null cohort yields no hypotheses except with that probability."""
    from scipy import stats

    p = np.asarray(p_values, float)
    p = p[~np.isnan(p)]
    if p.size == 0:
        return Gate("global_signal", None, f"binomial tail <= {GLOBAL_ALPHA:g}", False, note="no p-values")
    k = int((p <= GLOBAL_P_LEVEL).sum())
    tail = float(stats.binom.sf(k - 1, p.size, GLOBAL_P_LEVEL)) if k > 0 else 1.0
    ps = np.sort(p)
    simes = float(np.min(ps * p.size / np.arange(1, p.size + 1)))
    value = min(tail, simes)
    return Gate("global_signal", value, f"min(binomial tail, Simes p) <= {GLOBAL_ALPHA:g}", value <= GLOBAL_ALPHA,
                note=f"{k} of {p.size} p-values <= {GLOBAL_P_LEVEL}; binomial tail {tail:.3g}; Simes {simes:.3g}")


def permutation_global_gate(p: float | None, what: str) -> Gate:
    """Gatekeeping by a permutation test of the complete null (``p`` from the tool, ``what`` says
    which statistic and what was permuted), at the same level as :func:`global_signal_gate`."""
    ok = bool(p is not None and np.isfinite(p) and p <= GLOBAL_ALPHA)
    return Gate("global_signal", None if p is None else float(p), f"permutation p <= {GLOBAL_ALPHA:g}", ok, note=what)


def gate_dict(gates: list[Gate]) -> list[dict]:
    return [g.to_json() for g in gates]
