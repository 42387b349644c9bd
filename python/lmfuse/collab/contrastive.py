"""Collaborative decoding of a batch with several HF causal LMs sharing one vocabulary.

Every step each model scores the last emitted token (one KV cache per model, same per-row
bookkeeping as speculative decoding), and :func:`lmfuse.ops.collab_decode_step` combines the
logits, samples the next token and returns the small model's per-token statistics in the same
pass. Those statistics are kept as a :class:`TokenTrace` for the FS-GEN analysis
(:mod:`lmfuse.collab.analysis`).

``plain_generate(model, ...)``                          one model (the baseline)
``contrastive_generate(large, small, ...)``             large_weight·logp_L − small_weight·logp_S on
                                                        the large model's plausible set
``proxy_generate(large_base, small_tuned, small_base)`` logp_L + alpha·(logp_S_tuned − logp_S_base)
``oracle_trace(large, small, ...)``                     the large model decodes; the trace records
                                                        where its choice differs from the small's
"""

from __future__ import annotations

import time
from dataclasses import dataclass

import torch

from ._common import OutputBuffer, check_prompt, check_sampling, eos_set, pad_id, resolve_eos
from .kv_cache import DecodeState
from .speculative import GenerateOutput


@dataclass
class TokenTrace:
    """Per generated token, ``[B, max_new_tokens]`` (entries past ``valid`` are meaningless):
    the small model's entropy (nats), top-1 probability and top-1 − top-2 probability margin,
    and whether the emitted token differs from the small model's own argmax."""

    small_entropy: torch.Tensor
    small_top1_prob: torch.Tensor
    small_margin: torch.Tensor
    differs: torch.Tensor
    valid: torch.Tensor


@dataclass
class CollabStats:
    new_tokens: torch.Tensor
    model_calls: int
    wall_time_s: float
    tokens_per_s: float
    collaboration_frequency: float  # fraction of emitted tokens that differ from the small model's choice

    def summary(self) -> str:
        return (f"new tokens {self.new_tokens.tolist()}, {self.model_calls} model forwards, "
                f"{self.wall_time_s:.2f} s, {self.tokens_per_s:.1f} tokens/s, "
                f"differs from small model on {100 * self.collaboration_frequency:.1f}% of tokens")


@torch.no_grad()
def _collab_loop(models: dict, mode: str, input_ids, attention_mask, *, max_new_tokens, temperature,
                 top_k, top_p, eos_token_id, pad_token_id, generator, step_kwargs) -> GenerateOutput:
    from lmfuse import ops

    input_ids, mask = check_prompt(input_ids, attention_mask)
    check_sampling(max_new_tokens, temperature, top_k, top_p)
    vocab = {name: m.config.vocab_size for name, m in models.items()}
    if len(set(vocab.values())) != 1:
        raise ValueError(f"models must share one vocabulary, got sizes {vocab}")
    device = input_ids.device
    B = input_ids.shape[0]
    eos_token_id = resolve_eos(models["large"] if "large" in models else models["small"], eos_token_id)
    out = OutputBuffer(B, max_new_tokens, pad_id(pad_token_id, eos_token_id), eos_set(eos_token_id), device)
    trace = TokenTrace(*(torch.zeros(B, max_new_tokens) for _ in range(3)),
                       torch.zeros(B, max_new_tokens, dtype=torch.bool),
                       torch.zeros(B, max_new_tokens, dtype=torch.bool))
    start = time.perf_counter()
    states = {name: DecodeState(m, B, device) for name, m in models.items()}
    logits = {name: st.feed(input_ids, mask, keep=1)[:, -1] for name, st in states.items()}
    rows = torch.arange(B, device=device)
    while rows.numel():
        res = ops.collab_decode_step(logits["small"], logits.get("large"), logits.get("small_base"), mode=mode,
                                     temperature=temperature, top_k=top_k, top_p=top_p, generator=generator,
                                     **step_kwargs)
        for i, r in enumerate(rows.tolist()):
            c = int(out.count[r])
            trace.small_entropy[r, c] = float(res.small_entropy[i])
            trace.small_top1_prob[r, c] = float(res.small_top1_prob[i])
            trace.small_margin[r, c] = float(res.small_margin[i])
            trace.differs[r, c] = bool(res.differs_from_small[i])
            trace.valid[r, c] = True
            out.emit(r, res.tokens[i:i + 1].to(device))
        tokens = res.tokens.to(device)
        alive = ~out.done[rows.cpu()]
        if not bool(alive.all()):
            keep = alive.nonzero().flatten().to(device)
            rows, tokens = rows[keep], tokens[keep]
            for st in states.values():
                st.select_rows(keep)
        if rows.numel():
            logits = {name: st.feed(tokens[:, None], keep=1)[:, -1] for name, st in states.items()}
    wall = time.perf_counter() - start
    new = out.count.clone()
    n_tok = int(trace.valid.sum())
    freq = float(trace.differs[trace.valid].float().mean()) if n_tok else float("nan")
    stats = CollabStats(new, sum(st.calls for st in states.values()), wall, float(new.sum()) / max(wall, 1e-9), freq)
    return GenerateOutput(torch.cat([input_ids, out.tokens], dim=1), new, stats, trace)


