// CPU kernel of collab_decode_step (one collaborative decoding step), one row per parallel task.
//
// The same two passes as the Triton kernel (triton_kernels/collab_decode.py), over chunks of
// kChunk tokens converted once to fp32 in a stack buffer:
//   pass 1: online log-partitions of the rows the combination needs, and the small model's
//           statistics (shifted entropy accumulator, top-1 value/index, top-2 value). Per chunk
//           the max is found first, so the running sums are rescaled once per chunk, not once
//           per token (that would double the exp count);
//   pass 2: the combined logit of every token on the fly, then argmax (greedy) or the
//           exponential race argmax(scaled − ln E) with E from the counter hash of
//           python/lmfuse/ops/_sampling.py, so every backend emits the same tokens.
// Nothing of size V is stored; a row whose inputs hold NaN/+inf or whose combined logits are all
// −inf gets token −1 (the Python op raises).
#include <ATen/Parallel.h>
#include <torch/extension.h>

#include <algorithm>
#include <cmath>
#include <cstdint>
#include <string>
#include <tuple>

#include "cpu/vec8.h"

namespace lmfuse {
namespace cpu {
namespace {

#if defined(__GNUC__) && !defined(__clang__) && defined(__x86_64__) && defined(__linux__)
#define LMFUSE_CD_CLONES __attribute__((target_clones("arch=x86-64-v3", "default")))
#else
#define LMFUSE_CD_CLONES
#endif
// Everything a row does is forced inline into the cloned run_rows: a function left out of line
// is compiled for baseline x86-64 only (SSE2, 32-byte vectors passed through memory), which
// measured ~3x slower than eager PyTorch.
#define LMFUSE_CD_INLINE __attribute__((always_inline)) inline

constexpr int64_t kChunk = 1024;  // 4 KiB of fp32 per stream: stays in L1 between the sub-passes

struct Params {
  int mode;  // 0 none, 1 contrastive, 2 proxy
  bool has_large, greedy;
  int64_t V;
  float log_alpha, large_w, small_w, proxy_alpha, inv_t;
  const float* thr;  // [B] or null
  const int64_t* seeds;
  int64_t* tok;
  float *ent, *top1, *margin;
  bool* differs;
};

// Running log-partition: max m and Σ e^{x−m}; `a` (optional) holds Σ e^{x−m}(x−m).
struct Lse {
  float m = -kInf8;
  vf8 z = vsplat(0.0f), a = vsplat(0.0f);
  // Fold one chunk (n values in buf, n <= kChunk, tail padded with −inf to a multiple of 8).
  LMFUSE_CD_INLINE void fold(const float* buf, int64_t n, bool with_a) {
    vf8 cm = vsplat(-kInf8);
    for (int64_t j = 0; j < n; j += 8) cm = vmax8(cm, vload(buf + j, 8, 0.0f));
    const float m_new = std::max(m, vhmax(cm));
    if (m_new == -kInf8) return;  // nothing finite yet
    if (m != m_new) {
      const float shift = m - m_new;  // −inf on the first finite chunk: the sums are still 0
      const float f = m == -kInf8 ? 0.0f : std::exp(shift);
      if (with_a) a = (a + (m == -kInf8 ? vsplat(0.0f) : vsplat(shift) * z)) * vsplat(f);
      z = z * vsplat(f);
      m = m_new;
    }
    const vf8 mv = vsplat(m);
    for (int64_t j = 0; j < n; j += 8) {
      const vf8 d = vload(buf + j, 8, 0.0f) - mv;
      const vf8 e = vexp(d);
      z += e;
      if (with_a) a += e > vsplat(0.0f) ? e * d : vsplat(0.0f);
    }
  }
  float lse() const { return (m == -kInf8 ? 0.0f : m) + std::log(vhsum(z)); }
};

template <typename T>
LMFUSE_CD_INLINE void to_f32(const T* src, int64_t n, float* dst, vi8& bad) {
  for (int64_t j = 0; j < n; j += 8) {
    const vf8 x = vload(src + j, n - j, -kInf8);
    bad |= ~(x < vsplat(kInf8));  // NaN or +inf
    std::memcpy(dst + j, &x, sizeof(x));
  }
}

template <typename T>
LMFUSE_CD_INLINE void decode_row(const Params& P, const T* S, const T* L, const T* Sb, int64_t b) {
  const int64_t V = P.V;
  alignas(32) float bs[kChunk], bl[kChunk], bb[kChunk];
  vi8 bad = vsplati(0), bad_stats = vsplati(0);  // small row: bad only when it feeds the combination
  const bool small_feeds = P.mode != 0 || !P.has_large;
  // ---- pass 1 ----
  Lse ls, ll, lb;
  vf8 t1 = vsplat(-kInf8), t2 = vsplat(-kInf8);
  vi8 t1i = vsplati(0);
  for (int64_t v0 = 0; v0 < V; v0 += kChunk) {
    const int64_t n = std::min(kChunk, V - v0);
    to_f32(S + v0, n, bs, small_feeds ? bad : bad_stats);
    for (int64_t j = 0; j < n; j += 8) {  // lane-wise top-2
      const vf8 x = vload(bs + j, 8, 0.0f);
      const vi8 gt = x > t1;
      t2 = gt ? t1 : vmax8(t2, x);
      t1i = gt ? vi8{0, 1, 2, 3, 4, 5, 6, 7} + vsplati(static_cast<int32_t>(v0 + j)) : t1i;
      t1 = gt ? x : t1;
    }
    ls.fold(bs, n, true);
    if (P.has_large) {
      to_f32(L + v0, n, bl, bad);
      if (P.mode != 0) ll.fold(bl, n, false);
    }
    if (P.mode == 2) {
      to_f32(Sb + v0, n, bb, bad);
      lb.fold(bb, n, false);
    }
  }
  // lanes → row: top-1 = max (first index), top-2 = best of the other lanes' top-1 and all top-2
  float m1 = vhmax(t1);
  int lane = 0;
  int64_t arg_s = std::numeric_limits<int64_t>::max();
  for (int j = 0; j < 8; ++j)
    if (t1[j] == m1 && t1i[j] < arg_s) arg_s = t1i[j], lane = j;
  float m2 = -kInf8;
  for (int j = 0; j < 8; ++j) m2 = std::max(m2, std::max(t2[j], j == lane ? -kInf8 : t1[j]));
  const float z_s = vhsum(ls.z), a_s = vhsum(ls.a);
  const float lse_s = ls.lse(), lse_l = ll.lse(), lse_b = lb.lse();
  const float cut = (ll.m - lse_l) + P.log_alpha;
  const float thr = P.thr ? P.thr[b] : -kInf8;
  const uint32_t s0 = static_cast<uint32_t>(P.seeds[2 * b]), s1 = static_cast<uint32_t>(P.seeds[2 * b + 1]);
  // ---- pass 2 ----
  VArgMax am;
  const vf8 ninf = vsplat(-kInf8);
  for (int64_t v0 = 0; v0 < V; v0 += kChunk) {
    const int64_t n = std::min(kChunk, V - v0);
    vi8 ignore = vsplati(0);
    const bool need_s = P.mode != 0 || !P.has_large;
    if (need_s) to_f32(S + v0, n, bs, ignore);
    if (P.has_large) to_f32(L + v0, n, bl, ignore);
    if (P.mode == 2) to_f32(Sb + v0, n, bb, ignore);
    for (int64_t j = 0; j < n; j += 8) {
      vf8 c;
      if (P.mode == 0) {
        c = vload((P.has_large ? bl : bs) + j, 8, 0.0f);
      } else {
        const vf8 lp_s = vload(bs + j, 8, 0.0f) - vsplat(lse_s);
        const vf8 lp_l = vload(bl + j, 8, 0.0f) - vsplat(lse_l);
        if (P.mode == 1) {
          c = vsplat(P.large_w) * lp_l - vsplat(P.small_w) * lp_s;
          const vi8 fin = (c > ninf) & (c < vsplat(kInf8));  // false for NaN too
          c = (lp_l >= vsplat(cut)) & fin ? c : ninf;
        } else {
          const vf8 lp_b = vload(bb + j, 8, 0.0f) - vsplat(lse_b);
          c = lp_l + vsplat(P.proxy_alpha) * (lp_s - lp_b);
          c = (lp_l == ninf) | (lp_s == ninf) | (lp_b == ninf) ? ninf : c;
        }
      }
      const int64_t valid = n - j;
      if (valid < 8) c = vi8{0, 1, 2, 3, 4, 5, 6, 7} < vsplati(static_cast<int32_t>(valid)) ? c : ninf;
      if (!P.greedy) {
        const vf8 sc = c * vsplat(P.inv_t);
        c = (sc >= vsplat(thr)) & (sc > ninf) ? sc - vlog_noise(v0 + j, s0, s1) : ninf;
      }
      am.update(c, static_cast<int32_t>(v0 + j));
    }
  }
  const auto best = am.reduce();
  const int64_t tok = (vany(bad) || !(best.first > -kInf8)) ? -1 : best.second;
  P.tok[b] = tok;
  P.ent[b] = std::log(z_s) - a_s / z_s;
  P.top1[b] = 1.0f / z_s;
  P.margin[b] = (1.0f - std::exp(m2 - (m1 == -kInf8 ? 0.0f : m1))) / z_s;
  P.differs[b] = tok != arg_s;
}

LMFUSE_CD_CLONES void run_rows(const Params& P, const float* S, const float* L, const float* Sb, int64_t b0,
                               int64_t b1) {
  for (int64_t b = b0; b < b1; ++b) decode_row(P, S + b * P.V, L + b * P.V, Sb + b * P.V, b);
}
LMFUSE_CD_CLONES void run_rows(const Params& P, const at::BFloat16* S, const at::BFloat16* L,
                               const at::BFloat16* Sb, int64_t b0, int64_t b1) {
  for (int64_t b = b0; b < b1; ++b) decode_row(P, S + b * P.V, L + b * P.V, Sb + b * P.V, b);
}
LMFUSE_CD_CLONES void run_rows(const Params& P, const at::Half* S, const at::Half* L, const at::Half* Sb,
                               int64_t b0, int64_t b1) {
  for (int64_t b = b0; b < b1; ++b) decode_row(P, S + b * P.V, L + b * P.V, Sb + b * P.V, b);
}

}  // namespace

std::tuple<at::Tensor, at::Tensor, at::Tensor, at::Tensor, at::Tensor> collab_decode_step_cpu(
    const at::Tensor& small, const c10::optional<at::Tensor>& large, const c10::optional<at::Tensor>& base,
    int64_t mode, double log_alpha, double large_w, double small_w, double proxy_alpha, double inv_t,
    const c10::optional<at::Tensor>& threshold, const at::Tensor& seeds) {
  const int64_t B = small.size(0), V = small.size(1);
  const bool has_l = large.has_value() && large->defined(), has_b = base.has_value() && base->defined();
  at::Tensor tok = at::empty({B}, small.options().dtype(at::kLong));
  auto f32 = small.options().dtype(at::kFloat);
  at::Tensor ent = at::empty({B}, f32), top1 = at::empty({B}, f32), margin = at::empty({B}, f32);
  at::Tensor differs = at::empty({B}, small.options().dtype(at::kBool));
  Params P{static_cast<int>(mode), has_l, inv_t == 0.0, V, static_cast<float>(log_alpha),
           static_cast<float>(large_w), static_cast<float>(small_w), static_cast<float>(proxy_alpha),
           static_cast<float>(inv_t),
           threshold.has_value() && threshold->defined() ? threshold->data_ptr<float>() : nullptr,
           seeds.data_ptr<int64_t>(), tok.data_ptr<int64_t>(), ent.data_ptr<float>(), top1.data_ptr<float>(),
           margin.data_ptr<float>(), differs.data_ptr<bool>()};
  const void* lp = has_l ? large->data_ptr() : small.data_ptr();
  const void* bp = has_b ? base->data_ptr() : small.data_ptr();
  auto go = [&](auto* s) {
    using Ptr = decltype(s);
    // small calls run inline: waking the OpenMP team costs more than ~256K logits of work
    const int64_t grain = std::max<int64_t>(1, (int64_t(1) << 18) / std::max<int64_t>(1, 3 * V));
    at::parallel_for(0, B, grain, [&](int64_t b0, int64_t b1) {
      run_rows(P, s, static_cast<Ptr>(lp), static_cast<Ptr>(bp), b0, b1);
    });
  };
  switch (small.scalar_type()) {
    case at::kFloat: go(static_cast<const float*>(small.data_ptr())); break;
    case at::kBFloat16: go(static_cast<const at::BFloat16*>(small.data_ptr())); break;
    case at::kHalf: go(static_cast<const at::Half*>(small.data_ptr())); break;
    default: TORCH_CHECK(false, "collab_decode_step (cpp): logits must be float32/bfloat16/float16, got ",
                         small.scalar_type());
  }
  return {tok, ent, top1, margin, differs};
}

}  // namespace cpu
}  // namespace lmfuse
