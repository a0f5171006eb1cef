// Shared CPU building blocks for fastattn's C++ kernels:
//   - gemm():          row-major tile GEMM on MKL's Fortran sgemm_/dgemm_ (weak symbols exported by
//                      libtorch_cpu), with an at::addmm_ fallback so the extension always loads;
//   - convert_row():   dtype conversion of tile rows (bfloat16/half <-> float);
//   - row_max(), exp2_shift_sum(), ...: vectorised row helpers for the softmax, compiled for
//                      AVX-512 / AVX2 / baseline and picked at run time (no -march flags);
//   - parallel_dynamic(): at::parallel_for with tasks handed out one by one.
#pragma once

#include <ATen/ATen.h>
#include <ATen/Parallel.h>
#include <c10/util/BFloat16.h>
#include <c10/util/Half.h>

#include <algorithm>
#include <atomic>
#include <cmath>
#include <cstdint>
#include <cstring>
#include <limits>
#include <type_traits>

namespace fastattn::cpu {

// Softmax runs in base 2: exp(x) = exp2(x * LOG2E). Cast to the accumulation type where used.
constexpr double kLog2e = 1.4426950408889634;
constexpr double kLn2 = 0.6931471805599453;

// Runtime ISA dispatch: GCC emits one clone per target and an ifunc resolver picks the best at load.
#if defined(__x86_64__) && defined(__GNUC__) && !defined(__clang__)
#define FASTATTN_VEC_CLONES __attribute__((target_clones("avx512f", "avx2,fma", "default")))
#else
#define FASTATTN_VEC_CLONES
#endif
#define FASTATTN_INLINE inline __attribute__((always_inline))

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

// Column-major BLAS sees a row-major matrix as its transpose, so C^T = op(B)^T op(A)^T is computed.
inline void gemm(bool trans_a, bool trans_b, int64_t m, int64_t n, int64_t k, float alpha,
                 const float* a, int64_t lda, const float* b, int64_t ldb, float beta, float* c,
                 int64_t ldc) {
  if (m == 0 || n == 0) return;
  if (sgemm_ == nullptr) return detail::gemm_fallback(trans_a, trans_b, m, n, k, alpha, a, lda, b, ldb, beta, c, ldc);
  const char ta = trans_a ? 'T' : 'N', tb = trans_b ? 'T' : 'N';
  const int M = int(m), N = int(n), K = int(k), LDA = int(lda), LDB = int(ldb), LDC = int(ldc);
  sgemm_(&tb, &ta, &N, &M, &K, &alpha, b, &LDB, a, &LDA, &beta, c, &LDC);
}

inline void gemm(bool trans_a, bool trans_b, int64_t m, int64_t n, int64_t k, double alpha,
                 const double* a, int64_t lda, const double* b, int64_t ldb, double beta, double* c,
                 int64_t ldc) {
  if (m == 0 || n == 0) return;
  if (dgemm_ == nullptr) return detail::gemm_fallback(trans_a, trans_b, m, n, k, alpha, a, lda, b, ldb, beta, c, ldc);
  const char ta = trans_a ? 'T' : 'N', tb = trans_b ? 'T' : 'N';
  const int M = int(m), N = int(n), K = int(k), LDA = int(lda), LDB = int(ldb), LDC = int(ldc);
  dgemm_(&tb, &ta, &N, &M, &K, &alpha, b, &LDB, a, &LDA, &beta, c, &LDC);
}

// ---------------------------------------------------------------------------------------------
// dtype conversion of tile rows. bfloat16 is the top half of a float: widening is a shift,
// narrowing rounds to nearest even (NaN kept quiet), both written so they vectorise.
// ---------------------------------------------------------------------------------------------
namespace detail {
FASTATTN_VEC_CLONES static void bf16_to_float(float* dst, const uint16_t* src, int64_t n) {
  for (int64_t i = 0; i < n; ++i) {
    uint32_t bits = uint32_t(src[i]) << 16;
    float f;
    std::memcpy(&f, &bits, 4);
    dst[i] = f;
  }
}
FASTATTN_VEC_CLONES static void float_to_bf16(uint16_t* dst, const float* src, int64_t n) {
  for (int64_t i = 0; i < n; ++i) {
    uint32_t bits;
    std::memcpy(&bits, &src[i], 4);
    const uint32_t rounded = (bits + 0x7fffu + ((bits >> 16) & 1u)) >> 16;
    dst[i] = uint16_t(src[i] != src[i] ? 0x7fc0u : rounded);
  }
}
}  // namespace detail

template <typename T>
inline void convert_row(T* dst, const T* src, int64_t n) { std::memcpy(dst, src, n * sizeof(T)); }
inline void convert_row(float* dst, const c10::BFloat16* src, int64_t n) {
  detail::bf16_to_float(dst, reinterpret_cast<const uint16_t*>(src), n);
}
inline void convert_row(c10::BFloat16* dst, const float* src, int64_t n) {
  detail::float_to_bf16(reinterpret_cast<uint16_t*>(dst), src, n);
}
namespace detail {
FASTATTN_VEC_CLONES static void half_to_float(float* dst, const uint16_t* src, int64_t n) {
  for (int64_t i = 0; i < n; ++i) dst[i] = c10::detail::fp16_ieee_to_fp32_value(src[i]);
}
}  // namespace detail
inline void convert_row(float* dst, const c10::Half* src, int64_t n) {
  detail::half_to_float(dst, reinterpret_cast<const uint16_t*>(src), n);
}
inline void convert_row(c10::Half* dst, const float* src, int64_t n) {
  for (int64_t i = 0; i < n; ++i) dst[i] = c10::Half(src[i]);
}

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
// Vectorised row helpers (float: polynomial exp2 + runtime ISA dispatch; double: libm, exact).
// Written with GCC vector extensions (16 float lanes; narrower ISAs split them), because the
// auto-vectoriser will not if-convert the clamps and selects without -fno-trapping-math.
// Row tails are padded with a neutral value (-inf for max / exp, 0 for products).
// ---------------------------------------------------------------------------------------------
#if defined(__GNUC__)
#pragma GCC diagnostic push
#pragma GCC diagnostic ignored "-Wpsabi"  // 64-byte vector arguments: all inlined, no ABI crossing
#endif
namespace detail {
typedef float vfloat __attribute__((vector_size(64)));
typedef int32_t vint __attribute__((vector_size(64)));
constexpr int64_t kLanes = 16;

static FASTATTN_INLINE vfloat splat(float c) { return vfloat{} + c; }
static FASTATTN_INLINE vfloat load(const float* p) { vfloat v; std::memcpy(&v, p, sizeof(v)); return v; }
static FASTATTN_INLINE void store(float* p, vfloat v) { std::memcpy(p, &v, sizeof(v)); }
static FASTATTN_INLINE vfloat load_tail(const float* p, int64_t n, float pad) {  // n < kLanes
  float buf[kLanes];
  for (int64_t i = 0; i < kLanes; ++i) buf[i] = i < n ? p[i] : pad;
  return load(buf);
}
static FASTATTN_INLINE void store_tail(float* p, vfloat v, int64_t n) {
  float buf[kLanes];
  store(buf, v);
  for (int64_t i = 0; i < n; ++i) p[i] = buf[i];
}
static FASTATTN_INLINE vfloat vmax(vfloat a, vfloat b) { return a > b ? a : b; }
static FASTATTN_INLINE float hsum(vfloat v) {
  float s = 0.f;
  for (int i = 0; i < kLanes; ++i) s += v[i];
  return s;
}
static FASTATTN_INLINE float hmax(vfloat v) {
  float m = v[0];
  for (int i = 1; i < kLanes; ++i) m = std::max(m, v[i]);
  return m;
}

// 2^x: x = n + f with n = round(x), f in [-1/2, 1/2]; 2^f by Cephes' exp2f minimax polynomial
// (~1 ulp), 2^n built in the exponent bits. x < -126 (including -inf) gives exactly 0.
static FASTATTN_INLINE vfloat exp2_poly(vfloat x) {
  constexpr float kRound = 12582912.f;  // 1.5 * 2^23: adding and subtracting it rounds to integer
  vfloat xc = x < splat(-127.f) ? splat(-127.f) : x;
  xc = xc > splat(127.f) ? splat(127.f) : xc;
  const vfloat n = (xc + kRound) - kRound;
  const vfloat f = xc - n;
  vfloat p = splat(1.535336188319500e-4f);
  p = p * f + 1.339887440266574e-3f;
  p = p * f + 9.618437357674640e-3f;
  p = p * f + 5.550332471162809e-2f;
  p = p * f + 2.402264791363012e-1f;
  p = p * f + 6.931472028550421e-1f;
  p = p * f + 1.f;
  const vint bits = (__builtin_convertvector(n, vint) + 127) << 23;
  const vfloat two_n = (vfloat)bits;  // reinterpret the bits
  return x < splat(-126.f) ? splat(0.f) : p * two_n;
}

FASTATTN_VEC_CLONES static float row_max_f32(const float* x, int64_t n) {
  constexpr float kNegInf = -std::numeric_limits<float>::infinity();
  vfloat m = splat(kNegInf);
  int64_t i = 0;
  for (; i + kLanes <= n; i += kLanes) m = vmax(m, load(x + i));
  if (i < n) m = vmax(m, load_tail(x + i, n - i, kNegInf));
  return hmax(m);
}

FASTATTN_VEC_CLONES static float exp2_shift_sum_f32(float* x, int64_t n, float shift) {
  vfloat sum = splat(0.f);
  int64_t i = 0;
  for (; i + kLanes <= n; i += kLanes) {
    const vfloat e = exp2_poly(load(x + i) - shift);
    store(x + i, e);
    sum += e;
  }
  if (i < n) {
    const vfloat e = exp2_poly(load_tail(x + i, n - i, -std::numeric_limits<float>::infinity()) - shift);
    store_tail(x + i, e, n - i);
    sum += e;
  }
  return hsum(sum);
}

FASTATTN_VEC_CLONES static void softmax_grad_f32(float* ds, const float* p, const float* dp, float delta,
                                                 int64_t n) {
  for (int64_t i = 0; i < n; ++i) ds[i] = p[i] * (dp[i] - delta);
}

FASTATTN_VEC_CLONES static void scale_row_f32(float* x, float a, int64_t n) {
  for (int64_t i = 0; i < n; ++i) x[i] *= a;
}

FASTATTN_VEC_CLONES static float dot_f32(const float* a, const float* b, int64_t n) {
  vfloat sum = splat(0.f);
  int64_t i = 0;
  for (; i + kLanes <= n; i += kLanes) sum += load(a + i) * load(b + i);
  if (i < n) sum += load_tail(a + i, n - i, 0.f) * load_tail(b + i, n - i, 0.f);
  return hsum(sum);
}
}  // namespace detail
#if defined(__GNUC__)
#pragma GCC diagnostic pop
#endif

// max_i x[i] (-inf for n == 0)
inline float row_max(const float* x, int64_t n) { return detail::row_max_f32(x, n); }
inline double row_max(const double* x, int64_t n) {
  double m = -std::numeric_limits<double>::infinity();
  for (int64_t i = 0; i < n; ++i) m = std::max(m, x[i]);
  return m;
}

// x[i] = 2^(x[i] - shift); returns sum_i x[i]. shift must be finite.
inline float exp2_shift_sum(float* x, int64_t n, float shift) { return detail::exp2_shift_sum_f32(x, n, shift); }
inline double exp2_shift_sum(double* x, int64_t n, double shift) {
  double sum = 0;
  for (int64_t i = 0; i < n; ++i) sum += (x[i] = std::exp2(x[i] - shift));
  return sum;
}

// dS = P * (dP - delta): the softmax backward, row-wise.
inline void softmax_grad(float* ds, const float* p, const float* dp, float delta, int64_t n) {
  detail::softmax_grad_f32(ds, p, dp, delta, n);
}
inline void softmax_grad(double* ds, const double* p, const double* dp, double delta, int64_t n) {
  for (int64_t i = 0; i < n; ++i) ds[i] = p[i] * (dp[i] - delta);
}

inline void scale_row(float* x, float a, int64_t n) { detail::scale_row_f32(x, a, n); }
inline void scale_row(double* x, double a, int64_t n) {
  for (int64_t i = 0; i < n; ++i) x[i] *= a;
}

inline float dot(const float* a, const float* b, int64_t n) { return detail::dot_f32(a, b, n); }
inline double dot(const double* a, const double* b, int64_t n) {
  double sum = 0;
  for (int64_t i = 0; i < n; ++i) sum += a[i] * b[i];
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
