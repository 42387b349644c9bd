"""Prefix tuning: trainable keys and values in front of every attention layer, through the
model's own KV cache.

How it attaches: a pre-forward hook on the root model (kwargs form, as ``transformers`` models are
called). A call that starts a sequence (no cache, or an empty one) gets a ``DynamicCache`` whose
first ``P = num_virtual_tokens`` slots of every layer hold the prefix keys and values (the cache
the caller passed is filled in place; with no cache a new one is passed to the model, so
``use_cache=False`` training sees the prefix too). The cache object is marked as holding the
prefix; a call that continues a marked cache is left to attend to it. In both cases the hook
puts ``P`` ones in front of a 2-D ``attention_mask`` that covers the caller's tokens only, so the
caller (``generate``, ``lmfuse.collab``) never needs to know about the prefix.

Positions: the prefix keys are stored as they are, never rotated, and the caller's tokens are
shifted by ``P`` positions, as the model itself counts cache slots and as PEFT does: position ids
the caller passes (e.g. ``cumsum(mask) - 1`` for left padding) get ``+P``, and without them the
tokens get ``P + past, P + past + 1, …``. The choice matters even with rotary positions: the
scores of a rotated query against unrotated prefix keys depend on the query's absolute position,
so this convention is what makes a PEFT prefix give the same outputs here. With learned absolute
positions (GPT-2, BERT) the prefix uses ``P`` of ``max_position_embeddings``.

Layout: the flat prefix ``[P, layers·2·H_kv·D]`` is, per token, layer 0's key heads, layer 0's
value heads, layer 1's key heads, … (PEFT's layout, so PEFT prefix weights load unchanged).
"""

from __future__ import annotations

import math
from typing import Optional

import torch
from torch import nn

from .deltas import PrefixConfig

MARK = "_lmfuse_prefixes"  # on a KV cache object: {id(prefix module): P} of the prefixes it holds
CREATED = "_lmfuse_prefix_cache"  # on a KV cache a prefix hook made because the caller passed none


def attention_geometry(model: nn.Module) -> tuple[int, int, int]:
    """``(layers, key/value heads, head_dim)`` of a ``transformers`` model's attention, from its config."""
    cfg = getattr(model, "config", None)
    layers = getattr(cfg, "num_hidden_layers", None)
    heads = getattr(cfg, "num_attention_heads", None)
    hidden = getattr(cfg, "hidden_size", None)
    if not all(isinstance(v, int) for v in (layers, heads, hidden)):
        raise TypeError(f"a prefix needs a transformers model whose config gives num_hidden_layers, "
                        f"num_attention_heads and hidden_size; {type(model).__name__} has "
                        f"{type(cfg).__name__ if cfg is not None else 'no config'}")
    kv = getattr(cfg, "num_key_value_heads", None) or heads
    head_dim = getattr(cfg, "head_dim", None) or hidden // heads
    return layers, kv, head_dim


def _linear(d_in: int, d_out: int, generator, **kw) -> nn.Linear:
    lin = nn.Linear(d_in, d_out, device="meta")
    bound = 1.0 / math.sqrt(d_in)  # nn.Linear's own default range, drawn from `generator`
    lin.weight = nn.Parameter(torch.empty(d_out, d_in).uniform_(-bound, bound, generator=generator).to(**kw))
    lin.bias = nn.Parameter(torch.empty(d_out).uniform_(-bound, bound, generator=generator).to(**kw))
    return lin


class Prefix(nn.Module):
    """The prefix of one delta: ``prefix [P, width]``, or (reparameterised) ``embedding [P, H_kv·D]``
    and ``mlp = Linear(H_kv·D, hidden_size) → tanh → Linear(hidden_size, width)``, where
    ``width = layers·2·H_kv·D``. Parameters in the model's dtype and device."""

    _lmfuse_delta_internal = True  # never addressed as a backbone module
    state_name = "prefix"

    def __init__(self, cfg: PrefixConfig, geometry: tuple[int, int, int], generator=None, **kw):
        super().__init__()
        self.layers, self.heads, self.head_dim = geometry
        token = self.heads * self.head_dim
        width = self.layers * 2 * token
        p = cfg.num_virtual_tokens
        draw = torch.randn((p, token if cfg.reparameterize else width), generator=generator) * cfg.init_std
        if cfg.reparameterize:
            self.embedding = nn.Parameter(draw.to(**kw))
            self.mlp = nn.Sequential(_linear(token, cfg.hidden_size, generator, **kw), nn.Tanh(),
                                     _linear(cfg.hidden_size, width, generator, **kw))
        else:
            self.prefix = nn.Parameter(draw.to(**kw))

    @property
    def n_tokens(self) -> int:
        return (self.embedding if self.reparameterized else self.prefix).shape[0]

    @property
    def reparameterized(self) -> bool:
        return "mlp" in self._modules

    def flat(self) -> torch.Tensor:
        """``[P, layers·2·H_kv·D]``."""
        return self.mlp(self.embedding) if self.reparameterized else self.prefix

    def key_values(self, batch: int, dtype: Optional[torch.dtype] = None) -> list[tuple[torch.Tensor, torch.Tensor]]:
        """Per layer ``(key, value)``, each ``[batch, H_kv, P, D]`` (a broadcast view over the batch)."""
        f = self.flat()
        if dtype is not None:
            f = f.to(dtype)
        p = f.shape[0]
        f = f.view(p, self.layers * 2, self.heads, self.head_dim).permute(1, 2, 0, 3)
        return [(f[2 * i].unsqueeze(0).expand(batch, -1, -1, -1), f[2 * i + 1].unsqueeze(0).expand(batch, -1, -1, -1))
                for i in range(self.layers)]

    @torch.no_grad()
    def fold(self) -> None:
        """Replace the embedding and MLP by the prefix they produce (irreversible; outputs unchanged)."""
        if not self.reparameterized:
            return
        value = self.flat().detach().clone()
        del self.mlp
        del self.embedding
        self.prefix = nn.Parameter(value)


