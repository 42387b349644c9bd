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
// ~V of them per pass); the polynomial versions below run 8 lanes per instruction with GCC's
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

namespace lmfuse {
namespace cpu {
namespace {

#if defined(__GNUC__) && !defined(__clang__) && defined(__x86_64__) && defined(__linux__)
#define LMFUSE_SV_CLONES __attribute__((target_clones("arch=x86-64-v3", "default")))
#else
#define LMFUSE_SV_CLONES
#endif

typedef float vf8 __attribute__((vector_size(32)));
typedef int32_t vi8 __attribute__((vector_size(32)));
typedef uint32_t vu8 __attribute__((vector_size(32)));

constexpr float kInf = std::numeric_limits<float>::infinity();

inline vf8 splat(float v) { return vf8{v, v, v, v, v, v, v, v}; }
inline vi8 splati(int32_t v) { return vi8{v, v, v, v, v, v, v, v}; }
inline vf8 vmax(vf8 a, vf8 b) { return a > b ? a : b; }

// exp(x) for x <= 88; results below exp(-87) are flushed to 0 (callers pass x <= 0).
inline vf8 fast_exp(vf8 x) {
  const vf8 xc = vmax(x, splat(-87.0f));
  const vf8 magic = splat(12582912.0f);  // 1.5·2^23: adding it rounds to an integer
  const vf8 t = xc * splat(1.44269504088896341f) + magic;
  const vf8 n = t - magic;
  const vi8 ni = (vi8)t - (vi8)magic;
  const vf8 r = xc - n * splat(0.693359375f) - n * splat(-2.12194440e-4f);  // Cody-Waite split of ln 2
  vf8 p = splat(1.0f / 5040.0f);
  p = p * r + splat(1.0f / 720.0f);
  p = p * r + splat(1.0f / 120.0f);
  p = p * r + splat(1.0f / 24.0f);
  p = p * r + splat(1.0f / 6.0f);
  p = p * r + splat(0.5f);
  p = p * r + splat(1.0f);
  p = p * r + splat(1.0f);
  const vf8 scale = (vf8)((ni + splati(127)) << 23);
  return x < splat(-87.0f) ? splat(0.0f) : p * scale;
}

// log(x) for normal positive x (the noise uniforms lie in [2^-24, 1 - 2^-24]).
inline vf8 fast_log(vf8 x) {
  const vi8 bits = (vi8)x;
  vi8 e = ((bits >> 23) & splati(0xff)) - splati(127);
  vf8 m = (vf8)((bits & splati(0x7fffff)) | splati(0x3f800000));  // [1, 2)
  const vi8 big = m > splat(1.41421356f);
  m = big ? m * splat(0.5f) : m;
  e = e - big;  // big is -1 where true
  const vf8 t = (m - splat(1.0f)) / (m + splat(1.0f));
  const vf8 t2 = t * t;
  vf8 s = splat(1.0f / 9.0f);
  s = s * t2 + splat(1.0f / 7.0f);
  s = s * t2 + splat(1.0f / 5.0f);
  s = s * t2 + splat(1.0f / 3.0f);
  s = s * t2 + splat(1.0f);
  const vf8 ef = __builtin_convertvector(e, vf8);
  return ef * splat(0.693147180559945f) + splat(2.0f) * t * s;
}

inline vu8 mix32(vu8 x) {
  x ^= x >> 16;
  x *= 0x7FEB352Du;
  x ^= x >> 15;
  x *= 0x846CA68Bu;
  x ^= x >> 16;
  return x;
}

// Exp(1) noise of tokens v0..v0+7 for one row (see _sampling.py for the definition).
inline vf8 noise_exp(int64_t v0, uint32_t s0, uint32_t s1) {
  const uint32_t b = static_cast<uint32_t>(v0);
  const vu8 v = vu8{b, b + 1, b + 2, b + 3, b + 4, b + 5, b + 6, b + 7};
  const vu8 h = mix32(mix32(v ^ s0) ^ s1);
  const vf8 u = (__builtin_convertvector(h >> 9, vf8) + splat(0.5f)) * splat(1.0f / 8388608.0f);
  return -fast_log(u);
}

template <typename T>
inline vf8 load8(const T* p, int64_t valid, float fill) {
  float buf[8];
  if (valid >= 8) {  // the common case, kept branch-free so it vectorises
    for (int j = 0; j < 8; ++j) buf[j] = static_cast<float>(p[j]);
  } else {
    for (int j = 0; j < 8; ++j) buf[j] = j < valid ? static_cast<float>(p[j]) : fill;
  }
  vf8 v;
  std::memcpy(&v, buf, sizeof(v));
  return v;
}

inline float hmax(vf8 v) {
  float m = v[0];
  for (int j = 1; j < 8; ++j) m = v[j] > m ? v[j] : m;
  return m;
}

inline float hsum(vf8 v) {
  float s = 0.0f;
  for (int j = 0; j < 8; ++j) s += v[j];
  return s;
}

// Lane-wise running argmax, strict ">" so each lane keeps its first maximum; the reduction then
// picks the smallest index among the lanes holding the maximum (= torch.argmax's first index).
struct ArgMax8 {
  vf8 best = splat(-kInf);
  vi8 idx = splati(0);
  void update(vf8 v, int32_t base) {
    const vi8 lane = vi8{0, 1, 2, 3, 4, 5, 6, 7} + splati(base);
    const vi8 gt = v > best;
    best = gt ? v : best;
    idx = gt ? lane : idx;
  }
  std::pair<float, int64_t> reduce() const {
    float m = hmax(best);
    int64_t i = std::numeric_limits<int64_t>::max();
    for (int j = 0; j < 8; ++j)
      if (best[j] == m && idx[j] < i) i = idx[j];
    return {m, i};
  }
};

struct Dist {  // one filtered, temperature-scaled distribution: logit row, scale, threshold
  float inv_t, thr, lse;
};

// log-partition of row x (V entries) under `d`; false on NaN/+inf or no kept finite logit.
template <typename T>
bool log_partition(const T* x, int64_t V, Dist& d) {
  vf8 m = splat(-kInf);
  vi8 bad = splati(0);
  for (int64_t v = 0; v < V; v += 8) {
    const vf8 xv = load8(x + v, V - v, -kInf);
    bad |= ~(xv < splat(kInf));  // NaN or +inf
    const vf8 s = xv * splat(d.inv_t);
    m = vmax(m, s >= splat(d.thr) ? s : splat(-kInf));
  }
  for (int j = 0; j < 8; ++j)
    if (bad[j]) return false;
  const float mx = hmax(m);
  if (!(mx > -kInf)) return false;
  vf8 acc = splat(0.0f);
  for (int64_t v = 0; v < V; v += 8) {
    const vf8 s = load8(x + v, V - v, -kInf) * splat(d.inv_t);
    acc += s >= splat(d.thr) ? fast_exp(s - splat(mx)) : splat(0.0f);
  }
  d.lse = mx + std::log(hsum(acc));
  return true;
}

template <typename T>
float prob_of(const T* x, int64_t tok, const Dist& d) {
  const float s = static_cast<float>(x[tok]) * d.inv_t;
  return s >= d.thr ? std::exp(s - d.lse) : 0.0f;
}

// Greedy: first index of the max logit; -1 on NaN/+inf or an all -inf row.
template <typename T>
int64_t row_argmax(const T* x, int64_t V) {
  ArgMax8 am;
  vi8 bad = splati(0);
  for (int64_t v = 0; v < V; v += 8) {
    const vf8 xv = load8(x + v, V - v, -kInf);
    bad |= ~(xv < splat(kInf));
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
int64_t race(const T* p_row, const Dist& p, const T* q_row, const Dist* q, int64_t det_tok, int64_t V,
             uint32_t s0, uint32_t s1) {
  ArgMax8 am;
  for (int64_t v = 0; v < V; v += 8) {
    const vf8 sp = load8(p_row + v, V - v, -kInf) * splat(p.inv_t);
    vf8 w = sp >= splat(p.thr) ? fast_exp(sp - splat(p.lse)) : splat(0.0f);
    if (q_row != nullptr) {
      const vf8 sq = load8(q_row + v, V - v, -kInf) * splat(q->inv_t);
      const vf8 pq = sq >= splat(q->thr) ? fast_exp(sq - splat(q->lse)) : splat(0.0f);
      w = vmax(w - pq, splat(0.0f));
    } else if (det_tok >= v && det_tok < v + 8) {
      w[det_tok - v] = 0.0f;
    }
    am.update(w / noise_exp(v, s0, s1), static_cast<int32_t>(v));
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
int64_t verify_row(const Args& a, const T* tgt, const T* drf, int64_t b) {
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
