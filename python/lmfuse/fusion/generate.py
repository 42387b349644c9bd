"""Batched fused decoding: one KV cache per expert, the gate and the blend every token.

Each expert reads the prompt in its own template (left-padded, so a batch of ragged prompts is
one forward per expert), then every step: each expert's backbone gives its final hidden state at
the last position, its head gives its logits, the :class:`lmfuse.modules.TokenGate` weighs the
experts, and :func:`lmfuse.ops.expert_blend_decode_step` blends and samples; the token is fed to
every expert. Rows stop at their own EOS (finished rows leave every expert's cache).
"""

from __future__ import annotations

import time
from dataclasses import dataclass

import torch
import torch.nn.functional as F

from ..collab._common import OutputBuffer, check_sampling, eos_set, pad_id, resolve_eos
from ..collab.kv_cache import DecodeState, left_padded
from .data import prompt_ids, split_example

__all__ = ["fused_generate", "FusionGenerateOutput"]


@dataclass
class FusionGenerateOutput:
    """``tokens [B, max_new_tokens]`` int64 (padded after a row's EOS / end), ``new_tokens [B]``,
    ``gate [B, max_new_tokens, E]`` fp32 (the weights each token was blended with),
    ``log_probs [B, max_new_tokens]`` fp32 (of each emitted token under the blended
    distribution at temperature 1, before top-k / top-p), ``texts`` (decoded, special tokens skipped), ``prompt_ids`` (per expert, per
    row), ``wall_time_s`` and ``tokens_per_s``."""

    tokens: torch.Tensor
    new_tokens: torch.Tensor
    gate: torch.Tensor
    log_probs: torch.Tensor
    texts: list
    prompt_ids: list
    wall_time_s: float
    tokens_per_s: float


class _HiddenState(DecodeState):
    """A :class:`DecodeState` on an expert's backbone: ``feed`` returns the final hidden state
    of the last position ``[B, H]`` instead of logits."""

    @torch.no_grad()
    def feed(self, tokens: torch.Tensor, valid: torch.Tensor | None = None, keep: int = 1) -> torch.Tensor:
        if valid is None:
            valid = torch.ones_like(tokens, dtype=torch.bool)
        pos = (self.next_pos[:, None] + torch.cumsum(valid.long(), dim=1) - 1).clamp_min(0)
        mask = torch.cat([self.valid, valid], dim=1)
        out = self.model(input_ids=tokens, attention_mask=mask.long(), position_ids=pos,
                         past_key_values=self.cache, use_cache=True)
        self.calls += 1
        self.valid = mask
        self.next_pos = self.next_pos + valid.long().sum(dim=1)
        return out.last_hidden_state[:, -1]


@torch.no_grad()
def fused_generate(fuser, prompts, *, max_new_tokens: int = 32, temperature: float = 0.0, top_k=None, top_p=None,
                   generator: torch.Generator | None = None, eos_token_id=None, pad_token_id=None,
                   progress: bool = False) -> FusionGenerateOutput:
    """Generate from ``prompts`` with the fused experts.

    ``prompts``: a list of prompt strings, message lists (a final assistant message is dropped)
    or examples (see :mod:`lmfuse.fusion.data`). ``temperature`` 0 = greedy (the argmax of the
    blended logits); otherwise sampling from ``softmax(z / T)`` with ``top_k`` / ``top_p`` and
    ``generator``. ``eos_token_id``: int or list (``[]`` = none; default: expert 0's generation
    config, else the tokenizer's EOS). ``progress``: a tqdm bar over tokens.
    """
    from lmfuse import ops

    from ..losses import output_head

    if isinstance(prompts, (str, dict)) or not isinstance(prompts, (list, tuple)) or not prompts:
        raise ValueError("prompts: expected a non-empty list of prompt strings, message lists or examples")
    check_sampling(max_new_tokens, temperature, top_k, top_p)
    tok = fuser.tokenizer
    eos = resolve_eos(fuser.experts[0], eos_token_id)
    if eos_token_id is None and not eos and tok.eos_token_id is not None:
        eos = [int(tok.eos_token_id)]
    pad = pad_id(pad_token_id if pad_token_id is not None else tok.pad_token_id, eos or None)
    device = fuser.gate.scorer[0].weight.device
    B, E, V = len(prompts), fuser.num_experts, fuser.vocab_size
    per_row = [prompt_ids(tok, fuser.templates, split_example(p)[0]) for p in prompts]
    heads = [output_head(m) for m in fuser.experts]
    out = OutputBuffer(B, max_new_tokens, pad, eos_set(eos) if eos else None, device)
    gates = torch.zeros(B, max_new_tokens, E)
    logps = torch.zeros(B, max_new_tokens)
    start = time.perf_counter()
    states, hidden = [], []
    for e, head in enumerate(heads):
        ids, valid = left_padded([torch.tensor(r[e], dtype=torch.long) for r in per_row], pad, device)
        st = _HiddenState(head.backbone, B, device)
        hidden.append(st.feed(ids, valid))
        states.append(st)
    rows = torch.arange(B, device=device)
    bar = None
    if progress:
        from tqdm.auto import tqdm
        bar = tqdm(total=max_new_tokens, desc="fused decoding", unit="tok")
    while rows.numel():
        logits = [F.linear(h.to(hd.weight.dtype), hd.weight, hd.bias) for h, hd in zip(hidden, heads)]
        gate = fuser.gate(hidden)
        res = ops.expert_blend_decode_step(logits, gate, blend="logits", vocab_size=V, temperature=temperature,
                                           top_k=top_k, top_p=top_p, generator=generator)
        for i, r in enumerate(rows.tolist()):
            c = int(out.count[r])
            gates[r, c] = res.gate[i].float().cpu()
            logps[r, c] = float(res.log_probs[i])
            out.emit(r, res.tokens[i:i + 1].to(device))
        tokens = res.tokens.to(device)
        alive = ~out.done[rows.cpu()]
        if not bool(alive.all()):
            keep = alive.nonzero().flatten().to(device)
            rows, tokens = rows[keep], tokens[keep]
            for st in states:
                st.select_rows(keep)
        if bar is not None:
            bar.update(1)
        if rows.numel():
            hidden = [st.feed(tokens[:, None]) for st in states]
    if bar is not None:
        bar.close()
    wall = time.perf_counter() - start
    new = out.count.clone()
    texts = [tok.decode(out.tokens[b, :int(new[b])].tolist(), skip_special_tokens=True) for b in range(B)]
    return FusionGenerateOutput(out.tokens, new, gates, logps, texts, per_row, wall,
                                float(new.sum()) / max(wall, 1e-9))
