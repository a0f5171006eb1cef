// CPU kernels for softmax_gate / score_softmax_gate (math and shapes: csrc/attention_contract.h).
//
// The ops are memory-bound: per batch item b the work is an (N, D) slab of x. The kernels
//   1. make alpha (B, N, H): the scores for b (loaded, or computed as H dot products per row), masked, then a
//      softmax over positions; N * H values, small next to the slab;
//   2. stream the slab once: gate (y = alpha ⊙ x) or pool (y = Σ_n alpha ⊙ x); backward computes dx and the
//      per-head row sums g in the same pass.
// Threads: with B >= threads every task owns whole batch items (the score variant's second pass over a slab then
// hits cache); with fewer batch items each stage runs as its own parallel loop over rows (or channel chunks).
// Inner loops run on float/double rows (plain loops GCC vectorises; vec.h's 64-byte vectors for the reductions),
// compiled per ISA level (FASTATTN_VEC_CLONES); bfloat16/half rows go through a float scratch row (convert_row).
#include "softmax_gate.h"
#include "cpu_utils.h"
#include "describe.h"

#include <ATen/Dispatch.h>
#include <ATen/OpMathType.h>
#include <ATen/Parallel.h>
#include <c10/util/BFloat16.h>
#include <c10/util/Half.h>

#include <algorithm>
#include <cmath>
#include <cstdint>
#include <limits>
#include <type_traits>
#include <vector>

#if defined(__linux__)
#include <sys/mman.h>
#endif

namespace fastattn::cpu {
namespace {

// linear_scores computes this many heads' dot products at once: each load of x feeds 4 independent FMA chains.
constexpr int64_t kScoreHeads = 4;
// Smallest amount of work (elements) worth a parallel task; below it the loop stays on the calling thread.
constexpr int64_t kMinTaskElems = 1 << 15;
// Pool forward with few batch items splits D into chunks of a multiple of this (one vector of float).
constexpr int64_t kChannelAlign = vec::kLanes<float>;
// Huge page size; outputs of two or more ask the kernel for transparent huge pages (see empty_output).
constexpr int64_t kHugePageBytes = 2 << 20;

// ---------------------------------------------------------------------------------------------------------------
// Row kernels on float / double, each compiled per ISA level (FASTATTN_VEC_CLONES).
// ---------------------------------------------------------------------------------------------------------------

using vec::kLanes;
using vec::load;
using vec::store;
using vec::Vec;

// y[h, j] = alpha[h] * x[h, j]; one row, (H, Dh) viewed flat
template <typename T>
FASTATTN_INLINE void gate_heads(T* __restrict y, const T* __restrict x, const T* __restrict alpha, int64_t H,
                                int64_t Dh) {
  for (int64_t h = 0; h < H; ++h) {
    const T a = alpha[h];
    T* __restrict y_h = y + h * Dh;
    const T* __restrict x_h = x + h * Dh;
    for (int64_t j = 0; j < Dh; ++j) y_h[j] = a * x_h[j];
  }
}

// gate_heads as a kernel of its own; score_bwd_row inlines gate_heads instead of calling this clone.
template <typename T>
FASTATTN_VEC_CLONES void gate_row(T* y, const T* x, const T* alpha, int64_t H, int64_t Dh) {
  gate_heads(y, x, alpha, H, Dh);
}

// acc[c - c0] += alpha[c / Dh] * x[c - c0] for channels c in [c0, c1)
template <typename T>
FASTATTN_VEC_CLONES void pool_row(T* __restrict acc, const T* __restrict x, const T* __restrict alpha, int64_t c0,
                                  int64_t c1, int64_t Dh) {
  for (int64_t c = c0; c < c1;) {
    const int64_t h = c / Dh;
    const int64_t end = std::min(c1, (h + 1) * Dh);
    const T a = alpha[h];
    T* __restrict acc_seg = acc + (c - c0);
    const T* __restrict x_seg = x + (c - c0);
    for (int64_t j = 0; j < end - c; ++j) acc_seg[j] += a * x_seg[j];
    c = end;
  }
}

// dx[h, j] = alpha[h] * dy[h, j];  g[h] = Σ_j dy[h, j] * x[h, j]
template <typename T>
FASTATTN_VEC_CLONES void gate_bwd_row(T* __restrict dx, T* __restrict g, const T* __restrict dy,
                                      const T* __restrict x, const T* __restrict alpha, int64_t H, int64_t Dh) {
  for (int64_t h = 0; h < H; ++h) {
    const T a = alpha[h];
    T* __restrict dx_h = dx + h * Dh;
    const T* __restrict dy_h = dy + h * Dh;
    for (int64_t j = 0; j < Dh; ++j) dx_h[j] = a * dy_h[j];
    g[h] = vec::dot(dy_h, x + h * Dh, Dh);
  }
}

// g[h] = Σ_j dy[h, j] * x[h, j]
template <typename T>
FASTATTN_VEC_CLONES void head_dots(T* __restrict g, const T* __restrict dy, const T* __restrict x, int64_t H,
                                   int64_t Dh) {
  for (int64_t h = 0; h < H; ++h) g[h] = vec::dot(dy + h * Dh, x + h * Dh, Dh);
}

// s[h] = scale * Σ_c x[c] * w[h, c];  w (H, D) contiguous
template <typename T>
FASTATTN_VEC_CLONES void linear_scores(T* __restrict s, const T* __restrict x, const T* __restrict w, int64_t H,
                                       int64_t D, T scale) {
  constexpr int64_t L = kLanes<T>;
  int64_t h = 0;
  for (; h + kScoreHeads <= H; h += kScoreHeads) {
    const T* __restrict w0 = w + h * D;
    const T* __restrict w1 = w0 + D;
    const T* __restrict w2 = w1 + D;
    const T* __restrict w3 = w2 + D;
    Vec<T> acc0 = {}, acc1 = {}, acc2 = {}, acc3 = {};
    int64_t c = 0;
    for (; c + L <= D; c += L) {
      const Vec<T> xv = load(x + c);
      acc0 += xv * load(w0 + c);
      acc1 += xv * load(w1 + c);
      acc2 += xv * load(w2 + c);
      acc3 += xv * load(w3 + c);
    }
    T t0 = 0, t1 = 0, t2 = 0, t3 = 0;
    for (; c < D; ++c) {
      t0 += x[c] * w0[c];
      t1 += x[c] * w1[c];
      t2 += x[c] * w2[c];
      t3 += x[c] * w3[c];
    }
    s[h] = scale * (vec::hsum(acc0) + t0);
    s[h + 1] = scale * (vec::hsum(acc1) + t1);
    s[h + 2] = scale * (vec::hsum(acc2) + t2);
    s[h + 3] = scale * (vec::hsum(acc3) + t3);
  }
  for (; h < H; ++h) s[h] = scale * vec::dot(x, w + h * D, D);
}

// dx[c] = alpha[h(c)] * dy[c] + Σ_h ds[h] * w[h, c];  dw[h, c] += ds[h] * x[c]   (ds already carries the scale)
template <typename T>
FASTATTN_VEC_CLONES void score_bwd_row(T* __restrict dx, T* __restrict dw, const T* __restrict dy,
                                       const T* __restrict x, const T* __restrict alpha, const T* __restrict ds,
                                       const T* __restrict w, int64_t H, int64_t Dh) {
  constexpr int64_t L = kLanes<T>;
  const int64_t D = H * Dh;
  gate_heads(dx, dy, alpha, H, Dh);
  int64_t c = 0;
  for (; c + L <= D; c += L) {
    const Vec<T> xv = load(x + c);
    Vec<T> dxv = load(dx + c);
    for (int64_t h = 0; h < H; ++h) {
      dxv += ds[h] * load(w + h * D + c);
      store(dw + h * D + c, load(dw + h * D + c) + ds[h] * xv);
    }
    store(dx + c, dxv);
  }
  for (; c < D; ++c)
    for (int64_t h = 0; h < H; ++h) {
      dx[c] += ds[h] * w[h * D + c];
      dw[h * D + c] += ds[h] * x[c];
    }
}

// ---------------------------------------------------------------------------------------------------------------
// bfloat16 / half rows <-> float rows
// ---------------------------------------------------------------------------------------------------------------

// A scalar_t row seen as an acc_t row: a plain pointer for float/double, a converted scratch row otherwise.
template <typename scalar_t>
class AccRow {
  using acc_t = at::opmath_type<scalar_t>;
  static constexpr bool kNative = std::is_same_v<scalar_t, acc_t>;

