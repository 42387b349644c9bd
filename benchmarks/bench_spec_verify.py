"""Benchmark: ``spec_verify`` (speculative verification of k drafted tokens per request).

Providers:

``lmfuse``       ``lmfuse.ops.spec_verify`` on the backend lmfuse picks (cuda > triton on GPU, cpp on CPU)
``lmfuse-<b>``   the same op forced onto backend ``<b>`` (``triton``/``cuda`` on GPU, ``cpp`` on CPU)
``reference``    ``lmfuse.ops.spec_verify`` forced onto the PyTorch reference: softmaxes of every
                 position materialised in fp32, which is what a plain PyTorch sampler does (the
                 baseline)
``reference+compile``  ``torch.compile`` of that reference (CUDA only)

Inputs: target logits ``randn·2`` and draft logits = target + noise, drafts = the draft argmax,
so most drafts are accepted (the realistic, expensive case: every position is read). Temperature
1, no filtering. Shapes: CPU ``B=8, k=5, V=49152`` (the issue's CPU target: cpp ≥ 3× reference)
in fp32 and bf16; GPU ``B ∈ {1, 8, 64}``, ``k ∈ {4, 8}``, ``V ∈ {32000, 151936}``, bf16 (targets:
≥ 85 % of HBM bandwidth with bytes = logits read once, ≥ 3× reference, transient memory < 1 % of
``B·(k+1)·V`` fp32). The bytes formula is ``lmfuse.ops.spec_verify_cost`` (every logit once).
"""

from __future__ import annotations

import itertools

import torch

import lmfuse.ops as ops
from lmfuse.bench import Case, Provider, ProviderUnavailable, Workload, forced_backend_workload
from lmfuse.bench.harness import working_set_note

OP = "spec_verify"


def _inputs(B, k, V, dtype, device):
    g = torch.Generator(device=device).manual_seed(0)
    target = torch.randn(B, k + 1, V, device=device, generator=g) * 2
    draft = target[:, :k] + 0.3 * torch.randn(B, k, V, device=device, generator=g)
    ids = draft.argmax(-1)
    return ids, draft.to(dtype), target.to(dtype)


def _workload(ids, draft, target, backend=None, compiled=False) -> Workload:
    gen = torch.Generator(device=target.device).manual_seed(1)
    fn = ops.spec_verify
    if compiled:
        try:
            torch._dynamo.reset()
            fn = torch.compile(ops.spec_verify_reference, dynamic=False)
        except Exception as e:
            raise ProviderUnavailable(f"torch.compile failed: {e}") from e
        B, k = ids.shape
        n = torch.full((B,), k, device=ids.device, dtype=torch.int64)
        u = torch.rand(B, k, device=ids.device)
        seeds = torch.randint(0, 2**32, (B, 2), device=ids.device)
        fn(ids, draft, target, n, u, seeds, 1.0)  # compile outside the timed region
        return Workload(lambda: fn(ids, draft, target, n, u, seeds, 1.0))

    def forward():
        return fn(ids, draft, target, temperature=1.0, generator=gen).tokens

    return forced_backend_workload(forward, (), backend)


def _shapes(scale: str, device: torch.device):
    if scale == "tiny":
        return [(2, 2, 1000, torch.float32)]
    if device.type == "cuda":
        Bs = (1, 64) if scale == "quick" else (1, 8, 64)
        return [(B, k, V, torch.bfloat16) for B, k, V in itertools.product(Bs, (4, 8), (32000, 151936))]
    return [(8, 5, 49152, torch.float32), (8, 5, 49152, torch.bfloat16)]


def cases(scale: str, device: torch.device) -> list[Case]:
    out = []
    for B, k, V, dtype in _shapes(scale, device):
        ids, draft, target = _inputs(B, k, V, dtype, device)
        nb = torch.finfo(dtype).bits // 8
        provs = [Provider("lmfuse", lambda a=(ids, draft, target): _workload(*a)),
                 Provider("reference", lambda a=(ids, draft, target): _workload(*a, backend="reference"))]
        if device.type == "cuda":
            provs += [Provider("lmfuse-triton", lambda a=(ids, draft, target): _workload(*a, backend="triton")),
                      Provider("lmfuse-cuda", lambda a=(ids, draft, target): _workload(*a, backend="cuda")),
                      Provider("reference+compile", lambda a=(ids, draft, target): _workload(*a, compiled=True))]
        else:
            provs.append(Provider("lmfuse-cpp", lambda a=(ids, draft, target): _workload(*a, backend="cpp")))
        out.append(Case(OP, f"B={B},k={k},V={V}", dtype, device, provs,
                        cost=lambda mode, B=B, k=k, V=V, nb=nb: ops.spec_verify_cost(B, k, V, nb),
                        baseline="reference", target="lmfuse", modes=("fwd",),
                        note=working_set_note(nb * B * (2 * k + 1) * V, device)))
    return out
