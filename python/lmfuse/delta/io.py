"""Save / load the deltas alone: ``delta_model.safetensors`` (tensors named
``<delta name>/<logical path>.<param>``) + ``delta_config.json`` (configs, paths, per-module
LoRA ranks, and the backbone's identity, checked on load)."""

from __future__ import annotations

import hashlib
import json
import os
from typing import Iterable, Optional

import torch
from torch import nn

from .addressing import get_logical, iter_backbone_modules
from .deltas import LORA_FAMILY, ROOT_KINDS, config_from_dict
from .model import Delta, attach, detach, get_deltas, unwrap_model

FORMAT = "lmfuse-delta"
VERSION = 1
CONFIG_FILE = "delta_config.json"
WEIGHTS_FILE = "delta_model.safetensors"
EMBEDDINGS = "<input_embeddings>"
# config entries that do not change the architecture (runtime switches, provenance)
_VOLATILE = {"transformers_version", "_name_or_path", "torch_dtype", "dtype", "_attn_implementation",
             "_attn_implementation_autoset", "_commit_hash", "use_cache", "output_attentions",
             "output_hidden_states", "return_dict", "architectures", "lpa"}


class BackboneMismatchError(ValueError):
    """The delta was saved from a different backbone than the one it is loaded onto."""


def _config_hash(model: nn.Module) -> Optional[str]:
    cfg = getattr(model, "config", None)
    if cfg is None or not hasattr(cfg, "to_dict"):
        return None
    d = {k: v for k, v in cfg.to_dict().items() if k not in _VOLATILE}
    return hashlib.sha256(json.dumps(d, sort_keys=True, default=str).encode()).hexdigest()


def _module_tensors(model: nn.Module, path: str) -> list[tuple[str, torch.Tensor]]:
    """The backbone parameters under logical ``path`` (delta parameters excluded)."""
    if path == EMBEDDINGS:
        return [("weight", model.get_input_embeddings().weight)]
    root = get_logical(model, path)
    return [(f"{sub}.{n}" if sub else n, p) for sub, m in iter_backbone_modules(root)
            for n, p in m.named_parameters(recurse=False)]


def _touched(deltas: Iterable[Delta]) -> list[str]:
    out = []
    for d in deltas:
        out.extend(d.paths if d.soft is None else [EMBEDDINGS])
    return sorted(set(out))


# the dtypes a backbone's weights are also hashed in, so that a copy of the same backbone cast to
# another dtype (``model.to(torch.bfloat16)``) is recognised exactly: the copy's weights are, bit
# for bit, the saved backbone's weights cast to its dtype
CANONICAL_DTYPES = {"float64": torch.float64, "float32": torch.float32, "bfloat16": torch.bfloat16,
                    "float16": torch.float16}


def _dtype_name(dtype: torch.dtype) -> str:
    return str(dtype).removeprefix("torch.")


def _weights_digest(tensors: list[tuple[str, torch.Tensor]], cast: Optional[torch.dtype]) -> str:
    """SHA-256 of ``(name, dtype, bytes)`` of each tensor, each cast to ``cast`` first (unless None)."""
    digest = hashlib.sha256()
    for name, t in tensors:
        t = t.detach()
        if cast is not None and t.is_floating_point():
            t = t.to(cast)
        digest.update(f"{name}:{t.dtype}".encode())
        digest.update(t.cpu().contiguous().view(torch.uint8).numpy().tobytes())
    return digest.hexdigest()


