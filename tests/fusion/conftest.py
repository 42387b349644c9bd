"""Fixtures of the fusion tests."""

import pytest
import torch


@pytest.fixture(autouse=True, scope="module")
def one_thread():
    """Tiny models run far faster on one thread than on two contended ones (measured here: a
    2-layer, 32-wide Llama step takes ~10 ms on one thread, ~300 ms on two under load)."""
    n = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(n)
