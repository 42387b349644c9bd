"""Benchmark: one ``d × d`` linear layer with a (gated) LoRA term, base weight frozen.

Gradients flow to ``x`` and the LoRA tensors (``lora_A``, ``lora_B``, gate), never to the frozen
base weight — the fine-tuning workload.

Providers (the baseline a user would otherwise run is ``peft-lora``):

``sora-fused``      ``lmfuse.modules.LoRALinear(gated=True)`` → ``lmfuse.ops.gated_lora_linear``
``lora-fused``      the same without gate (``lmfuse.ops.lora_linear``)
``sora-pruned``     a gated layer with half its gates zeroed, after ``compact()``: rank r/2
``sora-merged``     a gated layer after ``merge()``: the base layer alone (x gradient only)
``peft-lora``       ``peft``'s LoRA layer (``get_peft_model`` on the linear), same r and alpha
``sora-eager``      SoRA's formula in plain PyTorch, as the paper's code writes it
``base-linear``     the frozen ``nn.Linear`` alone: the floor (x gradient only)

GPU shapes (the issue's): tokens ∈ {2048, 8192}, d = 4096, r ∈ {8, 16, 64}, bf16. CPU shapes are
small and fp32. Inputs are made once per case and never rotated; the note says whether they fit
in the last-level cache. Flops/bytes: ``lmfuse.ops.gated_lora_linear_cost`` (frozen base);
``base-linear`` and ``sora-merged`` use the dense formula below.
"""

from __future__ import annotations

import copy
import itertools

import torch
from torch import nn

import lmfuse.ops as ops
from lmfuse.bench import Case, Provider, ProviderUnavailable, Workload
from lmfuse.bench.harness import working_set_note
from lmfuse.modules import LoRALinear

OP = "gated_lora"


def dense_cost(T: int, d: int, dtype_bytes: int, mode: str) -> tuple[float, float]:
    """(flops, bytes) of a frozen ``d → d`` linear: fwd reads x, W, writes y; bwd reads dy, W, writes dx."""
    fwd = (2 * T * d * d, dtype_bytes * (2 * T * d + d * d))
    bwd = (2 * T * d * d, dtype_bytes * (2 * T * d + d * d))
    return {"fwd": fwd, "bwd": bwd, "full": (fwd[0] + bwd[0], fwd[1] + bwd[1])}[mode]


def _frozen_base(d: int, device, dtype) -> nn.Linear:
    base = nn.Linear(d, d, bias=False).to(device, dtype)
    base.weight.requires_grad_(False)
    return base


def _trained_lora(base: nn.Linear, r: int, gated: bool) -> LoRALinear:
    m = LoRALinear(base, r, lora_alpha=2.0 * r, gated=gated)
    with torch.no_grad():  # a trained-looking B (a fresh one is zeros: never time zeros)
        m.lora_B.normal_(0.0, r ** -0.5)
    return m


def _module_work(m: nn.Module, x: torch.Tensor) -> Workload:
    params = [p for p in m.parameters() if p.requires_grad]
    return Workload(lambda: m(x), [x, *params])


def _sora(base, x, r):
    return _module_work(_trained_lora(base, r, gated=True), x)


def _lora(base, x, r):
    return _module_work(_trained_lora(base, r, gated=False), x)


def _pruned(base, x, r):
    m = _trained_lora(base, r, gated=True)
    with torch.no_grad():
        m.gate[: r // 2] = 0.0
    return _module_work(m.compact(), x)


def _merged(base, x, r):
    m = _trained_lora(copy.deepcopy(base), r, gated=True)
    m.merge()
    return Workload(lambda: m(x), [x])  # merged: the LoRA tensors are out of the graph


def _peft(base, x, r):
    try:
        import peft
    except ImportError as e:
        raise ProviderUnavailable(f"peft not importable: {e}") from e

    class One(nn.Module):
        def __init__(self):
            super().__init__()
            self.proj = copy.deepcopy(base)

        def forward(self, t):
            return self.proj(t)

    pm = peft.get_peft_model(One(), peft.LoraConfig(r=r, lora_alpha=2 * r, target_modules=["proj"]))
    with torch.no_grad():
        pm.base_model.model.proj.lora_B["default"].weight.normal_(0.0, r ** -0.5)
    return _module_work(pm, x)


def _eager(base, x, r):
    m = _trained_lora(base, r, gated=True)
    w = base.weight

    def forward():
        return x @ w.t() + ((x @ m.lora_A.t()) * m.gate @ m.lora_B.t()) * m.scaling
    return Workload(forward, [x, m.lora_A, m.lora_B, m.gate])


def _base(base, x, r):
    return _module_work(base, x)


def _shapes(scale: str, device: torch.device) -> list[tuple[int, int, int]]:
    if scale == "tiny":
        return [(64, 128, 8)]
    if device.type == "cuda":
        ranks = (16,) if scale == "quick" else (8, 16, 64)
        return [(t, 4096, r) for r, t in itertools.product(ranks, (2048, 8192))]
    if scale == "quick":
        return list(itertools.product((256,), (512,), (8, 64)))
    return list(itertools.product((512, 2048), (1024,), (8, 16, 64)))


def cases(scale: str, device: torch.device) -> list[Case]:
    on_gpu = device.type == "cuda"
    dtype = torch.bfloat16 if on_gpu else torch.float32
    nb = torch.finfo(dtype).bits // 8
    out = []
    for T, d, r in _shapes(scale, device):
        x = torch.randn(T, d, device=device, dtype=dtype, requires_grad=True)
        base = _frozen_base(d, device, dtype)
        dense = lambda mode, T=T, d=d: dense_cost(T, d, nb, mode)  # noqa: E731
        mk = lambda fn, base=base, x=x, r=r: (lambda: fn(base, x, r))  # noqa: E731
        providers = [
            Provider("sora-fused", mk(_sora)),
            Provider("lora-fused", mk(_lora)),
            Provider("sora-pruned", mk(_pruned),
                     cost=lambda mode, T=T, d=d, r=r: ops.gated_lora_linear_cost(T, d, max(1, r - r // 2), d, nb, mode)),
            Provider("sora-merged", mk(_merged), cost=dense),
            Provider("peft-lora", mk(_peft)),
            Provider("sora-eager", mk(_eager)),
            Provider("base-linear", mk(_base), cost=dense),
        ]
        working_set = nb * (2 * T * d + d * d + 2 * r * d)
        out.append(Case(OP, f"T={T},d={d},r={r}", dtype, device, providers,
                        cost=lambda mode, T=T, d=d, r=r: ops.gated_lora_linear_cost(T, d, r, d, nb, mode),
                        baseline="peft-lora", target="sora-fused", note=working_set_note(working_set, device)))
    return out
