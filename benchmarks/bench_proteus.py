"""Benchmark: PROTEUS end to end (rule planner, no LLM): plan, preprocess, analyse, gate, verify
and report, on the CPU.

Cases (``op`` = ``proteus``, one provider ``rules``, forward mode only: the "forward" is the whole
run and returns the number of hypotheses as a tensor):

``plasma``       the real 48-sample plasma cohort (``../shared/data/plasma-proteomics``; skipped
                 when absent), quick and full scales — the headline
``synthetic``    a generated cohort with planted truth: tiny 24 x 150 (the tests), quick
                 300 samples x 3,000 proteins, full 1,000 samples x 10,000 proteins

Peak memory: the harness measures none on the CPU, so ``python benchmarks/bench_proteus.py
--scale quick --out DIR`` runs each case once in this process and writes
``proteus_runs.json``: wall time, the ``tracemalloc`` peak (numpy allocations included) and the
process's peak resident set.
"""

from __future__ import annotations

import argparse
import json
import os
import resource
import time
import tracemalloc
from pathlib import Path

import torch

from lmfuse.bench import Case, Provider, ProviderUnavailable, Workload

OP = "proteus"
PLASMA = Path(__file__).resolve().parents[2] / "shared" / "data" / "plasma-proteomics"
SYNTH = {"tiny": (24, 150, 20), "quick": (300, 3000, 200), "full": (1000, 10000, 500)}


def _plasma_job():
    if not (PLASMA / "proteinGroups.txt").is_file():
        raise ProviderUnavailable(f"plasma data not found at {PLASMA}")
    from lmfuse.proteus.data import load

    ds = load(PLASMA / "proteinGroups.txt", PLASMA / "metadata.xlsx")
    return ds, None


def _synth_job(n, p, sets):
    from lmfuse.proteus.synth import make_cohort

    c = make_cohort(seed=0, n_samples=n, n_proteins=p, n_pathways=sets)
    return c.dataset, c.gene_sets


def _run(ds, gene_sets, subsamples: int = 10):
    from lmfuse.proteus.run import run

    return run(ds, gene_sets=gene_sets, seed=0, robustness_subsamples=subsamples)


def _workload(job, subsamples: int) -> Workload:
    ds, sets = job()

    def forward():
        res = _run(ds, sets, subsamples)
        return torch.tensor(float(len(res.hypotheses)))
    return Workload(forward)


def _jobs(scale: str):
    n, p, s = SYNTH[scale]
    out = []
    if scale != "tiny":
        out.append(("plasma", "48 samples x 2,611 protein groups (MaxQuant)", _plasma_job))
    out.append(("synthetic", f"{n} samples x {p} proteins", lambda: _synth_job(n, p, s)))
    return out


def cases(scale: str, device: torch.device) -> list[Case]:
    if device.type != "cpu":
        return []  # a CPU analysis pipeline: nothing runs on the accelerator
    sub = 3 if scale == "tiny" else 10  # tiny (the tests): fewer robustness re-tests
    return [Case(OP, shape, torch.float64, device, [Provider("rules", lambda j=job: _workload(j, sub))],
                 target="rules", modes=("fwd",), headline=(i == 0),
                 note=f"{name}: whole run, rule planner, no LLM; forward returns the hypothesis count")
            for i, (name, shape, job) in enumerate(_jobs(scale))]


def measure(scale: str) -> list[dict]:
    """Each case once: wall time, tracemalloc peak and peak RSS (MiB)."""
    rows = []
    for name, shape, job in _jobs(scale):
        try:
            ds, sets = job()
        except ProviderUnavailable as e:
            rows.append({"case": name, "shape": shape, "skipped": str(e)})
            continue
        tracemalloc.start()
        t0 = time.perf_counter()
        res = _run(ds, sets)
        wall = time.perf_counter() - t0
        peak = tracemalloc.get_traced_memory()[1]
        tracemalloc.stop()
        rows.append({"case": name, "shape": shape, "wall_s": round(wall, 2), "tracemalloc_peak_mib": round(peak / 2**20, 1),
                     "max_rss_mib": round(resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024, 1),
                     "steps": len(res.findings["steps"]), "hypotheses": len(res.hypotheses),
                     "load_average": os.getloadavg()[0]})
        print(json.dumps(rows[-1]), flush=True)
    return rows


if __name__ == "__main__":
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--scale", choices=sorted(SYNTH), default="quick")
    ap.add_argument("--out", type=Path, required=True)
    a = ap.parse_args()
    a.out.mkdir(parents=True, exist_ok=True)
    (a.out / "proteus_runs.json").write_text(json.dumps(measure(a.scale), indent=1) + "\n")
