// softmax_gate and score_softmax_gate on CUDA, forward and backward (math: csrc/cpu/softmax_gate.h).
//
// Forward:  [score_softmax_gate: scores = scale * x W^T, one warp per row, the one read of x that
//           makes them] -> alpha = masked softmax over positions (one block per (b, h), in base 2)
//           -> y = alpha * x (16-byte vectors) or y = sum_n alpha * x (pool: block reduction, fp32
//           atomics across position chunks). So x is read once for softmax_gate, twice for
//           score_softmax_gate (scores, then gating); a one-read fused score+pool pass is future work.
// Backward: g = per-head sum dy * x (+ dalpha) and dx = alpha * dy, one warp per row -> dscores =
//           alpha (g - sum_n alpha g) per (b, h) -> [score: dx += scale * dscores W and
//           dweight = scale * dscores^T x (block reduction + fp32 atomics)].
#include <cuda_bf16.h>
#include <cuda_fp16.h>
#include <cuda_runtime.h>

#include <cmath>
#include <cstring>
#include <type_traits>

#include "params.h"
#include "ptx.h"
#include "static_switch.h"

namespace fastattn::cuda {
namespace {

constexpr int kWarpRowsPerBlock = 8;  // row kernels: one warp per (b, n) row, 8 per block
constexpr int kSoftmaxThreads = 256;  // softmax over positions: one block per (b, h)

// kVec consecutive elements as floats: one 16-byte load when kVec == 8 (16-bit T).
template <typename T, int kVec>
__device__ __forceinline__ void load_vec(const T* p, float (&v)[kVec]) {
  if constexpr (kVec == 8) {
    const uint4 raw = *reinterpret_cast<const uint4*>(p);
    T e[8];  // memcpy, not a T* into raw: reading a uint4 object through another type is undefined
    memcpy(e, &raw, sizeof(raw));
#pragma unroll
    for (int i = 0; i < 8; ++i) v[i] = to_float(e[i]);
  } else {
#pragma unroll
    for (int i = 0; i < kVec; ++i) v[i] = to_float(p[i]);
  }
}
template <typename T, int kVec>
__device__ __forceinline__ void store_vec(T* p, const float (&v)[kVec]) {
  if constexpr (kVec == 8) {
    T e[8];
#pragma unroll
    for (int i = 0; i < 8; ++i) e[i] = from_float<T>(v[i]);
    uint4 raw;
    memcpy(&raw, e, sizeof(raw));
    *reinterpret_cast<uint4*>(p) = raw;
  } else {
#pragma unroll
    for (int i = 0; i < kVec; ++i) p[i] = from_float<T>(v[i]);
  }
}

// Block-wide reduction (sum, or max of floats) for kSoftmaxThreads threads; every thread gets the result.
template <bool kMax, typename F>
__device__ __forceinline__ F warp_reduce(F x) {
  if constexpr (kMax) {
    return warp_max(x);
  } else {
    return warp_sum(x);
  }
}
template <bool kMax, typename F>
__device__ __forceinline__ F block_reduce(F x, F* red) {
  static_assert(!kMax || std::is_same_v<F, float>, "block_reduce: the max is of floats");
  x = warp_reduce<kMax>(x);
  const int warp = threadIdx.x / 32, lane = threadIdx.x % 32;
  __syncthreads();  // red may still be read by a previous reduction
  if (lane == 0) red[warp] = x;
  __syncthreads();
  x = lane < kSoftmaxThreads / 32 ? red[lane] : (kMax ? F(-INFINITY) : F(0));
  return warp_reduce<kMax>(x);
}

// -- score_softmax_gate: alpha[b, n, h] <- scale * x[b, n, :] . w[h, :] (-inf where masked). Heads go in
// groups of kScoreHeads, each with its own accumulator, so that a group reads x once (x is read once from
// memory for H <= kScoreHeads), two chunks of it in flight a lane: one dependent chain per head, x re-read
// per head from L1, kept the loads waiting (on an H200, B32 N8192 D1024 H8 bf16: score_softmax_gate's
// forward took 2.65 ms, softmax_gate's 0.42).
constexpr int kScoreHeads = 8;

template <typename T, int kVec>
__global__ void __launch_bounds__(kWarpRowsPerBlock * 32) scores_kernel(const GateParams p) {
  const int64_t row = int64_t(blockIdx.x) * kWarpRowsPerBlock + threadIdx.x / 32;
  const int lane = threadIdx.x % 32;
  if (row >= int64_t(p.B) * p.N) return;
  const int64_t b = row / p.N, n = row % p.N;
  float* a = p.alpha + row * p.H;
  if (p.mask != nullptr && !p.mask[row]) {
    for (int h = lane; h < p.H; h += 32) a[h] = -INFINITY;
    return;
  }
  const T* x = static_cast<const T*>(p.x) + b * p.x_sb + n * p.x_sn;
  for (int h0 = 0; h0 < p.H; h0 += kScoreHeads) {
    const int nh = min(kScoreHeads, p.H - h0);
    float dot[kScoreHeads];
#pragma unroll
    for (int j = 0; j < kScoreHeads; ++j) dot[j] = 0.f;
#pragma unroll 2
    for (int c = lane * kVec; c < p.D; c += 32 * kVec) {
      float xv[kVec];
      load_vec<T, kVec>(x + c, xv);
#pragma unroll
      for (int j = 0; j < kScoreHeads; ++j) {
        // heads past H (a last, partial group) read head H - 1 again: no branch, their sums are dropped
        const float* w = p.weight + int64_t(min(h0 + j, p.H - 1)) * p.D + c;
        if constexpr (kVec == 8) {  // weight: float32 (H, D) made contiguous by the binding, D % 8 == 0
          const float4 lo = *reinterpret_cast<const float4*>(w), hi = *reinterpret_cast<const float4*>(w + 4);
          dot[j] += xv[0] * lo.x; dot[j] += xv[1] * lo.y; dot[j] += xv[2] * lo.z; dot[j] += xv[3] * lo.w;
          dot[j] += xv[4] * hi.x; dot[j] += xv[5] * hi.y; dot[j] += xv[6] * hi.z; dot[j] += xv[7] * hi.w;
        } else {
#pragma unroll
          for (int e = 0; e < kVec; ++e) dot[j] += xv[e] * w[e];
        }
      }
    }
#pragma unroll
    for (int j = 0; j < kScoreHeads; ++j) {
      if (j < nh) {  // nh is the same on every lane: all 32 take part in the shuffles
        const float s = warp_sum(dot[j]);
        if (lane == j) a[h0 + j] = p.scale * s;
      }
    }
  }
}

// -- alpha[b, :, h] = softmax over positions (masked: 0; all masked: all 0). kFromScores: read the
// scores tensor (and the mask); else alpha already holds the scores with -inf at masked positions.
template <typename T, bool kFromScores>
__global__ void __launch_bounds__(kSoftmaxThreads) softmax_positions_kernel(const GateParams p) {
  __shared__ float red[32];
  const int b = blockIdx.x / p.H, h = blockIdx.x % p.H;
  float* a = p.alpha + int64_t(b) * p.N * p.H + h;
  const T* s = kFromScores ? static_cast<const T*>(p.scores) + b * p.s_sb + h : nullptr;
  const bool* mask = p.mask ? p.mask + int64_t(b) * p.N : nullptr;
  auto score = [&](int n) -> float {  // base-2 units
    if constexpr (kFromScores) {
      if (mask != nullptr && !mask[n]) return -INFINITY;
      return to_float(s[n * p.s_sn]) * kLog2e;
    } else {
      return a[int64_t(n) * p.H] * kLog2e;
    }
  };
  // -- max over positions (fmaxf passes over NaN: a NaN score reaches the sum below instead)
  float m = -INFINITY;
  for (int n = threadIdx.x; n < p.N; n += kSoftmaxThreads) m = fmaxf(m, score(n));
  m = block_reduce<true>(m, red);
  if (fabsf(m) == INFINITY) m = 0.f;  // every position masked (exp2(-inf) = 0 everywhere), or a +inf score (as torch)
  // -- sum of exp2(s - m); NaN when any unmasked score is NaN
  float l = 0.f;
  for (int n = threadIdx.x; n < p.N; n += kSoftmaxThreads) l += exp2f(score(n) - m);
  l = block_reduce<false>(l, red);
  const float inv_l = l == 0.f ? 0.f : 1.f / l;  // a NaN sum makes every unmasked alpha NaN, as torch's softmax
  // -- normalise (each thread rewrites only the positions it read); masked positions are exactly 0, NaN or not
  for (int n = threadIdx.x; n < p.N; n += kSoftmaxThreads) {
    const float sn = score(n);
    a[int64_t(n) * p.H] = sn == -INFINITY ? 0.f : exp2f(sn - m) * inv_l;
  }
}

// -- Grid-stride loop over (row = b*N + n, kVec-channel group c) of a (B, N, D) tensor: calls
// body(row, c, v) with v = src[b, n, c:c+kVec] * alpha[b, n, c / Dh] (kVec divides Dh).
template <typename T, int kVec, typename Body>
__device__ __forceinline__ void for_each_gated_vec(const void* src, int64_t sb, int64_t sn, const float* alpha,
                                                   int B, int N, int D, int H, Body body) {
  const int Dh = D / H, vecs = D / kVec;
  const int64_t total = int64_t(B) * N * vecs;
  for (int64_t idx = int64_t(blockIdx.x) * blockDim.x + threadIdx.x; idx < total;
       idx += int64_t(gridDim.x) * blockDim.x) {
    const int64_t row = idx / vecs;
    const int c = int(idx % vecs) * kVec;
    const int64_t b = row / N, n = row % N;
    float v[kVec];
    load_vec<T, kVec>(static_cast<const T*>(src) + b * sb + n * sn + c, v);
    const float a = alpha[row * H + c / Dh];
#pragma unroll
    for (int e = 0; e < kVec; ++e) v[e] *= a;
    body(row, c, v);
  }
}

// -- y[b, n, c] = alpha[b, n, c / Dh] * x[b, n, c]; kVec channels per thread
template <typename T, int kVec>
__global__ void gate_kernel(const GateParams p) {
  for_each_gated_vec<T, kVec>(p.x, p.x_sb, p.x_sn, p.alpha, p.B, p.N, p.D, p.H,
                              [&](int64_t row, int c, float (&v)[kVec]) {
                                store_vec<T, kVec>(static_cast<T*>(p.y) + row * p.D + c, v);
                              });
}

// -- y_accum[b, c] += sum over a chunk of positions of alpha * x. Block (32, 8): lanes along
// channels (kVec each), 8 rows of positions; tiles_grid(channel tiles, B x position chunks), b fastest.
constexpr int kPoolRows = 8;
constexpr int kPoolChunk = 256;  // positions per block: enough blocks for small B, few atomics
template <typename T, int kVec>
__global__ void __launch_bounds__(32 * kPoolRows) pool_kernel(const GateParams p) {
  __shared__ float part[kPoolRows][32 * kVec];
  const int Dh = p.D / p.H;
  const GridTile gt = grid_tile((p.D + 32 * kVec - 1) / (32 * kVec));
  const int c = (gt.tile * 32 + threadIdx.x) * kVec;
  const int b = gt.slice % p.B;
  const int n_begin = gt.slice / p.B * kPoolChunk, n_end = min(p.N, n_begin + kPoolChunk);
  float acc[kVec];
#pragma unroll
  for (int e = 0; e < kVec; ++e) acc[e] = 0.f;
  if (c < p.D) {
    const T* x = static_cast<const T*>(p.x) + b * p.x_sb + c;
    const float* alpha = p.alpha + int64_t(b) * p.N * p.H + c / Dh;
    for (int n = n_begin + threadIdx.y; n < n_end; n += kPoolRows) {
      const float a = alpha[int64_t(n) * p.H];  // masked positions too: 0 * NaN is NaN, as in torch's sum
      float v[kVec];
      load_vec<T, kVec>(x + n * p.x_sn, v);
#pragma unroll
      for (int e = 0; e < kVec; ++e) acc[e] += a * v[e];
    }
  }
#pragma unroll
  for (int e = 0; e < kVec; ++e) part[threadIdx.y][threadIdx.x * kVec + e] = acc[e];
  __syncthreads();
  // -- reduce the 8 rows; thread (x, y) finishes channels y, y + 8, ... of the block's 32 * kVec
  for (int k = threadIdx.y * 32 + threadIdx.x; k < 32 * kVec; k += 32 * kPoolRows) {
    float s = 0.f;
#pragma unroll
    for (int r = 0; r < kPoolRows; ++r) s += part[r][k];
    const int ck = gt.tile * 32 * kVec + k;
    if (ck < p.D) atomicAdd(p.y_accum + int64_t(b) * p.D + ck, s);
  }
}

// -- backward, per row: g[b, n, h] = sum_{c in h} dy * x (+ dalpha); kWriteDx: dx = alpha * dy
template <typename T, int kVec, bool kWriteDx>
__global__ void __launch_bounds__(kWarpRowsPerBlock * 32) gate_bwd_rows_kernel(const GateBwdParams p) {
  const int64_t row = int64_t(blockIdx.x) * kWarpRowsPerBlock + threadIdx.x / 32;
  const int lane = threadIdx.x % 32;
  if (row >= int64_t(p.B) * p.N) return;
  const int64_t b = row / p.N, n = row % p.N;
  const int Dh = p.D / p.H;
  const T* x = static_cast<const T*>(p.x) + b * p.x_sb + n * p.x_sn;
  const T* dy = static_cast<const T*>(p.dy) + b * p.dy_sb + n * p.dy_sn;
  T* dx = static_cast<T*>(p.dx) + row * p.D;
  for (int h = 0; h < p.H; ++h) {
    const float a = p.alpha[row * p.H + h];
    float dot = 0.f;
    for (int c = h * Dh + lane * kVec; c < (h + 1) * Dh; c += 32 * kVec) {
      float xv[kVec], dyv[kVec];
      load_vec<T, kVec>(x + c, xv);
      load_vec<T, kVec>(dy + c, dyv);
#pragma unroll
      for (int e = 0; e < kVec; ++e) {
        dot += xv[e] * dyv[e];
        dyv[e] *= a;
      }
      if constexpr (kWriteDx) store_vec<T, kVec>(dx + c, dyv);
    }
    dot = warp_sum(dot);
    if (lane == 0) p.g[row * p.H + h] = dot + (p.dalpha ? p.dalpha[row * p.H + h] : 0.f);
  }
}

// -- dscores[b, :, h] = alpha * (g - sum_n alpha g), in place in g (and to p.dscores in x's dtype). Masked
// positions (alpha = 0) take no part: their g may be NaN (NaN in x or dy there) and their dscores is 0, as
// the gradient of torch's masked softmax. Taken as alpha (g S - sum_n alpha g) with S = sum_n alpha, in double
// (as the CPU and Triton kernels): the same value when S = 1, without leaning on the rounded alphas summing to 1.
// With a saturated softmax (alpha one-hot) the exact dscores is ~0 while g is large; g - sum alpha g in float
// keeps a rounding of g's size, which takes float16 dweight past docs/CONTRACT.md §4 (1.3x at scale 300).
template <typename T>
__global__ void __launch_bounds__(kSoftmaxThreads) softmax_positions_bwd_kernel(const GateBwdParams p) {
  __shared__ double red[32];
  const int b = blockIdx.x / p.H, h = blockIdx.x % p.H;
  const int64_t base = int64_t(b) * p.N * p.H + h;
  double dot = 0.0, total = 0.0;
  for (int n = threadIdx.x; n < p.N; n += kSoftmaxThreads) {
    const int64_t k = base + int64_t(n) * p.H;
    if (p.alpha[k] != 0.f) {
      dot += double(p.alpha[k]) * p.g[k];
      total += p.alpha[k];
    }
  }
  dot = block_reduce<false>(dot, red);
  total = block_reduce<false>(total, red);
  for (int n = threadIdx.x; n < p.N; n += kSoftmaxThreads) {
    const int64_t k = base + int64_t(n) * p.H;
    const float ds = p.alpha[k] == 0.f ? 0.f : float(p.alpha[k] * (double(p.g[k]) * total - dot));
    p.g[k] = ds;
    if (p.dscores != nullptr) static_cast<T*>(p.dscores)[k] = from_float<T>(ds);
  }
}

// -- score_softmax_gate: dx[b, n, c] = alpha[h(c)] * dy + scale * sum_h dscores[b, n, h] * w[h, c]
template <typename T, int kVec>
__global__ void score_dx_kernel(const GateBwdParams p) {
  for_each_gated_vec<T, kVec>(p.dy, p.dy_sb, p.dy_sn, p.alpha, p.B, p.N, p.D, p.H,
                              [&](int64_t row, int c, float (&v)[kVec]) {
                                for (int h = 0; h < p.H; ++h) {
                                  const float ds = p.scale * p.g[row * p.H + h];
                                  const float* w = p.weight + int64_t(h) * p.D + c;
#pragma unroll
                                  for (int e = 0; e < kVec; ++e) v[e] += ds * w[e];
                                }
                                store_vec<T, kVec>(static_cast<T*>(p.dx) + row * p.D + c, v);
                              });
}

// -- dweight_accum[h, c] += scale * sum over a chunk of rows of dscores[row, h] * x[row, c].
// Block (32, 8): lanes along channels, 8 rows at a time; heads 8 at a time in registers.
constexpr int kDwRows = 8;
constexpr int kDwChunk = 512;  // rows (b, n) per block
constexpr int kDwHeads = 8;
template <typename T>
__global__ void __launch_bounds__(32 * kDwRows) dweight_kernel(const GateBwdParams p) {
  __shared__ float part[kDwRows][kDwHeads][32];
  const GridTile gt = grid_tile((p.D + 31) / 32);  // slice: the chunk of rows
  const int c = gt.tile * 32 + threadIdx.x;
  const int64_t rows = int64_t(p.B) * p.N;
  const int64_t r_begin = int64_t(gt.slice) * kDwChunk;
  const int64_t r_end = min(rows, r_begin + kDwChunk);
  for (int h0 = 0; h0 < p.H; h0 += kDwHeads) {
    float acc[kDwHeads];
#pragma unroll
    for (int j = 0; j < kDwHeads; ++j) acc[j] = 0.f;
    if (c < p.D) {
      for (int64_t r = r_begin + threadIdx.y; r < r_end; r += kDwRows) {
        const int64_t b = r / p.N, n = r % p.N;
        const float xv = to_float(static_cast<const T*>(p.x)[b * p.x_sb + n * p.x_sn + c]);
        const float* ds = p.g + r * p.H + h0;
#pragma unroll
        for (int j = 0; j < kDwHeads; ++j)
          if (h0 + j < p.H) acc[j] += ds[j] * xv;
      }
    }
    __syncthreads();  // part is free (previous head group done)
#pragma unroll
    for (int j = 0; j < kDwHeads; ++j) part[threadIdx.y][j][threadIdx.x] = acc[j];
    __syncthreads();
    // thread (x, y) finishes head h0 + y of channel c
    const int j = threadIdx.y;
    if (c < p.D && h0 + j < p.H) {
      float s = 0.f;
#pragma unroll
      for (int r = 0; r < kDwRows; ++r) s += part[r][j][threadIdx.x];
      atomicAdd(p.dweight_accum + int64_t(h0 + j) * p.D + c, p.scale * s);
    }
  }
}

int grid_1d(int64_t n, int threads) {
  const int64_t blocks = (n + threads - 1) / threads;
  return int(blocks < 65536 ? (blocks > 0 ? blocks : 1) : 65536);
}

template <typename T, int kVec>
void gate_fwd_impl(const GateParams& p, cudaStream_t stream) {
  const int64_t rows = int64_t(p.B) * p.N;
  const unsigned row_blocks = unsigned((rows + kWarpRowsPerBlock - 1) / kWarpRowsPerBlock);
  if (p.weight != nullptr) {  // score_softmax_gate
    scores_kernel<T, kVec><<<row_blocks, kWarpRowsPerBlock * 32, 0, stream>>>(p);
    softmax_positions_kernel<T, false><<<p.B * p.H, kSoftmaxThreads, 0, stream>>>(p);
  } else {
    softmax_positions_kernel<T, true><<<p.B * p.H, kSoftmaxThreads, 0, stream>>>(p);
  }
  if (p.pool) {
    const dim3 grid = tiles_grid((p.D + 32 * kVec - 1) / (32 * kVec), int64_t(p.B) * ((p.N + kPoolChunk - 1) / kPoolChunk));
    pool_kernel<T, kVec><<<grid, dim3(32, kPoolRows), 0, stream>>>(p);
  } else {
    gate_kernel<T, kVec><<<grid_1d(rows * (p.D / kVec), 256), 256, 0, stream>>>(p);
  }
}

template <typename T, int kVec>
void gate_bwd_impl(const GateBwdParams& p, cudaStream_t stream) {
  const int64_t rows = int64_t(p.B) * p.N;
  const unsigned row_blocks = unsigned((rows + kWarpRowsPerBlock - 1) / kWarpRowsPerBlock);
  const bool score = p.weight != nullptr;
  if (score)  // dx needs dscores first: written by score_dx_kernel
    gate_bwd_rows_kernel<T, kVec, false><<<row_blocks, kWarpRowsPerBlock * 32, 0, stream>>>(p);
  else
    gate_bwd_rows_kernel<T, kVec, true><<<row_blocks, kWarpRowsPerBlock * 32, 0, stream>>>(p);
  softmax_positions_bwd_kernel<T><<<p.B * p.H, kSoftmaxThreads, 0, stream>>>(p);
  if (score) {
    score_dx_kernel<T, kVec><<<grid_1d(rows * (p.D / kVec), 256), 256, 0, stream>>>(p);
    const dim3 grid = tiles_grid((p.D + 31) / 32, (rows + kDwChunk - 1) / kDwChunk);
    dweight_kernel<T><<<grid, dim3(32, kDwRows), 0, stream>>>(p);
  }
}

}  // namespace

cudaError_t softmax_gate_fwd(const GateParams& p, cudaStream_t stream) {
  if (int64_t(p.B) * p.N * p.H == 0) return cudaSuccess;
  FA_DTYPE_SWITCH(p.is_bf16, T, [&] {
    FA_BOOL_SWITCH(p.vec == 8, kVec8, [&] { gate_fwd_impl<T, kVec8 ? 8 : 1>(p, stream); });
  });
  return cudaGetLastError();
}

cudaError_t softmax_gate_bwd(const GateBwdParams& p, cudaStream_t stream) {
  if (int64_t(p.B) * p.N * p.H == 0) return cudaSuccess;
  FA_DTYPE_SWITCH(p.is_bf16, T, [&] {
    FA_BOOL_SWITCH(p.vec == 8, kVec8, [&] { gate_bwd_impl<T, kVec8 ? 8 : 1>(p, stream); });
  });
  return cudaGetLastError();
}

}  // namespace fastattn::cuda
