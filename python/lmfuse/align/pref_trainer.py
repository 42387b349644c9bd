"""``PreferenceTrainer``: the DPO family on ``transformers.Trainer``, log-probs through the fused
vocabulary kernels (no ``[B, T, V]`` logits), TRL 1.16's batch layout and metric names.

The reference model is one of

* a separate frozen model (``ref_model=...``);
* the policy itself with its ``lmfuse.delta`` deltas or PEFT adapter switched off (``ref_model=None``
  and the model carries an adapter);
* reference log-probs computed once before training and kept on disk
  (``precompute_ref_log_probs=True``), keyed by the tokenised data and the reference weights;
* otherwise a frozen copy of the policy made at construction (what TRL does).
"""

from __future__ import annotations

import contextlib
import copy
import os
from collections import defaultdict
from dataclasses import dataclass, field

import torch
from torch import nn
from transformers import Trainer, TrainerCallback, TrainingArguments

from lmfuse.losses import sequence_log_probs
from lmfuse.losses._head import unwrap_model

from . import _pref_cache as cache
from ._pref_data import PreferenceCollator, tokenize_preference
from .preference import F_DIVERGENCES, PREFERENCE_LOSS_TYPES, preference_loss, wpo_weights

__all__ = ["PreferenceConfig", "PreferenceTrainer", "PreferenceCollator", "preference_log_probs"]


@dataclass
class PreferenceConfig(TrainingArguments):
    """``TrainingArguments`` plus the preference options (names and defaults as TRL 1.16's ``DPOConfig``).

    ``loss_type`` (a name of :data:`lmfuse.align.PREFERENCE_LOSS_TYPES` or a list, summed with
    ``loss_weights``), ``beta``, ``label_smoothing``, ``discopop_tau``, ``f_divergence_type`` /
    ``f_alpha_divergence_coef``: see :func:`lmfuse.align.preference_loss`. ``max_length`` /
    ``truncation_mode``: per-sequence truncation in the collator. ``precompute_ref_log_probs``:
    score the training data with the reference once before training and cache the result in
    ``ref_cache_dir`` (default ``<output_dir>/ref_log_probs``), in batches of
    ``precompute_ref_batch_size`` (default ``per_device_train_batch_size``).

    Options of TRL 1.16 with its names and defaults:

    * ``ld_alpha`` (LD-DPO; None = off): each answer's score is the sum of its token log-probs
      over the first ``min(len(chosen), len(rejected))`` completion tokens plus ``ld_alpha`` times
      the sum over the rest (1.0 = plain DPO, 0.0 = the longer answer's tail ignored), for the
      policy and the reference alike; in [0, 1].
    * ``use_weighting`` (WPO): every pair's loss is multiplied by ``w_c · w_r``, each answer's
      length-normalised probability ``exp(mean_t (log p(y_t) − log Σ_v p_v²))`` under the policy,
      detached (:func:`lmfuse.align.wpo_weights`); not with ``aot`` / ``aot_unpaired``.
    * ``sync_ref_model`` (TR-DPO): every ``ref_model_sync_steps`` optimiser steps the reference
      becomes ``α·policy + (1 − α)·reference`` with ``α = ref_model_mixup_alpha``; needs a
      separate reference model (not the adapter-off policy or precomputed log-probs).
    """

    loss_type: list[str] = field(default_factory=lambda: ["sigmoid"])
    loss_weights: list[float] | None = None
    beta: float = 0.1
    label_smoothing: float = 0.0
    discopop_tau: float = 0.05
    f_divergence_type: str = "reverse_kl"
    f_alpha_divergence_coef: float = 0.5
    max_length: int | None = 1024
    truncation_mode: str = "keep_start"
    pad_to_multiple_of: int | None = None
    precompute_ref_log_probs: bool = False
    precompute_ref_batch_size: int | None = None
    ref_cache_dir: str | None = None
    ld_alpha: float | None = None
    use_weighting: bool = False
    sync_ref_model: bool = False
    ref_model_mixup_alpha: float = 0.6
    ref_model_sync_steps: int = 512
    remove_unused_columns: bool = False

    def __post_init__(self):
        super().__post_init__()
        if isinstance(self.loss_type, str):
            self.loss_type = [self.loss_type]
        bad = [t for t in self.loss_type if t not in PREFERENCE_LOSS_TYPES]
        if not self.loss_type or bad:
            raise ValueError(f"loss_type: expected names from {PREFERENCE_LOSS_TYPES}, got {self.loss_type!r}")
        if self.loss_weights is not None and len(self.loss_weights) != len(self.loss_type):
            raise ValueError(f"loss_weights: expected {len(self.loss_type)} weights, got {self.loss_weights!r}")
        if not self.beta > 0:
            raise ValueError(f"beta: expected a positive number, got {self.beta!r}")
        if self.f_divergence_type not in F_DIVERGENCES:
            raise ValueError(f"f_divergence_type: expected one of {F_DIVERGENCES}, got {self.f_divergence_type!r}")
        if self.ld_alpha is not None and (isinstance(self.ld_alpha, bool) or not 0.0 <= self.ld_alpha <= 1.0):
            raise ValueError(f"ld_alpha: expected None or a number in [0, 1], got {self.ld_alpha!r}")
        sorting = [t for t in self.loss_type if t in ("aot", "aot_unpaired")]
        if self.use_weighting and sorting:
            raise ValueError(f"use_weighting: WPO weights are per pair and {sorting} sort the pairs; not supported")
        if not 0.0 <= self.ref_model_mixup_alpha <= 1.0:
            raise ValueError(f"ref_model_mixup_alpha: expected a number in [0, 1], got {self.ref_model_mixup_alpha!r}")
        if isinstance(self.ref_model_sync_steps, bool) or not isinstance(self.ref_model_sync_steps, int) \
                or self.ref_model_sync_steps < 1:
            raise ValueError(f"ref_model_sync_steps: expected a positive integer, got {self.ref_model_sync_steps!r}")
        if self.sync_ref_model and self.precompute_ref_log_probs:
            raise ValueError("sync_ref_model: the reference changes during training, so its log-probs cannot be "
                             "precomputed; set precompute_ref_log_probs=False")


