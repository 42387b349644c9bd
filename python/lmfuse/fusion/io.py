"""Save and load a fuser: the gate, any ``lmfuse.delta`` deltas on the experts, and the experts'
identity, so that a gate is never silently loaded onto other experts than it was trained with.

Layout of the directory::

    fusion_config.json     format, version, expert names, vocab_size, templates (strings only),
                           gate shape, and per expert: its fingerprint and whether deltas follow
    gate.safetensors       the TokenGate's state_dict
    expert_<e>/            lmfuse.delta.save() of expert e's deltas (only when it has any)

The fingerprint of an expert is its class, ``model_type``, a SHA-256 of its architecture config
and a SHA-256 of its base weights (names, dtypes, bytes; delta parameters excluded). A fully
fine-tuned expert (stage 2 without deltas) has new weights and so a new fingerprint: save the
expert itself (``expert.save_pretrained``) next to the fuser and load that copy.
"""

from __future__ import annotations

import hashlib
import json
import os
import torch

FORMAT = "lmfuse-fusion"
VERSION = 1
CONFIG_FILE = "fusion_config.json"
GATE_FILE = "gate.safetensors"

__all__ = ["save_fuser", "load_fuser", "expert_fingerprint", "ExpertMismatchError", "read_config"]

_VOLATILE = {"transformers_version", "_name_or_path", "torch_dtype", "dtype", "_attn_implementation",
             "_attn_implementation_autoset", "_commit_hash", "use_cache", "output_attentions",
             "output_hidden_states", "return_dict", "architectures"}


class ExpertMismatchError(ValueError):
    """The experts given to ``from_pretrained`` are not the ones the fuser was saved with."""


def expert_fingerprint(model, weights: bool = True) -> dict:
    """``{"class", "model_type", "config_sha256", "weights_sha256"}`` of a causal LM (base
    weights only: parameters of attached ``lmfuse.delta`` deltas are left out)."""
    from ..delta.model import backbone_named_parameters

    cfg = getattr(model, "config", None)
    cfg_d = {k: v for k, v in cfg.to_dict().items() if k not in _VOLATILE} if hasattr(cfg, "to_dict") else {}
    out = {"class": type(model).__name__, "model_type": cfg_d.get("model_type"),
           "config_sha256": hashlib.sha256(json.dumps(cfg_d, sort_keys=True, default=str).encode()).hexdigest(),
           "weights_sha256": None}
    if weights:
        digest = hashlib.sha256()
        for _, name, p in backbone_named_parameters(model):
            t = p.detach()
            digest.update(f"{name}:{t.dtype}:{tuple(t.shape)}".encode())
            digest.update(t.cpu().contiguous().view(torch.uint8).numpy().tobytes())
        out["weights_sha256"] = digest.hexdigest()
    return out


def read_config(directory: str) -> dict:
    """The saved ``fusion_config.json`` (``FileNotFoundError`` / ``ValueError`` when it is not a
    saved fuser). Needs only the standard library."""
    path = os.path.join(directory, CONFIG_FILE)
    if not os.path.isfile(path):
        raise FileNotFoundError(f"{path} not found: not a saved lmfuse fuser directory")
    with open(path) as f:
        meta = json.load(f)
    if meta.get("format") != FORMAT or meta.get("version") != VERSION:
        raise ValueError(f"{path}: unsupported format {meta.get('format')!r} v{meta.get('version')}")
    return meta


