// pybind11 module lmfuse._C_cuda: the torch side of the CUDA low-rank linear kernels.
//
// Owns input validation (shared with the CPU bindings), output allocation, the device guard
// and the current CUDA stream; the kernels themselves are launched through the torch-free
// interface in low_rank_linear.h. Built only where torch has CUDA (see setup.py).
#include <c10/cuda/CUDAGuard.h>
#include <c10/cuda/CUDAStream.h>
#include <torch/extension.h>

#include <tuple>
#include <vector>

#include "low_rank_linear.h"
#include "low_rank_linear_checks.h"
#include "spec_verify.h"

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

// spec_verify: the Python op validated values (ids in range, n <= k); this re-checks what memory
// safety depends on (shapes, dtypes, contiguity, one CUDA device). The kernel also clamps n and
// rejects out-of-range ids itself, so no host synchronisation is needed here.
std::tuple<at::Tensor, at::Tensor> spec_verify(const at::Tensor& ids, const c10::optional<at::Tensor>& draft,
                                               const at::Tensor& target, const at::Tensor& n_draft,
                                               const at::Tensor& u, const at::Tensor& seeds, double inv_t,
                                               const c10::optional<at::Tensor>& thr_t,
                                               const c10::optional<at::Tensor>& thr_d) {
  TORCH_CHECK(target.dim() == 3 && ids.dim() == 2, "spec_verify: target [B, k+1, V] and ids [B, k] expected");
  const int64_t B = ids.size(0), k = ids.size(1), V = target.size(2);
  auto chk = [&](const at::Tensor& t, const char* name, at::ScalarType dt, std::vector<int64_t> shape) {
    TORCH_CHECK(t.is_cuda() && t.device() == target.device() && t.is_contiguous() && t.scalar_type() == dt &&
                    t.sizes() == at::IntArrayRef(shape),
                "spec_verify (CUDA): '", name, "' must be a contiguous ", dt, " tensor of shape ", shape, " on ",
                target.device(), ", got ", t.scalar_type(), " ", t.sizes(), " on ", t.device());
  };
  chk(target, "target_logits", target.scalar_type(), {B, k + 1, V});
  chk(ids, "draft_token_ids", at::kLong, {B, k});
  chk(n_draft, "num_draft_tokens", at::kLong, {B});
  chk(u, "accept_uniforms", at::kFloat, {B, k});
  chk(seeds, "seeds", at::kLong, {B, 2});
  const bool has_d = draft.has_value() && draft->defined();
  const bool has_tt = thr_t.has_value() && thr_t->defined(), has_td = thr_d.has_value() && thr_d->defined();
  if (has_d) chk(*draft, "draft_logits", target.scalar_type(), {B, k, V});
  if (has_tt) chk(*thr_t, "target_threshold", at::kFloat, {B, k + 1});
  if (has_td) chk(*thr_d, "draft_threshold", at::kFloat, {B, k});
  lmfuse::cuda::SvDtype dt;
  switch (target.scalar_type()) {
    case at::kFloat: dt = lmfuse::cuda::SvDtype::kFloat32; break;
    case at::kBFloat16: dt = lmfuse::cuda::SvDtype::kBFloat16; break;
    case at::kHalf: dt = lmfuse::cuda::SvDtype::kFloat16; break;
    default: TORCH_CHECK(false, "spec_verify (CUDA): logits must be float32/bfloat16/float16, got ", target.scalar_type());
  }
  const c10::cuda::CUDAGuard guard(target.device());
  at::Tensor tokens = at::full({B, k + 1}, -1, ids.options());
  at::Tensor n_acc = at::empty({B}, ids.options());
  const cudaError_t err = lmfuse::cuda::spec_verify_launch(
      dt, ids.data_ptr<int64_t>(), has_d ? draft->data_ptr() : nullptr, target.data_ptr(),
      n_draft.data_ptr<int64_t>(), u.data_ptr<float>(), seeds.data_ptr<int64_t>(),
      has_tt ? thr_t->data_ptr<float>() : nullptr, has_td ? thr_d->data_ptr<float>() : nullptr,
      tokens.data_ptr<int64_t>(), n_acc.data_ptr<int64_t>(), B, k, V, static_cast<float>(inv_t),
      c10::cuda::getCurrentCUDAStream(target.device().index()).stream());
  TORCH_CHECK(err == cudaSuccess, "spec_verify (CUDA): launch failed: ", cudaGetErrorString(err));
  return {tokens, n_acc};
}

}  // namespace

PYBIND11_MODULE(_C_cuda, m) {
  m.doc() = "lmfuse CUDA kernels";
  m.def("build_archs", [] { return std::string(lmfuse::cuda::build_archs()); },
        "GPU architectures the device code was compiled for, e.g. 'sm_80,sm_90a'.");
  m.def("spec_verify", &spec_verify, py::arg("draft_token_ids"), py::arg("draft_logits"),
        py::arg("target_logits"), py::arg("num_draft_tokens"), py::arg("accept_uniforms"), py::arg("seeds"),
        py::arg("inv_temperature"), py::arg("target_threshold"), py::arg("draft_threshold"),
        "Speculative verification on the current stream (see lmfuse.ops.spec_verify). Returns (tokens "
        "[B, k+1], num_accepted [B]); num_accepted is -1 for a row with NaN/+inf or no finite logit where it reads.");
  m.def("low_rank_linear_fwd", &fwd, py::arg("x"), py::arg("down"), py::arg("up"),
        py::arg("bias"), py::arg("h_out"),
        R"doc(Fused low-rank projection y = round(x @ down.T) @ up.T + bias on the current stream.

x [M, K], down [R, K] (R <= 256), up [N, R], bias [N] or None, h_out [M, R] or None; one dtype
in {float32, bfloat16, float16}; contiguous tensors on one CUDA device. Returns y [M, N];
when h_out is given it receives h = x @ down.T rounded to the input dtype.)doc");
  m.def("low_rank_linear_bwd_dx", &bwd_dx, py::arg("dy"), py::arg("down"), py::arg("up"),
        R"doc(Data gradient: dh = round(dy @ up), dx = dh @ down. Returns (dx [M, K], dh [M, R]).)doc");
}
