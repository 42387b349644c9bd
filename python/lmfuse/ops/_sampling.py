"""Sampling pieces shared by the decode-time ops (``spec_verify``, ``collab_decode_step``) and
their kernels: the reproducible noise, the top-k / top-p thresholds, generator handling.

Noise. Every backend must draw the *same* numbers for one ``torch.Generator`` state, yet a
``[B, V]`` noise tensor per call would cost as much memory traffic as the logits themselves.
So the host draws only small tensors from the generator (one uniform per draft position, two
32-bit seeds per row) and the V exponentials a row needs are a counter-based hash of
``(seeds, token id)``, evaluated inside each kernel:

    h = mix(mix(v ^ s0) ^ s1)            (uint32; ``mix`` is the "lowbias32" integer finaliser)
    u = ((h >> 9) + 0.5) · 2⁻²³          (exactly representable in fp32, in (0, 1))
    E = −log(u)                          (an Exp(1) draw; fp32)

Sampling token ``v`` with probability ∝ ``w_v`` is then ``argmax_v w_v / E_v`` (the
exponential race, equivalent to the Gumbel-max trick), first index on ties. The backends agree
bit for bit on ``u``; ``log``/``exp`` may differ in the last ulp, which can only flip a near-tie.

Filtering. ``top_k`` / ``top_p`` become one fp32 threshold per distribution: a token is kept
iff its temperature-scaled logit is ``>= threshold`` (ties with the threshold are kept). top-k
is applied first, then top-p on the renormalised top-k distribution (the order of Hugging Face's
warpers). Thresholds are computed here, in row chunks so no ``[rows, V]`` fp32 copy of the
whole batch exists at once, and handed to every backend, so all of them filter identically.
"""

from __future__ import annotations

import math
from typing import Optional

import torch
from torch import Tensor

_M1 = 0x7FEB352D
_M2 = 0x846CA68B
_MASK32 = 0xFFFFFFFF
_CHUNK_ELEMS = 1 << 22  # rows per chunk × V when computing thresholds (16 MiB of fp32)


def _mul32(x: Tensor, c: int) -> Tensor:
    """(x · c) mod 2³² for int64 ``x`` in [0, 2³²) without int64 overflow (c split in halves)."""
    lo = (x * (c & 0xFFFF)) & _MASK32
    hi = ((x * (c >> 16)) & 0xFFFF) << 16
    return (lo + hi) & _MASK32


def _mix32(x: Tensor) -> Tensor:
    x = x ^ (x >> 16)
    x = _mul32(x, _M1)
    x = x ^ (x >> 15)
    x = _mul32(x, _M2)
    return x ^ (x >> 16)


def noise_uniform(seeds: Tensor, n: int) -> Tensor:
    """``u [rows, n]`` fp32 in (0, 1) from ``seeds [rows, 2]`` (int64 holding uint32 values)."""
    if seeds.device.type == "cpu":
        # numpy's uint32 arithmetic wraps natively and is ~10x faster here than torch's int64 emulation
        import numpy as np

        sd = seeds.numpy().astype(np.uint32)
        v = np.arange(n, dtype=np.uint32)[None, :]
        h = _mix32_np(_mix32_np(v ^ sd[:, :1]) ^ sd[:, 1:2])
        return (torch.from_numpy((h >> np.uint32(9)).astype(np.float32)) + 0.5) * (2.0 ** -23)
    v = torch.arange(n, device=seeds.device, dtype=torch.int64)[None, :]
    s0, s1 = seeds[:, :1], seeds[:, 1:2]
    h = _mix32(_mix32(v ^ s0) ^ s1)
    return ((h >> 9).to(torch.float32) + 0.5) * (2.0 ** -23)


def _mix32_np(x):
    import numpy as np

    x = x ^ (x >> np.uint32(16))
    x = x * np.uint32(_M1)
    x = x ^ (x >> np.uint32(15))
    x = x * np.uint32(_M2)
    return x ^ (x >> np.uint32(16))


def noise_exponential(seeds: Tensor, n: int) -> Tensor:
    """``E [rows, n]`` fp32 Exp(1) draws: ``-log(noise_uniform(seeds, n))``."""
    return -torch.log(noise_uniform(seeds, n))


def resolve_generator(generator, device: torch.device) -> Optional[torch.Generator]:
    """``None`` (global RNG), a ``torch.Generator``, or an int seed (a fresh CPU generator)."""
    if generator is None or isinstance(generator, torch.Generator):
        return generator
    if isinstance(generator, int) and not isinstance(generator, bool):
        g = torch.Generator(device="cpu")
        g.manual_seed(generator)
        return g
    raise TypeError(f"generator must be a torch.Generator, an int seed or None, got {type(generator).__name__}")


def draw_uniform(shape, generator: Optional[torch.Generator], device: torch.device) -> Tensor:
    """fp32 uniforms in [0, 1) from ``generator`` (drawn on its device, then moved)."""
    gdev = generator.device if generator is not None else device
    return torch.rand(shape, generator=generator, device=gdev, dtype=torch.float32).to(device)


