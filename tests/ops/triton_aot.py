"""Ahead-of-time compilation of every shipped Triton kernel config for real GPU targets.

Run as a script (in a process *without* TRITON_INTERPRET, so ``@triton.jit`` gives real JIT
functions); prints one JSON line per (kernel, config, dtype, arch) with the outcome and the
shared memory / register use reported by the compiler. ``test_triton_compile.py`` drives it.
No GPU is needed: Triton compiles for a ``GPUTarget`` on any machine.
"""

from __future__ import annotations

import json
import os
import sys
from concurrent.futures import ProcessPoolExecutor

os.environ.pop("TRITON_INTERPRET", None)

DTYPES = {"fp16": "*fp16", "bf16": "*bf16", "fp32": "*fp32"}
ARCHS = (80, 90)
# int args passed as i32 (what Triton specialises small ints to) — sizes, strides, split counts
INT = "i32"


def _jobs():
    from lmfuse.triton_kernels import low_rank_linear as lrl
    from lmfuse.triton_kernels import lpa_qkv as qkv

    specs = [
        # (module, kernel name, pointer args, int args, extra constexprs, configs)
        (lrl, "_low_rank_linear_fwd_kernel", ["x_ptr", "a_ptr", "b_ptr", "bias_ptr", "y_ptr", "h_ptr"],
         {"HAS_BIAS": True, "WRITE_H": True}, lrl.CONFIGS),
        (lrl, "_low_rank_linear_bwd_kernel", ["dy_ptr", "a_ptr", "b_ptr", "dx_ptr", "dh_ptr"], {}, lrl.CONFIGS),
        (qkv, "_lpa_qkv_up_fwd_kernel", ["h_ptr", "b_ptr", "bias_ptr", "y_ptr"], {"HAS_BIAS": True}, qkv.CONFIGS),
        (qkv, "_lpa_qkv_bwd_kernel", ["dy_ptr", "b_ptr", "dh_ptr"], {}, qkv.CONFIGS),
    ]
    import torch

    torch_dtypes = {"fp16": torch.float16, "bf16": torch.bfloat16, "fp32": torch.float32}
    for mod, name, ptrs, extra, configs in specs:
        for block_r in configs:
            for dname in DTYPES:
                cfg = mod.config_for(block_r, torch_dtypes[dname])
                cfg = {k: v for k, v in cfg.items() if k != "BLOCK_R"}
                for arch in ARCHS:
                    yield mod.__name__, name, ptrs, extra, block_r, cfg, dname, arch


def _compile(job):
    import importlib

    import triton
    from triton.backends.compiler import GPUTarget
    from triton.compiler import ASTSource

    modname, name, ptrs, extra, block_r, cfg, dname, arch = job
    fn = getattr(importlib.import_module(modname), name)
    meta = {k: v for k, v in cfg.items() if k not in ("num_warps", "num_stages")}
    constexprs = dict(meta, BLOCK_R=block_r, PRECISION="ieee" if dname == "fp32" else "ieee", **extra)
    signature = {}
    for arg in fn.arg_names:
        if arg in constexprs:
            signature[arg] = "constexpr"
        elif arg in ptrs:
            signature[arg] = DTYPES[dname]
        else:
            signature[arg] = INT
    rec = {"kernel": name, "block_r": block_r, "dtype": dname, "arch": f"sm_{arch}", **cfg}
    try:
        k = triton.compile(ASTSource(fn=fn, signature=signature, constexprs=constexprs),
                           target=GPUTarget("cuda", arch, 32),
                           options={"num_warps": cfg["num_warps"], "num_stages": cfg["num_stages"]})
        rec.update(ok=True, shared=int(k.metadata.shared), n_regs=getattr(k, "n_regs", None),
                   n_spills=getattr(k, "n_spills", None), ptx_bytes=len(k.asm.get("ptx", "")))
    except Exception as e:  # report, don't hide: the test fails on any of these
        rec.update(ok=False, error=f"{type(e).__name__}: {str(e)[:2000]}")
    return rec


def main() -> int:
    jobs = list(_jobs())
    workers = int(os.environ.get("LMFUSE_AOT_JOBS", os.cpu_count() or 1))
    with ProcessPoolExecutor(max_workers=workers) as ex:
        for rec in ex.map(_compile, jobs):
            print(json.dumps(rec), flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
