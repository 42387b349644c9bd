"""Drafters for speculative decoding: prompt lookup (deterministic, no model) and a layer-truncated
copy of the target (a cheap self-draft that shares the target's embeddings, layers and head)."""

from __future__ import annotations

import copy

import torch
from torch import nn


class PromptLookupDrafter:
    """Propose the tokens that followed the most recent earlier occurrence of the row's last
    n-gram (n from ``max_ngram`` down to ``min_ngram``), as in prompt-lookup decoding.

    Deterministic: its proposal distribution q is one-hot, so ``spec_verify`` is called with
    ``draft_logits=None`` and accepts draft x with probability p(x).
    """

    def __init__(self, max_ngram: int = 3, min_ngram: int = 1):
        if not (isinstance(min_ngram, int) and isinstance(max_ngram, int) and 1 <= min_ngram <= max_ngram):
            raise ValueError(f"PromptLookupDrafter: need 1 <= min_ngram <= max_ngram, got {min_ngram}, {max_ngram}")
        self.max_ngram, self.min_ngram = max_ngram, min_ngram

    def propose_one(self, history: torch.Tensor, k: int) -> torch.Tensor:
        """Up to ``k`` draft tokens for one 1-D token history (possibly fewer, possibly none)."""
        L = history.numel()
        for n in range(min(self.max_ngram, L - 1), self.min_ngram - 1, -1):
            pattern = history[L - n:]
            windows = history[: L - 1].unfold(0, n, 1)  # every earlier n-gram with a successor
            hits = (windows == pattern).all(dim=1).nonzero()
            if hits.numel():
                start = int(hits[-1]) + n  # the most recent match is the likeliest continuation
                return history[start:start + k]
        return history[:0]

    def propose(self, histories: list[torch.Tensor], k: int) -> tuple[torch.Tensor, torch.Tensor]:
        """``(drafts [B, k] int64, counts [B] int64)``; entries past a row's count are 0."""
        drafts = torch.zeros(len(histories), k, dtype=torch.long)
        counts = torch.zeros(len(histories), dtype=torch.long)
        for i, h in enumerate(histories):
            d = self.propose_one(h.cpu(), k)
            drafts[i, : d.numel()] = d
            counts[i] = d.numel()
        return drafts, counts


def _decoder_layers(model: nn.Module) -> tuple[nn.Module, str]:
    """The module holding ``layers`` (a ``ModuleList``) of a HF decoder-only model."""
    base = getattr(model, "model", None)
    if base is not None and isinstance(getattr(base, "layers", None), nn.ModuleList):
        return base, "layers"
    raise TypeError(f"truncate_layers: {type(model).__name__} has no .model.layers ModuleList "
                    "(Llama/Mistral/Qwen2-style models are supported)")


def truncate_layers(model: nn.Module, num_layers: int) -> nn.Module:
    """A draft model made of the first ``num_layers`` decoder layers of ``model``.

    Nothing is copied: the returned model shares the embeddings, those layers, the final norm
    and the LM head (same parameter objects), so it costs no memory and stays in sync if the
    target is modified. Its config is a copy with ``num_hidden_layers`` (and per-layer lists
    such as ``layer_types``) cut to ``num_layers``.
    """
    base, attr = _decoder_layers(model)
    total = len(getattr(base, attr))
    if not isinstance(num_layers, int) or not 1 <= num_layers <= total:
        raise ValueError(f"num_layers: expected an int in [1, {total}], got {num_layers!r}")
    cfg = copy.deepcopy(model.config)
    cfg.num_hidden_layers = num_layers
    for key in ("layer_types",):
        if isinstance(getattr(cfg, key, None), list):
            setattr(cfg, key, getattr(cfg, key)[:num_layers])
    # Shallow copies of the two wrapper modules with their own _modules dicts: the children are
    # the same objects, only the layer list is shorter and the config differs.
    draft = copy.copy(model)
    draft._modules = dict(model._modules)
    draft_base = copy.copy(base)
    draft_base._modules = dict(base._modules)
    draft_base._modules[attr] = nn.ModuleList(list(getattr(base, attr))[:num_layers])
    draft_base.config = cfg
    draft._modules["model"] = draft_base
    draft.config = cfg
    if getattr(model, "generation_config", None) is not None:
        draft.generation_config = copy.deepcopy(model.generation_config)
    return draft
