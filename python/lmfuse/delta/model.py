"""Attach, detach, re-attach, freeze and merge deltas on a backbone (see :mod:`.deltas` for why
deltas are attached by wrapping). The deltas attached to a model are kept in a dict on the root
module (``model._lmfuse_deltas``, name → :class:`Delta`), so every function here takes the model."""

from __future__ import annotations

import dataclasses
import re
from typing import Iterable, Iterator, Optional

import torch
from torch import nn

from .addressing import (_check_patterns, default_targets, get_logical, get_slot, innermost,
                         is_delta_wrapper, iter_backbone_modules, matches_any, resolve_targets)
from .deltas import (LORA_FAMILY, DeltaConfig, PrefixConfig, SoftPromptConfig, accepts_bias, accepts_lora,
                     build_lora, build_wrapper, refresh_lora_base, restore_target)
from .prefix import Prefix, attention_geometry, make_pre_hook
from .prefix import post_hook as prefix_post_hook
from .rollback import Rollback
from .soft_prompt import SoftPrompt, make_hooks

_NAME = re.compile(r"[A-Za-z_][A-Za-z0-9_]*")
_ACCEPT = {"lora": accepts_lora, "sora": accepts_lora, "bitfit": accepts_bias}


class Delta:
    """A delta attached to (or detached from) a model: its config, the logical paths it wraps, its
    wrapper modules (which hold its parameters, also while detached) and, for a soft prompt, the
    prompt or prefix module (``soft``, a root sub-module) and hooks."""

    def __init__(self, name: str, config: DeltaConfig):
        self.name, self.config, self.kind = name, config, config.kind
        self.wrappers: dict[str, nn.Module] = {}
        self.originals: dict[str, nn.Module] = {}  # the backbone module under each wrapper
        self.soft: Optional[SoftPrompt] = None
        self._hooks: list = []
        self.attached = False

    @property
    def paths(self) -> list[str]:
        return list(self.wrappers)

    def named_parameters(self) -> Iterator[tuple[str, nn.Parameter]]:
        """The delta's own parameters, named ``<logical path>.<param>`` (``soft_prompt.prompt``)."""
        seen = set()  # a parameter shared by several wrappers (Compacter's shared rules) comes once
        for path, w in self.wrappers.items():
            for n, p in w.named_parameters():
                if not n.startswith("base.") and id(p) not in seen:
                    seen.add(id(p))
                    yield f"{path}.{n}", p
        if self.soft is not None:
            for n, p in self.soft.named_parameters():
                yield f"{getattr(self.soft, 'state_name', 'soft_prompt')}.{n}", p

    def parameters(self) -> Iterator[nn.Parameter]:
        return (p for _, p in self.named_parameters())

    def num_parameters(self) -> int:
        return sum(p.numel() for p in self.parameters())

    def state_dict(self) -> dict[str, torch.Tensor]:
        return {k: p.detach() for k, p in self.named_parameters()}

    @torch.no_grad()
    def load_state_dict(self, state: dict[str, torch.Tensor]) -> None:
        own = dict(self.named_parameters())
        missing, unexpected = sorted(set(own) - set(state)), sorted(set(state) - set(own))
        if missing or unexpected:
            raise ValueError(f"delta {self.name!r}: state mismatch, missing {missing[:5]}, unexpected {unexpected[:5]}")
        for k, p in own.items():
            if tuple(state[k].shape) != tuple(p.shape):
                raise ValueError(f"delta {self.name!r}: {k} has shape {tuple(state[k].shape)}, expected {tuple(p.shape)}")
            p.copy_(state[k])

    @property
    def merged(self) -> bool:
        return any(getattr(w, "merged", False) for w in self.wrappers.values())

    def __repr__(self) -> str:
        where = f"{len(self.wrappers)} modules" if self.soft is None else \
            f"{self.soft.n_tokens} {'virtual' if self.kind == 'prefix' else 'prompt'} tokens"
        return (f"Delta({self.name!r}, kind={self.kind}, {where}, params={self.num_parameters()}, "
                f"attached={self.attached}, merged={self.merged})")


def unwrap_model(model: nn.Module) -> nn.Module:
    """The user's model under DDP / ``torch.compile`` wrappers."""
    while True:
        inner = getattr(model, "module", None) if isinstance(model, nn.parallel.DistributedDataParallel) \
            else getattr(model, "_orig_mod", None)
        if not isinstance(inner, nn.Module):
            return model
        model = inner


