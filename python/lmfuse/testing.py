"""Test helpers shared by lmfuse's tests and benchmarks: the one per-dtype tolerance table,
relative-error comparison against a float64 reference, output poisoning."""

from __future__ import annotations

import torch

# Relative error ‖out − ref‖ / ‖ref‖ allowed against a float64 reference, per dtype.
# (fp32 1e-5, tf32 5e-4, fp16 1e-3, bf16 1e-2 per the guide, plus headroom for the chained
# rounding of a two-GEMM op: the intermediate is rounded to the dtype before the second GEMM.)
TOLERANCE: dict[torch.dtype, float] = {
    torch.float64: 1e-12,
    torch.float32: 1e-5,
    torch.float16: 2e-3,
    torch.bfloat16: 1.6e-2,
}


def tolerance(dtype: torch.dtype) -> float:
    return TOLERANCE[dtype]


def rel_error(out: torch.Tensor, ref: torch.Tensor) -> float:
    """``‖out − ref‖₂ / ‖ref‖₂`` in float64 (0 when both are empty)."""
    if out.shape != ref.shape:
        raise AssertionError(f"shape mismatch: {tuple(out.shape)} vs reference {tuple(ref.shape)}")
    if out.numel() == 0:
        return 0.0
    o, r = out.detach().double(), ref.detach().double()
    if not torch.isfinite(o).all():
        raise AssertionError(f"output has {int((~torch.isfinite(o)).sum())} non-finite values")
    denom = r.norm().item()
    return (o - r).norm().item() / (denom if denom > 0 else 1.0)


def assert_close_to_reference(out: torch.Tensor, ref: torch.Tensor, dtype: torch.dtype, what: str = "output",
                              factor: float = 1.0) -> None:
    err = rel_error(out, ref)
    tol = TOLERANCE[dtype] * factor
    if not err <= tol:
        raise AssertionError(f"{what}: relative error {err:.3e} > {tol:.1e} ({dtype})")


def poison_(t: torch.Tensor) -> torch.Tensor:
    """Fill with NaN (floats) or a sentinel (ints) so an unwritten element is caught."""
    if t.is_floating_point():
        return t.fill_(float("nan"))
    return t.fill_(-(2**31) + 7)
