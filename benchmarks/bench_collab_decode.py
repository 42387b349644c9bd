"""Benchmark: ``collab_decode_step`` (one collaborative decoding step: combine, sample, statistics).

Providers: ``lmfuse`` (``lmfuse.ops.collab_decode_step`` on the backend lmfuse picks: the fused
Triton kernel on GPU, the ``cpp`` kernel on CPU), ``reference`` (the op forced onto its PyTorch
reference, which materialises the combined logits and their softmax), ``lmfuse-triton`` /
``lmfuse-cpp`` (the kernel forced), ``eager`` (the same computation written as a user would in
PyTorch: log-softmaxes, plausibility mask, softmax, multinomial, entropy/top-2 of the small
model; argmax for the greedy rows; for the sampled rows it draws with ``torch.multinomial`` and
does no top-p, so it does less work than the op) and, on CUDA, ``eager+compile`` (``torch.compile`` of it).

Shapes: GPU ``B ∈ {1, 8, 64}``, ``V ∈ {32000, 151936}``, bf16, contrastive mode, temperature 1
with top-p 0.9 (the filter threshold is computed on the host side of the op, shared by every
backend: a C++ selection on the CPU, a sort of the combined logits elsewhere); CPU ``B=8, V=49152`` fp32, the same step, plus
the greedy step (no threshold) where the kernel alone is timed. Bytes: both logit tensors read
once.
"""

from __future__ import annotations

import itertools

import torch

import lmfuse.ops as ops
from lmfuse.bench import Case, Provider, ProviderUnavailable, Workload, forced_backend_workload
from lmfuse.bench.harness import working_set_note

OP = "collab_decode_step"


def eager_step(small, large, alpha=0.1, greedy=False):
    """What a user writes without lmfuse (contrastive decoding + FS-GEN statistics)."""
    lp_l = torch.log_softmax(large.float(), -1)
    lp_s = torch.log_softmax(small.float(), -1)
    score = torch.where(lp_l >= lp_l.amax(-1, keepdim=True) + torch.log(torch.tensor(alpha)), lp_l - lp_s,
                        float("-inf"))
    tokens = score.argmax(-1) if greedy else torch.multinomial(torch.softmax(score, -1), 1).squeeze(-1)
    p_s = lp_s.exp()
    ent = -(p_s * torch.nan_to_num(lp_s, neginf=0.0)).sum(-1)
    top = torch.topk(p_s, 2, -1).values
    return tokens, ent, top[:, 0], top[:, 0] - top[:, 1], tokens != small.argmax(-1)


def _shapes(scale, device):
    if scale == "tiny":
        return [(2, 1000, torch.float32)]
    if device.type == "cuda":
        return [(B, V, torch.bfloat16) for B, V in itertools.product((1, 8, 64), (32000, 151936))]
    return [(8, 49152, torch.float32)]


def _compiled(small, large):
    try:
        torch._dynamo.reset()
        fn = torch.compile(eager_step, dynamic=False)
        fn(small, large)
    except Exception as e:
        raise ProviderUnavailable(f"torch.compile failed: {e}") from e
    return Workload(lambda: fn(small, large)[0])


def _ours(small, large, backend=None, **sampling) -> Workload:
    gen = torch.Generator(device=small.device).manual_seed(1)

    def forward():
        return ops.collab_decode_step(small, large, mode="contrastive", generator=gen, **sampling).tokens

    return forced_backend_workload(forward, (), backend)


def cases(scale: str, device: torch.device) -> list[Case]:
    out = []
    for B, V, dtype in _shapes(scale, device):
        small = (torch.randn(B, V, device=device) * 2).to(dtype)
        large = (torch.randn(B, V, device=device) * 2).to(dtype)
        nb = torch.finfo(dtype).bits // 8
        kernel = "triton" if device.type == "cuda" else "cpp"
        for label, smp in (("top_p=0.9", dict(temperature=1.0, top_p=0.9)), ("greedy", dict())):
            if label == "greedy" and device.type == "cuda":
                continue  # GPU rows keep the configuration only
            provs = [Provider("lmfuse", lambda s=small, l=large, k=smp: _ours(s, l, **k)),
                     Provider("reference", lambda s=small, l=large, k=smp: _ours(s, l, "reference", **k)),
                     Provider(f"lmfuse-{kernel}", lambda s=small, l=large, k=smp, b=kernel: _ours(s, l, b, **k))]
            provs.append(Provider("eager", lambda s=small, l=large, gr=label == "greedy": Workload(
                lambda: eager_step(s, l, greedy=gr)[0])))
            if device.type == "cuda":
                provs.append(Provider("eager+compile", lambda s=small, l=large: _compiled(s, l)))
            out.append(Case(OP, f"B={B},V={V},contrastive,{label}", dtype, device, provs,
                            cost=lambda mode, B=B, V=V, nb=nb: (10 * B * V, 2 * nb * B * V),
                            baseline="eager", target="lmfuse",
                            modes=("fwd",), note=working_set_note(2 * nb * B * V, device)))
    return out