def get_deltas(model: nn.Module) -> dict[str, Delta]:
    """The deltas attached to ``model``, by name (a live dict: do not edit it)."""
    model = unwrap_model(model)
    return model.__dict__.setdefault("_lmfuse_deltas", {})


def _chain_holder(model: nn.Module, path: str, target: Optional[nn.Module]):
    """``(holder, attr)`` such that ``getattr(holder, attr)`` is ``target`` in the wrapper chain at
    ``path``; ``target=None`` gives the slot of the innermost backbone module."""
    holder, attr = get_slot(model, path)
    while True:
        cur = getattr(holder, attr)
        if cur is target or (target is None and not is_delta_wrapper(cur)):
            return holder, attr
        if not is_delta_wrapper(cur):
            raise RuntimeError(f"delta wrapper not found at {path!r} (was the model edited after attaching?)")
        holder, attr = cur, "base"


def _insert(model: nn.Module, path: str, wrapper: nn.Module, kind: str) -> tuple:
    """Put ``wrapper`` in the chain at ``path``; returns ``(holder, attr, previous, wrapper,
    previous_base)``, what :func:`_undo` needs to put everything back."""
    old_base = wrapper._modules.get("base")
    if kind in LORA_FAMILY:
        # LoRA must wrap the backbone linear layer itself, so it goes innermost
        for w in _chain(model, path):
            if getattr(w, "_lmfuse_delta_kind", None) in LORA_FAMILY:
                raise ValueError(f"{path} already carries the {w._lmfuse_delta_kind} delta "
                                 f"{w._lmfuse_delta_name!r}; one LoRA-family delta per layer")
        holder, attr = _chain_holder(model, path, None)
        if wrapper.__dict__.get("_lmfuse_restore") is None:
            wrapper.base = getattr(holder, attr)
    else:
        holder, attr = get_slot(model, path)  # other deltas apply after the ones already there
        wrapper.base = getattr(holder, attr)
    previous = getattr(holder, attr)
    setattr(holder, attr, wrapper)
    return holder, attr, previous, wrapper, old_base


def _chain(model: nn.Module, path: str) -> list[nn.Module]:
    holder, attr = get_slot(model, path)
    out, cur = [], getattr(holder, attr)
    while is_delta_wrapper(cur):
        out.append(cur)
        cur = cur.base
    return out


def _check_name(model: nn.Module, name: str) -> None:
    if not isinstance(name, str) or not _NAME.fullmatch(name):
        raise ValueError(f"name must be an identifier (letters, digits, _), got {name!r}")
    if name in get_deltas(model):
        raise ValueError(f"a delta named {name!r} is already attached; detach it or pick another name")


def _mark(wrapper: nn.Module, delta: Delta) -> None:
    wrapper._lmfuse_delta_name = delta.name
    wrapper._lmfuse_delta_kind = delta.kind


