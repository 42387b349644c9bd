"""Benchmark: the four attention projections (q, k, v, o) of an LPA layer.

Every projection is ``d -> d`` through rank ``r``: ``y = (x @ Aᵀ) @ Bᵀ + b``. The workload is
one attention block's projections, forward and backward, with gradients for the inputs and
every weight and bias. ``x`` feeds q/k/v; a second input ``h`` (the attention output) feeds o.

Providers (what a user would otherwise run is the baseline, ``lpa-separate-linear``):

``lpa-fused``                    ``lmfuse.ops.lpa_qkv_projection`` (x read once, the three down
                                 projections one GEMM) + ``lmfuse.ops.low_rank_linear`` for o,
                                 on the backends lmfuse picks for the device
``lpa-cpp``                      four ``lmfuse.ops.low_rank_linear`` calls (q, k, v, o) forced onto
                                 the CPU extension with ``use_backend("cpp")`` (CPU only)
``reference``                    ``lmfuse.ops.*_reference``: plain PyTorch (CPU only)
``lpa-separate-linear``          each projection as ``nn.Linear(d, r, bias=False)`` then ``nn.Linear(r, d)``
``lpa-separate-linear+compile``  ``torch.compile`` of the above (CUDA only; compiled during set-up)
``dense-linear``                 four ``nn.Linear(d, d)``: the full-rank layer LPA replaces

GPU shapes: d=4096, r in {128, 256}, tokens in {2048, 8192, 16384}, bf16. CPU shapes are small
and fp32 so the suite runs in minutes on a laptop. Inputs are fresh ``randn`` made once per
case and never rotated; each row's note says whether they fit in the last-level cache.

Flops/bytes: ``lmfuse.ops.lpa_qkv_projection_cost`` (x read once) plus
``lmfuse.ops.low_rank_linear_cost`` for o — the least traffic any provider could need.
``dense-linear`` uses the dense formulas below.
"""

from __future__ import annotations

import itertools

import torch
from torch import nn

import lmfuse.ops as ops
from lmfuse.bench import Case, Provider, ProviderUnavailable, Workload, forced_backend_workload
from lmfuse.bench.harness import working_set_note

OP = "low_rank_linear"


def _need(name: str):
    fn = getattr(ops, name, None)
    if fn is None:
        raise ProviderUnavailable(f"lmfuse.ops.{name} is not available")
    return fn


def block_cost(T: int, d: int, r: int, dtype_bytes: int, mode: str) -> tuple[float, float]:
    """(flops, bytes) of q/k/v/o low-rank projections: the op formulas, x read once for q/k/v."""
    qkv = _need("lpa_qkv_projection_cost")(T, d, r, (d, d, d), dtype_bytes, mode)
    o = _need("low_rank_linear_cost")(T, d, r, d, dtype_bytes, mode)
    return qkv[0] + o[0], qkv[1] + o[1]


def dense_cost(T: int, d: int, dtype_bytes: int, mode: str) -> tuple[float, float]:
    """(flops, bytes) of four dense ``d -> d`` linears (biases ignored: O(d) each).

    fwd reads x, W and writes y; bwd reads dy, x, W and writes dx, dW."""
    fwd = (2 * T * d * d, dtype_bytes * (2 * T * d + d * d))
    bwd = (4 * T * d * d, dtype_bytes * (3 * T * d + 2 * d * d))
    one = {"fwd": fwd, "bwd": bwd, "full": (fwd[0] + bwd[0], fwd[1] + bwd[1])}[mode]
    return 4 * one[0], 4 * one[1]


def _param(*shape, scale: float, device, dtype) -> torch.Tensor:
    return (torch.randn(*shape, device=device, dtype=dtype) * scale).requires_grad_()


def _lpa_weights(d: int, r: int, device, dtype):
    """Down [r, d], up [d, r] and bias [d] for q, k, v, o (scaled so bf16 stays tame)."""
    downs = [_param(r, d, scale=d ** -0.5, device=device, dtype=dtype) for _ in range(4)]
    ups = [_param(d, r, scale=r ** -0.5, device=device, dtype=dtype) for _ in range(4)]
    biases = [_param(d, scale=0.1, device=device, dtype=dtype) for _ in range(4)]
    return downs, ups, biases


def _functional(qkv_name: str | None, lrl_name: str, x, h, d, r, backend: str | None = None) -> Workload:
    """q/k/v through one ``lpa_qkv_projection`` (or, with ``qkv_name=None``, three
    ``low_rank_linear`` calls), o through ``low_rank_linear``."""
    lrl = _need(lrl_name)
    if qkv_name is not None:
        qkv = _need(qkv_name)
    else:
        def qkv(x_, downs_, ups_, biases_):
            return tuple(lrl(x_, a, b, c) for a, b, c in zip(downs_, ups_, biases_))
    downs, ups, biases = _lpa_weights(d, r, x.device, x.dtype)

    def forward():
        q, k, v = qkv(x, tuple(downs[:3]), tuple(ups[:3]), tuple(biases[:3]))
        return q, k, v, lrl(h, downs[3], ups[3], biases[3])

    return forced_backend_workload(forward, [x, h, *downs, *ups, *biases], backend)


