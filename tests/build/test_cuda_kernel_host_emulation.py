"""Run the CUDA low-rank kernels' device code on the host, with real barriers, against torch.

The CUDA kernels cannot run on machines without a GPU, and compiling them (test_nvcc_compile)
proves nothing about indexing. Here csrc/kernels/low_rank_linear.cuh is compiled by the host
C++ compiler (C++20) against small stand-ins for the CUDA headers: every thread of a block is a
std::thread, __syncthreads() is a std::barrier, blocks run one after another sharing one
"shared memory" array, and __half / __nv_bfloat16 are 16-bit types with round-to-nearest-even
conversions. So tile bounds, strides, zero padding and barrier placement are exercised for
real, on shapes that are not multiples of any tile size. What it cannot show: GPU-only issues
(bank conflicts, occupancy, the launch itself, memory-model subtleties beyond the barriers).
"""

from __future__ import annotations

import ctypes

import pytest
import torch

from lmfuse.testing import assert_close_to_reference, rel_error

from .host_emulation import compile_emulator


STUB_FP16 = r"""
#pragma once
#include <cstdint>
#include <cstring>
struct __half { uint16_t bits; };
inline float __half2float(__half h) { _Float16 f; std::memcpy(&f, &h.bits, 2); return (float)f; }
inline __half __float2half_rn(float v) { _Float16 f = (_Float16)v; __half h; std::memcpy(&h.bits, &f, 2); return h; }
"""
STUB_BF16 = r"""
#pragma once
#include <cmath>
#include <cstdint>
#include <cstring>
struct __nv_bfloat16 { uint16_t bits; };
inline float __bfloat162float(__nv_bfloat16 b) { uint32_t u = uint32_t(b.bits) << 16; float f; std::memcpy(&f, &u, 4); return f; }
inline __nv_bfloat16 __float2bfloat16_rn(float f) {
  uint32_t u; std::memcpy(&u, &f, 4);
  __nv_bfloat16 b;
  if (std::isnan(f)) { b.bits = 0x7fc0; return b; }
  u += 0x7fffu + ((u >> 16) & 1u);  // round to nearest even
  b.bits = uint16_t(u >> 16);
  return b;
}
"""
STUB_RUNTIME = r"""
#pragma once
#include <barrier>
#define __global__
#define __device__
#define __host__
#define __shared__
#define __forceinline__ inline
#define __launch_bounds__(n)
struct EmuDim3 { unsigned x = 0, y = 0, z = 0; };
inline thread_local EmuDim3 threadIdx, blockIdx;
inline std::barrier<>* emu_block_barrier = nullptr;
inline void __syncthreads() { emu_block_barrier->arrive_and_wait(); }
"""
HARNESS = r"""
#include "kernels/low_rank_linear.cuh"
#include <thread>
#include <vector>

namespace lmfuse { namespace cuda { float smem[1 << 16]; } }  // one block at a time
using namespace lmfuse::cuda;

template <typename T, bool kColMajor>
static void run(const void* a, long M, long K1, const void* b1, long ld1, long R, const void* b2,
                long ld2, long N2, const void* bias, void* out, void* mid) {
  static_assert(sizeof(float) * (1 << 16) >= lrl_smem_bytes(kMaxRank), "emulated smem too small");
  for (long blk = 0; blk * kBlockM < M; ++blk) {
    std::barrier<> bar(kLrlThreads);
    emu_block_barrier = &bar;
    std::vector<std::thread> threads;
    for (int t = 0; t < kLrlThreads; ++t) {
      threads.emplace_back([&, t] {
        threadIdx.x = t; blockIdx.x = unsigned(blk);
        low_rank_chain_kernel<T, kColMajor>((const T*)a, M, K1, (const T*)b1, ld1, R,
            (const T*)b2, ld2, N2, (const T*)bias, (T*)out, (T*)mid);
      });
    }
    for (auto& th : threads) th.join();
  }
}

template <bool kColMajor>
static void run_dtype(int dtype, const void* a, long M, long K1, const void* b1, long ld1, long R,
                      const void* b2, long ld2, long N2, const void* bias, void* out, void* mid) {
  if (dtype == 0) run<float, kColMajor>(a, M, K1, b1, ld1, R, b2, ld2, N2, bias, out, mid);
  if (dtype == 1) run<__nv_bfloat16, kColMajor>(a, M, K1, b1, ld1, R, b2, ld2, N2, bias, out, mid);
  if (dtype == 2) run<__half, kColMajor>(a, M, K1, b1, ld1, R, b2, ld2, N2, bias, out, mid);
}

// Same argument mapping as csrc/low_rank_linear.cu.
extern "C" void emu_fwd(int dtype, const void* x, const void* down, const void* up,
                        const void* bias, void* y, void* h, long M, long K, long R, long N) {
  run_dtype<true>(dtype, x, M, K, down, K, R, up, R, N, bias, y, h);
}
extern "C" void emu_bwd_dx(int dtype, const void* dy, const void* down, const void* up, void* dx,
                           void* dh, long M, long K, long R, long N) {
  run_dtype<false>(dtype, dy, M, N, up, R, R, down, K, K, nullptr, dx, dh);
}
"""

