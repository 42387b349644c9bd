"""``spec_verify``: batched verification of drafted tokens (speculative sampling).

For each row ``b`` with ``n_b`` drafted tokens ``x_0 … x_{n_b−1}``:

* ``temperature > 0`` — accept ``x_i`` with probability ``min(1, p_i(x_i) / q_i(x_i))`` (the
  test is ``u_i · q_i(x_i) < p_i(x_i)``); at the first rejection emit a sample of
  ``normalize(max(p_i − q_i, 0))``; when all ``n_b`` are accepted emit a bonus sample of
  ``p_{n_b}``. ``p``/``q`` are the temperature-scaled, top-k/top-p filtered softmaxes of the
  target/draft logits. Without ``draft_logits`` the drafter is deterministic: ``q`` is one-hot,
  the acceptance probability is ``p_i(x_i)`` and the residual is ``p_i`` with ``x_i`` removed.
  The first emitted token is then distributed exactly as ``p_0`` (Leviathan et al., 2023).
* ``temperature == 0`` — greedy: accept while ``x_i == argmax p_i``; emit the target argmax
  at the first mismatch (or as the bonus).

Randomness comes from a ``torch.Generator`` through small host-drawn tensors (see
``_sampling``), so every backend returns the same tokens for the same generator state.

Backends: ``cuda`` (one block per request), ``triton`` (one program per request, passes over V
in blocks), ``cpp`` (one OpenMP task per request), ``reference`` (plain PyTorch, materialises
the softmaxes: it is the readable definition, not a fast path). The kernels never build a
``[B, k+1, V]`` fp32 tensor: they stream the logits once per position they need (stopping at
the first rejection) plus one more pass at the emitting position.

Registered as ``torch.ops.lmfuse.spec_verify`` (with a fake implementation).
"""

from __future__ import annotations

from typing import NamedTuple, Optional

import torch
from torch import Tensor

from . import _sampling
from ._common import KERNEL_DTYPES, check_tensor, pick_backend

PREFERENCE = {"cuda": ("cuda", "triton", "reference"), "cpu": ("cpp", "reference")}


class SpecVerifyResult(NamedTuple):
    """``tokens [B, k+1]`` int64: accepted drafts, then the correction/bonus token, then -1.
    ``num_accepted [B]`` int64: accepted drafts per row (the row holds ``num_accepted + 1`` tokens)."""

    tokens: Tensor
    num_accepted: Tensor


def cost(batch: int, k: int, vocab: int, dtype_bytes: int, has_draft_logits: bool = True) -> tuple[int, int]:
    """(flops, bytes) of the worst case (every draft accepted): every logit read once."""
    elems = batch * (k + 1) * vocab + (batch * k * vocab if has_draft_logits else 0)
    return 4 * elems, dtype_bytes * elems + 8 * batch * (2 * k + 3)


def reference(draft_token_ids: Tensor, draft_logits: Optional[Tensor], target_logits: Tensor,
              num_draft_tokens: Tensor, accept_uniforms: Tensor, seeds: Tensor, temperature: float,
              target_threshold: Optional[Tensor] = None, draft_threshold: Optional[Tensor] = None
              ) -> SpecVerifyResult:
    """Plain-PyTorch speculative verification with explicit noise (float32, or float64 for
    float64 logits). ``accept_uniforms [B, k]`` in [0, 1), ``seeds [B, 2]`` (see ``_sampling``),
    thresholds ``[B, k+1]`` / ``[B, k]`` or None. Raises ``ValueError`` on NaN / +inf logits or a
    distribution with no finite logit in any position it reads (see ``_check_read_positions``)."""
    B, k = draft_token_ids.shape
    V = target_logits.shape[-1]
    dev = target_logits.device
    ft = torch.float64 if target_logits.dtype == torch.float64 else torch.float32
    pos = torch.arange(k, device=dev)[None, :]
    live = pos < num_draft_tokens[:, None]                     # [B, k] drafts that count
    ids = torch.where(live, draft_token_ids, 0)
    rows = torch.arange(B, device=dev)
    if temperature == 0:
        best = target_logits.argmax(-1)                         # [B, k+1]
        accepted = (ids == best[:, :k]) & live
        n_acc = accepted.to(torch.int64).cumprod(-1).sum(-1)
        _check_read_positions(target_logits, None, n_acc, num_draft_tokens)
        emitted = best[rows, n_acc]
    else:
        inv_t = _sampling.inv_temperature(temperature)
        p = torch.softmax(_sampling.apply_threshold(target_logits.to(ft) * inv_t, target_threshold), -1)
        if draft_logits is None:
            q = torch.nn.functional.one_hot(ids, V).to(ft)
        else:
            q = torch.softmax(_sampling.apply_threshold(draft_logits.to(ft) * inv_t, draft_threshold), -1)
        p_x = p[:, :k].gather(-1, ids[..., None]).squeeze(-1)
        q_x = q.gather(-1, ids[..., None]).squeeze(-1)
        accepted = (accept_uniforms.to(ft) * q_x < p_x) & live
        n_acc = accepted.to(torch.int64).cumprod(-1).sum(-1)
        _check_read_positions(target_logits, draft_logits, n_acc, num_draft_tokens)
        # the distribution to sample from at the emitting position: residual or bonus
        p_e = p[rows, n_acc]
        q_e = torch.cat([q, torch.zeros_like(q[:, :1])], 1)[rows, n_acc]
        rejected = (n_acc < num_draft_tokens)[:, None]
        resid = torch.where(rejected, (p_e - q_e).clamp_min(0), p_e)
        resid = torch.where(resid.sum(-1, keepdim=True) > 0, resid, p_e)  # p ≈ q to rounding
        e = _sampling.noise_exponential(seeds, V).to(ft)
        emitted = (resid / e).argmax(-1)
    tokens = torch.full((B, k + 1), -1, dtype=torch.int64, device=dev)
    tokens[:, :k] = torch.where(pos < n_acc[:, None], draft_token_ids, -1)
    tokens[rows, n_acc] = emitted
    return SpecVerifyResult(tokens, n_acc)


