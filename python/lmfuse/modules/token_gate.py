"""``TokenGate``: the token-level gate of UltraFuser, one score per expert per token.

One small MLP ``g: R^H -> R`` (``Linear(H, inner) -> ReLU -> Linear(inner, 1)``) is shared by all
experts and applied to each expert's own final hidden state (the LM-head input) at the token;
a softmax over the E scores gives the blend weights::

    w[n, :] = softmax_e( g(h_e[n]) )                       [N, E], rows sum to 1

Experts with a different hidden size than ``hidden_size`` first go through their own
bias-free input projection ``Linear(H_e, hidden_size)`` into the shared space (the method
assumes equal sizes; the projection is the smallest change that keeps one shared scorer).

The output layer starts at zero, so a fresh gate gives every expert the weight ``1/E`` on every
token (the fused model starts as the plain average of the experts' logits) and training moves it
from there.
"""

from __future__ import annotations

from typing import Optional, Sequence

import torch
from torch import nn

__all__ = ["TokenGate"]


def _positive_int(name: str, value) -> int:
    if isinstance(value, bool) or not isinstance(value, int) or value < 1:
        raise ValueError(f"{name}: expected a positive int, got {value!r}")
    return value


class TokenGate(nn.Module):
    """Per-token blend weights over E experts from their final hidden states.

    Args:
        hidden_size: ``H``, the input size of the shared scorer.
        num_experts: ``E``.
        inner_size: width of the scorer's hidden layer (512 in UltraFuser).
        expert_hidden_sizes: ``[H_1, ..., H_E]`` when some expert's hidden size differs from
            ``hidden_size``; those experts get an input projection ``proj.<e>`` (``Linear(H_e, H)``,
            no bias). Default: every expert has ``hidden_size``.
        dtype, device: of the parameters (default float32, CPU).

    Parameters: ``scorer.0`` ``Linear(H, inner)``, ``scorer.2`` ``Linear(inner, 1)`` (zeros at
    start), and the projections.
    """

    def __init__(self, hidden_size: int, num_experts: int, inner_size: int = 512, *,
                 expert_hidden_sizes: Optional[Sequence[int]] = None, dtype: Optional[torch.dtype] = None,
                 device=None) -> None:
        super().__init__()
        self.hidden_size = _positive_int("hidden_size", hidden_size)
        self.num_experts = _positive_int("num_experts", num_experts)
        self.inner_size = _positive_int("inner_size", inner_size)
        if expert_hidden_sizes is None:
            sizes = [self.hidden_size] * self.num_experts
        else:
            sizes = list(expert_hidden_sizes)
            if len(sizes) != self.num_experts:
                raise ValueError(f"expert_hidden_sizes: expected {self.num_experts} sizes (num_experts), got {len(sizes)}")
            for i, s in enumerate(sizes):
                _positive_int(f"expert_hidden_sizes[{i}]", s)
        self.expert_hidden_sizes = tuple(sizes)
        kw = {"dtype": dtype, "device": device}
        self.proj = nn.ModuleDict({str(e): nn.Linear(s, self.hidden_size, bias=False, **kw)
                                   for e, s in enumerate(sizes) if s != self.hidden_size})
        self.scorer = nn.Sequential(nn.Linear(self.hidden_size, self.inner_size, **kw), nn.ReLU(),
                                    nn.Linear(self.inner_size, 1, **kw))
        with torch.no_grad():
            self.scorer[2].weight.zero_()
            self.scorer[2].bias.zero_()

    def extra_repr(self) -> str:
        return (f"hidden_size={self.hidden_size}, num_experts={self.num_experts}, inner_size={self.inner_size}"
                + (f", expert_hidden_sizes={list(self.expert_hidden_sizes)}" if self.proj else ""))

    def _check(self, hiddens) -> list[torch.Tensor]:
        if isinstance(hiddens, torch.Tensor) or not isinstance(hiddens, (list, tuple)):
            raise TypeError(f"hiddens: expected a list of {self.num_experts} tensors [N, H_e], got {type(hiddens).__name__}")
        if len(hiddens) != self.num_experts:
            raise ValueError(f"hiddens: expected {self.num_experts} tensors (num_experts), got {len(hiddens)}")
        lead = None
        for e, (h, size) in enumerate(zip(hiddens, self.expert_hidden_sizes)):
            if not isinstance(h, torch.Tensor) or not h.is_floating_point():
                raise TypeError(f"hiddens[{e}]: expected a floating-point tensor, got "
                                f"{h.dtype if isinstance(h, torch.Tensor) else type(h).__name__}")
            if h.dim() < 1 or h.shape[-1] != size:
                raise ValueError(f"hiddens[{e}]: expected shape [..., {size}], got {tuple(h.shape)}")
            if lead is None:
                lead = h.shape[:-1]
            elif h.shape[:-1] != lead:
                raise ValueError(f"hiddens[{e}]: leading shape {tuple(h.shape[:-1])} differs from hiddens[0]'s "
                                 f"{tuple(lead)}; the experts' token rows must be aligned")
        return list(hiddens)

    def scores(self, hiddens: Sequence[torch.Tensor]) -> torch.Tensor:
        """The pre-softmax scores ``[..., E]`` (in the gate's dtype) for hiddens ``E × [..., H_e]``."""
        hiddens = self._check(hiddens)
        dtype = self.scorer[0].weight.dtype
        cols = []
        for e, h in enumerate(hiddens):
            h = h.to(dtype)
            if str(e) in self.proj:
                h = self.proj[str(e)](h)
            cols.append(self.scorer(h))
        return torch.cat(cols, dim=-1)

    def forward(self, hiddens: Sequence[torch.Tensor]) -> torch.Tensor:
        """Blend weights ``[..., E]`` (softmax over experts, rows sum to 1; float32, float64 for a
        float64 gate) for the experts' hidden states ``E × [..., H_e]`` (any float dtype; cast to
        the gate's)."""
        s = self.scores(hiddens)
        return torch.softmax(s if s.dtype == torch.float64 else s.float(), dim=-1)