DTYPE_CODE = {torch.float32: 0, torch.bfloat16: 1, torch.float16: 2}


@pytest.fixture(scope="module")
def emu(tmp_path_factory):
    files = {"cuda_fp16.h": STUB_FP16, "cuda_bf16.h": STUB_BF16, "cuda_runtime.h": STUB_RUNTIME,
             "harness.cpp": HARNESS}
    return compile_emulator(tmp_path_factory.mktemp("cuda_emu"), files, "libemu.so")


def _ptr(t):
    return ctypes.c_void_p(t.data_ptr() if t is not None and t.numel() else None)


def _nan(shape, dtype):
    return torch.full(shape, float("nan"), dtype=dtype)  # poisoned: every element must be written


SHAPES = [(37, 45, 7, 29), (33, 16, 64, 64), (5, 70, 130, 3)]  # R=130: three column groups


@pytest.mark.parametrize("dtype", list(DTYPE_CODE), ids=str)
@pytest.mark.parametrize("shape", SHAPES, ids=lambda s: "x".join(map(str, s)))
def test_emulated_cuda_fwd(emu, shape, dtype):
    M, K, R, N = shape
    x = torch.randn(M, K).to(dtype)
    down = (torch.randn(R, K) / K**0.5).to(dtype)
    up = (torch.randn(N, R) / R**0.5).to(dtype)
    bias = torch.randn(N).to(dtype)
    y, h = _nan((M, N), dtype), _nan((M, R), dtype)
    L = ctypes.c_long
    emu.emu_fwd(DTYPE_CODE[dtype], _ptr(x), _ptr(down), _ptr(up), _ptr(bias), _ptr(y), _ptr(h),
                L(M), L(K), L(R), L(N))
    h_ref = x.double() @ down.double().T
    assert_close_to_reference(h, h_ref, dtype, "h")
    assert_close_to_reference(y, h_ref @ up.double().T + bias.double(), dtype, "y")
    bound = torch.finfo(dtype).eps + R * torch.finfo(torch.float32).eps / 2
    assert rel_error(y, h.double() @ up.double().T + bias.double()) <= bound


@pytest.mark.parametrize("dtype", list(DTYPE_CODE), ids=str)
@pytest.mark.parametrize("shape", SHAPES, ids=lambda s: "x".join(map(str, s)))
def test_emulated_cuda_bwd_dx(emu, shape, dtype):
    M, K, R, N = shape
    down = (torch.randn(R, K) / K**0.5).to(dtype)
    up = (torch.randn(N, R) / R**0.5).to(dtype)
    dy = torch.randn(M, N).to(dtype)
    dx, dh = _nan((M, K), dtype), _nan((M, R), dtype)
    L = ctypes.c_long
    emu.emu_bwd_dx(DTYPE_CODE[dtype], _ptr(dy), _ptr(down), _ptr(up), _ptr(dx), _ptr(dh),
                   L(M), L(K), L(R), L(N))
    dh_ref = dy.double() @ up.double()
    assert_close_to_reference(dh, dh_ref, dtype, "dh")
    assert_close_to_reference(dx, dh_ref @ down.double(), dtype, "dx")


def test_emulated_cuda_fwd_without_h_or_bias(emu):
    M, K, R, N = 40, 20, 9, 70
    x, down, up = torch.randn(M, K), torch.randn(R, K) / 5, torch.randn(N, R) / 3
    y = _nan((M, N), torch.float32)
    L = ctypes.c_long
    emu.emu_fwd(0, _ptr(x), _ptr(down), _ptr(up), None, _ptr(y), None, L(M), L(K), L(R), L(N))
    assert_close_to_reference(y, (x.double() @ down.double().T) @ up.double().T, torch.float32)
