"""Soft prompt: learned embeddings prepended to the input, attached with a pre-forward hook.

The hook runs on the root model's ``forward`` (kwargs form, as Hugging Face models are called):
``input_ids`` become ``inputs_embeds`` with the prompt in front, and the tensors aligned with
the sequence follow: ``attention_mask`` gets ones, ``labels`` get ``-100`` (the prompt is never a
target), ``token_type_ids`` zeros, ``position_ids`` are renumbered. A forward hook then drops the
prompt positions from ``logits`` / ``last_hidden_state`` so outputs line up with the caller's
tokens. Calls that continue a non-empty KV cache are left alone (the prompt is in the cache);
``generate`` is not supported (its attention-mask bookkeeping does not know about the prompt).
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


def _has_cache(kwargs) -> bool:
    pkv = kwargs.get("past_key_values")
    if pkv is None:
        return False
    get_len = getattr(pkv, "get_seq_length", None)
    return get_len() > 0 if callable(get_len) else len(pkv) > 0


def make_hooks(model: nn.Module, soft: SoftPrompt):
    """``(pre_hook, post_hook)`` for ``register_forward_pre_hook(with_kwargs=True)`` /
    ``register_forward_hook(with_kwargs=True)`` on the root model."""

    state = {"prepended": False}

    def pre_hook(module, args, kwargs):
        if args:
            # positional input_ids: move to kwargs so the rewrite below sees them
            if len(args) > 1:
                raise TypeError("a model with a soft prompt must be called with keyword arguments "
                                "(input_ids=..., attention_mask=...)")
            kwargs = dict(kwargs, input_ids=args[0])
            args = ()
        if _has_cache(kwargs):
            state["prepended"] = False
            return args, kwargs
        state["prepended"] = True
        ids = kwargs.pop("input_ids", None)
        embeds = kwargs.get("inputs_embeds")
        if embeds is None:
            if ids is None:
                raise ValueError("soft prompt: the model needs input_ids or inputs_embeds")
            embeds = model.get_input_embeddings()(ids)
        n, b = soft.n_tokens, embeds.shape[0]
        prompt = soft.prompt.to(embeds.dtype).unsqueeze(0).expand(b, -1, -1)
        kwargs["inputs_embeds"] = torch.cat([prompt, embeds], dim=1)
        dev = embeds.device
        mask = kwargs.get("attention_mask")
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
        return args, kwargs

    def post_hook(module, args, kwargs, output):
        n = soft.n_tokens
        if not state["prepended"]:
            return output
        for key in ("logits", "last_hidden_state"):
            value = getattr(output, key, None) if not isinstance(output, dict) else output.get(key)
            if isinstance(value, torch.Tensor) and value.dim() >= 2 and value.shape[1] > n:
                output[key] = value[:, n:]
        return output

    return pre_hook, post_hook
