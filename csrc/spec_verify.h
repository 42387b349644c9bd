// Torch-free launcher interface of the CUDA spec_verify kernel (csrc/spec_verify.cu).
//
// Included by the .cu (plain nvcc, no torch headers) and by cuda_bindings.cpp (which owns the
// torch side: checks, output allocation, the current stream). All pointers are device pointers
// to contiguous arrays: ids [B, k] int64, draft [B, k, V] (nullable), target [B, k+1, V] of one
// logit dtype, n_draft [B] int64, u [B, k] fp32, seeds [B, 2] int64, thresholds fp32
// [B, k+1] / [B, k] (nullable); outputs tokens [B, k+1] int64 (must be pre-filled with -1) and
// num_accepted [B] int64 (-1 marks a row with NaN/+inf or no finite logit where it reads).
// The launch is asynchronous on `stream`; the return value is the launch status.
#pragma once

#include <cuda_runtime_api.h>

#include <cstdint>

namespace lmfuse {
namespace cuda {

enum class SvDtype : int { kFloat32 = 0, kBFloat16 = 1, kFloat16 = 2 };

cudaError_t spec_verify_launch(SvDtype dtype, const int64_t* ids, const void* draft, const void* target,
                               const int64_t* n_draft, const float* u, const int64_t* seeds, const float* thr_t,
                               const float* thr_d, int64_t* tokens, int64_t* n_acc, int64_t B, int64_t k,
                               int64_t V, float inv_t, cudaStream_t stream);

}  // namespace cuda
}  // namespace lmfuse
