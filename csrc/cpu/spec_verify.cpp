// CPU kernel of spec_verify (speculative-sampling verification), one request per parallel task.
//
// Works on the logits directly; nothing of size V is stored. Per request and per position it
// needs, it streams the row twice (max, then sum of exp: the row is still in L2 for the second
// pass) to get the temperature-scaled, threshold-filtered log-partition, tests the draft token,
// and stops at the first rejection; one more pass samples the correction/bonus token with the
// exponential race argmax_v w_v / E_v, where E_v = -log(u_v) comes from the counter-based hash
// shared with every other backend (python/lmfuse/ops/_sampling.py), so all backends agree.
//
// Why hand-written vector code: std::exp/std::log are scalar calls (~10 ns each, and there are
// ~V of them per pass); the polynomial versions in cpu/vec8.h run 8 lanes per instruction with GCC's
// vector extensions, and the worker is cloned for x86-64-v3 (AVX2+FMA) because the build
// targets baseline x86-64.
#include <ATen/Parallel.h>
#include <torch/extension.h>

#include <algorithm>
#include <cmath>
#include <cstdint>
#include <cstring>
#include <limits>
#include <tuple>

#include "cpu/vec8.h"

namespace lmfuse {
namespace cpu {
namespace {

#if defined(__GNUC__) && !defined(__clang__) && defined(__x86_64__) && defined(__linux__)
#define LMFUSE_SV_CLONES __attribute__((target_clones("arch=x86-64-v3", "default")))
#else
#define LMFUSE_SV_CLONES
#endif

constexpr float kInf = kInf8;

// The 8-lane helpers (vexp, vlog, the noise hash, vload, VArgMax) are shared with
// collab_decode.cpp in cpu/vec8.h. Every function a row calls is forced inline into the cloned
// run_rows: left out of line it would be compiled for baseline x86-64 only, and it measured
// ~2.7x slower that way.
#define LMFUSE_SV_INLINE __attribute__((always_inline)) inline

struct Dist {  // one filtered, temperature-scaled distribution: logit row, scale, threshold
  float inv_t, thr, lse;
};

// log-partition of row x (V entries) under `d`; false on NaN/+inf or no kept finite logit.
template <typename T>
LMFUSE_SV_INLINE bool log_partition(const T* x, int64_t V, Dist& d) {
  vf8 m = vsplat(-kInf);
  vi8 bad = vsplati(0);
  for (int64_t v = 0; v < V; v += 8) {
    const vf8 xv = vload(x + v, V - v, -kInf);
    bad |= ~(xv < vsplat(kInf));  // NaN or +inf
    const vf8 s = xv * vsplat(d.inv_t);
    m = vmax8(m, s >= vsplat(d.thr) ? s : vsplat(-kInf));
  }
  for (int j = 0; j < 8; ++j)
    if (bad[j]) return false;
  const float mx = vhmax(m);
  if (!(mx > -kInf)) return false;
  vf8 acc = vsplat(0.0f);
  for (int64_t v = 0; v < V; v += 8) {
    const vf8 s = vload(x + v, V - v, -kInf) * vsplat(d.inv_t);
    acc += s >= vsplat(d.thr) ? vexp(s - vsplat(mx)) : vsplat(0.0f);
  }
  d.lse = mx + std::log(vhsum(acc));
  return true;
}

template <typename T>
LMFUSE_SV_INLINE float prob_of(const T* x, int64_t tok, const Dist& d) {
  const float s = static_cast<float>(x[tok]) * d.inv_t;
  return s >= d.thr ? std::exp(s - d.lse) : 0.0f;
}

// Greedy: first index of the max logit; -1 on NaN/+inf or an all -inf row.
template <typename T>
LMFUSE_SV_INLINE int64_t row_argmax(const T* x, int64_t V) {
  VArgMax am;
  vi8 bad = vsplati(0);
  for (int64_t v = 0; v < V; v += 8) {
    const vf8 xv = vload(x + v, V - v, -kInf);
    bad |= ~(xv < vsplat(kInf));
    am.update(xv, static_cast<int32_t>(v));
  }
  for (int j = 0; j < 8; ++j)
    if (bad[j]) return -1;
  auto r = am.reduce();
  return r.first > -kInf ? r.second : -1;
}

// Sample argmax_v w_v / E_v with w = p (q_row == null and det_tok < 0), max(p - q, 0) against
// the draft distribution, or p with det_tok removed (deterministic drafter). Returns -1 when
// every weight is 0 (p == q up to rounding); the caller then samples from p.
template <typename T>
LMFUSE_SV_INLINE int64_t race(const T* p_row, const Dist& p, const T* q_row, const Dist* q, int64_t det_tok, int64_t V,
             uint32_t s0, uint32_t s1) {
  VArgMax am;
  for (int64_t v = 0; v < V; v += 8) {
    const vf8 sp = vload(p_row + v, V - v, -kInf) * vsplat(p.inv_t);
    vf8 w = sp >= vsplat(p.thr) ? vexp(sp - vsplat(p.lse)) : vsplat(0.0f);
    if (q_row != nullptr) {
      const vf8 sq = vload(q_row + v, V - v, -kInf) * vsplat(q->inv_t);
      const vf8 pq = sq >= vsplat(q->thr) ? vexp(sq - vsplat(q->lse)) : vsplat(0.0f);
      w = vmax8(w - pq, vsplat(0.0f));
    } else if (det_tok >= v && det_tok < v + 8) {
      w[det_tok - v] = 0.0f;
    }
    am.update(w / vnoise_exp(v, s0, s1), static_cast<int32_t>(v));
  }
  auto r = am.reduce();
  return r.first > 0.0f ? r.second : -1;
}

struct Args {
  const int64_t* ids;
  const int64_t* n_draft;
  const float* u;
  const int64_t* seeds;
  const float* thr_t;  // nullable
  const float* thr_d;  // nullable
  int64_t* tokens;
  int64_t* n_acc;
  int64_t k, V;
  float inv_t;
};

// Returns num_accepted for row b (tokens written), or -1 for invalid logits.
template <typename T>
LMFUSE_SV_INLINE int64_t verify_row(const Args& a, const T* tgt, const T* drf, int64_t b) {
  const int64_t k = a.k, V = a.V, n = a.n_draft[b];
  const int64_t* ids = a.ids + b * k;
  const T* trow = tgt + b * (k + 1) * V;
  if (a.inv_t == 0.0f) {  // greedy
    for (int64_t i = 0; i <= n; ++i) {
      const int64_t best = row_argmax(trow + i * V, V);
      if (best < 0) return -1;
      if (i == n || best != ids[i]) {
        a.tokens[b * (k + 1) + i] = best;
        return i;
      }
      a.tokens[b * (k + 1) + i] = ids[i];
    }
  }
  const uint32_t s0 = static_cast<uint32_t>(a.seeds[2 * b]), s1 = static_cast<uint32_t>(a.seeds[2 * b + 1]);
  for (int64_t i = 0; i <= n; ++i) {
    const T* tp = trow + i * V;
    Dist p{a.inv_t, a.thr_t ? a.thr_t[b * (k + 1) + i] : -kInf, 0.0f};
    if (!log_partition(tp, V, p)) return -1;
    int64_t out = -1;
    if (i == n) {  // all accepted: bonus token from p_n
      out = race<T>(tp, p, nullptr, nullptr, -1, V, s0, s1);
    } else {
      const int64_t x = ids[i];
      const T* qp = drf ? drf + (b * k + i) * V : nullptr;
      Dist q{a.inv_t, a.thr_d ? a.thr_d[b * k + i] : -kInf, 0.0f};
      if (qp && !log_partition(qp, V, q)) return -1;
      const float px = prob_of(tp, x, p);
      const float qx = qp ? prob_of(qp, x, q) : 1.0f;
      if (a.u[b * k + i] * qx < px) {
        a.tokens[b * (k + 1) + i] = x;
        continue;
      }
      out = race<T>(tp, p, qp, qp ? &q : nullptr, qp ? -1 : x, V, s0, s1);
      if (out < 0) out = race<T>(tp, p, nullptr, nullptr, -1, V, s0, s1);
    }
    a.tokens[b * (k + 1) + i] = out;
    return i;
  }
  return -1;  // unreachable: the loop always returns at i == n
}

LMFUSE_SV_CLONES void run_rows(const Args& a, const float* t, const float* d, int64_t b0, int64_t b1) {
  for (int64_t b = b0; b < b1; ++b) a.n_acc[b] = verify_row(a, t, d, b);
}
LMFUSE_SV_CLONES void run_rows(const Args& a, const at::BFloat16* t, const at::BFloat16* d, int64_t b0, int64_t b1) {
  for (int64_t b = b0; b < b1; ++b) a.n_acc[b] = verify_row(a, t, d, b);
}
LMFUSE_SV_CLONES void run_rows(const Args& a, const at::Half* t, const at::Half* d, int64_t b0, int64_t b1) {
  for (int64_t b = b0; b < b1; ++b) a.n_acc[b] = verify_row(a, t, d, b);
}

}  // namespace

std::tuple<at::Tensor, at::Tensor> spec_verify_cpu(const at::Tensor& ids, const c10::optional<at::Tensor>& draft,
                                                   const at::Tensor& target, const at::Tensor& n_draft,
                                                   const at::Tensor& u, const at::Tensor& seeds, double inv_t,
                                                   const c10::optional<at::Tensor>& thr_t,
                                                   const c10::optional<at::Tensor>& thr_d) {
  const int64_t B = ids.size(0), k = ids.size(1), V = target.size(2);
  at::Tensor tokens = at::full({B, k + 1}, -1, ids.options());
  at::Tensor n_acc = at::empty({B}, ids.options());
  const bool has_d = draft.has_value() && draft->defined();
  Args a{ids.data_ptr<int64_t>(), n_draft.data_ptr<int64_t>(), u.data_ptr<float>(), seeds.data_ptr<int64_t>(),
         thr_t.has_value() && thr_t->defined() ? thr_t->data_ptr<float>() : nullptr,
         thr_d.has_value() && thr_d->defined() ? thr_d->data_ptr<float>() : nullptr,
         tokens.data_ptr<int64_t>(), n_acc.data_ptr<int64_t>(), k, V, static_cast<float>(inv_t)};
  const void* dp = has_d ? draft->data_ptr() : nullptr;
  auto go = [&](auto* t) {
    using P = decltype(t);
    // Small calls run inline: waking the OpenMP team costs more than ~256K logits of work.
    const int64_t grain = std::max<int64_t>(1, (int64_t(1) << 18) / std::max<int64_t>(1, (2 * k + 1) * V));
    at::parallel_for(0, B, grain, [&](int64_t b0, int64_t b1) { run_rows(a, t, static_cast<P>(dp), b0, b1); });
  };
  switch (target.scalar_type()) {
    case at::kFloat: go(static_cast<const float*>(target.data_ptr())); break;
    case at::kBFloat16: go(static_cast<const at::BFloat16*>(target.data_ptr())); break;
    case at::kHalf: go(static_cast<const at::Half*>(target.data_ptr())); break;
    default: TORCH_CHECK(false, "spec_verify (cpp): logits must be float32/bfloat16/float16, got ", target.scalar_type());
  }
  return {tokens, n_acc};
}

}  // namespace cpu
}  // namespace lmfuse
