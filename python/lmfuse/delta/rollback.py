"""All-or-nothing changes to a model with deltas: :class:`Rollback` records what a
model-changing call of :mod:`lmfuse.delta` does and, if the call raises, puts the model back
exactly as it was (the same module objects in the same slots, the same ``requires_grad`` flags,
unmerged weights, the same registry of deltas, no added sub-module or hook)."""

from __future__ import annotations

from torch import nn


def undo_slots(records: list) -> None:
    """Undo slot changes (``_insert`` records, or ``(holder, attr, previous)``), newest first."""
    for rec in reversed(records):
        holder, attr, previous = rec[:3]
        setattr(holder, attr, previous)
        if len(rec) == 5 and rec[4] is not None:
            rec[3].base = rec[4]


class Rollback:
    """Restores, on error, what a model-changing call may have touched: every parameter's
    ``requires_grad`` flag, the registry of deltas, slots swapped in the module tree, layers merged
    by the call, root sub-modules added and hooks registered."""

    def __init__(self, model: nn.Module, registry: dict):
        self.model = model
        self.flags = [(p, p.requires_grad) for p in model.parameters()]
        self.live = registry  # the model's live name → Delta dict
        self.registry = dict(registry)
        self.slots: list = []
        self.merged: list = []     # wrappers this call merged (unmerge on error)
        self.unmerged: list = []   # wrappers this call unmerged (merge again on error)
        self.added: list = []      # names of root sub-modules this call added
        self.removed: list = []    # (name, module) root sub-modules this call removed
        self.hooks: list = []      # hook handles this call registered
        self.deltas: list = []     # (delta, its fields before the call)

    def keep(self, delta) -> None:
        self.deltas.append((delta, dict(attached=delta.attached, wrappers=dict(delta.wrappers),
                                        originals=dict(delta.originals), _hooks=list(delta._hooks))))

    def __enter__(self):
        return self

    def __exit__(self, exc_type, exc, tb):
        if exc_type is None:
            return False
        for h in self.hooks:
            h.remove()
        for name in reversed(self.added):
            self.model._modules.pop(name, None)
        for name, module in self.removed:
            self.model.add_module(name, module)
        undo_slots(self.slots)
        for w in self.merged:
            w.unmerge()
        for w in self.unmerged:
            w.merge()
        for delta, fields in self.deltas:
            for k, v in fields.items():
                setattr(delta, k, v)
        self.live.clear()
        self.live.update(self.registry)
        for p, flag in self.flags:
            p.requires_grad_(flag)
        return False