def preference_log_probs(model: nn.Module, batch: dict[str, torch.Tensor], *, ld_alpha: float | None = None):
    """Summed completion log-probs of a collated batch (:class:`PreferenceCollator` layout).

    Returns ``(chosen_logps [B], rejected_logps [B], chosen_lengths [B], rejected_lengths [B])``:
    fp32 sums over the completion tokens and the number of tokens counted, from
    :func:`lmfuse.losses.sequence_log_probs` (fused, no ``[2B, T, V]`` logits). Differentiable in
    the model's parameters. ``ld_alpha``: LD-DPO's weight of the tokens past the shorter answer's
    length (see :class:`PreferenceConfig`); None = plain sums.
    """
    out = sequence_log_probs(model, batch["input_ids"], batch["attention_mask"], batch["completion_mask"])
    return _pair_log_probs(out, batch, ld_alpha)


def _pair_log_probs(out, batch: dict[str, torch.Tensor], ld_alpha: float | None):
    """``(chosen, rejected, n_chosen, n_rejected)`` of a ``[chosen; rejected]`` batch's
    :class:`~lmfuse.losses.SequenceLogProbs`, with LD-DPO's down-weighted tail when ``ld_alpha`` is set."""
    nc, nr = out.n_tokens.chunk(2)
    if ld_alpha is None:
        logps = out.logp_sum
    else:
        # the tokens sequence_log_probs counted: completion, not padding, never position 0
        counted = batch["completion_mask"].bool() & batch["attention_mask"].bool()
        counted[:, 0] = False
        position = counted.long().cumsum(-1)  # 1, 2, ... along each answer's counted tokens
        shared = torch.minimum(nc, nr).repeat(2).unsqueeze(-1).to(position.device)
        tok = out.token_logp  # 0 where not counted
        logps = (tok * (counted & (position <= shared))).sum(-1) + ld_alpha * (tok * (position > shared)).sum(-1)
    chosen, rejected = logps.chunk(2)
    return chosen, rejected, nc, nr


def _has_peft(model: nn.Module) -> bool:
    return callable(getattr(model, "disable_adapter", None)) and callable(getattr(model, "get_base_model", None))


def _peel(model: nn.Module) -> nn.Module:
    """``model`` without DDP / compile wrappers (a PEFT model stays a PEFT model)."""
    while isinstance(getattr(model, "module", None), nn.Module) or isinstance(getattr(model, "_orig_mod", None), nn.Module):
        model = getattr(model, "module", None) or model._orig_mod
    return model


@contextlib.contextmanager
def adapters_disabled(model: nn.Module):
    """The model computes as its backbone alone inside the block: PEFT adapters disabled, or every
    ``lmfuse.delta`` delta detached (and put back afterwards, the same objects)."""
    from lmfuse import delta

    m = _peel(model)
    if _has_peft(m):
        with m.disable_adapter():
            yield
        return
    inner = unwrap_model(m)
    handles = [delta.detach(inner, name) for name in reversed(list(delta.get_deltas(inner)))]
    try:
        yield
    finally:
        for h in reversed(handles):
            delta.reattach(inner, h)