def _check_read_positions(target: Tensor, draft: Optional[Tensor], n_acc: Tensor, n: Tensor) -> None:
    """Raise on NaN / +inf, or no finite logit, in a position verification reads: target
    positions 0..num_accepted, draft positions 0..min(num_accepted, n−1). Later positions are
    never read (by any backend), so they are not checked."""
    for name, logits, last in (("target_logits", target, n_acc),
                               ("draft_logits", draft, torch.minimum(n_acc, n - 1))):
        if logits is None:
            continue
        used = torch.arange(logits.shape[1], device=logits.device)[None, :] <= last[:, None]
        bad = (torch.isnan(logits).any(-1) | (logits == float("inf")).any(-1) | ~torch.isfinite(logits).any(-1)) & used
        if bool(bad.any()):
            b, i = (int(v) for v in bad.nonzero()[0])
            raise ValueError(_bad_logit_message(name, logits, b, i))


def _bad_logit_message(name: str, logits: Tensor, b: int, i: int) -> str:
    """The error for position ``[b, i]`` of ``logits`` ``[B, P, V]``: the first NaN/+inf entry
    as ``name[row, position, vocab index]`` and its value, or a row of only ``-inf``."""
    row = logits[b, i]
    bad = torch.isnan(row) | (row == float("inf"))
    if bool(bad.any()):
        v = int(bad.nonzero()[0, 0])
        return (f"spec_verify: {name}[{b}, {i}, {v}] is {float(row[v])} (row {b}, position {i}, vocab index "
                f"{v}): NaN or +inf logits cannot be verified, they must be finite or -inf")
    return (f"spec_verify: {name}[{b}, {i}, :] has no finite logit (row {b}, position {i}: every entry is "
            f"-inf), so it defines no distribution")


def _first_bad_read(target: Tensor, draft: Optional[Tensor], n: Tensor, b: int) -> Optional[str]:
    """The message for the first bad position of row ``b`` in reading order (position 0 first;
    at one position the draft, then the target), draft positions limited to ``n[b]``."""
    def is_bad(t: Tensor) -> bool:
        return bool(torch.isnan(t).any() | (t == float("inf")).any() | ~torch.isfinite(t).any())

    n_b = int(n[b])
    for i in range(target.shape[1]):
        if draft is not None and i < min(n_b, draft.shape[1]) and is_bad(draft[b, i]):
            return _bad_logit_message("draft_logits", draft, b, i)
        if is_bad(target[b, i]):
            return _bad_logit_message("target_logits", target, b, i)
    return None


