// Input validation shared by the CPU (lmfuse._C) and CUDA (lmfuse._C_cuda) bindings of the
// low-rank linear op. Torch-side only: never include this from a .cu file (those must compile
// with plain nvcc, without torch headers).
//
// Contract checked here (both backends):
//   * every tensor is 2-D (bias is 1-D), contiguous, on the expected device type, and all
//     share one dtype in {float32, bfloat16, float16} and one device;
//   * down is [R, K], up is [N, R], bias is [N]; x / dy are [M, K] / [M, N].
// Non-contiguous inputs are rejected rather than silently copied: the Python op layer calls
// .contiguous() where it wants to accept them, so the copy is visible there.
#pragma once

#include <torch/extension.h>

#include <string>

namespace lmfuse {

inline void check_lrl_tensor(const at::Tensor& t, const char* name, int64_t dim,
                             c10::DeviceType device_type) {
  TORCH_CHECK(t.defined(), "low_rank_linear: '", name, "' is an undefined tensor");
  TORCH_CHECK(t.device().type() == device_type, "low_rank_linear: '", name,
              "' must be on device type ", device_type, ", got ", t.device());
  TORCH_CHECK(t.dim() == dim, "low_rank_linear: '", name, "' must be ", dim,
              "-D, got shape ", t.sizes());
  const auto dt = t.scalar_type();
  TORCH_CHECK(dt == at::kFloat || dt == at::kBFloat16 || dt == at::kHalf,
              "low_rank_linear: '", name,
              "' must be float32, bfloat16 or float16, got ", dt);
  TORCH_CHECK(t.is_contiguous(), "low_rank_linear: '", name,
              "' must be contiguous (call .contiguous() first), got shape ", t.sizes(),
              " strides ", t.strides());
}

inline void check_same_dtype_device(const at::Tensor& ref, const char* ref_name,
                                    const at::Tensor& t, const char* name) {
  TORCH_CHECK(t.scalar_type() == ref.scalar_type(), "low_rank_linear: '", name,
              "' has dtype ", t.scalar_type(), " but '", ref_name, "' has dtype ",
              ref.scalar_type(), "; all inputs must share one dtype");
  TORCH_CHECK(t.device() == ref.device(), "low_rank_linear: '", name, "' is on ", t.device(),
              " but '", ref_name, "' is on ", ref.device());
}

// Validates (a, down, up) where a is x [M, K] (forward) or dy [M, N] (backward), and an
// optional bias [N]. a_name / a_is_dy say which so the messages name the right argument.
inline void check_lrl_inputs(const at::Tensor& a, const char* a_name, bool a_is_dy,
                             const at::Tensor& down, const at::Tensor& up,
                             const c10::optional<at::Tensor>& bias,
                             c10::DeviceType device_type) {
  check_lrl_tensor(a, a_name, 2, device_type);
  check_lrl_tensor(down, "down", 2, device_type);
  check_lrl_tensor(up, "up", 2, device_type);
  check_same_dtype_device(a, a_name, down, "down");
  check_same_dtype_device(a, a_name, up, "up");
  const int64_t R = down.size(0), K = down.size(1), N = up.size(0);
  TORCH_CHECK(up.size(1) == R, "low_rank_linear: rank mismatch: 'down' is [R, K] = ",
              down.sizes(), " so 'up' must be [N, ", R, "], got ", up.sizes());
  if (a_is_dy) {
    TORCH_CHECK(a.size(1) == N, "low_rank_linear: '", a_name, "' must be [M, N] with N = ", N,
                " (up.size(0)), got ", a.sizes());
  } else {
    TORCH_CHECK(a.size(1) == K, "low_rank_linear: '", a_name, "' must be [M, K] with K = ", K,
                " (down.size(1)), got ", a.sizes());
  }
  if (bias.has_value() && bias->defined()) {
    check_lrl_tensor(*bias, "bias", 1, device_type);
    check_same_dtype_device(a, a_name, *bias, "bias");
    TORCH_CHECK(bias->size(0) == N, "low_rank_linear: 'bias' must be [N] with N = ", N,
                " (up.size(0)), got ", bias->sizes());
  }
}

}  // namespace lmfuse
