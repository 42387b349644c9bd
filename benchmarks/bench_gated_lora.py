"""Benchmark: one ``d_in → d_out`` linear layer with a (gated) LoRA term, base weight frozen.

Gradients flow to ``x`` and the LoRA tensors (``lora_A``, ``lora_B``, gate), never to the frozen
base weight — the fine-tuning workload.

Providers (the baseline a user would otherwise run is ``peft-lora``):

``sora-fused``      ``lmfuse.modules.LoRALinear(gated=True)`` → ``lmfuse.ops.gated_lora_linear``
``lora-fused``      the same without gate (``lmfuse.ops.lora_linear``)
``sora-pruned``     a gated layer with half its gates zeroed, after ``compact()``: rank r/2
``sora-merged``     a gated layer after ``merge()``: the base layer alone (x gradient only)
``peft-lora``       ``peft``'s LoRA layer (``get_peft_model`` on the linear), same r and alpha, on
                    every device (PEFT's defaults: in bf16 it keeps the adapter in fp32)
``sora-eager``      SoRA's formula in plain PyTorch, as the paper's code writes it
``base-linear``     the frozen ``nn.Linear`` alone: the floor (x gradient only)

GPU shapes: tokens ∈ {2048, 8192}, d = 4096 → 4096, r ∈ {8, 16, 64}, bf16. CPU shapes are
SmolLM2-135M's projections: 2048 tokens, d = 576 → 576 (attention) and 576 → 1536 (MLP up),
r ∈ {8, 16, 64}, fp32 and bf16 (quick: r ∈ {8, 64}, fp32 576 → 1536 and bf16 576 → 576).
The headline case is the first (GPU: T = 2048, r = 16; CPU: 576 → 1536, r = 16, fp32). Inputs are
made once per case and never rotated; the note says whether they fit in the last-level cache.
Flops/bytes: ``lmfuse.ops.gated_lora_linear_cost`` (frozen base); ``base-linear`` and
``sora-merged`` use the dense formula below.
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


def dense_cost(T: int, d: int, dtype_bytes: int, mode: str, d_out: int | None = None) -> tuple[float, float]:
    """(flops, bytes) of a frozen ``d → d_out`` linear (``d_out`` defaults to ``d``): fwd reads x,
    W, writes y; bwd reads dy, W, writes dx."""
    n = d if d_out is None else d_out
    fwd = (2 * T * d * n, dtype_bytes * (T * d + T * n + n * d))
    bwd = (2 * T * d * n, dtype_bytes * (T * n + T * d + n * d))
    return {"fwd": fwd, "bwd": bwd, "full": (fwd[0] + bwd[0], fwd[1] + bwd[1])}[mode]


def _frozen_base(d: int, device, dtype, d_out: int | None = None) -> nn.Linear:
    base = nn.Linear(d, d if d_out is None else d_out, bias=False).to(device, dtype)
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


def _shapes(scale: str, device: torch.device) -> list[tuple[int, int, int, int, torch.dtype]]:
    """(tokens, d_in, d_out, rank, dtype), the headline first."""
    if scale == "tiny":
        return [(64, 128, 128, 8, torch.float32)]
    if device.type == "cuda":
        ranks = (16,) if scale == "quick" else (16, 8, 64)
        return [(t, 4096, 4096, r, torch.bfloat16) for r, t in itertools.product(ranks, (2048, 8192))]
    if scale == "quick":
        return [(2048, 576, 1536, 8, torch.float32), (2048, 576, 1536, 64, torch.float32),
                (2048, 576, 576, 8, torch.bfloat16), (2048, 576, 576, 64, torch.bfloat16)]
    out = [(2048, 576, 1536, 16, torch.float32)]
    for dtype, (d_in, d_out), r in itertools.product((torch.float32, torch.bfloat16), ((576, 576), (576, 1536)),
                                                     (8, 16, 64)):
        if (2048, d_in, d_out, r, dtype) not in out:
            out.append((2048, d_in, d_out, r, dtype))
    return out


def cases(scale: str, device: torch.device) -> list[Case]:
    out = []
    for T, d, d_out, r, dtype in _shapes(scale, device):
        nb = torch.finfo(dtype).bits // 8
        x = torch.randn(T, d, device=device, dtype=dtype, requires_grad=True)
        base = _frozen_base(d, device, dtype, d_out)
        dense = lambda mode, T=T, d=d, n=d_out, nb=nb: dense_cost(T, d, nb, mode, n)  # noqa: E731
        mk = lambda fn, base=base, x=x, r=r: (lambda: fn(base, x, r))  # noqa: E731
        providers = [
            Provider("sora-fused", mk(_sora)),
            Provider("lora-fused", mk(_lora)),
            Provider("sora-pruned", mk(_pruned),
                     cost=lambda mode, T=T, d=d, n=d_out, r=r, nb=nb:
                     ops.gated_lora_linear_cost(T, d, max(1, r - r // 2), n, nb, mode)),
            Provider("sora-merged", mk(_merged), cost=dense),
            Provider("peft-lora", mk(_peft)),
            Provider("sora-eager", mk(_eager)),
            Provider("base-linear", mk(_base), cost=dense),
        ]
        working_set = nb * (T * d + T * d_out + d_out * d + r * (d + d_out))
        shape = f"T={T},d={d}" if d == d_out else f"T={T},d={d}->{d_out}"
        out.append(Case(OP, f"{shape},r={r}", dtype, device, providers,
                        cost=lambda mode, T=T, d=d, n=d_out, r=r, nb=nb: ops.gated_lora_linear_cost(T, d, r, n, nb, mode),
                        baseline="peft-lora", target="lora-fused", note=working_set_note(working_set, device),
                        headline=not out))
    return out