def _validate(draft_token_ids, draft_logits, target_logits, num_draft_tokens) -> Tensor:
    check_tensor("target_logits", target_logits, ndim=3)
    check_tensor("draft_token_ids", draft_token_ids, ndim=2)
    if not target_logits.is_floating_point():
        raise TypeError(f"target_logits must be float32/float16/bfloat16 (float64 on the reference), "
                        f"got {target_logits.dtype}")
    if draft_token_ids.dtype not in (torch.int64, torch.int32):
        raise TypeError(f"draft_token_ids must be int64 or int32, got {draft_token_ids.dtype}")
    B, k = draft_token_ids.shape
    V = target_logits.shape[-1]
    if k < 1:
        raise ValueError(f"draft_token_ids must hold at least one draft per row (k >= 1), got shape {(B, k)}")
    if tuple(target_logits.shape[:2]) != (B, k + 1):
        raise ValueError(f"target_logits must be [B, k+1, V] = [{B}, {k + 1}, V] for draft_token_ids of "
                         f"shape {(B, k)}, got {tuple(target_logits.shape)}")
    if V < 1:
        raise ValueError("target_logits has an empty vocabulary dimension")
    if draft_token_ids.device != target_logits.device:
        raise ValueError(f"draft_token_ids is on {draft_token_ids.device} but target_logits is on "
                         f"{target_logits.device}; they must match")
    if draft_logits is not None:
        check_tensor("draft_logits", draft_logits, ndim=3)
        if tuple(draft_logits.shape) != (B, k, V):
            raise ValueError(f"draft_logits must be [B, k, V] = [{B}, {k}, {V}], got {tuple(draft_logits.shape)}")
        if draft_logits.dtype != target_logits.dtype:
            raise TypeError(f"draft_logits has dtype {draft_logits.dtype} but target_logits has "
                            f"{target_logits.dtype}; they must match")
        if draft_logits.device != target_logits.device:
            raise ValueError(f"draft_logits is on {draft_logits.device} but target_logits is on "
                             f"{target_logits.device}; they must match")
    if num_draft_tokens is None:
        n = torch.full((B,), k, dtype=torch.int64, device=target_logits.device)
    else:
        check_tensor("num_draft_tokens", num_draft_tokens, ndim=1)
        if num_draft_tokens.dtype not in (torch.int64, torch.int32):
            raise TypeError(f"num_draft_tokens must be int64 or int32, got {num_draft_tokens.dtype}")
        if num_draft_tokens.shape[0] != B or num_draft_tokens.device != target_logits.device:
            raise ValueError(f"num_draft_tokens must be [B] = [{B}] on {target_logits.device}, got "
                             f"{tuple(num_draft_tokens.shape)} on {num_draft_tokens.device}")
        n = num_draft_tokens.to(torch.int64)
    return n


def _check_values(ids: Tensor, n: Tensor, V: int) -> None:
    """Data-dependent checks; they run inside the registered op, so torch.compile keeps one graph."""
    k = ids.shape[1]
    if bool(((n < 0) | (n > k)).any()):
        raise ValueError(f"num_draft_tokens entries must be in [0, k={k}], got {n.tolist()}")
    live = torch.arange(k, device=n.device)[None, :] < n[:, None]
    if bool((live & ((ids < 0) | (ids >= V))).any()):
        raise ValueError(f"draft_token_ids must be in [0, V={V}) (entries past num_draft_tokens are ignored), "
                         f"got values in [{int(ids[live].min())}, {int(ids[live].max())}]")


def _stale_extensions() -> dict[str, str]:
    """Backends whose compiled extension predates this op (rebuild to enable them)."""
    import importlib

    out = {}
    for backend, mod in (("cpp", "lmfuse._C"), ("cuda", "lmfuse._C_cuda")):
        try:
            ext = importlib.import_module(mod)
        except Exception:
            continue  # unavailable anyway; _backend reports why
        if not hasattr(ext, "spec_verify"):
            out[backend] = f"{mod} was built without spec_verify (rebuild: pip install --no-build-isolation -e .)"
    return out


