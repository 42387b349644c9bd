"""Module-name addressing: which modules of a backbone a delta attaches to.

A *target* is either

* a plain name, e.g. ``"q_proj"`` or ``"attention.output.dense"``: it matches every module whose
  dotted path ends with it at a ``.`` boundary (``"q_proj"`` matches ``model.layers.3.self_attn.q_proj``
  but not ``model.layers.3.self_attn.xq_proj``), or the exact path;
* a regular expression, written ``"re:<pattern>"``: it matches when the pattern matches the
  *whole* path (``re.fullmatch``), e.g. ``"re:.*layers\\.(0|1)\\..*proj"``.

Exclusions use the same two forms and win over targets. Paths are *logical*: a module already
wrapped by a delta keeps its original path (``…q_proj``, not ``…q_proj.base``), so several
deltas can be addressed the same way on one model, and the internals of deltas are never targets.
"""

from __future__ import annotations

import re
from typing import Iterable, Iterator

from torch import nn

REGEX_PREFIX = "re:"

# Default targets per architecture family (config.model_type), per delta kind.
_LLAMA = ("llama", "mistral", "mixtral", "qwen2", "qwen2_moe", "qwen3", "gemma", "gemma2", "gemma3_text",
          "phi3", "olmo", "olmo2", "granite", "smollm3")
_GPT2 = ("gpt2",)
_BERT = ("bert", "roberta", "xlm-roberta", "electra", "camembert")

DEFAULT_TARGETS: dict[str, dict[str, tuple[str, ...]]] = {
    "llama": {
        # LoRA's paper and peft's default for Llama: the query and value projections.
        "lora": ("q_proj", "v_proj"),
        "sora": ("q_proj", "v_proj"),
        # after the FFN block, inside the residual (Pfeiffer placement; one adapter per layer)
        "adapter": ("mlp",),
        "parallel_adapter": ("mlp",),
        "compacter": ("mlp",),
        "low_rank_adapter": ("mlp",),
        "bitfit": ("q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj",
                   "input_layernorm", "post_attention_layernorm"),
    },
    "gpt2": {
        # GPT-2's attention/MLP projections are transformers' Conv1D (weight stored [in, out]).
        "lora": ("c_attn",),
        "sora": ("c_attn",),
        "adapter": ("mlp",),
        "parallel_adapter": ("mlp",),
        "compacter": ("mlp",),
        "low_rank_adapter": ("mlp",),
        "bitfit": ("c_attn", "c_proj", "c_fc", "ln_1", "ln_2"),
    },
    "bert": {
        "lora": ("query", "value"),
        "sora": ("query", "value"),
        # Houlsby placement: after each sublayer's output projection, before its residual+LayerNorm
        "adapter": ("output.dense",),
        "parallel_adapter": ("output.dense",),
        "compacter": ("output.dense",),
        "low_rank_adapter": ("output.dense",),
        "bitfit": ("query", "key", "value", "dense", "LayerNorm"),
    },
}


def architecture_family(model: nn.Module) -> str | None:
    """``"llama"``, ``"gpt2"``, ``"bert"`` or ``None`` from ``model.config.model_type``."""
    model_type = getattr(getattr(model, "config", None), "model_type", None)
    for family, types in (("llama", _LLAMA), ("gpt2", _GPT2), ("bert", _BERT)):
        if model_type in types:
            return family
    return None


def default_targets(model: nn.Module, kind: str) -> tuple[str, ...]:
    """The default targets of delta ``kind`` for ``model``'s architecture (a clear error if unknown)."""
    family = architecture_family(model)
    if family is None:
        model_type = getattr(getattr(model, "config", None), "model_type", None)
        raise ValueError(f"no default targets for model_type={model_type!r} ({type(model).__name__}); "
                         f"pass targets=[...] (known families: Llama-like, GPT-2, BERT-like)")
    return DEFAULT_TARGETS[family][kind]


