"""Shared pieces of the op tests."""

import contextlib

import pytest

from lmfuse.ops import available_backends


def backend_params(names):
    """pytest params for ``names``; unavailable backends are skipped with the reason why."""
    status = available_backends()
    return [pytest.param(n, id=n, marks=pytest.mark.skipif(not status[n].available, reason=status[n].reason))
            for n in names]


@contextlib.contextmanager
def poisoned_outputs():
    """Triton launchers fill their outputs with NaN first, so unwritten elements show."""
    from lmfuse.triton_kernels import _common

    prev, _common.POISON_OUTPUTS = _common.POISON_OUTPUTS, True
    try:
        yield
    finally:
        _common.POISON_OUTPUTS = prev
