"""Test helpers shared by lmfuse's tests and benchmarks: the one per-dtype tolerance table,
norm-wise and elementwise comparison against a float64 reference.

Unwritten outputs are caught by the Triton launchers' own NaN poisoning
(``triton_kernels._common.POISON_OUTPUTS``, switched on by the op tests), where outputs are allocated."""

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


# Elementwise bound beside the norm-wise one, in units of the dtype's tolerance ``tol``:
#     |out − ref| ≤ tol · (ELEMENTWISE_ATOL_SCALE · max|ref| + ELEMENTWISE_RTOL_SCALE · |ref|)
# elementwise. The norm-wise error averages over all elements, so an error confined to a few
# entries can stay under it (one wrong entry among n is diluted by about √n); the absolute term,
# scaled to the reference's largest magnitude, catches such an entry without flagging the normal
# rounding of entries near zero.
ELEMENTWISE_ATOL_SCALE = 4.0
ELEMENTWISE_RTOL_SCALE = 4.0


def elementwise_excess(out: torch.Tensor, ref: torch.Tensor, tol: float) -> tuple[int, float, tuple[int, ...]]:
    """Check ``|out − ref| ≤ tol · (ELEMENTWISE_ATOL_SCALE · max|ref| + ELEMENTWISE_RTOL_SCALE · |ref|)``.

    ``out`` and ``ref``: same shape, any floating dtype (compared in float64).
    Returns ``(n_violations, worst_ratio, worst_index)`` where ``worst_ratio`` is the largest
    ``|out − ref| / bound`` (≤ 1 when the bound holds) and ``worst_index`` its position.
    """
    if out.shape != ref.shape:
        raise AssertionError(f"shape mismatch: {tuple(out.shape)} vs reference {tuple(ref.shape)}")
    if out.numel() == 0:
        return 0, 0.0, ()
    o, r = out.detach().double(), ref.detach().double()
    if not torch.isfinite(o).all():
        raise AssertionError(f"output has {int((~torch.isfinite(o)).sum())} non-finite values")
    scale = r.abs().max().item()
    bound = tol * (ELEMENTWISE_ATOL_SCALE * scale + ELEMENTWISE_RTOL_SCALE * r.abs())
    diff = (o - r).abs()
    if scale == 0:  # an all-zero reference: the output must be exactly zero
        bound = torch.zeros_like(diff)
        ratio = torch.where(diff > 0, torch.full_like(diff, float("inf")), torch.zeros_like(diff))
    else:
        ratio = diff / bound
    worst = int(ratio.argmax())
    idx = tuple(int(i) for i in torch.unravel_index(torch.tensor(worst), ratio.shape))
    return int((diff > bound).sum()), float(ratio.reshape(-1)[worst]), idx


def assert_close_to_reference(out: torch.Tensor, ref: torch.Tensor, dtype: torch.dtype, what: str = "output",
                              factor: float = 1.0) -> None:
    """Assert ``out`` matches the (float64) reference ``ref`` for an op computed in ``dtype``.

    Two bounds, both from ``TOLERANCE[dtype] · factor`` (= ``tol``): the norm-wise relative error
    ``‖out − ref‖₂ / ‖ref‖₂ ≤ tol`` and the elementwise bound of ``elementwise_excess``.
    ``out`` and ``ref`` must have the same shape; any floating dtypes.
    """
    err = rel_error(out, ref)
    tol = TOLERANCE[dtype] * factor
    if not err <= tol:
        raise AssertionError(f"{what}: relative error {err:.3e} > {tol:.1e} ({dtype})")
    n_bad, worst, idx = elementwise_excess(out, ref, tol)
    if n_bad:
        o, r = float(out.reshape(-1)[0] if not idx else out[idx]), float(ref[idx] if idx else ref.reshape(-1)[0])
        raise AssertionError(
            f"{what}: {n_bad} of {out.numel()} elements exceed the elementwise bound "
            f"tol·({ELEMENTWISE_ATOL_SCALE:g}·max|ref| + {ELEMENTWISE_RTOL_SCALE:g}·|ref|) with tol={tol:.1e} ({dtype}); "
            f"worst at index {idx}: output {o:.6g} vs reference {r:.6g} ({worst:.2f}× the bound); "
            f"norm-wise relative error {err:.3e}")


# -- two-process DDP runs ----------------------------------------------------------------------

def free_port() -> int:
    """A localhost TCP port that was free a moment ago (for a DDP rendezvous)."""
    import socket

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _ddp_entry(rank: int, worker, timeout_s: float, port: int, args: tuple) -> None:
    import faulthandler

    # a rank still running past the deadline prints every thread's Python stack to stderr first,
    # so a hung run says where it hung
    faulthandler.dump_traceback_later(timeout_s, exit=False)
    try:
        worker(rank, 2, port, *args)
    finally:
        faulthandler.cancel_dump_traceback_later()


def run_two_process_ddp(worker, args: tuple = (), *, timeout_s: float = 150.0, attempts: int = 2) -> None:
    """Run ``worker(rank, world_size=2, port, *args)`` in two spawned processes (a module-level
    function, e.g. one that calls ``init_process_group("gloo", ...)`` on ``127.0.0.1:port``).

    A worker that raises fails the call at once (``torch.multiprocessing`` re-raises it). A run
    that has not finished after ``timeout_s`` is killed, after each rank has printed its stacks to
    stderr, and started again on a fresh port, at most ``attempts`` times in all; then
    AssertionError. The retry is for a run that produced nothing (a rendezvous or collective that
    never completes: seen once, on 2026-12-01, in a test that otherwise takes ~8 s); what the
    workers compute is checked by the caller either way."""
    import time

    import torch.multiprocessing as mp

    for _ in range(attempts):
        ctx = mp.spawn(_ddp_entry, args=(worker, timeout_s, free_port(), tuple(args)), nprocs=2, join=False)
        deadline = time.monotonic() + timeout_s + 10
        while not ctx.join(timeout=5):
            if time.monotonic() > deadline:
                for p in ctx.processes:
                    p.kill()
                for p in ctx.processes:
                    p.join(timeout=10)
                break
        else:
            return
    raise AssertionError(f"DDP workers did not finish within {timeout_s:.0f} s in {attempts} attempts "
                         "(each rank's stacks are on stderr)")
