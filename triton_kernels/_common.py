"""Helpers shared by the Triton launchers."""

from __future__ import annotations

import torch

# Tests set this to True to fill every output with NaN before the kernels run, so an element a
# kernel forgot to write is caught (torch.empty may hand back memory that happens to be right).
POISON_OUTPUTS = False


def new_output(shape, like: torch.Tensor) -> torch.Tensor:
    """An uninitialised output with ``like``'s dtype and device (NaN-filled when poisoning)."""
    out = torch.empty(shape, device=like.device, dtype=like.dtype)
    if POISON_OUTPUTS:
        out.fill_(float("nan"))
    return out