def _cache_length(pkv) -> int:
    if pkv is None:
        return 0
    get_len = getattr(pkv, "get_seq_length", None)
    if callable(get_len):
        return int(get_len())
    raise TypeError(f"past_key_values: a model with a prefix needs a transformers Cache (DynamicCache), "
                    f"got {type(pkv).__name__}")


def prefix_tokens(pkv) -> int:
    """How many cache slots the prefixes put in ``pkv`` (0 for a cache without one)."""
    return sum(getattr(pkv, MARK, {}).values()) if pkv is not None else 0


def make_pre_hook(model: nn.Module, prefix: Prefix):
    """The pre-forward hook (``register_forward_pre_hook(with_kwargs=True)`` on the root model)
    that puts ``prefix`` in the KV cache and extends the mask and positions (module docstring)."""

    def pre_hook(module, args, kwargs):
        if args:
            if len(args) > 1:
                raise TypeError("a model with a prefix must be called with keyword arguments "
                                "(input_ids=..., attention_mask=...)")
            kwargs = dict(kwargs, input_ids=args[0])
            args = ()
        ref = kwargs.get("input_ids")
        if ref is None:
            ref = kwargs.get("inputs_embeds")
        if ref is None:
            raise ValueError("prefix: the model needs input_ids or inputs_embeds")
        batch, new = ref.shape[0], ref.shape[1]
        mask = kwargs.get("attention_mask")
        if mask is not None and mask.dim() != 2:
            raise ValueError(f"attention_mask: a model with a prefix needs a 2-D [batch, seq] mask, "
                             f"got shape {tuple(mask.shape)}")
        pkv = kwargs.get("past_key_values")
        past = _cache_length(pkv)
        if pkv is not None and past < prefix_tokens(pkv):  # cropped below the prefixes: a stale mark
            pkv.__dict__[MARK] = {}
        if id(prefix) not in getattr(pkv, MARK, {}):
            if past != prefix_tokens(pkv):
                return args, kwargs  # a cache this prefix did not fill: continued unchanged
            # a new sequence (the cache is empty, or holds only other prefixes): fill in the prefix
            if pkv is None:
                from transformers import DynamicCache

                pkv = DynamicCache(config=model.config)
                pkv.__dict__[CREATED] = True
            if not callable(getattr(pkv, "update", None)):
                raise TypeError(f"past_key_values: expected a transformers Cache, got {type(pkv).__name__}")
            dtype = ref.dtype if ref.is_floating_point() else None
            if dtype is None:
                dtype = next((q.dtype for q in model.parameters() if q.is_floating_point()), None)
            for layer, (k, v) in enumerate(prefix.key_values(batch, dtype)):
                pkv.update(k, v, layer)
            pkv.__dict__.setdefault(MARK, {})[id(prefix)] = prefix.n_tokens
            kwargs["past_key_values"] = pkv
            past = _cache_length(pkv)
        held = prefix_tokens(pkv)
        user_past = past - held  # cached tokens of the caller (and of soft prompts), not prefix slots
        pos = kwargs.get("position_ids")
        if pos is None:
            pos = torch.arange(user_past, user_past + new, device=ref.device).unsqueeze(0)
        kwargs["position_ids"] = pos + prefix.n_tokens  # each prefix shifts the positions by its length
        if mask is None:
            kwargs["attention_mask"] = torch.ones(batch, past + new, dtype=torch.long, device=ref.device)
        else:
            missing = past + new - mask.shape[1]
            if missing < 0 or missing > held:
                raise ValueError(f"attention_mask: expected {user_past + new} columns (the cached and new tokens), "
                                 f"or {past + new} with the prefix, got {mask.shape[1]}")
            if missing:  # ones for the prefix slots (other prefixes' slots are ones too)
                kwargs["attention_mask"] = torch.cat([mask.new_ones(mask.shape[0], missing), mask], dim=1)
        return args, kwargs

    return pre_hook


def post_hook(module, args, kwargs, output):
    """A call with ``use_cache=False`` returns no cache, also when the prefix hook made one."""
    if kwargs.get("use_cache") is False:
        get = output.get if isinstance(output, dict) else (lambda k: getattr(output, k, None))
        pkv = get("past_key_values")
        if pkv is not None and pkv.__dict__.get(CREATED, False):
            output["past_key_values"] = None
    return output
