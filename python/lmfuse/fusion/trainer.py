"""``UltraFuserTrainer``: the two training stages of UltraFuser on ``transformers.Trainer``.

* ``stage=1``: only the gate trains; every expert parameter is frozen (the experts then run under
  ``no_grad``, so they keep no activations). In the method this is the warm-up that keeps a
  random gate's gradients away from the experts.
* ``stage=2``: the gate and the experts train. ``lora=None`` trains every expert parameter;
  ``lora=lmfuse.delta.LoRAConfig(...)`` attaches a LoRA delta to each expert (unless it already
  has one) and trains only the deltas, so E experts fit in memory.

Each batch holds the same number of examples per domain (:class:`DomainBalancedSampler`) when
the training examples carry a ``domain`` label; examples are encoded per expert by
:class:`FusionCollator`. Checkpoints are :meth:`UltraFuser.save_pretrained` directories (the gate
and the deltas, not the experts' full weights).
"""

from __future__ import annotations

from typing import Optional

from transformers import Trainer

from .data import DomainBalancedSampler, FusionCollator
from .ultrafuser import UltraFuser

__all__ = ["UltraFuserTrainer", "set_stage"]


def set_stage(fuser: UltraFuser, stage: int, lora=None) -> dict:
    """Set which parameters of ``fuser`` train for ``stage`` (1 or 2; see the module docstring).
    Returns ``{"trainable": n, "frozen": m}`` parameter counts."""
    from .. import delta

    if stage not in (1, 2):
        raise ValueError(f"stage: expected 1 (gate only) or 2 (gate and experts), got {stage!r}")
    if lora is not None and stage == 1:
        raise ValueError("lora: LoRA deltas train the experts, which stage 1 keeps frozen; use stage=2")
    if lora is not None and not isinstance(lora, delta.LoRAConfig):
        raise TypeError(f"lora: expected a lmfuse.delta.LoRAConfig or None, got {type(lora).__name__}")
    for model in fuser.experts:
        if stage == 1:
            model.requires_grad_(False)
        elif lora is not None:
            if not any(d.kind in ("lora", "sora") for d in delta.get_deltas(model).values()):
                delta.attach(model, lora, name="fusion_lora")
            delta.freeze(model)
        else:
            model.requires_grad_(True)
    fuser.gate.requires_grad_(True)
    trainable = sum(p.numel() for p in fuser.parameters() if p.requires_grad)
    return {"trainable": trainable, "frozen": sum(p.numel() for p in fuser.parameters()) - trainable}


class UltraFuserTrainer(Trainer):
    """``transformers.Trainer`` for an :class:`UltraFuser`.

    Args:
        model: the fuser.
        args: ``TrainingArguments`` (``remove_unused_columns`` is set to False: the examples are
            encoded by the collator; ``prediction_loss_only`` to True: ``evaluate()`` reports the
            blended loss as ``eval_loss``).
        stage: 1 (gate only) or 2 (gate and experts).
        lora: for stage 2, a ``lmfuse.delta.LoRAConfig``: train LoRA deltas instead of the full experts.
        domain_key: the example key holding the domain label; when every training example has
            one, batches are domain-balanced (``per_device_train_batch_size`` must then be a
            multiple of the number of domains). ``balanced=False`` turns this off.
        max_length: passed to the collator (the response is cut to fit).
        Other keyword arguments go to ``Trainer`` (``train_dataset``, ``eval_dataset``, ...; a
        list of example dicts is a valid dataset).
    """

    def __init__(self, model: UltraFuser, args=None, *, stage: int = 1, lora=None, domain_key: str = "domain",
                 balanced: bool = True, max_length: Optional[int] = None, data_collator=None, **kwargs):
        if not isinstance(model, UltraFuser):
            raise TypeError(f"model: expected a lmfuse.fusion.UltraFuser, got {type(model).__name__}")
        self.stage = stage
        self.stage_counts = set_stage(model, stage, lora)
        self.domain_key, self.balanced = domain_key, balanced
        if args is not None:
            args.remove_unused_columns = False
            args.prediction_loss_only = True  # a fuser's output is a loss; evaluate() reports eval_loss
            if args.label_names is None:
                args.label_names = ["labels"]
        super().__init__(model=model, args=args, data_collator=data_collator or FusionCollator(model, max_length=max_length),
                         **kwargs)
        domains = self._domains(self.train_dataset)
        if domains is not None:  # fail now (batch size vs domains, a domain too small), not mid-epoch
            self._sampler(domains)

    def _domains(self, dataset) -> Optional[list]:
        if not self.balanced or dataset is None or not hasattr(dataset, "__len__"):
            return None
        columns = getattr(dataset, "column_names", None)  # a datasets.Dataset: read the column at once
        if isinstance(columns, list):
            return list(dataset[self.domain_key]) if self.domain_key in columns else None
        labels = []
        for i in range(len(dataset)):
            ex = dataset[i]
            if not isinstance(ex, dict) or self.domain_key not in ex:
                return None
            labels.append(ex[self.domain_key])
        return labels

    def _sampler(self, domains) -> DomainBalancedSampler:
        return DomainBalancedSampler(domains, self.args.per_device_train_batch_size, seed=self.args.seed)

    def _get_train_sampler(self, train_dataset=None):
        domains = self._domains(train_dataset if train_dataset is not None else self.train_dataset)
        if domains is None:
            return super()._get_train_sampler(train_dataset)
        return self._sampler(domains)

    def compute_loss(self, model, inputs, return_outputs: bool = False, num_items_in_batch=None):
        out = model(**inputs)
        return (out.loss, {"loss": out.loss, "gate": out.gate}) if return_outputs else out.loss

    def _save(self, output_dir: Optional[str] = None, state_dict=None) -> None:
        output_dir = output_dir if output_dir is not None else self.args.output_dir
        if self.args.should_save:
            self.accelerator.unwrap_model(self.model).save_pretrained(output_dir)
