"""Run the CUDA spec_verify kernel's device code on the host, one std::thread per CUDA thread.

csrc/kernels/spec_verify.cuh cannot run here (no GPU), and nvcc compiling it proves nothing about
its indexing, reductions or barrier placement. So, like test_cuda_kernel_host_emulation.py does
for the low-rank kernels, the header is compiled by the host C++ compiler (C++20) against small
stand-ins for the CUDA headers: each of the 256 threads of a block is a std::thread,
__syncthreads() is a std::barrier, __shfl_xor_sync exchanges values through an array between two
barriers (valid because the kernel only shuffles in block-uniform code), __shared__ variables
are function statics (blocks run one after another), and __half / __nv_bfloat16 are 16-bit types
with round-to-nearest-even conversions. The emulated kernel must return exactly the tokens of
the reference backend for the same explicit noise. It cannot show GPU-only issues (occupancy,
the launch itself, memory-model subtleties beyond the barriers).
"""

from __future__ import annotations

import ctypes

import pytest
import torch

from lmfuse.ops import _sampling
from lmfuse.ops.spec_verify import reference

from .host_emulation import compile_emulator


STUBS = {
    "cuda_fp16.h": r"""
#pragma once
#include <cstdint>
#include <cstring>
struct __half { uint16_t bits; };
inline float __half2float(__half h) { _Float16 f; std::memcpy(&f, &h.bits, 2); return (float)f; }
""",
    "cuda_bf16.h": r"""
#pragma once
#include <cstdint>
#include <cstring>
struct __nv_bfloat16 { uint16_t bits; };
inline float __bfloat162float(__nv_bfloat16 b) { uint32_t u = uint32_t(b.bits) << 16; float f; std::memcpy(&f, &u, 4); return f; }
""",
    "cuda_runtime.h": r"""
#pragma once
#include <barrier>
#include <cmath>
#include <cstdint>
#include <cstring>
#define __global__
#define __device__
#define __host__
#define __shared__ static
#define __forceinline__ inline
#define __launch_bounds__(n)
struct alignas(16) uint4 { unsigned x, y, z, w; };
struct EmuDim3 { unsigned x = 0, y = 0, z = 0; };
inline thread_local EmuDim3 threadIdx, blockIdx;
inline std::barrier<>* emu_block_barrier = nullptr;
inline int64_t emu_lanes[1024];
inline void __syncthreads() { emu_block_barrier->arrive_and_wait(); }
template <typename V>
inline V __shfl_xor_sync(unsigned, V v, int lane_mask) {
  static_assert(sizeof(V) <= 8, "shuffle of a type wider than 8 bytes");
  int64_t bits = 0;
  std::memcpy(&bits, &v, sizeof(V));
  emu_lanes[threadIdx.x] = bits;
  __syncthreads();
  bits = emu_lanes[threadIdx.x ^ unsigned(lane_mask)];
  __syncthreads();
  std::memcpy(&v, &bits, sizeof(V));
  return v;
}
""",
}

HARNESS = r"""
#include "kernels/spec_verify.cuh"
#include <thread>
#include <vector>
using namespace lmfuse::cuda::sv;

template <typename T>
static void run(const Params& p, long B, const void* target, const void* draft) {
  for (long blk = 0; blk < B; ++blk) {
    std::barrier<> bar(kThreads);
    emu_block_barrier = &bar;
    std::vector<std::thread> threads;
    for (int t = 0; t < kThreads; ++t)
      threads.emplace_back([&, t] {
        threadIdx.x = unsigned(t);
        blockIdx.x = unsigned(blk);
        spec_verify_kernel<T>(p, (const T*)target, (const T*)draft);
      });
    for (auto& th : threads) th.join();
  }
}

// Same argument order as spec_verify_launch in csrc/spec_verify.cu.
extern "C" void emu_spec_verify(int dtype, const int64_t* ids, const void* draft, const void* target,
                                const int64_t* n, const float* u, const int64_t* seeds, const float* thr_t,
                                const float* thr_d, int64_t* tokens, int64_t* n_acc, long B, long k, long V,
                                float inv_t) {
  const Params p{ids, n, u, seeds, thr_t, thr_d, tokens, n_acc, k, V, inv_t};
  if (dtype == 0) run<float>(p, B, target, draft);
  if (dtype == 1) run<__nv_bfloat16>(p, B, target, draft);
  if (dtype == 2) run<__half>(p, B, target, draft);
}
"""

