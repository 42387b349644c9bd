// CUDA glue for the low-rank linear op: maps the dtype tag and argument order onto the
// templated kernels in kernels/low_rank_linear.cuh. Torch-free on purpose: it must compile with
// plain nvcc on machines whose torch wheel has no CUDA headers (the nvcc tests do exactly that).
#include "low_rank_linear.h"

#include "kernels/low_rank_linear.cuh"

static_assert(lmfuse::cuda::kLrlMaxRank == lmfuse::cuda::kMaxRank,
              "launcher header and kernels disagree on the largest rank");

namespace lmfuse {
namespace cuda {
namespace {

template <typename Fn>
cudaError_t dispatch(LrlDtype dtype, Fn&& fn) {
  switch (dtype) {
    case LrlDtype::kFloat32: return fn(float{});
    case LrlDtype::kBFloat16: return fn(__nv_bfloat16{});
    case LrlDtype::kFloat16: return fn(__half{});
  }
  return cudaErrorInvalidValue;
}

template <typename T>
const T* as(const void* p) { return static_cast<const T*>(p); }
template <typename T>
T* as_mut(void* p) { return static_cast<T*>(p); }

// Launches one chained product (kernel in kernels/low_rank_linear.cuh). Returns the launch
// status; does not synchronise. Kept out of the .cuh so the kernel header holds device code
// only (the host-emulation test compiles it with a plain C++ compiler).
template <typename T, bool kBColMajor>
cudaError_t launch_low_rank_chain(const T* a, int64_t M, int64_t K1, const T* b1, int64_t ld1,
                                  int64_t R, const T* b2, int64_t ld2, int64_t N2,
                                  const T* bias, T* out, T* mid_out, cudaStream_t stream) {
  if (R < 0 || R > kMaxRank) return cudaErrorInvalidValue;
  if (M == 0) return cudaSuccess;
  const int64_t blocks = (M + kBlockM - 1) / kBlockM;
  if (blocks > 0x7fffffffLL) return cudaErrorInvalidValue;
  const size_t smem = lrl_smem_bytes(R);
  auto kernel = low_rank_chain_kernel<T, kBColMajor>;
  // Opt in above the 48 KiB default; at kMaxRank the need is ~38 KiB, so this is a guard for
  // future tile changes rather than a path taken today.
  if (smem > 48 * 1024) {
    cudaError_t err = cudaFuncSetAttribute(kernel, cudaFuncAttributeMaxDynamicSharedMemorySize,
                                           static_cast<int>(smem));
    if (err != cudaSuccess) return err;
  }
  kernel<<<static_cast<unsigned>(blocks), kLrlThreads, smem, stream>>>(
      a, M, K1, b1, ld1, R, b2, ld2, N2, bias, out, mid_out);
  return cudaGetLastError();
}

}  // namespace

cudaError_t low_rank_linear_fwd_launch(LrlDtype dtype, const void* x, const void* down,
                                       const void* up, const void* bias, void* y, void* h_out,
                                       int64_t M, int64_t K, int64_t R, int64_t N,
                                       cudaStream_t stream) {
  return dispatch(dtype, [&](auto tag) {
    using T = decltype(tag);
    // B1(k, r) = down[r, k] (ld K), B2(r, n) = up[n, r] (ld R): both column-major reads.
    return launch_low_rank_chain<T, /*kBColMajor=*/true>(
        as<T>(x), M, K, as<T>(down), K, R, as<T>(up), R, N, as<T>(bias), as_mut<T>(y),
        as_mut<T>(h_out), stream);
  });
}

cudaError_t low_rank_linear_bwd_dx_launch(LrlDtype dtype, const void* dy, const void* down,
                                          const void* up, void* dx, void* dh, int64_t M,
                                          int64_t K, int64_t R, int64_t N, cudaStream_t stream) {
  if (dh == nullptr) return cudaErrorInvalidValue;
  return dispatch(dtype, [&](auto tag) {
    using T = decltype(tag);
    // B1(n, r) = up[n, r] (ld R), B2(r, k) = down[r, k] (ld K): both row-major reads.
    return launch_low_rank_chain<T, /*kBColMajor=*/false>(
        as<T>(dy), M, N, as<T>(up), R, R, as<T>(down), K, K, static_cast<const T*>(nullptr),
        as_mut<T>(dx), as_mut<T>(dh), stream);
  });
}

// LMFUSE_CUDA_ARCHS is set by setup.py as a bare token list (sm_80,sm_90a); stringise it here
// so no shell quoting of a string literal is needed on the compiler command line.
#define LMFUSE_STRINGIFY_IMPL(...) #__VA_ARGS__
#define LMFUSE_STRINGIFY(...) LMFUSE_STRINGIFY_IMPL(__VA_ARGS__)

const char* build_archs() {
#if defined(LMFUSE_CUDA_ARCHS)
  return LMFUSE_STRINGIFY(LMFUSE_CUDA_ARCHS);
#elif defined(__CUDA_ARCH_LIST__)
  // nvcc's own list (e.g. 800,900); it does not distinguish sm_90 from sm_90a.
  return "compute " LMFUSE_STRINGIFY(__CUDA_ARCH_LIST__);
#else
  return "unknown";
#endif
}

}  // namespace cuda
}  // namespace lmfuse
