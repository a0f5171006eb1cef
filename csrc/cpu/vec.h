// The CPU vector layer shared by every kernel in csrc/cpu/ (the AVX512-BF16 tile GEMM sits with the other GEMMs
// in cpu_utils.h):
//   - FASTATTN_VEC_CLONES: put on a kernel to compile it once per x86-64 level, the best picked at load time;
//   - vec::Vec<T> (VecF, VecD; VecI for bit work): 64-byte GCC vectors, with load / store and their padded
//     tails, splat, max, hsum, hmax, dot and exp2_poly. All are always inlined, so they take the ISA of the
//     cloned kernel that calls them;
//   - convert_row(): bfloat16 / half <-> float rows (F16C for half where the CPU has it).
// Kernels use these rather than intrinsics or their own vector types, so an improvement here reaches all of them.
#pragma once

#include <c10/util/BFloat16.h>
#include <c10/util/Half.h>

#include <algorithm>
#include <cstdint>
#include <cstring>
#include <limits>
#include <type_traits>
#include <utility>

#if defined(__x86_64__) && defined(__GNUC__) && !defined(__clang__)
#include <immintrin.h>
#define FASTATTN_X86 1
// GCC emits one clone per x86-64 level and an ifunc resolver that picks the best when the library loads (no
// -march flags). Levels rather than single features ("avx512f", "avx2,fma"): on an AVX-512 CPU the two lists ran
// every row kernel of both op families within 4% of each other, neither ahead throughout, and the v4 clone
// narrows float to bfloat16 1.5x faster (AVX512BW). arch=x86-64-vN in target_clones needs GCC 12.
#define FASTATTN_VEC_CLONES __attribute__((target_clones("arch=x86-64-v4", "arch=x86-64-v3", "default")))
#else
#define FASTATTN_X86 0
#define FASTATTN_VEC_CLONES
#endif
#define FASTATTN_INLINE inline __attribute__((always_inline))

// The 64-byte vectors never cross a call boundary (always inlined, or internal to one clone), so GCC's note that
// their ABI differs without -mavx512f does not apply.
#if defined(__GNUC__) && !defined(__clang__)
#pragma GCC diagnostic ignored "-Wpsabi"
#endif

