"""One PNG per op: a panel per mode, grouped bars per provider, one group per shape.

Bars show the median milliseconds per call (log scale, lower is better) with p20..p80
whiskers. A dashed black segment over each group marks the roofline time of the case's work
(from the baseline's flop/byte formulas and the ceilings measured in the same run), the floor
no implementation of that work can beat. Time rather than TFLOP/s is plotted because providers
may do different work (a dense layer against a low-rank one). Matplotlib runs on Agg.
"""

from __future__ import annotations

import os
from pathlib import Path
from typing import Sequence

from .harness import MODES, Measurement
from .timing import Ceilings, roofline_ms


def _label(m: Measurement, with_op: bool = False) -> str:
    """The bar group of a measurement: its shape and dtype, and its op when one bench module
    measured several ops (which may share shapes, e.g. a loss and its log-probs)."""
    return f"{m.op}\n{m.shape}\n{m.dtype}" if with_op else f"{m.shape}\n{m.dtype}"


def plot_op(measurements: Sequence[Measurement], path: str | os.PathLike,
            ceilings: Ceilings | None = None, title: str = "") -> Path:
    """Write the plot of one op's measurements to ``path`` and return it (``title``: e.g. the
    device name)."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    ok = [m for m in measurements if m.status == "ok"]
    if not ok:
        raise ValueError("plot_op: no successful measurement to plot")
    modes = [mode for mode in MODES if any(m.mode == mode for m in ok)]
    providers = list(dict.fromkeys(m.provider for m in ok))
    ops = list(dict.fromkeys(m.op for m in ok))
    multi = len(ops) > 1
    shapes = list(dict.fromkeys(_label(m, multi) for m in ok))
    index = {(m.mode, m.provider, _label(m, multi)): m for m in ok}
    colors = {prov: f"C{j % 10}" for j, prov in enumerate(providers)}

    fig_w = max(6.0, 0.55 * len(shapes) * len(providers))
    fig, axes = plt.subplots(len(modes), 1, figsize=(fig_w, 3.6 * len(modes)), squeeze=False)
    width = 0.8 / len(providers)
    for ax, mode in zip(axes[:, 0], modes):
        for j, prov in enumerate(providers):
            xs, ys, lo, hi = [], [], [], []
            for i, shape in enumerate(shapes):
                m = index.get((mode, prov, shape))
                if m is None:
                    continue
                t = m.timing
                xs.append(i + (j - (len(providers) - 1) / 2) * width)
                ys.append(t.median_ms)
                lo.append(max(0.0, t.median_ms - t.p20_ms))
                hi.append(max(0.0, t.p80_ms - t.median_ms))
            if xs:
                ax.bar(xs, ys, width, yerr=[lo, hi], capsize=2, label=prov, color=colors[prov])
        if ceilings is not None:
            labelled = False
            for i, shape in enumerate(shapes):
                ref = next((m for m in ok if m.mode == mode and _label(m, multi) == shape
                            and m.provider == m.baseline and m.flops is not None), None)
                if ref is not None:
                    ax.hlines(roofline_ms(ref.flops, ref.nbytes, ceilings), i - 0.42, i + 0.42, colors="k",
                              linestyles="--", lw=1, label=None if labelled else f"roofline ({ref.baseline} work)")
                    labelled = True
        ax.set_yscale("log")
        ax.set_xticks(range(len(shapes)))
        ax.set_xticklabels(shapes, fontsize=7)
        ax.set_ylabel("ms per call (log)")
        ax.set_title(f"{', '.join(ops)} — {mode}")
        ax.grid(axis="y", alpha=0.3, which="both")
    handles = {}
    for ax in axes[:, 0]:  # a provider absent from the first panel still gets its legend entry
        for h, lab in zip(*ax.get_legend_handles_labels()):
            handles.setdefault(lab, h)
    axes[0, 0].legend(handles.values(), handles.keys(), fontsize=7, loc="best")
    if title:
        fig.suptitle(title, fontsize=8)
    fig.tight_layout()
    out = Path(path)
    out.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(out, dpi=110)
    plt.close(fig)
    return out
