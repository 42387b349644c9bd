"""Finding the benchmark modules and running a whole suite.

Benchmark modules live in ``benchmarks/bench_<op>.py``, installed as ``lmfuse.benchmarks``.
Each one exposes::

    OP = "<op>"                                   # optional; defaults to the module name minus "bench_"
    def cases(scale: str, device: torch.device) -> list[lmfuse.bench.Case]

where ``scale`` is ``"full"``, ``"quick"`` or ``"tiny"`` (the last for the test-suite: the
smallest shapes that still exercise every provider and mode). Adding a benchmark is adding such
a file; :func:`discover` finds it with ``pkgutil``.

From a source checkout that is not pip-installed (``PYTHONPATH=python``), ``lmfuse.benchmarks``
is not importable by name, so :func:`benchmarks_package` loads the repository's ``benchmarks/``
directory under that name.
"""

from __future__ import annotations

import importlib
import importlib.util
import json
import pkgutil
import sys
from dataclasses import dataclass, field
from pathlib import Path
from types import ModuleType
from typing import Sequence

from .harness import MODES, Measurement, describe_ceilings, run_case
from .plot import plot_op
from .report import RunInfo, format_table, run_info, to_rows, write_results
from .timing import Ceilings, TimingPolicy, measure_ceilings

SCALES = ("tiny", "quick", "full")
_PACKAGE = "lmfuse.benchmarks"


def benchmarks_package() -> ModuleType:
    """Import ``lmfuse.benchmarks``, falling back to the checkout's ``benchmarks/`` folder."""
    try:
        return importlib.import_module(_PACKAGE)
    except ModuleNotFoundError as e:
        if e.name not in (_PACKAGE, "lmfuse"):
            raise
    root = Path(__file__).resolve().parents[3] / "benchmarks"  # python/lmfuse/bench/ -> repo
    init = root / "__init__.py"
    if not init.is_file():
        raise ModuleNotFoundError(f"{_PACKAGE} is not installed and {root} has no __init__.py")
    spec = importlib.util.spec_from_file_location(_PACKAGE, init, submodule_search_locations=[str(root)])
    module = importlib.util.module_from_spec(spec)
    sys.modules[_PACKAGE] = module
    spec.loader.exec_module(module)
    return module


def discover() -> dict[str, str]:
    """``{op name: module name}`` for every ``bench_*`` module in ``lmfuse.benchmarks``."""
    pkg = benchmarks_package()
    found = {}
    for info in sorted(pkgutil.iter_modules(pkg.__path__), key=lambda i: i.name):
        if info.name.startswith("bench_"):
            found[info.name[len("bench_"):]] = f"{_PACKAGE}.{info.name}"
    return found


def load(module_name: str) -> tuple[str, ModuleType]:
    """Import one benchmark module; return its op name and the module."""
    benchmarks_package()
    mod = importlib.import_module(module_name)
    if not callable(getattr(mod, "cases", None)):
        raise TypeError(f"{module_name} has no cases(scale, device) function")
    return getattr(mod, "OP", module_name.rsplit(".", 1)[-1][len("bench_"):]), mod


@dataclass
class OpResult:
    """Everything one op's benchmark produced."""

    op: str
    measurements: list[Measurement] = field(default_factory=list)
    files: list[Path] = field(default_factory=list)
    error: str | None = None  # the module or its cases() failed outright

    @property
    def failed(self) -> list[Measurement]:
        return [m for m in self.measurements if m.status == "error"]


def run_op(op: str, module: ModuleType, device, scale: str, modes: Sequence[str], ceilings: Ceilings,
           info: RunInfo, out_dir: Path | None, plot: bool = True, progress: bool = True) -> OpResult:
    """Run every case of one benchmark module and write its CSV/JSON (+ PNG) to ``out_dir``."""
    from tqdm.auto import tqdm

    result = OpResult(op)
    try:
        cases = module.cases(scale, device)
    except Exception as e:
        result.error = f"cases() raised {type(e).__name__}: {e}"
        return result
    policy = TimingPolicy.for_scale(scale)
    for case in tqdm(cases, desc=op, unit="case", disable=not progress, leave=False):
        result.measurements += run_case(case, policy, modes)
    if out_dir is not None and result.measurements:
        rows = to_rows(result.measurements, ceilings, info)
        result.files += write_results(rows, out_dir, op, ceilings)
        if plot and any(m.status == "ok" for m in result.measurements):
            result.files.append(plot_op(result.measurements, out_dir / f"{op}.png", ceilings, title=info.device))
    return result


def run_suite(ops: Sequence[str] | None, device, scale: str = "full", modes: Sequence[str] = MODES,
              out_dir: Path | None = None, plot: bool = True, progress: bool = True,
              info: RunInfo | None = None, echo=print) -> list[OpResult]:
    """Measure the ceilings, then run the selected ops (all when ``ops`` is None).

    Unknown op names raise ``KeyError`` before anything runs. ``echo`` receives the ceilings
    line and each op's table as they finish.
    """
    if scale not in SCALES:
        raise ValueError(f"scale must be one of {SCALES}, got {scale!r}")
    bad_modes = [m for m in modes if m not in MODES]
    if bad_modes:
        raise ValueError(f"unknown mode(s) {bad_modes}; expected a subset of {MODES}")
    available = discover()
    selected = list(available) if not ops else list(ops)
    unknown = [o for o in selected if o not in available]
    if unknown:
        raise KeyError(f"no benchmark for {unknown}; available: {sorted(available)}")
    info = info or run_info(device)
    ceilings = measure_ceilings(device, scale)
    echo(f"device: {info.device}\n{describe_ceilings(ceilings)}")
    if out_dir is not None:
        out_dir.mkdir(parents=True, exist_ok=True)
        (out_dir / "ceilings.json").write_text(json.dumps({**ceilings.as_dict(), **info.__dict__}, indent=1))
    results = []
    for op in selected:
        try:
            name, module = load(available[op])
        except Exception as e:
            results.append(OpResult(op, error=f"import failed: {type(e).__name__}: {e}"))
            echo(f"== {op} ==\n  {results[-1].error}")
            continue
        res = run_op(name, module, device, scale, modes, ceilings, info, out_dir, plot, progress)
        results.append(res)
        echo(f"== {op} ==\n  {res.error}" if res.error else format_table(res.measurements, ceilings))
    return results
