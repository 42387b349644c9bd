// Torch-free CUDA kernels for the low-rank ("LPA") projection and its data gradient.
//
// Both directions are two chained products through a small middle dimension R (<= 256):
//
//   mid = round_T(a @ B1)            a [M, K1], B1 [K1, R]      (fwd: x, down^T;  bwd: dy, up)
//   out = round_T(mid @ B2 + bias)   B2 [R, N2]                 (fwd: up^T;       bwd: down)
//
// with fp32 accumulation and the middle rounded to T before the second product (what two
// chained nn.Linear layers in dtype T compute). The weights are read in place, never
// transposed in memory; kBColMajor says how B(k, c) is addressed:
//   kBColMajor = true  (forward):  B(k, c) = ptr[c * ld + k]   (down [R, K1], up [N2, R])
//   kBColMajor = false (backward): B(k, c) = ptr[k * ld + c]   (up [K1, R],   down [R, N2])
//
// One thread block owns kBlockM rows. Phase 1 computes the [kBlockM, R] middle into shared
// memory (fp32 holding T-rounded values); phase 2 sweeps N2 in tiles of kTileN columns, reading
// the middle from shared memory, so the middle never round-trips through global memory (it is
// written there only when the caller wants it: h for the weight gradient of `up`, dh for that
// of `down`). Operands are staged through shared memory in kTileK-deep chunks; every load is
// bounds-checked and zero-filled, so M, K1, R, N2 need not be multiples of any tile size.
//
// CUDA cores only (fp32 FMA). A tensor-core (wmma/mma) version would be faster for bf16/fp16;
// this one is kept simple enough to check by reading, because it cannot be run where it is
// built.
#pragma once

#include <cuda_bf16.h>
#include <cuda_fp16.h>
#include <cuda_runtime.h>

#include <cstddef>
#include <cstdint>

