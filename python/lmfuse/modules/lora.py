"""``LoRALinear``: an ``nn.Linear`` wrapped with a LoRA term, optionally gated per rank (SoRA).

    y = base(x) + scaling·((dropout(x)·Aᵀ) ⊙ gate)·Bᵀ,     scaling = lora_alpha / r

The wrapped layer stays a child module named ``base`` (its ``state_dict`` keys become
``base.weight`` / ``base.bias``), so attaching and detaching never copies the backbone's
weights. ``merge()`` folds the LoRA term into ``base.weight`` for zero-overhead inference,
``unmerge()`` takes it out again exactly, and ``compact()`` turns a gated (SoRA) layer into a
plain LoRA layer of the gate's non-zero ranks with the same outputs.
"""

from __future__ import annotations

import math
from typing import Optional

import torch
from torch import nn

from ..ops import gated_lora_linear, lora_linear


GATE_MARK = "_lmfuse_sora_gate"


def mark_gate(param: torch.Tensor) -> torch.Tensor:
    """Mark ``param`` as a SoRA gate, so :class:`lmfuse.sora.SparseGateOptimizer` recognises it
    in a flat parameter list such as ``model.parameters()`` (:class:`LoRALinear` marks its own
    gate, also after ``copy.deepcopy`` and pickling). Returns ``param``."""
    setattr(param, GATE_MARK, True)
    return param


def is_gate(param: torch.Tensor) -> bool:
    """Whether ``param`` carries the SoRA gate mark (see :func:`mark_gate`)."""
    return getattr(param, GATE_MARK, False) is True


