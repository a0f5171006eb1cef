// Attention over a KV cache on CPU (attention_kvcache_fwd; shapes and semantics: csrc/attention_contract.h),
// flash-decoding style. Decoding is bound by the memory traffic of the cache, so the kernel is built to read every
// K and V byte once:
//   - one task = (sequence b, kv head, block of rows, chunk of the sequence's keys). The rows of a task are all the
//     query heads of the kv head's GQA group times the Lq queries (row r = g * Lq + i), so K and V are streamed once
//     per kv head, not once per query head;
//   - when (sequences x kv heads) alone would leave threads idle, the keys are split into chunks; each task keeps its
//     rows' normalised partial output and lse (float, double for double inputs), and a second pass merges a row's
//     chunks exactly (log-sum-exp), gates and stores it;
//   - few rows (decoding, speculative decoding, MQA): vector kernels read K and V rows where they lie in the cache
//     (paged or not), bfloat16 widened in registers (its scores by AVX512-BF16 dot products where the CPU has them),
//     half through one L1 row buffer per key block; scores come from register tiles of rows x keys, summed a vector
//     of keys at a time (fold), the output is accumulated in register tiles (64-byte vectors on x86-64-v4, 32-byte
//     ones elsewhere), and the next block's rows are prefetched while a block is computed.
//     Many rows (a prefill chunk) or double: K / V tiles are gathered into acc_t buffers and multiplied by gemm(),
//     as attention_fwd does.
// The online softmax per key block is attention_fwd's: NaN spreads through its row, rows with no key get out 0 and
// lse -inf.
#include <ATen/ATen.h>
#include <ATen/Dispatch.h>
#include <ATen/OpMathType.h>
#include <ATen/Parallel.h>

#include <algorithm>
#include <cmath>
#include <cstdint>
#include <cstdlib>
#include <cstring>
#include <limits>
#include <string>
#include <type_traits>
#include <vector>

#include "attention.h"
#include "cpu_utils.h"
#include "describe.h"