namespace lmfuse {
namespace cuda {

constexpr int kLrlThreads = 256;  // threads per block
constexpr int kBlockM = 32;       // rows per block
constexpr int kTileN = 64;        // output columns per tile (one per thread column)
constexpr int kTileK = 16;        // reduction depth staged per shared-memory round
constexpr int kRowsPerThread = kBlockM / (kLrlThreads / kTileN);  // 8
constexpr int kMaxRank = 256;     // largest R the launcher accepts
static_assert(kLrlThreads % kTileN == 0, "threads must cover whole tile rows");
static_assert(kBlockM % (kLrlThreads / kTileN) == 0, "rows must split evenly over threads");
static_assert(kTileN % kTileK == 0, "middle padding (to kTileN) must cover the kTileK chunks");

// Element conversions. fp32 accumulation everywhere; round_to<T> is the T rounding of a value.
__device__ __forceinline__ float to_float(float v) { return v; }
__device__ __forceinline__ float to_float(__half v) { return __half2float(v); }
__device__ __forceinline__ float to_float(__nv_bfloat16 v) { return __bfloat162float(v); }

template <typename T>
__device__ __forceinline__ T from_float(float v);
template <>
__device__ __forceinline__ float from_float<float>(float v) { return v; }
template <>
__device__ __forceinline__ __half from_float<__half>(float v) { return __float2half_rn(v); }
template <>
__device__ __forceinline__ __nv_bfloat16 from_float<__nv_bfloat16>(float v) {
  return __float2bfloat16_rn(v);
}

// Shared-memory floats the kernel needs for rank R (the launcher passes this as dynamic smem).
__host__ __device__ constexpr int lrl_mid_stride(int64_t R) {
  // Middle rows padded to a whole number of kTileN columns; padding columns hold zeros.
  return static_cast<int>((R + kTileN - 1) / kTileN * kTileN);
}
__host__ __device__ constexpr size_t lrl_smem_bytes(int64_t R) {
  return sizeof(float) * (static_cast<size_t>(kBlockM) * lrl_mid_stride(R)  // middle
                          + kBlockM * kTileK                                 // a chunk
                          + kTileK * (kTileN + 1));                          // B chunk
}

// Stages B(k0 + kk, c0 + c) for kk < kTileK, c < kTileN into bs[kk][c] (row stride
// kTileN + 1 so the column-major transposing stores do not all hit one bank).
template <typename T, bool kBColMajor>
__device__ __forceinline__ void load_b_chunk(float* bs, const T* __restrict__ b, int64_t ld,
                                             int64_t kd, int64_t ncols, int64_t k0,
                                             int64_t c0) {
  for (int e = threadIdx.x; e < kTileK * kTileN; e += kLrlThreads) {
    // Consecutive threads walk the contiguous direction of B for coalesced reads.
    const int kk = kBColMajor ? e % kTileK : e / kTileN;
    const int c = kBColMajor ? e / kTileK : e % kTileN;
    const int64_t k = k0 + kk, col = c0 + c;
    float v = 0.0f;
    if (k < kd && col < ncols) v = to_float(kBColMajor ? b[col * ld + k] : b[k * ld + col]);
    bs[kk * (kTileN + 1) + c] = v;
  }
}

// acc[t] += sum_kk a(row_t, kk) * bs[kk][col] over one staged chunk; a is in shared memory
// with row stride lda. row_t = row0 + t * (kLrlThreads / kTileN).
__device__ __forceinline__ void accumulate_chunk(float (&acc)[kRowsPerThread],
                                                 const float* a, int lda, const float* bs,
                                                 int row0, int col) {
#pragma unroll
  for (int kk = 0; kk < kTileK; ++kk) {
    const float bv = bs[kk * (kTileN + 1) + col];
#pragma unroll
    for (int t = 0; t < kRowsPerThread; ++t) {
      acc[t] += a[(row0 + t * (kLrlThreads / kTileN)) * lda + kk] * bv;
    }
  }
}

template <typename T, bool kBColMajor>
__global__ void __launch_bounds__(kLrlThreads)
    low_rank_chain_kernel(const T* __restrict__ a, int64_t M, int64_t K1,
                          const T* __restrict__ b1, int64_t ld1, int64_t R,
                          const T* __restrict__ b2, int64_t ld2, int64_t N2,
                          const T* __restrict__ bias, T* __restrict__ out,
                          T* __restrict__ mid_out) {
  extern __shared__ float smem[];
  const int mid_stride = lrl_mid_stride(R);
  float* mid = smem;                              // [kBlockM][mid_stride]
  float* as = mid + kBlockM * mid_stride;         // [kBlockM][kTileK]
  float* bs = as + kBlockM * kTileK;              // [kTileK][kTileN + 1]

  const int64_t m0 = static_cast<int64_t>(blockIdx.x) * kBlockM;
  const int col = threadIdx.x % kTileN;
  const int row0 = threadIdx.x / kTileN;
  constexpr int kRowStep = kLrlThreads / kTileN;

  // Phase 1: mid[:, c0:c0+kTileN] = a[m0:m0+kBlockM, :] @ B1[:, c0:c0+kTileN].
  for (int64_t c0 = 0; c0 < mid_stride; c0 += kTileN) {
    float acc[kRowsPerThread];
#pragma unroll
    for (int t = 0; t < kRowsPerThread; ++t) acc[t] = 0.0f;
    for (int64_t k0 = 0; k0 < K1; k0 += kTileK) {
      for (int e = threadIdx.x; e < kBlockM * kTileK; e += kLrlThreads) {
        const int i = e / kTileK, kk = e % kTileK;
        const int64_t m = m0 + i, k = k0 + kk;
        as[e] = (m < M && k < K1) ? to_float(a[m * K1 + k]) : 0.0f;
      }
      load_b_chunk<T, kBColMajor>(bs, b1, ld1, K1, R, k0, c0);
      __syncthreads();
      accumulate_chunk(acc, as, kTileK, bs, row0, col);
      __syncthreads();  // before the next chunk overwrites as / bs
    }
#pragma unroll
    for (int t = 0; t < kRowsPerThread; ++t) {
      const int i = row0 + t * kRowStep;
      const int64_t c = c0 + col, m = m0 + i;
      // Round to T now: the second product must see exactly what a T-valued h would hold.
      const T rounded = from_float<T>(acc[t]);
      mid[i * mid_stride + c] = (c < R) ? to_float(rounded) : 0.0f;
      if (mid_out != nullptr && c < R && m < M) mid_out[m * R + c] = rounded;
    }
  }
  __syncthreads();  // the whole middle is needed by every thread in phase 2

  // Phase 2: out[:, n0:n0+kTileN] = mid @ B2[:, n0:n0+kTileN] (+ bias).
  for (int64_t n0 = 0; n0 < N2; n0 += kTileN) {
    float acc[kRowsPerThread];
#pragma unroll
    for (int t = 0; t < kRowsPerThread; ++t) acc[t] = 0.0f;
    for (int64_t k0 = 0; k0 < R; k0 += kTileK) {
      load_b_chunk<T, kBColMajor>(bs, b2, ld2, R, N2, k0, n0);
      __syncthreads();
      // Reads mid columns k0 .. k0 + kTileK - 1 < mid_stride; those >= R are zeros.
      accumulate_chunk(acc, mid + k0, mid_stride, bs, row0, col);
      __syncthreads();
    }
    const int64_t n = n0 + col;
    if (n < N2) {
      const float bv = bias != nullptr ? to_float(bias[n]) : 0.0f;
#pragma unroll
      for (int t = 0; t < kRowsPerThread; ++t) {
        const int64_t m = m0 + row0 + t * kRowStep;
        if (m < M) out[m * N2 + n] = from_float<T>(acc[t] + bv);
      }
    }
  }
}

}  // namespace cuda
}  // namespace lmfuse
