"""Decode-time expert blending: blend the E experts' last-position logits with the gate, sample.

``torch.ops.lmfuse.expert_blend_logits`` forms the blended log-scores ``s [B, V']`` (float32;
float64 for float64 inputs) over the first ``V' = vocab_size`` entries of every expert's logits:

* ``blend="logits"``: ``s = Σ_e gate_e·logits_e`` (softmax(s) is UltraFuser's distribution);
* ``blend="probs"``: ``s = log(Σ_e gate_e·softmax(logits_e) / Σ_e gate_e)``, the normalised
  log-mixture (gates ≥ 0 with a positive sum per row).

:func:`expert_blend_decode_step` then hands ``s`` to the library's one sampler,
:func:`lmfuse.ops.collab_decode_step` (``mode="none"``): greedy at ``temperature == 0`` (the
lowest index among tied maxima), otherwise a draw from ``softmax(s / T)`` restricted by top-k and
then top-p (thresholds, noise and generator handling of :mod:`lmfuse.ops._sampling`, on its ``cpp``
/ ``triton`` / ``reference`` backends). For ``"probs"``, ``softmax(s / T)`` is the mixture raised
to the power ``1/T`` and renormalised. The returned ``log_probs`` is ``log softmax(s)[token]``: the
chosen token's log-probability under the blended distribution at temperature 1, before top-k /
top-p filtering (the model's own probability of the token, what a scorer or a speculative
verifier needs), not under the tempered, filtered distribution it was drawn from.
"""

from __future__ import annotations

from typing import NamedTuple, Optional, Sequence

import torch
from torch import Tensor

from ._common import check_tensor
from .collab_logits import collab_decode_step

BLENDS = ("logits", "probs")


class BlendDecodeResult(NamedTuple):
    tokens: Tensor     # [B] int64
    log_probs: Tensor  # [B] float32: log p(token) under the blended distribution at temperature 1, unfiltered
    gate: Tensor       # [B, E] float32: the blend weights used


def _blend(logits: Sequence[Tensor], gate: Tensor, blend: str, vocab_size: int) -> Tensor:
    ct = torch.float64 if logits[0].dtype == torch.float64 else torch.float32
    g = gate.to(ct)
    if blend == "logits":
        s = logits[0][:, :vocab_size].to(ct) * g[:, 0:1]
        for e in range(1, len(logits)):
            s.addcmul_(logits[e][:, :vocab_size].to(ct), g[:, e:e + 1])
        return s
    q = torch.softmax(logits[0][:, :vocab_size].to(ct), -1).mul_(g[:, 0:1])
    for e in range(1, len(logits)):
        q.addcmul_(torch.softmax(logits[e][:, :vocab_size].to(ct), -1), g[:, e:e + 1])
    return q.log_().sub_(torch.log(g.sum(1, keepdim=True)))


@torch.library.custom_op("lmfuse::expert_blend_logits", mutates_args=())
def _blend_op(logits: list[Tensor], gate: Tensor, blend: str, vocab_size: int) -> Tensor:
    return _blend(logits, gate, blend, vocab_size)


@_blend_op.register_fake
def _blend_fake(logits, gate, blend, vocab_size):
    ct = torch.float64 if logits[0].dtype == torch.float64 else torch.float32
    return logits[0].new_empty((logits[0].shape[0], vocab_size), dtype=ct)


