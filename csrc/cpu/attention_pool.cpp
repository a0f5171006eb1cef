// CPU kernels for attention_pool (shapes and math: attention_pool.h, fastattn/reference.py).
//
// The cost is the scorer's GEMM, (N, D) x (D, G) with G = Hd (tanh only) or 2 Hd (gated): the rest is O(N (G + K D)).
// So the kernels run the GEMMs through ATen (MKL / oneDNN, all threads) on blocks of kBlockRows rows, V and U as one
// (D, 2 Hd) matrix, and fuse everything else into per-row passes over the block, which stays in cache:
//   forward:  pre = x V|U + b;  h = tanh ⊙ sigmoid;  s = h w (the scores, K per row);  then per bag and branch the
//             softmax's max and sum (lse), and y = Σ α x as (bag, channel chunk) tasks: a bag of 100k rows is split
//             over threads by channels, so its sum needs no merge;
//   backward: recomputes pre, h, s and α = exp(s - lse); per row g_k = x · dy_k, ds_k = α_k (g_k - dy_k · y_k) (plus
//             the gradients of lse and s, when α was returned), dh = Σ_k ds_k w_k and d(pre) through the
//             activations; then dx = Σ_k α_k dy_k + d(pre) (V|U)ᵀ and d(V|U) += xᵀ d(pre) as two block GEMMs.
// No (N, Hd) tensor lives beyond a block; the forward keeps the scores (N, K floats, K per row of D channels).
// bfloat16 / float16 GEMMs run in that dtype (as the reference's Linear layers), the rest in float.
#include "attention_pool.h"
#include "cpu_utils.h"

#include <ATen/Dispatch.h>
#include <ATen/OpMathType.h>
#include <ATen/Parallel.h>

#include <algorithm>
#include <cmath>
#include <cstdint>
#include <limits>
#include <vector>

namespace fastattn::cpu {
namespace {

// Rows per GEMM block: (kBlockRows, 2 Hd) pre-activations stay a few MB, and each GEMM is large enough for all threads.
constexpr int64_t kBlockRows = 2048;
// Channels per pooling task: a bag's pooled sum is split into chunks of this many channels (one row chunk in L1).
constexpr int64_t kPoolChannels = 256;
// Smallest amount of work (elements touched) worth a parallel task: a small bag's passes stay on the calling thread,
// where waking the other threads would cost more than the work.
constexpr int64_t kMinTaskElems = 1 << 15;

// Items per parallel task when each touches `elems` elements.
inline int64_t grain(int64_t elems) { return std::max<int64_t>(1, kMinTaskElems / std::max<int64_t>(1, elems)); }

// ---------------------------------------------------------------------------------------------------------------
// The activations, in place: a <- tanh(a), g <- sigmoid(g) (g null: ungated). float rows vectorised on exp2_poly
// (tanh x = 1 - 2 / (1 + e^2x), sigmoid x = 1 / (1 + e^-x): both saturate to ±1 / 0 / 1 at ±inf and keep NaN).
// ---------------------------------------------------------------------------------------------------------------
FASTATTN_VEC_CLONES static void activate_f32(float* a, float* g, int64_t n) {
  using vec::VecF;
  constexpr int64_t L = vec::kLanes<float>;
  const VecF one = vec::splat(1.f), two = vec::splat(2.f);
  int64_t i = 0;
  for (; i + L <= n; i += L) {
    const VecF e = vec::exp2_poly(vec::load(a + i) * (2.f * float(kLog2e)));
    vec::store(a + i, one - two / (one + e));
    if (g) vec::store(g + i, one / (one + vec::exp2_poly(vec::load(g + i) * -float(kLog2e))));
  }
  for (; i < n; ++i) {
    a[i] = std::tanh(a[i]);
    if (g) g[i] = 1.f / (1.f + std::exp(-g[i]));
  }
}

static void activate_f64(double* a, double* g, int64_t n) {
  for (int64_t i = 0; i < n; ++i) {
    a[i] = std::tanh(a[i]);
    if (g) g[i] = 1.0 / (1.0 + std::exp(-g[i]));
  }
}

inline void activate(float* a, float* g, int64_t n) { activate_f32(a, g, n); }
inline void activate(double* a, double* g, int64_t n) { activate_f64(a, g, n); }

// NaN-propagating max (a NaN score makes its bag's statistics NaN, as torch's amax does).
template <typename A>
inline A nan_max(A m, A s) { return std::isnan(m) ? m : (std::isnan(s) || s > m) ? s : m; }

// α = exp(s - lse); exactly 0 for a score of -inf (a left-out row), whatever lse is.
template <typename A>
inline A weight_of(A s, A lse) { return s == -std::numeric_limits<A>::infinity() ? A(0) : std::exp(s - lse); }

// The GEMMs' dtype for x's: x's own (bfloat16 runs on the CPU's bf16 dot products, its pre-activations rounded as a
// Linear layer rounds them), but float for float16, whose GEMMs ATen runs through float on a CPU anyway: its
// pre-activations then stay unrounded (float16's rounding of them, at other entries than the reference's GEMM rounds,
// would be most of the weights' gradients' error where large scores saturate the softmax).
template <typename T>
using GemmType = std::conditional_t<std::is_same_v<T, c10::Half>, float, T>;

// The scorer's weights as the kernels use them: W = V|U (D, G) and its bias (G) in the GEMMs' dtype, w transposed
// (K, Hd) in the statistics' dtype.
struct Scorer {
  at::Tensor W, bias, wT;
  int64_t Hd, G, K;
  bool gated;