def _common_kwargs(max_new_tokens, temperature, top_k, top_p, eos_token_id, pad_token_id, generator):
    return dict(max_new_tokens=max_new_tokens, temperature=temperature, top_k=top_k, top_p=top_p,
                eos_token_id=eos_token_id, pad_token_id=pad_token_id, generator=generator)


def plain_generate(model, input_ids, attention_mask=None, *, max_new_tokens: int, temperature: float = 0.0,
                   top_k=None, top_p=None, eos_token_id=None, pad_token_id=None, generator=None) -> GenerateOutput:
    """Ordinary decoding with one model through the same loop (the baseline the others are
    compared with). Returns :class:`GenerateOutput` with :class:`CollabStats` and ``.trace``
    (``differs`` is always False here).

    ``eos_token_id`` (here and in the other loops of this module): an int or a list of ints; a
    row stops after emitting one. ``None`` (default) takes the model's
    ``generation_config.eos_token_id`` (``config.eos_token_id`` for a model without a generation
    config; the large model's where there are several), as ``generate`` does; ``[]`` means no
    EOS."""
    kw = _common_kwargs(max_new_tokens, temperature, top_k, top_p, eos_token_id, pad_token_id, generator)
    return _collab_loop({"small": model}, "none", input_ids, attention_mask, step_kwargs={}, **kw)


def contrastive_generate(large, small, input_ids, attention_mask=None, *, max_new_tokens: int,
                         alpha: float = 0.1, large_weight: float = 1.0, small_weight: float = 1.0,
                         temperature: float = 0.0, top_k=None, top_p=None, eos_token_id=None,
                         pad_token_id=None, generator=None) -> GenerateOutput:
    """Contrastive decoding: next-token scores ``large_weight·log_softmax(L) −
    small_weight·log_softmax(S)`` on tokens with ``p_L ≥ alpha·max p_L`` (−inf elsewhere).

    FS-GEN's form ``s_S + β(s_L − s_S)`` is ``large_weight = β``, ``small_weight = β − 1``.
    Batching, EOS and outputs as :func:`lmfuse.collab.speculative_generate`; the result also
    carries ``.trace`` (:class:`TokenTrace`).
    """
    kw = _common_kwargs(max_new_tokens, temperature, top_k, top_p, eos_token_id, pad_token_id, generator)
    return _collab_loop({"small": small, "large": large}, "contrastive", input_ids, attention_mask,
                        step_kwargs=dict(alpha=alpha, large_weight=large_weight, small_weight=small_weight), **kw)


def proxy_generate(large_base, small_tuned, small_base, input_ids, attention_mask=None, *, max_new_tokens: int,
                   alpha: float = 1.0, temperature: float = 0.0, top_k=None, top_p=None, eos_token_id=None,
                   pad_token_id=None, generator=None) -> GenerateOutput:
    """Proxy tuning: ``log_softmax(L_base) + alpha·(log_softmax(S_tuned) − log_softmax(S_base))``
    — the large base model steered by the difference a fine-tune made to a small model. The
    trace's "small model" is ``small_tuned``."""
    kw = _common_kwargs(max_new_tokens, temperature, top_k, top_p, eos_token_id, pad_token_id, generator)
    return _collab_loop({"small": small_tuned, "large": large_base, "small_base": small_base}, "proxy",
                        input_ids, attention_mask, step_kwargs=dict(proxy_alpha=alpha), **kw)


def oracle_trace(large, small, input_ids, attention_mask=None, *, max_new_tokens: int, temperature: float = 0.0,
                 top_k=None, top_p=None, eos_token_id=None, pad_token_id=None, generator=None) -> GenerateOutput:
    """The large model decodes; both models read its tokens, and ``.trace.differs`` marks the
    tokens where the large model's choice differs from the small model's argmax — FS-GEN's
    oracle collaboration measure (``stats.collaboration_frequency`` is its mean)."""
    kw = _common_kwargs(max_new_tokens, temperature, top_k, top_p, eos_token_id, pad_token_id, generator)
    return _collab_loop({"small": small, "large": large}, "none", input_ids, attention_mask, step_kwargs={}, **kw)
