"""Helpers shared by every op: argument checks with clear messages, backend choice per call."""

from __future__ import annotations

import torch

from .._backend import BackendUnavailableError, choose_backend, cpu_flags, forced_backend

KERNEL_DTYPES = (torch.float32, torch.float16, torch.bfloat16)


def check_tensor(name: str, t, *, ndim: int | None = None, min_ndim: int | None = None,
                 dtypes: tuple[torch.dtype, ...] | None = None) -> None:
    if not isinstance(t, torch.Tensor):
        raise TypeError(f"{name} must be a torch.Tensor, got {type(t).__name__}")
    if ndim is not None and t.dim() != ndim:
        raise ValueError(f"{name} must be {ndim}-D, got shape {tuple(t.shape)}")
    if min_ndim is not None and t.dim() < min_ndim:
        raise ValueError(f"{name} must have at least {min_ndim} dimension(s), got shape {tuple(t.shape)}")
    if dtypes is not None and t.dtype not in dtypes:
        raise TypeError(f"{name} must have dtype in {[str(d) for d in dtypes]}, got {t.dtype}")


def check_same(first_name: str, first: torch.Tensor, **others: torch.Tensor | None) -> None:
    """Every tensor in ``others`` has ``first``'s dtype and device."""
    for name, t in others.items():
        if t is None:
            continue
        if t.dtype != first.dtype:
            raise TypeError(f"{name} has dtype {t.dtype} but {first_name} has {first.dtype}; they must match")
        if t.device != first.device:
            raise ValueError(f"{name} is on {t.device} but {first_name} is on {first.device}; they must match")


def check_dim(name: str, got: int, expected: int, what: str) -> None:
    if got != expected:
        raise ValueError(f"{name}: expected {what} = {expected}, got {got}")


def pick_backend(op: str, t: torch.Tensor, preference: dict[str, tuple[str, ...]],
                 unsupported: dict[str, str] | None = None) -> str:
    """Backend for one call.

    ``preference`` maps a device type, or a ``(device type, dtype)`` pair that overrides it, to
    backends in order. ``unsupported`` maps backends that cannot take *this* call (dtype, rank
    too large, ...) to the reason: they are skipped when choosing, and raise if forced."""
    unsupported = unsupported or {}
    forced = forced_backend()
    if forced is not None and forced in unsupported:
        raise BackendUnavailableError(f"{op}: backend {forced!r} is forced but cannot run this call: "
                                      f"{unsupported[forced]}")
    dev = t.device.type
    order = preference.get((dev, t.dtype), preference.get(dev, ("reference",)))
    pref = {dev: tuple(b for b in order if b not in unsupported)}
    for other, o in preference.items():  # the op's full backend list, for the forced-backend check
        if isinstance(other, str) and other != dev:
            pref[other] = o
    return choose_backend(op, dev, pref)


def dtype_limits(t: torch.Tensor, backends: tuple[str, ...]) -> dict[str, str]:
    if t.dtype in KERNEL_DTYPES:
        return {}
    return {b: f"kernels take {[str(d) for d in KERNEL_DTYPES]}, got {t.dtype}" for b in backends}


def grad_or_none(t: torch.Tensor, needed: bool) -> torch.Tensor | None:
    return t if needed else None


def empty_like_none(ref: torch.Tensor) -> torch.Tensor:
    """Placeholder output for a gradient that was not asked for (custom ops return tensors)."""
    return ref.new_empty((0,))


def cost_for_mode(fwd: tuple[int, int], bwd: tuple[int, int], mode: str) -> tuple[int, int]:
    """(flops, bytes) for a benchmark mode from the op's forward and backward formulas."""
    if mode == "fwd":
        return fwd
    if mode == "bwd":
        return bwd
    if mode == "full":
        return fwd[0] + bwd[0], fwd[1] + bwd[1]
    raise ValueError(f"mode must be 'fwd', 'bwd' or 'full', got {mode!r}")


def backward_frees_graph(grad: torch.Tensor) -> bool:
    """True in an eager backward whose graph is freed after it (no ``retain_graph`` /
    ``create_graph``): no later backward can read what the forward stored, so a gradient computed
    in the forward may be scaled in place and handed to autograd. False in traced backwards
    (torch.compile, opcheck: compiling, or tensor subclasses) and outside any backward (the engine
    then reports a kept graph)."""
    if type(grad) is not torch.Tensor or torch.compiler.is_compiling():
        return False
    return not torch._C._autograd._get_current_graph_task_keep_graph()


