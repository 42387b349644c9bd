"""Bradley–Terry reward models.

:class:`RewardModel` is a causal LM's backbone plus a linear ``score`` head (no bias) read at the
last non-pad token of each sequence: exactly what ``AutoModelForSequenceClassification`` with one
label computes, and it saves and loads in that format (``save_pretrained`` / ``from_pretrained``),
so any tool that reads a Hugging Face reward model reads it. :class:`RewardTrainer` trains it on
preference pairs with :func:`lmfuse.align.bt_loss` (optional per-pair margin and reward
centring) and reports the pairwise accuracy on held-out pairs.
"""

from __future__ import annotations

import copy
import os

import torch
from torch import nn
from transformers import Trainer

from lmfuse.losses import run_backbone
from lmfuse.losses._head import unwrap_model

from .preference import bt_loss

__all__ = ["RewardModel", "RewardTrainer", "RewardCollator", "pairwise_accuracy"]


def _last_token_index(input_ids: torch.Tensor, attention_mask: torch.Tensor | None, pad_token_id) -> torch.Tensor:
    """``[B]``: the rightmost real token of each row (by the mask, else the last non-pad id, else
    the last column). Works for left and right padding."""
    T = input_ids.shape[1]
    pos = torch.arange(T, device=input_ids.device)
    if attention_mask is not None:
        real = attention_mask.bool()
    elif pad_token_id is not None:
        real = input_ids != pad_token_id
    else:
        return torch.full((input_ids.shape[0],), T - 1, dtype=torch.long, device=input_ids.device)
    return (pos * real).argmax(-1)


class RewardModel(nn.Module):
    """``reward [B] = score(hidden[b, last real token])`` with ``score = nn.Linear(H, 1, bias=False)``.

    Build one with :meth:`from_causal_lm` (shares the LM's backbone weights, a fresh head) or
    :meth:`from_pretrained` (a folder saved by :meth:`save_pretrained` or any one-label
    ``AutoModelForSequenceClassification``). ``config``: the backbone's config, with
    ``num_labels = 1`` and ``pad_token_id``.
    """

    def __init__(self, backbone: nn.Module, score: nn.Linear, config):
        super().__init__()
        if not isinstance(score, nn.Linear) or score.out_features != 1:
            raise ValueError(f"score: expected nn.Linear(hidden, 1), got {score!r}")
        self.backbone = backbone
        self.score = score
        self.config = config

    @classmethod
    def from_causal_lm(cls, model: nn.Module, *, pad_token_id: int | None = None) -> "RewardModel":
        """A reward model on ``model``'s backbone (the same modules: no copy) with a new score head
        initialised as ``transformers`` does (normal, std ``config.initializer_range``).
        ``pad_token_id`` defaults to the config's (else its EOS)."""
        model = unwrap_model(model)
        backbone = getattr(model, "base_model", None)
        if backbone is None or backbone is model:
            raise TypeError(f"model: expected a Hugging Face causal LM with a base model, got {type(model).__name__}")
        config = copy.deepcopy(model.config)
        config.num_labels = 1
        if pad_token_id is not None:
            config.pad_token_id = int(pad_token_id)
        elif getattr(config, "pad_token_id", None) is None:
            eos = getattr(config, "eos_token_id", None)
            config.pad_token_id = eos[0] if isinstance(eos, (list, tuple)) else eos
        ref = next(backbone.parameters())
        score = nn.Linear(config.hidden_size, 1, bias=False, device=ref.device, dtype=ref.dtype)
        nn.init.normal_(score.weight, std=float(getattr(config, "initializer_range", 0.02)))
        return cls(backbone, score, config)

    @classmethod
    def from_pretrained(cls, path, **kwargs) -> "RewardModel":
        """Load a one-label ``AutoModelForSequenceClassification`` folder (``kwargs`` go to its
        ``from_pretrained``, e.g. ``dtype``)."""
        from transformers import AutoModelForSequenceClassification

        m = AutoModelForSequenceClassification.from_pretrained(path, **kwargs)
        if m.config.num_labels != 1:
            raise ValueError(f"path: expected a one-label sequence classifier, got num_labels={m.config.num_labels}")
        score = getattr(m, "score", None)
        if not isinstance(score, nn.Linear):
            raise TypeError(f"path: {type(m).__name__} has no linear 'score' head")
        return cls(m.base_model, score, m.config)

    def to_sequence_classification(self) -> nn.Module:
        """The same modules as a ``…ForSequenceClassification`` (shared, not copied)."""
        from transformers import AutoModelForSequenceClassification

        with torch.device("meta"):  # no second copy of the weights; the real modules go in below
            m = AutoModelForSequenceClassification.from_config(self.config)
        setattr(m, m.base_model_prefix, self.backbone)
        m.score = self.score
        return m

    def save_pretrained(self, path, **kwargs) -> None:
        """Save as a one-label ``AutoModelForSequenceClassification`` (config + safetensors)."""
        self.to_sequence_classification().save_pretrained(os.fspath(path), **kwargs)

    def forward(self, input_ids: torch.Tensor, attention_mask: torch.Tensor | None = None, **kwargs) -> torch.Tensor:
        """``input_ids [B, T]`` int64, ``attention_mask [B, T]`` (1 = real token) or None (then the
        last non-``pad_token_id`` token is read). Returns the rewards ``[B]`` in float32."""
        if not isinstance(input_ids, torch.Tensor) or input_ids.dim() != 2:
            got = tuple(input_ids.shape) if isinstance(input_ids, torch.Tensor) else type(input_ids).__name__
            raise ValueError(f"input_ids: expected an int64 tensor [B, T], got {got}")
        if attention_mask is not None and attention_mask.shape != input_ids.shape:
            raise ValueError(f"attention_mask: expected shape {tuple(input_ids.shape)}, got {tuple(attention_mask.shape)}")
        hidden = run_backbone(self.backbone, input_ids, attention_mask, **kwargs)
        last = _last_token_index(input_ids, attention_mask, self.config.pad_token_id)
        picked = hidden[torch.arange(hidden.shape[0], device=hidden.device), last]
        return self.score(picked.to(self.score.weight.dtype)).squeeze(-1).float()

    # Trainer hooks: gradient checkpointing goes to the backbone
    def gradient_checkpointing_enable(self, **kwargs):
        self.backbone.gradient_checkpointing_enable(**kwargs)

    def gradient_checkpointing_disable(self):
        self.backbone.gradient_checkpointing_disable()


