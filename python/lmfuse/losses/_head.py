"""What a Hugging Face causal LM does between its last hidden state and its logits.

:func:`output_head` reads, from the model itself, everything the fused losses need to reproduce
``model(...).logits`` without computing them: the output projection's weight and bias (the very
tensors, so tied weights and frozen heads behave as in the model), the logit scale and the
final-logit softcap that some architectures apply after the projection, and the backbone whose
``last_hidden_state`` feeds the head. :func:`run_backbone` calls that backbone.
"""

from __future__ import annotations

import inspect
from dataclasses import dataclass

import torch
from torch import nn

__all__ = ["OutputHead", "output_head", "run_backbone", "unwrap_model"]


@dataclass(frozen=True)
class OutputHead:
    """The output projection of a causal LM, as the fused ops take it.

    ``logits = softcap(logit_scale · (hidden @ weightᵀ + bias))`` over the first ``vocab_size``
    rows of ``weight [V, H]`` (``softcap`` None: no cap; ``c``: ``c · tanh(x / c)``).
    """

    backbone: nn.Module
    weight: torch.Tensor
    bias: torch.Tensor | None
    logit_scale: float
    softcap: float | None
    vocab_size: int


def unwrap_model(model: nn.Module) -> nn.Module:
    """The Hugging Face model inside DDP / ``torch.compile`` / PEFT wrappers (itself otherwise)."""
    seen = set()
    while id(model) not in seen:
        seen.add(id(model))
        if isinstance(model, nn.parallel.DistributedDataParallel) or type(model).__name__ == "DataParallel":
            model = model.module
        elif hasattr(model, "_orig_mod") and isinstance(model._orig_mod, nn.Module):  # torch.compile
            model = model._orig_mod
        elif callable(getattr(model, "get_base_model", None)):  # a PEFT PeftModel
            model = model.get_base_model()
    return model


def _plain_linear(head: nn.Module) -> nn.Linear:
    """``head`` if computing ``hidden @ head.weightᵀ + head.bias`` is exactly what it does."""
    if not isinstance(head, nn.Linear) or type(head).forward is not nn.Linear.forward:
        raise TypeError(
            "the fused losses need the model's output embedding to be a plain nn.Linear (its weight "
            f"and bias are read directly), got {type(head).__name__}; an adapter attached to the "
            "output head would be bypassed, so attach it elsewhere or use the model's own loss")
    if "forward" in head.__dict__:
        raise TypeError("the model's output embedding has its forward replaced on the instance, which "
                        "the fused losses would bypass")
    if head._forward_hooks or head._forward_pre_hooks:
        raise TypeError(
            "the model's output embedding has forward hooks, which the fused losses would bypass "
            f"(hooks: {len(head._forward_pre_hooks)} pre, {len(head._forward_hooks)} post)")
    return head


def _config_number(config, name: str) -> float | None:
    value = getattr(config, name, None)
    if value is None:
        text = getattr(config, "text_config", None)
        value = getattr(text, name, None) if text is not None else None
    return None if value is None else float(value)


# How architectures scale their logits after the output projection, by ``config.model_type``
# prefix. The same config attribute means opposite things in different families (Granite divides
# by ``logits_scaling``, HyperCLOVA X multiplies by it), so the rule is looked up by family and a
# model with an unknown scaling attribute is refused rather than guessed.
def _logit_scale(model: nn.Module, config) -> float:
    model_type = str(getattr(config, "model_type", ""))
    if model_type.startswith("cohere"):
        scale = getattr(model, "logit_scale", None)
        scale = _config_number(config, "logit_scale") if scale is None else float(scale)
        return 1.0 if scale is None else scale
    if model_type.startswith("granite"):
        div = _config_number(config, "logits_scaling")
        return 1.0 if div is None else 1.0 / div
    if model_type.startswith("hyperclovax"):
        mul = _config_number(config, "logits_scaling")
        return 1.0 if mul is None else mul
    if model_type == "falcon_h1":
        mul = getattr(getattr(model, "model", None), "lm_head_multiplier", None)
        return 1.0 if mul is None else float(mul)
    for name in ("logit_scale", "logits_scaling", "lm_head_multiplier", "output_multiplier"):
        if _config_number(config, name) not in (None, 1.0):
            raise NotImplementedError(
                f"model_type {model_type!r} sets config.{name}, and how this architecture applies it "
                "to the logits is not known to lmfuse; pass logit_scale= explicitly")
    return 1.0


def output_head(model: nn.Module, *, logit_scale: float | None = None,
                softcap: float | None | str = "config") -> OutputHead:
    """Read the output head of a Hugging Face causal LM.

    ``logit_scale`` / ``softcap`` override what the model's configuration says (``softcap=None``
    turns the cap off; the default ``"config"`` uses ``config.final_logit_softcapping``).
    Raises ``TypeError`` when the output embedding is not a plain ``nn.Linear`` (an adapter on the
    head, a hook) and ``NotImplementedError`` for a logit scaling lmfuse does not know.
    """
    model = unwrap_model(model)
    get_out = getattr(model, "get_output_embeddings", None)
    head = get_out() if callable(get_out) else None
    if head is None:
        raise TypeError(f"model: expected a causal LM with an output embedding, got {type(model).__name__}")
    head = _plain_linear(head)
    config = getattr(model, "config", None)
    backbone = getattr(model, "base_model", None)
    if backbone is None or backbone is model:
        raise TypeError(f"model: {type(model).__name__} has no base model separate from its head")
    if logit_scale is None:
        logit_scale = _logit_scale(model, config)
    if isinstance(softcap, str):
        if softcap != "config":
            raise ValueError(f"softcap: expected a positive number, None or 'config', got {softcap!r}")
        softcap = _config_number(config, "final_logit_softcapping")
    vocab = getattr(config, "vocab_size", None) or getattr(getattr(config, "text_config", None), "vocab_size", None)
    rows = head.weight.shape[0]
    vocab_size = rows if vocab is None else min(int(vocab), rows)
    return OutputHead(backbone, head.weight, head.bias, float(logit_scale),
                      None if softcap is None else float(softcap), vocab_size)


def _accepts(module: nn.Module, name: str) -> bool:
    params = inspect.signature(module.forward).parameters
    return name in params or any(p.kind == p.VAR_KEYWORD for p in params.values())


def run_backbone(backbone: nn.Module, input_ids=None, attention_mask=None, **kwargs) -> torch.Tensor:
    """The backbone's ``last_hidden_state`` ``[B, T, H]`` (no cache is built unless asked)."""
    kwargs.setdefault("use_cache", False)
    if not _accepts(backbone, "use_cache"):
        kwargs.pop("use_cache")
    out = backbone(input_ids=input_ids, attention_mask=attention_mask, **kwargs)
    hidden = getattr(out, "last_hidden_state", None)
    if hidden is None:
        hidden = out[0] if isinstance(out, (tuple, list)) else None
    if not isinstance(hidden, torch.Tensor):
        raise TypeError(f"the backbone {type(backbone).__name__} returned no last_hidden_state")
    return hidden