def draw_seeds(rows: int, generator: Optional[torch.Generator], device: torch.device) -> Tensor:
    """``[rows, 2]`` int64 holding two uint32 seeds per row."""
    gdev = generator.device if generator is not None else device
    return torch.randint(0, 2**32, (rows, 2), generator=generator, device=gdev, dtype=torch.int64).to(device)


def check_sampling_args(temperature, top_k, top_p) -> None:
    if isinstance(temperature, bool) or not isinstance(temperature, (int, float)):
        raise TypeError(f"temperature must be a float, got {type(temperature).__name__}")
    if not (math.isfinite(temperature) and temperature >= 0):
        raise ValueError(f"temperature must be finite and >= 0 (0 = greedy), got {temperature}")
    if top_k is not None:
        if isinstance(top_k, bool) or not isinstance(top_k, int):
            raise TypeError(f"top_k must be an int or None, got {type(top_k).__name__}")
        if top_k < 1:
            raise ValueError(f"top_k must be >= 1, got {top_k}")
    if top_p is not None:
        if isinstance(top_p, bool) or not isinstance(top_p, (int, float)):
            raise TypeError(f"top_p must be a float or None, got {type(top_p).__name__}")
        if not (0.0 < top_p <= 1.0):
            raise ValueError(f"top_p must be in (0, 1], got {top_p}")


def _active_filters(V: int, top_k: Optional[int], top_p: Optional[float]):
    k = top_k if (top_k is not None and top_k < V) else None
    p = top_p if (top_p is not None and top_p < 1.0) else None
    return k, p


def filter_thresholds(logits: Tensor, inv_temperature: float, top_k: Optional[int],
                      top_p: Optional[float]) -> Optional[Tensor]:
    """fp32 thresholds ``[...]`` on the scaled logits ``logits·inv_temperature`` (``[..., V]``).

    ``None`` when neither filter is active (``top_k >= V`` and ``top_p == 1`` are no-ops).
    Every backend of an op gets the thresholds from here, so all of them filter identically.
    CPU tensors go to the C++ selection in ``lmfuse._C`` (no full sort: the kept set is found
    from the top in growing blocks); other devices, and traces under ``torch.compile``, use
    :func:`filter_thresholds_reference`. Both sum the probability mass in float64; they agree
    except where the mass above a token lies within rounding of ``top_p`` (tested).
    """
    V = logits.shape[-1]
    k, p = _active_filters(V, top_k, top_p)
    if k is None and p is None:
        return None
    # top-k alone is one torch.topk (already O(V) and multithreaded): no need for the extension
    if p is not None and logits.device.type == "cpu" and not torch.compiler.is_compiling():
        from lmfuse import _backend

        ext = _backend.cpu_extension()
        if ext is not None and hasattr(ext, "filter_thresholds"):
            flat = logits.reshape(-1, V)
            if k is not None:  # top-p among the k largest: torch.topk is faster than nth_element
                flat = torch.topk(flat, k, dim=-1, sorted=False).values
            out = ext.filter_thresholds(flat.contiguous(), inv_temperature, float(p))
            return out.reshape(logits.shape[:-1])
    return filter_thresholds_reference(logits, inv_temperature, top_k, top_p)


def filter_thresholds_reference(logits: Tensor, inv_temperature: float, top_k: Optional[int],
                                top_p: Optional[float]) -> Optional[Tensor]:
    """The readable definition of :func:`filter_thresholds` in PyTorch (full sort per row)."""
    V = logits.shape[-1]
    k, p = _active_filters(V, top_k, top_p)
    if k is None and p is None:
        return None
    flat = logits.reshape(-1, V)
    out = torch.empty(flat.shape[0], device=logits.device, dtype=torch.float32)
    step = max(1, _CHUNK_ELEMS // V)
    for r0 in range(0, flat.shape[0], step):
        x = flat[r0:r0 + step].to(torch.float32) * inv_temperature
        if p is None:
            out[r0:r0 + step] = torch.topk(x, k, dim=-1).values[:, -1]
            continue
        srt = torch.sort(x, dim=-1, descending=True).values
        if k is not None:
            srt[:, k:] = float("-inf")
        # the mass in float64: in float32 the cumulative sum over thousands of kept tokens of a
        # flat distribution drifts by ~1e-6 and moves the cut by a token
        probs = torch.softmax(srt.double(), dim=-1)
        before = torch.cumsum(probs, dim=-1) - probs  # mass strictly above each sorted token
        keep = (before < p).sum(-1).clamp_min(1)      # the token crossing top_p is kept
        out[r0:r0 + step] = srt.gather(1, (keep - 1)[:, None]).squeeze(1)
    return out.reshape(logits.shape[:-1])


def apply_threshold(scaled: Tensor, threshold: Optional[Tensor]) -> Tensor:
    """Scaled logits with the tokens below ``threshold`` set to −inf."""
    if threshold is None:
        return scaled
    return scaled.masked_fill(scaled < threshold[..., None], float("-inf"))


def inv_temperature(temperature: float) -> float:
    """1/T rounded to fp32, the value every backend multiplies the logits by (0 for greedy)."""
    return float(torch.tensor(1.0 / temperature, dtype=torch.float32)) if temperature > 0 else 0.0
