"""The delta types: their configs and the wrapper modules that carry them.

Attachment is by **wrapping**: the addressed backbone module is replaced, in its parent, by a
small module that keeps the original as its child ``base`` and adds the delta around it. Why
wrapping rather than forward hooks or editing weights: the delta's parameters then live in the
model's own module tree (so ``model.parameters()``, optimizers, ``state_dict``, ``.to()``, DDP,
FSDP, ``torch.compile`` and gradient checkpointing see them with no special case), the forward is
plain code ``torch.compile`` traces without graph breaks, and detaching puts the very same
backbone module object back, so the original outputs are restored bit for bit. The one cost:
while attached, the backbone's ``state_dict`` keys of a wrapped module gain a ``.base`` segment
(``…q_proj.base.weight``); ``lmfuse.delta.save`` stores the delta alone, so this never leaks into
checkpoints of the delta. The soft prompt is the exception: it changes the model's inputs, so it is
a pre-forward hook on the root module with its parameter registered as a root sub-module.

LoRA / SoRA use :class:`lmfuse.modules.LoRALinear` (the fused gated-LoRA op). GPT-2's projections
are ``transformers``' ``Conv1D`` (weight stored ``[in, out]``): LoRA wraps an ``nn.Linear`` whose
weight is a transposed *view* of the Conv1D weight (no copy; a merge writes through to it), and
detach puts the original Conv1D back.
"""

from __future__ import annotations

import math
from dataclasses import asdict, dataclass, field
from typing import Callable, ClassVar, Optional

import torch
from torch import nn

from ..modules.lora import LoRALinear

_ACTIVATIONS: dict[str, Callable[[], nn.Module]] = {
    "gelu": nn.GELU, "relu": nn.ReLU, "silu": nn.SiLU, "tanh": nn.Tanh,
}


@dataclass
class DeltaConfig:
    """Common fields: ``targets`` (``None`` = the architecture's defaults, see
    :mod:`lmfuse.delta.addressing`) and ``exclude``."""

    kind: ClassVar[str] = ""
    targets: Optional[tuple] = None
    exclude: tuple = ()

    def to_dict(self) -> dict:
        d = asdict(self)
        for k in ("targets", "exclude"):
            if d[k] is not None:
                d[k] = list(d[k])
        return d


@dataclass
class LoRAConfig(DeltaConfig):
    """LoRA: ``y = base(x) + (lora_alpha / r)·(dropout(x)·Aᵀ)·Bᵀ`` on linear layers (``B`` starts at 0)."""

    kind: ClassVar[str] = "lora"
    r: int = 8
    lora_alpha: float = 16.0
    dropout: float = 0.0

    def __post_init__(self):
        if isinstance(self.r, bool) or not isinstance(self.r, int) or self.r < 1:
            raise ValueError(f"r must be a positive int, got {self.r!r}")


@dataclass
class SoRAConfig(LoRAConfig):
    """SoRA: LoRA with a per-rank gate ``[r]`` (train it with ``lmfuse.sora``'s optimizer, prune with
    ``lmfuse.sora.prune``)."""

    kind: ClassVar[str] = "sora"


@dataclass
class AdapterConfig(DeltaConfig):
    """Sequential bottleneck adapter (Houlsby / Pfeiffer): ``h ← h + scale·up(act(down(h)))`` on the
    target module's output. ``up`` starts at zero, so attaching leaves the outputs unchanged.
    ``dim`` overrides the feature size for modules that are not linear layers (default: the
    layer's ``out_features``, else ``model.config.hidden_size``)."""

    kind: ClassVar[str] = "adapter"
    bottleneck: int = 64
    nonlinearity: str = "gelu"
    scale: float = 1.0
    dim: Optional[int] = None

    def __post_init__(self):
        if isinstance(self.bottleneck, bool) or not isinstance(self.bottleneck, int) or self.bottleneck < 1:
            raise ValueError(f"bottleneck must be a positive int, got {self.bottleneck!r}")
        if self.nonlinearity not in _ACTIVATIONS:
            raise ValueError(f"nonlinearity must be one of {sorted(_ACTIVATIONS)}, got {self.nonlinearity!r}")