def backbone_identity(model: nn.Module, paths: list[str], weights: bool = True) -> dict:
    """Class name, ``model_type``, a hash of the architecture config, the class and parameter
    shapes of each touched module and (``weights``) the dtypes of their weights, a SHA-256 of
    them as they are (``weights_sha256``) and one per dtype of :data:`CANONICAL_DTYPES` after
    casting them to it (``weights_sha256_by_dtype``)."""
    for d in get_deltas(model).values():
        if d.merged and set(d.paths) & set(paths):
            raise RuntimeError(f"delta {d.name!r} is merged into modules being identified: unmerge it first")
    modules, tensors = {}, []
    for path in paths:
        cls = type(model.get_input_embeddings() if path == EMBEDDINGS else get_logical(model, path)).__name__
        own = _module_tensors(model, path)
        modules[path] = {"class": cls, "params": {n: list(t.shape) for n, t in own}}
        tensors += [(f"{path}.{n}", t) for n, t in own]
    out = {"class": type(model).__name__,
           "model_type": getattr(getattr(model, "config", None), "model_type", None),
           "config_sha256": _config_hash(model), "modules": modules, "weights_sha256": None}
    if weights:
        out["weights_sha256"] = _weights_digest(tensors, None)
        out["weights_dtypes"] = sorted({_dtype_name(t.dtype) for _, t in tensors})
        out["weights_sha256_by_dtype"] = {k: _weights_digest(tensors, d) for k, d in CANONICAL_DTYPES.items()}
    return out


def _weights_match(model: nn.Module, paths: list[str], saved: dict) -> tuple[bool, str]:
    """Whether the touched weights are the saved backbone's, cast to the model's dtype if it
    differs; and, when not, the reason."""
    tensors = [(f"{p}.{n}", t) for p in paths for n, t in _module_tensors(model, p)]
    here = sorted({_dtype_name(t.dtype) for _, t in tensors})
    there = saved.get("weights_dtypes")
    by_dtype = saved.get("weights_sha256_by_dtype") or {}
    if there is not None and here != there:
        if len(here) == 1 and here[0] in by_dtype:
            # a copy in another dtype: compare with the saved weights cast to that dtype
            if _weights_digest(tensors, CANONICAL_DTYPES[here[0]]) == by_dtype[here[0]]:
                return True, ""
            return False, (f"the weights of the touched modules differ from the saved backbone's, even "
                           f"after casting those ({', '.join(there)}) to this model's {here[0]}")
        return False, (f"the touched modules' weights are {', '.join(here)}, the saved backbone's were "
                       f"{', '.join(there)}, and no hash of them in that dtype mix was saved: cast the "
                       f"model to one dtype")
    if _weights_digest(tensors, None) == saved["weights_sha256"]:
        return True, ""
    why = "the weights of the touched modules differ from the saved backbone's"
    if there is None:
        why += f" (or only their dtype does: this model's are {', '.join(here)}; the delta was saved without a dtype record)"
    return False, why


def save(model: nn.Module, directory: str, names: Optional[Iterable[str]] = None) -> str:
    """Write the attached deltas (all, or ``names``) to ``directory``; returns the directory.
    Merged deltas are refused (unmerge first): the saved identity is that of the plain backbone."""
    from safetensors.torch import save_file

    model = unwrap_model(model)
    deltas = get_deltas(model)
    names = list(deltas) if names is None else list(names)
    if not names:
        raise ValueError("no delta is attached to the model: nothing to save")
    chosen = []
    for n in names:
        if n not in deltas:
            raise KeyError(f"no delta named {n!r} is attached (attached: {sorted(deltas)})")
        if deltas[n].merged:
            raise RuntimeError(f"delta {n!r} is merged into the base weights: unmerge it before saving")
        chosen.append(deltas[n])
    entries, tensors = [], {}
    for d in chosen:
        per_module = {}
        if d.kind in LORA_FAMILY:
            per_module = {p: {"r": int(w.r), "gated": w.gate is not None, "scaling": float(w.scaling)}
                          for p, w in d.wrappers.items()}
        entries.append({"name": d.name, "kind": d.kind, "config": d.config.to_dict(), "paths": d.paths,
                        "modules": per_module})
        for k, t in d.state_dict().items():
            tensors[f"{d.name}/{k}"] = t.detach().cpu().contiguous().clone()
    meta = {"format": FORMAT, "version": VERSION, "deltas": entries,
            "backbone": backbone_identity(model, _touched(chosen))}
    os.makedirs(directory, exist_ok=True)
    save_file(tensors, os.path.join(directory, WEIGHTS_FILE), metadata={"format": FORMAT})
    with open(os.path.join(directory, CONFIG_FILE), "w") as f:
        json.dump(meta, f, indent=2)
    return directory


