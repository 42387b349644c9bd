// Torch-free CUDA kernel of spec_verify (speculative-sampling verification).
//
// One thread block per request. Per position the request needs (stopping at the first
// rejection) the block streams the target row twice (max, then Σ exp: the row is in L2 for the
// second pass) and the draft row twice, tests the draft token, and at the emitting position one
// more pass samples the correction / bonus token with the exponential race argmax_v w_v / E_v.
// E_v = −ln(u_v) comes from the counter hash of python/lmfuse/ops/_sampling.py, so the tokens
// equal those of the cpp, triton and reference backends for one generator state. Nothing of
// size V is written. Loads are 16-byte vectors when the row is 16-byte aligned (the common
// case: V a multiple of 8 elements), scalar otherwise.
//
// Reductions: warp shuffles, then one shared-memory slot per warp. Control flow is uniform
// across the block (every thread sees the same reduced values), so every __syncthreads() is
// reached by all threads.
#pragma once

#include <cuda_bf16.h>
#include <cuda_fp16.h>
#include <cuda_runtime.h>

#include <cstdint>

namespace lmfuse {
namespace cuda {
namespace sv {

constexpr int kThreads = 256;
constexpr int kWarps = kThreads / 32;
constexpr float kInf = __builtin_huge_valf();

__device__ __forceinline__ float to_f(float v) { return v; }
__device__ __forceinline__ float to_f(__half v) { return __half2float(v); }
__device__ __forceinline__ float to_f(__nv_bfloat16 v) { return __bfloat162float(v); }

// Elements per 16-byte vector load.
template <typename T>
struct Vec {
  static constexpr int kN = 16 / sizeof(T);
};

struct Shared {
  float f[kWarps];
  int64_t i[kWarps];
};

struct MaxOp {
  __device__ __forceinline__ float operator()(float a, float b) const { return fmaxf(a, b); }
};
struct SumOp {
  __device__ __forceinline__ float operator()(float a, float b) const { return a + b; }
};

template <typename Op>
__device__ __forceinline__ float warp_reduce(float v, Op op) {
  for (int o = 16; o > 0; o >>= 1) v = op(v, __shfl_xor_sync(0xffffffffu, v, o));
  return v;
}

// (value, index) argmax with the smallest index on ties (torch.argmax's first index).
__device__ __forceinline__ void arg_better(float& v, int64_t& i, float ov, int64_t oi) {
  if (ov > v || (ov == v && oi < i)) {
    v = ov;
    i = oi;
  }
}
__device__ __forceinline__ void warp_argmax(float& v, int64_t& i) {
  for (int o = 16; o > 0; o >>= 1) {
    const float ov = __shfl_xor_sync(0xffffffffu, v, o);
    const int64_t oi = __shfl_xor_sync(0xffffffffu, i, o);
    arg_better(v, i, ov, oi);
  }
}

// Block-wide reductions: every thread returns the result, combined in the same order in every
// thread (so a sum is bit-identical across the block). The leading barrier protects `sh` from
// the previous reduction's readers.
template <typename Op>
__device__ __forceinline__ float block_reduce(float v, float init, Op op, Shared& sh) {
  v = warp_reduce(v, op);
  __syncthreads();
  if (threadIdx.x % 32 == 0) sh.f[threadIdx.x / 32] = v;
  __syncthreads();
  float r = init;
  for (int w = 0; w < kWarps; ++w) r = op(r, sh.f[w]);
  return r;
}
// true in every thread when `flag` is true in any thread
__device__ __forceinline__ bool block_any(bool flag, Shared& sh) {
  return block_reduce(flag ? 1.0f : 0.0f, 0.0f, MaxOp{}, sh) > 0.0f;
}
__device__ __forceinline__ void block_argmax(float& v, int64_t& i, Shared& sh) {
  warp_argmax(v, i);
  __syncthreads();
  if (threadIdx.x % 32 == 0) {
    sh.f[threadIdx.x / 32] = v;
    sh.i[threadIdx.x / 32] = i;
  }
  __syncthreads();
  v = sh.f[0];
  i = sh.i[0];
  for (int w = 1; w < kWarps; ++w) arg_better(v, i, sh.f[w], sh.i[w]);
}

// Calls f(index, value as float) for every element of row[0, V), thread-strided; 16-byte
// vector loads when the row is aligned, scalar loads otherwise.
template <typename T, typename F>
__device__ __forceinline__ void for_each(const T* row, int64_t V, F&& f) {
  constexpr int N = Vec<T>::kN;
  int64_t start = 0;
  if (reinterpret_cast<uintptr_t>(row) % 16 == 0) {
    const int64_t nvec = V / N;
    const uint4* vrow = reinterpret_cast<const uint4*>(row);
    for (int64_t j = threadIdx.x; j < nvec; j += kThreads) {
      const uint4 raw = vrow[j];
      const T* e = reinterpret_cast<const T*>(&raw);
#pragma unroll
      for (int t = 0; t < N; ++t) f(j * N + t, to_f(e[t]));
    }
    start = nvec * N;
  }
  for (int64_t v = start + threadIdx.x; v < V; v += kThreads) f(v, to_f(row[v]));
}

__device__ __forceinline__ uint32_t mix32(uint32_t x) {
  x ^= x >> 16;
  x *= 0x7FEB352Du;
  x ^= x >> 15;
  x *= 0x846CA68Bu;
  x ^= x >> 16;
  return x;
}

// Exp(1) noise of token v (bit-identical u with every backend; logf may differ in the last ulp).
__device__ __forceinline__ float noise_exp(int64_t v, uint32_t s0, uint32_t s1) {
  const uint32_t h = mix32(mix32(static_cast<uint32_t>(v) ^ s0) ^ s1);
  const float u = (static_cast<float>(h >> 9) + 0.5f) * (1.0f / 8388608.0f);
  return -logf(u);
}

// Log-partition of the temperature-scaled, threshold-filtered row; false on NaN/+inf or when no
// finite logit survives the filter.
template <typename T>
__device__ bool log_partition(const T* row, int64_t V, float inv_t, float thr, float& lse, Shared& sh) {
  float m = -kInf;
  int bad = 0;
  for_each(row, V, [&](int64_t, float x) {
    bad |= !(x < kInf);
    const float s = x * inv_t;
    if (s >= thr) m = fmaxf(m, s);
  });
  const bool any_bad = block_any(bad, sh);
  m = block_reduce(m, -kInf, MaxOp{}, sh);
  if (any_bad || !(m > -kInf)) return false;
  float acc = 0.0f;
  for_each(row, V, [&](int64_t, float x) {
    const float s = x * inv_t;
    if (s >= thr) acc += expf(s - m);
  });
  lse = m + logf(block_reduce(acc, 0.0f, SumOp{}, sh));
  return true;
}

template <typename T>
__device__ float prob_of(const T* row, int64_t tok, float inv_t, float thr, float lse) {
  const float s = to_f(row[tok]) * inv_t;
  return s >= thr ? expf(s - lse) : 0.0f;
}

// Greedy: first index of the max; -1 on NaN/+inf or an all -inf row.
template <typename T>
__device__ int64_t row_argmax(const T* row, int64_t V, Shared& sh) {
  float best = -kInf;
  int64_t idx = INT64_MAX;
  int bad = 0;
  for_each(row, V, [&](int64_t v, float x) {
    bad |= !(x < kInf);
    arg_better(best, idx, x, v);
  });
  const bool any_bad = block_any(bad, sh);
  block_argmax(best, idx, sh);
  return (any_bad || !(best > -kInf)) ? -1 : idx;
}

// argmax_v w_v / E_v with w = p, max(p − q, 0) (q_row non-null), or p without det_tok (>= 0);
// -1 when every weight is 0 (p == q to rounding: the caller then samples from p).
template <typename T>
__device__ int64_t race(const T* p_row, float lse_p, float thr_p, const T* q_row, float lse_q, float thr_q,
                        int64_t det_tok, float inv_t, int64_t V, uint32_t s0, uint32_t s1, Shared& sh) {
  float best = 0.0f;
  int64_t idx = INT64_MAX;
  for_each(p_row, V, [&](int64_t v, float x) {
    const float sp = x * inv_t;
    float w = sp >= thr_p ? expf(sp - lse_p) : 0.0f;
    if (q_row != nullptr) {
      const float sq = to_f(q_row[v]) * inv_t;  // scalar: the p row drives the vector loads
      w = fmaxf(w - (sq >= thr_q ? expf(sq - lse_q) : 0.0f), 0.0f);
    }
    if (v == det_tok) w = 0.0f;
    if (w > 0.0f) arg_better(best, idx, w / noise_exp(v, s0, s1), v);
  });
  block_argmax(best, idx, sh);
  return best > 0.0f ? idx : -1;
}

struct Params {
  const int64_t* ids;      // [B, k]
  const int64_t* n_draft;  // [B]
  const float* u;          // [B, k]
  const int64_t* seeds;    // [B, 2]
  const float* thr_t;      // [B, k+1] or null
  const float* thr_d;      // [B, k] or null
  int64_t* tokens;         // [B, k+1], pre-filled with -1 by the launcher
  int64_t* n_acc;          // [B]; -1 marks invalid logits
  int64_t k, V;
  float inv_t;             // 0: greedy
};

template <typename T>
__global__ void __launch_bounds__(kThreads) spec_verify_kernel(Params a, const T* target, const T* draft) {
  __shared__ Shared sh;
  const int64_t b = blockIdx.x, k = a.k, V = a.V;
  // The Python op validated n and the ids; clamping / the id check below keep a bad value from
  // ever turning into an out-of-bounds read.
  const int64_t n = a.n_draft[b] < 0 ? 0 : (a.n_draft[b] > k ? k : a.n_draft[b]);
  const int64_t* ids = a.ids + b * k;
  const T* trow = target + b * (k + 1) * V;
  int64_t* out = a.tokens + b * (k + 1);
  const bool lead = threadIdx.x == 0;
  if (a.inv_t == 0.0f) {  // greedy
    for (int64_t i = 0; i <= n; ++i) {
      const int64_t best = row_argmax(trow + i * V, V, sh);
      if (best < 0) {
        if (lead) a.n_acc[b] = -1;
        return;
      }
      if (i == n || best != ids[i]) {
        if (lead) out[i] = best, a.n_acc[b] = i;
        return;
      }
      if (lead) out[i] = ids[i];
    }
    return;  // unreachable: the loop returns at i == n
  }
  const uint32_t s0 = static_cast<uint32_t>(a.seeds[2 * b]), s1 = static_cast<uint32_t>(a.seeds[2 * b + 1]);
  for (int64_t i = 0; i <= n; ++i) {
    const T* tp = trow + i * V;
    const float thr_t = a.thr_t ? a.thr_t[b * (k + 1) + i] : -kInf;
    float lse_t = 0.0f;
    if (!log_partition(tp, V, a.inv_t, thr_t, lse_t, sh)) {
      if (lead) a.n_acc[b] = -1;
      return;
    }
    int64_t tok;
    if (i == n) {  // every draft accepted: bonus token from p_n
      tok = race<T>(tp, lse_t, thr_t, nullptr, 0.0f, 0.0f, -1, a.inv_t, V, s0, s1, sh);
    } else {
      const int64_t x = ids[i];
      if (x < 0 || x >= V) {
        if (lead) a.n_acc[b] = -1;
        return;
      }
      const T* qp = draft ? draft + (b * k + i) * V : nullptr;
      const float thr_d = a.thr_d ? a.thr_d[b * k + i] : -kInf;
      float lse_d = 0.0f;
      if (qp && !log_partition(qp, V, a.inv_t, thr_d, lse_d, sh)) {
        if (lead) a.n_acc[b] = -1;
        return;
      }
      const float px = prob_of(tp, x, a.inv_t, thr_t, lse_t);
      const float qx = qp ? prob_of(qp, x, a.inv_t, thr_d, lse_d) : 1.0f;
      if (a.u[b * k + i] * qx < px) {  // accepted
        if (lead) out[i] = x;
        continue;
      }
      tok = race<T>(tp, lse_t, thr_t, qp, lse_d, thr_d, qp ? -1 : x, a.inv_t, V, s0, s1, sh);
      if (tok < 0) tok = race<T>(tp, lse_t, thr_t, nullptr, 0.0f, 0.0f, -1, a.inv_t, V, s0, s1, sh);
    }
    if (lead) out[i] = tok, a.n_acc[b] = i;
    return;
  }
}

}  // namespace sv
}  // namespace cuda
}  // namespace lmfuse
