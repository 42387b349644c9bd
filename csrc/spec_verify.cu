// CUDA glue for spec_verify: maps the dtype tag onto the templated kernel in
// kernels/spec_verify.cuh and launches one block per request. Torch-free (see spec_verify.h).
#include "spec_verify.h"

#include "kernels/spec_verify.cuh"

namespace lmfuse {
namespace cuda {

namespace {
template <typename T>
cudaError_t launch(const sv::Params& p, const void* target, const void* draft, int64_t B, cudaStream_t stream) {
  sv::spec_verify_kernel<T><<<static_cast<unsigned>(B), sv::kThreads, 0, stream>>>(
      p, static_cast<const T*>(target), static_cast<const T*>(draft));
  return cudaGetLastError();
}
}  // namespace

cudaError_t spec_verify_launch(SvDtype dtype, const int64_t* ids, const void* draft, const void* target,
                               const int64_t* n_draft, const float* u, const int64_t* seeds, const float* thr_t,
                               const float* thr_d, int64_t* tokens, int64_t* n_acc, int64_t B, int64_t k,
                               int64_t V, float inv_t, cudaStream_t stream) {
  if (B < 0 || B > 0x7fffffffLL || k < 1 || V < 1) return cudaErrorInvalidValue;
  if (B == 0) return cudaSuccess;
  const sv::Params p{ids, n_draft, u, seeds, thr_t, thr_d, tokens, n_acc, k, V, inv_t};
  switch (dtype) {
    case SvDtype::kFloat32: return launch<float>(p, target, draft, B, stream);
    case SvDtype::kBFloat16: return launch<__nv_bfloat16>(p, target, draft, B, stream);
    case SvDtype::kFloat16: return launch<__half>(p, target, draft, B, stream);
  }
  return cudaErrorInvalidValue;
}

}  // namespace cuda
}  // namespace lmfuse