@torch.library.custom_op("lmfuse::spec_verify", mutates_args=())
def _spec_verify_op(draft_token_ids: Tensor, draft_logits: Optional[Tensor], target_logits: Tensor,
                    num_draft_tokens: Tensor, accept_uniforms: Tensor, seeds: Tensor, temperature: float,
                    target_threshold: Optional[Tensor], draft_threshold: Optional[Tensor]
                    ) -> tuple[Tensor, Tensor]:
    _check_values(draft_token_ids, num_draft_tokens, target_logits.shape[-1])
    unsupported = {} if target_logits.dtype in KERNEL_DTYPES else {
        b: f"kernels take {[str(d) for d in KERNEL_DTYPES]}, got {target_logits.dtype}" for b in ("cuda", "triton", "cpp")}
    unsupported.update(_stale_extensions())
    backend = pick_backend("spec_verify", target_logits, PREFERENCE, unsupported)
    if backend == "reference":
        r = reference(draft_token_ids, draft_logits, target_logits, num_draft_tokens, accept_uniforms,
                      seeds, temperature, target_threshold, draft_threshold)
        return r.tokens, r.num_accepted
    args = (draft_token_ids.contiguous(), None if draft_logits is None else draft_logits.contiguous(),
            target_logits.contiguous(), num_draft_tokens.contiguous(), accept_uniforms.contiguous(),
            seeds.contiguous(), _sampling.inv_temperature(temperature),
            None if target_threshold is None else target_threshold.contiguous(),
            None if draft_threshold is None else draft_threshold.contiguous())
    if backend == "triton":
        from ..triton_kernels import spec_verify as tk

        tokens, n_acc = tk.spec_verify(*args)
    else:
        import importlib

        ext = importlib.import_module("lmfuse._C" if backend == "cpp" else "lmfuse._C_cuda")
        tokens, n_acc = ext.spec_verify(*args)
    # kernels mark a row whose used logits hold NaN/+inf or no finite value with num_accepted = -1
    if bool((n_acc < 0).any()):
        b = int((n_acc < 0).nonzero()[0, 0])
        msg = _first_bad_read(target_logits, draft_logits, num_draft_tokens, b)
        raise ValueError(msg or (f"spec_verify: row {b} of target_logits/draft_logits holds NaN or +inf, or a "
                                 f"position with no finite logit ({backend} backend)"))
    return tokens, n_acc


@_spec_verify_op.register_fake
def _spec_verify_fake(draft_token_ids, draft_logits, target_logits, num_draft_tokens, accept_uniforms,
                      seeds, temperature, target_threshold, draft_threshold):
    B, k = draft_token_ids.shape
    return (draft_token_ids.new_empty((B, k + 1), dtype=torch.int64),
            draft_token_ids.new_empty((B,), dtype=torch.int64))


def spec_verify(draft_token_ids: Tensor, draft_logits: Optional[Tensor], target_logits: Tensor, *,
                temperature: float = 1.0, num_draft_tokens: Optional[Tensor] = None,
                top_k: Optional[int] = None, top_p: Optional[float] = None,
                generator=None) -> SpecVerifyResult:
    """Verify ``k`` drafted tokens per row against the target model's logits.

    Args:
        draft_token_ids: ``[B, k]`` int64/int32 drafted tokens, ``k >= 1``.
        draft_logits: ``[B, k, V]`` logits the drafter sampled them from, or ``None`` for a
            deterministic drafter (n-gram, prompt lookup): ``q`` is one-hot.
        target_logits: ``[B, k+1, V]``; fp32 / fp16 / bf16 (float64 on the reference backend).
        temperature: ``> 0`` speculative sampling at that temperature; ``0`` greedy.
        num_draft_tokens: ``[B]`` drafts per row in ``[0, k]`` (ragged rows); default ``k``.
        top_k, top_p: filter both ``p`` and ``q`` (top-k first, ties with the cut kept).
        generator: ``torch.Generator`` (or an int seed); same state → same tokens on every backend.

    Returns:
        ``SpecVerifyResult(tokens [B, k+1] int64 padded with -1, num_accepted [B] int64)``.
    """
    n = _validate(draft_token_ids, draft_logits, target_logits, num_draft_tokens)
    _sampling.check_sampling_args(temperature, top_k, top_p)
    B, k = draft_token_ids.shape
    dev = target_logits.device
    ids = draft_token_ids.to(torch.int64)
    if temperature == 0:  # greedy: no noise, no filtering (the argmax always survives a filter)
        u = torch.zeros((B, k), device=dev, dtype=torch.float32)
        seeds = torch.zeros((B, 2), device=dev, dtype=torch.int64)
        thr_t = thr_d = None
    else:
        gen = _sampling.resolve_generator(generator, dev)
        u = _sampling.draw_uniform((B, k), gen, dev)
        seeds = _sampling.draw_seeds(B, gen, dev)
        inv_t = _sampling.inv_temperature(temperature)
        thr_t = _sampling.filter_thresholds(target_logits, inv_t, top_k, top_p)
        thr_d = (None if draft_logits is None
                 else _sampling.filter_thresholds(draft_logits, inv_t, top_k, top_p))
    tokens, n_acc = torch.ops.lmfuse.spec_verify(ids, None if temperature == 0 else draft_logits,
                                                 target_logits, n, u, seeds, float(temperature), thr_t, thr_d)
    return SpecVerifyResult(tokens, n_acc)


__all__ = ["spec_verify", "SpecVerifyResult", "reference", "cost"]
