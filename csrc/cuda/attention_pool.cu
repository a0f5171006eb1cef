// attention_pool on CUDA, forward and backward (math: fastattn/reference.py attention_pool, csrc/cpu/attention_pool.cpp).
//
// The cost is the scorer's GEMM, x (N, D) times [V|U] (D, G), G = 2 Hd gated (Hd ungated): it runs on the tensor
// cores (mma.sync m16n8k16, fp32 accumulators) as 64 x 64 output tiles of 4 warps (16 rows each), the operands
// streamed through shared memory in 32-wide k steps (cp.async, ldmatrix; ptx.h's fragment layouts; one buffer, each
// step's loads waited for before its MMAs: double buffering is for a GPU round to measure). The binding lays the
// weights out so that every 64-column tile holds 32 hidden units' tanh columns and then the same units' sigmoid
// columns (ungated: 64 units' tanh columns): a tile's epilogue has both activations of a unit in one thread's
// registers, and the forward stores no (N, Hd) tensor. The pre-activations stay in fp32 (the reference rounds them to
// x's dtype, as a Linear layer does: these are closer to the exact ones).
//   forward:  scores_kernel: per 64-row tile, every column tile's GEMM, then h = tanh(.) sigmoid(.) and s += h w in
//             registers (K branches per row) -> scores (N, K);
//             partial_kernel: one block per split of a bag (a bag's rows cut at multiples of kSplitRows, so a bag of
//             100k rows is many blocks): m = max s, l = sum exp(s - m), acc = sum exp(s - m) x per branch;
//             merge_kernel: the splits' (m, l, acc) -> y = sum_s e^(m_s - M) acc_s / L and lse = M + log L, exactly
//             (split-KV decoding's merge).
//             x is read twice (scores, then pooling). A one-pass kernel (a block owning a bag's split, pooling its x
//             tiles after their scores) is future work: its tiles would start at bag boundaries, so small bags waste
//             most of a 64-row MMA tile, and x would have to stay in shared memory (64 x D) to be read once.
//   backward: scores_kernel again (recompute); rows_kernel, a warp per row: α = exp(s - lse), g_k = x · dy_k,
//             ds_k = α_k ((x - y_k) · dy_k + dlse_k) (+ dscores); dpre_kernel: per 64-row tile the GEMM once more, then
//             dh = Σ_k ds_k w_k, d(pre) through the activations -> dpre (N, G) in x's dtype (as the reference's
//             Linear gradient), dw += hᵀ ds (fp32 atomics); dx_kernel: dx = dpre [V|U]ᵀ + Σ_k α_k dy_k (GEMM with the
//             pooled term in its epilogue); dW_kernel: d[V|U] += xᵀ dpre over chunks of kDwRows rows (fp32 atomics).
//             dbias = Σ_n dpre is a column sum in the binding.
// Left-out rows (mask False) are read as zeros by every GEMM (a NaN there reaches nothing), score -inf, weigh 0 and
// get dx = 0.
#include <cuda_bf16.h>
#include <cuda_fp16.h>
#include <cuda_runtime.h>

#include <cmath>
#include <cstring>

#include "kernel_traits.h"
#include "params.h"
#include "ptx.h"
#include "static_switch.h"

