"""Fixtures shared by the op tests."""

from __future__ import annotations

import pytest

from lmfuse.ops import _common


@pytest.fixture(params=["native", "float32-blocks"])
def lowp_gemm(request, monkeypatch):
    """Run a bfloat16 / float16 test once with torch's own GEMMs of that dtype and once through the
    float32 blocks of :func:`lmfuse.ops._common.gemm` (what CPUs without native bf16 / fp16 dot
    products take), with blocks of 128 so that V ≈ 1000 spans several of them."""
    monkeypatch.setattr(_common, "LOWP_GEMM_IN_FLOAT32", request.param == "float32-blocks")
    monkeypatch.setattr(_common, "LOWP_BLOCK", 128)
    return request.param
