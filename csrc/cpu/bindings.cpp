// pybind11 module lmfuse._C: CPU kernels. Validation lives here (shared with the CUDA
// bindings through low_rank_linear_checks.h) so the kernels in low_rank_linear.cpp can assume
// well-formed, contiguous inputs of one dtype.
#include <torch/extension.h>

#include <cmath>
#include <string>
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
// spec_verify.cpp
std::tuple<at::Tensor, at::Tensor> spec_verify_cpu(const at::Tensor& ids, const c10::optional<at::Tensor>& draft,
                                                   const at::Tensor& target, const at::Tensor& n_draft,
                                                   const at::Tensor& u, const at::Tensor& seeds, double inv_t,
                                                   const c10::optional<at::Tensor>& thr_t,
                                                   const c10::optional<at::Tensor>& thr_d);
// collab_decode.cpp
std::tuple<at::Tensor, at::Tensor, at::Tensor, at::Tensor, at::Tensor> collab_decode_step_cpu(
    const at::Tensor& small, const c10::optional<at::Tensor>& large, const c10::optional<at::Tensor>& base,
    int64_t mode, double log_alpha, double large_w, double small_w, double proxy_alpha, double inv_t,
    const c10::optional<at::Tensor>& threshold, const at::Tensor& seeds);
// sampling_threshold.cpp
at::Tensor filter_thresholds_cpu(const at::Tensor& logits, double inv_t, double top_p);
// linear_cross_entropy.cpp
at::Tensor lce_chunk_grad_cpu(at::Tensor& u, const at::Tensor& target, const at::Tensor& tw, int64_t ignore_index,
                              double logit_scale, double softcap, double label_smoothing, double z_loss_scale,
                              bool want_grad);
std::tuple<at::Tensor, at::Tensor, at::Tensor, at::Tensor, at::Tensor> lce_forward_stats_cpu(
    const at::Tensor& hidden, const at::Tensor& weight, const c10::optional<at::Tensor>& bias,
    const at::Tensor& target, int64_t vocab_size, int64_t ignore_index, double logit_scale, double softcap,
    bool want_sum_z, bool want_sum_pz, bool want_argmax);
std::tuple<at::Tensor, at::Tensor, at::Tensor> lce_backward_cpu(
    const at::Tensor& hidden, const at::Tensor& weight, const c10::optional<at::Tensor>& bias,
    const at::Tensor& target, const at::Tensor& lse, const at::Tensor& a, const at::Tensor& b,
    const at::Tensor& c, const at::Tensor& d, int64_t vocab_size, int64_t ignore_index, double logit_scale,
    double softcap, bool need_hidden, bool need_weight, bool need_bias);
}  // namespace cpu
}  // namespace lmfuse

