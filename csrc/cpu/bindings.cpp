// pybind11 module lmfuse._C: CPU kernels. Validation lives here (shared with the CUDA
// bindings through low_rank_linear_checks.h) so the kernels in low_rank_linear.cpp can assume
// well-formed, contiguous inputs of one dtype.
#include <torch/extension.h>

#include <tuple>

#include "low_rank_linear_checks.h"

namespace lmfuse {
namespace cpu {
bool has_openmp();
std::tuple<at::Tensor, at::Tensor> low_rank_linear_fwd_cpu(const at::Tensor& x,
                                                           const at::Tensor& down,
                                                           const at::Tensor& up,
                                                           const c10::optional<at::Tensor>& bias,
                                                           bool write_h);
std::tuple<at::Tensor, at::Tensor> low_rank_linear_bwd_dx_cpu(const at::Tensor& dy,
                                                              const at::Tensor& down,
                                                              const at::Tensor& up);
}  // namespace cpu
}  // namespace lmfuse

namespace {

std::tuple<at::Tensor, at::Tensor> fwd(const at::Tensor& x, const at::Tensor& down,
                                       const at::Tensor& up,
                                       const c10::optional<at::Tensor>& bias, bool write_h) {
  lmfuse::check_lrl_inputs(x, "x", /*a_is_dy=*/false, down, up, bias, c10::DeviceType::CPU);
  return lmfuse::cpu::low_rank_linear_fwd_cpu(x, down, up, bias, write_h);
}

std::tuple<at::Tensor, at::Tensor> bwd_dx(const at::Tensor& dy, const at::Tensor& down,
                                          const at::Tensor& up) {
  lmfuse::check_lrl_inputs(dy, "dy", /*a_is_dy=*/true, down, up, c10::nullopt,
                           c10::DeviceType::CPU);
  return lmfuse::cpu::low_rank_linear_bwd_dx_cpu(dy, down, up);
}

}  // namespace

PYBIND11_MODULE(_C, m) {
  m.doc() = "lmfuse CPU kernels (C++17, OpenMP when available)";
  m.def("has_openmp", &lmfuse::cpu::has_openmp,
        "True when the extension was compiled with OpenMP (row blocks run in parallel).");
  // The GIL is released around the kernels: they touch no Python objects and can take
  // milliseconds.
  m.def("low_rank_linear_fwd", &fwd, py::arg("x"), py::arg("down"), py::arg("up"),
        py::arg("bias"), py::arg("write_h"), py::call_guard<py::gil_scoped_release>(),
        R"doc(Fused low-rank projection y = round(x @ down.T) @ up.T + bias.

x [M, K], down [R, K], up [N, R], bias [N] or None; one dtype in {float32, bfloat16,
float16}; all contiguous CPU tensors (non-contiguous inputs are rejected, not copied).
The intermediate h = x @ down.T is accumulated in fp32 and rounded to the input dtype before
the second product, like two chained nn.Linear layers. Returns (y [M, N], h [M, R]); h is an
empty [0, R] tensor unless write_h.)doc");
  m.def("low_rank_linear_bwd_dx", &bwd_dx, py::arg("dy"), py::arg("down"), py::arg("up"),
        py::call_guard<py::gil_scoped_release>(),
        R"doc(Data gradient of low_rank_linear_fwd: dh = round(dy @ up), dx = dh @ down.

dy [M, N], down [R, K], up [N, R]; same contract as low_rank_linear_fwd. Returns
(dx [M, K], dh [M, R]). Weight gradients are left to the caller (plain matmuls with dh / h).)doc");
}