def _has_adapter(model: nn.Module) -> bool:
    from lmfuse import delta

    m = _peel(model)
    return _has_peft(m) or bool(delta.get_deltas(unwrap_model(m)))


class _Examples(torch.utils.data.Dataset):
    def __init__(self, rows: list[dict]):
        self.rows = rows

    def __len__(self):
        return len(self.rows)

    def __getitem__(self, i):
        return self.rows[i]


class _SyncReference(TrainerCallback):
    """TR-DPO: after every ``ref_model_sync_steps``-th optimiser step,
    ``reference ← α·policy + (1 − α)·reference`` parameter by parameter."""

    def __init__(self, ref_model: nn.Module):
        self.ref_model = ref_model

    @staticmethod
    def check_pairs(policy: nn.Module, ref: nn.Module):
        a = [tuple(p.shape) for p in policy.parameters()]
        b = [tuple(p.shape) for p in ref.parameters()]
        if a != b:
            raise ValueError("sync_ref_model: the policy's and the reference's parameters differ in number or shape "
                             f"({len(a)} vs {len(b)} tensors); the reference must be a copy of the policy's architecture")

    @torch.no_grad()
    def on_step_end(self, args, state, control, model=None, **kwargs):
        if model is None or state.global_step % args.ref_model_sync_steps:
            return
        alpha = args.ref_model_mixup_alpha
        for r, p in zip(self.ref_model.parameters(), unwrap_model(_peel(model)).parameters(), strict=True):
            r.mul_(1.0 - alpha).add_(p.detach().to(r), alpha=alpha)


