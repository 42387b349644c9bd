"""Causal-LM losses on Hugging Face models that never build the ``[B, T, V]`` logits.

Both functions run the model's backbone to its last hidden state and hand that, with the
model's own output projection (weight, bias, logit scale, final-logit softcap; see
:func:`lmfuse.losses.output_head`), to the fused vocabulary ops
:func:`lmfuse.ops.linear_cross_entropy` and :func:`lmfuse.ops.linear_log_probs`.
"""

from __future__ import annotations

from typing import NamedTuple

import torch
import torch.nn.functional as F
from torch import nn

from ._head import OutputHead, output_head, run_backbone

__all__ = ["causal_lm_loss", "shifted_loss", "sequence_log_probs", "SequenceLogProbs"]

_LOSS_OPTIONS = ("ignore_index", "reduction", "label_smoothing", "z_loss_scale", "token_weight", "return_lse")


def _check_tokens(name: str, t, like: torch.Tensor | None = None) -> torch.Tensor:
    if not isinstance(t, torch.Tensor):
        raise TypeError(f"{name}: expected an int64 tensor [B, T], got {type(t).__name__}")
    if t.dim() != 2:
        raise ValueError(f"{name}: expected shape [B, T], got {tuple(t.shape)}")
    if like is not None and t.shape != like.shape:
        raise ValueError(f"{name}: expected shape {tuple(like.shape)} (as input_ids), got {tuple(t.shape)}")
    return t


def _check_mask(name: str, m, like: torch.Tensor) -> torch.Tensor:
    _check_tokens(name, m, like)
    if m.dtype.is_floating_point or m.is_complex():
        raise TypeError(f"{name}: expected a bool or integer 0/1 mask, got dtype {m.dtype}")
    return m.bool()


def _head_tensors(head: OutputHead, hidden: torch.Tensor):
    """The head's weight and bias in the dtype the model's own ``lm_head`` call would compute in:
    the autocast dtype under autocast, else the hidden states' (a differentiable cast, only when
    the dtypes differ)."""
    dtype = torch.get_autocast_dtype(hidden.device.type) if torch.is_autocast_enabled(hidden.device.type) \
        else hidden.dtype
    w, b = head.weight, head.bias
    cast = lambda t: t if t is None or t.dtype == dtype else t.to(dtype)  # noqa: E731
    return hidden.to(dtype), cast(w), cast(b)


def _shift(labels: torch.Tensor, ignore_index: int) -> torch.Tensor:
    """``target[:, t] = labels[:, t + 1]``, the last position ignored (position t predicts t+1)."""
    return F.pad(labels[:, 1:], (0, 1), value=ignore_index)


