// Torch-free launcher interface of the CUDA low-rank linear kernels (csrc/low_rank_linear.cu).
//
// Included by the .cu (compiled by plain nvcc, no torch headers) and by cuda_bindings.cpp (which
// owns the torch side: input checks, dtype mapping, output allocation, the current stream).
// All pointers are device pointers to contiguous row-major arrays of one element type:
//   x / dy [M, K] / [M, N], down [R, K], up [N, R], bias [N] or null, outputs likewise.
// Launches are asynchronous on `stream`; the return value is the launch status.
#pragma once

#include <cuda_runtime_api.h>

#include <cstdint>

namespace lmfuse {
namespace cuda {

enum class LrlDtype : int { kFloat32 = 0, kBFloat16 = 1, kFloat16 = 2 };

// Largest rank the kernels accept (the middle [rows, R] tile must fit in shared memory).
constexpr int64_t kLrlMaxRank = 256;

// y = round(x @ down^T) @ up^T + bias; h_out (nullable) receives round(x @ down^T).
cudaError_t low_rank_linear_fwd_launch(LrlDtype dtype, const void* x, const void* down,
                                       const void* up, const void* bias, void* y, void* h_out,
                                       int64_t M, int64_t K, int64_t R, int64_t N,
                                       cudaStream_t stream);

// dh = round(dy @ up); dx = dh @ down. Both outputs required.
cudaError_t low_rank_linear_bwd_dx_launch(LrlDtype dtype, const void* dy, const void* down,
                                          const void* up, void* dx, void* dh, int64_t M,
                                          int64_t K, int64_t R, int64_t N, cudaStream_t stream);

// Comma-separated GPU architectures the device code was built for, e.g. "sm_80,sm_90a".
const char* build_archs();

}  // namespace cuda
}  // namespace lmfuse
