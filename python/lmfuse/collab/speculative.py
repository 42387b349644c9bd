"""Batched speculative decoding for Hugging Face causal LMs (``speculative_generate``).

One step, for every unfinished row at once:

1. the drafter proposes up to ``k`` tokens per row (a draft model sampling from its own
   temperature/top-k/top-p filtered distribution q — a row stops early after a draft token the
   draft model itself gives probability < ``draft_confidence_threshold`` — or a deterministic
   prompt-lookup drafter);
2. the target scores ``[last, d_1 .. d_k]`` in one forward, giving ``k + 1`` next-token
   distributions p;
3. :func:`lmfuse.ops.spec_verify` accepts a prefix of the drafts per row (``num_accepted``)
   and emits one more token (the correction at the first rejection, or the bonus token);
4. each row's KV caches (target and draft) are rolled back to exactly its own accepted length
   (:class:`lmfuse.collab.kv_cache.DecodeState`: masked holes, cropped/compacted), rows that
   hit EOS or their budget leave the batch.

With ``temperature == 0`` the output equals the target's own greedy decoding; with sampling its
distribution equals the target's (the guarantee of speculative sampling that ``spec_verify``
implements).
"""

from __future__ import annotations

import time
from dataclasses import dataclass

import torch

from ._common import OutputBuffer, check_prompt, check_sampling, eos_set, pad_id, resolve_eos
from .drafters import PromptLookupDrafter
from .kv_cache import DecodeState, left_padded


@dataclass
class SpeculativeStats:
    """Per-row and overall statistics of one ``speculative_generate`` call.

    ``proposed``/``accepted`` count draft tokens per row; ``acceptance_rate`` is their ratio
    (NaN for a row that got no drafts). ``target_calls`` counts the target's forwards (each
    one verifies a step's drafts; the first also prefills the prompt); ``row_target_calls`` how
    many of them each row took part in, and ``tokens_per_target_call`` = Σ new tokens /
    Σ row_target_calls (tokens a row gains per verification; 1 means no speed-up over plain
    decoding).
    """

    new_tokens: torch.Tensor
    proposed: torch.Tensor
    accepted: torch.Tensor
    acceptance_rate: torch.Tensor
    target_calls: int
    row_target_calls: torch.Tensor
    draft_calls: int
    tokens_per_target_call: float
    wall_time_s: float
    tokens_per_s: float

    def summary(self) -> str:
        rates = ", ".join(f"{r:.2f}" for r in self.acceptance_rate.tolist())
        return (f"new tokens {self.new_tokens.tolist()}, acceptance per row [{rates}], "
                f"{self.tokens_per_target_call:.2f} tokens/target call ({self.target_calls} calls), "
                f"{self.wall_time_s:.2f} s, {self.tokens_per_s:.1f} tokens/s")


@dataclass
class GenerateOutput:
    """``sequences [B, P + max_new_tokens]``: the (left-padded) prompt then the new tokens, padded
    with ``pad_token_id`` after a row's EOS or end; ``new_tokens [B]`` counts them."""

    sequences: torch.Tensor
    new_tokens: torch.Tensor
    stats: object
    trace: object = None  # TokenTrace for the collaborative methods, None for speculative


def _sample(logits: torch.Tensor, temperature, top_k, top_p, generator) -> torch.Tensor:
    """A token per row from ``logits [B, V]``: argmax when greedy, else the processed softmax."""
    if temperature == 0:
        return logits.argmax(dim=-1)
    from lmfuse import ops

    return ops.collab_decode_step(logits, mode="none", temperature=temperature, top_k=top_k,
                                  top_p=top_p, generator=generator).tokens


def _confidence(logits: torch.Tensor, tokens: torch.Tensor, temperature: float) -> torch.Tensor:
    """Probability of ``tokens [B]`` under the (temperature-scaled) softmax of ``logits [B, V]``."""
    scaled = logits if temperature == 0 else logits / temperature
    picked = scaled.gather(-1, tokens[:, None]).squeeze(-1)
    return torch.exp(picked - torch.logsumexp(scaled, dim=-1))