namespace fastattn::cpu {
namespace {

using detail::AttnParams;
using vec::VecF;
using vec::VecI;

constexpr int64_t kLanes = vec::kLanes<float>;  // 16: q and output rows are padded to whole vectors of either width
// Vector path: keys per softmax block (its K rows, 32 KiB in float at D = 128, stay in L1 for the scores and its
// V rows in L1 / L2 for the second column pass of the output tile) and the most rows of a task.
constexpr int64_t kBlockN = 64;
constexpr int64_t kVecRows = 32;
// GEMM path: keys per gathered tile and rows per task (attention_fwd's tile sizes, halved: more tasks).
constexpr int64_t kGemmBlockN = 256;
constexpr int64_t kGemmRows = 128;
// Key chunks: the fewest keys worth a task of their own (the merge then costs little next to reading them), and
// the tasks per thread aimed at, so that dynamic hand-out evens out a shared or uneven machine.
constexpr int64_t kMinChunk = 512;
constexpr int64_t kTasksPerThread = 8;
// The merge's least work (elements of partial outputs) per thread: a decoding step's merge stays on the caller.
constexpr int64_t kMinMergeElems = 1 << 15;

// ---------------------------------------------------------------------------------------------------------------
// Vector kernels: float rows of q and of the output accumulator (padded with zeros to whole 64-byte vectors), K and
// V rows of the cache as float or bfloat16 (the bits, as uint16_t), one pointer per key.
// ---------------------------------------------------------------------------------------------------------------

// Two widths of float vector: 64 bytes where the CPU has 32 registers of that size (AVX-512), 32 bytes elsewhere
// (16 AVX2 registers: the tiles sized for AVX-512 spill there, and ran 5-25x slower in the x86-64-v3 clone).
// Width<V> gives the lane count, the matching int vector (lane indices) and the vector of as many bfloat16.
using VecF8 = float __attribute__((vector_size(32)));
using VecI8 = int32_t __attribute__((vector_size(32)));
template <typename V>
struct Width;
template <>
struct Width<VecF> {
  static constexpr int n = 16;
  using I = VecI;
  using Bf16 = uint16_t __attribute__((vector_size(32)));
};
template <>
struct Width<VecF8> {
  static constexpr int n = 8;
  using I = VecI8;
  using Bf16 = uint16_t __attribute__((vector_size(16)));
};

template <typename V>
FASTATTN_INLINE V load(const float* p) {
  V v;
  std::memcpy(&v, p, sizeof(v));
  return v;
}

template <typename V>
FASTATTN_INLINE void store(float* p, V v) { std::memcpy(p, &v, sizeof(v)); }

template <typename V>
FASTATTN_INLINE V load_kv(const float* p) { return load<V>(p); }

template <typename V>
FASTATTN_INLINE V load_kv(const uint16_t* p) {  // bfloat16 is the top half of a float
  typename Width<V>::Bf16 h;
  std::memcpy(&h, p, sizeof(h));
  return (V)(__builtin_convertvector(h, typename Width<V>::I) << 16);
}

// The first n (fewer than the lanes) elements of p, zeros after: never reads past the row.
template <typename V, typename kv_t>
FASTATTN_INLINE V load_kv_tail(const kv_t* p, int64_t n) {
  kv_t buf[Width<V>::n] = {};
  for (int64_t i = 0; i < n; ++i) buf[i] = p[i];
  return load_kv<V>(buf);
}

// Horizontal sums of as many vectors as lanes at once, by a transpose-and-add tree (45 vector operations for 16
// sums at 16 lanes, where separate horizontal sums take about 8 each). fold<L> takes x and y holding k keys each,
// with n / k lanes of partial sums per key (n lanes), and returns the 2k keys (x's, then y's) with half the lanes
// each: k = 2^L. After log2(n) levels lane j holds key j's sum.
template <int L, typename V>
FASTATTN_INLINE V fold(V x, V y) {
  constexpr int n = Width<V>::n, w = n / 2 >> L;  // lanes per key in the result
  using I = typename Width<V>::I;
  I lo;  // lo[i] = (i / w) * 2w + i % w, hi = lo + w
  if constexpr (n == 16 && L == 0) lo = I{0, 1, 2, 3, 4, 5, 6, 7, 16, 17, 18, 19, 20, 21, 22, 23};
  if constexpr (n == 16 && L == 1) lo = I{0, 1, 2, 3, 8, 9, 10, 11, 16, 17, 18, 19, 24, 25, 26, 27};
  if constexpr (n == 16 && L == 2) lo = I{0, 1, 4, 5, 8, 9, 12, 13, 16, 17, 20, 21, 24, 25, 28, 29};
  if constexpr (n == 16 && L == 3) lo = I{0, 2, 4, 6, 8, 10, 12, 14, 16, 18, 20, 22, 24, 26, 28, 30};
  if constexpr (n == 8 && L == 0) lo = I{0, 1, 2, 3, 8, 9, 10, 11};
  if constexpr (n == 8 && L == 1) lo = I{0, 1, 4, 5, 8, 9, 12, 13};
  if constexpr (n == 8 && L == 2) lo = I{0, 2, 4, 6, 8, 10, 12, 14};
  return __builtin_shuffle(x, y, lo) + __builtin_shuffle(x, y, lo + w);
}

// Folds v[0..N) (N a power of 2) from level L on, in place: v[0] ends up with N times the keys.
template <int L, int N, typename V>
FASTATTN_INLINE void fold_all(V* v) {
  if constexpr (N > 1) {
    for (int i = 0; i < N / 2; ++i) v[i] = fold<L>(v[2 * i], v[2 * i + 1]);
    fold_all<L + 1, N / 2>(v);
  }
}

constexpr int log2i(int n) { return n <= 1 ? 0 : 1 + log2i(n / 2); }

// Asks for the cache lines of bytes [p, p + n) into L2, a block of keys ahead of their use. The hardware
// prefetchers stop at 4 KiB pages and follow the K and V streams only while a block reads them: without this, one
// Zen 4 core read a cold cache at 6-8 GB/s where a plain sum reads 20-24; with it at 12-16 (into L1 instead, the
// next block's rows evict the current one's: slower).
FASTATTN_INLINE void prefetch(const void* p, int64_t n) {
  const char* c = static_cast<const char*>(p);
  for (int64_t off = 0; off < n; off += 64) __builtin_prefetch(c + off, 0, 2);
  __builtin_prefetch(c + n - 1, 0, 2);
}

// S[r, j] = scale * q_r . k_j for RT rows and n keys, a vector's lanes of keys at a time (S rows have room for whole
// vectors). A micro-tile of RT rows x KT keys shares each load of q and of k among KT or RT products (one load per
// product would bound the loop by the load ports, not the FMAs); its KT sums per row are folded into one vector.
template <typename V, int RT, int KT, typename kv_t>
FASTATTN_INLINE void score_tile(float* S, int64_t lds, const float* Q, int64_t ldq, const kv_t* const* krows,
                                int64_t n, int64_t D, float scale, const kv_t* const* pre, int64_t n_pre) {
  constexpr int kN = Width<V>::n, kTiles = kN / KT;
  for (int64_t j0 = 0; j0 < n; j0 += kN) {
    const int64_t nj = std::min<int64_t>(kN, n - j0);
    V part[RT][kTiles];
    for (int tile = 0; tile < kTiles; ++tile) {
      const kv_t* k[KT];
      for (int t = 0; t < KT; ++t) {
        const int64_t j = tile * KT + t;
        k[t] = krows[j0 + (j < nj ? j : 0)];  // past n: any valid row, its score is never read
        if (j0 + j < n_pre) prefetch(pre[j0 + j], D * int64_t(sizeof(kv_t)));
      }
      V acc[RT][KT];
      for (int r = 0; r < RT; ++r)
        for (int t = 0; t < KT; ++t) acc[r][t] = V{};
      int64_t c = 0;
      for (; c + kN <= D; c += kN) {
        V qv[RT];
        for (int r = 0; r < RT; ++r) qv[r] = load<V>(Q + r * ldq + c);
        for (int t = 0; t < KT; ++t) {
          const V kv = load_kv<V>(k[t] + c);
          for (int r = 0; r < RT; ++r) acc[r][t] += qv[r] * kv;
        }
      }
      if (c < D) {  // q's padding is 0
        for (int t = 0; t < KT; ++t) {
          const V kv = load_kv_tail<V>(k[t] + c, D - c);
          for (int r = 0; r < RT; ++r) acc[r][t] += load<V>(Q + r * ldq + c) * kv;
        }
      }
      for (int r = 0; r < RT; ++r) {
        fold_all<0, KT>(acc[r]);
        part[r][tile] = acc[r][0];
      }
    }
    for (int r = 0; r < RT; ++r) {
      fold_all<log2i(KT), kTiles>(part[r]);
      store(S + r * lds + j0, part[r][0] * scale);
    }
  }
}

// Rows in tiles of RT (the last tile smaller; a single row with KT1 keys at a time).
template <typename V, int RT, int KT, int KT1, typename kv_t>
FASTATTN_INLINE void score_rows(float* S, int64_t lds, const float* Q, int64_t ldq, int64_t rows,
                                const kv_t* const* krows, int64_t n, int64_t D, float scale, const kv_t* const* pre,
                                int64_t n_pre) {
  int64_t r = 0;
  for (; r + RT <= rows; r += RT, n_pre = 0)  // the first row tile reads the rows ahead
    score_tile<V, RT, RT == 1 ? KT1 : KT>(S + r * lds, lds, Q + r * ldq, ldq, krows, n, D, scale, pre, n_pre);
  if constexpr (RT > 1) {
    if (r < rows)
      score_rows<V, RT - 1, KT, KT1>(S + r * lds, lds, Q + r * ldq, ldq, rows - r, krows, n, D, scale, pre, n_pre);
  }
}

// wide: the 64-byte vectors (see Width). pre[0, n_pre): the K rows of the next block, to prefetch.
template <typename kv_t>
FASTATTN_VEC_CLONES void block_scores(float* S, int64_t lds, const float* Q, int64_t ldq, int64_t rows,
                                      const kv_t* const* krows, int64_t n, int64_t D, float scale,
                                      const kv_t* const* pre, int64_t n_pre, bool wide) {
  if (wide) score_rows<VecF, 4, 4, 8>(S, lds, Q, ldq, rows, krows, n, D, scale, pre, n_pre);
  else score_rows<VecF8, 4, 2, 4>(S, lds, Q, ldq, rows, krows, n, D, scale, pre, n_pre);
}

// O[r, c0 : c0 + W lanes] += sum_j P[r, j] v_j[c0 : c0 + W lanes] for RT rows, held in registers over the n keys.
// O's rows are padded to whole vectors; V's are read only up to Dv.
template <typename V, int RT, int W, typename kv_t>
FASTATTN_INLINE void pv_tile(float* O, int64_t ldo, const float* P, int64_t ldp, const kv_t* const* vrows, int64_t n,
                             int64_t c0, int64_t Dv, const kv_t* const* pre, int64_t n_pre) {
  constexpr int kN = Width<V>::n;
  const int64_t width = std::min<int64_t>(W * kN, Dv - c0);
  const int64_t nvec = (width + kN - 1) / kN;
  V acc[RT][W];
  for (int r = 0; r < RT; ++r)
    for (int w = 0; w < W; ++w) acc[r][w] = w < nvec ? load<V>(O + r * ldo + c0 + w * kN) : V{};
  if (width == W * kN) {
    for (int64_t j = 0; j < n; ++j) {
      const kv_t* v = vrows[j] + c0;
      if (j < n_pre) prefetch(pre[j] + c0, width * int64_t(sizeof(kv_t)));
      V x[W];
      for (int w = 0; w < W; ++w) x[w] = load_kv<V>(v + w * kN);
      for (int r = 0; r < RT; ++r) {
        const V p = V{} + P[r * ldp + j];
        for (int w = 0; w < W; ++w) acc[r][w] += p * x[w];
      }
    }
  } else {
    for (int64_t j = 0; j < n; ++j) {
      const kv_t* v = vrows[j] + c0;
      if (j < n_pre) prefetch(pre[j] + c0, width * int64_t(sizeof(kv_t)));
      V x[W];
      for (int w = 0; w < W; ++w)
        x[w] = (w + 1) * kN <= width ? load_kv<V>(v + w * kN)
               : w * kN < width      ? load_kv_tail<V>(v + w * kN, width - w * kN)
                                     : V{};
      for (int r = 0; r < RT; ++r) {
        const V p = V{} + P[r * ldp + j];
        for (int w = 0; w < W; ++w) acc[r][w] += p * x[w];
      }
    }
  }
  for (int r = 0; r < RT; ++r)
    for (int w = 0; w < W; ++w)
      if (w < nvec) store(O + r * ldo + c0 + w * kN, acc[r][w]);
}

template <typename V, int RT, int W, typename kv_t>
FASTATTN_INLINE void pv_rows(float* O, int64_t ldo, const float* P, int64_t ldp, int64_t rows,
                             const kv_t* const* vrows, int64_t n, int64_t c0, int64_t Dv, const kv_t* const* pre,
                             int64_t n_pre) {
  int64_t r = 0;
  for (; r + RT <= rows; r += RT, n_pre = 0)  // the first row tile reads the rows ahead
    pv_tile<V, RT, W>(O + r * ldo, ldo, P + r * ldp, ldp, vrows, n, c0, Dv, pre, n_pre);
  if constexpr (RT > 1) {
    if (r < rows) pv_rows<V, RT - 1, W>(O + r * ldo, ldo, P + r * ldp, ldp, rows - r, vrows, n, c0, Dv, pre, n_pre);
  }
}

// pre[0, n_pre): the V rows of the next block, to prefetch.
template <typename kv_t>
FASTATTN_VEC_CLONES void block_pv(float* O, int64_t ldo, const float* P, int64_t ldp, int64_t rows,
                                  const kv_t* const* vrows, int64_t n, int64_t Dv, const kv_t* const* pre,
                                  int64_t n_pre, bool wide) {
  for (int64_t c0 = 0; c0 < Dv; c0 += wide ? 64 : 32) {  // 4 vectors
    if (wide) pv_rows<VecF, 4, 4>(O, ldo, P, ldp, rows, vrows, n, c0, Dv, pre, n_pre);
    else pv_rows<VecF8, 2, 4>(O, ldo, P, ldp, rows, vrows, n, c0, Dv, pre, n_pre);
  }
}

#if FASTATTN_X86
#define FASTATTN_BF16_DOT __attribute__((target("avx512f,avx512bw,avx512bf16")))
// block_scores for bfloat16 keys on AVX512-BF16: q (bfloat16 rows, padded with zeros to 32 elements) . k by
// vdpbf16ps, two products per float lane (each exact in float), on the cache's bytes as they are: a third of the
// instructions of widening k (a 4-row tile's scores: 16 TSC ticks per key instead of 41 on a Zen 4 core).
template <int RT, int KT>
FASTATTN_BF16_DOT FASTATTN_INLINE void score_tile_bf16_dot(float* S, int64_t lds, const uint16_t* Q, int64_t ldq,
                                                            const uint16_t* const* krows, int64_t n, int64_t D,
                                                            float scale, const uint16_t* const* pre, int64_t n_pre) {
  constexpr int kN = Width<VecF>::n, kTiles = kN / KT;
  const __mmask32 tail = D % 32 ? __mmask32((1u << (D % 32)) - 1) : ~__mmask32(0);
  for (int64_t j0 = 0; j0 < n; j0 += kN) {
    const int64_t nj = std::min<int64_t>(kN, n - j0);
    VecF part[RT][kTiles];
    for (int tile = 0; tile < kTiles; ++tile) {
      const uint16_t* k[KT];
      for (int t = 0; t < KT; ++t) {
        const int64_t j = tile * KT + t;
        k[t] = krows[j0 + (j < nj ? j : 0)];  // past n: any valid row, its score is never read
        if (j0 + j < n_pre) prefetch(pre[j0 + j], D * 2);
      }
      __m512 acc[RT][KT];
      for (int r = 0; r < RT; ++r)
        for (int t = 0; t < KT; ++t) acc[r][t] = _mm512_setzero_ps();
      for (int64_t c = 0; c < D; c += 32) {
        const __mmask32 m = c + 32 <= D ? ~__mmask32(0) : tail;  // masked lanes are neither read nor faulted
        __m512bh qv[RT];
        for (int r = 0; r < RT; ++r) qv[r] = (__m512bh)_mm512_loadu_si512(Q + r * ldq + c);
        for (int t = 0; t < KT; ++t) {
          const __m512bh kv = (__m512bh)_mm512_maskz_loadu_epi16(m, k[t] + c);
          for (int r = 0; r < RT; ++r) acc[r][t] = _mm512_dpbf16_ps(acc[r][t], qv[r], kv);
        }
      }
      for (int r = 0; r < RT; ++r) {
        VecF a[KT];
        for (int t = 0; t < KT; ++t) a[t] = (VecF)acc[r][t];
        fold_all<0, KT>(a);
        part[r][tile] = a[0];
      }
    }
    for (int r = 0; r < RT; ++r) {
      fold_all<log2i(KT), kTiles>(part[r]);
      store(S + r * lds + j0, part[r][0] * scale);
    }
  }
}

template <int RT, int KT, int KT1>
FASTATTN_BF16_DOT FASTATTN_INLINE void score_rows_bf16_dot(float* S, int64_t lds, const uint16_t* Q, int64_t ldq,
                                                            int64_t rows, const uint16_t* const* krows, int64_t n,
                                                            int64_t D, float scale, const uint16_t* const* pre,
                                                            int64_t n_pre) {
  int64_t r = 0;
  for (; r + RT <= rows; r += RT, n_pre = 0)
    score_tile_bf16_dot<RT, RT == 1 ? KT1 : KT>(S + r * lds, lds, Q + r * ldq, ldq, krows, n, D, scale, pre, n_pre);
  if constexpr (RT > 1) {
    if (r < rows)
      score_rows_bf16_dot<RT - 1, KT, KT1>(S + r * lds, lds, Q + r * ldq, ldq, rows - r, krows, n, D, scale, pre,
                                           n_pre);
  }
}

FASTATTN_BF16_DOT void block_scores_bf16_dot(float* S, int64_t lds, const uint16_t* Q, int64_t ldq, int64_t rows,
                                             const uint16_t* const* krows, int64_t n, int64_t D, float scale,
                                             const uint16_t* const* pre, int64_t n_pre) {
  score_rows_bf16_dot<4, 4, 8>(S, lds, Q, ldq, rows, krows, n, D, scale, pre, n_pre);
}
#else
void block_scores_bf16_dot(float*, int64_t, const uint16_t*, int64_t, int64_t, const uint16_t* const*, int64_t,
                           int64_t, float, const uint16_t* const*, int64_t) {
  TORCH_CHECK(false, "block_scores_bf16_dot: AVX512-BF16 is not available");
}
#endif

// Which vector kernels run: the 64-byte tiles where the CPU runs the x86-64-v4 clones (FASTATTN_VEC_CLONES picks the
// same), and the bfloat16 scores on AVX512-BF16 where it has that too. The environment variable
// FASTATTN_TEST_DECODE_TILES (a test hook) runs the others on this CPU: "narrow" the 32-byte tiles, "no-bf16-dot" the
// 64-byte ones without AVX512-BF16.
struct Tiles {
  bool wide, bf16_dot;
};

inline Tiles decode_tiles() {
  static const Tiles tiles = [] {
    const char* hook = std::getenv("FASTATTN_TEST_DECODE_TILES");
    const std::string test = hook != nullptr ? hook : "";
#if FASTATTN_X86
    __builtin_cpu_init();
    const bool wide = test != "narrow" && __builtin_cpu_supports("x86-64-v4");
#else
    const bool wide = false;
#endif
    return Tiles{wide, wide && test != "no-bf16-dot" && has_bf16_dot()};
  }();
  return tiles;
}

// ---------------------------------------------------------------------------------------------------------------
// Tasks
// ---------------------------------------------------------------------------------------------------------------

// Rows [r0, r0 + rows) of (sequence b, kv head hk) over keys [j0, j1).
struct Task {
  int64_t b, hk, r0, rows, j0, j1;
};

// The chunks of one (sequence, kv head, row block): tasks [first, first + n) of the list, in key order.
struct Group {
  int64_t first, n;
};

inline int64_t ceil_div(int64_t a, int64_t b) { return (a + b - 1) / b; }

// rows[jj] = the cache row of key j0 + jj of (sequence b, kv head hk), jj < n: runs of consecutive rows, one per page.
template <typename T>
void key_rows(const T** rows, const AttnParams& s, const T* cache, int64_t sb, int64_t sh, int64_t sl, int64_t b,
              int64_t hk, int64_t j0, int64_t n) {
  for (int64_t j = j0; j < j0 + n;) {
    const int64_t run = s.page_table == nullptr ? j0 + n - j : std::min(j0 + n - j, s.page_size - j % s.page_size);
    const T* p = cache + hk * sh + kv_row_offset(s, b, j, sb, sl);
    for (int64_t t = 0; t < run; ++t) rows[j - j0 + t] = p + t * sl;
    j += run;
  }
}

template <typename scalar_t>
const scalar_t* q_row(const AttnParams& s, int64_t b, int64_t hk, int64_t r) {
  const int64_t h = hk * s.group + r / s.Lq, i = r % s.Lq;
  return static_cast<const scalar_t*>(s.q) + b * s.q_sb + h * s.q_sh + i * s.q_sl;
}

// limit[r] = the number of keys row r0 + r may see (keys [0, limit)): all of the sequence's, or up to the bottom-right
// diagonal.
void row_limits(int64_t* limit, const AttnParams& s, const SeqExtent& e, int64_t r0, int64_t rows) {
  for (int64_t r = 0; r < rows; ++r) {
    const int64_t i = (r0 + r) % s.Lq;
    limit[r] = s.causal ? std::clamp<int64_t>(i + e.causal_off + 1, 0, e.Lk) : e.Lk;
  }
}

// Scores of keys [jb, jb + bn) past a row's limit -> -inf.
template <typename acc_t>
void mask_block(acc_t* S, int64_t lds, int64_t rows, const int64_t* limit, int64_t jb, int64_t bn) {
  for (int64_t r = 0; r < rows; ++r) {
    const int64_t ok = std::clamp<int64_t>(limit[r] - jb, 0, bn);
    std::fill(S + r * lds + ok, S + r * lds + bn, -std::numeric_limits<acc_t>::infinity());
  }
}

// attention_fwd's online softmax step on one block of scores S [rows, bn] (log2 units): S becomes P = 2^(S - m_new),
// the running max m and sum l are updated and the output accumulator O rescaled.
template <typename acc_t>
void softmax_block(acc_t* S, int64_t lds, int64_t rows, int64_t bn, acc_t* m, acc_t* l, acc_t* O, int64_t ldo,
                   int64_t Dv) {
  constexpr acc_t kNegInf = -std::numeric_limits<acc_t>::infinity();
  for (int64_t r = 0; r < rows; ++r) {
    acc_t* row = S + r * lds;
    const acc_t m_new = nan_max(m[r], row_max(row, bn));  // a NaN score makes the whole row NaN
    if (m_new == kNegInf) {  // no allowed key yet: contributes nothing
      std::fill_n(row, bn, acc_t(0));
      continue;
    }
    const acc_t correction = std::exp2(m[r] - m_new);  // 0 when m = -inf
    l[r] = l[r] * correction + exp2_shift_sum(row, bn, m_new);
    m[r] = m_new;
    if (correction != acc_t(1)) scale_row(O + r * ldo, correction, Dv);
  }
}

// A task's result per row: O / l and lse = m + log2(l); a row with no key gets 0 and -inf.
template <typename acc_t>
void write_partial(acc_t* o_ws, acc_t* lse_ws, const acc_t* O, int64_t ldo, const acc_t* m, const acc_t* l,
                   int64_t rows, int64_t Dv) {
  for (int64_t r = 0; r < rows; ++r) {
    acc_t* o = o_ws + r * Dv;
    if (l[r] == acc_t(0)) {  // exactly 0, not 0 * V (NaN for V = inf)
      std::fill_n(o, Dv, acc_t(0));
      lse_ws[r] = -std::numeric_limits<acc_t>::infinity();
      continue;
    }
    std::copy_n(O + r * ldo, Dv, o);
    scale_row(o, acc_t(1) / l[r], Dv);
    lse_ws[r] = m[r] + std::log2(l[r]);
  }
}

// -- vector path: float statistics; K and V rows read in place (bfloat16 as its bits; half widened per block).
template <typename scalar_t>
struct VecTask {
  using kv_t = std::conditional_t<std::is_same_v<scalar_t, c10::BFloat16>, uint16_t, float>;
  using cache_t = std::conditional_t<std::is_same_v<scalar_t, c10::BFloat16>, uint16_t, scalar_t>;
  static constexpr bool kWiden = std::is_same_v<scalar_t, c10::Half>;
  const AttnParams& s;
  const Tiles tiles = decode_tiles();
  const bool bf16_dot = std::is_same_v<scalar_t, c10::BFloat16> && tiles.bf16_dot;
  int64_t Dp, Dvp, Dq;  // row lengths padded to whole vectors; q's as bfloat16 pairs of 32 for bf16_dot
  std::vector<float> Q, O, S, m, l, Kw, Vw;
  std::vector<int64_t> limit;
  std::vector<const cache_t*> krows, vrows;  // a block's rows, then the next block's
  std::vector<const float*> kw, vw;           // half: the rows of Kw, Vw
  std::vector<uint16_t> Qb;                   // bf16_dot: q's rows as they are, padded

