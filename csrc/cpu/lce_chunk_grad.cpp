// The softmax part of the gradient-in-forward path of lmfuse.ops.linear_cross_entropy
// (python/lmfuse/ops/_lce_chunked.py), for one chunk of tokens, in place.
//
// The chunk's raw logits u = h·W'ᵀ (+ b) arrive as the [rows, V'] output of ATen's GEMM in the
// input dtype. For each row this computes, with z = softcap(s·u),
//
//   lse = log Σ_v e^{z_v},   ℓ = lse − (1−ε)·z_t − (ε/V')·Σ_v z_v + λ·lse²        (per-token loss)
//   G_v = tw·[(1 + 2λ·lse)·e^{z_v − lse} − ε/V' − (1−ε)·1[v = t]] · ∂z_v/∂u_v      (∂(tw·ℓ)/∂u_v)
//
// and overwrites u with G (rounded to the input dtype, as eager rounds its softmax gradient), so
// the caller's next two GEMMs (dhidden = G·W', dweight += Gᵀ·h) read it where it is. Why a kernel:
// the same work in PyTorch is about six full passes over the [rows, V'] block and a float32 copy
// of it for bf16/fp16 inputs; here each row of u is read once, z and then e^{z − m} go to a
// per-thread fp32 row buffer that stays in the core's L2 (V' = 49152 is 192 KiB), there is one
// exp per element, G is written once, and no float32 copy of the block exists, so a chunk can hold
// twice (bf16) the tokens in the same workspace, which keeps the GEMMs tall.
//
// Rows: target == ignore_index gives ℓ = 0 (and G = 0 through tw = 0, which the caller ensures);
// a target outside [0, V') on a valid row gives ℓ = NaN and no one-hot term. Rows are split
// over threads with at::parallel_for; each row is computed by one thread in a fixed order, so the
// result does not depend on the thread count.
#include <ATen/Parallel.h>
#include <torch/extension.h>

#include <algorithm>
#include <cmath>
#include <cstdint>
#include <cstring>
#include <limits>
#include <type_traits>
#include <vector>

#include "cpu/dtype_dispatch.h"
#include "cpu/vec8.h"

