"""Compile CUDA kernel headers for the host, to run their device code on the CPU.

A test supplies stub CUDA headers (the few intrinsics and types its kernels use) and a C++
harness that launches every CUDA thread as a ``std::thread`` with real barriers for
``__syncthreads``; this compiles them with the host compiler into a shared library loaded with
ctypes. It checks indexing, padding and barrier placement, not GPU timing or memory models.
"""

from __future__ import annotations

import ctypes
import shutil
import subprocess
from pathlib import Path

import pytest

CSRC = Path(__file__).resolve().parents[2] / "csrc"


def compile_emulator(tmp_dir: Path, files: dict[str, str], lib_name: str) -> ctypes.CDLL:
    """Write ``files`` (stub headers + ``harness.cpp``) into ``tmp_dir``, build, load."""
    cxx = shutil.which("g++") or shutil.which("c++")
    if cxx is None:
        pytest.skip("no host C++ compiler")
    for name, text in files.items():
        (tmp_dir / name).write_text(text)
    lib = tmp_dir / lib_name
    cmd = [cxx, "-std=c++20", "-O1", "-shared", "-fPIC", "-pthread", "-Wno-unknown-pragmas",
           "-I", str(tmp_dir), "-I", str(CSRC), str(tmp_dir / "harness.cpp"), "-o", str(lib)]
    proc = subprocess.run(cmd, capture_output=True, text=True, timeout=300)
    if proc.returncode != 0 and ("barrier" in proc.stderr or "_Float16" in proc.stderr):
        pytest.skip(f"host compiler lacks C++20 <barrier> or _Float16:\n{proc.stderr[-2000:]}")
    assert proc.returncode == 0, f"emulation harness failed to compile:\n{proc.stderr[-6000:]}"
    return ctypes.CDLL(str(lib))
