"""Finding the benchmark modules and running a whole suite.

Benchmark modules live in ``benchmarks/bench_<op>.py``, installed as ``lmfuse.benchmarks``.
Each one exposes::

    OP = "<op>"                                   # optional; defaults to the module name minus "bench_"
    def cases(scale: str, device: torch.device) -> list[lmfuse.bench.Case]

where ``scale`` is ``"full"``, ``"quick"`` or ``"tiny"`` (the last for the test-suite: the
smallest shapes that still exercise every provider and mode). Adding a benchmark is adding such
a file; :func:`discover` finds it with ``pkgutil``.

Headline cases and the time budget: a module marks the case(s) to measure first with
``Case(..., headline=True)``; when it marks none, its first case is the headline (so put the shape
that matters most first, or mark it). With ``budget_s`` (``lmfuse bench --budget SECONDS``) the
headline of every selected op runs before any op's other cases; no case starts once the budget
is spent, nor when an earlier case of the same op took longer than what is left; what was not run
is listed at the end and in ``budget.json``. Without a budget each op runs whole, headline first.
Every finished case is written at once (``<op>.csv`` / ``<op>.json`` rewritten whole, atomically,
and its table lines printed), so a run killed from outside still leaves every finished
measurement on disk.

Only one module's cases exist at a time (on CUDA their inputs count in the peak memory). With a
budget, a first pass calls each module's ``cases()``, runs the headline(s) and drops them, and a
second pass calls ``cases()`` again for the others: ``cases()`` must return the same cases in the
same order each time (build inputs from fixed seeds or fresh ``randn``, never from state it
changes).

A request that can measure nothing (no case on this device and scale, or none in the requested
modes, e.g. ``--modes bwd`` for an op that has no backward) raises ``ValueError`` when the op was
named explicitly (or when no op of a run of all has anything); otherwise the op is only reported.

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
import time
from dataclasses import dataclass, field
from pathlib import Path
from types import ModuleType
from typing import Sequence

from .harness import MODES, Case, Measurement, describe_ceilings, run_case
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
    skipped: list[str] = field(default_factory=list)  # cases not run (time budget), with the reason
    nothing: str | None = None  # why this op has nothing to measure for the request

    @property
    def failed(self) -> list[Measurement]:
        return [m for m in self.measurements if m.status == "error"]


def _modes_phrase(modes: Sequence[str]) -> str:
    return ",".join(modes)


def nothing_to_measure(op: str, cases: Sequence[Case], modes: Sequence[str], device, scale: str) -> str | None:
    """Why ``cases`` measure nothing in ``modes`` (a sentence), or None when some case does."""
    if not cases:
        return f"{op} has no case on {getattr(device, 'type', device)} at scale {scale!r}"
    offered = list(dict.fromkeys(m for c in cases for m in c.modes))
    if any(m in modes for m in offered):
        return None
    why = ""
    if "bwd" not in offered and "full" not in offered:
        why = f"{op} has no backward: it is not differentiable, so it is measured in fwd only; "
    return f"{why}{op} measures only {_modes_phrase(offered)}, and --modes {_modes_phrase(modes)} asks for none of them"


def split_headline(cases: Sequence[Case]) -> tuple[list[Case], list[Case]]:
    """(headline cases, the others) of one module: those with ``headline=True``, or the first."""
    marked = [c for c in cases if getattr(c, "headline", False)] or list(cases[:1])
    ids = {id(c) for c in marked}
    return marked, [c for c in cases if id(c) not in ids]


def order_cases(cases_by_op: dict[str, Sequence[Case]]) -> list[tuple[str, Case]]:
    """Every op's headline case(s) first (ops in the given order), then the other cases op by op
    (see :func:`split_headline`)."""
    heads, rest = [], []
    for op, cases in cases_by_op.items():
        h, r = split_headline(cases)
        heads += [(op, c) for c in h]
        rest += [(op, c) for c in r]
    return heads + rest


class Budget:
    """Wall-clock budget in seconds (None: unlimited), read from ``clock`` (``time.monotonic``)."""

    def __init__(self, seconds: float | None, clock=time.monotonic):
        if seconds is not None and not seconds > 0:
            raise ValueError(f"budget must be a positive number of seconds, got {seconds!r}")
        self.seconds, self.clock, self.start = seconds, clock, clock()

    def elapsed(self) -> float:
        return self.clock() - self.start

    def left(self) -> float:
        return float("inf") if self.seconds is None else self.seconds - self.elapsed()

    def refuses(self, estimate_s: float | None) -> str | None:
        """Why a step expected to take ``estimate_s`` (None: unknown) must not start, or None."""
        left = self.left()
        if left <= 0:
            return f"time budget of {self.seconds:g} s spent"
        if estimate_s is not None and estimate_s > left:
            return (f"time budget: {left:.0f} s left, an earlier case of this op took {estimate_s:.0f} s")
        return None


def _write_op(res: OpResult, out_dir: Path, ceilings: Ceilings, info: RunInfo) -> None:
    rows = to_rows(res.measurements, ceilings, info)
    for f in write_results(rows, out_dir, res.op, ceilings):
        if f not in res.files:
            res.files.append(f)


def _case_name(case: Case) -> str:
    return f"{case.shape} ({str(case.dtype).replace('torch.', '')})"


def run_cases(cases_by_op: dict[str, Sequence[Case]], modes: Sequence[str], ceilings, info: RunInfo,
              out_dir: Path | None, scale: str, plot: bool = True, progress: bool = True, echo=print,
              budget: Budget | None = None, results: dict[str, OpResult] | None = None,
              took: dict[str, float] | None = None) -> dict[str, OpResult]:
    """Run the cases headline-first (:func:`order_cases`), writing each op's files and printing
    each case's table lines as soon as the case is done; stop starting cases when ``budget``
    refuses. ``ceilings`` is a :class:`Ceilings` or a callable returning one (called once, just
    before the first case runs). ``took`` (op -> longest finished case, s) carries the estimates
    across calls. Returns ``{op: OpResult}`` (``skipped`` lists what the budget left out)."""
    from tqdm.auto import tqdm

    budget = budget or Budget(None)
    results = results if results is not None else {}
    took = took if took is not None else {}  # longest finished case per op: the estimate for its next one
    policy = TimingPolicy.for_scale(scale)
    for op, case in tqdm(order_cases(cases_by_op), desc="bench", unit="case", disable=not progress, leave=False):
        res = results.setdefault(op, OpResult(op))
        reason = budget.refuses(took.get(op))
        if reason:
            res.skipped.append(f"{_case_name(case)}: {reason}")
            continue
        if callable(ceilings):
            ceilings = ceilings()
        t0 = budget.clock()
        measured = run_case(case, policy, modes)
        took[op] = max(took.get(op, 0.0), budget.clock() - t0)
        res.measurements += measured
        if measured:
            if out_dir is not None:
                _write_op(res, out_dir, ceilings, info)
            echo(format_table(measured, ceilings))
    if out_dir is not None and plot:
        for res in results.values():
            if any(m.status == "ok" for m in res.measurements):
                res.files.append(plot_op(res.measurements, out_dir / f"{res.op}.png", ceilings, title=info.device))
    return results


def run_op(op: str, module: ModuleType, device, scale: str, modes: Sequence[str], ceilings: Ceilings,
           info: RunInfo, out_dir: Path | None, plot: bool = True, progress: bool = True,
           echo=lambda s: None) -> OpResult:
    """Run every case of one benchmark module and write its CSV/JSON (+ PNG) to ``out_dir``."""
    try:
        cases = module.cases(scale, device)
    except Exception as e:
        return OpResult(op, error=f"cases() raised {type(e).__name__}: {e}")
    return run_cases({op: cases}, modes, ceilings, info, out_dir, scale, plot, progress, echo)[op]


def run_suite(ops: Sequence[str] | None, device, scale: str = "full", modes: Sequence[str] = MODES,
              out_dir: Path | None = None, plot: bool = True, progress: bool = True,
              info: RunInfo | None = None, echo=print, budget_s: float | None = None,
              clock=time.monotonic) -> list[OpResult]:
    """Measure the ceilings, then run the selected ops (all when ``ops`` is None), within
    ``budget_s`` seconds when given (see the module docstring).

    Only one module's cases are alive at a time (their inputs count in CUDA peak memory). With no
    budget each op runs whole, its headline first. With a budget, pass 1 builds each op's cases,
    runs its headline(s) and drops them; pass 2 builds them again for the other cases.

    Unknown op names raise ``KeyError`` before anything runs. A request with nothing to measure in
    ``modes`` raises ``ValueError`` at the end (after the other ops ran, their files written):
    when an explicitly named op has nothing, or every op of a run of all has nothing (otherwise
    such an op is only reported). ``echo`` receives the ceilings line, each case's table as it finishes,
    and at the end what the budget skipped.
    """
    from .harness import _release

    if scale not in SCALES:
        raise ValueError(f"scale must be one of {SCALES}, got {scale!r}")
    bad_modes = [m for m in modes if m not in MODES]
    if bad_modes:
        raise ValueError(f"unknown mode(s) {bad_modes}; expected a subset of {MODES}")
    budget = Budget(budget_s, clock)
    available = discover()
    explicit = bool(ops)
    selected = list(available) if not ops else list(ops)
    unknown = [o for o in selected if o not in available]
    if unknown:
        raise KeyError(f"no benchmark for {unknown}; available: {sorted(available)}")
    info = info or run_info(device)
    measured_ceilings: list[Ceilings] = []

    def ceilings() -> Ceilings:
        if not measured_ceilings:
            c = measure_ceilings(device, scale)
            measured_ceilings.append(c)
            echo(f"device: {info.device}\n{describe_ceilings(c)}")
            if out_dir is not None:
                out_dir.mkdir(parents=True, exist_ok=True)
                (out_dir / "ceilings.json").write_text(json.dumps({**c.as_dict(), **info.__dict__}, indent=1))
        return measured_ceilings[0]

    results: dict[str, OpResult] = {}
    modules: dict[str, ModuleType] = {}
    took: dict[str, float] = {}
    rest_names: dict[str, list[str]] = {}  # op -> its non-headline cases, for pass 2

    def build(op: str) -> list[Case] | None:
        res = results[op]
        try:
            if op not in modules:
                name, modules[op] = load(available[op])
                res.op = name
            return list(modules[op].cases(scale, device))
        except Exception as e:
            what = "import failed" if op not in modules else "cases() raised"
            res.error = f"{what}: {type(e).__name__}: {e}"
            echo(f"== {op} ==\n  {res.error}")
            return None

    def run(op: str, cases: list[Case]) -> None:
        run_cases({op: cases}, modes, ceilings, info, out_dir, scale, plot=False, progress=progress, echo=echo,
                  budget=budget, results=results, took=took)

    def nothing(op: str, cases: list[Case]) -> bool:
        results[op].nothing = nothing_to_measure(results[op].op, cases, modes, device, scale)
        if results[op].nothing is None:
            return False
        if not explicit:
            echo(f"== {results[op].op} ==\n  not run: {results[op].nothing}")
        return True

    for op in selected:  # pass 1 (the only pass without a budget)
        res = results[op] = OpResult(op)
        reason = budget.refuses(None)
        if reason:
            res.skipped.append(f"all cases (cases() not called): {reason}")
            continue
        cases = build(op)
        if cases is None or nothing(op, cases):
            continue
        if budget.seconds is None:
            run(op, cases)
        else:
            heads, rest = split_headline(cases)
            rest_names[op] = [_case_name(c) for c in rest]
            del rest
            run(op, heads)
        del cases
        _release(device)
    for op, names in rest_names.items():  # pass 2: the other cases, budget permitting
        if not names:
            continue
        reason = budget.refuses(took.get(op))
        if reason:
            results[op].skipped += [f"{n}: {reason}" for n in names]
            continue
        cases = build(op)
        if cases is None:
            continue
        run(op, split_headline(cases)[1])
        del cases
        _release(device)
    if out_dir is not None and plot and measured_ceilings:
        for res in results.values():
            if any(m.status == "ok" for m in res.measurements):
                res.files.append(plot_op(res.measurements, out_dir / f"{res.op}.png", measured_ceilings[0],
                                         title=info.device))
    skipped = [(r.op, s) for r in results.values() for s in r.skipped]
    if budget.seconds is not None:
        echo(f"budget: {budget.elapsed():.0f} s of {budget.seconds:g} s used; "
             + (f"{len(skipped)} case(s) not run:" if skipped else "every case ran"))
        for op, s in skipped:
            echo(f"  skipped {op} {s}")
        if out_dir is not None:
            out_dir.mkdir(parents=True, exist_ok=True)
            (out_dir / "budget.json").write_text(json.dumps(
                {"budget_s": budget.seconds, "elapsed_s": round(budget.elapsed(), 3),
                 "skipped": [{"op": op, "case": s} for op, s in skipped]}, indent=1))
    empty = [r for r in results.values() if r.nothing]
    if empty and (explicit or len(empty) == len(results)):
        raise ValueError("nothing to measure: " + "; ".join(r.nothing for r in empty))
    return list(results.values())