class RewardCollator:
    """Pads a list of pair features (``chosen_input_ids``, ``rejected_input_ids``, optional
    ``*_attention_mask`` and ``margin``) into ``input_ids [2B, T]`` / ``attention_mask [2B, T]``:
    the chosen sequences, then the rejected ones, right-padded with ``pad_token_id``; plus
    ``margin [B]`` float32 when every feature has one."""

    def __init__(self, pad_token_id: int, max_length: int | None = None):
        if isinstance(pad_token_id, bool) or not isinstance(pad_token_id, int):
            raise TypeError(f"pad_token_id: expected an int, got {pad_token_id!r}")
        self.pad_token_id = pad_token_id
        self.max_length = max_length

    def __call__(self, features: list[dict]) -> dict:
        seqs = []
        for key in ("chosen", "rejected"):
            for i, f in enumerate(features):
                if f"{key}_input_ids" not in f:
                    raise KeyError(f"feature {i}: missing '{key}_input_ids'")
                ids = list(f[f"{key}_input_ids"])
                seqs.append(ids[-self.max_length:] if self.max_length else ids)
        T = max(map(len, seqs))
        input_ids = torch.full((len(seqs), T), self.pad_token_id, dtype=torch.long)
        mask = torch.zeros((len(seqs), T), dtype=torch.long)
        for i, s in enumerate(seqs):
            input_ids[i, :len(s)] = torch.tensor(s, dtype=torch.long)
            mask[i, :len(s)] = 1
        batch = {"input_ids": input_ids, "attention_mask": mask}
        if features and all("margin" in f for f in features):
            batch["margin"] = torch.tensor([float(f["margin"]) for f in features], dtype=torch.float32)
        return batch


def _pair_rewards(model, inputs: dict) -> tuple[torch.Tensor, torch.Tensor]:
    rewards = model(input_ids=inputs["input_ids"], attention_mask=inputs["attention_mask"])
    B = rewards.shape[0] // 2
    return rewards[:B], rewards[B:]