def _check_patterns(patterns, what: str) -> tuple[str, ...]:
    if isinstance(patterns, str):
        patterns = (patterns,)
    try:
        patterns = tuple(patterns)
    except TypeError:
        raise TypeError(f"{what} must be a string or an iterable of strings, got {type(patterns).__name__}") from None
    for p in patterns:
        if not isinstance(p, str) or not p:
            raise TypeError(f"{what} entries must be non-empty strings, got {p!r}")
        if p.startswith(REGEX_PREFIX):
            try:
                re.compile(p[len(REGEX_PREFIX):])
            except re.error as e:
                raise ValueError(f"{what}: invalid regular expression {p!r}: {e}") from None
    return patterns


def name_matches(path: str, pattern: str) -> bool:
    """Whether the dotted module ``path`` is addressed by ``pattern`` (see the module docstring)."""
    if pattern.startswith(REGEX_PREFIX):
        return re.fullmatch(pattern[len(REGEX_PREFIX):], path) is not None
    return path == pattern or path.endswith("." + pattern)


def matches_any(path: str, patterns: Iterable[str]) -> bool:
    return any(name_matches(path, p) for p in patterns)


def is_delta_wrapper(module: nn.Module) -> bool:
    """A module inserted by :mod:`lmfuse.delta` in place of a backbone module (it holds it as ``base``)."""
    return getattr(module, "_lmfuse_delta_name", None) is not None


def innermost(module: nn.Module) -> nn.Module:
    """The backbone module under a chain of delta wrappers (for a GPT-2 Conv1D under LoRA, the
    Conv1D itself, not the Linear view LoRA wraps)."""
    while is_delta_wrapper(module):
        restore = module.__dict__.get("_lmfuse_restore")
        module = module.base if restore is None else restore
    return module


def iter_backbone_modules(model: nn.Module, prefix: str = "") -> Iterator[tuple[str, nn.Module]]:
    """``(logical_path, module)`` for every backbone module, looking through delta wrappers and
    never entering a delta's own sub-modules."""
    module = innermost(model)
    yield prefix, module
    for name, child in module.named_children():
        if getattr(child, "_lmfuse_delta_internal", False):
            continue
        yield from iter_backbone_modules(child, f"{prefix}.{name}" if prefix else name)


def resolve_targets(model: nn.Module, targets, exclude=(), accept=None, kind: str = "delta") -> list[str]:
    """Logical paths of the modules addressed by ``targets`` minus ``exclude``.

    ``accept(module) -> bool`` filters by module type (e.g. LoRA accepts only linear layers):
    matches it rejects are skipped, and when nothing is left a ``ValueError`` names what matched.
    """
    targets = _check_patterns(targets, "targets")
    exclude = _check_patterns(exclude, "exclude")
    if not targets:
        raise ValueError("targets is empty")
    matched, rejected = [], []
    for path, module in iter_backbone_modules(model):
        if not path or not matches_any(path, targets) or matches_any(path, exclude):
            continue
        (matched if accept is None or accept(module) else rejected).append(path)
    if not matched:
        extra = (f"; these matched but cannot take a {kind} delta: "
                 + ", ".join(f"{p} ({type(get_logical(model, p)).__name__})" for p in rejected[:5])
                 if rejected else "")
        raise ValueError(f"no module of {type(model).__name__} matches targets={list(targets)} "
                         f"(exclude={list(exclude)}){extra}")
    return matched


def get_logical(model: nn.Module, path: str) -> nn.Module:
    """The backbone module at logical ``path`` (under any delta wrappers)."""
    module = innermost(model)
    for part in path.split(".") if path else ():
        module = innermost(getattr(module, part))
    return module


def get_slot(model: nn.Module, path: str) -> tuple[nn.Module, str]:
    """``(parent, attribute)`` holding the outermost module at logical ``path`` (wrapper or backbone)."""
    if not path:
        raise ValueError("the root module cannot be replaced")
    *parents, last = path.split(".")
    parent = get_logical(model, ".".join(parents))
    if not hasattr(parent, last):
        raise ValueError(f"no module at path {path!r}")
    return parent, last