@torch.no_grad()
def speculative_generate(target, draft, input_ids, attention_mask=None, *, max_new_tokens: int,
                         num_draft_tokens: int = 5, temperature: float = 0.0, top_k: int | None = None,
                         top_p: float | None = None, eos_token_id=None, pad_token_id=None,
                         generator: torch.Generator | None = None,
                         draft_confidence_threshold: float = 0.4,
                         compact_threshold: int = 32) -> GenerateOutput:
    """Speculative decoding of a batch of left-padded prompts.

    Args:
        target: a HF causal LM (the model whose distribution is reproduced).
        draft: a HF causal LM with the same vocabulary (e.g. :func:`truncate_layers` of the
            target), or a :class:`PromptLookupDrafter` (deterministic drafts, no model).
        input_ids: ``[B, P]`` int64, left-padded; ``attention_mask`` ``[B, P]`` (1 = token).
        max_new_tokens: new tokens per row at most; ``num_draft_tokens``: drafts per step (k).
        temperature, top_k, top_p: 0 = greedy; else the target's sampling distribution.
        eos_token_id: int or list; a row stops after emitting one. ``None`` (default) takes the
            target's ``generation_config.eos_token_id`` (``config.eos_token_id`` without a
            generation config), as ``generate`` does; ``[]`` means no EOS. ``pad_token_id`` fills the rest (default:
            the first EOS id, else 0).
        generator: a ``torch.Generator`` on the logits' device, for reproducible sampling.
        draft_confidence_threshold: a row stops drafting in a step after a draft token whose
            probability under the draft model (temperature-scaled softmax, before top-k/top-p)
            is below this value, so a low-confidence draft does not spend ``k`` draft forwards
            on tokens the target will likely reject (the same rule as transformers' assisted
            generation, whose default is also 0.4). ``0`` always drafts ``num_draft_tokens``.
            It never changes the output distribution: how many tokens are drafted depends only
            on the draft's own tokens. Ignored for :class:`PromptLookupDrafter`.
        compact_threshold: wasted (rolled-back) cache slots tolerated before compaction.

    Returns:
        :class:`GenerateOutput` with :class:`SpeculativeStats`.
    """
    from lmfuse import ops

    input_ids, mask = check_prompt(input_ids, attention_mask)
    check_sampling(max_new_tokens, temperature, top_k, top_p)
    if not isinstance(num_draft_tokens, int) or num_draft_tokens < 1:
        raise ValueError(f"num_draft_tokens: expected an int >= 1, got {num_draft_tokens!r}")
    if not isinstance(draft_confidence_threshold, (int, float)) or not 0 <= draft_confidence_threshold <= 1:
        raise ValueError(f"draft_confidence_threshold: expected a number in [0, 1], got {draft_confidence_threshold!r}")
    lookup = isinstance(draft, PromptLookupDrafter)
    if not lookup and not hasattr(draft, "config"):
        raise TypeError(f"draft: expected a HF causal LM or a PromptLookupDrafter, got {type(draft).__name__}")
    if not lookup and draft.config.vocab_size != target.config.vocab_size:
        raise ValueError(f"draft: vocabulary size {draft.config.vocab_size} differs from the "
                         f"target's {target.config.vocab_size}")
    device = input_ids.device
    B, P = input_ids.shape
    eos_token_id = resolve_eos(target, eos_token_id)
    pad = pad_id(pad_token_id, eos_token_id)
    out = OutputBuffer(B, max_new_tokens, pad, eos_set(eos_token_id), device)
    proposed = torch.zeros(B, dtype=torch.long)
    accepted = torch.zeros(B, dtype=torch.long)
    row_calls = torch.zeros(B, dtype=torch.long)
    start = time.perf_counter()

    # The prompt is not prefilled on its own: the first step feeds the target the whole prompt
    # followed by the drafts (and the draft model the whole prompt), saving one forward of each
    # model. Afterwards every step verifies [last, drafts].
    rows = torch.arange(B, device=device)
    tgt = DecodeState(target, B, device, compact_threshold)
    drf = None if lookup else DecodeState(draft, B, device, compact_threshold)
    first = True
    last = input_ids[:, -1].clone()
    prompts = [input_ids[b][mask[b]] for b in range(B)]
    pending = list(prompts)  # per row, the tokens the draft model has not seen yet
    target_calls = draft_calls = 0

    while rows.numel():
        remaining = out.remaining(rows.cpu()).to(device)
        k = min(num_draft_tokens, int(remaining.max()) - 1)
        n_drafts = (remaining - 1).clamp(0, max(k, 0))
        draft_logits, drafted = None, False
        if k <= 0:
            drafts = torch.zeros(rows.numel(), 0, dtype=torch.long, device=device)
        elif lookup:
            hist = [torch.cat([prompts[r], out.tokens[r, : int(out.count[r])]]) for r in rows.tolist()]
            drafts, counts = draft.propose(hist, k)
            n_drafts = torch.minimum(n_drafts, counts.to(device))
            # Only as many columns as the longest proposal: no target work on empty drafts.
            drafts = drafts[:, : int(n_drafts.max())].to(device)
        else:
            toks, valid = left_padded(pending, pad, device)
            q = drf.feed(toks, valid, keep=1)[:, -1]
            qs, ds = [], []
            drafting = torch.ones(rows.numel(), dtype=torch.bool, device=device)
            n_proposed = torch.zeros(rows.numel(), dtype=torch.long, device=device)
            while True:
                d = _sample(q, temperature, top_k, top_p, generator)
                qs.append(q)
                ds.append(d)
                n_proposed += drafting.long()
                if draft_confidence_threshold > 0:
                    drafting &= _confidence(q, d, temperature) >= draft_confidence_threshold
                # rows past their budget need no more drafts either
                drafting &= n_proposed < n_drafts
                if len(ds) == k or not bool(drafting.any()):
                    break
                q = drf.feed(d[:, None], keep=1)[:, -1]
            draft_calls += len(ds)
            drafted = True
            drafts = torch.stack(ds, dim=1)
            n_drafts = torch.minimum(n_drafts, n_proposed)
            # Greedy verification needs no q: a draft is accepted iff it is the target's argmax.
            draft_logits = torch.stack(qs, dim=1) if temperature > 0 else None

        k = drafts.shape[1]
        step = torch.cat([last[:, None], drafts], dim=1)
        if first and P > 1:
            p = tgt.feed(torch.cat([input_ids[:, :-1], step], dim=1),
                         torch.cat([mask[:, :-1], torch.ones_like(step, dtype=torch.bool)], dim=1), keep=k + 1)
        else:
            p = tgt.feed(step)
        first = False
        target_calls += 1
        if k == 0:
            # Nothing to verify (budget or no lookup match): an ordinary decoding step from p.
            tokens = _sample(p[:, 0], temperature, top_k, top_p, generator)[:, None]
            n_acc = torch.zeros(rows.numel(), dtype=torch.long, device=device)
        else:
            res = ops.spec_verify(drafts, draft_logits, p, temperature=temperature, num_draft_tokens=n_drafts,
                                  top_k=top_k, top_p=top_p, generator=generator)
            tokens, n_acc = res.tokens, res.num_accepted.to(device=device, dtype=torch.long)
        n_drafts = n_drafts.clamp(max=k)

        # Roll back each row to its own accepted length: the target keeps [last, d_1..d_n];
        # the draft keeps its pending tokens and d_1..d_min(n, k-1) (it never saw d_k).
        tgt.drop_last(k - n_acc)
        if drafted:
            drf.drop_last((k - 1) - n_acc.clamp(max=k - 1))
        new_last = torch.empty_like(last)
        for i, r in enumerate(rows.tolist()):
            n = int(n_acc[i])
            emitted = tokens[i, : n + 1].to(device)
            proposed[r] += int(n_drafts[i])
            row_calls[r] += 1
            accepted[r] += n
            out.emit(r, emitted)
            new_last[i] = emitted[-1]
            if drf is not None:
                if not drafted:
                    pending[i] = torch.cat([pending[i], emitted[-1:]])
                else:
                    pending[i] = torch.cat([drafts[i, k - 1:], emitted[-1:]]) if n == k else emitted[-1:]
        last = new_last
        # Rows that finished leave the batch (and their caches).
        alive = ~out.done[rows.cpu()]
        if not bool(alive.all()):
            keep = alive.nonzero().flatten().to(device)
            rows, last = rows[keep], last[keep]
            tgt.select_rows(keep)
            if drf is not None:
                drf.select_rows(keep)
                pending = [pending[i] for i in keep.tolist()]

    wall = time.perf_counter() - start
    new = out.count.clone()
    rate = torch.where(proposed > 0, accepted.double() / proposed.clamp_min(1).double(),
                       torch.full((B,), float("nan"), dtype=torch.double))
    stats = SpeculativeStats(new, proposed, accepted, rate, target_calls, row_calls, draft_calls,
                             float(new.sum()) / max(int(row_calls.sum()), 1), wall,
                             float(new.sum()) / max(wall, 1e-9))
    return GenerateOutput(torch.cat([input_ids, out.tokens], dim=1), new, stats)