def shifted_loss(head: OutputHead, hidden: torch.Tensor, labels: torch.Tensor | None = None, *,
                 shift_labels: torch.Tensor | None = None, num_items_in_batch=None, **options):
    """The fused causal-LM loss from hidden states already computed by ``head.backbone``.

    ``hidden [B, T, H]``; ``labels [B, T]`` int64 (shifted here: position t predicts
    ``labels[:, t+1]``), or ``shift_labels [B, T]`` already aligned with the positions.
    ``num_items_in_batch`` (a number or 0-d tensor; the Trainer's gradient-accumulation
    normaliser): the loss becomes ``sum / num_items_in_batch`` (``reduction`` must stay "mean").
    ``token_weight [B, T]`` is aligned with ``labels`` (the weight of predicting ``labels[:, t]``)
    and shifted with them. Other options go to :func:`lmfuse.ops.linear_cross_entropy`.
    """
    from lmfuse import ops

    unknown = sorted(set(options) - set(_LOSS_OPTIONS))
    if unknown:
        raise TypeError(f"unexpected option(s) {unknown}; expected some of {list(_LOSS_OPTIONS)} "
                        "(logit_scale and softcap come from the model: pass them to output_head)")
    ignore_index = int(options.pop("ignore_index", -100))
    if (labels is None) == (shift_labels is None):
        raise ValueError("labels / shift_labels: expected exactly one of them, got "
                         f"{'both' if labels is not None else 'neither'}")
    B, T = hidden.shape[:2]
    if shift_labels is None:
        _check_tokens("labels", labels)
        if labels.shape != (B, T):
            raise ValueError(f"labels: expected shape {(B, T)} (the hidden states' [B, T]), got {tuple(labels.shape)}")
        target = _shift(labels, ignore_index)
        weight = options.pop("token_weight", None)
        if weight is not None:
            if not isinstance(weight, torch.Tensor) or weight.shape != labels.shape:
                got = tuple(weight.shape) if isinstance(weight, torch.Tensor) else type(weight).__name__
                raise ValueError(f"token_weight: expected a tensor of shape {tuple(labels.shape)} (as labels), got {got}")
            options["token_weight"] = F.pad(weight[:, 1:], (0, 1), value=0.0)
    else:
        _check_tokens("shift_labels", shift_labels)
        if shift_labels.shape != (B, T):
            raise ValueError(f"shift_labels: expected shape {(B, T)}, got {tuple(shift_labels.shape)}")
        target = shift_labels
    if num_items_in_batch is not None:
        if options.get("reduction", "mean") != "mean":
            raise ValueError("reduction: num_items_in_batch replaces the mean's divisor, so reduction must be "
                             f"'mean', got {options['reduction']!r}")
        options["reduction"] = "sum"
    hidden, weight, bias = _head_tensors(head, hidden)
    out = ops.linear_cross_entropy(
        hidden, weight, target.to(hidden.device), bias=bias, ignore_index=ignore_index,
        logit_scale=head.logit_scale, softcap=head.softcap, vocab_size=head.vocab_size, **options)
    if num_items_in_batch is None:
        return out
    loss, *rest = out if isinstance(out, tuple) else (out,)
    if isinstance(num_items_in_batch, torch.Tensor):
        num_items_in_batch = num_items_in_batch.to(loss.device)
    loss = loss / num_items_in_batch
    return (loss, *rest) if rest else loss


def causal_lm_loss(model: nn.Module, input_ids: torch.Tensor | None, labels: torch.Tensor,
                   attention_mask: torch.Tensor | None = None, *, num_items_in_batch=None,
                   model_kwargs: dict | None = None, **options):
    """``model(input_ids, attention_mask=..., labels=labels).loss`` without the logits.

    ``model``: a Hugging Face causal LM (``…ForCausalLM``; DDP / PEFT wrappers are looked
    through). ``input_ids [B, T]`` int64 (or None with ``inputs_embeds`` in ``model_kwargs``),
    ``labels [B, T]`` int64 in the Hugging Face convention (usually a copy of ``input_ids`` with
    ``-100`` where no loss is wanted; shifted here), ``attention_mask [B, T]`` or None.
    ``model_kwargs`` go to the backbone (``position_ids``, ``inputs_embeds``, ...).

    ``options``: ``reduction`` ("mean" | "sum" | "none"), ``label_smoothing``, ``z_loss_scale``,
    ``token_weight [B, T]`` (aligned with ``labels``), ``ignore_index`` (default -100),
    ``return_lse``, with the meanings of :func:`lmfuse.ops.linear_cross_entropy`; and
    ``logit_scale`` / ``softcap`` to override the model's own. ``num_items_in_batch``: divide the
    summed loss by it instead of the number of valid tokens (what ``transformers`` does under
    gradient accumulation).

    Returns the fp32 loss (a scalar, or ``[B, T]`` for ``reduction="none"``, position t holding
    the loss of predicting ``labels[:, t+1]``, 0 at the last position), and with
    ``return_lse=True`` also the fp32 log-sum-exp ``[B, T]`` per position.
    """
    head_opts = {k: options.pop(k) for k in ("logit_scale", "softcap") if k in options}
    head = output_head(model, **head_opts)
    model_kwargs = dict(model_kwargs or {})
    if input_ids is not None:
        _check_tokens("input_ids", input_ids)
    if attention_mask is not None:
        _check_tokens("attention_mask", attention_mask, labels)
    hidden = run_backbone(head.backbone, input_ids, attention_mask, **model_kwargs)
    return shifted_loss(head, hidden, labels, num_items_in_batch=num_items_in_batch, **options)