@dataclass
class ParallelAdapterConfig(AdapterConfig):
    """Parallel adapter (He et al. 2022): ``y = base(x) + scale·up(act(down(x)))`` from the module's
    *input* (the first positional argument or ``hidden_states=``)."""

    kind: ClassVar[str] = "parallel_adapter"


@dataclass
class BitFitConfig(DeltaConfig):
    """BitFit: a trainable bias (starting at 0) added to the output of each target (linear, Conv1D,
    LayerNorm / RMSNorm-like). A zero-initialised *extra* bias rather than unfreezing existing ones
    so the delta is separable (saved alone, detached) and works on bias-free models like Llama."""

    kind: ClassVar[str] = "bitfit"


@dataclass
class SoftPromptConfig(DeltaConfig):
    """Soft prompt (Lester et al. 2021): ``n_tokens`` learned embeddings prepended to the input
    embeddings. ``init="vocab"`` copies the embeddings of random vocabulary tokens, ``"random"``
    draws from N(0, std of the embedding table). ``targets`` / ``exclude`` are unused."""

    kind: ClassVar[str] = "soft_prompt"
    n_tokens: int = 10
    init: str = "vocab"

    def __post_init__(self):
        if isinstance(self.n_tokens, bool) or not isinstance(self.n_tokens, int) or self.n_tokens < 1:
            raise ValueError(f"n_tokens must be a positive int, got {self.n_tokens!r}")
        if self.init not in ("vocab", "random"):
            raise ValueError(f"init must be 'vocab' or 'random', got {self.init!r}")


def _positive_int(value, what: str) -> None:
    if isinstance(value, bool) or not isinstance(value, int) or value < 1:
        raise ValueError(f"{what} must be a positive int, got {value!r}")


