"""Fine-tuning with a stock ``transformers.Trainer`` on the fused loss.

The Trainer's own loss hook, ``compute_loss_func``, receives the model's outputs, so by the time
it runs the model has already built the ``[B, T, V]`` logits. The hook here works one step
earlier: :func:`fused_causal_lm` replaces the ``forward`` of one model instance (its class and
``transformers`` are untouched) so that a call *with labels* runs the backbone and returns
``CausalLMOutputWithPast(loss=fused loss, logits=None)``; a call without labels (generation,
prediction) runs the original forward. Everything that wraps the model afterwards (DDP,
accelerate, gradient checkpointing, ``lmfuse.delta`` adapters inside the backbone) sees an
ordinary module.
"""

from __future__ import annotations

import functools
import inspect

import torch
from torch import nn

from ._head import output_head, run_backbone, unwrap_model
from .causal_lm import shifted_loss

__all__ = ["FusedCausalLM", "fused_causal_lm"]

_ATTR = "_lmfuse_fused_loss"
_TRAINER_OPTIONS = ("reduction", "label_smoothing", "z_loss_scale", "ignore_index", "logit_scale", "softcap")


class FusedCausalLM:
    """The handle :func:`fused_causal_lm` returns: ``remove()`` (or leaving the ``with`` block)
    puts the model's original ``forward`` back. ``calls`` counts the fused loss computations."""

    def __init__(self, model: nn.Module, options: dict):
        self.model = model
        self.options = dict(options)
        self.calls = 0
        self._had_instance_forward = "forward" in model.__dict__
        self._original = model.forward
        self._signature = inspect.signature(self._original)
        head_opts = {k: self.options.pop(k) for k in ("logit_scale", "softcap") if k in self.options}
        output_head(model, **head_opts)  # fail now, not at the first training step
        self._head_opts = head_opts

        @functools.wraps(self._original)  # keeps the signature: the Trainer inspects it for **kwargs
        def forward(*args, **kwargs):
            return self._forward(*args, **kwargs)

        self._forward_fn = forward
        model.forward = forward
        setattr(model, _ATTR, self)

    @property
    def active(self) -> bool:
        return self.model.__dict__.get("forward") is self._forward_fn

    def remove(self) -> None:
        """Restore the model's own forward (a no-op when already removed)."""
        if not self.active:
            if getattr(self.model, _ATTR, None) is self:
                raise RuntimeError("the model's forward was replaced again after fused_causal_lm() (e.g. by "
                                   "accelerate); remove the outer wrapper first")
            return
        if self._had_instance_forward:
            self.model.forward = self._original
        else:
            del self.model.forward
        delattr(self.model, _ATTR)

    def __enter__(self) -> "FusedCausalLM":
        return self

    def __exit__(self, *exc) -> None:
        self.remove()

    def _forward(self, *args, **kwargs):
        from transformers.modeling_outputs import CausalLMOutputWithPast

        bound = self._signature.bind_partial(*args, **kwargs)
        call = dict(bound.arguments)
        for name, p in self._signature.parameters.items():  # **kwargs arrive as one dict
            if p.kind == p.VAR_KEYWORD and name in call:
                call.update(call.pop(name))
        labels = call.pop("labels", None)
        shift_labels = call.pop("shift_labels", None)
        if labels is None and shift_labels is None:
            return self._original(*args, **kwargs)
        num_items = call.pop("num_items_in_batch", None)
        return_dict = call.pop("return_dict", None)
        keep = call.pop("logits_to_keep", 0)
        if not (isinstance(keep, int) and keep == 0):
            raise ValueError(f"logits_to_keep: the fused loss computes no logits, expected 0, got {keep!r}")
        head = output_head(self.model, **self._head_opts)
        input_ids = call.pop("input_ids", None)
        attention_mask = call.pop("attention_mask", None)
        hidden = run_backbone(head.backbone, input_ids, attention_mask, **call)
        loss = shifted_loss(head, hidden, labels, shift_labels=shift_labels,
                            num_items_in_batch=num_items, **self.options)
        self.calls += 1
        out = CausalLMOutputWithPast(loss=loss, logits=None)
        return out.to_tuple() if return_dict is False else out


def fused_causal_lm(model: nn.Module, **options) -> FusedCausalLM:
    """Make ``model(..., labels=...)`` compute its loss with the fused kernel, logits never built.

    ``model``: a Hugging Face causal LM (before it is handed to a ``Trainer``, DDP or
    ``accelerate``). ``options``: as :func:`lmfuse.losses.causal_lm_loss` (``reduction`` must
    stay "mean" for training; ``label_smoothing``, ``z_loss_scale``, ``ignore_index``,
    ``logit_scale`` / ``softcap`` overrides). The loss equals the model's own (fp32): the labels
    are shifted the same way, and ``num_items_in_batch`` (passed by the Trainer under gradient
    accumulation) divides the summed loss exactly as ``transformers`` does.

    With labels the output has ``loss`` only (``logits`` is None): train with it, evaluate with
    ``prediction_loss_only=True``. Returns a handle; ``handle.remove()`` or ``with
    fused_causal_lm(model): ...`` restores the original forward. Installing twice raises.
    """
    target = unwrap_model(model)
    if getattr(target, _ATTR, None) is not None:
        raise ValueError("model: fused_causal_lm() is already installed on this model")
    allowed = _TRAINER_OPTIONS
    bad = sorted(set(options) - set(allowed))
    if bad:
        raise TypeError(f"unexpected option(s) {bad}; expected some of {list(allowed)} (a model's loss is one "
                        "scalar: per-token weights and the lse have no place in its output)")
    if options.get("reduction", "mean") != "mean":
        raise ValueError(f"reduction: a model's loss is a scalar mean, got {options['reduction']!r}")
    return FusedCausalLM(target, options)
