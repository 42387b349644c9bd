"""Soft prompt: learned embeddings prepended to the input, attached with a pre-forward hook.

The hook runs on the root model's ``forward`` (kwargs form, as Hugging Face models are called):
``input_ids`` become ``inputs_embeds`` with the prompt in front, and the tensors aligned with
the sequence follow: ``attention_mask`` gets ones, ``labels`` get ``-100`` (the prompt is never a
target), ``token_type_ids`` zeros, ``position_ids`` are renumbered. A forward hook then drops the
prompt positions from ``logits`` / ``last_hidden_state`` so outputs line up with the caller's
tokens. The KV cache a call fills holds the prompt positions; calls that continue it get their
positions shifted and their attention mask extended by the prompt length (see :func:`make_hooks`),
so ``model.generate()`` works with a soft prompt: greedy decoding with the cache gives the same
tokens as decoding step by step without one.
"""

from __future__ import annotations

import torch
from torch import nn


class SoftPrompt(nn.Module):
    """``prompt [n_tokens, hidden]`` in the embedding table's dtype and device."""

    _lmfuse_delta_internal = True  # never addressed as a backbone module

    def __init__(self, embedding: nn.Embedding, n_tokens: int, init: str, generator=None):
        super().__init__()
        w = embedding.weight
        with torch.no_grad():
            if init == "vocab":
                ids = torch.randint(0, w.shape[0], (n_tokens,), generator=generator)
                value = w.detach()[ids.to(w.device)].clone()
            else:
                std = float(w.detach().float().std())
                value = (torch.randn(n_tokens, w.shape[1], generator=generator) * std).to(w.dtype).to(w.device)
        self.prompt = nn.Parameter(value)

    @property
    def n_tokens(self) -> int:
        return self.prompt.shape[0]


MARK = "_lmfuse_soft_prompts"  # on a KV cache object: ids of the soft prompts whose tokens it holds


def _cache_length(pkv) -> int:
    if pkv is None:
        return 0
    get_len = getattr(pkv, "get_seq_length", None)
    if callable(get_len):
        return int(get_len())
    return int(pkv[0][0].shape[-2]) if len(pkv) else 0  # legacy tuple of (key, value) per layer


def _mark_cache(pkv, soft: SoftPrompt) -> None:
    if pkv is not None and hasattr(pkv, "__dict__"):
        pkv.__dict__.setdefault(MARK, set()).add(id(soft))


def _holds_prompt(pkv, soft: SoftPrompt) -> bool:
    return id(soft) in getattr(pkv, MARK, ())


def make_hooks(model: nn.Module, soft: SoftPrompt):
    """``(pre_hook, post_hook)`` for ``register_forward_pre_hook(with_kwargs=True)`` /
    ``register_forward_hook(with_kwargs=True)`` on the root model.

    A call without a KV cache (or with an empty one) gets the prompt prepended; the cache object
    it fills is marked as holding the prompt. A call continuing a marked cache gets its positions
    (``position_ids``, ``cache_position``) shifted by ``n_tokens`` and ``n_tokens`` ones in front
    of a 2-D ``attention_mask`` that covers the caller's tokens only, so the caller (for instance
    ``generate``) never needs to know about the prompt. A cache the hook did not fill (a legacy
    tuple, or one built elsewhere) is continued unchanged.
    """

    state = {"prepended": False, "length": 0}

    def pre_hook(module, args, kwargs):
        if args:
            # positional input_ids: move to kwargs so the rewrite below sees them
            if len(args) > 1:
                raise TypeError("a model with a soft prompt must be called with keyword arguments "
                                "(input_ids=..., attention_mask=...)")
            kwargs = dict(kwargs, input_ids=args[0])
            args = ()
        n = soft.n_tokens
        pkv = kwargs.get("past_key_values")
        mask = kwargs.get("attention_mask")
        if mask is not None and mask.dim() != 2:
            raise ValueError(f"attention_mask: a model with a soft prompt needs a 2-D [batch, seq] mask, "
                             f"got shape {tuple(mask.shape)} (a static / compiled cache with a 4-D mask "
                             f"is not supported)")
        past = _cache_length(pkv)
        if past > 0:
            state["prepended"] = False
            if not _holds_prompt(pkv, soft):
                return args, kwargs
            ref = kwargs.get("input_ids")
            if ref is None:
                ref = kwargs.get("inputs_embeds")
            new = ref.shape[1] if ref is not None else 0
            if mask is not None and mask.shape[1] + n <= past + new:  # the caller's mask lacks the prompt
                kwargs["attention_mask"] = torch.cat([mask.new_ones(mask.shape[0], n), mask], dim=1)
            for key in ("position_ids", "cache_position"):
                if kwargs.get(key) is not None:
                    kwargs[key] = kwargs[key] + n
            return args, kwargs
        state["prepended"] = True
        ids = kwargs.pop("input_ids", None)
        embeds = kwargs.get("inputs_embeds")
        if embeds is None:
            if ids is None:
                raise ValueError("soft prompt: the model needs input_ids or inputs_embeds")
            embeds = model.get_input_embeddings()(ids)
        b = embeds.shape[0]
        state["length"] = embeds.shape[1]
        prompt = soft.prompt.to(embeds.dtype).unsqueeze(0).expand(b, -1, -1)
        kwargs["inputs_embeds"] = torch.cat([prompt, embeds], dim=1)
        dev = embeds.device
        if mask is not None:
            kwargs["attention_mask"] = torch.cat([mask.new_ones(b, n), mask], dim=1)
        labels = kwargs.get("labels")
        if labels is not None and labels.dim() >= 2:
            kwargs["labels"] = torch.cat([labels.new_full((labels.shape[0], n), -100), labels], dim=1)
        tt = kwargs.get("token_type_ids")
        if tt is not None:
            kwargs["token_type_ids"] = torch.cat([tt.new_zeros(b, n), tt], dim=1)
        pos = kwargs.get("position_ids")
        if pos is not None:
            head = torch.arange(n, device=dev, dtype=pos.dtype).expand(pos.shape[0], n)
            kwargs["position_ids"] = torch.cat([head, pos + n], dim=1)
        cpos = kwargs.get("cache_position")
        if cpos is not None:
            kwargs["cache_position"] = torch.cat([torch.arange(n, device=cpos.device, dtype=cpos.dtype), cpos + n])
        _mark_cache(pkv, soft)
        return args, kwargs

    def post_hook(module, args, kwargs, output):
        if not state["prepended"]:
            return output
        n, length = soft.n_tokens, state["length"]
        get = output.get if isinstance(output, dict) else (lambda k: getattr(output, k, None))
        _mark_cache(get("past_key_values"), soft)
        for key in ("logits", "last_hidden_state"):
            value = get(key)
            # only full-length outputs carry the prompt positions (not e.g. logits_to_keep=1)
            if isinstance(value, torch.Tensor) and value.dim() >= 2 and value.shape[1] == n + length:
                output[key] = value[:, n:]
        return output

    return pre_hook, post_hook