 public:
  explicit AccRow(int64_t n) : scratch_(kNative ? 0 : n) {}
  // A pooled dy is the same row for every position: it is converted once.
  const acc_t* read(const scalar_t* src, int64_t n) {
    if constexpr (kNative) {
      return src;
    } else {
      if (src != converted_from_ || n != converted_n_) convert_row(scratch_.data(), src, n);
      converted_from_ = src;
      converted_n_ = n;
      return scratch_.data();
    }
  }
  // Where to compute a row that write_back then stores to dst.
  acc_t* target(scalar_t* dst) {
    if constexpr (kNative) {
      return dst;
    } else {
      converted_from_ = nullptr;
      return scratch_.data();
    }
  }
  void write_back(scalar_t* dst, int64_t n) {
    if constexpr (!kNative) convert_row(dst, scratch_.data(), n);
  }

 private:
  std::vector<acc_t> scratch_;
  const scalar_t* converted_from_ = nullptr;  // the row scratch_ holds, if read() filled it
  int64_t converted_n_ = 0;
};

// ---------------------------------------------------------------------------------------------------------------
// Layout
// ---------------------------------------------------------------------------------------------------------------

// A strided (B, N, D) slab with unit channel stride. A pooled dy (B, D) is the same with sn = 0.
template <typename T>
struct Slab {
  T* data;
  int64_t sb, sn;
  T* row(int64_t b, int64_t n) const { return data + b * sb + n * sn; }
};

template <typename T>
Slab<T> slab_of(const at::Tensor& t, bool per_position) {
  return {t.data_ptr<std::remove_const_t<T>>(), t.stride(0), per_position ? t.stride(1) : 0};
}

// The call's sizes (B, N, D, H) and Dh = D / H channels per head.
struct Dims : GateShape {
  int64_t Dh;
};

// [begin, end) of part t when [0, total) is split into n_parts nearly equal parts
std::pair<int64_t, int64_t> split_range(int64_t total, int64_t n_parts, int64_t t) {
  const int64_t base = total / n_parts, extra = total % n_parts;
  const int64_t begin = t * base + std::min(t, extra);
  return {begin, begin + base + (t < extra ? 1 : 0)};
}

int64_t rows_grain(int64_t row_elems) { return std::max<int64_t>(1, kMinTaskElems / std::max<int64_t>(1, row_elems)); }

// ---------------------------------------------------------------------------------------------------------------
// Softmax over positions, per batch item. a is (N, H) contiguous.
// ---------------------------------------------------------------------------------------------------------------

// In: scores (masked positions already -inf). Out: alpha; all zero for a head whose positions are all masked.
template <typename T>
void softmax_over_positions(T* a, int64_t N, int64_t H) {
  std::vector<T> m(H, -std::numeric_limits<T>::infinity()), l(H, T(0));
  constexpr T kNegInf = -std::numeric_limits<T>::infinity();
  // -- max over positions; a NaN score makes its head NaN (as torch's softmax)
  for (int64_t n = 0; n < N; ++n)
    for (int64_t h = 0; h < H; ++h) m[h] = nan_max(m[h], a[n * H + h]);
  // -- exponentials in base 2 shifted by the max; a fully masked head keeps -inf everywhere, so 0.
  // Masked positions (-inf) stay -inf rather than -inf - max, which is NaN for a NaN max.
  for (int64_t h = 0; h < H; ++h)
    if (m[h] == kNegInf) m[h] = 0;
  for (int64_t n = 0; n < N; ++n)
    for (int64_t h = 0; h < H; ++h) {
      const T x = a[n * H + h];
      a[n * H + h] = x == kNegInf ? kNegInf : (x - m[h]) * T(kLog2e);
    }
  exp2_shift_sum(a, N * H, T(0));  // cpu_utils.h: vectorised, exactly 0 at -inf (masked positions)
  // -- normalise; 0 stays exactly 0 (masked positions, even in a NaN head)
  for (int64_t n = 0; n < N; ++n)
    for (int64_t h = 0; h < H; ++h) l[h] += a[n * H + h];
  for (int64_t h = 0; h < H; ++h) l[h] = l[h] == 0 ? T(0) : T(1) / l[h];
  for (int64_t n = 0; n < N; ++n)
    for (int64_t h = 0; h < H; ++h) a[n * H + h] = a[n * H + h] == 0 ? T(0) : a[n * H + h] * l[h];
}

template <typename T>
void mask_positions(T* a, const bool* mask_b, int64_t N, int64_t H) {
  if (mask_b == nullptr) return;
  for (int64_t n = 0; n < N; ++n)
    if (!mask_b[n])
      for (int64_t h = 0; h < H; ++h) a[n * H + h] = -std::numeric_limits<T>::infinity();
}

// In: g (N, H). Out, in place: scale * dscores = scale * alpha * (g + dalpha - Σ_n alpha * (g + dalpha)).
// Computed as scale * alpha_m * (g_m * S - Σ_n alpha_n g_n) with S = Σ_n alpha_n, in double: the same value
// when S = 1, but it does not lean on the rounded alphas summing to 1. With a saturated softmax (alpha
// one-hot) the exact dscores, Σ_n alpha_n (g_m - g_n), is ~0 while g is large; g_m - delta would carry
// ulp(1) * g_m of error from the rounding of alpha_m alone (times scale in dweight and dx).
template <typename T>
void softmax_over_positions_bwd(T* g, const T* alpha, const T* dalpha, int64_t N, int64_t H, T scale) {
  std::vector<double> delta(H, 0.0), sum(H, 0.0);
  if (dalpha != nullptr)
    for (int64_t i = 0; i < N * H; ++i) g[i] += dalpha[i];
  for (int64_t n = 0; n < N; ++n)
    for (int64_t h = 0; h < H; ++h) {
      const double a = alpha[n * H + h];
      if (a == 0) continue;  // a masked position adds 0, even where x or dy is NaN
      delta[h] += a * double(g[n * H + h]);
      sum[h] += a;
    }
  for (int64_t n = 0; n < N; ++n)
    for (int64_t h = 0; h < H; ++h) {
      const T a = alpha[n * H + h];  // alpha = 0 (masked) gives 0, even where a NaN reached delta
      g[n * H + h] = a == 0 ? T(0) : T(double(scale) * double(a) * (double(g[n * H + h]) * sum[h] - delta[h]));
    }
}

// ---------------------------------------------------------------------------------------------------------------
// Stages shared by both ops. acc_t rows of alpha / g are (B * N, H) contiguous, indexed by row r = b * N + n.
// ---------------------------------------------------------------------------------------------------------------

// alpha[b] = masked softmax over positions of scores[b]
template <typename scalar_t>
void alpha_from_scores(at::opmath_type<scalar_t>* alpha, Slab<const scalar_t> scores, const bool* mask,
                       const Dims& d, int64_t b) {
  using acc_t = at::opmath_type<scalar_t>;
  acc_t* a = alpha + b * d.N * d.H;
  for (int64_t n = 0; n < d.N; ++n) {
    const scalar_t* s = scores.row(b, n);
    for (int64_t h = 0; h < d.H; ++h) a[n * d.H + h] = static_cast<acc_t>(s[h]);
  }
  mask_positions(a, mask ? mask + b * d.N : nullptr, d.N, d.H);
  softmax_over_positions(a, d.N, d.H);
}

// The type score_softmax_gate makes its scores and their softmax in: double for float32 inputs. A score is a
// sum of D products times scale, and rounded to float it carries ulp(|score|) into every alpha, which a large
// scale turns into errors past the rule of docs/CONTRACT.md §4 (the float32 reference, rounded alike, then wins
// by chance).
template <typename scalar_t>
using score_t = std::conditional_t<std::is_same_v<scalar_t, float>, double, at::opmath_type<scalar_t>>;

// s rows [r0, r1) = scale * x @ w^T (masked rows -inf), before the softmax; S is score_t<scalar_t>
template <typename scalar_t, typename S>
void scores_from_x(S* s, Slab<const scalar_t> x, const S* w, S scale, const bool* mask, const Dims& d, int64_t r0,
                   int64_t r1) {
  using acc_t = at::opmath_type<scalar_t>;
  AccRow<scalar_t> x_row(d.D);
  std::vector<S> wide(std::is_same_v<S, acc_t> ? 0 : d.D);
  for (int64_t r = r0; r < r1; ++r) {
    if (mask != nullptr && !mask[r]) {
      for (int64_t h = 0; h < d.H; ++h) s[r * d.H + h] = -std::numeric_limits<S>::infinity();
      continue;
    }
    const acc_t* xr = x_row.read(x.row(r / d.N, r % d.N), d.D);
    if constexpr (std::is_same_v<S, acc_t>) {
      linear_scores(s + r * d.H, xr, w, d.H, d.D, scale);
    } else {
      std::copy_n(xr, d.D, wide.data());
      linear_scores(s + r * d.H, wide.data(), w, d.H, d.D, scale);
    }
  }
}

// alpha[b] from the scores s[b] (softmax over positions in S, stored in alpha's type)
template <typename S, typename A>
void alpha_of_scores(A* alpha, S* s, const Dims& d, int64_t b) {
  S* sb = s + b * d.N * d.H;
  softmax_over_positions(sb, d.N, d.H);
  if constexpr (!std::is_same_v<S, A>) std::copy_n(sb, d.N * d.H, alpha + b * d.N * d.H);
}

// y rows [r0, r1) = alpha ⊙ x
template <typename scalar_t>
void gate_rows(Slab<scalar_t> y, Slab<const scalar_t> x, const at::opmath_type<scalar_t>* alpha, const Dims& d,
               int64_t r0, int64_t r1) {
  AccRow<scalar_t> x_row(d.D), y_row(d.D);
  for (int64_t r = r0; r < r1; ++r) {
    const int64_t b = r / d.N, n = r % d.N;
    scalar_t* y_ptr = y.row(b, n);
    gate_row(y_row.target(y_ptr), x_row.read(x.row(b, n), d.D), alpha + r * d.H, d.H, d.Dh);
    y_row.write_back(y_ptr, d.D);
  }
}

// y[b, c0:c1] = Σ_n alpha[b, n] ⊙ x[b, n, c0:c1]
template <typename scalar_t>
void pool_channels(scalar_t* y, Slab<const scalar_t> x, const at::opmath_type<scalar_t>* alpha, const Dims& d,
                   int64_t b, int64_t c0, int64_t c1) {
  using acc_t = at::opmath_type<scalar_t>;
  std::vector<acc_t> acc(c1 - c0, acc_t(0));  // [c1 - c0]
  AccRow<scalar_t> x_row(c1 - c0), y_row(c1 - c0);
  for (int64_t n = 0; n < d.N; ++n)
    pool_row(acc.data(), x_row.read(x.row(b, n) + c0, c1 - c0), alpha + (b * d.N + n) * d.H, c0, c1, d.Dh);
  scalar_t* y_ptr = y + b * d.D + c0;
  acc_t* out = y_row.target(y_ptr);
  std::copy(acc.begin(), acc.end(), out);
  y_row.write_back(y_ptr, c1 - c0);
}

// Gate or pool every row; alpha complete.
template <typename scalar_t>
void gate_or_pool(const at::Tensor& y, Slab<const scalar_t> x, const at::opmath_type<scalar_t>* alpha,
                  const Dims& d, bool pool) {
  if (!pool) {
    at::parallel_for(0, d.B * d.N, rows_grain(d.D), [&](int64_t r0, int64_t r1) {
      gate_rows(slab_of<scalar_t>(y, true), x, alpha, d, r0, r1);
    });
    return;
  }
  // Few batch items: also split channels, so every thread has a slab part to stream.
  const int64_t threads = at::get_num_threads();
  int64_t n_chunks = d.B >= threads ? 1 : std::min((threads + d.B - 1) / d.B, (d.D + kChannelAlign - 1) / kChannelAlign);
  n_chunks = std::max<int64_t>(n_chunks, 1);
  const int64_t chunk = ((d.D + n_chunks - 1) / n_chunks + kChannelAlign - 1) / kChannelAlign * kChannelAlign;
  n_chunks = std::max<int64_t>(1, (d.D + chunk - 1) / chunk);
  const int64_t grain = std::max<int64_t>(1, kMinTaskElems / std::max<int64_t>(1, d.N * chunk));
  scalar_t* y_ptr = y.data_ptr<scalar_t>();
  at::parallel_for(0, d.B * n_chunks, grain, [&](int64_t t0, int64_t t1) {
    for (int64_t t = t0; t < t1; ++t) {
      const int64_t b = t / n_chunks, c0 = (t % n_chunks) * chunk;
      pool_channels(y_ptr, x, alpha, d, b, c0, std::min(d.D, c0 + chunk));
    }
  });
}

// dx rows [r0, r1) = alpha ⊙ dy;  g rows = per-head Σ dy ⊙ x
template <typename scalar_t>
void gate_bwd_rows(Slab<scalar_t> dx, at::opmath_type<scalar_t>* g, Slab<const scalar_t> dy,
                   Slab<const scalar_t> x, const at::opmath_type<scalar_t>* alpha, const Dims& d, int64_t r0,
                   int64_t r1) {
  AccRow<scalar_t> dy_row(d.D), x_row(d.D), dx_row(d.D);
  for (int64_t r = r0; r < r1; ++r) {
    const int64_t b = r / d.N, n = r % d.N;
    scalar_t* dx_ptr = dx.row(b, n);
    gate_bwd_row(dx_row.target(dx_ptr), g + r * d.H, dy_row.read(dy.row(b, n), d.D), x_row.read(x.row(b, n), d.D),
                 alpha + r * d.H, d.H, d.Dh);
    dx_row.write_back(dx_ptr, d.D);
  }
}

// g rows [r0, r1) = per-head Σ dy ⊙ x
template <typename scalar_t>
void head_dots_rows(at::opmath_type<scalar_t>* g, Slab<const scalar_t> dy, Slab<const scalar_t> x, const Dims& d,
                    int64_t r0, int64_t r1) {
  AccRow<scalar_t> dy_row(d.D), x_row(d.D);
  for (int64_t r = r0; r < r1; ++r) {
    const int64_t b = r / d.N, n = r % d.N;
    head_dots(g + r * d.H, dy_row.read(dy.row(b, n), d.D), x_row.read(x.row(b, n), d.D), d.H, d.Dh);
  }
}

// dx rows [r0, r1) = alpha ⊙ dy + ds @ w;  dw += ds^T @ x  (ds = scale * dscores)
template <typename scalar_t>
void score_bwd_rows(Slab<scalar_t> dx, at::opmath_type<scalar_t>* dw, Slab<const scalar_t> dy,
                    Slab<const scalar_t> x, const at::opmath_type<scalar_t>* alpha,
                    const at::opmath_type<scalar_t>* ds, const at::opmath_type<scalar_t>* w, const Dims& d,
                    int64_t r0, int64_t r1) {
  AccRow<scalar_t> dy_row(d.D), x_row(d.D), dx_row(d.D);
  for (int64_t r = r0; r < r1; ++r) {
    const int64_t b = r / d.N, n = r % d.N;
    scalar_t* dx_ptr = dx.row(b, n);
    score_bwd_row(dx_row.target(dx_ptr), dw, dy_row.read(dy.row(b, n), d.D), x_row.read(x.row(b, n), d.D),
                  alpha + r * d.H, ds + r * d.H, w, d.H, d.Dh);
    dx_row.write_back(dx_ptr, d.D);
  }
}

// ---------------------------------------------------------------------------------------------------------------
// Boundary checks
// ---------------------------------------------------------------------------------------------------------------

at::ScalarType acc_dtype(at::ScalarType t) { return t == at::kDouble ? at::kDouble : at::kFloat; }

// x checked for this backend (a floating-point CPU tensor), then as every backend does (describe_gate); H read
// from `heads` (scores, alpha or weight).
Dims describe_cpu_gate(const char* op, const at::Tensor& x, const at::Tensor& heads, const char* heads_name,
                       bool is_weight) {
  TORCH_CHECK(x.device().is_cpu(), op, ": x must be a CPU tensor, got ", x.device());
  TORCH_CHECK(at::isFloatingType(x.scalar_type()), op, ": x must be float16, bfloat16, float32 or float64, got ",
              x.scalar_type());
  const GateShape s = describe_gate(op, x, gate_num_heads(op, heads, heads_name, is_weight));
  return {s, s.D / s.H};
}

// The checked mask made contiguous, or an undefined tensor.
at::Tensor contiguous_mask(const char* op, const std::optional<at::Tensor>& mask, const at::Tensor& x,
                           const Dims& d) {
  check_gate_mask(op, mask, x, d);
  return mask.has_value() && mask->defined() ? mask->contiguous() : at::Tensor();
}

const bool* mask_ptr(const at::Tensor& mask) { return mask.defined() ? mask.data_ptr<bool>() : nullptr; }

// alpha / dalpha (B, N, H), checked, as contiguous tensors of the accumulation dtype (dalpha may be absent).
at::Tensor acc_rows(const char* op, const std::optional<at::Tensor>& t, const at::Tensor& x, const Dims& d,
                    const char* name) {
  if (!t.has_value() || !t->defined()) return {};
  check_gate_rows(op, *t, x, d, name);
  return t->to(acc_dtype(x.scalar_type())).contiguous();
}

// A fresh output the kernel writes once. Large outputs are fresh mmap'ed memory, and first-touch page faults cost
// as much as the whole gating pass with 4 KiB pages (measured 60 ms vs 20 ms for a 64 MiB x * 2 on the dev VM), so
// ask for transparent huge pages on the 2 MiB-aligned interior, as PyTorch's THP_MEM_ALLOC_ENABLE does.
at::Tensor empty_output(at::IntArrayRef sizes, const at::TensorOptions& options) {
  at::Tensor t = at::empty(sizes, options);
#if defined(__linux__) && defined(MADV_HUGEPAGE)
  const int64_t bytes = t.numel() * static_cast<int64_t>(t.element_size());
  if (bytes >= 2 * kHugePageBytes) {
    const auto begin = reinterpret_cast<uintptr_t>(t.data_ptr());
    const uintptr_t first = (begin + kHugePageBytes - 1) & ~static_cast<uintptr_t>(kHugePageBytes - 1);
    const uintptr_t last = (begin + bytes) & ~static_cast<uintptr_t>(kHugePageBytes - 1);
    if (last > first) madvise(reinterpret_cast<void*>(first), last - first, MADV_HUGEPAGE);  // a hint; failure is fine
  }
#endif
  return t;
}

at::Tensor empty_y(const at::Tensor& x, const Dims& d, bool pool) {
  return pool ? empty_output({d.B, d.D}, x.options()) : empty_output({d.B, d.N, d.D}, x.options());
}

}  // namespace

// ---------------------------------------------------------------------------------------------------------------
// Ops
// ---------------------------------------------------------------------------------------------------------------

std::tuple<at::Tensor, at::Tensor> softmax_gate_fwd(const at::Tensor& scores_in, const at::Tensor& x_in,
                                                    const std::optional<at::Tensor>& mask_in, bool pool) {
  const char* op = "softmax_gate_fwd (cpu)";
  const at::Tensor x = last_dim_contiguous(x_in), scores = last_dim_contiguous(scores_in);
  const Dims d = describe_cpu_gate(op, x, scores, "scores", false);
  check_gate_rows(op, scores, x, d, "scores");
  check_gate_dtype(op, scores, x, "scores");
  const at::Tensor mask = contiguous_mask(op, mask_in, x, d);
  at::Tensor alpha = at::empty({d.B, d.N, d.H}, x.options().dtype(acc_dtype(x.scalar_type())));
  at::Tensor y = empty_y(x, d, pool);

  AT_DISPATCH_FLOATING_TYPES_AND2(at::kBFloat16, at::kHalf, x.scalar_type(), "softmax_gate_fwd", [&] {
    using acc_t = at::opmath_type<scalar_t>;
    acc_t* alpha_ptr = alpha.data_ptr<acc_t>();
    const Slab<const scalar_t> x_slab = slab_of<const scalar_t>(x, true);
    const Slab<const scalar_t> s_slab = slab_of<const scalar_t>(scores, true);
    // -- alpha = masked softmax over positions, one batch item per task
    at::parallel_for(0, d.B, rows_grain(d.N * d.H), [&](int64_t b0, int64_t b1) {
      for (int64_t b = b0; b < b1; ++b) alpha_from_scores(alpha_ptr, s_slab, mask_ptr(mask), d, b);
    });
    // -- y = alpha ⊙ x, or Σ_n alpha ⊙ x: the one pass over x
    gate_or_pool(y, x_slab, alpha_ptr, d, pool);
  });
  return {y, alpha};
}

std::tuple<at::Tensor, at::Tensor> softmax_gate_bwd(const at::Tensor& dy_in, const at::Tensor& x_in,
                                                    const at::Tensor& alpha_in,
                                                    const std::optional<at::Tensor>& dalpha_in, bool pool) {
  const char* op = "softmax_gate_bwd (cpu)";
  const at::Tensor x = last_dim_contiguous(x_in), dy = last_dim_contiguous(dy_in);
  const Dims d = describe_cpu_gate(op, x, alpha_in, "alpha", false);
  check_gate_dy(op, dy, x, d, pool);
  const at::ScalarType acc = acc_dtype(x.scalar_type());
  const at::Tensor alpha = acc_rows(op, alpha_in, x, d, "alpha");
  const at::Tensor dalpha = acc_rows(op, dalpha_in, x, d, "dalpha");
  at::Tensor g = at::empty({d.B, d.N, d.H}, x.options().dtype(acc));  // becomes dscores in place
  at::Tensor dx = empty_output({d.B, d.N, d.D}, x.options());

  AT_DISPATCH_FLOATING_TYPES_AND2(at::kBFloat16, at::kHalf, x.scalar_type(), "softmax_gate_bwd", [&] {
    using acc_t = at::opmath_type<scalar_t>;
    const acc_t* alpha_ptr = alpha.data_ptr<acc_t>();
    const acc_t* dalpha_ptr = dalpha.defined() ? dalpha.data_ptr<acc_t>() : nullptr;
    acc_t* g_ptr = g.data_ptr<acc_t>();
    const Slab<const scalar_t> x_slab = slab_of<const scalar_t>(x, true);
    const Slab<const scalar_t> dy_slab = slab_of<const scalar_t>(dy, !pool);
    const Slab<scalar_t> dx_slab = slab_of<scalar_t>(dx, true);
    // -- dx = alpha ⊙ dy, g = per-head Σ_c dy ⊙ x: the one pass over x and dy
    at::parallel_for(0, d.B * d.N, rows_grain(d.D), [&](int64_t r0, int64_t r1) {
      gate_bwd_rows(dx_slab, g_ptr, dy_slab, x_slab, alpha_ptr, d, r0, r1);
    });
    // -- dscores = alpha ⊙ (g - Σ_n alpha g)
    at::parallel_for(0, d.B, rows_grain(d.N * d.H), [&](int64_t b0, int64_t b1) {
      for (int64_t b = b0; b < b1; ++b) {
        const int64_t off = b * d.N * d.H;
        softmax_over_positions_bwd(g_ptr + off, alpha_ptr + off, dalpha_ptr ? dalpha_ptr + off : nullptr, d.N, d.H,
                                   acc_t(1));
      }
    });
  });
  return {g.to(x.scalar_type()), dx};
}

std::tuple<at::Tensor, at::Tensor> score_softmax_gate_fwd(const at::Tensor& x_in, const at::Tensor& weight_in,
                                                          const std::optional<at::Tensor>& mask_in, double scale,
                                                          bool pool) {
  const char* op = "score_softmax_gate_fwd (cpu)";
  const at::Tensor x = last_dim_contiguous(x_in);
  const Dims d = describe_cpu_gate(op, x, weight_in, "weight", true);
  check_gate_weight(op, weight_in, x, d);
  const at::Tensor mask = contiguous_mask(op, mask_in, x, d);
  const at::ScalarType acc = acc_dtype(x.scalar_type());
  const at::ScalarType wide = x.scalar_type() == at::kFloat ? at::kDouble : acc;  // score_t
  const at::Tensor w = weight_in.to(wide).contiguous();  // (H, D), small
  at::Tensor alpha = at::empty({d.B, d.N, d.H}, x.options().dtype(acc));
  at::Tensor scores = wide == acc ? alpha : at::empty({d.B, d.N, d.H}, x.options().dtype(wide));
  at::Tensor y = empty_y(x, d, pool);

  AT_DISPATCH_FLOATING_TYPES_AND2(at::kBFloat16, at::kHalf, x.scalar_type(), "score_softmax_gate_fwd", [&] {
    using acc_t = at::opmath_type<scalar_t>;
    using S = score_t<scalar_t>;
    acc_t* alpha_ptr = alpha.data_ptr<acc_t>();
    S* s_ptr = scores.data_ptr<S>();
    const S* w_ptr = w.data_ptr<S>();
    const bool* m_ptr = mask_ptr(mask);
    const Slab<const scalar_t> x_slab = slab_of<const scalar_t>(x, true);
    const int64_t threads = at::get_num_threads();
    if (d.B >= threads) {
      // -- whole batch items per task: the gating pass re-reads the slab the score pass just brought into cache
      scalar_t* y_ptr = y.data_ptr<scalar_t>();
      at::parallel_for(0, d.B, 1, [&](int64_t b0, int64_t b1) {
        for (int64_t b = b0; b < b1; ++b) {
          scores_from_x<scalar_t>(s_ptr, x_slab, w_ptr, S(scale), m_ptr, d, b * d.N, (b + 1) * d.N);
          alpha_of_scores(alpha_ptr, s_ptr, d, b);
          if (pool)
            pool_channels(y_ptr, x_slab, alpha_ptr, d, b, 0, d.D);
          else
            gate_rows(slab_of<scalar_t>(y, true), x_slab, alpha_ptr, d, b * d.N, (b + 1) * d.N);
        }
      });
      return;
    }
    // -- few batch items: one parallel loop per stage
    at::parallel_for(0, d.B * d.N, rows_grain(d.D * d.H), [&](int64_t r0, int64_t r1) {
      scores_from_x<scalar_t>(s_ptr, x_slab, w_ptr, S(scale), m_ptr, d, r0, r1);
    });
    at::parallel_for(0, d.B, rows_grain(d.N * d.H), [&](int64_t b0, int64_t b1) {
      for (int64_t b = b0; b < b1; ++b) alpha_of_scores(alpha_ptr, s_ptr, d, b);
    });
    gate_or_pool(y, x_slab, alpha_ptr, d, pool);
  });
  return {y, alpha};
}

std::tuple<at::Tensor, at::Tensor> score_softmax_gate_bwd(const at::Tensor& dy_in, const at::Tensor& x_in,
                                                          const at::Tensor& weight_in, const at::Tensor& alpha_in,
                                                          const std::optional<at::Tensor>& dalpha_in, double scale,
                                                          bool pool) {
  const char* op = "score_softmax_gate_bwd (cpu)";
  const at::Tensor x = last_dim_contiguous(x_in), dy = last_dim_contiguous(dy_in);
  const Dims d = describe_cpu_gate(op, x, weight_in, "weight", true);
  check_gate_weight(op, weight_in, x, d);
  check_gate_dy(op, dy, x, d, pool);
  const at::ScalarType acc = acc_dtype(x.scalar_type());
  const at::Tensor alpha = acc_rows(op, alpha_in, x, d, "alpha");
  const at::Tensor dalpha = acc_rows(op, dalpha_in, x, d, "dalpha");
  const at::Tensor w = weight_in.to(acc).contiguous();  // (H, D)
  at::Tensor ds = at::empty({d.B, d.N, d.H}, x.options().dtype(acc));  // g, then scale * dscores in place
  at::Tensor dx = empty_output({d.B, d.N, d.D}, x.options());
  // Per-task partial dweight, summed in a fixed order at the end: no races, same result every run.
  const int64_t n_tasks = std::max<int64_t>(1, std::min<int64_t>(at::get_num_threads(), d.B * d.N));
  at::Tensor dw_parts = at::zeros({n_tasks, d.H, d.D}, x.options().dtype(acc));

  AT_DISPATCH_FLOATING_TYPES_AND2(at::kBFloat16, at::kHalf, x.scalar_type(), "score_softmax_gate_bwd", [&] {
    using acc_t = at::opmath_type<scalar_t>;
    const acc_t* alpha_ptr = alpha.data_ptr<acc_t>();
    const acc_t* dalpha_ptr = dalpha.defined() ? dalpha.data_ptr<acc_t>() : nullptr;
    const acc_t* w_ptr = w.data_ptr<acc_t>();
    acc_t* ds_ptr = ds.data_ptr<acc_t>();
    acc_t* dw_ptr = dw_parts.data_ptr<acc_t>();
    const Slab<const scalar_t> x_slab = slab_of<const scalar_t>(x, true);
    const Slab<const scalar_t> dy_slab = slab_of<const scalar_t>(dy, !pool);
    const Slab<scalar_t> dx_slab = slab_of<scalar_t>(dx, true);
    const auto dscores_of = [&](int64_t b) {
      const int64_t off = b * d.N * d.H;
      softmax_over_positions_bwd(ds_ptr + off, alpha_ptr + off, dalpha_ptr ? dalpha_ptr + off : nullptr, d.N, d.H,
                                 acc_t(scale));
    };
    if (d.B >= n_tasks) {
      // -- whole batch items per task: the dx / dweight pass re-reads the slabs the g pass just brought into cache
      at::parallel_for(0, n_tasks, 1, [&](int64_t t0, int64_t t1) {
        for (int64_t t = t0; t < t1; ++t) {
          const auto [b0, b1] = split_range(d.B, n_tasks, t);
          for (int64_t b = b0; b < b1; ++b) {
            head_dots_rows(ds_ptr, dy_slab, x_slab, d, b * d.N, (b + 1) * d.N);
            dscores_of(b);
            score_bwd_rows(dx_slab, dw_ptr + t * d.H * d.D, dy_slab, x_slab, alpha_ptr, ds_ptr, w_ptr, d, b * d.N,
                           (b + 1) * d.N);
          }
        }
      });
    } else {
      // -- few batch items: one parallel loop per stage
      at::parallel_for(0, d.B * d.N, rows_grain(d.D), [&](int64_t r0, int64_t r1) {
        head_dots_rows(ds_ptr, dy_slab, x_slab, d, r0, r1);
      });
      at::parallel_for(0, d.B, rows_grain(d.N * d.H), [&](int64_t b0, int64_t b1) {
        for (int64_t b = b0; b < b1; ++b) dscores_of(b);
      });
      at::parallel_for(0, n_tasks, 1, [&](int64_t t0, int64_t t1) {
        for (int64_t t = t0; t < t1; ++t) {
          const auto [r0, r1] = split_range(d.B * d.N, n_tasks, t);
          score_bwd_rows(dx_slab, dw_ptr + t * d.H * d.D, dy_slab, x_slab, alpha_ptr, ds_ptr, w_ptr, d, r0, r1);
        }
      });
    }
  });
  // -- dweight = Σ_tasks partial dweight
  return {dx, dw_parts.sum(0).to(weight_in.scalar_type())};
}

}  // namespace fastattn::cpu