  Scorer(const at::Tensor& V, const std::optional<at::Tensor>& U, const at::Tensor& w,
         const std::optional<at::Tensor>& bV, const std::optional<at::Tensor>& bU, at::ScalarType acc)
      : Hd(V.size(1)), K(w.size(1)), gated(U.has_value()) {
    G = gated ? 2 * Hd : Hd;
    const auto gemm = V.scalar_type() == at::kHalf ? at::kFloat : V.scalar_type();
    W = (gated ? at::cat({V, *U}, 1) : V).to(gemm).contiguous();
    if (bV || bU) {
      auto part = [&](const std::optional<at::Tensor>& b) { return b ? *b : at::zeros({Hd}, V.options()); };
      bias = (gated ? at::cat({part(bV), part(bU)}) : part(bV)).to(gemm);
    }
    wT = w.to(acc).t().contiguous();
  }

  // x's rows as the GEMMs take them
  at::Tensor gemm_input(const at::Tensor& x_block) const { return x_block.to(W.scalar_type()); }

  // (rows, G) pre-activations of a block of x's rows, in the GEMMs' dtype, contiguous
  at::Tensor pre(const at::Tensor& x_block) const {
    const at::Tensor xg = gemm_input(x_block);
    return bias.defined() ? at::addmm(bias, xg, W) : at::mm(xg, W);
  }
};

// Row n of a block: act = [tanh | sigmoid] of its pre-activations (G), h = their product (Hd), s = h w (K; the
// backward, which has the forward's scores, passes none).
template <typename T, typename A>
inline void score_row(const T* pre, const Scorer& sc, const A* wT, A* act, A* h, A* s) {
  convert_row(act, pre, sc.G);
  activate(act, sc.gated ? act + sc.Hd : nullptr, sc.Hd);
  for (int64_t j = 0; j < sc.Hd; ++j) h[j] = sc.gated ? act[j] * act[sc.Hd + j] : act[j];
  for (int64_t k = 0; s && k < sc.K; ++k) s[k] = vec::dot(h, wT + k * sc.Hd, sc.Hd);
}

// lse (B, K) in double of the scores s (N, K) over each bag's rows, as the reference's softmax: max (NaN sticks), made 0
// where not finite, then the sum. Double, and so the weights of the pooled sum and of the gradient: with large scores a
// float lse (|lse| · 2^-24 off) would leave Σ α off 1 by as much, and the softmax's gradient, where one row holds nearly
// all of α the small difference g - Σ α g, would be mostly that error.
template <typename A>
at::Tensor bag_lse(const at::Tensor& scores, const int64_t* off, int64_t B) {
  const int64_t N = scores.size(0), K = scores.size(1);
  const A* s = scores.data_ptr<A>();
  at::Tensor lse = at::empty({B, K}, scores.options().dtype(at::kDouble));
  double* lse_p = lse.data_ptr<double>();
  at::parallel_for(0, B * K, grain(N / std::max<int64_t>(1, B)), [&](int64_t begin, int64_t end) {
    for (int64_t bk = begin; bk < end; ++bk) {
      const int64_t b = bk / K, k = bk % K;
      double m = -std::numeric_limits<double>::infinity();
      for (int64_t n = off[b]; n < off[b + 1]; ++n) m = nan_max<double>(m, s[n * K + k]);
      const double shift = std::isfinite(m) ? m : 0.0;
      double sum = 0;
      for (int64_t n = off[b]; n < off[b + 1]; ++n) sum += weight_of<double>(s[n * K + k], shift);
      lse_p[bk] = sum == 0 ? -std::numeric_limits<double>::infinity() : std::log(sum) + shift;
    }
  });
  return lse;
}

std::vector<int64_t> bag_of_rows(const int64_t* off, int64_t B, int64_t N) {
  std::vector<int64_t> bag(N);
  for (int64_t b = 0; b < B; ++b)
    for (int64_t n = off[b]; n < off[b + 1]; ++n) bag[n] = b;
  return bag;
}

template <typename T>
std::tuple<at::Tensor, at::Tensor, at::Tensor> pool_fwd(const at::Tensor& x, const at::Tensor& offsets,
                                                        const bool* keep, const Scorer& sc, bool return_scores) {
  using A = at::opmath_type<T>;
  const int64_t N = x.size(0), D = x.size(1), B = offsets.numel() - 1, K = sc.K, Hd = sc.Hd, G = sc.G;
  const int64_t ldx = x.stride(0);
  const auto acc_opts = x.options().dtype(c10::CppTypeToScalarType<A>::value);
  const int64_t* off = offsets.data_ptr<int64_t>();
  const A* wT = sc.wT.data_ptr<A>();
  at::Tensor scores = at::empty({N, K}, acc_opts);
  A* s = scores.data_ptr<A>();

  for (int64_t r0 = 0; r0 < N; r0 += kBlockRows) {
    const int64_t rows = std::min(kBlockRows, N - r0);
    const at::Tensor pre = sc.pre(x.narrow(0, r0, rows));
    const GemmType<T>* pre_p = pre.data_ptr<GemmType<T>>();
    at::parallel_for(0, rows, grain(G + K * Hd), [&](int64_t begin, int64_t end) {
      std::vector<A> act(G), h(Hd);
      for (int64_t i = begin; i < end; ++i) {
        A* s_n = s + (r0 + i) * K;
        if (keep && !keep[r0 + i]) {
          std::fill(s_n, s_n + K, -std::numeric_limits<A>::infinity());
          continue;
        }
        score_row(pre_p + i * G, sc, wT, act.data(), h.data(), s_n);
      }
    });
  }

  const at::Tensor lse_d = bag_lse<A>(scores, off, B);
  const double* lse_p = lse_d.data_ptr<double>();

  // y[b, k, c0:c1] = Σ_n α_nk x[n, c0:c1]: one task per (bag, channel chunk)
  at::Tensor y = at::zeros({B, K, D}, acc_opts);
  A* y_p = y.data_ptr<A>();
  const T* x_p = x.data_ptr<T>();
  const int64_t chunks = (D + kPoolChannels - 1) / kPoolChannels;
  auto pool_task = [&](auto claim) {
    std::vector<A> xr(kPoolChannels), alpha(K);
    for (int64_t t = claim(); t >= 0; t = claim()) {
      const int64_t b = t / chunks, c0 = (t % chunks) * kPoolChannels, c1 = std::min(D, c0 + kPoolChannels);
      for (int64_t n = off[b]; n < off[b + 1]; ++n) {
        if (keep && !keep[n]) continue;
        for (int64_t k = 0; k < K; ++k) alpha[k] = A(weight_of<double>(s[n * K + k], lse_p[b * K + k]));
        convert_row(xr.data(), x_p + n * ldx + c0, c1 - c0);
        for (int64_t k = 0; k < K; ++k) {
          A* __restrict y_bk = y_p + (b * K + k) * D + c0;
          const A a = alpha[k];
          for (int64_t c = 0; c < c1 - c0; ++c) y_bk[c] += a * xr[c];
        }
      }
    }
  };
  if (N * D * K < kMinTaskElems) {  // all of it on this thread
    int64_t next = 0;
    pool_task([&]() -> int64_t { return next < B * chunks ? next++ : -1; });
  } else {
    parallel_dynamic(B * chunks, pool_task);
  }
  return {y, lse_d.to(acc_opts.dtype()), return_scores ? scores : at::empty({0}, acc_opts)};
}

template <typename T>
std::tuple<at::Tensor, at::Tensor, at::Tensor, at::Tensor, at::Tensor, at::Tensor> pool_bwd(
    const at::Tensor& dy, const at::Tensor& x, const at::Tensor& offsets, const std::optional<at::Tensor>& mask,
    const Scorer& sc, bool has_bV, bool has_bU, const at::Tensor& scores, const std::optional<at::Tensor>& dlse,
    const std::optional<at::Tensor>& dscores) {
  using A = at::opmath_type<T>;
  using P = GemmType<T>;
  const int64_t N = x.size(0), D = x.size(1), B = offsets.numel() - 1, K = sc.K, Hd = sc.Hd, G = sc.G;
  const auto acc = c10::CppTypeToScalarType<A>::value;
  const auto acc_opts = x.options().dtype(acc);
  const int64_t* off = offsets.data_ptr<int64_t>();
  const std::vector<int64_t> bag = bag_of_rows(off, B, N);
  const bool* keep = mask ? mask->data_ptr<bool>() : nullptr;
  const int64_t ldx = x.stride(0);
  const T* x_p = x.data_ptr<T>();

  // The softmax's gradient from the forward's scores, in double and before any GEMM: α from the bag's lse, g = x · dy,
  // ds = α (g - Σ_bag α g) (+ α dlse + the scores' own gradient). Where one row holds nearly all of α, or the rows of
  // a bag are alike, ds is the small difference of large sums, which float would leave mostly rounding.
  const at::Tensor lse_d = bag_lse<A>(scores, off, B);
  const double* lse_p = lse_d.data_ptr<double>();
  const A* s = scores.data_ptr<A>();
  at::Tensor dy_a = dy.to(acc).contiguous();
  const A* dy_p = dy_a.data_ptr<A>();
  at::Tensor alpha_t = at::empty({N, K}, acc_opts), ds_t = at::empty({N, K}, acc_opts);
  at::Tensor g_t = at::empty({N, K}, x.options().dtype(at::kDouble));
  A *alpha = alpha_t.data_ptr<A>(), *ds_all = ds_t.data_ptr<A>();
  double* g = g_t.data_ptr<double>();
  at::parallel_for(0, N, grain(K * D), [&](int64_t begin, int64_t end) {
    std::vector<A> xr(D);
    for (int64_t n = begin; n < end; ++n) {
      const int64_t b = bag[n];
      if (keep && !keep[n]) {
        std::fill(g + n * K, g + (n + 1) * K, 0.0);
        continue;
      }
      convert_row(xr.data(), x_p + n * ldx, D);
      for (int64_t k = 0; k < K; ++k) {
        const A* dy_bk = dy_p + (b * K + k) * D;
        g[n * K + k] = dot_double(xr.data(), dy_bk, D);
      }
    }
  });
  const A* ds_in = dscores ? dscores->data_ptr<A>() : nullptr;
  const A* dlse_p = nullptr;
  at::Tensor dlse_a;
  if (dlse) {
    dlse_a = dlse->to(acc).contiguous();
    dlse_p = dlse_a.data_ptr<A>();
  }
  at::parallel_for(0, B * K, grain(N / std::max<int64_t>(1, B)), [&](int64_t begin, int64_t end) {
    for (int64_t bk = begin; bk < end; ++bk) {
      const int64_t b = bk / K, k = bk % K;
      double delta = 0;
      for (int64_t n = off[b]; n < off[b + 1]; ++n) delta += weight_of<double>(s[n * K + k], lse_p[bk]) * g[n * K + k];
      if (dlse_p) delta -= dlse_p[bk];
      for (int64_t n = off[b]; n < off[b + 1]; ++n) {
        const double a = weight_of<double>(s[n * K + k], lse_p[bk]);
        alpha[n * K + k] = A(a);
        ds_all[n * K + k] = A(a * (g[n * K + k] - delta)) + (ds_in ? ds_in[n * K + k] : A(0));
      }
    }
  });
  const A* wT = sc.wT.data_ptr<A>();

  // dx's rows take the pooled term Σ_k α_k dy_k from the row pass, then d(pre) (V|U)ᵀ added by the GEMM in place:
  // in dx itself where the GEMMs run in x's dtype (float, double, bfloat16: for bfloat16 one rounding of the sum, as
  // a Linear's input gradient added to another), through a float block for float16 (whose GEMMs run in float).
  constexpr bool kDirect = std::is_same_v<P, T>;
  using DX = std::conditional_t<kDirect, T, A>;
  at::Tensor dx = at::empty({N, D}, x.options());
  at::Tensor dW = at::zeros({D, G}, acc_opts), dbias = at::zeros({G}, acc_opts), dw = at::zeros({Hd, K}, acc_opts);
  const at::Tensor W_t = sc.W.t();
  for (int64_t r0 = 0; r0 < N; r0 += kBlockRows) {
    const int64_t rows = std::min(kBlockRows, N - r0);
    at::Tensor xb = sc.gemm_input(x.narrow(0, r0, rows));
    if (keep) xb = xb.masked_fill(mask->narrow(0, r0, rows).logical_not().unsqueeze(1), 0);  // no NaN into dW
    const at::Tensor pre = sc.pre(xb);
    at::Tensor dpre = at::empty({rows, G}, acc_opts), hb = at::empty({rows, Hd}, acc_opts);
    at::Tensor dxb = kDirect ? dx.narrow(0, r0, rows) : at::empty({rows, D}, acc_opts);
    const P* pre_p = pre.data_ptr<P>();
    A *dpre_p = dpre.data_ptr<A>(), *hb_p = hb.data_ptr<A>();
    DX* dxb_p = dxb.data_ptr<DX>();
    at::parallel_for(0, rows, grain(2 * G + 2 * K * D), [&](int64_t begin, int64_t end) {
      std::vector<A> act(G), dh(Hd), pooled(std::is_same_v<DX, A> ? 0 : D);
      for (int64_t i = begin; i < end; ++i) {
        const int64_t n = r0 + i, b = bag[n];
        A *dpre_n = dpre_p + i * G, *h = hb_p + i * Hd;
        DX* dx_n = dxb_p + i * D;
        const A* ds = ds_all + n * K;
        if (keep && !keep[n]) {
          std::fill(dpre_n, dpre_n + G, A(0));
          std::fill(h, h + Hd, A(0));
          std::fill(dx_n, dx_n + D, DX(0));
          continue;
        }
        score_row<P, A>(pre_p + i * G, sc, wT, act.data(), h, nullptr);
        A* pool_n = pooled.data();  // the row's Σ_k α_k dy_k: in dx itself where it holds A
        if constexpr (std::is_same_v<DX, A>) pool_n = dx_n;
        std::fill(pool_n, pool_n + D, A(0));
        for (int64_t k = 0; k < K; ++k) {
          const A* dy_bk = dy_p + (b * K + k) * D;
          const A a = alpha[n * K + k];
          for (int64_t c = 0; c < D; ++c) pool_n[c] += a * dy_bk[c];
        }
        if constexpr (!std::is_same_v<DX, A>) convert_row(dx_n, pool_n, D);
        std::fill(dh.begin(), dh.end(), A(0));
        for (int64_t k = 0; k < K; ++k) {
          const A* w_k = wT + k * Hd;
          for (int64_t j = 0; j < Hd; ++j) dh[j] += ds[k] * w_k[j];
        }
        for (int64_t j = 0; j < Hd; ++j) {
          const A t = act[j];
          if (sc.gated) {
            const A g = act[Hd + j];
            dpre_n[j] = dh[j] * g * (A(1) - t * t);
            dpre_n[Hd + j] = dh[j] * t * g * (A(1) - g);
          } else {
            dpre_n[j] = dh[j] * (A(1) - t * t);
          }
        }
      }
    });
    if constexpr (!std::is_same_v<P, A>) {  // d(pre) rounded to bfloat16, as the gradient of a Linear's output is
      const at::Tensor dpre_t = dpre.to(sc.W.scalar_type());
      dxb.addmm_(dpre_t, W_t);
      dW.add_(at::mm(xb.t(), dpre_t));
    } else {
      dxb.addmm_(dpre, W_t);
      dW.addmm_(xb.t(), dpre);
    }
    dbias.add_(dpre.sum(0));
    dw.addmm_(hb.t(), ds_t.narrow(0, r0, rows));  // 0 at left-out rows: their h is 0
    if (keep) dxb.masked_fill_(mask->narrow(0, r0, rows).logical_not().unsqueeze(1), 0);  // 0 · NaN of a weight
    if constexpr (!kDirect) dx.narrow(0, r0, rows).copy_(dxb);
  }
  // every output a tensor of its own (the schema declares no aliasing): copies, also where the dtype is the same
  const auto out = [&](const at::Tensor& t, bool present) {
    return present ? t.to(x.scalar_type(), /*non_blocking=*/false, /*copy=*/true) : at::empty({0}, x.options());
  };
  return {dx,
          out(dW.narrow(1, 0, Hd), true),
          out(dW.narrow(1, Hd, sc.gated ? Hd : 0), sc.gated),
          out(dw, true),
          out(dbias.narrow(0, 0, Hd), has_bV),
          out(dbias.narrow(0, Hd, sc.gated ? Hd : 0), has_bU)};
}

// What the kernels index by, checked here too: the Python layer's checks are skipped under torch.compile and for
// direct calls of the op, and a bad offset or shape would read or write out of bounds.
void check_inputs(const at::Tensor& x, const at::Tensor& offsets, const std::optional<at::Tensor>& mask,
                  const at::Tensor& V, const std::optional<at::Tensor>& U, const at::Tensor& w,
                  const std::optional<at::Tensor>& bV, const std::optional<at::Tensor>& bU) {
  TORCH_CHECK(x.dim() == 2 && x.stride(1) == 1, "attention_pool: x must be (N, D) with stride(-1) == 1");
  TORCH_CHECK(offsets.scalar_type() == at::kLong && offsets.dim() == 1 && offsets.numel() >= 1 &&
                  offsets.is_contiguous(),
              "attention_pool: offsets must be a contiguous int64 (B + 1) tensor");
  const int64_t* off = offsets.data_ptr<int64_t>();
  const int64_t B = offsets.numel() - 1;
  bool ordered = off[0] == 0 && off[B] == x.size(0);
  for (int64_t b = 0; b < B && ordered; ++b) ordered = off[b] <= off[b + 1];
  TORCH_CHECK(ordered, "attention_pool: offsets must not decrease, from 0 to N = ", x.size(0));
  TORCH_CHECK(!mask || (mask->scalar_type() == at::kBool && mask->numel() == x.size(0) && mask->is_contiguous()),
              "attention_pool: mask must be a contiguous bool (N) tensor");
  const int64_t D = x.size(1), Hd = V.dim() == 2 ? V.size(1) : -1;
  TORCH_CHECK(V.dim() == 2 && V.size(0) == D, "attention_pool: V must be (D, Hd)");
  TORCH_CHECK(w.dim() == 2 && w.size(0) == Hd, "attention_pool: w must be (Hd, K)");
  TORCH_CHECK(!U || U->sizes() == V.sizes(), "attention_pool: U must be (D, Hd) like V");
  TORCH_CHECK(!bU || U, "attention_pool: bU needs U");
  for (const auto* b : {&bV, &bU}) TORCH_CHECK(!*b || ((*b)->dim() == 1 && (*b)->size(0) == Hd),
                                               "attention_pool: bV, bU must be (Hd)");
  for (const auto& t : {V, w}) TORCH_CHECK(t.scalar_type() == x.scalar_type(), "attention_pool: dtypes differ");
}

}  // namespace

std::tuple<at::Tensor, at::Tensor, at::Tensor> attention_pool_fwd(
    const at::Tensor& x, const at::Tensor& offsets, const std::optional<at::Tensor>& mask, const at::Tensor& V,
    const std::optional<at::Tensor>& U, const at::Tensor& w, const std::optional<at::Tensor>& bV,
    const std::optional<at::Tensor>& bU, bool return_scores) {
  check_inputs(x, offsets, mask, V, U, w, bV, bU);
  const auto acc = at::toOpMathType(x.scalar_type());
  const Scorer sc(V, U, w, bV, bU, acc);
  std::tuple<at::Tensor, at::Tensor, at::Tensor> out;
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kBFloat16, at::kHalf, x.scalar_type(), "attention_pool_fwd", [&] {
    out = pool_fwd<scalar_t>(x, offsets, mask ? mask->data_ptr<bool>() : nullptr, sc, return_scores);
  });
  return out;
}

