// CPU kernels of the fused vocabulary losses (lmfuse.ops.linear_cross_entropy /
// linear_log_probs): per-token statistics of the logits z = softcap(s·(h·Wᵀ + b)) over the first
// V' rows of W, and the gradient of any loss whose logit gradient has the form
//
//   dz[n, v] = p[n, v]·(a[n] + d[n]·z[n, v]) + b[n]·1[v = target[n]] + c[n],  p = exp(z − lse),
//
// chained through the softcap and the logit scale into dhidden, dweight and dbias. The logits
// never exist whole: every pass works on one [token block × vocab block] fp32 tile per thread.
//
// Layout of the work (why):
//   * Tiles come from ATen's fp32 GEMM (MKL where torch has it) on sub-blocks, called inside
//     our OpenMP region. ATen and MKL see an active parallel region and run single-threaded, so
//     the machine is not oversubscribed (checked: only the region's threads use CPU time).
//     bf16/fp16 blocks are converted to fp32 in per-thread scratch first: ATen's low-precision
//     CPU GEMMs return their result in the input dtype, which would round the logits and the
//     gradient tiles; converted, every product is exact and every sum is fp32.
//   * Forward: OpenMP over token blocks. A thread owns its rows' running max / sum-exp /
//     statistics and walks all vocab blocks, so each row's result is computed in a fixed order
//     (independent of the thread count).
//   * Backward: OpenMP over vocab blocks. A thread owns the rows of dweight and dbias of its
//     vocab block and walks all tokens (no races, fixed summation order for dweight/dbias); the
//     logits tile is recomputed once and feeds both dhidden and dweight. dhidden rows are shared
//     by all vocab blocks, so each thread accumulates into its own fp32 [tokens, H] partial and
//     the partials are summed at the end (results across thread counts agree to fp32 rounding).
//     The vocab blocks are split statically, so a given thread count always gives the same bits.
//     Tokens are processed in chunks so these partials stay within a fixed budget.
//   * Rows whose target is ignore_index get correct, finite statistics (their work is shared
//     with the valid rows in the GEMM anyway) and contribute no gradient.
#include <ATen/Parallel.h>
#include <torch/extension.h>

#include <algorithm>
#include <cmath>
#include <cstdint>
#include <cstring>
#include <limits>
#include <tuple>
#include <type_traits>
#include <vector>

#ifdef _OPENMP
#include <omp.h>
#endif

#include "cpu/dtype_dispatch.h"
#include "cpu/vec8.h"