def save_fuser(fuser, directory: str) -> str:
    """Write ``fuser`` (gate, deltas, fingerprints) to ``directory``; returns it. Refuses merged
    deltas (the fingerprint is that of the plain experts)."""
    from safetensors.torch import save_file

    from .. import delta

    os.makedirs(directory, exist_ok=True)
    experts = []
    for e, model in enumerate(fuser.experts):
        has = bool(delta.get_deltas(model))
        if has:
            delta.save(model, os.path.join(directory, f"expert_{e}"))
        experts.append({"name": fuser.expert_names[e], "fingerprint": expert_fingerprint(model), "deltas": has})
    g = fuser.gate
    meta = {"format": FORMAT, "version": VERSION, "vocab_size": fuser.vocab_size,
            "templates": [t if isinstance(t, str) or t is None else "<callable>" for t in fuser.templates],
            "gate": {"hidden_size": g.hidden_size, "num_experts": g.num_experts, "inner_size": g.inner_size,
                     "expert_hidden_sizes": list(g.expert_hidden_sizes),
                     "dtype": str(g.scorer[0].weight.dtype).removeprefix("torch.")},
            "experts": experts}
    save_file({k: v.detach().cpu().contiguous() for k, v in g.state_dict().items()},
              os.path.join(directory, GATE_FILE), metadata={"format": FORMAT})
    with open(os.path.join(directory, CONFIG_FILE), "w") as f:
        json.dump(meta, f, indent=1)
    return directory


def _mismatches(saved: dict, here: dict, check_weights: bool) -> list[str]:
    out = []
    for key, what in (("class", "class"), ("model_type", "model_type"), ("config_sha256", "architecture config")):
        if saved[key] != here[key]:
            out.append(f"{what} differs ({here[key]!s:.20} != saved {saved[key]!s:.20})")
    if check_weights and not out and saved.get("weights_sha256") and saved["weights_sha256"] != here["weights_sha256"]:
        out.append("weights differ (another checkpoint, a fine-tuned copy, or another dtype)")
    return out


def load_fuser(directory: str, experts, tokenizer, *, templates=None, check_weights: bool = True,
               device=None):
    """Rebuild the fuser saved in ``directory`` on ``experts`` (list or dict, in the saved order).

    ``ExpertMismatchError`` (a ``ValueError``) names every expert whose class, architecture
    config or (``check_weights``) base weights differ from the saved fingerprint, before anything
    is changed. Then each expert's saved deltas are attached (``lmfuse.delta.load``) and the gate
    is loaded. ``templates``: needed when the saved ones were callables; default the saved ones.
    """
    from safetensors.torch import load_file

    from .. import delta
    from ..modules.token_gate import TokenGate
    from .ultrafuser import UltraFuser

    meta = read_config(directory)
    models = list(experts.values()) if isinstance(experts, dict) else list(experts)
    saved = meta["experts"]
    if len(models) != len(saved):
        raise ExpertMismatchError(f"experts: the fuser was saved with {len(saved)} experts, got {len(models)}")
    problems = []
    for e, (m, s) in enumerate(zip(models, saved)):
        for why in _mismatches(s["fingerprint"], expert_fingerprint(m, weights=check_weights), check_weights):
            problems.append(f"expert {e} ({s['name']}): {why}")
        if s["deltas"] and delta.get_deltas(m):
            problems.append(f"expert {e} ({s['name']}): already has deltas attached {sorted(delta.get_deltas(m))}")
    if problems:
        raise ExpertMismatchError("these are not the experts the fuser was saved with:\n  - " + "\n  - ".join(problems))
    if templates is None:
        templates = meta["templates"]
        if "<callable>" in templates:
            raise ValueError("templates: the fuser was saved with callable templates; pass them again")
    if device is None:
        device = next(models[0].parameters()).device
    g = meta["gate"]
    loaded = []
    try:
        for e, (m, s) in enumerate(zip(models, saved)):
            if s["deltas"]:
                delta.load(m, os.path.join(directory, f"expert_{e}"), check_weights=False)
                loaded.append(m)
        gate = TokenGate(g["hidden_size"], g["num_experts"], g["inner_size"],
                         expert_hidden_sizes=g["expert_hidden_sizes"], dtype=getattr(torch, g["dtype"]), device=device)
        gate.load_state_dict(load_file(os.path.join(directory, GATE_FILE)))
        named = dict(zip([s["name"] for s in saved], models))  # the saved names, for the analysis
        return UltraFuser(named, tokenizer, templates=templates, vocab_size=meta["vocab_size"], gate=gate)
    except BaseException:  # all or nothing: no delta of this directory stays attached
        for m in loaded:
            for name in list(delta.get_deltas(m)):
                delta.detach(m, name)
        raise
