"""Test configuration.

Without CUDA, Triton kernels run under the interpreter: TRITON_INTERPRET must be set before the
first ``@triton.jit`` decorator runs, which is why it happens here, before lmfuse (and its
lazily imported Triton kernel modules) are imported by any test.
"""

import os

import pytest


def _cuda_present() -> bool:
    try:
        import torch
    except ImportError:
        return False
    return torch.version.cuda is not None and torch.cuda.is_available()


HAS_CUDA = _cuda_present()
if not HAS_CUDA:
    os.environ.setdefault("TRITON_INTERPRET", "1")


def pytest_collection_modifyitems(config, items):
    if HAS_CUDA:
        return
    skip = pytest.mark.skip(reason="needs a CUDA device")
    for item in items:
        if "gpu" in item.keywords:
            item.add_marker(skip)


@pytest.fixture
def device():
    import torch

    return torch.device("cuda" if HAS_CUDA else "cpu")


@pytest.fixture(autouse=True)
def _fresh_seed(request):
    """Fresh random inputs on every run; the seed is printed on failure to reproduce it."""
    import random

    import torch

    seed = int(os.environ.get("LMFUSE_TEST_SEED", random.SystemRandom().randrange(2**31)))
    torch.manual_seed(seed)
    request.node.user_properties.append(("seed", seed))
    yield


def pytest_runtest_makereport(item, call):
    if call.when == "call" and call.excinfo is not None:
        for k, v in item.user_properties:
            if k == "seed":
                item.add_report_section("call", "seed", f"LMFUSE_TEST_SEED={v}")