namespace lmfuse {
namespace cpu {
namespace {

#if defined(__GNUC__) && !defined(__clang__) && defined(__x86_64__) && defined(__linux__)
#define LMFUSE_CG_CLONES __attribute__((target_clones("arch=x86-64-v3", "default")))
#else
#define LMFUSE_CG_CLONES
#endif
#define LMFUSE_CG_INLINE __attribute__((always_inline)) inline

constexpr int64_t kFlush = 1024;  // elements summed in fp32 lanes before the sum moves to double

struct ChunkParams {
  int64_t Vp;
  int64_t ignore_index;
  float scale;    // logit_scale
  float cap;      // softcap, 0 for none
  float inv_cap;  // 1 / cap
  float eps;      // label smoothing
  float lam;      // z-loss scale
  bool grad;      // write G into u
};

LMFUSE_CG_INLINE vf8 zmap(const ChunkParams& P, vf8 u) {
  vf8 y = u * vsplat(P.scale);
  if (P.cap > 0.0f) y = vsplat(P.cap) * vtanh(y * vsplat(P.inv_cap));
  return y;
}

// lanes j < valid keep v, the others get fill
LMFUSE_CG_INLINE vf8 keep(vf8 v, int64_t valid, float fill) {
  if (valid >= 8) return v;
  float buf[8];
  std::memcpy(buf, &v, sizeof(v));
  for (int64_t j = valid; j < 8; ++j) buf[j] = fill;
  std::memcpy(&v, buf, sizeof(v));
  return v;
}

// fp32 → bfloat16 bits, round to nearest even (NaN stays NaN), 8 lanes
LMFUSE_CG_INLINE void store_bf16(at::BFloat16* p, vf8 v, int64_t valid) {
  vu8 bits;
  std::memcpy(&bits, &v, sizeof(v));
  const vu8 rounded = (bits + (((bits >> 16) & 1u) + 0x7fffu)) >> 16;
  const vu8 nan = (vu8)((bits & 0x7fffffffu) > 0x7f800000u);  // all ones where NaN
  const vu8 out = (nan & ((bits >> 16) | 0x40u)) | (~nan & rounded);
  typedef uint16_t vh8 __attribute__((vector_size(16)));
  const vh8 narrow = __builtin_convertvector(out, vh8);
  std::memcpy(p, &narrow, sizeof(uint16_t) * std::min<int64_t>(8, valid));
}

template <typename T>
LMFUSE_CG_INLINE void store8(T* p, vf8 v, int64_t valid) {
  if constexpr (std::is_same<T, float>::value) {
    if (valid >= 8) {
      std::memcpy(p, &v, sizeof(v));
    } else {
      for (int64_t j = 0; j < valid; ++j) p[j] = v[j];
    }
  } else if constexpr (std::is_same<T, at::BFloat16>::value) {
    store_bf16(p, v, valid);
  } else {  // float16: round to nearest even, as c10::Half's conversion
    typedef _Float16 vhf8 __attribute__((vector_size(16)));
    const vhf8 narrow = __builtin_convertvector(v, vhf8);
    std::memcpy(p, &narrow, sizeof(uint16_t) * std::min<int64_t>(8, valid));
  }
}

template <typename T>
LMFUSE_CG_CLONES void chunk_rows(const ChunkParams& P, T* u, int64_t ld, const int64_t* target,
                                 const float* tw, float* ltok, int64_t r0, int64_t r1, float* zbuf) {
  const int64_t Vp = P.Vp;
  const bool capped = P.cap > 0.0f;
  const bool want_sz = P.eps > 0.0f;
  for (int64_t r = r0; r < r1; ++r) {
    T* row = u + r * ld;
    // pass 1: z into zbuf, running max and Σ z
    vf8 vmax = vsplat(-kInf8);
    double sz = 0.0;
    for (int64_t b = 0; b < Vp; b += kFlush) {
      const int64_t e = std::min<int64_t>(Vp, b + kFlush);
      vf8 vsum = vsplat(0.0f);
      for (int64_t v = b; v < e; v += 8) {
        const int64_t valid = std::min<int64_t>(8, e - v);
        const vf8 z = zmap(P, vload(row + v, valid, 0.0f));
        store8(zbuf + v, z, valid);
        vmax = vmax8(vmax, keep(z, valid, -kInf8));
        if (want_sz) vsum += keep(z, valid, 0.0f);
      }
      if (want_sz) sz += static_cast<double>(vhsum(vsum));
    }
    const float m = vhmax(vmax);
    // pass 2: e^{z − m} into zbuf, Σ
    const vf8 mv = vsplat(m);
    double d = 0.0;
    for (int64_t b = 0; b < Vp; b += kFlush) {
      const int64_t e = std::min<int64_t>(Vp, b + kFlush);
      vf8 esum = vsplat(0.0f);
      for (int64_t v = b; v < e; v += 8) {
        const int64_t valid = std::min<int64_t>(8, e - v);
        const vf8 ex = keep(vexp(vload(zbuf + v, valid, -kInf8) - mv), valid, 0.0f);
        store8(zbuf + v, ex, valid);
        esum += ex;
      }
      d += static_cast<double>(vhsum(esum));
    }
    const double lse = static_cast<double>(m) + std::log(d);
    const int64_t t = target[r];
    const bool is_valid = t != P.ignore_index;
    const bool in_range = t >= 0 && t < Vp;
    const float zt_u = in_range ? static_cast<float>(row[t]) : 0.0f;
    const float zt = in_range ? zmap(P, vsplat(zt_u))[0] : 0.0f;
    double li = lse - (1.0 - static_cast<double>(P.eps)) * zt;
    if (want_sz) li -= static_cast<double>(P.eps) / static_cast<double>(Vp) * sz;
    if (P.lam > 0.0f) li += static_cast<double>(P.lam) * lse * lse;
    if (!is_valid) {
      li = 0.0;
    } else if (!in_range) {
      li = std::numeric_limits<double>::quiet_NaN();
    }
    ltok[r] = static_cast<float>(li);
    if (!P.grad) continue;
    // pass 3: G = (a/d)·e^{z − m} + c, times ∂z/∂u, in place; then the one-hot term at the target
    const float w = tw[r];
    const float a = w * static_cast<float>(1.0 + 2.0 * static_cast<double>(P.lam) * lse);
    const float c = -w * P.eps / static_cast<float>(Vp);
    const vf8 adv = vsplat(static_cast<float>(static_cast<double>(a) / d)), cv = vsplat(c), sv = vsplat(P.scale);
    for (int64_t v = 0; v < Vp; v += 8) {
      const int64_t valid = std::min<int64_t>(8, Vp - v);
      vf8 g = adv * vload(zbuf + v, valid, 0.0f) + cv;
      if (capped) {  // ∂z/∂u = s·(1 − tanh²), tanh = z / cap
        const vf8 th = zmap(P, vload(row + v, valid, 0.0f)) * vsplat(P.inv_cap);
        g = g * (vsplat(1.0f) - th * th) * sv;
      } else {
        g = g * sv;
      }
      store8(row + v, g, valid);
    }
    if (in_range && w != 0.0f) {
      const vf8 th = vsplat(zt * P.inv_cap);
      const vf8 deriv = capped ? (vsplat(1.0f) - th * th) * sv : sv;
      const vf8 g = (adv * vsplat(zbuf[t]) + cv - vsplat(w * (1.0f - P.eps))) * deriv;
      store8(row + t, g, 1);
    }
  }
}

}  // namespace

at::Tensor lce_chunk_grad_cpu(at::Tensor& u, const at::Tensor& target, const at::Tensor& tw, int64_t ignore_index,
                              double logit_scale, double softcap, double label_smoothing, double z_loss_scale,
                              bool want_grad) {
  const int64_t rows = u.size(0);
  ChunkParams P;
  P.Vp = u.size(1);
  P.ignore_index = ignore_index;
  P.scale = static_cast<float>(logit_scale);
  P.cap = static_cast<float>(softcap);
  P.inv_cap = softcap > 0 ? static_cast<float>(1.0 / softcap) : 0.0f;
  P.eps = static_cast<float>(label_smoothing);
  P.lam = static_cast<float>(z_loss_scale);
  P.grad = want_grad;
  auto ltok = at::empty({rows}, target.options().dtype(at::kFloat));
  const int64_t* tg = target.data_ptr<int64_t>();
  const float* w = tw.data_ptr<float>();
  float* out = ltok.data_ptr<float>();
  const int64_t ld = u.stride(0);
  dispatch_dtype(u.scalar_type(), "lce_chunk_grad_", [&](auto tag) {
    using T = decltype(tag);
    T* base = reinterpret_cast<T*>(u.data_ptr());
    at::parallel_for(0, rows, 1, [&](int64_t r0, int64_t r1) {
      std::vector<float> zbuf(static_cast<size_t>(P.Vp));  // one row of z, then e^{z − m}; stays in L2
      chunk_rows<T>(P, base, ld, tg, w, out, r0, r1, zbuf.data());
    });
  });
  return ltok;
}

}  // namespace cpu
}  // namespace lmfuse