def _validate(logits, gate, blend, vocab_size):
    if isinstance(logits, Tensor) or not isinstance(logits, (list, tuple)):
        raise TypeError(f"logits must be a list or tuple of E tensors [B, V_e], got {type(logits).__name__}")
    logits = list(logits)
    if not logits:
        raise ValueError("logits must hold at least one expert's logits")
    if blend not in BLENDS:
        raise ValueError(f"blend must be one of {BLENDS}, got {blend!r}")
    first = logits[0]
    for e, t in enumerate(logits):
        check_tensor(f"logits[{e}]", t, ndim=2)
        if not t.is_floating_point():
            raise TypeError(f"logits[{e}] must be a floating-point tensor, got {t.dtype}")
        if t.dtype != first.dtype:
            raise TypeError(f"logits[{e}] has dtype {t.dtype} but logits[0] has {first.dtype}; they must match")
        if t.device != first.device:
            raise ValueError(f"logits[{e}] is on {t.device} but logits[0] is on {first.device}; they must match")
        if t.shape[0] != first.shape[0]:
            raise ValueError(f"logits[{e}] has {t.shape[0]} rows but logits[0] has {first.shape[0]}; they must match")
        if t.shape[1] < 1 or t.shape[0] < 1:
            raise ValueError(f"logits[{e}] must be [B, V_e] with B, V_e >= 1, got {tuple(t.shape)}")
    from .expert_blend import _check_gate, _eager_cpu, _vocab

    E, B = len(logits), first.shape[0]
    _check_gate(gate, E, "B", B, first.device)
    vs = _vocab([t.shape[1] for t in logits], vocab_size)
    if blend == "probs" and _eager_cpu(gate):
        if bool((gate < 0).any()) or bool((gate.sum(1) <= 0).any()):
            raise ValueError("blend='probs' needs non-negative gates with a positive sum per row (a mixture of "
                             "distributions)")
    return logits, vs


def blend_logits(logits: Sequence[Tensor], gate: Tensor, *, blend: str = "logits",
                 vocab_size: Optional[int] = None) -> Tensor:
    """The blended log-scores ``[B, V']`` float32 (float64 for float64 inputs) of E experts'
    logits ``logits[e]`` ``[B, V_e]`` and ``gate`` ``[B, E]`` (see the module docstring); for
    custom samplers and logits processors. Not differentiable."""
    logits, vs = _validate(logits, gate, blend, vocab_size)
    return torch.ops.lmfuse.expert_blend_logits(logits, gate, blend, vs)


def expert_blend_decode_step(logits: Sequence[Tensor], gate: Tensor, *, blend: str = "logits",
                             vocab_size: Optional[int] = None, temperature: float = 1.0,
                             top_k: Optional[int] = None, top_p: Optional[float] = None,
                             generator=None) -> BlendDecodeResult:
    """One decoding step of a gate-blended ensemble: blend, then sample one token per row.

    Args:
        logits: E tensors ``[B, V_e]`` (one floating dtype and device): each expert's logits at the
            current position. The first ``vocab_size`` columns are used.
        gate: ``[B, E]`` floating blend weights (``"probs"``: non-negative, positive row sums).
        blend: ``"logits"`` or ``"probs"`` (as :func:`expert_blend_cross_entropy`).
        vocab_size: the common vocabulary V'; required when the experts' widths differ.
        temperature: ``0`` is greedy (lowest index among ties); otherwise > 0.
        top_k, top_p: filters on the tempered blended distribution (top-k first), or None.
        generator: a ``torch.Generator``, an int seed, or None (the global RNG); the same
            generator state gives the same tokens on every backend.

    Returns:
        ``BlendDecodeResult(tokens [B] int64, log_probs [B] float32, gate [B, E] float32)``;
        ``log_probs`` is ``log p(token)`` under the blended distribution at temperature 1, before
        top-k / top-p (the module docstring says why).
    """
    logits, vs = _validate(logits, gate, blend, vocab_size)
    s = torch.ops.lmfuse.expert_blend_logits(logits, gate, blend, vs)
    res = collab_decode_step(s, temperature=temperature, top_k=top_k, top_p=top_p, generator=generator)
    tokens = res.tokens
    log_probs = (s.gather(1, tokens[:, None]).squeeze(1) - torch.logsumexp(s, 1)).float()
    return BlendDecodeResult(tokens, log_probs, gate.detach().float())


__all__ = ["expert_blend_decode_step", "blend_logits", "BlendDecodeResult"]
