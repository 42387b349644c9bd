"""Structured projections for bottleneck adapters: the parameterised hypercomplex (PHM) layer of
Compacter (Mahabadi et al. 2021) and a plain low-rank layer.

PHM layer, ``y = x·Wᵀ + b`` with ``W [out, in] = Σ_{i<n} A_i ⊗ B_i``: ``A_i [n, n]`` are the
"rules" (per adapter, or one set shared by every adapter of a delta) and ``B_i [out/n, in/n]``
are either full matrices or, *factorised*, ``B_i = s_i · t_iᵀ`` with ``s_i [out/n, r]``,
``t_i [in/n, r]``. Writing ``x`` as ``n`` blocks ``x_p [in/n]``, block ``a`` of the output is
``y_a = Σ_i Σ_p A_i[a, p] · B_i · x_p``, which :func:`phm_apply` evaluates without forming ``W``.

When the structured product is cheaper: per token it costs about ``r·n·(in + out) + r·n³``
multiply-adds against ``in·out`` for the dense ``W``, so for factorised ``B_i`` with
``r·n·(in + out + n²) < in·out`` (any adapter of a real model: for SmolLM2, ``in = 576``,
``out = 36``, ``n = 4``, ``r = 1``: 2.5k against 20.7k) the layer applies the factors directly. With
full ``B_i`` the structured product costs as many multiply-adds as the dense one (``in·out``) in
``n`` smaller matrix products, so the layer then builds ``W`` (``n·in·out`` once per call) and runs
one dense product. :attr:`PHMLinear.structured` says which path a layer takes.
"""

from __future__ import annotations

import math
from typing import Optional

import torch
from torch import nn


def phm_weight(rules: torch.Tensor, left: torch.Tensor, right: Optional[torch.Tensor] = None) -> torch.Tensor:
    """The dense ``W [out, in] = Σ_i A_i ⊗ B_i``.

    Args:
        rules: ``A [n, n, n]`` (rule ``i`` is ``rules[i]``).
        left: ``B [n, out/n, in/n]`` when ``right`` is None, else ``s [n, out/n, r]``.
        right: ``t [n, in/n, r]`` for factorised ``B_i = s_i·t_iᵀ``.
    """
    b = left if right is None else left @ right.transpose(-1, -2)
    n, bo, bi = b.shape
    # kron(A_i, B_i)[(a, u), (p, q)] = A_i[a, p] · B_i[u, q]
    return torch.einsum("iap,iuq->aupq", rules, b).reshape(n * bo, n * bi)


