"""Small PROTEUS runs shared by the test modules of tests/proteus (each is computed once per
session, from the session's LMFUSE_TEST_SEED)."""

import functools

# a small cohort: fast enough for tests, large enough for the planted signals to be recovered
COHORT = dict(n_samples=60, n_proteins=600, n_pathways=60)


_SEED: list[int] = []


def session_seed() -> int:
    """The cohort seed of this session: from LMFUSE_TEST_SEED when set (every test then has the
    same seed), else from the seed of the first test that asks (printed if that test fails)."""
    import torch

    if not _SEED:
        _SEED.append(int(torch.initial_seed() % 100_000))
    return _SEED[0]


@functools.lru_cache(maxsize=None)
def planted(seed: int):
    """(cohort, RunResult, output folder) of a planted cohort run written to a temporary folder."""
    import atexit
    import shutil
    import tempfile

    from lmfuse.proteus.run import run
    from lmfuse.proteus.synth import make_cohort

    out = tempfile.mkdtemp(prefix="proteus-test-")
    atexit.register(shutil.rmtree, out, True)
    c = make_cohort(seed=seed, **COHORT)
    return c, run(c.dataset, gene_sets=c.gene_sets, seed=seed, truth=c.truth, out=out), out


@functools.lru_cache(maxsize=None)
def null(seed: int):
    from lmfuse.proteus.run import run
    from lmfuse.proteus.synth import make_null_cohort

    c = make_null_cohort(seed=seed, **COHORT)
    return c, run(c.dataset, gene_sets=c.gene_sets, seed=seed, truth=c.truth)