def attach(model: nn.Module, config: DeltaConfig, name: str = "default",
           generator: Optional[torch.Generator] = None, *, _paths=None, _per_module=None) -> Delta:
    """Attach a delta to ``model`` in place (no change to its code) and return its handle.

    Args:
        model: any ``nn.Module``; default targets exist for Llama-family, GPT-2 and BERT-family
            ``transformers`` models (``config.model_type``).
        config: a :class:`LoRAConfig`, :class:`SoRAConfig`, :class:`AdapterConfig`,
            :class:`ParallelAdapterConfig`, :class:`CompacterConfig`, :class:`LowRankAdapterConfig`,
            :class:`BitFitConfig`, :class:`SoftPromptConfig` or :class:`PrefixConfig`.
            ``config.targets`` / ``config.exclude`` address modules (see :mod:`.addressing`).
        name: the delta's name (an identifier); several deltas compose on one model.
        generator: a ``torch.Generator`` for the random initialisation (reproducible attach).

    The new parameters have the dtype and device of the modules they attach to and require grad;
    call :func:`freeze` to train the delta alone. Every delta starts as the identity (LoRA ``B``,
    adapter ``up`` and BitFit biases are zero), except a soft prompt, which adds tokens, and a
    prefix, which adds keys and values to every attention layer.
    """
    model = unwrap_model(model)
    if not isinstance(config, DeltaConfig) or not config.kind:
        raise TypeError(f"config must be one of lmfuse.delta's *Config objects, got {type(config).__name__}")
    _check_name(model, name)
    delta = Delta(name, config)
    with Rollback(model, get_deltas(model)) as undo:
        if isinstance(config, PrefixConfig):
            p = next((q for q in model.parameters() if q.is_floating_point()), None)
            kw = {"device": p.device, "dtype": p.dtype} if p is not None else {}
            delta.soft = Prefix(config, attention_geometry(model), generator, **kw)
            _attach_soft(model, delta, undo)
        elif isinstance(config, SoftPromptConfig):
            emb = model.get_input_embeddings() if hasattr(model, "get_input_embeddings") else None
            if not isinstance(emb, nn.Embedding):
                raise TypeError(f"a soft prompt needs a model with get_input_embeddings() -> nn.Embedding, "
                                f"{type(model).__name__} has none")
            delta.soft = SoftPrompt(emb, config.n_tokens, config.init, generator)
            _attach_soft(model, delta, undo)
        else:
            if _paths is None:
                targets = config.targets if config.targets is not None else default_targets(model, config.kind)
                _paths = resolve_targets(model, targets, config.exclude, _ACCEPT.get(config.kind), config.kind)
            if config.kind in LORA_FAMILY:
                _check_lora_free(model, _paths)
            hidden = getattr(getattr(model, "config", None), "hidden_size", None)
            context: dict = {}  # parameters the wrappers of this delta share
            for path in _paths:
                module = get_logical(model, path)
                if _per_module and path in _per_module:  # a pruned SoRA layer: its own rank / gate / scaling
                    spec = _per_module[path]
                    wrapper = build_lora(module, config, r=spec["r"], gated=spec["gated"], generator=generator)
                    wrapper.scaling, wrapper.lora_alpha = spec["scaling"], spec["scaling"] * spec["r"]
                else:
                    wrapper = build_wrapper(module, config, hidden, generator, context)
                _mark(wrapper, delta)
                undo.slots.append(_insert(model, path, wrapper, config.kind))
                delta.wrappers[path], delta.originals[path] = wrapper, module
        delta.attached = True
        get_deltas(model)[name] = delta
    return delta


def _check_lora_free(model: nn.Module, paths) -> None:
    """Refuse, before changing anything, paths that already carry a LoRA-family delta."""
    for path in paths:
        for w in _chain(model, path):
            if getattr(w, "_lmfuse_delta_kind", None) in LORA_FAMILY:
                raise ValueError(f"{path} already carries the {w._lmfuse_delta_kind} delta "
                                 f"{w._lmfuse_delta_name!r}; one LoRA-family delta per layer")


def _root_name(delta: Delta) -> str:
    return f"lmfuse_{delta.kind}_{delta.name}"


def _attach_soft(model: nn.Module, delta: Delta, undo: Rollback) -> None:
    """Register a soft prompt's or a prefix's root sub-module and hooks."""
    name = _root_name(delta)
    if name in model._modules:
        raise ValueError(f"the model already has a sub-module named {name!r}")
    model.add_module(name, delta.soft)
    undo.added.append(name)
    if isinstance(delta.soft, Prefix):
        delta._hooks = [model.register_forward_pre_hook(make_pre_hook(model, delta.soft), with_kwargs=True),
                        model.register_forward_hook(prefix_post_hook, with_kwargs=True)]
    else:
        pre, post = make_hooks(model, delta.soft)
        delta._hooks = [model.register_forward_pre_hook(pre, with_kwargs=True),
                        model.register_forward_hook(post, with_kwargs=True)]
    undo.hooks.extend(delta._hooks)
    # prefix hooks run after every soft prompt's: a soft prompt then sees the caller's inputs, and
    # a prefix sees the soft prompt's tokens as part of the sequence (their order in the cache)
    for d in get_deltas(model).values():
        if d.kind == "prefix" and d is not delta:
            for h in d._hooks:
                if h.id in model._forward_pre_hooks:
                    model._forward_pre_hooks.move_to_end(h.id)


def _get(model: nn.Module, name: str) -> Delta:
    deltas = get_deltas(model)
    if name not in deltas:
        raise KeyError(f"no delta named {name!r} is attached (attached: {sorted(deltas)})")
    return deltas[name]