# -- GEMMs of bfloat16 / float16 operands on CPUs without native dot products of that dtype ----------
# On an x86 CPU with no AVX-512 BF16 / AMX (bf16) or AVX-512 FP16 / AMX-FP16 (fp16) instructions,
# torch's CPU GEMMs of that dtype are emulated: [2048, 576] x [576, 49152] in bf16 takes 6.7-7.3 s on
# an AVX2 EPYC where the float32 one takes 1.2-1.3 s. The chunked vocabulary paths then run their
# GEMMs in float32 on converted blocks of at most LOWP_BLOCK rows of the long dimension: the products
# of bf16/fp16 numbers are exact in float32 and accumulate in float32, as the native kernels do, and
# the result is rounded once to the output's dtype (the same rounding eager's GEMM applies).
LOWP_BLOCK = 2048
# None: decide from the CPU's flags; True / False force the float32 blocks on or off (tests).
LOWP_GEMM_IN_FLOAT32: bool | None = None
_NATIVE_FLAGS = {torch.bfloat16: ("avx512_bf16", "amx_bf16"), torch.float16: ("avx512_fp16", "amx_fp16")}


def lowp_gemm_in_float32(t: torch.Tensor) -> bool:
    """True when ``t``'s GEMMs should run through :func:`gemm`'s float32 blocks: a bfloat16 / float16
    CPU tensor on an x86 CPU without native dot products of its dtype (or when
    :data:`LOWP_GEMM_IN_FLOAT32` forces it)."""
    if t.device.type != "cpu" or t.dtype not in _NATIVE_FLAGS:
        return False
    if LOWP_GEMM_IN_FLOAT32 is not None:
        return LOWP_GEMM_IN_FLOAT32
    flags = cpu_flags()
    return flags is not None and flags[0] == "x86" and not any(f in flags[1] for f in _NATIVE_FLAGS[t.dtype])


def gemm(a: torch.Tensor, b: torch.Tensor, out: torch.Tensor | None = None, *, bias: torch.Tensor | None = None,
         add: bool = False) -> torch.Tensor:
    """``out = a·b (+ bias)`` or, with ``add``, ``out += a·b`` for 2-D ``a [M, K]``, ``b [K, N]`` of
    one dtype (any strides; ``bias [N]``), returned (a new tensor in a's dtype when ``out`` is None).

    Where :func:`lowp_gemm_in_float32` holds, the work runs in float32 on blocks of the longest of
    M, N, K (at most :data:`LOWP_BLOCK` of it, so the extra memory is a few float32 blocks, never a
    float32 copy of the operands) and each output element is rounded once to out's dtype, after the
    bias or the old value is added in float32; elsewhere it is one ``mm`` / ``addmm`` of torch."""
    M, K = a.shape
    N = b.shape[1]
    if out is None:
        out = torch.empty((M, N), dtype=a.dtype, device=a.device)
    if not lowp_gemm_in_float32(a):
        if add:
            return out.addmm_(a, b)
        if bias is not None:
            return torch.addmm(bias, a, b, out=out)
        return torch.mm(a, b, out=out)
    f32 = torch.float32
    if K >= max(M, N):  # the long dimension is contracted: accumulate over its blocks in float32
        acc = torch.zeros((M, N), dtype=f32, device=a.device) if bias is None else bias.to(f32).expand(M, N).clone()
        for k0 in range(0, K, LOWP_BLOCK):
            acc.addmm_(a[:, k0:k0 + LOWP_BLOCK].to(f32), b[k0:k0 + LOWP_BLOCK].to(f32))
        if add:
            acc += out
        return out.copy_(acc)
    if N >= M:  # blocks of output columns
        a32 = a.to(f32)
        for n0 in range(0, N, LOWP_BLOCK):
            blk = slice(n0, n0 + LOWP_BLOCK)
            r = a32 @ b[:, blk].to(f32)
            if bias is not None:
                r += bias[blk]
            if add:
                r += out[:, blk]
            out[:, blk] = r
        return out
    b32 = b.to(f32)  # blocks of output rows
    for m0 in range(0, M, LOWP_BLOCK):
        blk = slice(m0, m0 + LOWP_BLOCK)
        r = a[blk].to(f32) @ b32
        if bias is not None:
            r += bias
        if add:
            r += out[blk]
        out[blk] = r
    return out