def _check_backbone(model: nn.Module, saved: dict, check_weights: bool) -> None:
    paths = list(saved["modules"])
    problems = []
    if saved["class"] != type(model).__name__:
        problems.append(f"model class {type(model).__name__} != saved {saved['class']}")
    here_cfg = _config_hash(model)
    if saved.get("config_sha256") and here_cfg != saved["config_sha256"]:
        problems.append("the architecture config differs (hidden sizes, layer count, vocab, ...)")
    for path in paths:
        try:
            cls = type(model.get_input_embeddings() if path == EMBEDDINGS else get_logical(model, path)).__name__
            shapes = {n: list(t.shape) for n, t in _module_tensors(model, path)}
        except (AttributeError, ValueError):
            problems.append(f"module {path} does not exist")
            continue
        want = saved["modules"][path]
        if cls != want["class"] or shapes != want["params"]:
            problems.append(f"module {path}: {cls} {shapes} != saved {want['class']} {want['params']}")
    if not problems and check_weights and saved.get("weights_sha256"):
        for d in get_deltas(model).values():
            if d.merged and set(d.paths) & set(paths):
                raise RuntimeError(f"delta {d.name!r} is merged into modules being identified: unmerge it first")
        same, why = _weights_match(model, paths, saved)
        if not same:
            problems.append(f"{why} (pass check_weights=False to load onto a fine-tuned copy on purpose)")
    if problems:
        raise BackboneMismatchError(f"the delta was saved from a different backbone "
                                    f"({saved['class']}, model_type={saved.get('model_type')}):\n  - "
                                    + "\n  - ".join(problems[:10]))


def load(model: nn.Module, directory: str, names: Optional[Iterable[str]] = None,
         check_weights: bool = True) -> list[Delta]:
    """Attach the deltas saved in ``directory`` (all, or ``names``) to ``model`` with their saved
    parameters. Raises :class:`BackboneMismatchError` when the model's class, architecture config,
    touched modules' shapes or (``check_weights``) their weights differ from the saved backbone.
    A copy of the same backbone in another floating dtype (e.g. ``model.to(torch.bfloat16)``) is
    the same backbone: its weights are compared with the saved ones cast to its dtype, and the
    delta's parameters take the dtype of the modules they attach to. All or nothing: on any
    error no delta of ``directory`` is left attached."""
    from safetensors.torch import load_file

    model = unwrap_model(model)
    cfg_path = os.path.join(directory, CONFIG_FILE)
    if not os.path.isfile(cfg_path):
        raise FileNotFoundError(f"{cfg_path} not found: not a saved lmfuse delta directory")
    with open(cfg_path) as f:
        meta = json.load(f)
    if meta.get("format") != FORMAT or meta.get("version") != VERSION:
        raise ValueError(f"{cfg_path}: unsupported format {meta.get('format')!r} v{meta.get('version')}")
    _check_backbone(model, meta["backbone"], check_weights)
    tensors = load_file(os.path.join(directory, WEIGHTS_FILE))
    wanted = None if names is None else set(names)
    entries = [e for e in meta["deltas"] if wanted is None or e["name"] in wanted]
    if wanted is not None and len(entries) != len(wanted):
        raise KeyError(f"not in {directory}: {sorted(wanted - {e['name'] for e in entries})} "
                       f"(saved: {[e['name'] for e in meta['deltas']]})")
    attached = get_deltas(model)
    clash = [e["name"] for e in entries if e["name"] in attached]
    if clash:
        raise ValueError(f"deltas named {clash} are already attached; detach them first")
    out = []
    try:
        for e in entries:
            cfg = config_from_dict(e["kind"], e["config"])
            paths = None if e["kind"] in ROOT_KINDS else e["paths"]
            d = attach(model, cfg, e["name"], _paths=paths, _per_module=e.get("modules") or None)
            out.append(d)
            prefix = e["name"] + "/"
            d.load_state_dict({k[len(prefix):]: v for k, v in tensors.items() if k.startswith(prefix)})
    except BaseException:
        for d in reversed(out):
            detach(model, d.name)
        raise
    return out