class LoRALinear(nn.Module):
    """A frozen-or-not ``nn.Linear`` plus a (gated) low-rank update.

    Args:
        base: the ``nn.Linear`` to wrap (kept as the child ``base``; its parameters are not
            frozen here — freezing is the caller's choice).
        r: the LoRA rank (positive int).
        lora_alpha: ``scaling = lora_alpha / r``.
        dropout: dropout probability on the LoRA input only (as PEFT does); the base term
            always sees the undropped input.
        gated: add SoRA's per-rank ``gate [r]``; ``False`` gives plain LoRA (``gate is None``).
        generator: optional ``torch.Generator`` for the random initialisation.

    Parameters: ``lora_A [r, in_features]`` (Kaiming-uniform, like ``nn.Linear``),
    ``lora_B [out_features, r]`` (zeros: the wrapped model starts unchanged), ``gate [r]``
    (standard normal, as in SoRA's reference code ``nn.Parameter(torch.randn(1, r))``) or
    ``None``. All in ``base.weight``'s dtype and device.
    """

    def __init__(self, base: nn.Linear, r: int, lora_alpha: float = 16.0, dropout: float = 0.0,
                 gated: bool = False, *, generator: Optional[torch.Generator] = None) -> None:
        super().__init__()
        if not isinstance(base, nn.Linear):
            raise TypeError(f"base must be an nn.Linear, got {type(base).__name__}")
        if isinstance(r, bool) or not isinstance(r, int) or r < 1:
            raise ValueError(f"r must be a positive int, got {r!r}")
        if not 0.0 <= float(dropout) < 1.0:
            raise ValueError(f"dropout must be in [0, 1), got {dropout!r}")
        if isinstance(lora_alpha, bool) or not isinstance(lora_alpha, (int, float)) or not 0 < float(lora_alpha) < float("inf"):
            raise ValueError(f"lora_alpha must be a finite number > 0 (scaling = lora_alpha / r), got {lora_alpha!r}")
        self.base = base
        self.r = r
        self.lora_alpha = float(lora_alpha)
        self.scaling = self.lora_alpha / r
        self.dropout_p = float(dropout)
        self.lora_dropout = nn.Dropout(dropout) if dropout > 0 else nn.Identity()
        kw = {"device": base.weight.device, "dtype": base.weight.dtype}
        self.lora_A = nn.Parameter(torch.empty(r, base.in_features, **kw))
        self.lora_B = nn.Parameter(torch.zeros(base.out_features, r, **kw))
        self.gate = mark_gate(nn.Parameter(torch.empty(r, **kw))) if gated else None
        self.merged = False
        self.reset_lora_parameters(generator)

    def __setstate__(self, state) -> None:
        # copy.deepcopy and pickle rebuild the Parameter objects without their attributes
        super().__setstate__(state)
        if self._parameters.get("gate") is not None:
            mark_gate(self._parameters["gate"])

    @torch.no_grad()
    def reset_lora_parameters(self, generator: Optional[torch.Generator] = None) -> None:
        """``A`` Kaiming-uniform (a=√5, as ``nn.Linear``), ``B`` zeros, gate ~ N(0, 1)."""
        bound = 1.0 / math.sqrt(self.in_features)  # what kaiming_uniform_(a=√5) gives for fan_in
        a = torch.empty(self.lora_A.shape, dtype=torch.float32).uniform_(-bound, bound, generator=generator)
        self.lora_A.copy_(a)
        self.lora_B.zero_()
        if self.gate is not None:
            self.gate.copy_(torch.randn(self.r, generator=generator))

    @property
    def in_features(self) -> int:
        return self.base.in_features

    @property
    def out_features(self) -> int:
        return self.base.out_features

    @property
    def gated(self) -> bool:
        return self.gate is not None

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if self.merged:
            return self.base(x)
        w, b = self.base.weight, self.base.bias
        xl = self.lora_dropout(x) if (self.dropout_p > 0 and self.training) else None
        if self.gate is None:
            return lora_linear(x, w, b, self.lora_A, self.lora_B, self.scaling, lora_input=xl)
        return gated_lora_linear(x, w, b, self.lora_A, self.lora_B, self.gate, self.scaling, lora_input=xl)

    @torch.no_grad()
    def delta_weight(self) -> torch.Tensor:
        """``scaling·B·diag(gate)·A`` (``[out, in]``), computed in float32 or better."""
        ct = torch.promote_types(self.lora_A.dtype, torch.float32)
        b = self.lora_B.to(ct)
        if self.gate is not None:
            b = b * self.gate.to(ct)
        return (b @ self.lora_A.to(ct)) * self.scaling

    @torch.no_grad()
    def merge(self) -> None:
        """Fold the LoRA term into ``base.weight``; forward is then the base layer alone.

        The pre-merge weight is kept (a copy) so :meth:`unmerge` restores it bit for bit, even in
        low precision where ``(W + Δ) − Δ`` would not round back to ``W``.
        """
        if self.merged:
            return
        w = self.base.weight
        self._unmerged_weight = w.detach().clone()
        w.copy_((w.to(torch.promote_types(w.dtype, torch.float32)) + self.delta_weight()).to(w.dtype))
        self.merged = True

    @torch.no_grad()
    def unmerge(self) -> None:
        """Undo :meth:`merge` exactly (the LoRA parameters must not have changed since)."""
        if not self.merged:
            return
        self.base.weight.copy_(self._unmerged_weight)
        del self._unmerged_weight
        self.merged = False

    @torch.no_grad()
    def compact(self) -> "LoRALinear":
        """Gated layer → plain LoRA of the ranks whose gate is non-zero, same outputs.

        ``A' = A[idx]``, ``B' = B[:, idx]·diag(gate[idx])``, ``gate = None``, ``r = len(idx)``;
        ``scaling`` is kept as it was (``lora_alpha`` is rescaled to ``scaling·r'`` so the pair
        stays consistent). If every gate is zero, one rank is kept with ``B' = 0`` (a LoRA layer
        needs r ≥ 1). A plain LoRA layer is returned unchanged. Returns ``self``.
        """
        if self.gate is None:
            return self
        if self.merged:
            raise RuntimeError("compact() needs an unmerged layer: call unmerge() first")
        idx = torch.nonzero(self.gate).flatten()
        keep_zero = idx.numel() == 0
        if keep_zero:
            idx = torch.zeros(1, dtype=torch.long, device=self.gate.device)
        a = self.lora_A[idx].clone()
        b = self.lora_B[:, idx] * self.gate[idx]
        if keep_zero:
            b.zero_()
        req = self.lora_A.requires_grad
        self.lora_A = nn.Parameter(a, requires_grad=req)
        self.lora_B = nn.Parameter(b.contiguous(), requires_grad=req)
        self.gate = None
        self.r = int(idx.numel())
        self.lora_alpha = self.scaling * self.r
        return self

    def extra_repr(self) -> str:
        kind = "SoRA (gated)" if self.gate is not None else "LoRA"
        return (f"{kind}, in_features={self.in_features}, out_features={self.out_features}, r={self.r}, "
                f"scaling={self.scaling:g}, dropout={self.dropout_p:g}, merged={self.merged}")


__all__ = ["LoRALinear", "mark_gate", "is_gate"]
