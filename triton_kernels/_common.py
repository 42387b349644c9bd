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


# Ahead-of-time compile checks (tests/ops/triton_aot.py). Every kernel module defines
# ``aot_jobs()`` yielding ``AotJob``s: one per (kernel, shipped config, dtype) it can launch.
# The test compiles each for sm_80 and sm_90 and checks shared memory against the chip.
AOT_DTYPES = {"fp16": "*fp16", "bf16": "*bf16", "fp32": "*fp32"}


def aot_job(kernel: str, arg_names, arg_types: dict, constexprs: dict, num_warps: int,
            num_stages: int, label: str, default_type: str = "i32") -> dict:
    """Describe one compile. ``arg_types`` maps arguments to Triton types (pointers "*fp16",
    "*i64" …, scalars "fp32", "i64" …); constexprs get their values from ``constexprs``; every
    other argument is a scalar of ``default_type`` (sizes and strides)."""
    signature = {}
    for a in arg_names:
        if a in constexprs:
            signature[a] = "constexpr"
        else:
            signature[a] = arg_types.get(a, default_type)
    return {"kernel": kernel, "signature": signature, "constexprs": dict(constexprs),
            "num_warps": num_warps, "num_stages": num_stages, "label": label}
