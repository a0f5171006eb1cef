// Shared CPU building blocks for fastattn's C++ kernels, on top of the vector layer in vec.h
// (vector types, ISA clones, convert_row):
//   - gemm():          row-major tile GEMM on MKL's Fortran sgemm_/dgemm_ (weak symbols exported by
//                      libtorch_cpu), with an at::addmm_ fallback so the extension always loads;
//   - gemm_nt_bf16():  bfloat16 x bfloat16 -> float tile GEMM on AVX512-BF16, where the CPU has it;
//   - tile_as():       a tile in the accumulation type (convert_row per row);
//   - row_max(), exp2_shift_sum(), ...: vectorised row helpers for the softmax;
//   - parallel_dynamic(): at::parallel_for with tasks handed out one by one.
#pragma once

#include <ATen/ATen.h>
#include <ATen/Parallel.h>
#include <c10/util/BFloat16.h>
#include <c10/util/Half.h>

#include "vec.h"

#include <algorithm>
#include <atomic>
#include <cmath>
#include <cstdint>
#include <cstring>
#include <limits>
#include <type_traits>
#include <vector>

#include "attention_contract.h"  // kLog2e, kLn2: softmax in base 2

namespace fastattn::cpu {

// ---------------------------------------------------------------------------------------------
// BLAS: C[m, n] = alpha * op(A)[m, k] @ op(B)[k, n] + beta * C, all row-major with leading dims.
// ---------------------------------------------------------------------------------------------
extern "C" {
void sgemm_(const char* transa, const char* transb, const int* m, const int* n, const int* k,
            const float* alpha, const float* a, const int* lda, const float* b, const int* ldb,
            const float* beta, float* c, const int* ldc) __attribute__((weak));
void dgemm_(const char* transa, const char* transb, const int* m, const int* n, const int* k,
            const double* alpha, const double* a, const int* lda, const double* b, const int* ldb,
            const double* beta, double* c, const int* ldc) __attribute__((weak));
}

#ifdef FASTATTN_TEST_GEMM_FALLBACK  // test hook: run the at::addmm_ path even where MKL is present
constexpr bool kForceGemmFallback = true;
#else
constexpr bool kForceGemmFallback = false;
#endif

namespace detail {
template <typename T>
void gemm_fallback(bool trans_a, bool trans_b, int64_t m, int64_t n, int64_t k, T alpha, const T* a,
                   int64_t lda, const T* b, int64_t ldb, T beta, T* c, int64_t ldc) {
  auto opts = at::TensorOptions().dtype(c10::CppTypeToScalarType<T>::value);
  auto view = [&](const T* p, int64_t rows, int64_t cols, int64_t ld, bool trans) {
    auto t = at::from_blob(const_cast<T*>(p), {trans ? cols : rows, trans ? rows : cols}, {ld, 1}, opts);
    return trans ? t.t() : t;
  };
  at::Tensor C = at::from_blob(c, {m, n}, {ldc, 1}, opts);
  C.addmm_(view(a, m, k, lda, trans_a), view(b, k, n, ldb, trans_b), beta, alpha);  // beta 0 ignores C
}
}  // namespace detail

namespace detail {
// BLAS requires a leading dimension of at least the row length of the stored (row-major) matrix,
// but torch views break that: rows that coincide (stride 0 from expand) or overlap (unfold), or a
// single row whose stride is arbitrary (size-1 dims). MKL then prints an error, skips the call and
// leaves C as it was. A one-row matrix gets a legal ld (its stride is never used); any other is
// copied into buf with ld = cols.
template <typename T>
const T* legal_ld(const T* p, int64_t rows, int64_t cols, int64_t* ld, std::vector<T>& buf) {
  const int64_t need = std::max<int64_t>(1, cols);
  if (*ld >= need) return p;
  if (rows <= 1) {
    *ld = need;
    return p;
  }
  buf.resize(size_t(rows * cols));
  for (int64_t r = 0; r < rows; ++r) std::copy_n(p + r * *ld, cols, buf.data() + r * cols);
  *ld = need;
  return buf.data();
}

template <typename T, typename Blas>
void gemm_blas(Blas blas, bool trans_a, bool trans_b, int64_t m, int64_t n, int64_t k, T alpha, const T* a,
               int64_t lda, const T* b, int64_t ldb, T beta, T* c, int64_t ldc) {
  thread_local std::vector<T> a_buf, b_buf;
  a = legal_ld(a, trans_a ? k : m, trans_a ? m : k, &lda, a_buf);
  b = legal_ld(b, trans_b ? n : k, trans_b ? k : n, &ldb, b_buf);
  TORCH_INTERNAL_ASSERT(ldc >= n || m == 1, "gemm: output leading dimension ", ldc, " < ", n);
  ldc = std::max<int64_t>(ldc, std::max<int64_t>(1, n));
  // Column-major BLAS sees a row-major matrix as its transpose, so C^T = op(B)^T op(A)^T is computed.
  const char ta = trans_a ? 'T' : 'N', tb = trans_b ? 'T' : 'N';
  const int M = int(m), N = int(n), K = int(k), LDA = int(lda), LDB = int(ldb), LDC = int(ldc);
  blas(&tb, &ta, &N, &M, &K, &alpha, b, &LDB, a, &LDA, &beta, c, &LDC);
}
}  // namespace detail

namespace detail {
inline auto blas_gemm(float) { return sgemm_; }  // null where libtorch_cpu has no MKL
inline auto blas_gemm(double) { return dgemm_; }
}  // namespace detail

template <typename T>
inline void gemm(bool trans_a, bool trans_b, int64_t m, int64_t n, int64_t k, T alpha,
                 const T* a, int64_t lda, const T* b, int64_t ldb, T beta, T* c, int64_t ldc) {
  if (m == 0 || n == 0) return;
  const auto blas = detail::blas_gemm(T());
  if (kForceGemmFallback || blas == nullptr) return detail::gemm_fallback(trans_a, trans_b, m, n, k, alpha, a, lda, b, ldb, beta, c, ldc);
  detail::gemm_blas(blas, trans_a, trans_b, m, n, k, alpha, a, lda, b, ldb, beta, c, ldc);
}

// ---------------------------------------------------------------------------------------------
// bfloat16 tile GEMM on AVX512-BF16 (vdpbf16ps: two bf16 products per float lane, twice the rate
// of float FMAs):  C[m, n] = alpha * A[m, k] @ B[n, k]^T, A and B bfloat16 row-major, C float.
// B is first packed (pack_bt_bf16) into pairs along k, [ceil(k/2), round_up(n, 32)] uint32, so a
// tile reused against many A tiles (a key tile in the backward) is packed once.
// Callers check has_bf16_dot() first; elsewhere (other CPUs, aarch64) the float path runs.
// ---------------------------------------------------------------------------------------------
constexpr int64_t kBf16PanelN = 32;  // columns per micro-kernel panel (two 16-lane registers)
constexpr int64_t kBf16PanelM = 8;   // rows per micro-kernel call (16 accumulator registers)

inline int64_t bf16_pack_size(int64_t n, int64_t k) {
  return (k + 1) / 2 * ((n + kBf16PanelN - 1) / kBf16PanelN * kBf16PanelN);
}

// dst[p][j] = (B[j][2p], B[j][2p+1]) as one uint32 (low half first); zero padding past n and k.
inline void pack_bt_bf16(uint32_t* dst, const c10::BFloat16* B, int64_t ldb, int64_t n, int64_t k) {
  const int64_t kp = (k + 1) / 2, n_pad = (n + kBf16PanelN - 1) / kBf16PanelN * kBf16PanelN;
  const uint16_t* b = reinterpret_cast<const uint16_t*>(B);
  for (int64_t j = 0; j < n; ++j) {
    const uint16_t* row = b + j * ldb;
    for (int64_t p = 0; p < k / 2; ++p) dst[p * n_pad + j] = uint32_t(row[2 * p]) | (uint32_t(row[2 * p + 1]) << 16);
    if (k % 2) dst[(kp - 1) * n_pad + j] = row[k - 1];
  }
  for (int64_t p = 0; p < kp; ++p) std::fill(dst + p * n_pad + n, dst + (p + 1) * n_pad, 0u);
}

#if FASTATTN_X86
inline bool has_bf16_dot() {
#ifdef FASTATTN_TEST_GEMM_FALLBACK  // the test hook also exercises the widened-float bf16 path
  return false;
#endif
  static const bool ok = __builtin_cpu_supports("avx512f") && __builtin_cpu_supports("avx512bf16");
  return ok;
}

namespace detail {
#define FASTATTN_BF16_TARGET __attribute__((target("avx512f,avx512bf16")))
// One MR x 32 block of C: acc[r] += sum_p A[r][2p:2p+2] . Bp[p][0:32]; then C = alpha * acc.
template <int MR>
FASTATTN_BF16_TARGET static void bf16_nt_panel(int64_t k, const uint16_t* A, int64_t lda, const uint32_t* Bp,
                                               int64_t n_pad, float alpha, float* C, int64_t ldc, int64_t ncols) {
  __m512 acc[MR][2];
  for (int r = 0; r < MR; ++r) acc[r][0] = acc[r][1] = _mm512_setzero_ps();
  auto step = [&](int64_t p, const uint32_t* a_pairs) FASTATTN_BF16_TARGET {
    const __m512bh b0 = (__m512bh)_mm512_loadu_si512(Bp + p * n_pad);
    const __m512bh b1 = (__m512bh)_mm512_loadu_si512(Bp + p * n_pad + 16);
    for (int r = 0; r < MR; ++r) {
      const __m512bh a = (__m512bh)_mm512_set1_epi32(int32_t(a_pairs[r]));
      acc[r][0] = _mm512_dpbf16_ps(acc[r][0], a, b0);
      acc[r][1] = _mm512_dpbf16_ps(acc[r][1], a, b1);
    }
  };
  uint32_t a_pairs[MR];
  for (int64_t p = 0; p < k / 2; ++p) {
    for (int r = 0; r < MR; ++r) std::memcpy(&a_pairs[r], A + r * lda + 2 * p, 4);
    step(p, a_pairs);
  }
  if (k % 2) {  // odd k: the last pair is (A[r][k-1], 0); never read past the row
    for (int r = 0; r < MR; ++r) a_pairs[r] = A[r * lda + k - 1];
    step(k / 2, a_pairs);
  }
  const __mmask16 m0 = ncols >= 16 ? __mmask16(0xFFFF) : __mmask16((1u << ncols) - 1);
  const __mmask16 m1 = ncols >= 32 ? __mmask16(0xFFFF) : ncols <= 16 ? __mmask16(0) : __mmask16((1u << (ncols - 16)) - 1);
  const __m512 va = _mm512_set1_ps(alpha);
  for (int r = 0; r < MR; ++r) {
    _mm512_mask_storeu_ps(C + r * ldc, m0, _mm512_mul_ps(acc[r][0], va));
    _mm512_mask_storeu_ps(C + r * ldc + 16, m1, _mm512_mul_ps(acc[r][1], va));
  }
}
}  // namespace detail

// C[m, n] = alpha * A[m, k] @ B^T with B packed by pack_bt_bf16(packed_n, k) (packed_n >= n: the first n columns
// of a packed tile; 0: n).
inline void gemm_nt_bf16(int64_t m, int64_t n, int64_t k, float alpha, const c10::BFloat16* A, int64_t lda,
                         const uint32_t* Bp, float* C, int64_t ldc, int64_t packed_n = 0) {
  const uint16_t* a = reinterpret_cast<const uint16_t*>(A);
  const int64_t n_pad = (std::max(n, packed_n) + kBf16PanelN - 1) / kBf16PanelN * kBf16PanelN;
  for (int64_t j0 = 0; j0 < n; j0 += kBf16PanelN) {
    const int64_t ncols = std::min(kBf16PanelN, n - j0);
    for (int64_t i0 = 0; i0 < m; i0 += kBf16PanelM) {
      const uint16_t* Ai = a + i0 * lda;
      float* Ci = C + i0 * ldc + j0;
      switch (std::min(kBf16PanelM, m - i0)) {
#define FASTATTN_PANEL(R) case R: detail::bf16_nt_panel<R>(k, Ai, lda, Bp + j0, n_pad, alpha, Ci, ldc, ncols); break;
        FASTATTN_PANEL(1) FASTATTN_PANEL(2) FASTATTN_PANEL(3) FASTATTN_PANEL(4)
        FASTATTN_PANEL(5) FASTATTN_PANEL(6) FASTATTN_PANEL(7) FASTATTN_PANEL(8)
#undef FASTATTN_PANEL
      }
    }
  }
}
#else
inline bool has_bf16_dot() { return false; }
inline void gemm_nt_bf16(int64_t, int64_t, int64_t, float, const c10::BFloat16*, int64_t, const uint32_t*, float*,
                         int64_t, int64_t = 0) {
  TORCH_CHECK(false, "gemm_nt_bf16: AVX512-BF16 is not available");
}
#endif

// A [rows, cols] tile with row stride ld, in the accumulation type: the tile itself when it already
// is (no copy), else converted once into buf (row stride cols). *ld_out receives the row stride.
template <typename acc_t, typename scalar_t>
inline const acc_t* tile_as(const scalar_t* src, int64_t ld, int64_t rows, int64_t cols, acc_t* buf,
                            int64_t* ld_out) {
  if constexpr (std::is_same_v<acc_t, scalar_t>) {
    *ld_out = ld;
    return src;
  } else {
    for (int64_t r = 0; r < rows; ++r) convert_row(buf + r * cols, src + r * ld, cols);
    *ld_out = cols;
    return buf;
  }
}

// ---------------------------------------------------------------------------------------------
// Row helpers for the softmax. float: vec.h's vectors and exp2_poly, compiled per ISA level; double:
// plain loops and libm's exact exp2. Row tails are padded with a neutral value (-inf for max / exp).
// ---------------------------------------------------------------------------------------------
// A weight that exp2_poly / exp2_shift_sum made from a masked (-inf) score: -0.0.
template <typename T>
inline bool is_masked(T p) { return p == T(0) && std::signbit(p); }

namespace detail {
using vec::VecF;
using vec::VecI;
constexpr int64_t kLanesF = vec::kLanes<float>;

// NaN anywhere gives NaN (as torch's max), which then spreads through the row's softmax.
FASTATTN_VEC_CLONES static float row_max_f32(const float* x, int64_t n) {
  constexpr float kNegInf = -std::numeric_limits<float>::infinity();
  VecF m = vec::splat(kNegInf);
  VecI nan = VecI{};
  int64_t i = 0;
  for (; i + kLanesF <= n; i += kLanesF) {
    const VecF v = vec::load(x + i);
    m = vec::max(m, v);
    nan |= v != v;
  }
  if (i < n) {
    const VecF v = vec::load_tail(x + i, n - i, kNegInf);
    m = vec::max(m, v);
    nan |= v != v;
  }
  for (int l = 0; l < kLanesF; ++l)
    if (nan[l]) return std::numeric_limits<float>::quiet_NaN();
  return vec::hmax(m);
}

FASTATTN_VEC_CLONES static float exp2_shift_sum_f32(float* x, int64_t n, float shift) {
  VecF sum = vec::splat(0.f);
  int64_t i = 0;
  for (; i + kLanesF <= n; i += kLanesF) {
    const VecF e = vec::exp2_poly(vec::load(x + i) - shift);
    vec::store(x + i, e);
    sum += e;
  }
  if (i < n) {
    const VecF e = vec::exp2_poly(vec::load_tail(x + i, n - i, -std::numeric_limits<float>::infinity()) - shift);
    vec::store_tail(x + i, e, n - i);
    sum += e;
  }
  return vec::hsum(sum);
}

FASTATTN_VEC_CLONES static void softmax_grad_f32(float* ds, const float* p, const float* dp, float delta,
                                                 int64_t n) {
  const VecI neg_zero = VecI{} + int32_t(0x80000000u);
  int64_t i = 0;
  for (; i + kLanesF <= n; i += kLanesF) {
    const VecF pv = vec::load(p + i);
    vec::store(ds + i, (VecI)pv == neg_zero ? vec::splat(0.f) : pv * (vec::load(dp + i) - delta));
  }
  for (; i < n; ++i) ds[i] = is_masked(p[i]) ? 0.f : p[i] * (dp[i] - delta);
}

FASTATTN_VEC_CLONES static void scale_row_f32(float* x, float a, int64_t n) {
  for (int64_t i = 0; i < n; ++i) x[i] *= a;
}

template <typename T>
FASTATTN_VEC_CLONES static T dot_cloned(const T* a, const T* b, int64_t n) { return vec::dot(a, b, n); }
}  // namespace detail

// max_i x[i] (-inf for n == 0; NaN if any x[i] is NaN)
inline float row_max(const float* x, int64_t n) { return detail::row_max_f32(x, n); }
inline double row_max(const double* x, int64_t n) {
  double m = -std::numeric_limits<double>::infinity();
  for (int64_t i = 0; i < n; ++i) {
    if (std::isnan(x[i])) return x[i];
    m = std::max(m, x[i]);
  }
  return m;
}

// max(a, b) that keeps a NaN of either (std::max drops a NaN in its second argument).
template <typename T>
inline T nan_max(T a, T b) { return std::isnan(b) ? b : std::max(a, b); }

// x[i] = 2^(x[i] - shift); returns sum_i x[i]. shift must be finite, or NaN (a row that a NaN
// reached): then every x[i] becomes NaN except masked ones (-inf), which stay exactly 0.
template <typename T>
inline T exp2_nan_row(T* x, int64_t n) {
  for (int64_t i = 0; i < n; ++i) x[i] = x[i] == -std::numeric_limits<T>::infinity() ? T(-0.0) : std::numeric_limits<T>::quiet_NaN();
  return std::numeric_limits<T>::quiet_NaN();
}
inline float exp2_shift_sum(float* x, int64_t n, float shift) {
  if (std::isnan(shift)) return exp2_nan_row(x, n);
  return detail::exp2_shift_sum_f32(x, n, shift);
}
inline double exp2_shift_sum(double* x, int64_t n, double shift) {
  if (std::isnan(shift)) return exp2_nan_row(x, n);
  double sum = 0;
  for (int64_t i = 0; i < n; ++i) sum += (x[i] = x[i] == -std::numeric_limits<double>::infinity() ? -0.0 : std::exp2(x[i] - shift));
  return sum;
}

// dS = P * (dP - delta): the softmax backward, row-wise. Where P is -0.0 (a masked key: see
// exp2_poly) dS is 0 even when a NaN reached the row's dP or delta: masked keys take no part.
inline void softmax_grad(float* ds, const float* p, const float* dp, float delta, int64_t n) {
  detail::softmax_grad_f32(ds, p, dp, delta, n);
}
inline void softmax_grad(double* ds, const double* p, const double* dp, double delta, int64_t n) {
  for (int64_t i = 0; i < n; ++i) ds[i] = is_masked(p[i]) ? 0 : p[i] * (dp[i] - delta);
}

inline void scale_row(float* x, float a, int64_t n) { detail::scale_row_f32(x, a, n); }
inline void scale_row(double* x, double a, int64_t n) {
  for (int64_t i = 0; i < n; ++i) x[i] *= a;
}

// sum_i a[i] * b[i] (vec::dot)
template <typename T>
inline T dot(const T* a, const T* b, int64_t n) { return detail::dot_cloned(a, b, n); }

// sum_i a[i] * b[i] in double, in index order: products of float, bfloat16 or half values are exact there, and two
// calls over the same values give the same bits.
template <typename A, typename B>
inline double dot_double(const A* a, const B* b, int64_t n) {
  double sum = 0;
  for (int64_t i = 0; i < n; ++i) sum += double(a[i]) * double(b[i]);
  return sum;
}

// Runs fn(claim) once per worker thread of an at::parallel_for region; claim() returns the next
// unclaimed task in [0, n_tasks), or -1 when none is left. Dynamic hand-out keeps threads busy
// when tasks differ in cost (causal) or a core is shared, where static chunks leave one idle.
template <typename F>
void parallel_dynamic(int64_t n_tasks, const F& fn) {
  std::atomic<int64_t> next{0};
  auto claim = [&]() -> int64_t {
    const int64_t t = next.fetch_add(1, std::memory_order_relaxed);
    return t < n_tasks ? t : -1;
  };
  const int64_t workers = std::min<int64_t>(n_tasks, at::get_num_threads());
  at::parallel_for(0, workers, 1, [&](int64_t begin, int64_t end) {
    for (int64_t w = begin; w < end; ++w) fn(claim);
  });
}

template <typename T>
inline T sigmoid(T x) { return T(1) / (T(1) + std::exp(-x)); }

}  // namespace fastattn::cpu
