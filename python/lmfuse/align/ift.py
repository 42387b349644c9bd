"""IFT (intuitive fine-tuning) on Hugging Face causal LMs, without the ``[B, T, V]`` logits.

One step on a batch of SFT data (``input_ids``, ``labels`` with ``-100`` outside the response):

1. a no-grad pass of the policy on the ground-truth tokens gives, at every position, the
   model's own greedy prediction of the next token (an argmax fused into the vocabulary op);
2. the input of each response position mixes the true token with the token the model predicted
   for it from the true prefix: ``e_t = (1 − λ)·E[x_t] + λ·E[x̃_t]``, ``x̃_t = argmax p(· | x_<t)``
   (prompt positions keep ``x``), built from the embedding table without a gradient;
3. a second pass on the mixed embeddings gives the per-token log-probs, and the loss is IFT's
   propagated loss (:func:`lmfuse.align.ift_loss`).

λ = 0 and γ = 0 give plain SFT (per-sequence mean NLL) exactly, and then the first pass is
skipped. See ``docs/ift.md``.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Optional

import torch
import torch.nn.functional as F
from torch import Tensor, nn
from transformers import Trainer, TrainingArguments

from ..losses._head import output_head, run_backbone, unwrap_model
from ..losses.causal_lm import _check_tokens, _head_tensors, _shift
from ._ift_weights import (LAMBDA_DISTURBS, LAMBDA_SCHEDULES, _check_choice, _check_unit, check_propagation,
                           ift_lambda, ift_loss, ift_weights)

__all__ = ["IFTOutput", "ift_inputs", "ift_model_loss", "IFTConfig", "IFTTrainer", "ift_loss", "ift_weights",
           "ift_lambda"]


@dataclass
class IFTOutput:
    """What :func:`ift_model_loss` returns.

    ``loss``: the 0-d float32 IFT loss (differentiable). ``sft_loss``: the per-sequence mean NLL
    of the first pass on the true tokens (detached; the second pass's when the first is skipped
    at λ = 0). ``further_loss``: the unweighted per-sequence mean NLL of the second pass
    (detached). ``token_logps [B, T−1]`` float32: the second pass's log-prob of each next token
    (0 where masked); ``mask [B, T−1]`` bool; ``weights [B, T−1]`` the IFT weights;
    ``mixed_ids [B, T]``: the token ids ``x̃`` mixed in; ``lam``: the λ used.
    """

    loss: Tensor
    sft_loss: Tensor
    further_loss: Tensor
    token_logps: Tensor
    mask: Tensor
    weights: Tensor
    mixed_ids: Tensor
    lam: float


def _per_sequence_nll(logp: Tensor, mask: Tensor) -> Tensor:
    n = mask.sum(-1)
    has = n > 0
    per = -(logp * mask).sum(-1) / n.clamp(min=1)
    return (per * has).sum() / has.sum().clamp(min=1)


def _checkpointing(backbone: nn.Module) -> bool:
    for name in ("is_activation_checkpointing", "is_gradient_checkpointing"):  # the newer name first
        if name in dir(type(backbone)):
            return bool(getattr(backbone, name))
    return False


def _validate_batch(input_ids, labels, attention_mask):
    _check_tokens("input_ids", input_ids)
    _check_tokens("labels", labels, input_ids)
    if input_ids.dtype != torch.int64 or labels.dtype != torch.int64:
        raise TypeError(f"input_ids and labels must be int64, got {input_ids.dtype} and {labels.dtype}")
    if attention_mask is not None:
        _check_tokens("attention_mask", attention_mask, input_ids)


def _embed(emb: nn.Module, ids: Tensor, grad: bool) -> Tensor:
    # The module itself (not its weight): models that scale their embeddings inside the module
    # (Gemma) and adapters on the embedding behave as in the model's own forward.
    if grad:
        return emb(ids)
    with torch.no_grad():
        return emb(ids)


def ift_inputs(model: nn.Module, input_ids: Tensor, labels: Tensor, attention_mask: Optional[Tensor] = None, *,
               lam: float = 0.2, embedding_grad: bool = False, ignore_index: int = -100):
    """The mixed input embeddings of IFT's second pass (steps 1-2 of the module doc).

    Args:
        model: a Hugging Face causal LM (wrappers looked through).
        input_ids: ``[B, T]`` int64; labels: ``[B, T]`` int64, ``ignore_index`` outside the
            response (in the Hugging Face convention: not shifted); attention_mask: ``[B, T]`` or None.
        lam: λ in ``[0, 1]``. embedding_grad: build the embeddings with a gradient to the
            embedding table (default False, as the published method).

    Returns:
        ``(inputs_embeds [B, T, H], mixed_ids [B, T] int64, sft_logps [B, T−1] float32 or None)``:
        ``mixed_ids`` is ``x̃`` (the first pass's argmax, shifted in at response positions;
        ``input_ids`` elsewhere and everywhere at λ = 0); ``sft_logps`` the first pass's next-token
        log-probs (None when λ = 0 skips it).
    """
    from lmfuse import ops

    _validate_batch(input_ids, labels, attention_mask)
    lam = _check_unit("lam", lam)
    base = unwrap_model(model)
    emb = base.get_input_embeddings()
    head = output_head(base)
    e_true = _embed(emb, input_ids, embedding_grad)
    if lam == 0.0:
        return e_true, input_ids, None
    target = _shift(labels, ignore_index)
    with torch.no_grad():
        e_first = e_true if not embedding_grad else e_true.detach()
        hidden = run_backbone(head.backbone, None, attention_mask, inputs_embeds=e_first)
        hidden, weight, bias = _head_tensors(head, hidden)
        logp, pred = ops.linear_log_probs(hidden, weight, target, bias=bias, ignore_index=ignore_index,
                                          temperature=1.0 / head.logit_scale, softcap=head.softcap,
                                          vocab_size=head.vocab_size, return_argmax=True)
    # position t takes the token predicted at t − 1 (-1 where that prediction was not made)
    shifted = F.pad(pred[:, :-1], (1, 0), value=-1)
    mixed_ids = torch.where((labels != ignore_index) & (shifted >= 0), shifted, input_ids)
    e_pred = _embed(emb, mixed_ids, embedding_grad)
    embeds = (1.0 - lam) * e_true + lam * e_pred
    return embeds, mixed_ids, logp[:, :-1].float()


def ift_model_loss(model: nn.Module, input_ids: Tensor, labels: Tensor, attention_mask: Optional[Tensor] = None, *,
                   lam: float = 0.2, gamma: float = 0.95, propagation_type: str = "loss",
                   propagation_side: str = "left", propagation_norm: str = "L1", detach_weights: bool = False,
                   embedding_grad: bool = False, ignore_index: int = -100) -> IFTOutput:
    """One IFT loss on a batch (two passes, one backward), logits never materialised.

    Args: ``model``, ``input_ids``, ``labels``, ``attention_mask``, ``lam``, ``embedding_grad``
    as :func:`ift_inputs`; ``gamma`` and the ``propagation_*`` / ``detach_weights`` options as
    :func:`lmfuse.align.ift_loss`. The batch should be right-padded (positions are counted from
    the first column, as in the model's own forward without ``position_ids``).

    Returns:
        an :class:`IFTOutput`; backpropagate ``.loss``.
    """
    from lmfuse import ops

    check_propagation(gamma, propagation_type, propagation_side, propagation_norm)
    embeds, mixed_ids, sft_logps = ift_inputs(model, input_ids, labels, attention_mask, lam=lam,
                                              embedding_grad=embedding_grad, ignore_index=ignore_index)
    head = output_head(model)
    if _checkpointing(head.backbone) and not embeds.requires_grad:
        embeds = embeds.requires_grad_()  # reentrant checkpointing drops gradients of inputs without one
    hidden = run_backbone(head.backbone, None, attention_mask, inputs_embeds=embeds)
    target = _shift(labels, ignore_index)
    hidden, weight, bias = _head_tensors(head, hidden)
    logp = ops.linear_log_probs(hidden, weight, target, bias=bias, ignore_index=ignore_index,
                                temperature=1.0 / head.logit_scale, softcap=head.softcap, vocab_size=head.vocab_size)
    token_logps, mask = logp[:, :-1], (target != ignore_index)[:, :-1]
    loss, w = ift_loss(token_logps, mask, gamma=gamma, propagation_type=propagation_type,
                       propagation_side=propagation_side, propagation_norm=propagation_norm,
                       detach_weights=detach_weights, return_weights=True)
    further = _per_sequence_nll(token_logps.detach(), mask)
    sft = further if sft_logps is None else _per_sequence_nll(sft_logps, mask)
    return IFTOutput(loss, sft, further, token_logps, mask, w, mixed_ids, float(lam))


@dataclass
class IFTConfig(TrainingArguments):
    """``TrainingArguments`` plus IFT's options (defaults = the published configuration).

    λ: ``lambda_max`` (0.2) alone unless ``lambda_schedule="linear"`` ramps it from
    ``lambda_min`` over ``lambda_warmup_steps`` optimizer steps (150); ``lambda_disturb="normal"``
    multiplies it by ``1 + disturb_std·n``, ``n ~ N(0, 1)`` drawn per step from ``seed``.
    Weights: ``gamma`` (0.95), ``propagation_type`` / ``_side`` / ``_norm``, ``detach_weights``
    (False) as in :func:`lmfuse.align.ift_loss`. ``embedding_grad`` (False): whether the input
    path trains the embedding table. ``disable_dropout`` (True): set every ``nn.Dropout`` to
    p = 0, so both passes see the same network.
    """

    lambda_min: float = field(default=0.2, metadata={"help": "λ at step 0 of the linear schedule"})
    lambda_max: float = field(default=0.2, metadata={"help": "λ (after warm-up)"})
    lambda_schedule: Optional[str] = field(default=None, metadata={"help": "None or 'linear'"})
    lambda_warmup_steps: int = field(default=150, metadata={"help": "optimizer steps of the linear warm-up"})
    lambda_disturb: Optional[str] = field(default=None, metadata={"help": "None or 'normal'"})
    disturb_std: float = field(default=0.5, metadata={"help": "relative std of the λ disturbance"})
    gamma: float = field(default=0.95, metadata={"help": "discount of the propagated loss"})
    propagation_type: str = field(default="loss", metadata={"help": "'loss', 'logps' or 'mask'"})
    propagation_side: str = field(default="left", metadata={"help": "'left' or 'right'"})
    propagation_norm: str = field(default="L1", metadata={"help": "'L1', 'L2', 'softmax' or 'log'"})
    detach_weights: bool = field(default=False, metadata={"help": "no gradient through the IFT weights"})
    embedding_grad: bool = field(default=False, metadata={"help": "train the embedding through the input path"})
    disable_dropout: bool = field(default=True, metadata={"help": "set dropout probabilities to 0"})

    def __post_init__(self):
        super().__post_init__()
        _check_unit("lambda_min", self.lambda_min)
        _check_unit("lambda_max", self.lambda_max)
        _check_choice("lambda_schedule", self.lambda_schedule, LAMBDA_SCHEDULES)
        _check_choice("lambda_disturb", self.lambda_disturb, LAMBDA_DISTURBS)
        if not isinstance(self.lambda_warmup_steps, int) or self.lambda_warmup_steps < 1:
            raise ValueError(f"lambda_warmup_steps must be an int >= 1, got {self.lambda_warmup_steps!r}")
        if not self.disturb_std >= 0:
            raise ValueError(f"disturb_std must be >= 0, got {self.disturb_std!r}")
        check_propagation(self.gamma, self.propagation_type, self.propagation_side, self.propagation_norm)


class IFTTrainer(Trainer):
    """A :class:`transformers.Trainer` whose loss is IFT's (:func:`ift_model_loss`).

    ``args`` must be an :class:`IFTConfig`. Batches carry ``input_ids``, ``labels`` (``-100``
    outside the response) and optionally ``attention_mask``, right-padded. λ follows the
    optimizer-step counter (``state.global_step``). The loss is a per-batch mean, scaled by the
    Trainer for gradient accumulation. Works with ``lmfuse.delta`` adapters and PEFT models
    inside the backbone (the output head must stay a plain ``nn.Linear``) and with gradient
    checkpointing. Logs ``ift/sft_loss`` (first pass), ``ift/further_loss`` (second pass,
    unweighted) and ``ift/lambda`` beside ``loss``.
    """

    def __init__(self, *args, **kwargs):
        super().__init__(*args, **kwargs)
        if not isinstance(self.args, IFTConfig):
            raise TypeError(f"args must be an IFTConfig, got {type(self.args).__name__}")
        output_head(self.model)  # fail now, not at the first step
        self.loss_is_scaled_for_ga = False  # per-batch mean: the Trainer divides by the accumulation steps
        self.model_accepts_loss_kwargs = False
        if self.args.disable_dropout:
            for m in self.model.modules():
                if isinstance(m, nn.Dropout):
                    m.p = 0.0
        self._ift_logs: dict[str, list[float]] = {}

    def current_lambda(self) -> float:
        a = self.args
        return ift_lambda(self.state.global_step, lambda_min=a.lambda_min, lambda_max=a.lambda_max,
                          schedule=a.lambda_schedule, warmup_steps=a.lambda_warmup_steps, disturb=a.lambda_disturb,
                          disturb_std=a.disturb_std, seed=a.seed)

    def compute_loss(self, model, inputs, return_outputs=False, num_items_in_batch=None):
        a = self.args
        for key in ("input_ids", "labels"):
            if key not in inputs:
                raise KeyError(f"IFTTrainer: the batch has no {key!r} (keys: {sorted(inputs)})")
        out = ift_model_loss(model, inputs["input_ids"], inputs["labels"], inputs.get("attention_mask"),
                             lam=self.current_lambda(), gamma=a.gamma, propagation_type=a.propagation_type,
                             propagation_side=a.propagation_side, propagation_norm=a.propagation_norm,
                             detach_weights=a.detach_weights, embedding_grad=a.embedding_grad)
        if model.training:
            for k, v in (("ift/sft_loss", out.sft_loss), ("ift/further_loss", out.further_loss),
                         ("ift/lambda", out.lam)):
                self._ift_logs.setdefault(k, []).append(float(v))
        return (out.loss, {"loss": out.loss}) if return_outputs else out.loss

    def log(self, logs: dict, *args, **kwargs) -> None:
        if self._ift_logs and "loss" in logs:
            logs = dict(logs, **{k: sum(v) / len(v) for k, v in self._ift_logs.items()})
            self._ift_logs = {}
        super().log(logs, *args, **kwargs)
