"""Ahead-of-time compilation of every shipped Triton kernel config for real GPU targets.

Run as a script (in a process *without* TRITON_INTERPRET, so ``@triton.jit`` gives real JIT
functions). It imports every module of ``lmfuse.triton_kernels`` that defines ``aot_jobs()``
and compiles each job for sm_80 and sm_90, printing one JSON line per compile with the outcome
and the shared memory the compiler reports. ``test_triton_compile.py`` drives it. No GPU is
needed: Triton compiles for a ``GPUTarget`` on any machine.
"""

from __future__ import annotations

import importlib
import json
import os
import pkgutil
import sys
from concurrent.futures import ProcessPoolExecutor

os.environ.pop("TRITON_INTERPRET", None)

ARCHS = (80, 90)


def kernel_modules():
    import lmfuse.triton_kernels as pkg

    mods = []
    for info in pkgutil.iter_modules(pkg.__path__):
        if info.name.startswith("_"):
            continue
        mod = importlib.import_module(f"{pkg.__name__}.{info.name}")
        if hasattr(mod, "aot_jobs"):
            mods.append(mod)
    return mods


def jobs():
    for mod in kernel_modules():
        for job in mod.aot_jobs():
            for arch in ARCHS:
                yield dict(job, module=mod.__name__, arch=arch)


def compile_job(job):
    import triton
    from triton.backends.compiler import GPUTarget
    from triton.compiler import ASTSource

    fn = getattr(importlib.import_module(job["module"]), job["kernel"])
    rec = {"module": job["module"], "kernel": job["kernel"], "label": job["label"], "arch": f"sm_{job['arch']}",
           "num_warps": job["num_warps"], "num_stages": job["num_stages"]}
    try:
        k = triton.compile(ASTSource(fn=fn, signature=job["signature"], constexprs=job["constexprs"]),
                           target=GPUTarget("cuda", job["arch"], 32),
                           options={"num_warps": job["num_warps"], "num_stages": job["num_stages"]})
        rec.update(ok=True, shared=int(k.metadata.shared), ptx_bytes=len(k.asm.get("ptx", "")))
    except Exception as e:  # reported, never hidden: the test fails on any of these
        rec.update(ok=False, error=f"{type(e).__name__}: {str(e)[:2000]}")
    return rec


def main() -> int:
    all_jobs = list(jobs())
    workers = int(os.environ.get("LMFUSE_AOT_JOBS", os.cpu_count() or 1))
    with ProcessPoolExecutor(max_workers=workers) as ex:
        for rec in ex.map(compile_job, all_jobs):
            print(json.dumps(rec), flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
