"""``lmfuse.ops._common.gemm``: bfloat16 / float16 GEMMs through float32 blocks on CPUs without
native dot products of that dtype. Each output element must be the float64 result rounded once to
the dtype (float32 accumulation can move it across a rounding boundary only when the exact value
lies within ~1e-6 relative of one), for every blocking regime, bias and accumulation."""

from __future__ import annotations

import pytest
import torch

from lmfuse.ops import _common
from lmfuse.ops._common import gemm, lowp_gemm_in_float32

# (M, K, N): the long dimension contracted, along the output columns, along the output rows
SHAPES = [(5, 40, 6), (5, 9, 40), (40, 9, 5), (13, 13, 13)]


@pytest.fixture
def blocks(monkeypatch):
    monkeypatch.setattr(_common, "LOWP_GEMM_IN_FLOAT32", True)
    monkeypatch.setattr(_common, "LOWP_BLOCK", 7)


def _operands(M, K, N, dtype, g):
    a = torch.randn(M, 2 * K, generator=g).to(dtype)[:, ::2]  # non-contiguous
    b = torch.randn(N, K, generator=g).to(dtype).t()  # transposed view, as wᵀ
    return a, b


def _check_rounded_once(out, exact64, dtype):
    want = exact64.to(dtype)
    assert out.dtype == dtype
    same = out == want
    # a mismatch is only allowed as the neighbour of the correct rounding, and must be rare
    ulp = (want.float().abs() * torch.finfo(dtype).eps).clamp_min(torch.finfo(dtype).tiny)
    assert bool(((out.float() - want.float()).abs() <= ulp * 1.01).all())
    assert int((~same).sum()) <= max(1, out.numel() // 200), int((~same).sum())


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
@pytest.mark.parametrize("M,K,N", SHAPES)
@pytest.mark.parametrize("mode", ["plain", "bias", "add", "out"])
def test_float32_blocks_round_once(blocks, dtype, M, K, N, mode):
    g = torch.Generator().manual_seed(M * 1000 + K * 10 + N)
    a, b = _operands(M, K, N, dtype, g)
    exact = a.double() @ b.double()
    kw = {}
    out = None
    if mode == "bias":
        kw["bias"] = torch.randn(N, generator=g).to(dtype)
        exact = exact + kw["bias"].double()
    if mode in ("add", "out"):
        out = torch.randn(M, N, generator=g).to(dtype)
    if mode == "add":
        exact = exact + out.double()
        kw["add"] = True
    res = gemm(a, b, out, **kw)
    if out is not None:
        assert res is out
    _check_rounded_once(res, exact, dtype)


@pytest.mark.parametrize("M,K,N", SHAPES)
def test_strided_output_block(blocks, M, K, N):
    """Writing into the first rows of a wider workspace leaves the rest untouched."""
    g = torch.Generator().manual_seed(7)
    a, b = _operands(M, K, N, torch.bfloat16, g)
    ws = torch.full((M + 3, N), 5.0, dtype=torch.bfloat16)
    gemm(a, b, ws[:M])
    _check_rounded_once(ws[:M], a.double() @ b.double(), torch.bfloat16)
    assert bool((ws[M:] == 5.0).all())


def test_native_path_is_torch(monkeypatch):
    monkeypatch.setattr(_common, "LOWP_GEMM_IN_FLOAT32", False)
    g = torch.Generator().manual_seed(3)
    a, b = _operands(6, 11, 9, torch.bfloat16, g)
    bias = torch.randn(9, generator=g).to(torch.bfloat16)
    assert torch.equal(gemm(a, b), torch.mm(a, b))
    assert torch.equal(gemm(a, b, bias=bias), torch.addmm(bias, a, b))
    c = torch.randn(6, 9, generator=g).to(torch.bfloat16)
    assert torch.equal(gemm(a, b, c.clone(), add=True), c.clone().addmm_(a, b))


def test_float32_is_never_blocked(blocks):
    a, b = torch.randn(5, 40), torch.randn(40, 6)
    assert not lowp_gemm_in_float32(a)
    assert torch.equal(gemm(a, b), torch.mm(a, b))


@pytest.mark.parametrize("flags, bf16, fp16", [
    ("fpu sse2 avx avx2 fma", True, True),  # AVX2 only: both emulated
    ("avx2 fma avx512f avx512bw", True, True),  # AVX-512 without BF16 / FP16
    ("avx2 fma avx512f avx512_bf16", False, True),  # Zen 4, Cooper Lake
    ("avx2 fma avx512f avx512_bf16 avx512_fp16 amx_bf16 amx_tile", False, False),  # Sapphire Rapids
])
def test_rule_follows_the_cpu_flags(monkeypatch, flags, bf16, fp16):
    monkeypatch.setattr(_common, "cpu_flags", lambda: ("x86", frozenset(flags.split())))
    assert lowp_gemm_in_float32(torch.empty(1, dtype=torch.bfloat16)) is bf16
    assert lowp_gemm_in_float32(torch.empty(1, dtype=torch.float16)) is fp16
    assert not lowp_gemm_in_float32(torch.empty(1))


@pytest.mark.parametrize("found", [None, ("arm", frozenset({"asimd", "fp"}))])
def test_no_x86_flags_keeps_torch(monkeypatch, found):
    monkeypatch.setattr(_common, "cpu_flags", lambda: found)  # unreadable, or an Arm CPU
    assert not lowp_gemm_in_float32(torch.empty(1, dtype=torch.bfloat16))


def test_cpu_flags_parser():
    from lmfuse._backend import cpu_flags

    text = "processor\t: 0\nvmx flags\t: ept\nflags\t\t: fpu avx2 fma\nbugs\t\t: spectre\n"
    assert cpu_flags(text) == ("x86", frozenset({"fpu", "avx2", "fma"}))
    assert cpu_flags("processor\t: 0\nFeatures\t: fp asimd\n") == ("arm", frozenset({"fp", "asimd"}))
    assert cpu_flags("model name\t: x\n") is None
