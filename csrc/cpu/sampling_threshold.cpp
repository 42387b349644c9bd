// Top-k / top-p thresholds on the CPU without sorting the vocabulary.
//
// The contract is the top-p part of lmfuse.ops._sampling.filter_thresholds_reference: for each
// row of scaled logits x = float(logit) * inv_t, a token is kept iff x >= threshold, where
//   sort x descending, probs = softmax, before_i = mass strictly above position i,
//   keep = max(1, #{i : before_i < p}), threshold = sorted[keep - 1].
// With top-k as well, the caller hands over only the k largest values of each row (torch.topk).
//
// The reference sorts all V values per row. Here the candidates are consumed from the top in growing blocks: nth_element brings the
// next `block` largest values to the front of what is left, only those are sorted, and the walk
// down the sorted order stops as soon as the mass above reaches p. Typical next-token
// distributions keep tens to hundreds of tokens, so this is O(V) per row; a flat distribution
// degrades gracefully to O(V log V) (the block doubles each round).
//
// The mass is accumulated in double (the reference: fp32 softmax, cumsum accumulated in double
// and stored in fp32), so the two agree except where before_i lies within rounding of p.
#include <torch/extension.h>

#include <algorithm>
#include <cmath>
#include <functional>
#include <limits>
#include <vector>

namespace lmfuse {
namespace cpu {
namespace {

float row_threshold(std::vector<float>& x, double top_p) {
  auto first = x.begin();
  const int64_t n = static_cast<int64_t>(x.size());
  float m = -std::numeric_limits<float>::infinity();
  for (int64_t i = 0; i < n; ++i) m = std::max(m, x[i]);
  if (m == -std::numeric_limits<float>::infinity()) return m;  // nothing finite: the reference keeps all
  double z = 0.0;
  for (int64_t i = 0; i < n; ++i) z += std::exp(static_cast<double>(x[i] - m));
  const double target = top_p * z;  // stop at the first position whose mass above is >= p·Z
  double above = 0.0;
  float last_kept = m;
  int64_t done = 0, block = 64;
  while (done < n) {
    const int64_t take = std::min(block, n - done);
    auto lo = first + done, hi = first + n;
    if (take < n - done) std::nth_element(lo, lo + (take - 1), hi, std::greater<float>());
    std::sort(lo, lo + take, std::greater<float>());
    for (int64_t i = 0; i < take; ++i) {
      if (above >= target) return last_kept;
      last_kept = lo[i];
      above += std::exp(static_cast<double>(lo[i] - m));
    }
    done += take;
    block *= 2;
  }
  return last_kept;  // p reached only by the last candidate
}

template <typename T>
void rows_thresholds(const T* logits, int64_t rows, int64_t V, float inv_t, double top_p,
                     float* out) {
#pragma omp parallel
  {
    std::vector<float> buf(static_cast<size_t>(V));
#pragma omp for schedule(dynamic, 1)
    for (int64_t r = 0; r < rows; ++r) {
      const T* row = logits + r * V;
      // fp32 product, as the reference's x.to(float32) * inv_t
      for (int64_t j = 0; j < V; ++j) {
        const float v = static_cast<float>(row[j]) * inv_t;
        // callers reject NaN logits; mapping them keeps the sorts well-defined regardless
        buf[j] = std::isnan(v) ? -std::numeric_limits<float>::infinity() : v;
      }
      out[r] = row_threshold(buf, top_p);
    }
  }
}

}  // namespace

// logits [rows, V] contiguous CPU, float32 / float16 / bfloat16 / float64 (for top-k + top-p, the
// caller passes the top-k values only); 0 < top_p < 1. Returns float32 [rows].
at::Tensor filter_thresholds_cpu(const at::Tensor& logits, double inv_t, double top_p) {
  const int64_t rows = logits.size(0), V = logits.size(1);
  auto out = at::empty({rows}, logits.options().dtype(at::kFloat));
  float* o = out.data_ptr<float>();
  const float it = static_cast<float>(inv_t);
  switch (logits.scalar_type()) {
    case at::kFloat: rows_thresholds(logits.data_ptr<float>(), rows, V, it, top_p, o); break;
    case at::kDouble: rows_thresholds(logits.data_ptr<double>(), rows, V, it, top_p, o); break;
    case at::kBFloat16:
      rows_thresholds(static_cast<const at::BFloat16*>(logits.data_ptr()), rows, V, it, top_p, o);
      break;
    case at::kHalf: rows_thresholds(static_cast<const at::Half*>(logits.data_ptr()), rows, V, it, top_p, o); break;
    default: TORCH_CHECK(false, "filter_thresholds: unsupported dtype ", logits.scalar_type());
  }
  return out;
}

}  // namespace cpu
}  // namespace lmfuse
