"""SoRA's sparsifying scheduler: raise the threshold ξ in stages and record, at the end of
each stage, the gate sparsity, the LoRA parameters left after pruning and a metric.

Schedules (``xi_values(start, end, num_stages, kind)``), as in SoRA's code:

``linear``  evenly spaced ξ from ``start`` to ``end``
``log``     ``log(linspace(e^start, e^end))``: the steps grow towards ``end`` (for ξ ≪ 1 this is
            nearly linear; it matters for large ξ)
``exp``     ``exp(linspace(log start, log end))``: geometric, small steps first (``start > 0``)
"""

from __future__ import annotations

import math
from typing import Callable, Optional

import torch
from torch import nn

from .optim import SparseGateOptimizer, sparsity_stats

KINDS = ("linear", "log", "exp")


def xi_values(start: float, end: float, num_stages: int, kind: str = "linear") -> list[float]:
    """The ξ of each stage (``num_stages`` values from ``start`` to ``end`` inclusive)."""
    if kind not in KINDS:
        raise ValueError(f"kind must be one of {KINDS}, got {kind!r}")
    if not isinstance(num_stages, int) or num_stages < 1:
        raise ValueError(f"num_stages must be a positive int, got {num_stages!r}")
    if not 0 <= start <= end:
        raise ValueError(f"need 0 <= start <= end, got start={start!r}, end={end!r}")
    if kind == "exp" and start <= 0:
        raise ValueError("the 'exp' schedule is geometric and needs start > 0")
    t = torch.linspace(0, 1, num_stages, dtype=torch.float64)
    if kind == "linear":
        v = start + (end - start) * t
    elif kind == "log":
        v = torch.log(math.exp(start) + (math.exp(end) - math.exp(start)) * t)
    else:
        v = torch.exp(math.log(start) + (math.log(end) - math.log(start)) * t)
    return [float(x) for x in v]


class SparsifyScheduler:
    """Drives ``optimizer.xi`` through stages and logs each stage.

    Args:
        model: the model whose gated LoRA layers are measured.
        xis: ξ per stage (see :func:`xi_values`).
        steps_per_stage: optimizer steps spent at each ξ.
        metric_fn: optional ``callable() -> float`` evaluated at the end of each stage (e.g. the
            validation loss or accuracy); stored as ``"metric"``.
        optimizer: the :class:`SparseGateOptimizer` (or set later with :meth:`bind`).
        log: optional ``callable(dict)`` receiving each stage record as it is made.

    Call :meth:`step` after every optimizer step. ``history`` holds one record per finished
    stage: ``stage, xi, step, sparsity, nonzero_gates, gates, nonzero_params, params, metric``.
    """

    def __init__(self, model: nn.Module, xis: list[float], steps_per_stage: int,
                 metric_fn: Optional[Callable[[], float]] = None,
                 optimizer: Optional[SparseGateOptimizer] = None,
                 log: Optional[Callable[[dict], None]] = None) -> None:
        if not xis:
            raise ValueError("xis must hold at least one threshold")
        if not isinstance(steps_per_stage, int) or steps_per_stage < 1:
            raise ValueError(f"steps_per_stage must be a positive int, got {steps_per_stage!r}")
        self.model, self.xis, self.steps_per_stage = model, [float(x) for x in xis], steps_per_stage
        self.metric_fn, self.log = metric_fn, log
        self.history: list[dict] = []
        self.steps = 0
        self.optimizer = None
        if optimizer is not None:
            self.bind(optimizer)

    def bind(self, optimizer: SparseGateOptimizer) -> "SparsifyScheduler":
        if not isinstance(optimizer, SparseGateOptimizer):
            raise TypeError(f"optimizer must be a SparseGateOptimizer, got {type(optimizer).__name__}")
        self.optimizer = optimizer
        optimizer.xi = self.xis[min(self.stage, len(self.xis) - 1)]
        return self

    @property
    def stage(self) -> int:
        return self.steps // self.steps_per_stage

    @property
    def total_steps(self) -> int:
        return self.steps_per_stage * len(self.xis)

    @property
    def done(self) -> bool:
        return self.steps >= self.total_steps

    def step(self) -> Optional[dict]:
        """Count one optimizer step; at a stage's end, record it and move ξ on. Returns the
        record when a stage ended, else ``None``."""
        if self.optimizer is None:
            raise RuntimeError("bind() the SparseGateOptimizer first")
        if self.done:
            return None
        self.steps += 1
        if self.steps % self.steps_per_stage:
            return None
        finished = self.stage - 1
        rec = {"stage": finished, "xi": self.xis[finished], "step": self.steps, **sparsity_stats(self.model)}
        rec["metric"] = float(self.metric_fn()) if self.metric_fn is not None else None
        self.history.append(rec)
        if self.log is not None:
            self.log(rec)
        if not self.done:
            self.optimizer.xi = self.xis[self.stage]
        return rec

    def plot(self, path: str) -> None:
        """PNG: ξ against sparsity and the metric, one point per stage."""
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt

        if not self.history:
            raise RuntimeError("no stage has finished yet")
        xs = [r["xi"] for r in self.history]
        fig, ax = plt.subplots(figsize=(6, 4))
        ax.plot(xs, [r["sparsity"] for r in self.history], "o-", label="gate sparsity")
        ax.set_xlabel("ξ")
        ax.set_ylabel("fraction of zero gates")
        if any(r["metric"] is not None for r in self.history):
            ax2 = ax.twinx()
            ax2.plot(xs, [r["metric"] for r in self.history], "s--", color="tab:red", label="metric")
            ax2.set_ylabel("metric")
        ax.set_title("SoRA sparsifying schedule")
        fig.tight_layout()
        fig.savefig(path, dpi=120)
        plt.close(fig)
