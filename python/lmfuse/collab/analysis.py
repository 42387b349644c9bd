"""FS-GEN analysis: when does a small model need a large one?

Inputs are per-token tensors, typically a :class:`lmfuse.collab.TokenTrace` from
:func:`lmfuse.collab.oracle_trace` (the large model decodes, ``differs`` marks the tokens where
its choice differs from the small model's argmax) — ``[B, T]`` tensors with a ``valid`` mask.

* routers: :func:`max_prob_router`, :func:`margin_router` decide per token whether to call the
  large model from the small model's own confidence; :func:`router_curve` scores them against
  the oracle (how many large-model calls, how many of the disagreements they catch);
* :func:`collaboration_frequency` — the oracle measure; :func:`frequency_by_position` (10 %
  buckets of each row's generated length) and :func:`frequency_by_entropy` (entropy bins);
* :func:`fit_scaling` — ``freq = b − a·ratio^(−α)`` against the large/small parameter ratio,
  with bounded parameters (``scipy.optimize.curve_fit``);
* ``plot_*`` — one PNG per view (matplotlib, Agg backend).
"""

from __future__ import annotations

from dataclasses import dataclass

import torch


def _flat(values: torch.Tensor, valid: torch.Tensor | None) -> torch.Tensor:
    if valid is None:
        return values.reshape(-1)
    if valid.shape != values.shape:
        raise ValueError(f"valid: expected shape {tuple(values.shape)}, got {tuple(valid.shape)}")
    return values[valid.bool()]


def max_prob_router(small_top1_prob: torch.Tensor, threshold: float) -> torch.Tensor:
    """True where the small model's top-1 probability is below ``threshold`` (call the large model)."""
    if not 0.0 <= threshold <= 1.0:
        raise ValueError(f"threshold: expected a probability in [0, 1], got {threshold}")
    return small_top1_prob < threshold


def margin_router(small_margin: torch.Tensor, threshold: float) -> torch.Tensor:
    """True where the small model's top-1 − top-2 probability margin is below ``threshold``."""
    if not 0.0 <= threshold <= 1.0:
        raise ValueError(f"threshold: expected a margin in [0, 1], got {threshold}")
    return small_margin < threshold


@dataclass
class RouterCurve:
    """For each threshold: ``call_rate`` (fraction of tokens routed to the large model) and
    ``recall`` (fraction of oracle disagreements routed), ``precision`` (fraction of routed
    tokens that are disagreements; NaN when nothing is routed)."""

    thresholds: torch.Tensor
    call_rate: torch.Tensor
    recall: torch.Tensor
    precision: torch.Tensor


def router_curve(score: torch.Tensor, differs: torch.Tensor, thresholds, valid: torch.Tensor | None = None) -> RouterCurve:
    """Evaluate the router ``score < threshold`` (score = top-1 prob or margin) against the oracle."""
    s = _flat(score, valid).double()
    d = _flat(differs, valid).bool()
    if s.numel() == 0:
        raise ValueError("router_curve: no valid tokens")
    th = torch.as_tensor(thresholds, dtype=torch.double)
    routed = s[None, :] < th[:, None]
    n_routed = routed.sum(1).double()
    hits = (routed & d[None, :]).sum(1).double()
    n_diff = d.sum().double()
    recall = hits / n_diff if n_diff > 0 else torch.full_like(hits, float("nan"))
    precision = torch.where(n_routed > 0, hits / n_routed.clamp_min(1), torch.full_like(hits, float("nan")))
    return RouterCurve(th, n_routed / s.numel(), recall, precision)


def collaboration_frequency(differs: torch.Tensor, valid: torch.Tensor | None = None) -> float:
    """Fraction of (valid) tokens where the large model's choice differs from the small model's."""
    d = _flat(differs, valid)
    if d.numel() == 0:
        raise ValueError("collaboration_frequency: no valid tokens")
    return float(d.double().mean())