namespace {

// filter_thresholds: one top-p threshold per row of logits [rows, V] (see
// lmfuse.ops._sampling.filter_thresholds).
at::Tensor filter_thresholds(const at::Tensor& logits, double inv_t, double top_p) {
  TORCH_CHECK(logits.device().is_cpu() && logits.is_contiguous() && logits.dim() == 2 && logits.size(1) >= 1,
              "filter_thresholds: logits must be a contiguous CPU [rows, V] tensor with V >= 1, got ",
              logits.sizes());
  const auto dt = logits.scalar_type();
  TORCH_CHECK(dt == at::kFloat || dt == at::kHalf || dt == at::kBFloat16 || dt == at::kDouble,
              "filter_thresholds: logits must be float32/float16/bfloat16/float64, got ", dt);
  TORCH_CHECK(std::isfinite(inv_t) && inv_t > 0, "filter_thresholds: inv_temperature must be finite and > 0");
  TORCH_CHECK(top_p > 0 && top_p < 1, "filter_thresholds: top_p must be in (0, 1), got ", top_p);
  return lmfuse::cpu::filter_thresholds_cpu(logits, inv_t, top_p);
}

// spec_verify: the Python op validated values (ids in range, n <= k, finite temperature); this
// re-checks what memory safety depends on (shapes, dtypes, contiguity, device).
std::tuple<at::Tensor, at::Tensor> spec_verify(const at::Tensor& ids, const c10::optional<at::Tensor>& draft,
                                               const at::Tensor& target, const at::Tensor& n_draft,
                                               const at::Tensor& u, const at::Tensor& seeds, double inv_t,
                                               const c10::optional<at::Tensor>& thr_t,
                                               const c10::optional<at::Tensor>& thr_d) {
  TORCH_CHECK(target.dim() == 3 && ids.dim() == 2 && ids.scalar_type() == at::kLong,
              "spec_verify: target [B, k+1, V] and int64 ids [B, k] expected");
  const int64_t B = ids.size(0), k = ids.size(1), V = target.size(2);
  TORCH_CHECK(target.size(0) == B && target.size(1) == k + 1, "spec_verify: target must be [B, k+1, V]");
  auto chk = [&](const at::Tensor& t, const char* name, at::ScalarType dt, std::vector<int64_t> shape) {
    TORCH_CHECK(t.device().is_cpu() && t.is_contiguous() && t.scalar_type() == dt && t.sizes() == at::IntArrayRef(shape),
                "spec_verify: '", name, "' must be a contiguous CPU ", dt, " tensor of shape ", shape, ", got ",
                t.scalar_type(), " ", t.sizes());
  };
  chk(target, "target_logits", target.scalar_type(), {B, k + 1, V});
  chk(ids, "draft_token_ids", at::kLong, {B, k});
  chk(n_draft, "num_draft_tokens", at::kLong, {B});
  chk(u, "accept_uniforms", at::kFloat, {B, k});
  chk(seeds, "seeds", at::kLong, {B, 2});
  if (draft.has_value() && draft->defined()) chk(*draft, "draft_logits", target.scalar_type(), {B, k, V});
  if (thr_t.has_value() && thr_t->defined()) chk(*thr_t, "target_threshold", at::kFloat, {B, k + 1});
  if (thr_d.has_value() && thr_d->defined()) chk(*thr_d, "draft_threshold", at::kFloat, {B, k});
  TORCH_CHECK(V < (int64_t(1) << 31), "spec_verify: V must be < 2^31");
  const int64_t* n = n_draft.data_ptr<int64_t>();
  for (int64_t b = 0; b < B; ++b) TORCH_CHECK(n[b] >= 0 && n[b] <= k, "spec_verify: num_draft_tokens out of [0, k]");
  return lmfuse::cpu::spec_verify_cpu(ids, draft, target, n_draft, u, seeds, inv_t, thr_t, thr_d);
}

// collab_decode_step: the Python op validated modes and values; this re-checks what memory safety
// depends on (shapes, dtypes, contiguity, device, which optional rows the mode reads).
std::tuple<at::Tensor, at::Tensor, at::Tensor, at::Tensor, at::Tensor> collab_decode_step(
    const at::Tensor& small, const c10::optional<at::Tensor>& large, const c10::optional<at::Tensor>& base,
    const std::string& mode, double log_alpha, double large_w, double small_w, double proxy_alpha, double inv_t,
    const c10::optional<at::Tensor>& threshold, const at::Tensor& seeds) {
  const int64_t m = mode == "none" ? 0 : mode == "contrastive" ? 1 : mode == "proxy" ? 2 : -1;
  TORCH_CHECK(m >= 0, "collab_decode_step: mode must be none/contrastive/proxy, got ", mode);
  TORCH_CHECK(small.dim() == 2 && small.size(0) >= 1 && small.size(1) >= 1 && small.size(1) < (int64_t(1) << 31),
              "collab_decode_step: small_logits must be [B, V] with B, V >= 1 and V < 2^31");
  const int64_t B = small.size(0), V = small.size(1);
  auto chk = [&](const at::Tensor& t, const char* name, at::ScalarType dt, std::vector<int64_t> shape) {
    TORCH_CHECK(t.device().is_cpu() && t.is_contiguous() && t.scalar_type() == dt && t.sizes() == at::IntArrayRef(shape),
                "collab_decode_step: '", name, "' must be a contiguous CPU ", dt, " tensor of shape ", shape,
                ", got ", t.scalar_type(), " ", t.sizes());
  };
  chk(small, "small_logits", small.scalar_type(), {B, V});
  const bool has_l = large.has_value() && large->defined(), has_b = base.has_value() && base->defined();
  TORCH_CHECK(has_l || m == 0, "collab_decode_step: mode ", mode, " needs large_logits");
  TORCH_CHECK(has_b == (m == 2), "collab_decode_step: small_base_logits is given iff mode is proxy");
  if (has_l) chk(*large, "large_logits", small.scalar_type(), {B, V});
  if (has_b) chk(*base, "small_base_logits", small.scalar_type(), {B, V});
  if (threshold.has_value() && threshold->defined()) chk(*threshold, "threshold", at::kFloat, {B});
  chk(seeds, "seeds", at::kLong, {B, 2});
  return lmfuse::cpu::collab_decode_step_cpu(small, large, base, m, log_alpha, large_w, small_w, proxy_alpha, inv_t,
                                             threshold, seeds);
}

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

// Shared by the two linear_cross_entropy entry points: what memory safety depends on (devices,
// dtypes, shapes, contiguity, vocab_size). Values (finite scales, coefficient semantics) are
// the Python op's business, except those that change which memory is read.
void check_lce_common(const char* fn, const at::Tensor& hidden, const at::Tensor& weight,
                      const c10::optional<at::Tensor>& bias, const at::Tensor& target, int64_t vocab_size,
                      int64_t ignore_index, double logit_scale, double softcap) {
  auto cpu_contig = [&](const at::Tensor& t, const char* name) {
    TORCH_CHECK(t.device().is_cpu() && t.is_contiguous(), fn, ": '", name,
                "' must be a contiguous CPU tensor, got device ", t.device(), ", strides ", t.strides());
  };
  cpu_contig(hidden, "hidden");
  cpu_contig(weight, "weight");
  cpu_contig(target, "target");
  const auto dt = hidden.scalar_type();
  TORCH_CHECK(dt == at::kFloat || dt == at::kBFloat16 || dt == at::kHalf, fn,
              ": 'hidden' must be float32/bfloat16/float16, got ", dt);
  TORCH_CHECK(hidden.dim() == 2 && hidden.size(1) >= 1, fn, ": 'hidden' must be [N, H] with H >= 1, got ",
              hidden.sizes());
  TORCH_CHECK(weight.dim() == 2 && weight.size(1) == hidden.size(1) && weight.scalar_type() == dt, fn,
              ": 'weight' must be [V, H] = [V, ", hidden.size(1), "] of dtype ", dt, ", got ",
              weight.scalar_type(), " ", weight.sizes());
  TORCH_CHECK(weight.size(0) < (int64_t(1) << 31), fn, ": 'weight' must have V < 2^31 rows, got ",
              weight.size(0));
  TORCH_CHECK(vocab_size >= 1 && vocab_size <= weight.size(0), fn, ": 'vocab_size' must be in [1, V = ",
              weight.size(0), "], got ", vocab_size);
  if (bias.has_value() && bias->defined()) {
    cpu_contig(*bias, "bias");
    TORCH_CHECK(bias->dim() == 1 && bias->size(0) == weight.size(0) && bias->scalar_type() == dt, fn,
                ": 'bias' must be [V] = [", weight.size(0), "] of dtype ", dt, ", got ", bias->scalar_type(),
                " ", bias->sizes());
  }
  TORCH_CHECK(target.scalar_type() == at::kLong && target.dim() == 1 && target.size(0) == hidden.size(0), fn,
              ": 'target' must be int64 [N] = [", hidden.size(0), "], got ", target.scalar_type(), " ",
              target.sizes());
  // Target values need no check: the kernels only compare them with vocabulary ranges (a target
  // outside [0, vocab_size) has no logit: z_target 0 and no one-hot term), never index with them.
  TORCH_CHECK(std::isfinite(logit_scale), fn, ": 'logit_scale' must be finite, got ", logit_scale);
  TORCH_CHECK(softcap == 0.0 || (std::isfinite(softcap) && softcap > 0), fn,
              ": 'softcap' must be finite and > 0 (0 for none), got ", softcap);
}

at::Tensor lce_chunk_grad_(at::Tensor u, const at::Tensor& target, const at::Tensor& tw, int64_t ignore_index,
                           double logit_scale, double softcap, double label_smoothing, double z_loss_scale,
                           bool want_grad) {
  const char* fn = "lce_chunk_grad_";
  const auto dt = u.scalar_type();
  TORCH_CHECK(u.device().is_cpu() && u.dim() == 2 && u.size(1) >= 1 && u.stride(1) == 1 && u.stride(0) >= u.size(1),
              fn, ": 'u' must be a CPU [rows, V'] tensor with V' >= 1 and unit stride along V', got ", u.sizes(),
              " strides ", u.strides(), " on ", u.device());
  TORCH_CHECK(dt == at::kFloat || dt == at::kBFloat16 || dt == at::kHalf, fn,
              ": 'u' must be float32/bfloat16/float16, got ", dt);
  const int64_t rows = u.size(0);
  TORCH_CHECK(target.device().is_cpu() && target.is_contiguous() && target.scalar_type() == at::kLong &&
                  target.dim() == 1 && target.size(0) == rows,
              fn, ": 'target' must be a contiguous CPU int64 [rows] = [", rows, "] tensor, got ", target.scalar_type(),
              " ", target.sizes());
  TORCH_CHECK(tw.device().is_cpu() && tw.is_contiguous() && tw.scalar_type() == at::kFloat && tw.dim() == 1 &&
                  tw.size(0) == rows,
              fn, ": 'tw' must be a contiguous CPU float32 [rows] = [", rows, "] tensor, got ", tw.scalar_type(), " ",
              tw.sizes());
  TORCH_CHECK(std::isfinite(logit_scale), fn, ": 'logit_scale' must be finite, got ", logit_scale);
  TORCH_CHECK(softcap == 0.0 || (std::isfinite(softcap) && softcap > 0), fn,
              ": 'softcap' must be finite and > 0 (0 for none), got ", softcap);
  TORCH_CHECK(label_smoothing >= 0 && label_smoothing <= 1, fn, ": 'label_smoothing' must be in [0, 1], got ",
              label_smoothing);
  TORCH_CHECK(z_loss_scale >= 0 && std::isfinite(z_loss_scale), fn, ": 'z_loss_scale' must be finite and >= 0, got ",
              z_loss_scale);
  return lmfuse::cpu::lce_chunk_grad_cpu(u, target, tw, ignore_index, logit_scale, softcap, label_smoothing,
                                         z_loss_scale, want_grad);
}

std::tuple<at::Tensor, at::Tensor, at::Tensor, at::Tensor, at::Tensor> lce_forward_stats(
    const at::Tensor& hidden, const at::Tensor& weight, const c10::optional<at::Tensor>& bias,
    const at::Tensor& target, int64_t vocab_size, int64_t ignore_index, double logit_scale, double softcap,
    bool want_sum_z, bool want_sum_pz, bool want_argmax) {
  check_lce_common("lce_forward_stats", hidden, weight, bias, target, vocab_size, ignore_index, logit_scale,
                   softcap);
  return lmfuse::cpu::lce_forward_stats_cpu(hidden, weight, bias, target, vocab_size, ignore_index, logit_scale,
                                            softcap, want_sum_z, want_sum_pz, want_argmax);
}

std::tuple<at::Tensor, at::Tensor, at::Tensor> lce_backward(
    const at::Tensor& hidden, const at::Tensor& weight, const c10::optional<at::Tensor>& bias,
    const at::Tensor& target, const at::Tensor& lse, const at::Tensor& a, const at::Tensor& b,
    const at::Tensor& c, const at::Tensor& d, int64_t vocab_size, int64_t ignore_index, double logit_scale,
    double softcap, bool need_hidden, bool need_weight, bool need_bias) {
  check_lce_common("lce_backward", hidden, weight, bias, target, vocab_size, ignore_index, logit_scale,
                   softcap);
  const int64_t N = hidden.size(0);
  const std::pair<const at::Tensor*, const char*> per_token[] = {{&lse, "lse"}, {&a, "a"}, {&b, "b"},
                                                                  {&c, "c"}, {&d, "d"}};
  for (const auto& [t, name] : per_token) {
    TORCH_CHECK(t->device().is_cpu() && t->is_contiguous() && t->scalar_type() == at::kFloat && t->dim() == 1 &&
                    t->size(0) == N,
                "lce_backward: '", name, "' must be a contiguous CPU float32 [N] = [", N, "] tensor, got ",
                t->scalar_type(), " ", t->sizes(), " on ", t->device());
  }
  TORCH_CHECK(!need_bias || (bias.has_value() && bias->defined()), "lce_backward: need_bias=True needs a bias");
  return lmfuse::cpu::lce_backward_cpu(hidden, weight, bias, target, lse, a, b, c, d, vocab_size, ignore_index,
                                       logit_scale, softcap, need_hidden, need_weight, need_bias);
}

}  // namespace