  explicit VecTask(const AttnParams& s_)
      : s(s_), Dp(ceil_div(s_.D, kLanes) * kLanes), Dvp(ceil_div(s_.Dv, kLanes) * kLanes), Dq(ceil_div(s_.D, 32) * 32),
        Q(kVecRows * Dp),
        O(kVecRows * Dvp), S(kVecRows * kBlockN), m(kVecRows), l(kVecRows), Kw(kWiden ? kBlockN * Dp : 0),
        Vw(kWiden ? kBlockN * Dvp : 0), limit(kVecRows), krows(2 * kBlockN), vrows(2 * kBlockN),
        kw(kWiden ? kBlockN : 0), vw(kWiden ? kBlockN : 0), Qb(bf16_dot ? kVecRows * Dq : 0) {
    for (int64_t j = 0; j < int64_t(kw.size()); ++j) kw[j] = Kw.data() + j * Dp, vw[j] = Vw.data() + j * Dvp;
  }

  void run(const Task& t, float* o_ws, float* lse_ws) {
    const SeqExtent e = seq_extent(s, t.b);
    const int64_t rows = t.rows;
    for (int64_t r = 0; r < rows; ++r) {
      float* qr = Q.data() + r * Dp;
      convert_row(qr, q_row<scalar_t>(s, t.b, t.hk, t.r0 + r), s.D);
      std::fill(qr + s.D, qr + Dp, 0.f);
      if (bf16_dot) {
        uint16_t* qb = Qb.data() + r * Dq;
        std::memcpy(qb, q_row<scalar_t>(s, t.b, t.hk, t.r0 + r), s.D * sizeof(uint16_t));
        std::fill(qb + s.D, qb + Dq, uint16_t(0));
      }
    }
    std::fill_n(O.data(), rows * Dvp, 0.f);
    std::fill_n(m.data(), rows, -std::numeric_limits<float>::infinity());
    std::fill_n(l.data(), rows, 0.f);
    row_limits(limit.data(), s, e, t.r0, rows);
    const int64_t j_end = std::min(t.j1, *std::max_element(limit.begin(), limit.begin() + rows));
    const auto* k = static_cast<const cache_t*>(s.k);
    const auto* v = static_cast<const cache_t*>(s.v);
    const float scale_log2 = float(s.scale_log2);
    for (int64_t jb = t.j0; jb < j_end; jb += kBlockN) {
      const int64_t bn = std::min(kBlockN, j_end - jb), n_next = std::clamp<int64_t>(j_end - jb - bn, 0, kBlockN);
      key_rows(krows.data(), s, k, s.k_sb, s.k_sh, s.k_sl, t.b, t.hk, jb, bn);
      key_rows(vrows.data(), s, v, s.v_sb, s.v_sh, s.v_sl, t.b, t.hk, jb, bn);
      key_rows(krows.data() + kBlockN, s, k, s.k_sb, s.k_sh, s.k_sl, t.b, t.hk, jb + bn, n_next);
      key_rows(vrows.data() + kBlockN, s, v, s.v_sb, s.v_sh, s.v_sl, t.b, t.hk, jb + bn, n_next);
      const kv_t* const* kp;
      const kv_t* const* vp;
      const kv_t* const* k_next = nullptr;
      const kv_t* const* v_next = nullptr;
      if constexpr (kWiden) {
        for (int64_t j = 0; j < bn; ++j) {
          if (j < n_next) {
            prefetch(krows[kBlockN + j], s.D * int64_t(sizeof(cache_t)));
            prefetch(vrows[kBlockN + j], s.Dv * int64_t(sizeof(cache_t)));
          }
          convert_row(Kw.data() + j * Dp, krows[j], s.D);
          convert_row(Vw.data() + j * Dvp, vrows[j], s.Dv);
        }
        kp = kw.data(), vp = vw.data();
      } else {
        kp = krows.data(), vp = vrows.data(), k_next = kp + kBlockN, v_next = vp + kBlockN;
      }
      const int64_t n_pre = kWiden ? 0 : n_next;
      if constexpr (std::is_same_v<kv_t, uint16_t>) {
        if (bf16_dot)
          block_scores_bf16_dot(S.data(), kBlockN, Qb.data(), Dq, rows, kp, bn, s.D, scale_log2, k_next, n_pre);
      }
      if (!bf16_dot)
        block_scores<kv_t>(S.data(), kBlockN, Q.data(), Dp, rows, kp, bn, s.D, scale_log2, k_next, n_pre, tiles.wide);
      mask_block(S.data(), kBlockN, rows, limit.data(), jb, bn);
      softmax_block(S.data(), kBlockN, rows, bn, m.data(), l.data(), O.data(), Dvp, Dvp);
      block_pv<kv_t>(O.data(), Dvp, S.data(), kBlockN, rows, vp, bn, s.Dv, v_next, n_pre, tiles.wide);
    }
    write_partial(o_ws, lse_ws, O.data(), Dvp, m.data(), l.data(), rows, s.Dv);
  }
};

// -- GEMM path: q, K and V tiles gathered into acc_t buffers, attention_fwd's two GEMMs per tile.
template <typename scalar_t, typename acc_t>
struct GemmTask {
  const AttnParams& s;
  std::vector<acc_t> Q, K, V, S, O, m, l;
  std::vector<int64_t> limit;
  std::vector<const scalar_t*> krows, vrows;