DTYPE_CODE = {torch.float32: 0, torch.bfloat16: 1, torch.float16: 2}


@pytest.fixture(scope="module")
def emu(tmp_path_factory):
    return compile_emulator(tmp_path_factory.mktemp("sv_emu"), dict(STUBS, **{"harness.cpp": HARNESS}),
                            "libsvemu.so")


def _p(t):
    return ctypes.c_void_p(None if t is None else t.data_ptr())


def _run(emu, ids, draft, target, n, u, seeds, inv_t, thr_t, thr_d):
    B, k = ids.shape
    tokens = torch.full((B, k + 1), -1, dtype=torch.int64)  # the launcher's contract: pre-filled with -1
    n_acc = torch.full((B,), -(2**31) + 7, dtype=torch.int64)  # poisoned: every row must be written
    emu.emu_spec_verify(DTYPE_CODE[target.dtype], _p(ids), _p(draft), _p(target), _p(n), _p(u), _p(seeds),
                        _p(thr_t), _p(thr_d), _p(tokens), _p(n_acc), ctypes.c_long(B), ctypes.c_long(k),
                        ctypes.c_long(target.shape[-1]), ctypes.c_float(inv_t))
    return tokens, n_acc


# V = 37: scalar loads only (rows misaligned); V = 520: 16-byte vectors + tails, several per thread.
@pytest.mark.parametrize("V", [37, 520])
@pytest.mark.parametrize("dtype", list(DTYPE_CODE), ids=str)
@pytest.mark.parametrize("case", ["greedy", "sample", "sample-filtered", "deterministic-drafter"])
def test_emulated_cuda_spec_verify_matches_reference(emu, case, dtype, V):
    g = torch.Generator().manual_seed(torch.randint(0, 2**31, ()).item())
    B, k = 6, 3
    # the drafts are near-copies of the target so rows accept 0..k tokens
    target = torch.randn(B, k + 1, V, generator=g) * 2
    draft = (target[:, :k] + 0.7 * torch.randn(B, k, V, generator=g)).to(dtype).contiguous()
    target = target.to(dtype)
    target[1, 0, 5] = float("-inf")  # a masked token
    ids = torch.multinomial(torch.softmax(draft.float().reshape(-1, V), -1), 1, generator=g).reshape(B, k)
    ids[2] = target[2, :k].float().argmax(-1)  # greedy: an all-accepted row
    n = torch.tensor([3, 2, 3, 0, 1, 3])  # ragged, including a row with no drafts
    u = torch.rand(B, k, generator=g)
    seeds = torch.randint(0, 2**32, (B, 2), generator=g)
    temp = 0.0 if case == "greedy" else 0.8
    inv_t = _sampling.inv_temperature(temp)
    if case == "deterministic-drafter":
        draft = None
    thr_t = thr_d = None
    if case == "sample-filtered":
        thr_t = _sampling.filter_thresholds(target, inv_t, 5, 0.9)
        thr_d = _sampling.filter_thresholds(draft, inv_t, 5, 0.9)
    tokens, n_acc = _run(emu, ids, draft, target, n, u, seeds, inv_t, thr_t, thr_d)
    ref = reference(ids, None if temp == 0 else draft, target, n, u, seeds, temp, thr_t, thr_d)
    assert torch.equal(n_acc, ref.num_accepted), (n_acc, ref.num_accepted)
    assert torch.equal(tokens, ref.tokens), (tokens, ref.tokens)
    if case == "greedy":
        assert int(n_acc[2]) == 3  # the all-accepted row really was all accepted


def test_emulated_cuda_spec_verify_flags_bad_rows(emu):
    B, k, V = 3, 2, 24
    target = torch.randn(B, k + 1, V)
    target[0, 0, 7] = float("nan")
    target[1, 0] = float("-inf")  # no finite logit
    ids = torch.zeros(B, k, dtype=torch.int64)
    ids[2, 0] = V + 5  # out of range: the kernel refuses it instead of reading past the row
    n = torch.full((B,), k)
    u, seeds = torch.rand(B, k), torch.randint(0, 2**32, (B, 2))
    for inv_t in (0.0, 1.0):
        _, n_acc = _run(emu, ids, None, target, n, u, seeds, inv_t, None, None)
        assert n_acc[:2].tolist() == [-1, -1]
        if inv_t > 0:
            assert int(n_acc[2]) == -1