namespace fastattn::cuda {
namespace {

// -- the GEMM tiles: 64 x 64 outputs, 4 warps of 16 rows, k in steps of 32
constexpr int kTile = 64;
constexpr int kStepK = 32;
constexpr int kGemmThreads = 128;
constexpr int kLdK = kStepK + kSmemPad;  // an operand tile stored [64][32 k]
constexpr int kLdMN = kTile + kSmemPad;  // an operand tile stored [32 k][64]
constexpr int kTileElems = kTile * kLdK > kStepK * kLdMN ? kTile * kLdK : kStepK * kLdMN;
constexpr int kUnits = kPoolUnits;  // hidden units per column tile when gated
static_assert(2 * kUnits == kTile, "a gated column tile holds its units' tanh and sigmoid columns");

// Forward pooling: rows per split of a bag (params.h: the binding sizes the splits' workspaces), and its block.
constexpr int kSplitRows = kPoolSplitRows;
constexpr int kPoolThreads = 128;
constexpr int kPoolBranches = 4;  // branches pooled per pass over a split's rows (accumulators: 4 x 8 per thread)
// Backward: rows per block of dW_kernel (each block adds its 64 x 64 tile of xᵀ dpre into dW with atomics).
constexpr int kDwRows = 512;
constexpr int kRowWarps = 8;  // rows_kernel: one warp per row

// A matrix as stored in memory: element (r, c) at p[r * ld + c], cols % 8 == 0 (16-byte chunks), 16-byte aligned
// rows. Rows >= row_end, and rows whose keep is false, read as zeros.
template <typename T>
struct Stored {
  const T* p;
  int64_t ld;
  int64_t row_end;
  int cols;
  const bool* keep;  // nullptr: every row
};

// Stored rows [r0, r0 + kR) x columns [c0, c0 + kC) -> s (row length kLd), zero-filled outside; one cp.async each.
template <int kR, int kC, int kLd, typename T>
__device__ __forceinline__ void load_stored(T* s, const Stored<T>& m, int64_t r0, int64_t c0) {
  constexpr int kChunks = kC / 8;
  static_assert(kR * kChunks % kGemmThreads == 0, "tile chunks must split evenly over the threads");
#pragma unroll
  for (int i = 0; i < kR * kChunks / kGemmThreads; ++i) {
    const int idx = i * kGemmThreads + threadIdx.x, r = idx / kChunks, c = idx % kChunks * 8;
    const int64_t gr = r0 + r;
    const bool valid = gr < m.row_end && c0 + c < m.cols && (m.keep == nullptr || m.keep[gr]);
    cp_async_16(smem_addr(s + r * kLd + c), valid ? m.p + gr * m.ld + c0 + c : m.p, valid);
  }
}

// acc += A[m0 : m0 + 64, k0 : k1] B[k0 : k1, n0 : n0 + 64]. A is stored [m][k] (kATrans: [k][m]), B [n][k] (kBTrans:
// [k][n]); rows of k past k1 must read as zeros (the caller's row_end) when k is a stored row. Warp w owns rows
// 16 w .. 16 w + 15: acc[nt][e] is (row 16 w + g + 8 (e / 2), column 8 nt + 2 t + e % 2), g = lane / 4, t = lane % 4.
template <typename T, bool kATrans, bool kBTrans>
__device__ __forceinline__ void gemm_tile(float (&acc)[kTile / 8][4], const Stored<T>& a, const Stored<T>& b,
                                          int64_t m0, int64_t n0, int64_t k0, int64_t k1, T* sA, T* sB) {
  const int warp = threadIdx.x / 32, lane = threadIdx.x % 32;
  for (int64_t k = k0; k < k1; k += kStepK) {
    if constexpr (kATrans) load_stored<kStepK, kTile, kLdMN>(sA, a, k, m0);
    else load_stored<kTile, kStepK, kLdK>(sA, a, m0, k);
    if constexpr (kBTrans) load_stored<kStepK, kTile, kLdMN>(sB, b, k, n0);
    else load_stored<kTile, kStepK, kLdK>(sB, b, n0, k);
    cp_async_commit();
    cp_async_wait<0>();
    __syncthreads();
#pragma unroll
    for (int kk = 0; kk < kStepK / 16; ++kk) {
      uint32_t af[4];
      if constexpr (kATrans)  // the A fragment of a k-major tile: matrices (k 0-7, m 0-7), (k 0-7, m 8-15), (k 8-15, ...
        ldmatrix_x4_trans(af, smem_addr(sA + (kk * 16 + (lane & 7) + (lane >> 4) * 8) * kLdMN + warp * 16 +
                                        ((lane >> 3) & 1) * 8));
      else
        ldmatrix_x4(af, smem_addr(sA + (warp * 16 + (lane & 7) + ((lane >> 3) & 1) * 8) * kLdK + kk * 16 +
                                  (lane >> 4) * 8));
#pragma unroll
      for (int n16 = 0; n16 < kTile / 16; ++n16) {
        uint32_t bf[4];  // b0, b1 of columns 16 n16 .. + 7, then of + 8 .. + 15
        if constexpr (kBTrans)
          ldmatrix_x4_trans(bf, smem_addr(sB + (kk * 16 + (lane & 7) + ((lane >> 3) & 1) * 8) * kLdMN + n16 * 16 +
                                          (lane >> 4) * 8));
        else
          ldmatrix_x4(bf, smem_addr(sB + (n16 * 16 + (lane & 7) + ((lane >> 4) & 1) * 8) * kLdK + kk * 16 +
                                    ((lane >> 3) & 1) * 8));
        mma_16816_n16<T>(acc[2 * n16], acc[2 * n16 + 1], af, bf);
      }
    }
    __syncthreads();  // the tiles are free for the next step's loads
  }
}

// The bag of row n: the largest b with offsets[b] <= n (offsets never decrease, offsets[B] = N > n).
__device__ __forceinline__ int bag_of(const int64_t* offsets, int B, int64_t n) {
  int lo = 0, hi = B;
  while (lo < hi) {
    const int mid = (lo + hi + 1) / 2;
    if (offsets[mid] <= n) lo = mid;
    else hi = mid - 1;
  }
  return lo;
}

template <typename T>
__device__ __forceinline__ Stored<T> x_rows(const PoolParams& p) {
  return {static_cast<const T*>(p.x), p.x_ld, p.N, p.Dp, p.mask};
}

// The pre-activations of column tile ct of rows m0 .. m0 + 63: acc = x W^T's tile (no bias).
template <typename T>
__device__ __forceinline__ void pre_tile(float (&acc)[kTile / 8][4], const PoolParams& p, int64_t m0, int ct, T* sA,
                                         T* sB) {
  zero_fragments(acc);
  const Stored<T> wt{static_cast<const T*>(p.wt), p.Dp, p.G, p.Dp, nullptr};
  gemm_tile<T, false, false>(acc, x_rows<T>(p), wt, m0, int64_t(ct) * kTile, 0, p.Dp, sA, sB);
}

// The hidden unit of column tile ct's tanh column nt * 8 + c8 (c8 < 8), and that column's index in G.
template <bool kGated>
__device__ __forceinline__ int unit_of(int ct, int nt, int c8) {
  return (kGated ? ct * kUnits : ct * kTile) + nt * 8 + c8;
}

// -- scores[n, k] = Σ_j tanh(pre_V) sigmoid(pre_U) w[j, k]; -inf at left-out rows. One block per 64 rows.
template <typename T, bool kGated, int kK>
__global__ void __launch_bounds__(kGemmThreads) scores_kernel(const PoolParams p) {
  __shared__ __align__(16) T sA[kTileElems];
  __shared__ __align__(16) T sB[kTileElems];
  constexpr int kVT = kGated ? kUnits / 8 : kTile / 8;  // n8 tiles of tanh columns per column tile
  const int warp = threadIdx.x / 32, lane = threadIdx.x % 32, g = lane >> 2, t = lane & 3;
  const int64_t m0 = int64_t(blockIdx.x) * kTile;
  float s[2][kK];
#pragma unroll
  for (int r = 0; r < 2; ++r)
#pragma unroll
    for (int k = 0; k < kK; ++k) s[r][k] = 0.f;
  for (int ct = 0; ct < p.G / kTile; ++ct) {
    float acc[kTile / 8][4];
    pre_tile<T>(acc, p, m0, ct, sA, sB);
#pragma unroll
    for (int nt = 0; nt < kVT; ++nt)
#pragma unroll
      for (int e = 0; e < 4; ++e) {
        const int col = ct * kTile + nt * 8 + 2 * t + (e & 1), unit = unit_of<kGated>(ct, nt, 2 * t + (e & 1));
        float h = tanhf(acc[nt][e] + p.bias[col]);
        if constexpr (kGated) h *= sigmoidf(acc[nt + kVT][e] + p.bias[col + kUnits]);
        const float* w = p.w + unit * kK;
#pragma unroll
        for (int k = 0; k < kK; ++k) s[e >> 1][k] += h * w[k];
      }
  }
#pragma unroll
  for (int r = 0; r < 2; ++r) {
#pragma unroll
    for (int k = 0; k < kK; ++k) s[r][k] = quad_sum(s[r][k]);  // the row's 4 lanes held different units
    const int64_t row = m0 + warp * 16 + g + 8 * r;
    if (t != 0 || row >= p.N) continue;
    const bool keep = p.mask == nullptr || p.mask[row];
#pragma unroll
    for (int k = 0; k < kK; ++k)
      if (k < p.K) p.scores[row * p.K + k] = keep ? s[r][k] : -INFINITY;
  }
}

// -- one split of one bag: m = max_n s, l = Σ exp(s - m), acc = Σ exp(s - m) x, per branch. Block i is split
// i - pair_start[b] of the bag b with pair_start[b] <= i < pair_start[b + 1]; the grid has an upper bound of blocks.
template <typename T, int kK>
__global__ void __launch_bounds__(kPoolThreads) partial_kernel(const PoolParams p) {
  __shared__ float sw[kSplitRows][kK];  // exp(s - m) of the split's rows
  __shared__ float sm[kK];
  const int64_t pair = blockIdx.x;
  if (pair >= p.pair_start[p.B]) return;
  const int b = bag_of(p.pair_start, p.B, pair);
  const int64_t chunk = p.offsets[b] / kSplitRows + (pair - p.pair_start[b]);
  const int64_t lo = max(p.offsets[b], chunk * kSplitRows), hi = min(p.offsets[b + 1], (chunk + 1) * kSplitRows);
  const int n = int(hi - lo), K = p.K;
  const float* s = p.scores + lo * K;
  // -- the max per branch (fmaxf passes over NaN: a NaN score reaches l and acc through exp instead)
  for (int k = threadIdx.x; k < kK; k += kPoolThreads) {
    float m = -INFINITY;
    if (k < K)
      for (int r = 0; r < n; ++r) m = fmaxf(m, s[r * K + k]);
    sm[k] = m;
  }
  __syncthreads();
  for (int idx = threadIdx.x; idx < n * kK; idx += kPoolThreads) {
    const int r = idx / kK, k = idx % kK;
    const float sc = k < K ? s[r * K + k] : -INFINITY;
    const float m = sm[k] == -INFINITY ? 0.f : sm[k];  // every row left out: all weights 0
    sw[r][k] = sc == -INFINITY ? 0.f : expf(sc - m);
  }
  __syncthreads();
  for (int k = threadIdx.x; k < K; k += kPoolThreads) {
    float l = 0.f;
    for (int r = 0; r < n; ++r) l += sw[r][k];
    p.part_m[pair * K + k] = sm[k];
    p.part_l[pair * K + k] = l;
  }
  // -- acc[k, c] = Σ_r sw[r][k] x[r, c]: 8 channels a thread (one 16-byte load), kPoolBranches branches a pass
  const T* x = static_cast<const T*>(p.x) + lo * p.x_ld;
  for (int c = threadIdx.x * 8; c < p.Dp; c += kPoolThreads * 8) {
    for (int k0 = 0; k0 < K; k0 += kPoolBranches) {
      float acc[kPoolBranches][8];
#pragma unroll
      for (int j = 0; j < kPoolBranches; ++j)
#pragma unroll
        for (int e = 0; e < 8; ++e) acc[j][e] = 0.f;
      for (int r = 0; r < n; ++r) {
        if (p.mask != nullptr && !p.mask[lo + r]) continue;  // its x may be NaN: 0 * NaN would reach acc
        const uint4 raw = *reinterpret_cast<const uint4*>(x + r * p.x_ld + c);
        T xe[8];
        memcpy(xe, &raw, sizeof(raw));
#pragma unroll
        for (int j = 0; j < kPoolBranches; ++j) {
          const float a = k0 + j < kK ? sw[r][min(k0 + j, kK - 1)] : 0.f;
#pragma unroll
          for (int e = 0; e < 8; ++e) acc[j][e] += a * to_float(xe[e]);
        }
      }
#pragma unroll
      for (int j = 0; j < kPoolBranches; ++j) {
        if (k0 + j >= K) break;
        float* dst = p.part_acc + (pair * K + k0 + j) * p.Dp + c;
#pragma unroll
        for (int e = 0; e < 8; e += 4) *reinterpret_cast<float4*>(dst + e) =
            make_float4(acc[j][e], acc[j][e + 1], acc[j][e + 2], acc[j][e + 3]);
      }
    }
  }
}

// -- one block per (bag, branch): its splits' (m_s, l_s, acc_s) -> y and lse (natural log).
__global__ void __launch_bounds__(kPoolThreads) merge_kernel(const PoolParams p) {
  const int b = blockIdx.x / p.K, k = blockIdx.x % p.K, K = p.K;
  const int64_t s0 = p.pair_start[b], s1 = p.pair_start[b + 1];
  float m = -INFINITY;
  for (int64_t s = s0; s < s1; ++s) m = fmaxf(m, p.part_m[s * K + k]);
  const float m_use = m == -INFINITY ? 0.f : m;
  float l = 0.f;
  for (int64_t s = s0; s < s1; ++s) l += p.part_l[s * K + k] * expf(p.part_m[s * K + k] - m_use);
  // no row in any split (an empty bag, or every row left out): 0 and -inf; a NaN score makes l, and y, NaN
  const bool empty = l == 0.f;
  const float inv_l = empty ? 0.f : 1.f / l;
  float* y = p.y + (int64_t(b) * K + k) * p.D;
  for (int c = threadIdx.x; c < p.D; c += kPoolThreads) {
    float v = 0.f;
    for (int64_t s = s0; s < s1; ++s) v += expf(p.part_m[s * K + k] - m_use) * p.part_acc[(s * K + k) * p.Dp + c];
    y[c] = empty ? 0.f : v * inv_l;
  }
  if (threadIdx.x == 0) p.lse[int64_t(b) * K + k] = empty ? -INFINITY : m + logf(l);
}

// -- backward, a warp per row: alpha = exp(s - lse), ds = alpha ((x - y) · dy - delta) + dscores (0 at left-out rows).
// x · dy - y · dy summed as (x - y) · dy: where one row holds nearly all of alpha its x is nearly y, and the two sums,
// taken apart in float32, would cancel to their rounding.
template <typename T>
__global__ void __launch_bounds__(kRowWarps * 32) rows_kernel(const PoolBwdParams p) {
  const int64_t row = int64_t(blockIdx.x) * kRowWarps + threadIdx.x / 32;
  const int lane = threadIdx.x % 32, K = p.K;
  if (row >= p.N) return;
  if (p.mask != nullptr && !p.mask[row]) {
    for (int k = lane; k < K; k += 32) p.ds[row * K + k] = 0.f, p.alpha[row * K + k] = 0.f;
    return;
  }
  const int b = bag_of(p.offsets, p.B, row);
  const T* x = static_cast<const T*>(p.x) + row * p.x_ld;
  for (int k = 0; k < K; ++k) {
    const float* dy = p.dy + (int64_t(b) * K + k) * p.D;
    const float* y = p.y + (int64_t(b) * K + k) * p.D;
    float dot = 0.f;
    for (int c = lane * 8; c < p.D; c += 32 * 8) {
      const uint4 raw = *reinterpret_cast<const uint4*>(x + c);
      T xe[8];
      memcpy(xe, &raw, sizeof(raw));
#pragma unroll
      for (int e = 0; e < 8; ++e)
        if (c + e < p.D) dot += (to_float(xe[e]) - y[c + e]) * dy[c + e];
    }
    dot = warp_sum(dot);
    const float a = expf(p.scores[row * K + k] - p.lse[int64_t(b) * K + k]);
    if (lane == 0) {
      p.alpha[row * K + k] = a;
      p.ds[row * K + k] = a * (dot - p.delta[int64_t(b) * K + k]) + (p.dscores ? p.dscores[row * K + k] : 0.f);
    }
  }
}

// -- dpre = dh through the activations (x's dtype), dh = Σ_k ds_k w_k; dw[j, k] += Σ_n h[n, j] ds[n, k]
template <typename T, bool kGated, int kK>
__global__ void __launch_bounds__(kGemmThreads) dpre_kernel(const PoolBwdParams p) {
  __shared__ __align__(16) T sA[kTileElems];
  __shared__ __align__(16) T sB[kTileElems];
  constexpr int kVT = kGated ? kUnits / 8 : kTile / 8;
  const int warp = threadIdx.x / 32, lane = threadIdx.x % 32, g = lane >> 2, t = lane & 3;
  // the tile's ds in shared memory, not registers: with the accumulators 16 branches of 2 rows spill on sm_90
  __shared__ float sDs[kTile][kK];
  const int64_t m0 = int64_t(blockIdx.x) * kTile;
  for (int idx = threadIdx.x; idx < kTile * kK; idx += kGemmThreads) {
    const int r = idx / kK, k = idx % kK;
    const int64_t row = m0 + r;
    sDs[r][k] = row < p.N && k < p.K ? p.ds[row * p.K + k] : 0.f;
  }
  __syncthreads();
  const float* ds[2] = {sDs[warp * 16 + g], sDs[warp * 16 + g + 8]};
  // rows left out give 0: their activations come from x = 0, NaN where a weight or bias is, and 0 · NaN is not 0
  bool keep[2];
#pragma unroll
  for (int r = 0; r < 2; ++r) {
    const int64_t row = m0 + warp * 16 + g + 8 * r;
    keep[r] = row < p.N && (p.mask == nullptr || p.mask[row]);
  }
  T* dpre = static_cast<T*>(p.dpre);
  for (int ct = 0; ct < p.G / kTile; ++ct) {
    float acc[kTile / 8][4];
    pre_tile<T>(acc, p, m0, ct, sA, sB);
#pragma unroll
    for (int nt = 0; nt < kVT; ++nt)
#pragma unroll
      for (int c2 = 0; c2 < 2; ++c2) {
        const int col = ct * kTile + nt * 8 + 2 * t + c2, unit = unit_of<kGated>(ct, nt, 2 * t + c2);
        const float* w = p.w + unit * kK;
        float h[2];
#pragma unroll
        for (int r = 0; r < 2; ++r) {
          const int e = 2 * r + c2;
          const float th = tanhf(acc[nt][e] + p.bias[col]);
          float dh = 0.f;
#pragma unroll
          for (int k = 0; k < kK; ++k) dh += ds[r][k] * w[k];
          if constexpr (kGated) {
            const float sg = sigmoidf(acc[nt + kVT][e] + p.bias[col + kUnits]);
            h[r] = keep[r] ? th * sg : 0.f;
            acc[nt][e] = keep[r] ? dh * sg * (1.f - th * th) : 0.f;
            acc[nt + kVT][e] = keep[r] ? dh * th * sg * (1.f - sg) : 0.f;
          } else {
            h[r] = keep[r] ? th : 0.f;
            acc[nt][e] = keep[r] ? dh * (1.f - th * th) : 0.f;
          }
        }
        // dw of this unit: the thread's 2 rows, then the 8 lanes of its column (same t) in the warp, one atomic
#pragma unroll
        for (int k = 0; k < kK; ++k) {
          float v = h[0] * ds[0][k] + h[1] * ds[1][k];
          v += __shfl_xor_sync(0xffffffffu, v, 4);
          v += __shfl_xor_sync(0xffffffffu, v, 8);
          v += __shfl_xor_sync(0xffffffffu, v, 16);
          if (g == 0 && k < p.K) atomicAdd(p.dw_acc + unit * kK + k, v);
        }
      }
#pragma unroll
    for (int r = 0; r < 2; ++r) {
      const int64_t row = m0 + warp * 16 + g + 8 * r;
      if (row >= p.N) continue;
#pragma unroll
      for (int nt = 0; nt < kTile / 8; ++nt)
        *reinterpret_cast<uint32_t*>(dpre + row * p.G + ct * kTile + nt * 8 + 2 * t) =
            pack2<T>(acc[nt][2 * r], acc[nt][2 * r + 1]);
    }
  }
}

// -- dx = dpre [V|U]ᵀ + Σ_k alpha_k dy_k; 0 at left-out rows. Blocks: tiles_grid(column tiles, row tiles).
template <typename T>
__global__ void __launch_bounds__(kGemmThreads) dx_kernel(const PoolBwdParams p) {
  __shared__ __align__(16) T sA[kTileElems];
  __shared__ __align__(16) T sB[kTileElems];
  const int warp = threadIdx.x / 32, lane = threadIdx.x % 32, g = lane >> 2, t = lane & 3;
  const GridTile gt = grid_tile((p.Dp + kTile - 1) / kTile);
  const int64_t m0 = int64_t(gt.slice) * kTile, n0 = int64_t(gt.tile) * kTile;
  float acc[kTile / 8][4];
  zero_fragments(acc);
  const Stored<T> dpre{static_cast<const T*>(p.dpre), p.G, p.N, p.G, nullptr};
  const Stored<T> wi{static_cast<const T*>(p.wi), p.G, p.Dp, p.G, nullptr};
  gemm_tile<T, false, false>(acc, dpre, wi, m0, n0, 0, p.G, sA, sB);
  const int K = p.K;
#pragma unroll
  for (int r = 0; r < 2; ++r) {
    const int64_t row = m0 + warp * 16 + g + 8 * r;
    if (row >= p.N) continue;
    const bool keep = p.mask == nullptr || p.mask[row];
    const int b = keep ? bag_of(p.offsets, p.B, row) : 0;
#pragma unroll
    for (int nt = 0; nt < kTile / 8; ++nt) {
      const int64_t c = n0 + nt * 8 + 2 * t;
      if (c >= p.Dp) continue;
      float v[2] = {acc[nt][2 * r], acc[nt][2 * r + 1]};
      for (int k = 0; keep && k < K; ++k) {
        const float a = p.alpha[row * K + k];
        const float* dy = p.dy + (int64_t(b) * K + k) * p.D;
#pragma unroll
        for (int j = 0; j < 2; ++j)
          if (c + j < p.D) v[j] += a * dy[c + j];
      }
      *reinterpret_cast<uint32_t*>(static_cast<T*>(p.dx) + row * p.Dp + c) =
          pack2<T>(keep ? v[0] : 0.f, keep ? v[1] : 0.f);
    }
  }
}

// -- dW[c, j] += Σ_n x[n, c] dpre[n, j] over one chunk of kDwRows rows. Blocks: tiles_grid(output tiles, chunks).
template <typename T>
__global__ void __launch_bounds__(kGemmThreads) dW_kernel(const PoolBwdParams p) {
  __shared__ __align__(16) T sA[kTileElems];
  __shared__ __align__(16) T sB[kTileElems];
  const int warp = threadIdx.x / 32, lane = threadIdx.x % 32, g = lane >> 2, t = lane & 3;
  const int m_tiles = (p.Dp + kTile - 1) / kTile;
  const GridTile gt = grid_tile(m_tiles * (p.G / kTile));
  const int64_t m0 = int64_t(gt.tile % m_tiles) * kTile, n0 = int64_t(gt.tile / m_tiles) * kTile;
  const int64_t k0 = int64_t(gt.slice) * kDwRows, k1 = min(p.N, k0 + kDwRows);
  float acc[kTile / 8][4];
  zero_fragments(acc);
  const Stored<T> xT{static_cast<const T*>(p.x), p.x_ld, k1, p.Dp, p.mask};  // left-out rows: zeros
  const Stored<T> dpreT{static_cast<const T*>(p.dpre), p.G, k1, p.G, nullptr};
  gemm_tile<T, true, true>(acc, xT, dpreT, m0, n0, k0, k1, sA, sB);
#pragma unroll
  for (int r = 0; r < 2; ++r) {
    const int64_t c = m0 + warp * 16 + g + 8 * r;
    if (c >= p.Dp) continue;
#pragma unroll
    for (int nt = 0; nt < kTile / 8; ++nt)
#pragma unroll
      for (int j = 0; j < 2; ++j) atomicAdd(p.dW_acc + c * p.G + n0 + nt * 8 + 2 * t + j, acc[nt][2 * r + j]);
  }
}

template <typename T, bool kGated, int kK>
void fwd_impl(const PoolParams& p, cudaStream_t stream) {
  const unsigned row_tiles = unsigned((p.N + kTile - 1) / kTile);
  scores_kernel<T, kGated, kK><<<row_tiles, kGemmThreads, 0, stream>>>(p);
  partial_kernel<T, kK><<<unsigned(p.max_pairs), kPoolThreads, 0, stream>>>(p);
  merge_kernel<<<unsigned(p.B * p.K), kPoolThreads, 0, stream>>>(p);
}

template <typename T, bool kGated, int kK>
void bwd_impl(const PoolBwdParams& p, cudaStream_t stream) {
  const int64_t row_tiles = (p.N + kTile - 1) / kTile;
  scores_kernel<T, kGated, kK><<<unsigned(row_tiles), kGemmThreads, 0, stream>>>(p);
  rows_kernel<T><<<unsigned((p.N + kRowWarps - 1) / kRowWarps), kRowWarps * 32, 0, stream>>>(p);
  dpre_kernel<T, kGated, kK><<<unsigned(row_tiles), kGemmThreads, 0, stream>>>(p);
  dx_kernel<T><<<tiles_grid((p.Dp + kTile - 1) / kTile, row_tiles), kGemmThreads, 0, stream>>>(p);
  dW_kernel<T><<<tiles_grid(int64_t((p.Dp + kTile - 1) / kTile) * (p.G / kTile), (p.N + kDwRows - 1) / kDwRows),
                 kGemmThreads, 0, stream>>>(p);
}

}  // namespace

cudaError_t attention_pool_fwd_kernels(const PoolParams& p, cudaStream_t stream) {
  if (p.N == 0 || p.B == 0) return cudaSuccess;  // the binding fills y and lse itself
  FA_DTYPE_SWITCH(p.is_bf16, T, [&] {
    FA_BOOL_SWITCH(p.gated, kGated, [&] {
      if (pool_branch_slots(p.K) == 4) fwd_impl<T, kGated, 4>(p, stream);
      else fwd_impl<T, kGated, kPoolMaxBranches>(p, stream);
    });
  });
  return cudaGetLastError();
}

cudaError_t attention_pool_bwd_kernels(const PoolBwdParams& p, cudaStream_t stream) {
  if (p.N == 0 || p.B == 0) return cudaSuccess;
  FA_DTYPE_SWITCH(p.is_bf16, T, [&] {
    FA_BOOL_SWITCH(p.gated, kGated, [&] {
      if (pool_branch_slots(p.K) == 4) bwd_impl<T, kGated, 4>(p, stream);
      else bwd_impl<T, kGated, kPoolMaxBranches>(p, stream);
    });
  });
  return cudaGetLastError();
}

}  // namespace fastattn::cuda