def detach(model: nn.Module, name: str = "default") -> Delta:
    """Remove delta ``name``; the backbone modules it wrapped are put back (the very same objects,
    un-merged first), so the model computes exactly what it did before. Returns the handle, which
    keeps the delta's parameters for :func:`reattach`."""
    model = unwrap_model(model)
    delta = _get(model, name)
    # find every wrapper first: a model edited since attaching fails here, before any change
    slots = {path: _chain_holder(model, path, wrapper) for path, wrapper in delta.wrappers.items()}
    with Rollback(model, get_deltas(model)) as undo:
        undo.keep(delta)
        for path, wrapper in delta.wrappers.items():
            if getattr(wrapper, "merged", False):
                wrapper.unmerge()
                undo.unmerged.append(wrapper)
            holder, attr = slots[path]
            undo.slots.append((holder, attr, getattr(holder, attr)))
            setattr(holder, attr, restore_target(wrapper))
        if delta.soft is not None:
            soft_name = _root_name(delta)
            undo.removed.append((soft_name, model._modules[soft_name]))
            delattr(model, soft_name)
        delta.attached = False
        del get_deltas(model)[name]
    # hooks go last: a removed hook cannot be put back
    for h in delta._hooks:
        h.remove()
    delta._hooks = []
    return delta


def reattach(model: nn.Module, delta: Delta) -> Delta:
    """Put a detached delta back on the model it came from, with its current parameters. (To put a
    delta on another copy of the backbone, :func:`lmfuse.delta.save` and :func:`lmfuse.delta.load`.)"""
    model = unwrap_model(model)
    if not isinstance(delta, Delta):
        raise TypeError(f"delta must be a Delta handle (from attach/detach), got {type(delta).__name__}")
    if delta.attached:
        raise ValueError(f"delta {delta.name!r} is already attached")
    _check_name(model, delta.name)
    for path, original in delta.originals.items():
        if get_logical(model, path) is not original:
            raise ValueError(f"{path} is not the module delta {delta.name!r} was detached from; "
                             f"use save/load to move a delta to another model")
    if delta.kind in LORA_FAMILY:
        _check_lora_free(model, delta.paths)
    with Rollback(model, get_deltas(model)) as undo:
        undo.keep(delta)
        for path, wrapper in delta.wrappers.items():
            refresh_lora_base(wrapper)
            undo.slots.append(_insert(model, path, wrapper, delta.kind))
        if delta.soft is not None:
            _attach_soft(model, delta, undo)
        delta.attached = True
        get_deltas(model)[delta.name] = delta
    return delta


def _lora_deltas(model: nn.Module, name: Optional[str]) -> list[Delta]:
    if name is not None:
        d = _get(model, name)
        if d.kind not in LORA_FAMILY:
            raise ValueError(f"only LoRA-family deltas merge into base weights; {name!r} is {d.kind}")
        return [d]
    return [d for d in get_deltas(model).values() if d.kind in LORA_FAMILY]


def merge(model: nn.Module, name: Optional[str] = None, unwrap: bool = False) -> list[str]:
    """Fold LoRA / SoRA deltas (``name`` or all of them) into the base weights.

    ``unwrap=False`` keeps the wrappers (forward is then the base layer alone; :func:`unmerge` and
    :func:`detach` restore the base weights bit for bit). ``unwrap=True`` also removes the LoRA-family
    wrappers, so those layers are plain backbone layers again with merged weights (zero overhead,
    nothing to undo) and those deltas leave the model. Deltas that cannot be folded into a weight
    (adapters, Compacter, BitFit, soft prompts, prefixes) stay attached: the model is the plain
    backbone only when no such delta is attached. Reparameterised prefixes are folded into plain
    prefix tensors (their MLP is dropped: irreversible, same outputs) and stay attached. Returns
    the merged and folded deltas' names.
    """
    model = unwrap_model(model)
    done = _fold_prefixes(model, name)
    if name is not None and done:
        return done
    deltas = _lora_deltas(model, name)
    slots = {}
    if unwrap:  # find every wrapper before changing anything
        slots = {(d.name, path): _chain_holder(model, path, w) for d in deltas for path, w in d.wrappers.items()}
    with Rollback(model, get_deltas(model)) as undo:
        for d in deltas:
            undo.keep(d)
            for path, w in d.wrappers.items():
                if not w.merged:
                    w.merge()
                    undo.merged.append(w)
                if unwrap:
                    holder, attr = slots[(d.name, path)]
                    undo.slots.append((holder, attr, getattr(holder, attr)))
                    setattr(holder, attr, restore_target(w))
            if unwrap:
                d.attached = False
                d.wrappers, d.originals = {}, {}
                del get_deltas(model)[d.name]
            done.append(d.name)
    if unwrap:  # the merged weights are now the backbone's: nothing to undo
        for _, fields in undo.deltas:
            for w in fields["wrappers"].values():
                w.__dict__.pop("_unmerged_weight", None)
    return done