@dataclass
class CompacterConfig(DeltaConfig):
    """Compacter (Mahabadi et al. 2021): a sequential bottleneck adapter (placed like
    :class:`AdapterConfig`) whose ``down`` / ``up`` projections are PHM layers,
    ``W = Σ_{i<n} A_i ⊗ B_i`` (see :mod:`lmfuse.delta.compacter`). ``n`` (the division) must divide
    the feature size; ``factorized`` makes ``B_i = s_i·t_iᵀ`` of rank ``rank``; ``rules="per_layer"``
    gives each adapter its own ``A`` (used by its ``down`` and ``up``), ``"shared"`` one ``A`` for
    every adapter of the delta. The bottleneck is ``bottleneck`` or ``dim / reduction_factor``
    rounded up to a multiple of ``n``. ``up`` starts at zero (identity at attach)."""

    kind: ClassVar[str] = "compacter"
    reduction_factor: int = 16
    n: int = 4
    factorized: bool = True
    rank: int = 1
    rules: str = "per_layer"
    rule_init_std: float = 0.01
    nonlinearity: str = "gelu"
    scale: float = 1.0
    bottleneck: Optional[int] = None
    dim: Optional[int] = None

    def __post_init__(self):
        for what in ("reduction_factor", "n", "rank"):
            _positive_int(getattr(self, what), what)
        if self.bottleneck is not None:
            _positive_int(self.bottleneck, "bottleneck")
            if self.bottleneck % self.n:
                raise ValueError(f"bottleneck ({self.bottleneck}) must be a multiple of n={self.n}")
        if self.rules not in ("per_layer", "shared"):
            raise ValueError(f"rules must be 'per_layer' or 'shared', got {self.rules!r}")
        if self.nonlinearity not in _ACTIVATIONS:
            raise ValueError(f"nonlinearity must be one of {sorted(_ACTIVATIONS)}, got {self.nonlinearity!r}")

    def bottleneck_for(self, dim: int) -> int:
        if self.bottleneck is not None:
            return self.bottleneck
        return max(self.n, -(-dim // (self.reduction_factor * self.n)) * self.n)


@dataclass
class LowRankAdapterConfig(DeltaConfig):
    """Low-rank adapter (OpenDelta's ``LowRankAdapter``): a sequential bottleneck adapter whose
    ``down`` and ``up`` projections are each ``U·V`` of rank ``rank``. The bottleneck is
    ``bottleneck`` or ``max(1, dim // reduction_factor)``. ``up``'s ``U`` starts at zero."""

    kind: ClassVar[str] = "low_rank_adapter"
    reduction_factor: int = 32
    rank: int = 1
    nonlinearity: str = "gelu"
    scale: float = 1.0
    bottleneck: Optional[int] = None
    dim: Optional[int] = None

    def __post_init__(self):
        for what in ("reduction_factor", "rank"):
            _positive_int(getattr(self, what), what)
        if self.bottleneck is not None:
            _positive_int(self.bottleneck, "bottleneck")
        if self.nonlinearity not in _ACTIVATIONS:
            raise ValueError(f"nonlinearity must be one of {sorted(_ACTIVATIONS)}, got {self.nonlinearity!r}")

    def bottleneck_for(self, dim: int) -> int:
        return self.bottleneck if self.bottleneck is not None else max(1, dim // self.reduction_factor)


@dataclass
class PrefixConfig(DeltaConfig):
    """Prefix tuning (Li & Liang 2021): ``num_virtual_tokens`` trainable key and value vectors in
    front of every attention layer's keys and values (see :mod:`lmfuse.delta.prefix`).
    ``reparameterize=True`` produces them, while training, from a ``[P, model hidden]`` embedding
    through ``Linear(hidden_size) → tanh → Linear`` (``merge`` folds that into plain tensors);
    ``False`` trains them directly. ``init_std`` scales the initial embedding / prefix
    (``N(0, init_std²)``). ``targets`` / ``exclude`` are unused: every attention layer gets one."""

    kind: ClassVar[str] = "prefix"
    num_virtual_tokens: int = 20
    reparameterize: bool = True
    hidden_size: int = 512
    init_std: float = 1.0

    def __post_init__(self):
        _positive_int(self.num_virtual_tokens, "num_virtual_tokens")
        _positive_int(self.hidden_size, "hidden_size")
        if not isinstance(self.reparameterize, bool):
            raise TypeError(f"reparameterize must be a bool, got {type(self.reparameterize).__name__}")
        if not (isinstance(self.init_std, (int, float)) and self.init_std > 0):
            raise ValueError(f"init_std must be a positive number, got {self.init_std!r}")


CONFIG_TYPES: dict[str, type] = {c.kind: c for c in (LoRAConfig, SoRAConfig, AdapterConfig,
                                                       ParallelAdapterConfig, BitFitConfig, SoftPromptConfig,
                                                       CompacterConfig, LowRankAdapterConfig, PrefixConfig)}
ROOT_KINDS = ("soft_prompt", "prefix")  # deltas held by a root sub-module and hooks, not by wrappers
STRUCTURED_ADAPTERS = ("compacter", "low_rank_adapter")
LORA_FAMILY = ("lora", "sora")


def config_from_dict(kind: str, d: dict) -> DeltaConfig:
    if kind not in CONFIG_TYPES:
        raise ValueError(f"unknown delta kind {kind!r}; known: {sorted(CONFIG_TYPES)}")
    d = dict(d)
    for k in ("targets", "exclude"):
        if d.get(k) is not None:
            d[k] = tuple(d[k])
    return CONFIG_TYPES[kind](**d)


# ----------------------------------------------------------------------------------------------
# feature sizes of backbone modules


def is_conv1d(module: nn.Module) -> bool:
    """transformers' GPT-2 ``Conv1D`` (matched by name and attributes, so transformers stays optional)."""
    return type(module).__name__ == "Conv1D" and hasattr(module, "nf") and hasattr(module, "nx")


def accepts_lora(module: nn.Module) -> bool:
    return isinstance(module, nn.Linear) or is_conv1d(module)


def feature_dims(module: nn.Module, fallback: Optional[int]) -> tuple[Optional[int], Optional[int]]:
    """``(in, out)`` features of a module, or ``(fallback, fallback)`` when it has no obvious ones."""
    if isinstance(module, nn.Linear):
        return module.in_features, module.out_features
    if is_conv1d(module):
        return module.nx, module.nf
    if isinstance(module, nn.LayerNorm):
        return module.normalized_shape[-1], module.normalized_shape[-1]
    w = getattr(module, "weight", None)
    if isinstance(w, torch.Tensor) and w.dim() == 1 and not list(module.children()):  # RMSNorm-like
        return w.shape[0], w.shape[0]
    return fallback, fallback


def accepts_bias(module: nn.Module) -> bool:
    return feature_dims(module, None)[1] is not None


def _factory(module: nn.Module) -> dict:
    p = next(module.parameters(), None)
    return {"device": p.device, "dtype": p.dtype} if p is not None else {}


def _split_output(out):
    """The hidden-states tensor of a module's output (a tensor, or a tuple whose first item is one)."""
    if isinstance(out, torch.Tensor):
        return out, None
    if isinstance(out, tuple) and out and isinstance(out[0], torch.Tensor):
        return out[0], out[1:]
    raise TypeError(f"a delta wrapper needs its module to return a tensor or a tuple starting with one, "
                    f"got {type(out).__name__}")


def _join_output(h, rest):
    return h if rest is None else (h, *rest)


# ----------------------------------------------------------------------------------------------
# wrapper modules


class Bottleneck(nn.Module):
    """``up(act(down(x)))``: ``down [m, d_in]`` small random, ``up [d_out, m]`` zeros."""

    def __init__(self, d_in: int, d_out: int, bottleneck: int, nonlinearity: str, generator=None, **kw):
        super().__init__()
        self.down = nn.Linear(d_in, bottleneck, **kw)
        self.act = _ACTIVATIONS[nonlinearity]()
        self.up = nn.Linear(bottleneck, d_out, **kw)
        with torch.no_grad():
            bound = 1.0 / math.sqrt(d_in)  # nn.Linear's own default range, drawn from `generator`
            self.down.weight.copy_(torch.empty(self.down.weight.shape).uniform_(-bound, bound, generator=generator))
            self.down.bias.zero_()
            self.up.weight.zero_()
            self.up.bias.zero_()

    def forward(self, x):
        return self.up(self.act(self.down(x)))


class SequentialAdapter(nn.Module):
    def __init__(self, base: nn.Module, dim: int, cfg: AdapterConfig, generator=None, context=None):
        super().__init__()
        self.base = base
        self.scale = float(cfg.scale)
        if cfg.kind in STRUCTURED_ADAPTERS:
            from .compacter import StructuredBottleneck

            shared = None
            if cfg.kind == "compacter" and cfg.rules == "shared" and context is not None:
                shared = context.get("rules")
            self.adapter = StructuredBottleneck(cfg.kind, dim, cfg.bottleneck_for(dim), _ACTIVATIONS[cfg.nonlinearity](),
                                                cfg, shared, generator, **_factory(base))
            if cfg.kind == "compacter" and cfg.rules == "shared" and context is not None and shared is None:
                context["rules"] = self.adapter.rules  # the first adapter owns the delta's rules
        else:
            self.adapter = Bottleneck(dim, dim, cfg.bottleneck, cfg.nonlinearity, generator, **_factory(base))

    def forward(self, *args, **kwargs):
        h, rest = _split_output(self.base(*args, **kwargs))
        return _join_output(h + self.scale * self.adapter(h), rest)


class ParallelAdapter(nn.Module):
    def __init__(self, base: nn.Module, d_in: int, d_out: int, cfg: AdapterConfig, generator=None):
        super().__init__()
        self.base = base
        self.scale = float(cfg.scale)
        self.adapter = Bottleneck(d_in, d_out, cfg.bottleneck, cfg.nonlinearity, generator, **_factory(base))

    def forward(self, *args, **kwargs):
        x = args[0] if args else kwargs.get("hidden_states")
        if not isinstance(x, torch.Tensor):
            raise TypeError("a parallel adapter needs the module's input as the first positional argument "
                            "or as hidden_states=")
        h, rest = _split_output(self.base(*args, **kwargs))
        return _join_output(h + self.scale * self.adapter(x), rest)


class BiasDelta(nn.Module):
    def __init__(self, base: nn.Module, dim: int):
        super().__init__()
        self.base = base
        self.bias = nn.Parameter(torch.zeros(dim, **_factory(base)))

    def forward(self, *args, **kwargs):
        h, rest = _split_output(self.base(*args, **kwargs))
        return _join_output(h + self.bias, rest)


def _linear_view_of_conv1d(conv: nn.Module) -> nn.Linear:
    """An ``nn.Linear`` sharing a Conv1D's storage: ``weight`` is ``conv.weight.t()`` (a view), the
    bias is the same Parameter. Built on the meta device so nothing is allocated."""
    lin = nn.Linear(conv.nx, conv.nf, bias=True, device="meta")
    lin.weight = nn.Parameter(conv.weight.data.t(), requires_grad=conv.weight.requires_grad)
    lin.bias = conv.bias
    return lin


def build_lora(module: nn.Module, cfg: LoRAConfig, r: Optional[int] = None, gated: Optional[bool] = None,
               generator=None) -> LoRALinear:
    """LoRA/SoRA wrapper of a linear or Conv1D module (``r`` / ``gated`` override the config,
    which ``load`` uses for pruned SoRA layers whose rank differs per module)."""
    restore = None
    if is_conv1d(module):
        restore, module = module, _linear_view_of_conv1d(module)
    wrapper = LoRALinear(module, r if r is not None else cfg.r, cfg.lora_alpha, cfg.dropout,
                         gated=(cfg.kind == "sora") if gated is None else gated, generator=generator)
    if restore is not None:
        # not a registered sub-module: the Conv1D's parameters are already in the tree via the view
        wrapper.__dict__["_lmfuse_restore"] = restore
    return wrapper


def restore_target(wrapper: nn.Module) -> nn.Module:
    """What to put back in the wrapper's place on detach: the very module it wrapped."""
    conv = wrapper.__dict__.get("_lmfuse_restore")
    if conv is None:
        return wrapper.base
    # the Linear view may have been moved (.to()) to new storage: point the Conv1D at it again
    conv.weight.data = wrapper.base.weight.data.t()
    return conv


def refresh_lora_base(wrapper: nn.Module) -> None:
    """Before re-attaching a Conv1D LoRA: make its Linear view see the Conv1D's current storage."""
    conv = wrapper.__dict__.get("_lmfuse_restore")
    if conv is not None:
        wrapper.base.weight.data = conv.weight.data.t()
        wrapper.base.bias = conv.bias


def build_wrapper(module: nn.Module, cfg: DeltaConfig, hidden_size: Optional[int], generator=None,
                  context: Optional[dict] = None) -> nn.Module:
    """The wrapper of ``cfg.kind`` around backbone ``module`` (``context``: a dict shared by the
    wrappers of one attach, for parameters several wrappers share)."""
    if cfg.kind in LORA_FAMILY:
        return build_lora(module, cfg, generator=generator)
    fallback = getattr(cfg, "dim", None) or hidden_size
    d_in, d_out = feature_dims(module, fallback)
    if cfg.kind == "bitfit":
        return BiasDelta(module, d_out)
    if d_in is None or d_out is None:
        raise ValueError(f"cannot infer the feature size of {type(module).__name__}; pass dim= in the config")
    if cfg.kind == "adapter" or cfg.kind in STRUCTURED_ADAPTERS:
        return SequentialAdapter(module, d_out, cfg, generator, context)
    if cfg.kind == "parallel_adapter":
        return ParallelAdapter(module, d_in, d_out, cfg, generator)
    raise ValueError(f"delta kind {cfg.kind!r} is not a module wrapper")
