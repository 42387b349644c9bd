"""Fused q/k/v low-rank projections that stay drop-in for Hugging Face attention modules.

HF attention calls ``q_proj(h)``, ``k_proj(h)``, ``v_proj(h)`` one after another on the same
``h``. The three ``QKVLowRankLinear`` members of one :class:`FusedQKVGroup` keep their own
parameters (so ``state_dict`` keys stay ``q_proj.down_weight`` …), but the first call computes
all three projections with :func:`lmfuse.ops.lpa_qkv_projection` (x read once, one down GEMM)
and hands k and v to the next two calls. Any call that does not follow that pattern (another
input, another order) simply computes its own projection, so results are always correct; the
group only decides whether they come from the fused launch.
"""

from __future__ import annotations

import torch

from ..ops import lpa_qkv_projection
from .low_rank_linear import LowRankLinear

ROLES = ("q", "k", "v")


class FusedQKVGroup:
    """Shared state of three ``QKVLowRankLinear`` modules (plain object: owns no parameters)."""

    def __init__(self) -> None:
        self.members: dict[str, QKVLowRankLinear] = {}  # strong refs, so deepcopy maps them
        self._input = None  # the tensor the pending k/v were computed from
        self._pending: dict[str, torch.Tensor] = {}
        self.fused_calls = 0  # counters, so tests and users can see the fused path is taken

    def attach(self, role: str, module: "QKVLowRankLinear") -> None:
        self.members[role] = module

    def _modules(self):
        mods = [self.members.get(r) for r in ROLES]
        return None if any(m is None for m in mods) else mods

    def can_fuse(self) -> bool:
        mods = self._modules()
        return mods is not None and len({m.rank for m in mods}) == 1

    def run(self, role: str, x: torch.Tensor) -> torch.Tensor | None:
        """The fused result for ``role``, or None when the call must compute on its own."""
        if role == "q":
            if not self.can_fuse():
                return None
            q_mod, k_mod, v_mod = self._modules()
            q, k, v = lpa_qkv_projection(
                x, (q_mod.down_weight, k_mod.down_weight, v_mod.down_weight),
                (q_mod.up_weight, k_mod.up_weight, v_mod.up_weight),
                (q_mod.bias, k_mod.bias, v_mod.bias))
            self._input, self._pending = x, {"k": k, "v": v}
            self.fused_calls += 1
            return q
        if self._input is x and role in self._pending:
            out = self._pending.pop(role)
            if not self._pending:
                self._input = None
            return out
        return None

    def clear(self) -> None:
        self._input, self._pending = None, {}


class QKVLowRankLinear(LowRankLinear):
    """A ``LowRankLinear`` that is the q, k or v member of a :class:`FusedQKVGroup`."""

    def __init__(self, *args, role: str, group: FusedQKVGroup, **kwargs) -> None:
        if role not in ROLES:
            raise ValueError(f"role must be one of {ROLES}, got {role!r}")
        super().__init__(*args, **kwargs)
        self.role = role
        self._group = group  # a plain attribute: nn.Module does not register it
        group.attach(role, self)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        out = self._group.run(self.role, x)
        return super().forward(x) if out is None else out

    def extra_repr(self) -> str:
        return super().extra_repr() + f", fused_qkv_role={self.role!r}"
