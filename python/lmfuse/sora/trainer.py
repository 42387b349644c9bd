"""SoRA with ``transformers.Trainer``: the gates in their own proximal parameter group, the
optional L1 penalty in the loss, gate sparsity in the logs, and the sparsifying schedule.

    from lmfuse.sora import SoRATrainer, SparsifyScheduler, xi_values
    trainer = SoRATrainer(model=model, args=args, train_dataset=ds, sora_xi=1e-3)
    trainer.train()
    lmfuse.sora.prune(model)
"""

from __future__ import annotations

from typing import Optional

from transformers import Trainer, TrainerCallback

from .optim import SparseGateOptimizer, gate_parameters, l1_penalty, sparsity_stats
from .schedule import SparsifyScheduler


class _SparsifyCallback(TrainerCallback):
    def __init__(self, trainer: "SoRATrainer") -> None:
        self.trainer = trainer

    def on_step_end(self, args, state, control, **kwargs):
        sched = self.trainer.sora_schedule
        if sched is not None and sched.step() is not None and sched.done:
            control.should_training_stop = True
        return control


class SoRATrainer(Trainer):
    """A :class:`transformers.Trainer` that trains SoRA gates with the proximal step.

    Extra keyword arguments (everything else goes to ``Trainer``):
        sora_xi: the threshold ξ (ignored when ``sora_schedule`` is given: it sets ξ).
        sora_gate_lr: learning rate of the gates (default: ``args.learning_rate``).
        sora_xi_mode: ``"absolute"`` or ``"lr_scaled"`` (see :class:`SparseGateOptimizer`).
        sora_threshold: ``"soft"`` (default) or ``"sequential"`` (the original code's masks).
        sora_l1_weight: weight of ``Σ|g|`` added to the training loss (default 0: the proximal
            step is the L1 regulariser; a positive weight adds its subgradient as well).
        sora_schedule: a :class:`SparsifyScheduler` to step ξ through stages; training stops
            when its last stage ends.

    The optimizer is one :class:`SparseGateOptimizer` with the model's other trainable
    parameters in a plain AdamW group (``args.weight_decay``) and the gates in a proximal group
    (no weight decay). The gate sparsity and the number of non-zero LoRA parameters are added
    to every log record.
    """

    def __init__(self, *args, sora_xi: float = 1e-4, sora_gate_lr: Optional[float] = None,
                 sora_xi_mode: str = "absolute", sora_threshold: str = "soft",
                 sora_l1_weight: float = 0.0, sora_schedule: Optional[SparsifyScheduler] = None,
                 **kwargs) -> None:
        super().__init__(*args, **kwargs)
        if not gate_parameters(self.model):
            raise ValueError("SoRATrainer needs a model with gated LoRALinear layers (gated=True)")
        self.sora_xi, self.sora_gate_lr = sora_xi, sora_gate_lr
        self.sora_xi_mode, self.sora_threshold = sora_xi_mode, sora_threshold
        self.sora_l1_weight, self.sora_schedule = float(sora_l1_weight), sora_schedule
        self.add_callback(_SparsifyCallback(self))

    def create_optimizer(self, model=None):
        if self.optimizer is not None:
            return self.optimizer
        model = model if model is not None else self.model
        gates = [g for g in gate_parameters(model) if g.requires_grad]
        gate_ids = {id(g) for g in gates}
        others = [p for p in model.parameters() if p.requires_grad and id(p) not in gate_ids]
        lr = self.args.learning_rate
        groups = [{"params": gates, "gate": True, "weight_decay": 0.0, "lr": self.sora_gate_lr or lr}]
        if others:
            groups.insert(0, {"params": others, "gate": False, "weight_decay": self.args.weight_decay})
        self.optimizer = SparseGateOptimizer(
            groups, lr=lr, betas=(self.args.adam_beta1, self.args.adam_beta2), eps=self.args.adam_epsilon,
            xi=self.sora_xi, xi_mode=self.sora_xi_mode, threshold=self.sora_threshold)
        if self.sora_schedule is not None:
            self.sora_schedule.bind(self.optimizer)
        return self.optimizer

    def compute_loss(self, model, inputs, return_outputs=False, **kwargs):
        out = super().compute_loss(model, inputs, return_outputs=return_outputs, **kwargs)
        if self.sora_l1_weight > 0 and model.training:
            pen = l1_penalty(model, self.sora_l1_weight)
            if return_outputs:
                return out[0] + pen, out[1]
            return out + pen
        return out

    def log(self, logs: dict, *args, **kwargs) -> None:
        stats = sparsity_stats(self.model)
        logs = dict(logs, gate_sparsity=stats["sparsity"], nonzero_lora_params=stats["nonzero_params"])
        opt = getattr(self.optimizer, "optimizer", self.optimizer)  # accelerate wraps it
        if isinstance(opt, SparseGateOptimizer):
            logs["xi"] = opt.xi
        super().log(logs, *args, **kwargs)
