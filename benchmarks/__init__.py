"""Benchmark modules, one per op: ``bench_<op>.py`` (installed as ``lmfuse.benchmarks``).

Each module defines ``cases(scale, device) -> list[lmfuse.bench.Case]`` (``scale`` is
``"full"``, ``"quick"`` or ``"tiny"``) and optionally ``OP = "<op>"``. ``lmfuse bench`` finds
every ``bench_*`` module here with ``pkgutil``; nothing else needs registering.
"""