def _fold_prefixes(model: nn.Module, name: Optional[str]) -> list[str]:
    """Fold reparameterised prefixes (``name``, or all) into plain ones; their config follows."""
    deltas = get_deltas(model)
    chosen = [deltas[name]] if name is not None and name in deltas and deltas[name].kind == "prefix" else \
        ([] if name is not None else [d for d in deltas.values() if d.kind == "prefix"])
    for d in chosen:
        d.soft.fold()
        d.config = dataclasses.replace(d.config, reparameterize=False)
    return [d.name for d in chosen]


def unmerge(model: nn.Module, name: Optional[str] = None) -> list[str]:
    """Undo :func:`merge` (without ``unwrap``) exactly. Returns the names of the deltas unmerged."""
    model = unwrap_model(model)
    done = []
    with Rollback(model, get_deltas(model)) as undo:
        for d in _lora_deltas(model, name):
            for w in d.wrappers.values():
                if w.merged:
                    w.unmerge()
                    undo.unmerged.append(w)
            done.append(d.name)
    return done


def backbone_named_parameters(model: nn.Module, remove_duplicate: bool = True
                              ) -> Iterator[tuple[str, str, nn.Parameter]]:
    """``(module_path, logical_param_name, param)`` of the backbone (delta parameters excluded).

    A parameter shared by several modules (tied input / output embeddings) comes once, under its
    first name, unless ``remove_duplicate=False``, which yields it under every name."""
    seen = set()
    for path, module in iter_backbone_modules(unwrap_model(model)):
        for n, p in module.named_parameters(recurse=False):
            if not remove_duplicate or id(p) not in seen:
                seen.add(id(p))
                yield path, f"{path}.{n}" if path else n, p


def freeze(model: nn.Module, extras: Iterable[str] = ()) -> dict[str, int]:
    """Freeze the backbone: only the attached deltas' parameters, plus the backbone parameters
    addressed by ``extras`` (plain names / ``"re:"`` patterns matched against parameter names,
    module paths and their ancestors, e.g. ``"lm_head"`` or ``"re:.*norm.*"``), require grad.
    A parameter shared by several modules (tied embeddings: ``lm_head.weight`` is
    ``model.embed_tokens.weight``) is addressed by any of its names, and then trains under all of
    them. Returns ``{"trainable": n, "frozen": m}`` parameter counts. On error (``extras`` that
    address nothing) no flag has changed."""
    model = unwrap_model(model)
    extras = (extras,) if isinstance(extras, str) else tuple(extras)
    extras = _check_patterns(extras, "extras")
    train = {id(p) for d in get_deltas(model).values() for p in d.parameters()}
    if extras:
        hit = set()
        for path, pname, p in backbone_named_parameters(model, remove_duplicate=False):
            parts = path.split(".") if path else []
            ancestors = [".".join(parts[:i]) for i in range(1, len(parts) + 1)]
            if matches_any(pname, extras) or any(matches_any(a, extras) for a in ancestors):
                hit.add(id(p))
        if not hit:
            names = [n for _, n, _ in backbone_named_parameters(model, remove_duplicate=False)]
            raise ValueError(f"extras={list(extras)} address no backbone parameter "
                             f"(parameter names look like {names[:3]} ... {names[-2:]})")
        train |= hit
    for p in model.parameters():
        p.requires_grad_(id(p) in train)
    trainable = sum(p.numel() for p in model.parameters() if p.requires_grad)
    return {"trainable": trainable, "frozen": sum(p.numel() for p in model.parameters()) - trainable}


def delta_parameters(model: nn.Module) -> Iterator[nn.Parameter]:
    """Parameters of every attached delta (for an optimizer)."""
    for d in get_deltas(model).values():
        yield from d.parameters()


__all__ = ["Delta", "attach", "detach", "reattach", "merge", "unmerge", "freeze", "get_deltas",
           "delta_parameters", "backbone_named_parameters", "unwrap_model", "innermost"]
