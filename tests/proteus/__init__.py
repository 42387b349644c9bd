"""Tests of lmfuse.proteus."""

import numpy as np
import torch

PLASMA = "/work/shared/data/plasma-proteomics"


def test_rng() -> tuple[np.random.Generator, int]:
    """A numpy generator seeded from the per-test torch seed (LMFUSE_TEST_SEED)."""
    seed = int(torch.randint(0, 2**31 - 1, (1,)).item())
    return np.random.default_rng(seed), seed


test_rng.__test__ = False