  explicit GemmTask(const AttnParams& s_)
      : s(s_), Q(kGemmRows * s_.D), K(kGemmBlockN * s_.D), V(kGemmBlockN * s_.Dv), S(kGemmRows * kGemmBlockN),
        O(kGemmRows * s_.Dv), m(kGemmRows), l(kGemmRows), limit(kGemmRows), krows(kGemmBlockN), vrows(kGemmBlockN) {}

  void run(const Task& t, acc_t* o_ws, acc_t* lse_ws) {
    const SeqExtent e = seq_extent(s, t.b);
    const int64_t rows = t.rows, D = s.D, Dv = s.Dv;
    for (int64_t r = 0; r < rows; ++r) convert_row(Q.data() + r * D, q_row<scalar_t>(s, t.b, t.hk, t.r0 + r), D);
    std::fill_n(O.data(), rows * Dv, acc_t(0));
    std::fill_n(m.data(), rows, -std::numeric_limits<acc_t>::infinity());
    std::fill_n(l.data(), rows, acc_t(0));
    row_limits(limit.data(), s, e, t.r0, rows);
    const int64_t j_end = std::min(t.j1, *std::max_element(limit.begin(), limit.begin() + rows));
    const acc_t scale_log2 = acc_t(s.scale_log2);
    for (int64_t jb = t.j0; jb < j_end; jb += kGemmBlockN) {
      const int64_t bn = std::min(kGemmBlockN, j_end - jb);
      key_rows(krows.data(), s, static_cast<const scalar_t*>(s.k), s.k_sb, s.k_sh, s.k_sl, t.b, t.hk, jb, bn);
      key_rows(vrows.data(), s, static_cast<const scalar_t*>(s.v), s.v_sb, s.v_sh, s.v_sl, t.b, t.hk, jb, bn);
      for (int64_t j = 0; j < bn; ++j) {
        convert_row(K.data() + j * D, krows[j], D);
        convert_row(V.data() + j * Dv, vrows[j], Dv);
      }
      gemm(false, true, rows, bn, D, scale_log2, Q.data(), D, K.data(), D, acc_t(0), S.data(), kGemmBlockN);
      mask_block(S.data(), kGemmBlockN, rows, limit.data(), jb, bn);
      softmax_block(S.data(), kGemmBlockN, rows, bn, m.data(), l.data(), O.data(), Dv, Dv);
      gemm(false, false, rows, Dv, bn, acc_t(1), S.data(), kGemmBlockN, V.data(), Dv, acc_t(1), O.data(), Dv);
    }
    write_partial(o_ws, lse_ws, O.data(), Dv, m.data(), l.data(), rows, s.Dv);
  }
};

// Runs every task (Worker: VecTask or GemmTask), then merges each row's chunks into out and lse.
template <typename scalar_t, typename acc_t, typename Worker>
void decode(const AttnParams& s, int64_t row_block, int64_t key_block, scalar_t* out, acc_t* lse) {
  const int64_t R = s.group * s.Lq, n_rb = ceil_div(R, row_block), Dv = s.Dv;
  // Chunk length: the keys of all (sequence, kv head, row block) spread over about kTasksPerThread tasks per thread,
  // never below kMinChunk (one chunk per sequence when there is work enough without splitting).
  int64_t total = 0;
  for (int64_t b = 0; b < s.B; ++b) total += seq_extent(s, b).Lk;
  total *= s.Hkv * n_rb;
  const int64_t target = kTasksPerThread * at::get_num_threads();
  const int64_t chunk = ceil_div(std::max(kMinChunk, ceil_div(total, target)), key_block) * key_block;

  std::vector<Task> tasks;
  std::vector<Group> groups;
  groups.reserve(s.B * s.Hkv * n_rb);
  for (int64_t b = 0; b < s.B; ++b) {
    const int64_t Lk = seq_extent(s, b).Lk, n_chunks = std::max<int64_t>(1, ceil_div(Lk, chunk));
    for (int64_t hk = 0; hk < s.Hkv; ++hk) {
      for (int64_t r0 = 0; r0 < R; r0 += row_block) {
        groups.push_back({int64_t(tasks.size()), n_chunks});
        for (int64_t c = 0; c < n_chunks; ++c)
          tasks.push_back({b, hk, r0, std::min(row_block, R - r0), c * chunk, std::min(Lk, (c + 1) * chunk)});
      }
    }
  }
  // Per task slot: row_block rows of the normalised partial output, and their lse.
  std::vector<acc_t> ws_o(tasks.size() * row_block * Dv), ws_lse(tasks.size() * row_block);
  const int64_t n_tasks = int64_t(tasks.size());
  parallel_dynamic(n_tasks, [&](const auto& claim) {
    Worker worker(s);
    for (int64_t t; (t = claim()) >= 0;)
      worker.run(tasks[t], ws_o.data() + t * row_block * Dv, ws_lse.data() + t * row_block);
  });

  // Merge: lse = log2 sum_c 2^lse_c; out = sum_c 2^(lse_c - lse) o_c. A lone chunk is copied as it is.
  constexpr acc_t kNegInf = -std::numeric_limits<acc_t>::infinity();
  const auto* gate = static_cast<const scalar_t*>(s.gate);
  const int64_t n_groups = int64_t(groups.size());
  const int64_t grain = std::max<int64_t>(1, kMinMergeElems * n_groups / std::max<int64_t>(1, n_tasks * row_block * Dv));
  at::parallel_for(0, n_groups, grain, [&](int64_t g0, int64_t g1) {
    std::vector<acc_t> o(Dv);
    for (int64_t gi = g0; gi < g1; ++gi) {
      const Group& grp = groups[gi];
      const Task& first = tasks[grp.first];
      for (int64_t r = 0; r < first.rows; ++r) {
        const int64_t rr = first.r0 + r, h = first.hk * s.group + rr / s.Lq, i = rr % s.Lq;
        const int64_t row_idx = (first.b * s.Hq + h) * s.Lq + i;
        auto lse_c = [&](int64_t c) { return ws_lse[(grp.first + c) * row_block + r]; };
        auto o_c = [&](int64_t c) { return ws_o.data() + ((grp.first + c) * row_block + r) * Dv; };
        acc_t L = lse_c(0);
        if (grp.n == 1) {
          std::copy_n(o_c(0), Dv, o.data());
        } else {
          acc_t M = kNegInf;
          for (int64_t c = 0; c < grp.n; ++c) M = nan_max(M, lse_c(c));
          std::fill(o.begin(), o.end(), acc_t(0));
          if (M == kNegInf) {
            L = kNegInf;
          } else {  // M NaN: every weight, and so the row, is NaN
            acc_t sum = 0;
            for (int64_t c = 0; c < grp.n; ++c) sum += std::exp2(lse_c(c) - M);
            L = M + std::log2(sum);
            for (int64_t c = 0; c < grp.n; ++c) {
              const acc_t w = std::exp2(lse_c(c) - L);
              const acc_t* oc = o_c(c);
              for (int64_t x = 0; x < Dv; ++x) o[x] += w * oc[x];
            }
          }
        }
        lse[row_idx] = L;
        if (gate != nullptr) {
          const scalar_t* g = gate + first.b * s.g_sb + h * s.g_sh + i * s.g_si;
          for (int64_t x = 0; x < Dv; ++x) o[x] *= sigmoid(acc_t(g[x * s.g_sc]));
        }
        convert_row(out + row_idx * Dv, o.data(), Dv);
      }
    }
  });
}

}  // namespace

std::tuple<at::Tensor, at::Tensor> attention_kvcache_fwd(const at::Tensor& q, const at::Tensor& k_cache,
                                                         const at::Tensor& v_cache, const at::Tensor& seqlens_k,
                                                         const std::optional<at::Tensor>& page_table,
                                                         const std::optional<at::Tensor>& gate, double scale,
                                                         int64_t causal) {
  constexpr const char* op = "attention_kvcache_fwd";
  TORCH_CHECK(q.device().is_cpu(), op, ": q, k_cache, v_cache must be CPU tensors, got q on ", q.device());
  const auto dt = q.scalar_type();
  TORCH_CHECK(dt == at::kFloat || dt == at::kDouble || dt == at::kBFloat16 || dt == at::kHalf, op,
              ": q must be float32, float64, bfloat16 or float16, got ", dt);
  AttnParams s{};
  describe_kvcache_attention(s, op, q, k_cache, v_cache, seqlens_k, page_table, gate, scale, causal);
  // The index values are fastattn.attention_with_kvcache's to check; on the CPU it costs nothing to refuse, here too,
  // the ones that would read outside the cache.
  const bool paged = s.page_table != nullptr;
  for (int64_t b = 0; b < s.B; ++b) {
    const int64_t n = s.seqlens_k[b];
    TORCH_CHECK(n >= 0 && n <= s.Lk, op, ": seqlens_k[", b, "] = ", n, " must lie in [0, ", s.Lk, "]");
    for (int64_t p = 0; paged && p < ceil_div(n, s.page_size); ++p) {
      const int64_t page = s.page_table[b * s.pt_sb + p];
      TORCH_CHECK(page >= 0 && page < k_cache.size(0), op, ": page_table[", b, ", ", p, "] = ", page,
                  " must lie in [0, ", k_cache.size(0), ")");
    }
  }
  const auto acc_type = dt == at::kDouble ? at::kDouble : at::kFloat;
  at::Tensor out = at::empty({s.B, s.Hq, s.Lq, s.Dv}, q.options());
  at::Tensor lse = at::empty({s.B, s.Hq, s.Lq}, q.options().dtype(acc_type));
  if (lse.numel() == 0) return {out, lse};

  const int64_t R = s.group * s.Lq;
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kBFloat16, at::kHalf, dt, op, [&] {
    using acc_t = at::opmath_type<scalar_t>;
    if constexpr (std::is_same_v<acc_t, float>) {
      if (R <= kVecRows)
        return decode<scalar_t, float, VecTask<scalar_t>>(s, R, kBlockN, out.data_ptr<scalar_t>(),
                                                          lse.data_ptr<float>());
    }
    decode<scalar_t, acc_t, GemmTask<scalar_t, acc_t>>(s, std::min(R, kGemmRows), kGemmBlockN,
                                                       out.data_ptr<scalar_t>(), lse.data_ptr<acc_t>());
  });
  return {out, lse};
}

}  // namespace fastattn::cpu