def phm_apply(x: torch.Tensor, rules: torch.Tensor, left: torch.Tensor, right: torch.Tensor) -> torch.Tensor:
    """``x·Wᵀ`` for factorised ``W = Σ_i A_i ⊗ (s_i·t_iᵀ)`` without forming ``W``.

    ``x [..., in]`` → ``[..., out]``; ``rules [n, n, n]``, ``left = s [n, out/n, r]``,
    ``right = t [n, in/n, r]``; every tensor in one floating dtype.
    """
    n = rules.shape[0]
    xb = x.reshape(*x.shape[:-1], n, x.shape[-1] // n)          # [..., p, q]
    z = torch.einsum("...pq,iqr->...ipr", xb, right)             # t_iᵀ·x_p
    w = torch.einsum("iap,...ipr->...iar", rules, z)             # Σ_p A_i[a, p]·(…)
    y = torch.einsum("iur,...iar->...au", left, w)               # Σ_i s_i·(…)
    return y.reshape(*x.shape[:-1], n * left.shape[1])


def _uniform(shape, bound: float, generator, **kw) -> torch.Tensor:
    return torch.empty(shape).uniform_(-bound, bound, generator=generator).to(**kw)


class PHMLinear(nn.Module):
    """A PHM linear layer ``[..., in] → [..., out]`` (see the module docstring).

    ``rules`` is this layer's ``[n, n, n]`` rule tensor, or ``None`` to take the rules from
    ``shared`` (a module holding a ``rules`` parameter, owned by someone else: the adapter of the
    same layer, or the first adapter of a delta whose rules are shared). ``rank=None`` keeps full
    ``B_i``. ``zero=True`` starts with ``W = 0`` (the left factors, or the ``B_i``, are zeros).
    Glorot-uniform factors, rules ``N(0, rule_std²)``.
    """

    def __init__(self, d_in: int, d_out: int, n: int, rank: Optional[int], rules_owner: nn.Module,
                 zero: bool = False, generator=None, **kw):
        super().__init__()
        if d_in % n or d_out % n:
            raise ValueError(f"a PHM layer needs in ({d_in}) and out ({d_out}) features divisible by n={n}")
        self.d_in, self.d_out, self.n, self.rank = d_in, d_out, n, rank
        self.__dict__["_rules_owner"] = rules_owner  # not a sub-module: its parameters are not ours
        bi, bo = d_in // n, d_out // n
        if rank is None:
            bound = math.sqrt(6.0 / (bi + bo))
            self.left = nn.Parameter(torch.zeros(n, bo, bi, **kw) if zero else _uniform((n, bo, bi), bound, generator, **kw))
            self.right = None
        else:
            self.left = nn.Parameter(torch.zeros(n, bo, rank, **kw) if zero
                                     else _uniform((n, bo, rank), math.sqrt(6.0 / (bo + rank)), generator, **kw))
            self.right = nn.Parameter(_uniform((n, bi, rank), math.sqrt(6.0 / (bi + rank)), generator, **kw))
        self.bias = nn.Parameter(torch.zeros(d_out, **kw))

    @property
    def rules(self) -> torch.Tensor:
        return self._rules_owner.rules

    @property
    def structured(self) -> bool:
        """Whether forward applies the Kronecker factors directly (see the module docstring)."""
        if self.rank is None:
            return False
        n, r = self.n, self.rank
        return r * n * (self.d_in + self.d_out + n * n) < self.d_in * self.d_out

    def weight(self) -> torch.Tensor:
        """The dense ``W [out, in]``."""
        return phm_weight(self.rules, self.left, self.right)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if self.structured:
            return phm_apply(x, self.rules, self.left, self.right) + self.bias
        return nn.functional.linear(x, self.weight(), self.bias)


class PHMRules(nn.Module):
    """The rule matrices ``A [n, n, n]``, ``N(0, std²)``."""

    _lmfuse_delta_internal = True

    def __init__(self, n: int, std: float, generator=None, **kw):
        super().__init__()
        self.rules = nn.Parameter((torch.randn(n, n, n, generator=generator) * std).to(**kw))


class LowRankLinear(nn.Module):
    """``y = x·(U·V)ᵀ + b = (x·Vᵀ)·Uᵀ + b`` with ``U [out, k]``, ``V [k, in]`` (never forms ``U·V``).
    ``zero=True`` starts with ``U = 0``."""

    def __init__(self, d_in: int, d_out: int, rank: int, zero: bool = False, generator=None, **kw):
        super().__init__()
        self.u = nn.Parameter(torch.zeros(d_out, rank, **kw) if zero
                              else _uniform((d_out, rank), math.sqrt(6.0 / (d_out + rank)), generator, **kw))
        self.v = nn.Parameter(_uniform((rank, d_in), math.sqrt(6.0 / (d_in + rank)), generator, **kw))
        self.bias = nn.Parameter(torch.zeros(d_out, **kw))

    def weight(self) -> torch.Tensor:
        return self.u @ self.v

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return (x @ self.v.t()) @ self.u.t() + self.bias


class StructuredBottleneck(nn.Module):
    """``up(act(down(x)))`` with PHM (``kind="compacter"``) or low-rank (``"low_rank_adapter"``)
    projections; ``up`` starts at zero, so the adapter starts as the identity. ``shared_rules``: a
    :class:`PHMRules` to use instead of this adapter's own rules (Compacter with shared rules)."""

    def __init__(self, kind: str, dim: int, bottleneck: int, act: nn.Module, cfg, shared_rules=None,
                 generator=None, **kw):
        super().__init__()
        self.act = act
        if kind == "compacter":
            rank = cfg.rank if cfg.factorized else None
            if shared_rules is None:
                self.rules = PHMRules(cfg.n, cfg.rule_init_std, generator, **kw)
                owner = self.rules
            else:
                owner = shared_rules
                self.__dict__["_shared_rules"] = shared_rules
            self.down = PHMLinear(dim, bottleneck, cfg.n, rank, owner, generator=generator, **kw)
            self.up = PHMLinear(bottleneck, dim, cfg.n, rank, owner, zero=True, generator=generator, **kw)
        else:
            self.down = LowRankLinear(dim, bottleneck, cfg.rank, generator=generator, **kw)
            self.up = LowRankLinear(bottleneck, dim, cfg.rank, zero=True, generator=generator, **kw)

    def forward(self, x):
        return self.up(self.act(self.down(x)))


def reference_adapter(h: torch.Tensor, down_w: torch.Tensor, down_b: torch.Tensor, up_w: torch.Tensor,
                      up_b: torch.Tensor, act, scale: float) -> torch.Tensor:
    """``h + scale·(act(h·Wdᵀ + bd)·Wuᵀ + bu)`` from dense weights, in float64: the oracle the
    structured adapters are tested against."""
    h, down_w, down_b, up_w, up_b = (t.double() for t in (h, down_w, down_b, up_w, up_b))
    return h + scale * (act(h @ down_w.t() + down_b) @ up_w.t() + up_b)