PYBIND11_MODULE(_C, m) {
  m.def("filter_thresholds", &filter_thresholds, py::arg("logits"), py::arg("inv_temperature"), py::arg("top_p"),
        "fp32 top-p threshold per row of [rows, V] logits (for top-k + top-p, pass the top-k values)");
  m.doc() = "lmfuse CPU kernels (C++17, OpenMP when available)";
  m.def("spec_verify", &spec_verify, py::arg("draft_token_ids"), py::arg("draft_logits"),
        py::arg("target_logits"), py::arg("num_draft_tokens"), py::arg("accept_uniforms"), py::arg("seeds"),
        py::arg("inv_temperature"), py::arg("target_threshold"), py::arg("draft_threshold"),
        py::call_guard<py::gil_scoped_release>(),
        "Speculative verification (see lmfuse.ops.spec_verify). Returns (tokens [B, k+1], num_accepted [B]); "
        "num_accepted is -1 for a row whose read logits hold NaN/+inf or no finite value.");
  m.def("collab_decode_step", &collab_decode_step, py::arg("small_logits"), py::arg("large_logits"),
        py::arg("small_base_logits"), py::arg("mode"), py::arg("log_alpha"), py::arg("large_weight"),
        py::arg("small_weight"), py::arg("proxy_alpha"), py::arg("inv_temperature"), py::arg("threshold"),
        py::arg("seeds"), py::call_guard<py::gil_scoped_release>(),
        "One collaborative decoding step (see lmfuse.ops.collab_decode_step). Returns (tokens [B] int64, "
        "entropy, top1, margin [B] float32, differs [B] bool); token -1 marks a row with NaN/+inf inputs or "
        "no finite combined logit.");
  m.def("lce_chunk_grad_", &lce_chunk_grad_, py::arg("u"), py::arg("target"), py::arg("tw"), py::arg("ignore_index"),
        py::arg("logit_scale"), py::arg("softcap"), py::arg("label_smoothing"), py::arg("z_loss_scale"),
        py::arg("want_grad"),
        "Per-token cross entropy of the raw logits chunk u [rows, V'] (z = softcap(logit_scale*u)) -> float32 "
        "[rows]; with want_grad, u is overwritten in place by d(sum tw*loss)/du in u's dtype.");
  m.def("lce_forward_stats", &lce_forward_stats, py::arg("hidden"), py::arg("weight"), py::arg("bias"),
        py::arg("target"), py::arg("vocab_size"), py::arg("ignore_index"), py::arg("logit_scale"),
        py::arg("softcap"), py::arg("want_sum_z"), py::arg("want_sum_pz"), py::arg("want_argmax"),
        py::call_guard<py::gil_scoped_release>(),
        "Per-token statistics of z = softcap(logit_scale * (hidden @ weight[:vocab_size].T + bias)) without "
        "materialising the logits (see lmfuse.ops._lce_cpu.forward_stats). softcap 0 means none. Returns "
        "(lse, z_target, sum_z, sum_pz) float32 [N] and argmax int64 [N]; unrequested outputs are empty.");
  m.def("lce_backward", &lce_backward, py::arg("hidden"), py::arg("weight"), py::arg("bias"), py::arg("target"),
        py::arg("lse"), py::arg("a"), py::arg("b"), py::arg("c"), py::arg("d"), py::arg("vocab_size"),
        py::arg("ignore_index"), py::arg("logit_scale"), py::arg("softcap"), py::arg("need_hidden"),
        py::arg("need_weight"), py::arg("need_bias"), py::call_guard<py::gil_scoped_release>(),
        "Gradients for dz = p*(a + d*z) + b*[v == target] + c chained through softcap and logit_scale (see "
        "lmfuse.ops._lce_cpu.backward). Returns (dhidden [N, H], dweight [V, H], dbias [V]); unrequested "
        "outputs are empty.");
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