std::tuple<at::Tensor, at::Tensor, at::Tensor, at::Tensor, at::Tensor, at::Tensor> attention_pool_bwd(
    const at::Tensor& dy, const at::Tensor& x, const at::Tensor& offsets, const std::optional<at::Tensor>& mask,
    const at::Tensor& V, const std::optional<at::Tensor>& U, const at::Tensor& w, const std::optional<at::Tensor>& bV,
    const std::optional<at::Tensor>& bU, const at::Tensor& y, const at::Tensor& lse,
    const std::optional<at::Tensor>& scores, const std::optional<at::Tensor>& dlse,
    const std::optional<at::Tensor>& dscores) {
  check_inputs(x, offsets, mask, V, U, w, bV, bU);
  const auto acc = at::toOpMathType(x.scalar_type());
  const int64_t B = offsets.numel() - 1, K = w.size(1), D = x.size(1);
  TORCH_CHECK(dy.dim() == 3 && dy.size(0) == B && dy.size(1) == K && dy.size(2) == D,
              "attention_pool_bwd: dy must be (B, K, D)");
  TORCH_CHECK(lse.numel() == B * K && (!dlse || dlse->numel() == B * K), "attention_pool_bwd: lse, dlse must be (B, K)");
  TORCH_CHECK(lse.scalar_type() == acc && lse.is_contiguous(), "attention_pool_bwd: lse must be the forward's");
  TORCH_CHECK(!scores || (scores->scalar_type() == acc && scores->is_contiguous() &&
                          scores->numel() == x.size(0) * w.size(1)),
              "attention_pool_bwd: scores must be the forward's, contiguous (N, K) in the statistics' dtype");
  TORCH_CHECK(!dscores || (dscores->scalar_type() == acc && dscores->is_contiguous() &&
                           dscores->numel() == x.size(0) * w.size(1)),
              "attention_pool_bwd: dscores must be contiguous (N, K) in the statistics' dtype");
  const Scorer sc(V, U, w, bV, bU, acc);
  std::tuple<at::Tensor, at::Tensor, at::Tensor, at::Tensor, at::Tensor, at::Tensor> out;
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kBFloat16, at::kHalf, x.scalar_type(), "attention_pool_bwd", [&] {
    // without the forward's scores (a direct call), the forward's pass makes them again
    const at::Tensor s = scores ? *scores : std::get<2>(pool_fwd<scalar_t>(x, offsets, mask ? mask->data_ptr<bool>()
                                                                                         : nullptr, sc, true));
    out = pool_bwd<scalar_t>(dy, x, offsets, mask, sc, bV.has_value(), bU.has_value(), s, dlse, dscores);
  });
  return out;
}

}  // namespace fastattn::cpu
