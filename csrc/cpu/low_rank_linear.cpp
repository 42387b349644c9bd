// CPU kernels for the low-rank ("LPA") projection y = (x @ down^T) @ up^T + bias and its
// data-gradient path dx = (dy @ up) @ down.
//
// Both directions are the same computation: two chained products through a small middle
// dimension R, with the middle rounded to the input dtype (matching two chained nn.Linear
// layers, or two chained matmuls in the backward):
//
//   mid = round_T(a @ B1)            a [M, K1], B1 [K1, R]      (fwd: x, down^T;  bwd: dy, up)
//   out = round_T(mid @ B2 + bias)   B2 [R, N2]                 (fwd: up^T;       bwd: down)
//
// Why it is fast-ish without BLAS:
//   * B1 and B2 are converted to fp32 once per call and packed into column panels of
//     kPanel floats ([panel][k][kPanel]), zero-padded, so the micro-kernel streams both
//     operands contiguously and needs no edge cases in its inner loop.
//   * Rows are processed in blocks of kBlockM, one block per OpenMP iteration. The [kBlockM, R]
//     intermediate lives in a thread-local buffer that stays in L1/L2; it is written to memory
//     whole only when the caller asks for it (h in the forward, dh in the backward).
//   * The micro-kernel keeps a kMR x kPanel accumulator tile in registers (fp32), written with
//     8-float vector types and compile-time trip counts; on x86-64 GCC the per-block worker is
//     also cloned for x86-64-v3 (AVX2 + FMA) and picked at load time, because the build
//     targets baseline x86-64 (SSE2) and would otherwise leave most of the machine idle.
#include <ATen/Parallel.h>
#include <torch/extension.h>

#include <algorithm>
#include <cstdint>
#include <tuple>
#include <vector>

#include "cpu/dtype_dispatch.h"

#ifdef _OPENMP
#include <omp.h>
#endif

