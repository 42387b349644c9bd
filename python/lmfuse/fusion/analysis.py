"""What the gate does: mean weight per domain × expert (UltraFuser's Table 6), per-token traces,
and a plot of both."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Optional, Sequence

__all__ = ["gate_table", "token_traces", "TokenTrace", "plot_gate"]


@dataclass
class TokenTrace:
    """One example's response: ``tokens`` (decoded, one string per token), ``ids [n]`` and the
    gate ``weights [n, E]`` (numpy float32), ``experts`` (names) and its ``domain`` (or None)."""

    tokens: list
    ids: object
    weights: object
    experts: list
    domain: Optional[str] = None


def _batches(items: Sequence, size: int):
    for i in range(0, len(items), size):
        yield items[i:i + size]


def gate_table(fuser, examples: Sequence, *, domain_key: str = "domain", batch_size: int = 8,
               progress: bool = False):
    """Mean gate weight per domain (rows) and expert (columns), averaged over every response token
    of the domain's examples, as a ``pandas.DataFrame`` (rows sum to 1; a ``tokens`` column counts
    the tokens averaged). Examples without ``domain_key`` go to the domain ``"all"``."""
    import pandas as pd

    sums: dict = {}
    counts: dict = {}
    batches = list(_batches(list(examples), batch_size))
    if progress:
        from tqdm.auto import tqdm
        batches = tqdm(batches, desc="gate table")
    for batch in batches:
        gw = fuser.gate_weights(batch)
        for ex, w in zip(batch, gw.weights):
            d = ex.get(domain_key, "all") if isinstance(ex, dict) else "all"
            sums[d] = sums.get(d, 0) + w.double().sum(0)
            counts[d] = counts.get(d, 0) + w.shape[0]
    rows = {d: (sums[d] / counts[d]).tolist() for d in sums}
    table = pd.DataFrame.from_dict(rows, orient="index", columns=list(fuser.expert_names))
    table["tokens"] = [counts[d] for d in rows]
    table.index.name = "domain"
    return table.sort_index()


def token_traces(fuser, examples: Sequence, *, domain_key: str = "domain") -> list[TokenTrace]:
    """Per-token gate weights of each example's response (one :class:`TokenTrace` per example)."""
    gw = fuser.gate_weights(list(examples))
    tok = fuser.tokenizer
    out = []
    for ex, w, ids in zip(examples, gw.weights, gw.tokens):
        words = [tok.decode([int(i)]) for i in ids]
        d = ex.get(domain_key) if isinstance(ex, dict) else None
        out.append(TokenTrace(words, ids.numpy(), w.numpy(), list(fuser.expert_names), d))
    return out


def plot_gate(table=None, traces: Sequence[TokenTrace] = (), path: Optional[str] = None, *, max_tokens: int = 60):
    """A figure with the domain × expert table as a heat map (when given) and one stacked-area
    panel per trace (the weight of each expert along the response). Saved to ``path`` when given;
    returns the matplotlib ``Figure``."""
    import matplotlib

    if path is not None:
        matplotlib.use("Agg", force=False)
    import matplotlib.pyplot as plt
    import numpy as np

    panels = (1 if table is not None else 0) + len(traces)
    if panels == 0:
        raise ValueError("plot_gate: give a table, traces, or both")
    fig, axes = plt.subplots(panels, 1, figsize=(8, 2.6 * panels), squeeze=False)
    axes = list(axes[:, 0])
    if table is not None:
        ax = axes.pop(0)
        data = table.drop(columns=[c for c in ("tokens",) if c in table.columns])
        im = ax.imshow(data.to_numpy(dtype=float), vmin=0, vmax=1, cmap="viridis", aspect="auto")
        ax.set_xticks(range(data.shape[1]), list(data.columns))
        ax.set_yticks(range(data.shape[0]), list(data.index))
        for i in range(data.shape[0]):
            for j in range(data.shape[1]):
                ax.text(j, i, f"{data.iat[i, j]:.2f}", ha="center", va="center", color="w")
        ax.set_title("mean gate weight (rows: domain, columns: expert)")
        fig.colorbar(im, ax=ax)
    for ax, tr in zip(axes, traces):
        w = np.asarray(tr.weights)[:max_tokens]
        x = np.arange(w.shape[0])
        ax.stackplot(x, w.T, labels=tr.experts, step="mid")
        ax.set_xlim(-0.5, max(w.shape[0] - 0.5, 0.5))
        ax.set_ylim(0, 1)
        ax.set_xticks(x, [repr(t)[1:-1] for t in tr.tokens[:max_tokens]], rotation=90, fontsize=7)
        ax.set_ylabel("gate weight")
        ax.set_title(f"per-token gate weights{f' ({tr.domain})' if tr.domain else ''}")
        ax.legend(loc="upper right", fontsize=7)
    fig.tight_layout()
    if path is not None:
        fig.savefig(path, dpi=110)
    return fig