class PreferenceTrainer(Trainer):
    """DPO-family training on a causal LM (``transformers.Trainer``; TRL 1.16 ``DPOTrainer`` semantics).

    ``model``: a Hugging Face causal LM (with ``lmfuse.delta`` deltas or a PEFT adapter, or not).
    ``ref_model``: a separate reference (frozen here), or None (see the module docstring).
    ``train_dataset`` / ``eval_dataset``: indexable datasets (a ``datasets.Dataset``, a list, ...) of
    examples with ``prompt`` / ``chosen`` / ``rejected`` (strings or message lists) or with
    ``prompt_ids`` / ``chosen_ids`` / ``rejected_ids``; tokenised once here with
    ``processing_class``. The loss of a batch is ``preference_loss(...).mean()``; logged metrics:
    ``rewards/chosen``, ``rewards/rejected``, ``rewards/accuracies``, ``rewards/margins``,
    ``logps/chosen``, ``logps/rejected``, ``num_tokens`` (``eval_`` prefixed in evaluation).
    After construction, ``reference_mode`` is "model", "adapter_off" or "precomputed", and with
    precomputation ``ref_cache_file`` / ``ref_cache_hit`` tell which file was used and whether it
    was read (True) or written (False).
    """

    def __init__(self, model: nn.Module, ref_model: nn.Module | None = None, args: PreferenceConfig | None = None,
                 data_collator=None, train_dataset=None, eval_dataset=None, processing_class=None, **kwargs):
        if args is None:
            args = PreferenceConfig(output_dir="preference-out")
        if not isinstance(args, PreferenceConfig):
            raise TypeError(f"args: expected a PreferenceConfig, got {type(args).__name__}")
        if train_dataset is None:
            raise ValueError("train_dataset: required")
        if ref_model is not None and ref_model is model:
            raise ValueError("ref_model: must not be the policy itself (omit it to use a frozen copy or the "
                             "adapter-free model)")
        self._tokenizer = getattr(processing_class, "tokenizer", processing_class)
        train_dataset = self._prepare(train_dataset, "train_dataset")
        if eval_dataset is not None:
            eval_dataset = self._prepare(eval_dataset, "eval_dataset")
        if data_collator is None:
            pad = None if self._tokenizer is not None else getattr(unwrap_model(model).config, "pad_token_id", None)
            pad = 0 if pad is None and self._tokenizer is None else pad
            data_collator = PreferenceCollator(pad, tokenizer=self._tokenizer, max_length=args.max_length,
                                               truncation_mode=args.truncation_mode,
                                               pad_to_multiple_of=args.pad_to_multiple_of)
        self.ref_model = None
        self.ref_cache_file, self.ref_cache_hit = None, None
        if args.precompute_ref_log_probs:
            self.reference_mode = "precomputed"
            ref = ref_model if ref_model is not None else model
            use_adapter_off = ref_model is None and _has_adapter(model)
            train_dataset = self._precompute(ref, use_adapter_off, train_dataset, data_collator, args, "train")
            if eval_dataset is not None:
                eval_dataset = self._precompute(ref, use_adapter_off, eval_dataset, data_collator, args, "eval")
        elif ref_model is None and _has_adapter(model):
            self.reference_mode = "adapter_off"
        else:
            self.reference_mode = "model"
            self.ref_model = ref_model if ref_model is not None else copy.deepcopy(unwrap_model(model))
            self.ref_model.eval().requires_grad_(False)
        super().__init__(model=model, args=args, data_collator=data_collator, train_dataset=train_dataset,
                         eval_dataset=eval_dataset, processing_class=processing_class, **kwargs)
        self.model_accepts_loss_kwargs = False  # the Trainer divides by the accumulation steps
        if self.ref_model is not None:
            self.ref_model.to(self.args.device)
        if args.sync_ref_model:
            if self.reference_mode != "model":
                raise ValueError(f"sync_ref_model: needs a separate reference model; the reference here is "
                                 f"{self.reference_mode!r} (the policy with its adapter off cannot be mixed into)")
            _SyncReference.check_pairs(unwrap_model(self.model), self.ref_model)
            self.add_callback(_SyncReference(self.ref_model))
        self._metrics = {"train": defaultdict(list), "eval": defaultdict(list)}
        self._total_train_tokens = 0

    # data -----------------------------------------------------------------------------------
    def _prepare(self, dataset, name: str) -> _Examples:
        try:
            n = len(dataset)
        except TypeError:
            raise TypeError(f"{name}: expected an indexable dataset with a length, got {type(dataset).__name__}") from None
        return _Examples([tokenize_preference(dict(dataset[i]), self._tokenizer, i) for i in range(n)])

    @torch.no_grad()
    def _precompute(self, ref: nn.Module, adapter_off: bool, dataset: _Examples, collator, args, split: str):
        from tqdm.auto import tqdm

        rows = dataset.rows
        ctx = adapters_disabled(ref) if adapter_off else contextlib.nullcontext()
        with ctx:
            data_key = cache.data_fingerprint(rows, max_length=args.max_length, truncation_mode=args.truncation_mode,
                                              ld_alpha=args.ld_alpha)
            weights_key = cache.weights_fingerprint(unwrap_model(ref))
            path = cache.cache_path(args.ref_cache_dir or os.path.join(args.output_dir, "ref_log_probs"),
                                    data_key, weights_key)
            got = cache.load_cached(path, len(rows), data_key, weights_key)
            if got is None:
                was_training = ref.training
                ref.eval()
                device = args.device
                moved = next(ref.parameters()).device != device
                if moved:
                    ref.to(device)
                bs = args.precompute_ref_batch_size or args.per_device_train_batch_size
                chosen, rejected = [], []
                strip = lambda r: {k: r[k] for k in ("prompt_ids", "chosen_ids", "rejected_ids")}  # noqa: E731
                for i in tqdm(range(0, len(rows), bs), desc=f"reference log-probs ({split})",
                              disable=args.disable_tqdm):
                    batch = {k: v.to(device) for k, v in collator([strip(r) for r in rows[i:i + bs]]).items()}
                    c, r, _, _ = preference_log_probs(ref, batch, ld_alpha=args.ld_alpha)
                    chosen.append(c.float().cpu())
                    rejected.append(r.float().cpu())
                ref.train(was_training)
                chosen, rejected = torch.cat(chosen), torch.cat(rejected)
                if args.process_index == 0:
                    cache.save_cached(path, chosen, rejected, data_key, weights_key)
                hit = False
            else:
                (chosen, rejected), hit = got, True
        if split == "train":
            self.ref_cache_file, self.ref_cache_hit = path, hit
        return _Examples([dict(r, ref_chosen_logps=float(c), ref_rejected_logps=float(j))
                          for r, c, j in zip(rows, chosen.tolist(), rejected.tolist())])

    # loss ----------------------------------------------------------------------------------
    def _policy_log_probs(self, model: nn.Module, inputs: dict):
        """Through ``model``'s own ``__call__`` (so DDP sees a forward and syncs the gradients), with
        the inner model's forward replaced for this one call by the fused log-prob computation."""
        inner = unwrap_model(model)
        had = "forward" in inner.__dict__
        previous = inner.__dict__.get("forward")

        def forward(input_ids=None, attention_mask=None, completion_mask=None, **_):
            return sequence_log_probs(inner, input_ids, attention_mask, completion_mask,
                                      return_log_sum_sq=self.args.use_weighting)

        inner.forward = forward
        try:
            with self.accelerator.autocast():
                out = model(input_ids=inputs["input_ids"], attention_mask=inputs["attention_mask"],
                            completion_mask=inputs["completion_mask"])
        finally:
            if had:
                inner.forward = previous
            else:
                del inner.forward
        chosen, rejected, nc, nr = _pair_log_probs(out, inputs, self.args.ld_alpha)
        weights = None
        if self.args.use_weighting:  # WPO, on the plain token sums whatever ld_alpha is (as TRL)
            lc, lr = out.token_log_sum_sq.sum(-1).chunk(2)
            raw_c, raw_r = out.logp_sum.chunk(2)
            weights = wpo_weights(raw_c, lc, nc, raw_r, lr, nr)
        return chosen, rejected, nc, nr, weights

    @torch.no_grad()
    def _reference_log_probs(self, model: nn.Module, inputs: dict):
        if "ref_chosen_logps" in inputs:
            return inputs["ref_chosen_logps"], inputs["ref_rejected_logps"]
        if self.reference_mode == "precomputed":
            raise ValueError("inputs: precomputed reference log-probs are missing from the batch (a dataset passed "
                             "to evaluate() after construction is not scored; pass it as eval_dataset)")
        batch = {k: inputs[k] for k in ("input_ids", "attention_mask", "completion_mask")}
        with self.accelerator.autocast():
            if self.reference_mode == "adapter_off":
                with adapters_disabled(model):
                    c, r, _, _ = preference_log_probs(unwrap_model(model) if not _has_peft(_peel(model))
                                                      else _peel(model), batch, ld_alpha=self.args.ld_alpha)
            else:
                c, r, _, _ = preference_log_probs(self.ref_model, batch, ld_alpha=self.args.ld_alpha)
        return c, r

    def compute_loss(self, model, inputs, return_outputs=False, num_items_in_batch=None):
        mode = "train" if model.training else "eval"
        args = self.args
        pc, pr, nc, nr, weights = self._policy_log_probs(model, inputs)
        rc, rr = self._reference_log_probs(model, inputs)
        rc, rr = rc.to(pc), rr.to(pc)
        losses, chosen_rewards, rejected_rewards = preference_loss(
            pc, pr, rc, rr, loss_type=args.loss_type, loss_weights=args.loss_weights, beta=args.beta,
            label_smoothing=args.label_smoothing, chosen_lengths=nc, rejected_lengths=nr,
            discopop_tau=args.discopop_tau, f_divergence=args.f_divergence_type, f_alpha=args.f_alpha_divergence_coef,
            pair_weights=weights)
        loss = losses.mean()
        self._record(mode, inputs, pc, pr, chosen_rewards, rejected_rewards)
        return (loss, {"chosen_rewards": chosen_rewards, "rejected_rewards": rejected_rewards}) if return_outputs \
            else loss

    def _record(self, mode, inputs, pc, pr, cr, rr):
        g = self.accelerator.gather
        m = self._metrics[mode]
        if mode == "train":
            self._total_train_tokens += int(g(inputs["attention_mask"].sum()).sum().item())
        m["num_tokens"] = [self._total_train_tokens]
        m["rewards/chosen"].append(g(cr).mean().item())
        m["rewards/rejected"].append(g(rr).mean().item())
        m["rewards/accuracies"].append(g((cr > rr).float()).mean().item())
        m["rewards/margins"].append(g(cr - rr).mean().item())
        m["logps/chosen"].append(g(pc.detach()).mean().item())
        m["logps/rejected"].append(g(pr.detach()).mean().item())

    def log(self, logs: dict, start_time: float | None = None) -> None:
        mode = "train" if self.model.training else "eval"
        metrics = {k: sum(v) / len(v) for k, v in self._metrics[mode].items() if v}
        if mode == "eval":
            metrics = {f"eval_{k}": v for k, v in metrics.items()}
        logs.update(metrics)
        super().log(logs, start_time)
        self._metrics[mode].clear()

    def prediction_step(self, model, inputs, prediction_loss_only, ignore_keys=None):
        inputs = self._prepare_inputs(inputs)
        with torch.no_grad(), self.compute_loss_context_manager():
            loss = self.compute_loss(model, inputs)
        return loss.detach(), None, None