namespace lmfuse {
namespace cpu {
namespace {

constexpr int64_t kPanel = 16;   // columns per packed panel = accumulator tile width
constexpr int64_t kMR = 6;       // rows per accumulator tile
constexpr int64_t kBlockM = 48;  // rows per OpenMP work item (multiple of kMR)
static_assert(kBlockM % kMR == 0, "row block must be a whole number of micro tiles");

#if defined(__GNUC__) && !defined(__clang__) && defined(__x86_64__) && defined(__linux__)
#define LMFUSE_CPU_CLONES __attribute__((target_clones("arch=x86-64-v3", "default")))
#else
#define LMFUSE_CPU_CLONES
#endif

#if defined(__GNUC__)
#define LMFUSE_ALWAYS_INLINE inline __attribute__((always_inline))
#else
#define LMFUSE_ALWAYS_INLINE inline
#endif

inline int64_t round_up(int64_t v, int64_t m) { return (v + m - 1) / m * m; }

// Packs B (logical [kd, ncols]) into fp32 panels [ncols_padded / kPanel][kd][kPanel].
// B(k, c) = col_major ? src[c * ld + k] : src[k * ld + c]; columns >= ncols are zero.
template <typename T>
std::vector<float> pack_panels(const T* src, int64_t ld, bool col_major, int64_t kd,
                               int64_t ncols) {
  const int64_t npanels = round_up(ncols, kPanel) / kPanel;
  std::vector<float> dst(static_cast<size_t>(npanels * kd * kPanel), 0.0f);
  at::parallel_for(0, npanels, 1, [&](int64_t p0, int64_t p1) {
    for (int64_t p = p0; p < p1; ++p) {
      const int64_t cmax = std::min(kPanel, ncols - p * kPanel);
      float* panel = dst.data() + p * kd * kPanel;
      for (int64_t c = 0; c < cmax; ++c) {
        const int64_t col = p * kPanel + c;
        for (int64_t k = 0; k < kd; ++k) {
          const T v = col_major ? src[col * ld + k] : src[k * ld + col];
          panel[k * kPanel + c] = static_cast<float>(v);
        }
      }
    }
  });
  return dst;
}

// c[kMR, kPanel] = a[kMR rows, stride lda][0:kd] @ panel[kd, kPanel]. The accumulator tile
// is held in registers. With GCC/clang it is written with 8-float vector extensions: left to
// the auto-vectoriser, GCC 12 vectorised this loop nest across rows with shuffles and spills
// (about 3x slower when measured). On baseline x86-64 each vector lowers to two SSE registers.
#if defined(__GNUC__)
typedef float vfloat8 __attribute__((vector_size(32)));
// Same vector type for loads/stores through float pointers: element alignment, may alias.
typedef float vfloat8_unaligned __attribute__((vector_size(32), aligned(4), may_alias));
constexpr int64_t kVecPerPanel = kPanel / 8;
static_assert(kPanel % 8 == 0, "panel width must be a multiple of the vector width");

LMFUSE_ALWAYS_INLINE void micro_tile(const float* a, int64_t lda, const float* panel,
                                     int64_t kd, float* c, int64_t ldc) {
  vfloat8 acc[kMR][kVecPerPanel] = {};
  for (int64_t k = 0; k < kd; ++k) {
    vfloat8 b[kVecPerPanel];
    for (int64_t v = 0; v < kVecPerPanel; ++v)
      b[v] = *reinterpret_cast<const vfloat8_unaligned*>(panel + k * kPanel + 8 * v);
    for (int64_t i = 0; i < kMR; ++i) {
      const float av = a[i * lda + k];
      for (int64_t v = 0; v < kVecPerPanel; ++v) acc[i][v] += av * b[v];
    }
  }
  // Plain vector stores: taking the address of acc (e.g. memcpy) would pin it to the stack.
  for (int64_t i = 0; i < kMR; ++i)
    for (int64_t v = 0; v < kVecPerPanel; ++v)
      *reinterpret_cast<vfloat8_unaligned*>(c + i * ldc + 8 * v) = acc[i][v];
}
#else
LMFUSE_ALWAYS_INLINE void micro_tile(const float* a, int64_t lda, const float* panel,
                                     int64_t kd, float* c, int64_t ldc) {
  float acc[kMR][kPanel] = {};
  for (int64_t k = 0; k < kd; ++k) {
    const float* b = panel + k * kPanel;
    for (int64_t i = 0; i < kMR; ++i) {
      const float av = a[i * lda + k];
      for (int64_t j = 0; j < kPanel; ++j) acc[i][j] += av * b[j];
    }
  }
  for (int64_t i = 0; i < kMR; ++i)
    for (int64_t j = 0; j < kPanel; ++j) c[i * ldc + j] = acc[i][j];
}
#endif

// dst[kBlockM, ncols_padded] = a_block[kBlockM, kd] @ packed panels. Panel-outer so one
// panel (kd * kPanel floats) is reused by every row tile while it is hot in cache.
LMFUSE_ALWAYS_INLINE void block_product(const float* a_block, int64_t lda, const float* panels,
                                        int64_t kd, int64_t npanels, float* dst, int64_t ldd) {
  for (int64_t p = 0; p < npanels; ++p) {
    const float* panel = panels + p * kd * kPanel;
    for (int64_t i = 0; i < kBlockM; i += kMR)
      micro_tile(a_block + i * lda, lda, panel, kd, dst + i * ldd + p * kPanel, ldd);
  }
}

struct ChainArgs {
  int64_t M, K1, R, N2;
  int64_t Rp, N2p;            // R and N2 rounded up to kPanel
  const float* b1_panels;     // [Rp / kPanel][K1][kPanel]
  const float* b2_panels;     // [N2p / kPanel][R][kPanel]
  const float* bias;          // [N2] fp32 or nullptr
};

// Scratch owned by one thread: the converted input rows, the intermediate and the output rows
// of one row block. Views into one buffer allocated before the parallel region, so an
// allocation failure raises a normal C++ exception instead of terminating inside OpenMP.
struct ChainScratch {
  float* a;    // [kBlockM][K1]
  float* mid;  // [kBlockM][Rp]
  float* out;  // [kBlockM][N2p]
  static int64_t floats(const ChainArgs& g) { return kBlockM * (g.K1 + g.Rp + g.N2p); }
  ChainScratch(const ChainArgs& g, float* base)
      : a(base), mid(base + kBlockM * g.K1), out(base + kBlockM * (g.K1 + g.Rp)) {}
};

// Processes rows [m0, m0 + rows) end to end: convert, first product, round, (write mid),
// second product, bias, round, write out.
template <typename T>
LMFUSE_ALWAYS_INLINE void chain_block_impl(const ChainArgs& g, ChainScratch& s, const T* a,
                                           T* out, T* mid_out, int64_t m0) {
  const int64_t rows = std::min(kBlockM, g.M - m0);
  float* ab = s.a;
  for (int64_t i = 0; i < rows; ++i) {
    const T* src = a + (m0 + i) * g.K1;
    float* dst = ab + i * g.K1;
    for (int64_t k = 0; k < g.K1; ++k) dst[k] = static_cast<float>(src[k]);
  }
  // Zero the padding rows of a short last block so the fixed-size tiles read defined data.
  std::fill(ab + rows * g.K1, ab + kBlockM * g.K1, 0.0f);

  float* mid = s.mid;
  block_product(ab, g.K1, g.b1_panels, g.K1, g.Rp / kPanel, mid, g.Rp);
  // Round the intermediate to T, exactly as a T-valued nn.Linear output would be, before it
  // feeds the second product. Padding columns stay zero (their packed B1 columns are zero).
  for (int64_t i = 0; i < rows; ++i) {
    float* row = mid + i * g.Rp;
    for (int64_t r = 0; r < g.R; ++r) {
      const T rounded = static_cast<T>(row[r]);
      row[r] = static_cast<float>(rounded);
      if (mid_out != nullptr) mid_out[(m0 + i) * g.R + r] = rounded;
    }
  }

  float* ob = s.out;
  block_product(mid, g.Rp, g.b2_panels, g.R, g.N2p / kPanel, ob, g.N2p);
  for (int64_t i = 0; i < rows; ++i) {
    const float* src = ob + i * g.N2p;
    T* dst = out + (m0 + i) * g.N2;
    if (g.bias != nullptr) {
      for (int64_t n = 0; n < g.N2; ++n) dst[n] = static_cast<T>(src[n] + g.bias[n]);
    } else {
      for (int64_t n = 0; n < g.N2; ++n) dst[n] = static_cast<T>(src[n]);
    }
  }
}

// Non-template per-dtype workers: function multi-versioning (target_clones) is applied here,
// outside the OpenMP region, because GCC outlines parallel regions into separate functions
// that would not inherit a clone's target.
LMFUSE_CPU_CLONES void chain_block(const ChainArgs& g, ChainScratch& s, const float* a,
                                   float* out, float* mid_out, int64_t m0) {
  chain_block_impl<float>(g, s, a, out, mid_out, m0);
}
LMFUSE_CPU_CLONES void chain_block(const ChainArgs& g, ChainScratch& s, const at::BFloat16* a,
                                   at::BFloat16* out, at::BFloat16* mid_out, int64_t m0) {
  chain_block_impl<at::BFloat16>(g, s, a, out, mid_out, m0);
}
LMFUSE_CPU_CLONES void chain_block(const ChainArgs& g, ChainScratch& s, const at::Half* a,
                                   at::Half* out, at::Half* mid_out, int64_t m0) {
  chain_block_impl<at::Half>(g, s, a, out, mid_out, m0);
}

// Full chained product. b1/b2 orientation: see pack_panels. mid_out may be null.
template <typename T>
void chain(const T* a, int64_t M, int64_t K1, int64_t R, int64_t N2, const T* b1, int64_t ld1,
           const T* b2, int64_t ld2, bool col_major, const T* bias, T* out, T* mid_out) {
  if (M == 0) return;  // nothing to write; R == 0, K1 == 0 and N2 == 0 fall through cleanly
  ChainArgs g{};
  g.M = M; g.K1 = K1; g.R = R; g.N2 = N2;
  g.Rp = round_up(R, kPanel);
  g.N2p = round_up(N2, kPanel);
  const std::vector<float> p1 = pack_panels(b1, ld1, col_major, K1, R);
  const std::vector<float> p2 = pack_panels(b2, ld2, col_major, R, N2);
  std::vector<float> bias_f;
  if (bias != nullptr) {
    bias_f.assign(bias, bias + N2);  // element-wise T -> float
  }
  g.b1_panels = p1.data();
  g.b2_panels = p2.data();
  g.bias = bias != nullptr ? bias_f.data() : nullptr;

  const int64_t nblocks = (M + kBlockM - 1) / kBlockM;
  // Follow torch.set_num_threads; never more threads than blocks (each needs its scratch).
  const int64_t nthreads =
      std::max<int64_t>(1, std::min<int64_t>(at::get_num_threads(), nblocks));
  std::vector<float> scratch(static_cast<size_t>(nthreads * ChainScratch::floats(g)));
#ifdef _OPENMP
#pragma omp parallel num_threads(static_cast<int>(nthreads))
#endif
  {
#ifdef _OPENMP
    const int64_t tid = omp_get_thread_num();
#else
    const int64_t tid = 0;
#endif
    ChainScratch mine(g, scratch.data() + tid * ChainScratch::floats(g));
#ifdef _OPENMP
#pragma omp for schedule(static)
#endif
    for (int64_t b = 0; b < nblocks; ++b) chain_block(g, mine, a, out, mid_out, b * kBlockM);
  }
}

template <typename T>
const T* ptr(const at::Tensor& t) { return reinterpret_cast<const T*>(t.data_ptr()); }
template <typename T>
T* mut_ptr(const at::Tensor& t) { return reinterpret_cast<T*>(t.data_ptr()); }

}  // namespace

bool has_openmp() {
#ifdef _OPENMP
  return true;
#else
  return false;
#endif
}

// Inputs are validated by the bindings (see low_rank_linear_checks.h).
std::tuple<at::Tensor, at::Tensor> low_rank_linear_fwd_cpu(const at::Tensor& x,
                                                           const at::Tensor& down,
                                                           const at::Tensor& up,
                                                           const c10::optional<at::Tensor>& bias,
                                                           bool write_h) {
  const int64_t M = x.size(0), K = x.size(1), R = down.size(0), N = up.size(0);
  at::Tensor y = at::empty({M, N}, x.options());
  // Without write_h, h is [0, R]: empty but still 2-D, as the op layer's fake function expects.
  at::Tensor h = at::empty({write_h ? M : 0, R}, x.options());
  const bool has_bias = bias.has_value() && bias->defined();
  dispatch_dtype(x.scalar_type(), "low_rank_linear", [&](auto tag) {
    using T = decltype(tag);
    // down [R, K] read as B1(k, r) = down[r, k]; up [N, R] read as B2(r, n) = up[n, r].
    chain<T>(ptr<T>(x), M, K, R, N, ptr<T>(down), K, ptr<T>(up), R, /*col_major=*/true,
             has_bias ? ptr<T>(*bias) : nullptr, mut_ptr<T>(y),
             write_h ? mut_ptr<T>(h) : nullptr);
  });
  return {y, h};
}

std::tuple<at::Tensor, at::Tensor> low_rank_linear_bwd_dx_cpu(const at::Tensor& dy,
                                                              const at::Tensor& down,
                                                              const at::Tensor& up) {
  const int64_t M = dy.size(0), N = dy.size(1), R = down.size(0), K = down.size(1);
  at::Tensor dx = at::empty({M, K}, dy.options());
  at::Tensor dh = at::empty({M, R}, dy.options());
  dispatch_dtype(dy.scalar_type(), "low_rank_linear", [&](auto tag) {
    using T = decltype(tag);
    // up [N, R] read as B1(n, r) = up[n, r]; down [R, K] read as B2(r, k) = down[r, k].
    chain<T>(ptr<T>(dy), M, N, R, K, ptr<T>(up), R, ptr<T>(down), K, /*col_major=*/false,
             nullptr, mut_ptr<T>(dx), mut_ptr<T>(dh));
  });
  return {dx, dh};
}

}  // namespace cpu
}  // namespace lmfuse