class SequenceLogProbs(NamedTuple):
    """Output of :func:`sequence_log_probs`.

    ``logp_sum [B]`` fp32: Σ log p(token) over the completion tokens of each sequence;
    ``n_tokens [B]`` int64: how many tokens were counted; ``token_logp [B, T]`` fp32: each
    counted token's log-prob at its own position in ``input_ids`` (0 elsewhere);
    ``token_log_sum_sq [B, T]`` fp32 or None: with ``return_log_sum_sq=True``, ``log Σ_v p_v²`` of
    the distribution that scored each counted token (0 elsewhere), detached.
    """

    logp_sum: torch.Tensor
    n_tokens: torch.Tensor
    token_logp: torch.Tensor
    token_log_sum_sq: torch.Tensor | None = None


def sequence_log_probs(model: nn.Module, input_ids: torch.Tensor, attention_mask: torch.Tensor | None,
                       completion_mask: torch.Tensor, *, position_ids: torch.Tensor | None = None,
                       temperature: float = 1.0, model_kwargs: dict | None = None,
                       return_log_sum_sq: bool = False) -> SequenceLogProbs:
    """Per-sequence sums of completion-token log-probs, without the ``[B, T, V]`` logits.

    ``input_ids [B, T]`` int64 (prompt + completion, padded left or right);
    ``attention_mask [B, T]`` (1 = real token; None = all real); ``completion_mask [B, T]``
    (1 = this token's log-prob counts). A token at position t is scored by the model's
    prediction at t − 1, so position 0 is never counted, and neither is a padded one.

    ``position_ids`` default to ``cumsum(attention_mask) − 1`` (clamped at 0), so a left-padded
    sequence scores as it would unpadded (the model's own forward numbers positions from 0 at
    the first column, padding included). ``temperature`` divides the model's logits (after its
    own logit scale, before its softcap). Differentiable in the model's parameters.

    ``return_log_sum_sq``: also give each counted token's ``log Σ_v p_v²`` (WPO's weight term),
    without gradient and without the logits: ``log Σ p² = lse(2z) − 2·lse(z) = 2·log p(t) −
    log p₂(t)``, where ``p₂`` is the softmax of the doubled logits ``2z``, which the same fused op
    gives at half the temperature and twice the softcap (``2·c·tanh(y/c) = 2c·tanh(2y/2c)``). One
    extra forward of the vocabulary head, no extra backbone pass.
    """
    from lmfuse import ops

    _check_tokens("input_ids", input_ids)
    completion = _check_mask("completion_mask", completion_mask, input_ids)
    if attention_mask is not None:
        attention = _check_mask("attention_mask", attention_mask, input_ids)
        completion = completion & attention
    if isinstance(temperature, bool) or not isinstance(temperature, (int, float)) or not temperature > 0:
        raise ValueError(f"temperature: expected a positive number, got {temperature!r}")
    head = output_head(model)
    model_kwargs = dict(model_kwargs or {})
    if position_ids is None and attention_mask is not None:
        position_ids = (attention_mask.long().cumsum(-1) - 1).clamp_(min=0)
    if position_ids is not None:
        model_kwargs["position_ids"] = position_ids
    hidden = run_backbone(head.backbone, input_ids, attention_mask, **model_kwargs)
    ignore = -100
    target = _shift(torch.where(completion, input_ids, ignore), ignore)
    # The op's temperature divides the scaled logits: fold the model's logit scale into it.
    hidden, weight, bias = _head_tensors(head, hidden)
    logp = ops.linear_log_probs(hidden, weight, target.to(hidden.device), bias=bias,
                                ignore_index=ignore, temperature=float(temperature) / head.logit_scale,
                                softcap=head.softcap, vocab_size=head.vocab_size)
    token_logp = F.pad(logp[:, :-1], (1, 0), value=0.0)  # back to the position of the token scored
    counted = completion.clone()
    counted[:, 0] = False
    log_sum_sq = None
    if return_log_sum_sq:
        with torch.no_grad():
            logp2 = ops.linear_log_probs(hidden.detach(), weight.detach(), target.to(hidden.device),
                                         bias=None if bias is None else bias.detach(), ignore_index=ignore,
                                         temperature=float(temperature) / (2 * head.logit_scale),
                                         softcap=None if head.softcap is None else 2 * head.softcap,
                                         vocab_size=head.vocab_size)
            log_sum_sq = F.pad((2 * logp.detach() - logp2)[:, :-1], (1, 0), value=0.0)
    return SequenceLogProbs(token_logp.sum(-1), counted.sum(-1), token_logp, log_sum_sq)
