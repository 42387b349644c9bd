// pybind11 module lmfuse._C_cuda: the torch side of the CUDA low-rank linear kernels.
//
// Owns input validation (shared with the CPU bindings), output allocation, the device guard
// and the current CUDA stream; the kernels themselves are launched through the torch-free
// interface in low_rank_linear.h. Built only where torch has CUDA (see setup.py).
#include <c10/cuda/CUDAGuard.h>
#include <c10/cuda/CUDAStream.h>
#include <torch/extension.h>

#include <tuple>

#include "low_rank_linear.h"
#include "low_rank_linear_checks.h"

namespace {

using lmfuse::cuda::LrlDtype;

LrlDtype to_lrl_dtype(at::ScalarType dt) {
  switch (dt) {
    case at::kFloat: return LrlDtype::kFloat32;
    case at::kBFloat16: return LrlDtype::kBFloat16;
    case at::kHalf: return LrlDtype::kFloat16;
    default: TORCH_CHECK(false, "low_rank_linear: unsupported dtype ", dt);
  }
}

void check_rank(const at::Tensor& down) {
  TORCH_CHECK(down.size(0) <= lmfuse::cuda::kLrlMaxRank,
              "low_rank_linear (CUDA): rank R = down.size(0) = ", down.size(0),
              " exceeds the supported maximum ", lmfuse::cuda::kLrlMaxRank,
              " (the [rows, R] intermediate is kept in shared memory)");
}

void check_launch(cudaError_t err, const char* what) {
  TORCH_CHECK(err == cudaSuccess, "low_rank_linear (CUDA): ", what, " failed: ",
              cudaGetErrorString(err));
}

at::Tensor fwd(const at::Tensor& x, const at::Tensor& down, const at::Tensor& up,
               const c10::optional<at::Tensor>& bias, const c10::optional<at::Tensor>& h_out) {
  lmfuse::check_lrl_inputs(x, "x", /*a_is_dy=*/false, down, up, bias, c10::DeviceType::CUDA);
  check_rank(down);
  const int64_t M = x.size(0), K = x.size(1), R = down.size(0), N = up.size(0);
  const bool has_h = h_out.has_value() && h_out->defined();
  if (has_h) {
    lmfuse::check_lrl_tensor(*h_out, "h_out", 2, c10::DeviceType::CUDA);
    lmfuse::check_same_dtype_device(x, "x", *h_out, "h_out");
    TORCH_CHECK(h_out->size(0) == M && h_out->size(1) == R,
                "low_rank_linear: 'h_out' must be [M, R] = [", M, ", ", R, "], got ",
                h_out->sizes());
  }
  const bool has_bias = bias.has_value() && bias->defined();
  const c10::cuda::CUDAGuard guard(x.device());
  at::Tensor y = at::empty({M, N}, x.options());
  check_launch(lmfuse::cuda::low_rank_linear_fwd_launch(
                   to_lrl_dtype(x.scalar_type()), x.data_ptr(), down.data_ptr(), up.data_ptr(),
                   has_bias ? bias->data_ptr() : nullptr, y.data_ptr(),
                   has_h ? h_out->data_ptr() : nullptr, M, K, R, N,
                   c10::cuda::getCurrentCUDAStream(x.device().index()).stream()),
               "forward launch");
  return y;
}

std::tuple<at::Tensor, at::Tensor> bwd_dx(const at::Tensor& dy, const at::Tensor& down,
                                          const at::Tensor& up) {
  lmfuse::check_lrl_inputs(dy, "dy", /*a_is_dy=*/true, down, up, c10::nullopt,
                           c10::DeviceType::CUDA);
  check_rank(down);
  const int64_t M = dy.size(0), N = dy.size(1), R = down.size(0), K = down.size(1);
  const c10::cuda::CUDAGuard guard(dy.device());
  at::Tensor dx = at::empty({M, K}, dy.options());
  at::Tensor dh = at::empty({M, R}, dy.options());
  check_launch(lmfuse::cuda::low_rank_linear_bwd_dx_launch(
                   to_lrl_dtype(dy.scalar_type()), dy.data_ptr(), down.data_ptr(),
                   up.data_ptr(), dx.data_ptr(), dh.data_ptr(), M, K, R, N,
                   c10::cuda::getCurrentCUDAStream(dy.device().index()).stream()),
               "backward (dx) launch");
  return {dx, dh};
}

}  // namespace

PYBIND11_MODULE(_C_cuda, m) {
  m.doc() = "lmfuse CUDA kernels";
  m.def("build_archs", [] { return std::string(lmfuse::cuda::build_archs()); },
        "GPU architectures the device code was compiled for, e.g. 'sm_80,sm_90a'.");
  m.def("low_rank_linear_fwd", &fwd, py::arg("x"), py::arg("down"), py::arg("up"),
        py::arg("bias"), py::arg("h_out"),
        R"doc(Fused low-rank projection y = round(x @ down.T) @ up.T + bias on the current stream.

x [M, K], down [R, K] (R <= 256), up [N, R], bias [N] or None, h_out [M, R] or None; one dtype
in {float32, bfloat16, float16}; contiguous tensors on one CUDA device. Returns y [M, N];
when h_out is given it receives h = x @ down.T rounded to the input dtype.)doc");
  m.def("low_rank_linear_bwd_dx", &bwd_dx, py::arg("dy"), py::arg("down"), py::arg("up"),
        R"doc(Data gradient: dh = round(dy @ up), dx = dh @ down. Returns (dx [M, K], dh [M, R]).)doc");
}