def frequency_by_position(differs: torch.Tensor, valid: torch.Tensor, num_buckets: int = 10):
    """Collaboration frequency by relative position in each row's generation.

    Token ``t`` of a row with ``n`` generated tokens falls in bucket ``floor(num_buckets·t/n)``
    (10 buckets = 10 % each), so long and short rows are compared at the same relative point.
    Returns ``(frequency [num_buckets] (NaN where empty), counts [num_buckets])``.
    """
    if differs.dim() != 2 or valid.shape != differs.shape:
        raise ValueError(f"differs/valid: expected two [B, T] tensors of one shape, got "
                         f"{tuple(differs.shape)} and {tuple(valid.shape)}")
    v = valid.bool()
    n = v.sum(1, keepdim=True).clamp_min(1)
    t = torch.cumsum(v.long(), 1) - 1  # index of the token among the row's valid ones
    bucket = (num_buckets * t // n).clamp(0, num_buckets - 1)[v]
    d = differs.bool()[v].double()
    counts = torch.bincount(bucket, minlength=num_buckets).double()
    sums = torch.bincount(bucket, weights=d, minlength=num_buckets)
    return torch.where(counts > 0, sums / counts.clamp_min(1), torch.full_like(counts, float("nan"))), counts.long()


def frequency_by_entropy(differs: torch.Tensor, entropy: torch.Tensor, valid: torch.Tensor | None = None,
                         edges=None, num_bins: int = 8):
    """Collaboration frequency by the small model's entropy (nats).

    ``edges`` (ascending, ``num_bins + 1`` values) default to quantiles of the observed entropy
    so every bin holds about as many tokens. Returns ``(edges, frequency [bins], counts [bins])``.
    """
    e = _flat(entropy, valid).double()
    d = _flat(differs, valid).double()
    if e.numel() == 0:
        raise ValueError("frequency_by_entropy: no valid tokens")
    if edges is None:
        edges = torch.quantile(e, torch.linspace(0, 1, num_bins + 1, dtype=torch.double))
        edges = torch.unique(edges)  # ties (e.g. many zero-entropy tokens) merge bins
        if edges.numel() < 2:
            edges = torch.stack([e.min(), e.max() + 1e-9])
    edges = torch.as_tensor(edges, dtype=torch.double)
    if edges.dim() != 1 or edges.numel() < 2 or bool((edges[1:] <= edges[:-1]).any()):
        raise ValueError(f"edges: expected at least two strictly increasing values, got {edges.tolist()}")
    nb = edges.numel() - 1
    idx = (torch.bucketize(e, edges, right=True) - 1).clamp(0, nb - 1)
    counts = torch.bincount(idx, minlength=nb).double()
    sums = torch.bincount(idx, weights=d, minlength=nb)
    freq = torch.where(counts > 0, sums / counts.clamp_min(1), torch.full_like(counts, float("nan")))
    return edges, freq, counts.long()


def scaling_law(ratio, a, b, alpha):
    """``b − a·ratio^(−alpha)``: collaboration frequency as the large/small size ratio grows."""
    import numpy as np

    return b - a * np.power(ratio, -alpha)


@dataclass
class ScalingFit:
    a: float
    b: float
    alpha: float
    residual_rms: float

    def predict(self, ratio):
        return scaling_law(ratio, self.a, self.b, self.alpha)


def fit_scaling(ratios, freqs, bounds=((0.0, 0.0, 0.0), (1.0, 1.0, 5.0)), p0=None) -> ScalingFit:
    """Least-squares fit of ``freq = b − a·ratio^(−α)`` with bounded ``(a, b, α)``.

    The default bounds keep the curve a frequency: ``0 ≤ b ≤ 1`` (the plateau), ``0 ≤ a ≤ 1``
    and ``0 ≤ α ≤ 5`` (a decay, not an explosion). Needs at least three points.
    """
    import numpy as np
    from scipy.optimize import curve_fit

    x = np.asarray(ratios, dtype=float)
    y = np.asarray(freqs, dtype=float)
    if x.shape != y.shape or x.ndim != 1 or x.size < 3:
        raise ValueError(f"ratios/freqs: expected two 1-D sequences of >= 3 equal lengths, got {x.shape}, {y.shape}")
    if np.any(x <= 0) or not np.all(np.isfinite(y)):
        raise ValueError("ratios must be > 0 and freqs finite")
    lo, hi = (np.asarray(b, dtype=float) for b in bounds)
    if p0 is None:
        p0 = np.clip([max(y.max() - y.min(), 1e-3), y.max(), 0.5], lo + 1e-9, hi - 1e-9)
    params, _ = curve_fit(scaling_law, x, y, p0=p0, bounds=(lo, hi), maxfev=20000)
    res = y - scaling_law(x, *params)
    return ScalingFit(float(params[0]), float(params[1]), float(params[2]), float(np.sqrt(np.mean(res ** 2))))


# ------------------------------------------------------------------------------------------ plots


def _figure():
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    return plt, *plt.subplots(figsize=(6, 4), dpi=110)


def _save(plt, fig, path) -> str:
    fig.tight_layout()
    fig.savefig(path)
    plt.close(fig)
    return str(path)


def plot_position(freq: torch.Tensor, counts: torch.Tensor, path) -> str:
    plt, fig, ax = _figure()
    nb = freq.numel()
    ax.bar([f"{100 * i // nb}-{100 * (i + 1) // nb}%" for i in range(nb)], freq.nan_to_num(0).tolist())
    ax.set_xlabel("relative position in the generation")
    ax.set_ylabel("collaboration frequency")
    ax.tick_params(axis="x", labelrotation=45)
    ax.set_title(f"large ≠ small, by position ({int(counts.sum())} tokens)")
    return _save(plt, fig, path)


def plot_entropy(edges: torch.Tensor, freq: torch.Tensor, counts: torch.Tensor, path) -> str:
    plt, fig, ax = _figure()
    mids = ((edges[1:] + edges[:-1]) / 2).tolist()
    ax.plot(mids, freq.tolist(), "o-")
    for m, f, c in zip(mids, freq.tolist(), counts.tolist()):
        ax.annotate(str(c), (m, f), textcoords="offset points", xytext=(0, 5), fontsize=7, ha="center")
    ax.set_xlabel("small-model entropy (nats), bin centre (labels: tokens per bin)")
    ax.set_ylabel("collaboration frequency")
    ax.set_title("large ≠ small, by small-model uncertainty")
    return _save(plt, fig, path)


def plot_router(curves: dict[str, RouterCurve], oracle_freq: float, path) -> str:
    plt, fig, ax = _figure()
    for name, c in curves.items():
        ax.plot(c.call_rate.tolist(), c.recall.tolist(), ".-", label=name)
    ax.axvline(oracle_freq, color="grey", ls="--", label=f"oracle call rate {oracle_freq:.2f}")
    ax.set_xlabel("fraction of tokens sent to the large model")
    ax.set_ylabel("fraction of disagreements caught")
    ax.legend()
    ax.set_title("routers vs the oracle")
    return _save(plt, fig, path)


def plot_scaling(ratios, freqs, fit: ScalingFit, path) -> str:
    import numpy as np

    plt, fig, ax = _figure()
    ax.plot(ratios, freqs, "o", label="measured")
    xs = np.geomspace(min(ratios), max(ratios), 100)
    ax.plot(xs, fit.predict(xs), "-", label=f"{fit.b:.3f} − {fit.a:.3f}·r^(−{fit.alpha:.2f})")
    ax.set_xscale("log")
    ax.set_xlabel("parameter ratio large / small")
    ax.set_ylabel("collaboration frequency")
    ax.legend()
    return _save(plt, fig, path)


def analyze_trace(trace, out_dir=None, thresholds=None, num_entropy_bins: int = 8) -> dict:
    """Every per-token view of one :class:`~lmfuse.collab.TokenTrace` (usually from
    :func:`~lmfuse.collab.oracle_trace`): the oracle frequency, by position, by entropy, and
    both routers' curves; with ``out_dir``, also ``position.png``, ``entropy.png`` and
    ``routers.png`` there (the file paths are under ``"files"``)."""
    from pathlib import Path

    th = torch.linspace(0.05, 1.0, 20) if thresholds is None else torch.as_tensor(thresholds)
    valid = trace.valid
    freq = collaboration_frequency(trace.differs, valid)
    pos_f, pos_c = frequency_by_position(trace.differs, valid)
    edges, ent_f, ent_c = frequency_by_entropy(trace.differs, trace.small_entropy, valid, num_bins=num_entropy_bins)
    curves = {"max-prob": router_curve(trace.small_top1_prob, trace.differs, th, valid),
              "margin": router_curve(trace.small_margin, trace.differs, th, valid)}
    out = {"tokens": int(valid.sum()), "collaboration_frequency": freq,
           "by_position": {"frequency": pos_f.tolist(), "counts": pos_c.tolist()},
           "by_entropy": {"edges": edges.tolist(), "frequency": ent_f.tolist(), "counts": ent_c.tolist()},
           "routers": {name: {"thresholds": c.thresholds.tolist(), "call_rate": c.call_rate.tolist(),
                              "recall": c.recall.tolist()} for name, c in curves.items()}}
    if out_dir is not None:
        d = Path(out_dir)
        d.mkdir(parents=True, exist_ok=True)
        out["files"] = [plot_position(pos_f, pos_c, d / "position.png"),
                        plot_entropy(edges, ent_f, ent_c, d / "entropy.png"),
                        plot_router(curves, freq, d / "routers.png")]
    return out
