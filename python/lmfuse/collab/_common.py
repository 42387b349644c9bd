"""Shared pieces of the generation loops: argument checks, prompt handling, output buffers."""

from __future__ import annotations

import torch


def check_prompt(input_ids, attention_mask) -> tuple[torch.Tensor, torch.Tensor]:
    """Validate ``input_ids [B, P]`` int64 and a left-padded ``attention_mask``; return both
    (the mask as bool, all True when not given)."""
    if not isinstance(input_ids, torch.Tensor):
        raise TypeError(f"input_ids: expected a torch.Tensor, got {type(input_ids).__name__}")
    if input_ids.dim() != 2 or input_ids.shape[0] == 0 or input_ids.shape[1] == 0:
        raise ValueError(f"input_ids: expected a non-empty [batch, prompt_len] tensor, got shape {tuple(input_ids.shape)}")
    if input_ids.dtype not in (torch.int64, torch.int32):
        raise TypeError(f"input_ids: expected int64 token ids, got {input_ids.dtype}")
    input_ids = input_ids.long()
    if attention_mask is None:
        return input_ids, torch.ones_like(input_ids, dtype=torch.bool)
    if not isinstance(attention_mask, torch.Tensor) or attention_mask.shape != input_ids.shape:
        got = tuple(attention_mask.shape) if isinstance(attention_mask, torch.Tensor) else type(attention_mask).__name__
        raise ValueError(f"attention_mask: expected shape {tuple(input_ids.shape)}, got {got}")
    mask = attention_mask.to(input_ids.device).bool()
    if bool((~mask.any(dim=1)).any()):
        raise ValueError("attention_mask: every row needs at least one prompt token")
    # Left padding means the mask never goes from 1 back to 0 along a row.
    if bool((mask[:, :-1] & ~mask[:, 1:]).any()):
        raise ValueError("attention_mask: prompts must be left-padded (padding, then tokens); "
                         "use tokenizer.padding_side = 'left'")
    return input_ids, mask


def check_sampling(max_new_tokens, temperature, top_k, top_p) -> None:
    if not isinstance(max_new_tokens, int) or isinstance(max_new_tokens, bool) or max_new_tokens < 1:
        raise ValueError(f"max_new_tokens: expected an int >= 1, got {max_new_tokens!r}")
    if not isinstance(temperature, (int, float)) or temperature < 0:
        raise ValueError(f"temperature: expected a number >= 0, got {temperature!r}")
    if top_k is not None and (not isinstance(top_k, int) or top_k < 1):
        raise ValueError(f"top_k: expected None or an int >= 1, got {top_k!r}")
    if top_p is not None and not (isinstance(top_p, (int, float)) and 0 < top_p <= 1):
        raise ValueError(f"top_p: expected None or a number in (0, 1], got {top_p!r}")


def _eos_ids(value, what: str) -> list[int]:
    """``value`` (an int, a sequence of ints or a 1-D tensor) as a list of non-negative ints."""
    if isinstance(value, torch.Tensor):
        value = value.flatten().tolist()
    if isinstance(value, int) and not isinstance(value, bool):
        value = [value]
    try:
        ids = list(value)
    except TypeError:
        raise TypeError(f"{what}: expected an int, a list of ints, [] (no EOS) or None, "
                        f"got {type(value).__name__}") from None
    for i in ids:
        if isinstance(i, bool) or not isinstance(i, int) or i < 0:
            raise ValueError(f"{what}: expected non-negative int token ids, got {value!r}")
    return ids


def resolve_eos(model, eos_token_id) -> list[int]:
    """The end-of-sequence ids a generation loop stops at, as ``transformers``' ``generate`` does.

    ``eos_token_id``: an int or a list of ints wins; ``[]`` means no EOS (generate the whole
    budget); ``None`` takes ``model.generation_config.eos_token_id`` when the model has a
    generation config (as ``generate`` does: a generation config whose EOS is ``None`` means no
    EOS), else ``model.config.eos_token_id``; either may be an int or a list. Returns the ids as
    a list (empty = no EOS).
    """
    if eos_token_id is not None:
        return _eos_ids(eos_token_id, "eos_token_id")
    owner = "generation_config" if getattr(model, "generation_config", None) is not None else "config"
    value = getattr(getattr(model, owner, None), "eos_token_id", None)
    return [] if value is None else _eos_ids(value, f"model.{owner}.eos_token_id")


def eos_set(eos_token_id) -> torch.Tensor | None:
    """``eos_token_id`` (int, list or None) as a 1-D long tensor, or None (no EOS)."""
    if eos_token_id is None:
        return None
    ids = _eos_ids(eos_token_id, "eos_token_id")
    return torch.tensor(ids, dtype=torch.long) if ids else None


def pad_id(pad_token_id, eos_token_id) -> int:
    if pad_token_id is not None:
        return int(pad_token_id)
    eos = eos_set(eos_token_id)
    return int(eos[0]) if eos is not None else 0


class OutputBuffer:
    """New tokens per row, written as they are emitted; rows end at EOS or the budget."""

    def __init__(self, batch: int, max_new_tokens: int, pad: int, eos, device):
        self.tokens = torch.full((batch, max_new_tokens), pad, dtype=torch.long, device=device)
        self.count = torch.zeros(batch, dtype=torch.long)
        self.done = torch.zeros(batch, dtype=torch.bool)
        self.max_new = max_new_tokens
        self.eos = eos

    def remaining(self, rows: torch.Tensor) -> torch.Tensor:
        return self.max_new - self.count[rows]

    def emit(self, row: int, toks: torch.Tensor) -> int:
        """Append ``toks`` to ``row`` (cut at the first EOS and at the budget); returns how many
        were written. Marks the row done when it hits EOS or the budget."""
        room = self.max_new - int(self.count[row])
        toks = toks[:room]
        if self.eos is not None and toks.numel():
            hit = torch.isin(toks.cpu(), self.eos).nonzero()
            if hit.numel():
                toks = toks[: int(hit[0]) + 1]
                self.done[row] = True
        c = int(self.count[row])
        self.tokens[row, c:c + toks.numel()] = toks
        self.count[row] += toks.numel()
        if int(self.count[row]) >= self.max_new:
            self.done[row] = True
        return int(toks.numel())
