"""``LowRankLinear``: a drop-in ``nn.Linear`` replacement computing ``(x Aᵀ) Bᵀ + b``."""

from __future__ import annotations

import math

import torch
from torch import nn

from ..ops import low_rank_linear


class LowRankLinear(nn.Module):
    """Linear map through a rank-``rank`` bottleneck, ``y = (x @ down_weightᵀ) @ up_weightᵀ + bias``.

    Args:
        in_features: size ``d_in`` of each input sample.
        out_features: size ``d_out`` of each output sample.
        rank: the bottleneck ``r`` (any positive integer; ranks ≤ 256 run fused on GPU).
        bias: learn an additive bias (like ``nn.Linear``).
        device, dtype: factory arguments, as for ``nn.Linear``.

    Parameters: ``down_weight [rank, in_features]``, ``up_weight [out_features, rank]``,
    ``bias [out_features]`` (or ``None``). Input ``[..., in_features]`` → output
    ``[..., out_features]``, float32 / float16 / bfloat16.
    """

    def __init__(self, in_features: int, out_features: int, rank: int, bias: bool = True,
                 device=None, dtype=None) -> None:
        super().__init__()
        for name, v in (("in_features", in_features), ("out_features", out_features), ("rank", rank)):
            if not isinstance(v, int) or v < 1:
                raise ValueError(f"{name} must be a positive int, got {v!r}")
        kw = {"device": device, "dtype": dtype}
        self.in_features, self.out_features, self.rank = in_features, out_features, rank
        self.down_weight = nn.Parameter(torch.empty(rank, in_features, **kw))
        self.up_weight = nn.Parameter(torch.empty(out_features, rank, **kw))
        self.bias = nn.Parameter(torch.empty(out_features, **kw)) if bias else None
        self.reset_parameters()

    def reset_parameters(self) -> None:
        """Each factor initialised like an ``nn.Linear`` of its own shape (Kaiming uniform)."""
        nn.init.kaiming_uniform_(self.down_weight, a=math.sqrt(5))
        nn.init.kaiming_uniform_(self.up_weight, a=math.sqrt(5))
        if self.bias is not None:
            bound = 1.0 / math.sqrt(self.in_features)
            nn.init.uniform_(self.bias, -bound, bound)

    @torch.no_grad()
    def init_from_dense(self, weight: torch.Tensor, bias: torch.Tensor | None = None) -> "LowRankLinear":
        """Truncated SVD of a dense ``[out, in]`` weight, split evenly: ``B = U√S``, ``A = √S Vᵀ``.

        When ``rank ≥ min(out, in)`` the product is the dense weight exactly (up to rounding);
        factor columns beyond ``min(out, in)`` are zero.
        """
        if tuple(weight.shape) != (self.out_features, self.in_features):
            raise ValueError(f"weight must be [{self.out_features}, {self.in_features}], got {tuple(weight.shape)}")
        U, S, Vh = torch.linalg.svd(weight.detach().double(), full_matrices=False)
        k = min(self.rank, S.shape[0])
        root = S[:k].sqrt()
        self.down_weight.zero_()
        self.up_weight.zero_()
        self.down_weight[:k].copy_(root[:, None] * Vh[:k])
        self.up_weight[:, :k].copy_(U[:, :k] * root[None, :])
        if self.bias is not None:
            if bias is None:
                self.bias.zero_()
            else:
                self.bias.copy_(bias.detach())
        return self

    @classmethod
    def from_linear(cls, linear: nn.Linear, rank: int, init: str = "svd", **kwargs) -> "LowRankLinear":
        """A ``LowRankLinear`` with ``linear``'s shape, dtype and device; ``init`` is ``"svd"``
        (truncated SVD of ``linear.weight``) or ``"random"``. ``kwargs`` go to the constructor."""
        if init not in ("svd", "random"):
            raise ValueError(f"init must be 'svd' or 'random', got {init!r}")
        w = linear.weight
        mod = cls(linear.in_features, linear.out_features, rank, bias=linear.bias is not None,
                  device=w.device, dtype=w.dtype, **kwargs)
        if init == "svd":
            mod.init_from_dense(w, linear.bias)
        return mod

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return low_rank_linear(x, self.down_weight, self.up_weight, self.bias)

    def extra_repr(self) -> str:
        return (f"in_features={self.in_features}, out_features={self.out_features}, rank={self.rank}, "
                f"bias={self.bias is not None}")