namespace lmfuse {
namespace cpu {
namespace {

#if defined(__GNUC__) && !defined(__clang__) && defined(__x86_64__) && defined(__linux__)
#define LMFUSE_LCE_CLONES __attribute__((target_clones("arch=x86-64-v3", "default")))
#else
#define LMFUSE_LCE_CLONES
#endif
#define LMFUSE_LCE_INLINE __attribute__((always_inline)) inline

constexpr int64_t kFwdTokens = 512;  // rows per forward work item
constexpr int64_t kBwdTokens = 256;  // rows per backward tile
constexpr int64_t kVocab = 256;      // vocab rows per tile (both directions)
// Per-call budget for the backward's fp32 token-chunk buffers (hidden copy + per-thread dhidden).
constexpr int64_t kChunkBudgetBytes = int64_t(64) << 20;

inline int64_t cdiv(int64_t a, int64_t b) { return (a + b - 1) / b; }

// ---------------------------------------------------------------------------------------------
// fp32 GEMM on row-major blocks: C[m, n] = op(A)[m, k] · op(B)[k, n] (+ C when accumulate).
// op(A) = A[m, k] (lda) or, when ta, the transpose of A stored as [k, m]; likewise op(B).
void gemm_rm(bool ta, bool tb, int64_t m, int64_t n, int64_t k, const float* a, int64_t lda,
             const float* b, int64_t ldb, bool accumulate, float* c, int64_t ldc) {
  auto A = at::from_blob(const_cast<float*>(a), ta ? at::IntArrayRef{k, m} : at::IntArrayRef{m, k},
                         {lda, 1}, at::kFloat);
  auto B = at::from_blob(const_cast<float*>(b), tb ? at::IntArrayRef{n, k} : at::IntArrayRef{k, n},
                         {ldb, 1}, at::kFloat);
  auto C = at::from_blob(c, {m, n}, {ldc, 1}, at::kFloat);
  const at::Tensor opa = ta ? A.t() : A;
  const at::Tensor opb = tb ? B.t() : B;
  if (accumulate) {
    at::addmm_out(C, C, opa, opb, /*beta=*/1.0, /*alpha=*/1.0);
  } else {
    at::mm_out(C, opa, opb);
  }
}

// ---------------------------------------------------------------------------------------------
// Elementwise pieces (8 lanes).

struct LogitMap {
  float scale;      // logit_scale
  float cap;        // softcap c, or 0 for none
  float inv_cap;    // 1 / c
  const float* bias;  // fp32 [V'] or null
};

// Logits of 8 vocab entries v.. from their GEMM outputs x; `valid` lanes are real.
LMFUSE_LCE_INLINE vf8 to_logit(const LogitMap& L, vf8 x, int64_t v, int64_t valid) {
  if (L.bias != nullptr) x += vload(L.bias + v, valid, 0.0f);
  vf8 y = x * vsplat(L.scale);
  if (L.cap > 0.0f) y = vsplat(L.cap) * vtanh(y * vsplat(L.inv_cap));
  return y;
}

LMFUSE_LCE_INLINE vf8 load_tail(const float* p, int64_t valid) {
  return vload(p, valid, 0.0f);
}

LMFUSE_LCE_INLINE void store_tail(float* p, vf8 v, int64_t valid) {
  if (valid >= 8) {
    std::memcpy(p, &v, sizeof(v));
  } else {
    float buf[8];
    std::memcpy(buf, &v, sizeof(v));
    for (int64_t j = 0; j < valid; ++j) p[j] = buf[j];
  }
}

// Running statistics of one token row across vocab blocks.
struct RowStats {
  float m;        // running max of z
  double d;       // Σ e^{z − m}
  double t;       // Σ e^{z − m}(z − m)
  double sz;      // Σ z
  float best;     // argmax value
  int64_t arg;    // argmax index (first maximum)
  float zt;       // z at the target
};

struct FwdParams {
  LogitMap L;
  int64_t Vp;  // V'
  int64_t ignore_index;
  bool want_sz, want_pz, want_arg;
};

// Folds the tile rows [rows, vlen] (raw GEMM output, ld kVocab) of vocab block starting at v0
// into the row statistics. Logits are written back into the tile between the two sub-passes.
LMFUSE_LCE_CLONES void fold_tile(const FwdParams& P, float* tile, int64_t rows, int64_t v0,
                                 int64_t vlen, const int64_t* target, RowStats* st) {
  for (int64_t r = 0; r < rows; ++r) {
    float* row = tile + r * kVocab;
    RowStats& S = st[r];
    // sub-pass 1: logits, block max, argmax, Σ z
    vf8 vmax = vsplat(-kInf8), vsum = vsplat(0.0f);
    VArgMax am;
    for (int64_t j = 0; j < vlen; j += 8) {
      const int64_t valid = std::min<int64_t>(8, vlen - j);
      vf8 z = to_logit(P.L, load_tail(row + j, valid), v0 + j, valid);
      if (valid < 8) {
        // lanes past the block: −inf for the max/argmax, 0 for the sum
        float buf[8];
        std::memcpy(buf, &z, sizeof(z));
        for (int64_t q = valid; q < 8; ++q) buf[q] = -kInf8;
        std::memcpy(&z, buf, sizeof(z));
        vsum += z == vsplat(-kInf8) ? vsplat(0.0f) : z;
      } else {
        vsum += z;
      }
      vmax = vmax8(vmax, z);
      if (P.want_arg) am.update(z, static_cast<int32_t>(v0 + j));
      store_tail(row + j, z, valid);
    }
    const float bmax = vhmax(vmax);
    if (P.want_sz) S.sz += static_cast<double>(vhsum(vsum));
    if (P.want_arg) {
      const auto best = am.reduce();
      if (best.first > S.best) {  // strict: an earlier block keeps a tie
        S.best = best.first;
        S.arg = best.second;
      }
    }
    const int64_t tg = target[r];
    if (tg >= v0 && tg < v0 + vlen) S.zt = row[tg - v0];
    // sub-pass 2: Σ e^{z − m'} (and Σ e^{z − m'}(z − m')) with the new running max m'
    const float m_new = std::max(S.m, bmax);
    if (m_new != S.m) {
      if (S.m != -kInf8) {
        const double shift = static_cast<double>(S.m) - static_cast<double>(m_new);
        const double f = std::exp(shift);
        S.t = (S.t + shift * S.d) * f;
        S.d *= f;
      }
      S.m = m_new;
    }
    const vf8 mv = vsplat(S.m);
    vf8 dsum = vsplat(0.0f), tsum = vsplat(0.0f);
    for (int64_t j = 0; j < vlen; j += 8) {
      const int64_t valid = std::min<int64_t>(8, vlen - j);
      const vf8 z = vload(row + j, valid, -kInf8);
      const vf8 diff = z - mv;
      const vf8 e = vexp(diff);
      dsum += e;
      if (P.want_pz) tsum += e > vsplat(0.0f) ? e * diff : vsplat(0.0f);
    }
    S.d += static_cast<double>(vhsum(dsum));
    if (P.want_pz) S.t += static_cast<double>(vhsum(tsum));
  }
}

struct BwdParams {
  LogitMap L;
  int64_t Vp;
  int64_t ignore_index;
  const float *lse, *ca, *cb, *cc, *cd;
  const int64_t* target;
};

// Raw GEMM tile [rows, vlen] of tokens n0.. and vocab block v0 → dpre = ∂loss/∂(h·Wᵀ + b), in
// place. Ignored rows become 0.
LMFUSE_LCE_CLONES void grad_tile(const BwdParams& P, float* tile, int64_t rows, int64_t n0,
                                 int64_t v0, int64_t vlen) {
  const bool capped = P.L.cap > 0.0f;
  for (int64_t r = 0; r < rows; ++r) {
    float* row = tile + r * kVocab;
    const int64_t n = n0 + r;
    const int64_t tg = P.target[n];
    if (tg == P.ignore_index) {
      std::fill(row, row + vlen, 0.0f);
      continue;
    }
    const vf8 lse = vsplat(P.lse[n]), a = vsplat(P.ca[n]), c = vsplat(P.cc[n]), d = vsplat(P.cd[n]);
    const bool has_t = tg >= v0 && tg < v0 + vlen;
    float g_target = 0.0f;
    if (has_t) {
      // local derivative dz/du at the target, before the row is overwritten
      float u = row[tg - v0] + (P.L.bias != nullptr ? P.L.bias[tg] : 0.0f);
      float g = P.L.scale;
      if (capped) {
        const float th = std::tanh(P.L.scale * u * P.L.inv_cap);
        g *= 1.0f - th * th;
      }
      g_target = g;
    }
    for (int64_t j = 0; j < vlen; j += 8) {
      const int64_t valid = std::min<int64_t>(8, vlen - j);
      vf8 x = load_tail(row + j, valid);
      if (P.L.bias != nullptr) x += vload(P.L.bias + v0 + j, valid, 0.0f);
      const vf8 y = x * vsplat(P.L.scale);
      vf8 z, g;
      if (capped) {
        const vf8 th = vtanh(y * vsplat(P.L.inv_cap));
        z = vsplat(P.L.cap) * th;
        g = vsplat(P.L.scale) * (vsplat(1.0f) - th * th);
      } else {
        z = y;
        g = vsplat(P.L.scale);
      }
      const vf8 p = vexp(z - lse);
      const vf8 dz = p * (a + d * z) + c;
      store_tail(row + j, dz * g, valid);
    }
    if (has_t) row[tg - v0] += P.cb[n] * g_target;
  }
}

// fp32 copy of rows [r0, r1) of a [*, cols] matrix (dst rows start at 0).
template <typename T>
LMFUSE_LCE_INLINE void to_f32_impl(const T* src, int64_t cols, int64_t r0, int64_t r1, float* dst) {
  const T* s = src + r0 * cols;
  const int64_t n = (r1 - r0) * cols;
  for (int64_t i = 0; i < n; ++i) dst[i] = static_cast<float>(s[i]);
}
LMFUSE_LCE_CLONES void to_f32(const at::BFloat16* s, int64_t cols, int64_t r0, int64_t r1, float* d) {
  to_f32_impl(s, cols, r0, r1, d);
}
LMFUSE_LCE_CLONES void to_f32(const at::Half* s, int64_t cols, int64_t r0, int64_t r1, float* d) {
  to_f32_impl(s, cols, r0, r1, d);
}
void to_f32(const float* s, int64_t cols, int64_t r0, int64_t r1, float* d) {
  std::memcpy(d, s + r0 * cols, sizeof(float) * (r1 - r0) * cols);
}

// Rows [r0, r1) of an fp32 [*, cols] matrix (src rows start at 0) rounded into dst.
template <typename T>
void from_f32(const float* src, int64_t cols, int64_t r0, int64_t r1, T* dst) {
  const int64_t n = (r1 - r0) * cols;
  T* d = dst + r0 * cols;
  for (int64_t i = 0; i < n; ++i) d[i] = static_cast<T>(src[i]);
}

// Pointer to rows [r0, r1) of `src` as fp32: the tensor itself for fp32, else a converted copy
// in `scratch` ([(r1 − r0) · cols] floats).
template <typename T>
const float* rows_f32(const T* src, int64_t cols, int64_t r0, int64_t r1, float* scratch) {
  if constexpr (std::is_same<T, float>::value) {
    return src + r0 * cols;
  } else {
    to_f32(src, cols, r0, r1, scratch);
    return scratch;
  }
}

int64_t num_threads_for(int64_t items) {
  return std::max<int64_t>(1, std::min<int64_t>(at::get_num_threads(), items));
}

#ifdef _OPENMP
inline int64_t thread_id() { return omp_get_thread_num(); }
#else
inline int64_t thread_id() { return 0; }
#endif

// ---------------------------------------------------------------------------------------------
template <typename T>
void forward_impl(const T* h, const T* w, const int64_t* target, int64_t N,
                  int64_t H, const FwdParams& P, float* lse, float* zt, float* sum_z,
                  float* sum_pz, int64_t* arg) {
  const int64_t nblocks = cdiv(N, kFwdTokens);
  const int64_t nthreads = num_threads_for(nblocks);
  const bool f32 = std::is_same<T, float>::value;
  // per thread: tile, row statistics, and for low precision the hidden and weight blocks in fp32
  const int64_t per_thread = kFwdTokens * kVocab + (f32 ? 0 : (kFwdTokens + kVocab) * H);
  std::vector<float> scratch(static_cast<size_t>(nthreads * per_thread));
  std::vector<RowStats> stats(static_cast<size_t>(nthreads * kFwdTokens));
#ifdef _OPENMP
#pragma omp parallel num_threads(static_cast<int>(nthreads))
#endif
  {
    const int64_t tid = thread_id();
    float* tile = scratch.data() + tid * per_thread;
    float* hbuf = tile + kFwdTokens * kVocab;
    float* wbuf = hbuf + kFwdTokens * H;
    RowStats* st = stats.data() + tid * kFwdTokens;
#ifdef _OPENMP
#pragma omp for schedule(dynamic, 1)
#endif
    for (int64_t blk = 0; blk < nblocks; ++blk) {
      const int64_t n0 = blk * kFwdTokens, rows = std::min(kFwdTokens, N - n0);
      const float* hb = rows_f32(h, H, n0, n0 + rows, hbuf);
      for (int64_t r = 0; r < rows; ++r)
        st[r] = RowStats{-kInf8, 0.0, 0.0, 0.0, -kInf8, 0, 0.0f};
      for (int64_t v0 = 0; v0 < P.Vp; v0 += kVocab) {
        const int64_t vlen = std::min(kVocab, P.Vp - v0);
        const float* wb = rows_f32(w, H, v0, v0 + vlen, wbuf);
        gemm_rm(false, true, rows, vlen, H, hb, H, wb, H, false, tile, kVocab);
        fold_tile(P, tile, rows, v0, vlen, target + n0, st);
      }
      for (int64_t r = 0; r < rows; ++r) {
        const RowStats& S = st[r];
        const int64_t n = n0 + r;
        // d >= 1 whenever the max is finite; a row of all −inf/NaN logits gets NaN, as torch does
        lse[n] = static_cast<float>(static_cast<double>(S.m) + std::log(S.d));
        // 0 for ignored rows and for targets outside [0, V') (S.zt never set)
        zt[n] = target[n] == P.ignore_index ? 0.0f : S.zt;
        if (sum_z != nullptr) sum_z[n] = static_cast<float>(S.sz);
        if (sum_pz != nullptr) sum_pz[n] = static_cast<float>(static_cast<double>(S.m) + S.t / S.d);
        if (arg != nullptr) arg[n] = S.arg;
      }
    }
  }
}

template <typename T>
void backward_impl(const T* h, const T* w, const int64_t N, const int64_t H, const BwdParams& P,
                   T* dh, T* dw, T* db) {
  const int64_t Vp = P.Vp;
  const int64_t nvb = cdiv(Vp, kVocab);
  const int64_t nthreads = num_threads_for(nvb);
  const bool f32 = std::is_same<T, float>::value;
  const bool need_h = dh != nullptr, need_w = dw != nullptr, need_b = db != nullptr;

  // Token chunk: the fp32 hidden copy (low precision only) and the per-thread dhidden partials
  // must fit the budget; one chunk whenever they do.
  const int64_t row_bytes = H * 4 * ((f32 ? 0 : 1) + (need_h ? nthreads : 0));
  int64_t chunk = N;
  if (row_bytes > 0 && N * row_bytes > kChunkBudgetBytes) {
    chunk = std::max<int64_t>(kBwdTokens, kChunkBudgetBytes / row_bytes / kBwdTokens * kBwdTokens);
  }
  const int64_t nchunks = cdiv(N, chunk);

  // Where dweight rows accumulate in fp32: the output itself for fp32; a per-thread [kVocab, H]
  // block when one chunk covers all tokens; otherwise (long inputs in low precision) a full
  // fp32 [V', H] buffer rounded at the end.
  std::vector<float> dw_full;
  if (need_w && !f32 && nchunks > 1) dw_full.assign(static_cast<size_t>(Vp * H), 0.0f);
  const bool dw_block = need_w && !f32 && nchunks == 1;
  std::vector<float> db_acc(need_b ? static_cast<size_t>(Vp) : 0, 0.0f);

  std::vector<float> hchunk(f32 ? 0 : static_cast<size_t>(chunk * H));
  const int64_t per_thread = kBwdTokens * kVocab + (f32 ? 0 : kVocab * H) + (dw_block ? kVocab * H : 0);
  std::vector<float> scratch(static_cast<size_t>(nthreads * per_thread));
  std::vector<float> dh_part(need_h ? static_cast<size_t>(nthreads * chunk * H) : 0);

  for (int64_t c0 = 0; c0 < N; c0 += chunk) {
    const int64_t clen = std::min(chunk, N - c0);
    const bool first_chunk = c0 == 0;
    // zeroed here rather than per thread: every partial is summed below, used or not
    if (need_h) std::fill(dh_part.begin(), dh_part.end(), 0.0f);
#ifdef _OPENMP
#pragma omp parallel num_threads(static_cast<int>(nthreads))
#endif
    {
      const int64_t tid = thread_id();
      float* tile = scratch.data() + tid * per_thread;
      float* wbuf = tile + kBwdTokens * kVocab;
      float* dwbuf = wbuf + (f32 ? 0 : kVocab * H);
      float* dhp = need_h ? dh_part.data() + tid * chunk * H : nullptr;
      // the chunk's hidden rows in fp32, converted once and shared
      const float* hc;
      if constexpr (std::is_same<T, float>::value) {
        hc = h + c0 * H;
      } else {
#ifdef _OPENMP
#pragma omp for schedule(static)
#endif
        for (int64_t r = 0; r < clen; r += kBwdTokens)
          to_f32(h, H, c0 + r, c0 + std::min(clen, r + kBwdTokens), hchunk.data() + r * H);
        hc = hchunk.data();
      }
#ifdef _OPENMP
#pragma omp for schedule(static)
#endif
      for (int64_t vb = 0; vb < nvb; ++vb) {
        const int64_t v0 = vb * kVocab, vlen = std::min(kVocab, Vp - v0);
        const float* wb = rows_f32(w, H, v0, v0 + vlen, wbuf);
        float* dwt = nullptr;
        if (need_w) {
          if constexpr (std::is_same<T, float>::value) {
            dwt = dw + v0 * H;
          } else {
            dwt = dw_block ? dwbuf : dw_full.data() + v0 * H;
          }
        }
        for (int64_t r0 = 0; r0 < clen; r0 += kBwdTokens) {
          const int64_t rows = std::min(kBwdTokens, clen - r0);
          const float* hb = hc + r0 * H;
          gemm_rm(false, true, rows, vlen, H, hb, H, wb, H, false, tile, kVocab);
          grad_tile(P, tile, rows, c0 + r0, v0, vlen);
          if (need_h) gemm_rm(false, false, rows, H, vlen, tile, kVocab, wb, H, true, dhp + r0 * H, H);
          if (need_w) {
            // the first product into the fp32 output or a per-thread block starts it (neither
            // is zeroed beforehand); the full fp32 buffer starts at zero
            const bool start = r0 == 0 && (dw_block || (f32 && first_chunk));
            gemm_rm(true, false, vlen, H, rows, tile, kVocab, hb, H, !start, dwt, H);
          }
          if (need_b) {
            float* dbv = db_acc.data() + v0;
            for (int64_t r = 0; r < rows; ++r) {
              const float* row = tile + r * kVocab;
              for (int64_t j = 0; j < vlen; ++j) dbv[j] += row[j];
            }
          }
        }
        if (dw_block) from_f32(dwbuf, H, 0, vlen, dw + v0 * H);
      }
    }
    if (need_h) {
      // dhidden rows of the chunk: Σ over the thread partials, rounded to the dtype
      at::parallel_for(0, clen, 64, [&](int64_t r0, int64_t r1) {
        for (int64_t r = r0; r < r1; ++r) {
          T* out = dh + (c0 + r) * H;
          for (int64_t k = 0; k < H; ++k) {
            float s = 0.0f;
            for (int64_t t = 0; t < nthreads; ++t) s += dh_part[(t * chunk + r) * H + k];
            out[k] = static_cast<T>(s);
          }
        }
      });
    }
  }
  if (need_w && !f32 && nchunks > 1) {
    at::parallel_for(0, Vp, 64, [&](int64_t r0, int64_t r1) {
      from_f32(dw_full.data() + r0 * H, H, r0, r1, dw);
    });
  }
  if (need_b) {
    for (int64_t v = 0; v < Vp; ++v) db[v] = static_cast<T>(db_acc[v]);
  }
}

template <typename T>
const T* cptr(const at::Tensor& t) { return reinterpret_cast<const T*>(t.data_ptr()); }
template <typename T>
T* mptr(const at::Tensor& t) { return reinterpret_cast<T*>(t.data_ptr()); }

LogitMap make_map(const c10::optional<at::Tensor>& bias, int64_t Vp, double logit_scale,
                  double softcap, at::Tensor& bias_f32) {
  LogitMap L{};
  L.scale = static_cast<float>(logit_scale);
  L.cap = softcap > 0 ? static_cast<float>(softcap) : 0.0f;
  L.inv_cap = softcap > 0 ? static_cast<float>(1.0 / softcap) : 0.0f;
  if (bias.has_value() && bias->defined()) {
    bias_f32 = bias->narrow(0, 0, Vp).to(at::kFloat).contiguous();
    L.bias = bias_f32.data_ptr<float>();
  }
  return L;
}

}  // namespace

// Inputs are validated by the bindings (bindings.cpp): contiguous CPU tensors, hidden [N, H],
// weight [V, H] and bias [V] of one dtype, target int64 [N], 1 <= vocab_size <= V < 2^31,
// softcap > 0 or 0 for none. A target that is neither ignore_index nor in [0, vocab_size) is
// never used as an index: its row gets z_target = 0 and no one-hot gradient term.
std::tuple<at::Tensor, at::Tensor, at::Tensor, at::Tensor, at::Tensor> lce_forward_stats_cpu(
    const at::Tensor& hidden, const at::Tensor& weight, const c10::optional<at::Tensor>& bias,
    const at::Tensor& target, int64_t vocab_size, int64_t ignore_index, double logit_scale,
    double softcap, bool want_sum_z, bool want_sum_pz, bool want_argmax) {
  const int64_t N = hidden.size(0), H = hidden.size(1);
  const auto f32 = hidden.options().dtype(at::kFloat);
  at::Tensor lse = at::empty({N}, f32), zt = at::empty({N}, f32);
  at::Tensor sum_z = at::empty({want_sum_z ? N : 0}, f32);
  at::Tensor sum_pz = at::empty({want_sum_pz ? N : 0}, f32);
  at::Tensor arg = at::empty({want_argmax ? N : 0}, hidden.options().dtype(at::kLong));
  if (N == 0) return {lse, zt, sum_z, sum_pz, arg};
  at::Tensor bias_f32;
  FwdParams P{};
  P.L = make_map(bias, vocab_size, logit_scale, softcap, bias_f32);
  P.Vp = vocab_size;
  P.ignore_index = ignore_index;
  P.want_sz = want_sum_z;
  P.want_pz = want_sum_pz;
  P.want_arg = want_argmax;
  dispatch_dtype(hidden.scalar_type(), "linear_cross_entropy", [&](auto tag) {
    using T = decltype(tag);
    forward_impl<T>(cptr<T>(hidden), cptr<T>(weight), target.data_ptr<int64_t>(), N, H, P,
                    mptr<float>(lse), mptr<float>(zt), want_sum_z ? mptr<float>(sum_z) : nullptr,
                    want_sum_pz ? mptr<float>(sum_pz) : nullptr,
                    want_argmax ? mptr<int64_t>(arg) : nullptr);
  });
  return {lse, zt, sum_z, sum_pz, arg};
}

// Same preconditions as lce_forward_stats_cpu, plus lse, a, b, c, d contiguous fp32 [N].
std::tuple<at::Tensor, at::Tensor, at::Tensor> lce_backward_cpu(
    const at::Tensor& hidden, const at::Tensor& weight, const c10::optional<at::Tensor>& bias,
    const at::Tensor& target, const at::Tensor& lse, const at::Tensor& a, const at::Tensor& b,
    const at::Tensor& c, const at::Tensor& d, int64_t vocab_size, int64_t ignore_index,
    double logit_scale, double softcap, bool need_hidden, bool need_weight, bool need_bias) {
  const int64_t N = hidden.size(0), H = hidden.size(1), V = weight.size(0);
  const bool has_bias = bias.has_value() && bias->defined();
  TORCH_CHECK(!need_bias || has_bias, "linear_cross_entropy backward: need_bias without a bias");
  at::Tensor dh = need_hidden ? at::empty({N, H}, hidden.options()) : at::empty({0}, hidden.options());
  at::Tensor dw = need_weight ? at::empty({V, H}, weight.options()) : at::empty({0}, weight.options());
  at::Tensor db = need_bias ? at::empty({V}, bias->options()) : at::empty({0}, weight.options());
  // rows past vocab_size get no logit, hence no gradient
  if (need_weight && vocab_size < V) dw.narrow(0, vocab_size, V - vocab_size).zero_();
  if (need_bias && vocab_size < V) db.narrow(0, vocab_size, V - vocab_size).zero_();
  if (N == 0) {
    if (need_weight) dw.zero_();
    if (need_bias) db.zero_();
    return {dh, dw, db};
  }
  if (!(need_hidden || need_weight || need_bias)) return {dh, dw, db};
  at::Tensor bias_f32;
  BwdParams P{};
  P.L = make_map(bias, vocab_size, logit_scale, softcap, bias_f32);
  P.Vp = vocab_size;
  P.ignore_index = ignore_index;
  P.lse = lse.data_ptr<float>();
  P.ca = a.data_ptr<float>();
  P.cb = b.data_ptr<float>();
  P.cc = c.data_ptr<float>();
  P.cd = d.data_ptr<float>();
  P.target = target.data_ptr<int64_t>();
  dispatch_dtype(hidden.scalar_type(), "linear_cross_entropy", [&](auto tag) {
    using T = decltype(tag);
    backward_impl<T>(cptr<T>(hidden), cptr<T>(weight), N, H, P, need_hidden ? mptr<T>(dh) : nullptr,
                     need_weight ? mptr<T>(dw) : nullptr, need_bias ? mptr<T>(db) : nullptr);
  });
  return {dh, dw, db};
}

}  // namespace cpu
}  // namespace lmfuse