namespace fastattn::cpu {

// ---------------------------------------------------------------------------------------------------------------
// 64-byte vectors: one zmm; two ymm or four xmm on older ISAs (four NEON registers on aarch64). Written with GCC
// vector extensions because the auto-vectoriser keeps multi-chain reductions on the stack and will not if-convert
// clamps and selects without -fno-trapping-math; explicit vectors stay in registers.
// ---------------------------------------------------------------------------------------------------------------
namespace vec {

constexpr int64_t kBytes = 64;
using VecF = float __attribute__((vector_size(kBytes)));
using VecD = double __attribute__((vector_size(kBytes)));
using VecI = int32_t __attribute__((vector_size(kBytes)));  // VecF's lanes as bits, and VecF comparisons
template <typename T>
using Vec = std::conditional_t<std::is_same_v<T, float>, VecF, VecD>;
template <typename T>
constexpr int64_t kLanes = kBytes / sizeof(T);
template <typename V>
using LaneOf = std::remove_cv_t<std::remove_reference_t<decltype(std::declval<V>()[0])>>;

template <typename T>
FASTATTN_INLINE Vec<T> splat(T c) { return Vec<T>{} + c; }

template <typename T>
FASTATTN_INLINE Vec<T> load(const T* p) {
  Vec<T> v;
  std::memcpy(&v, p, sizeof(v));
  return v;
}

template <typename T>
FASTATTN_INLINE void store(T* p, Vec<T> v) { std::memcpy(p, &v, sizeof(v)); }

// The first n < kLanes elements of p, the other lanes pad (a value neutral to what follows).
template <typename T>
FASTATTN_INLINE Vec<T> load_tail(const T* p, int64_t n, T pad) {
  T buf[kLanes<T>];
  for (int64_t i = 0; i < kLanes<T>; ++i) buf[i] = i < n ? p[i] : pad;
  return load(buf);
}

template <typename T>
FASTATTN_INLINE void store_tail(T* p, Vec<T> v, int64_t n) {
  T buf[kLanes<T>];
  store(buf, v);
  for (int64_t i = 0; i < n; ++i) p[i] = buf[i];
}

template <typename V>
FASTATTN_INLINE V max(V a, V b) { return a > b ? a : b; }

// Lane by lane, in order: results do not depend on the ISA level.
template <typename V>
FASTATTN_INLINE LaneOf<V> hsum(V v) {
  LaneOf<V> s = 0;
  for (int64_t l = 0; l < kLanes<LaneOf<V>>; ++l) s += v[l];
  return s;
}

template <typename V>
FASTATTN_INLINE LaneOf<V> hmax(V v) {
  LaneOf<V> m = v[0];
  for (int64_t l = 1; l < kLanes<LaneOf<V>>; ++l) m = std::max(m, v[l]);
  return m;
}

// sum_i a[i] * b[i]: two accumulator chains (one is bound by the add latency), the tail in scalars.
template <typename T>
FASTATTN_INLINE T dot(const T* __restrict a, const T* __restrict b, int64_t n) {
  constexpr int64_t L = kLanes<T>;
  Vec<T> acc0 = {}, acc1 = {};
  int64_t i = 0;
  for (; i + 2 * L <= n; i += 2 * L) {
    acc0 += load(a + i) * load(b + i);
    acc1 += load(a + i + L) * load(b + i + L);
  }
  for (; i + L <= n; i += L) acc0 += load(a + i) * load(b + i);
  T tail = 0;
  for (; i < n; ++i) tail += a[i] * b[i];
  return hsum(acc0 + acc1) + tail;
}

// 2^x: x = n + f with n = round(x), f in [-1/2, 1/2]; 2^f by Cephes' exp2f minimax polynomial
// (~1 ulp), 2^n built in the exponent bits. x < -126 gives exactly 0, and x = -inf (a masked score)
// gives -0.0: the same value, but the softmax backward can tell a masked key (no gradient, NaN or
// not) from an underflowed one (whose gradient takes a NaN, as torch's does).
FASTATTN_INLINE VecF exp2_poly(VecF x) {
  constexpr float kRound = 12582912.f;  // 1.5 * 2^23: adding and subtracting it rounds to integer
  VecF xc = x < splat(-127.f) ? splat(-127.f) : x;
  xc = xc > splat(127.f) ? splat(127.f) : xc;
  const VecF n = (xc + kRound) - kRound;
  const VecF f = xc - n;
  VecF p = splat(1.535336188319500e-4f);
  p = p * f + 1.339887440266574e-3f;
  p = p * f + 9.618437357674640e-3f;
  p = p * f + 5.550332471162809e-2f;
  p = p * f + 2.402264791363012e-1f;
  p = p * f + 6.931472028550421e-1f;
  p = p * f + 1.f;
  const VecI bits = (__builtin_convertvector(n, VecI) + 127) << 23;
  const VecF two_n = (VecF)bits;  // reinterpret the bits
  const VecF masked = (VecF)(VecI{} + int32_t(0x80000000u));  // -0.0f
  return x == splat(-std::numeric_limits<float>::infinity()) ? masked : x < splat(-126.f) ? splat(0.f) : p * two_n;
}

}  // namespace vec

// ---------------------------------------------------------------------------------------------------------------
// dtype conversion of rows: convert_row(dst, src, n). bfloat16 is the top half of a float: widening is a shift,
// narrowing rounds to nearest even (NaN kept quiet), both written so they vectorise. GCC 12 does not vectorise
// _Float16 conversions, so half rows use F16C directly where the CPU has it (every x86-64-v3 CPU).
// ---------------------------------------------------------------------------------------------------------------
namespace detail {
FASTATTN_VEC_CLONES static void bf16_to_float(float* dst, const uint16_t* src, int64_t n) {
  for (int64_t i = 0; i < n; ++i) {
    const uint32_t bits = uint32_t(src[i]) << 16;
    std::memcpy(dst + i, &bits, 4);
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

#if FASTATTN_X86
inline bool has_f16c() {
  static const bool ok = [] {
    __builtin_cpu_init();
    return __builtin_cpu_supports("f16c") && __builtin_cpu_supports("avx");
  }();
  return ok;
}

__attribute__((target("avx,f16c"))) static void half_to_float_f16c(float* dst, const uint16_t* src, int64_t n) {
  int64_t i = 0;
  for (; i + 8 <= n; i += 8)
    _mm256_storeu_ps(dst + i, _mm256_cvtph_ps(_mm_loadu_si128(reinterpret_cast<const __m128i*>(src + i))));
  for (; i < n; ++i) dst[i] = _cvtsh_ss(src[i]);
}

__attribute__((target("avx,f16c"))) static void float_to_half_f16c(uint16_t* dst, const float* src, int64_t n) {
  constexpr int kRound = _MM_FROUND_TO_NEAREST_INT | _MM_FROUND_NO_EXC;
  int64_t i = 0;
  for (; i + 8 <= n; i += 8)
    _mm_storeu_si128(reinterpret_cast<__m128i*>(dst + i), _mm256_cvtps_ph(_mm256_loadu_ps(src + i), kRound));
  for (; i < n; ++i) dst[i] = _cvtss_sh(src[i], kRound);
}
#else
inline bool has_f16c() { return false; }
#endif
}  // namespace detail

template <typename T>
inline void convert_row(T* dst, const T* src, int64_t n) { std::memcpy(dst, src, n * sizeof(T)); }

inline void convert_row(float* dst, const c10::BFloat16* src, int64_t n) {
  detail::bf16_to_float(dst, reinterpret_cast<const uint16_t*>(src), n);
}

inline void convert_row(c10::BFloat16* dst, const float* src, int64_t n) {
  detail::float_to_bf16(reinterpret_cast<uint16_t*>(dst), src, n);
}

inline void convert_row(float* dst, const c10::Half* src, int64_t n) {
#if FASTATTN_X86
  if (detail::has_f16c()) return detail::half_to_float_f16c(dst, reinterpret_cast<const uint16_t*>(src), n);
#endif
  for (int64_t i = 0; i < n; ++i) dst[i] = static_cast<float>(src[i]);
}

inline void convert_row(c10::Half* dst, const float* src, int64_t n) {
#if FASTATTN_X86
  if (detail::has_f16c()) return detail::float_to_half_f16c(reinterpret_cast<uint16_t*>(dst), src, n);
#endif
  for (int64_t i = 0; i < n; ++i) dst[i] = static_cast<c10::Half>(src[i]);
}

}  // namespace fastattn::cpu