class RewardTrainer(Trainer):
    """``transformers.Trainer`` for a :class:`RewardModel` on preference pairs.

    Datasets hold pair features (see :func:`lmfuse.align.preference_features`; an optional
    ``margin`` per pair). The loss of a batch is :func:`lmfuse.align.bt_loss` of the chosen and
    rejected rewards, ``−logσ(r_c − r_r − margin)`` averaged, plus
    ``center_rewards_coefficient · mean((r_c + r_r)²)`` when the coefficient is given (TRL's
    ``RewardTrainer`` loss). Evaluation reports ``eval_loss`` and ``eval_accuracy``, the
    fraction of held-out pairs with ``r_c > r_r``. ``save_model`` writes the
    ``AutoModelForSequenceClassification`` format.
    """

    def __init__(self, model: RewardModel, args=None, *, center_rewards_coefficient: float | None = None,
                 data_collator=None, processing_class=None, compute_metrics=None, **kwargs):
        if not isinstance(model, RewardModel):
            raise TypeError(f"model: expected a RewardModel, got {type(model).__name__}")
        if center_rewards_coefficient is not None and not center_rewards_coefficient >= 0:
            raise ValueError(f"center_rewards_coefficient: expected None or a number >= 0, got "
                             f"{center_rewards_coefficient!r}")
        self.center_rewards_coefficient = center_rewards_coefficient
        if args is not None:
            args.remove_unused_columns = False  # the pair columns are not forward() arguments
        if data_collator is None:
            pad = model.config.pad_token_id
            if pad is None:
                raise ValueError("model: config.pad_token_id is None; pass a data_collator or set it")
            data_collator = RewardCollator(int(pad))
        super().__init__(model=model, args=args, data_collator=data_collator, processing_class=processing_class,
                         compute_metrics=compute_metrics or _accuracy_metric, **kwargs)

    def compute_loss(self, model, inputs, return_outputs=False, num_items_in_batch=None):
        rc, rr = _pair_rewards(model, inputs)
        loss = bt_loss(rc, rr, inputs.get("margin"), center_rewards_coefficient=self.center_rewards_coefficient)
        if return_outputs:
            return loss, {"chosen_rewards": rc, "rejected_rewards": rr}
        return loss

    def prediction_step(self, model, inputs, prediction_loss_only, ignore_keys=None):
        inputs = self._prepare_inputs(inputs)
        with torch.no_grad():
            loss, out = self.compute_loss(model, inputs, return_outputs=True)
        if prediction_loss_only:
            return loss.detach(), None, None
        logits = torch.stack([out["chosen_rewards"], out["rejected_rewards"]], dim=1).detach()
        return loss.detach(), logits, torch.zeros(logits.shape[0], dtype=torch.long, device=logits.device)

    def _save(self, output_dir: str | None = None, state_dict=None):
        output_dir = output_dir or self.args.output_dir
        os.makedirs(output_dir, exist_ok=True)
        unwrap_model(self.model).save_pretrained(output_dir)
        if self.processing_class is not None:
            self.processing_class.save_pretrained(output_dir)


def _accuracy_metric(eval_pred) -> dict:
    logits = eval_pred.predictions
    return {"accuracy": float((logits[:, 0] > logits[:, 1]).mean())}


@torch.no_grad()
def pairwise_accuracy(model: RewardModel, pairs: list[dict], *, batch_size: int = 8,
                      pad_token_id: int | None = None) -> float:
    """Fraction of ``pairs`` (pair features, as for :class:`RewardTrainer`) whose chosen
    sequence gets the higher reward (a tie counts as wrong)."""
    if not pairs:
        raise ValueError("pairs: expected at least one pair")
    if isinstance(batch_size, bool) or not isinstance(batch_size, int) or batch_size < 1:
        raise ValueError(f"batch_size: expected an int >= 1, got {batch_size!r}")
    pad = model.config.pad_token_id if pad_token_id is None else pad_token_id
    collate = RewardCollator(int(pad))
    device = next(model.parameters()).device
    was_training = model.training
    model.eval()
    right = 0
    try:
        for s in range(0, len(pairs), batch_size):
            batch = collate(pairs[s:s + batch_size])
            rc, rr = _pair_rewards(model, {k: v.to(device) for k, v in batch.items()})
            right += int((rc > rr).sum())
    finally:
        model.train(was_training)
    return right / len(pairs)
