// 8-lane fp32 helpers (GCC/Clang vector extensions) for the CPU sampling kernels: polynomial
// exp/log (std::exp/std::log are scalar calls, ~V of them per pass would dominate), the
// counter-hash noise shared with every backend (python/lmfuse/ops/_sampling.py), loads that
// convert fp16/bf16 to fp32, and a first-index running argmax.
//
// Everything is `inline` in an unnamed namespace and always inlined, so each caller's
// target_clones worker (x86-64-v3 and baseline) gets its own code: an out-of-line copy would be
// compiled for baseline x86-64 only.
#pragma once

#include <cstdint>
#include <cstring>
#include <limits>
#include <type_traits>
#include <utility>

#include <c10/util/BFloat16.h>
#include <c10/util/Half.h>

namespace lmfuse {
namespace cpu {
namespace {

typedef float vf8 __attribute__((vector_size(32)));
typedef int32_t vi8 __attribute__((vector_size(32)));
typedef uint32_t vu8 __attribute__((vector_size(32)));

constexpr float kInf8 = std::numeric_limits<float>::infinity();

__attribute__((always_inline)) inline vf8 vsplat(float v) { return vf8{v, v, v, v, v, v, v, v}; }
__attribute__((always_inline)) inline vi8 vsplati(int32_t v) { return vi8{v, v, v, v, v, v, v, v}; }
__attribute__((always_inline)) inline vf8 vmax8(vf8 a, vf8 b) { return a > b ? a : b; }

// e^x with a degree-7 Taylor polynomial on the reduced argument |r| <= ln2/2 (rel. error ~2e-7).
// x < -87 gives 0 (below the smallest normal); callers pass x <= ~0, -inf included.
__attribute__((always_inline)) inline vf8 vexp(vf8 x) {
  const vf8 xc = vmax8(x, vsplat(-87.0f));
  const vf8 shifter = vsplat(12582912.0f);  // 1.5·2^23: adding it rounds to the nearest integer
  const vf8 t = xc * vsplat(1.44269504088896341f) + shifter;
  const vf8 n = t - shifter;
  const vi8 ni = (vi8)t - (vi8)shifter;
  // ln 2 in two parts so n·ln2 is subtracted without losing the low bits of x
  const vf8 r = xc - n * vsplat(0.693359375f) - n * vsplat(-2.12194440e-4f);
  vf8 p = vsplat(1.0f / 5040.0f);
  p = p * r + vsplat(1.0f / 720.0f);
  p = p * r + vsplat(1.0f / 120.0f);
  p = p * r + vsplat(1.0f / 24.0f);
  p = p * r + vsplat(1.0f / 6.0f);
  p = p * r + vsplat(0.5f);
  p = p * r + vsplat(1.0f);
  p = p * r + vsplat(1.0f);
  const vf8 two_n = (vf8)((ni + vsplati(127)) << 23);
  return x < vsplat(-87.0f) ? vsplat(0.0f) : p * two_n;
}

// tanh for any finite y: odd Taylor series below |y| = 1/4 (where 1 − e^{−2|y|} would cancel),
// (1 − e)/(1 + e) with e = e^{−2|y|} above; relative error ~3e-7.
__attribute__((always_inline)) inline vf8 vtanh(vf8 y) {
  const vf8 ay = y < vsplat(0.0f) ? -y : y;
  const vf8 e = vexp(vsplat(-2.0f) * ay);
  const vf8 big = (vsplat(1.0f) - e) / (vsplat(1.0f) + e);
  const vf8 y2 = ay * ay;
  vf8 s = vsplat(-1382.0f / 155925.0f);
  s = s * y2 + vsplat(62.0f / 2835.0f);
  s = s * y2 + vsplat(-17.0f / 315.0f);
  s = s * y2 + vsplat(2.0f / 15.0f);
  s = s * y2 + vsplat(-1.0f / 3.0f);
  s = s * y2 + vsplat(1.0f);
  const vf8 small = ay * s;
  const vf8 t = ay < vsplat(0.25f) ? small : big;
  return y < vsplat(0.0f) ? -t : t;
}

// ln x for positive normal x: x = 2^e·m, m in [sqrt(1/2), sqrt(2)), ln m = 2·atanh((m-1)/(m+1)).
__attribute__((always_inline)) inline vf8 vlog(vf8 x) {
  const vi8 bits = (vi8)x;
  vi8 e = ((bits >> 23) & vsplati(0xff)) - vsplati(127);
  vf8 m = (vf8)((bits & vsplati(0x7fffff)) | vsplati(0x3f800000));
  const vi8 high = m > vsplat(1.41421356f);  // lanes are -1 where true
  m = high ? m * vsplat(0.5f) : m;
  e = e - high;
  const vf8 t = (m - vsplat(1.0f)) / (m + vsplat(1.0f));
  const vf8 t2 = t * t;
  vf8 s = vsplat(1.0f / 9.0f);
  s = s * t2 + vsplat(1.0f / 7.0f);
  s = s * t2 + vsplat(1.0f / 5.0f);
  s = s * t2 + vsplat(1.0f / 3.0f);
  s = s * t2 + vsplat(1.0f);
  return __builtin_convertvector(e, vf8) * vsplat(0.693147180559945f) + vsplat(2.0f) * t * s;
}

__attribute__((always_inline)) inline vu8 vmix32(vu8 x) {  // "lowbias32" finaliser, as in _sampling.py
  x ^= x >> 16;
  x *= 0x7FEB352Du;
  x ^= x >> 15;
  x *= 0x846CA68Bu;
  x ^= x >> 16;
  return x;
}

// E_v = -ln(u_v) for tokens v0..v0+7: the Exp(1) noise of _sampling.py.
__attribute__((always_inline)) inline vf8 vnoise_exp(int64_t v0, uint32_t s0, uint32_t s1) {
  const uint32_t b = static_cast<uint32_t>(v0);
  const vu8 v = vu8{b, b + 1, b + 2, b + 3, b + 4, b + 5, b + 6, b + 7};
  const vu8 h = vmix32(vmix32(v ^ s0) ^ s1);
  const vf8 u = (__builtin_convertvector(h >> 9, vf8) + vsplat(0.5f)) * vsplat(1.0f / 8388608.0f);
  return -vlog(u);
}

// ln E_v (the exponential race in log space: argmax of logit − ln E).
__attribute__((always_inline)) inline vf8 vlog_noise(int64_t v0, uint32_t s0, uint32_t s1) {
  return vlog(vnoise_exp(v0, s0, s1));
}

// 8 values from p as fp32; lanes at or past `valid` get `fill`. Full groups of 8 are one vector
// load (float), or one 16-byte load widened in vector registers (bfloat16: the bits shifted into
// the high half; float16: GCC's vector conversion, F16C in the x86-64-v3 clones): element-wise
// loads into a buffer compile to eight scalar loads and inserts, which made the row kernels
// several times slower than their arithmetic.
template <typename T>
__attribute__((always_inline)) inline vf8 vload(const T* p, int64_t valid, float fill) {
  if (valid >= 8) {
    if constexpr (std::is_same<T, float>::value) {
      vf8 v;
      std::memcpy(&v, p, sizeof(v));
      return v;
    } else if constexpr (sizeof(T) == 2 && std::is_same<T, c10::BFloat16>::value) {
      typedef uint16_t vh8 __attribute__((vector_size(16)));
      vh8 h;
      std::memcpy(&h, p, sizeof(h));
      return (vf8)(__builtin_convertvector(h, vu8) << 16);
    } else if constexpr (std::is_same<T, c10::Half>::value) {
      typedef _Float16 vhf8 __attribute__((vector_size(16)));
      vhf8 h;
      std::memcpy(&h, p, sizeof(h));
      return __builtin_convertvector(h, vf8);
    }
  }
  float buf[8];
  for (int j = 0; j < 8; ++j) buf[j] = j < valid ? static_cast<float>(p[j]) : fill;
  vf8 v;
  std::memcpy(&v, buf, sizeof(v));
  return v;
}

__attribute__((always_inline)) inline float vhmax(vf8 v) {
  float m = v[0];
  for (int j = 1; j < 8; ++j) m = v[j] > m ? v[j] : m;
  return m;
}

__attribute__((always_inline)) inline float vhsum(vf8 v) {
  float s = 0.0f;
  for (int j = 0; j < 8; ++j) s += v[j];
  return s;
}

__attribute__((always_inline)) inline bool vany(vi8 m) {
  for (int j = 0; j < 8; ++j)
    if (m[j]) return true;
  return false;
}

// Running argmax per lane with strict ">" (each lane keeps its first maximum); reduce() picks
// the smallest index among lanes holding the maximum, i.e. torch.argmax's first index.
struct VArgMax {
  vf8 best = vsplat(-kInf8);
  vi8 idx = vsplati(0);
  __attribute__((always_inline)) void update(vf8 v, int32_t base) {
    const vi8 gt = v > best;
    best = gt ? v : best;
    idx = gt ? vi8{0, 1, 2, 3, 4, 5, 6, 7} + vsplati(base) : idx;
  }
  __attribute__((always_inline)) std::pair<float, int64_t> reduce() const {
    const float m = vhmax(best);
    int64_t i = std::numeric_limits<int64_t>::max();
    for (int j = 0; j < 8; ++j)
      if (best[j] == m && idx[j] < i) i = idx[j];
    return {m, i};
  }
};

}  // namespace
}  // namespace cpu
}  // namespace lmfuse