def _modules_workload(layers: list[nn.Module], x, h, fn=None) -> Workload:
    q, k, v, o = layers
    fn = fn or (lambda x_, h_: (q(x_), k(x_), v(x_), o(h_)))
    params = [p for layer in layers for p in layer.parameters()]
    return Workload(lambda: fn(x, h), [x, h, *params])


def _separate(d, r, device, dtype) -> list[nn.Module]:
    return [nn.Sequential(nn.Linear(d, r, bias=False), nn.Linear(r, d)).to(device, dtype) for _ in range(4)]


def _compiled(x, h, d, r) -> Workload:
    layers = _separate(d, r, x.device, x.dtype)
    q, k, v, o = layers
    try:
        torch._dynamo.reset()  # each case compiles afresh instead of piling up recompiles
        fn = torch.compile(lambda x_, h_: (q(x_), k(x_), v(x_), o(h_)), dynamic=False)
        outs = fn(x, h)  # compile now, outside the timed region (forward and backward)
        torch.autograd.grad(outs, [x], [torch.ones_like(t) for t in outs])
    except Exception as e:
        raise ProviderUnavailable(f"torch.compile failed: {type(e).__name__}: {str(e)[:200]}") from e
    return _modules_workload(layers, x, h, fn)


def _shapes(scale: str, device: torch.device) -> list[tuple[int, int, int, torch.dtype]]:
    """(tokens, d, r, dtype) for this scale and device."""
    if scale == "tiny":
        return [(64, 128, 16, torch.float32)]
    if device.type == "cuda":
        tokens = (2048, 8192) if scale == "quick" else (2048, 8192, 16384)
        ranks = (128,) if scale == "quick" else (128, 256)
        return [(t, 4096, r, torch.bfloat16) for r, t in itertools.product(ranks, tokens)]
    f32 = torch.float32
    if scale == "quick":
        # one bf16 point: PyTorch's CPU bf16 GEMM is slow here and the cpp kernel is not
        return [(t, d, r, f32) for t, d, r in itertools.product((256, 1024), (512, 1024), (32, 64))] \
            + [(512, 1024, 64, torch.bfloat16)]
    # Full CPU run: about 6 minutes on 2 cores; d=2048 only at 512 tokens to stay there.
    shapes = list(itertools.product((512, 2048), (1024,), (64, 128))) + [(512, 2048, 64), (512, 2048, 128)]
    return [(t, d, r, f32) for t, d, r in shapes] + [(1024, 1024, 64, torch.bfloat16)]


def cases(scale: str, device: torch.device) -> list[Case]:
    """One case per (tokens, d, r); providers depend on the device (see the module docstring)."""
    on_gpu = device.type == "cuda"
    out = []
    for T, d, r, dtype in _shapes(scale, device):
        nb = torch.finfo(dtype).bits // 8
        # Inputs are made once per case and shared by every provider; weights per provider.
        x = torch.randn(T, d, device=device, dtype=dtype, requires_grad=True)
        h = torch.randn(T, d, device=device, dtype=dtype, requires_grad=True)

        sep = Provider("lpa-separate-linear", lambda x=x, h=h, d=d, r=r, dtype=dtype: _modules_workload(
            _separate(d, r, device, dtype), x, h))
        dense = Provider("dense-linear", lambda x=x, h=h, d=d, dtype=dtype: _modules_workload(
            [nn.Linear(d, d).to(device, dtype) for _ in range(4)], x, h),
            cost=lambda mode, T=T, d=d, nb=nb: dense_cost(T, d, nb, mode))
        fused = Provider("lpa-fused", lambda x=x, h=h, d=d, r=r: _functional(
            "lpa_qkv_projection", "low_rank_linear", x, h, d, r))
        if on_gpu:
            compiled = Provider("lpa-separate-linear+compile", lambda x=x, h=h, d=d, r=r: _compiled(x, h, d, r))
            providers = [fused, sep, compiled, dense]
        else:
            reference = Provider("reference", lambda x=x, h=h, d=d, r=r: _functional(
                "lpa_qkv_projection_reference", "low_rank_linear_reference", x, h, d, r))
            forced_cpp = Provider("lpa-cpp", lambda x=x, h=h, d=d, r=r: _functional(
                None, "low_rank_linear", x, h, d, r, backend="cpp"))
            providers = [reference, fused, forced_cpp, sep, dense]
        working_set = nb * (2 * T * d + 4 * (2 * r * d + d))
        out.append(Case(
            OP, f"T={T},d={d},r={r}", dtype, device, providers,
            cost=lambda mode, T=T, d=d, r=r, nb=nb: block_cost(T, d, r, nb, mode),
            baseline="lpa-separate-linear", target="lpa-fused",
            note=working_set_note(working_set, device),
        ))
    return out
