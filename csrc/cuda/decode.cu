// attention_kvcache_fwd: flash-decoding on tensor cores (sm_80+), a few new queries per sequence over a long,
// contiguous or paged, kv cache.
//
//   A block owns one kv head of one sequence, a tile of 16 packed rows -- the group's query heads x the Lq queries
//   (GQA packing: the query heads that read one kv head share its K/V stream) -- and one split of the keys. Q stays
//   in shared memory; 64-key K/V tiles stream through a cp.async double buffer (as attention_fwd_kernel.h); each
//   of the 4 warps takes 16 keys of a tile with its own online softmax (S = Q K^T, exp2, O += P V), and at the
//   end the warps' (m, l, O) merge through shared memory. Paged caches: each key row is looked up in the page
//   table (rows past the sequence's length never are: the table holds no page for them).
//   One split: the block writes out (gated) and lse. Several (small batch, long cache: too few blocks for the
//   GPU): each split writes its normalised out in float32 and its lse, and merge_splits_kernel combines them,
//   out = sum_s 2^(lse_s - lse) out_s with lse = log2 sum_s 2^lse_s.
#include <cuda_bf16.h>
#include <cuda_fp16.h>
#include <cuda_runtime.h>

#include <cmath>

#include "kernel_traits.h"
#include "mask.h"
#include "params.h"
#include "ptx.h"
#include "static_switch.h"

namespace fastattn::cuda {

// The splits a sequence of key_len keys has: those that hold a key tile of it, and at least one (which writes the
// empty result).
template <int kD>
__device__ __forceinline__ int seq_splits(const DecodeParams& p, int key_len) {
  const int tiles = (key_len + DecodeTraits<kD>::kBlockN - 1) / DecodeTraits<kD>::kBlockN;
  return max(1, min(p.num_splits, (tiles + p.split_tiles - 1) / p.split_tiles));
}

template <typename T, int kD>
__global__ void __launch_bounds__(DecodeTraits<kD>::kThreads, DecodeTraits<kD>::kMinBlocks)
    attention_decode_kernel(const DecodeParams p) {
  using Tr = DecodeTraits<kD>;
  constexpr int kBM = Tr::kBlockM, kBN = Tr::kBlockN, kLd = Tr::kLd, kThreads = Tr::kThreads, kWarps = Tr::kWarps;
  constexpr int kDT = kD / 8;       // n8 output tiles
  constexpr int kChunks = kD / 8;   // 16-byte chunks per row
  constexpr int kKvRows = kBN * kChunks / kThreads;  // K (and V) chunks per thread and tile, one row each
  static_assert(kThreads % kChunks == 0 && kDT % kWarps == 0, "tile shapes");

  extern __shared__ __align__(16) unsigned char smem_raw[];
  T* sQ = reinterpret_cast<T*>(smem_raw);  // [kBM][kLd]
  T* sK = sQ + Tr::kSmemQ;                 // [2][kBN][kLd]
  T* sV = sK + 2 * Tr::kSmemKV;            // [2][kBN][kLd]

  const GridTile gt = grid_tile(p.num_splits);  // slice (b * Hkv + hk) * row_tiles + row tile
  const int split = gt.tile, b = gt.slice / (p.Hkv * p.row_tiles), rt = gt.slice % (p.Hkv * p.row_tiles);
  const int hk = rt / p.row_tiles, r0 = rt % p.row_tiles * kBM;
  const SeqDims sd = seq_dims(p, b);
  if (split >= seq_splits<kD>(p, sd.Lk)) return;  // past this sequence's keys: the merge does not read this split
  const int tid = threadIdx.x, warp = tid / 32, lane = tid % 32;
  const int g = lane >> 2, t = lane & 3;
  const int R = p.group * sd.Lq;  // packed rows: row r is query r % Lq of query head hk * group + r / Lq

  int qi[2];  // the query index of this thread's two accumulator rows (g, g + 8)
#pragma unroll
  for (int r = 0; r < 2; ++r) qi[r] = (r0 + g + 8 * r) % sd.Lq;

  // -- key tiles of this split that the tile's rows see: up to the sequence's length, or the causal diagonal of
  // its last query
  int j_end = sd.Lk;
  if (p.causal) {
    const int r_last = min(r0 + kBM, R) - 1;
    const int q_last = r_last / sd.Lq > r0 / sd.Lq ? sd.Lq - 1 : r_last % sd.Lq;
    j_end = max(0, min(j_end, q_last + sd.causal_off + 1));
  }
  const int n_begin = split * p.split_tiles;
  const int n_end = min(n_begin + p.split_tiles, (j_end + kBN - 1) / kBN);

  const T* k_base = static_cast<const T*>(p.k) + hk * p.k_sh;
  const T* v_base = static_cast<const T*>(p.v) + hk * p.v_sh;
  // Tile n of K (or V: base, strides) -> s, one commit group. Key j is row j % page_size of page
  // page_table[b, j / page_size] (kv_row_offset's rule), or row j of batch item b; rows past the sequence's end
  // are zero-filled. (K and V look rows up each: holding them across both would cost registers.)
  auto load_tile = [&](T* s, const T* base, int64_t sb, int64_t sl, int n) {
#pragma unroll
    for (int i = 0; i < kKvRows; ++i) {
      const int idx = i * kThreads + tid, r = idx / kChunks, c = idx % kChunks * 8;
      const int j = n * kBN + r;
      const bool valid = j < sd.Lk;
      int64_t page = b;
      int row = j;
      if (p.page_table != nullptr && valid) {
        page = p.page_table[b * p.pt_sb + j / p.page_size];
        row = j % p.page_size;
      }
      cp_async_16(smem_addr(s + r * kLd + c), valid ? base + page * sb + int64_t(row) * sl + c : base, valid);
    }
    cp_async_commit();
  };
  auto load_kv = [&](int n, int buf) {
    load_tile(sK + buf * Tr::kSmemKV, k_base, p.k_sb, p.k_sl, n);
    load_tile(sV + buf * Tr::kSmemKV, v_base, p.v_sb, p.v_sl, n);
  };

  if (n_begin < n_end) {
    // -- prologue: Q and K_0 (group 0), V_0 (group 1)
    const T* q_b = static_cast<const T*>(p.q) + b * p.q_sb;
#pragma unroll
    for (int i = 0; i < kBM * kChunks / kThreads; ++i) {
      const int idx = i * kThreads + tid, r = idx / kChunks, c = idx % kChunks * 8;
      const int pr = r0 + r;
      const bool valid = pr < R;
      const T* src = valid ? q_b + (hk * p.group + pr / sd.Lq) * p.q_sh + int64_t(pr % sd.Lq) * p.q_sl + c : q_b;
      cp_async_16(smem_addr(sQ + r * kLd + c), src, valid);
    }
    load_kv(n_begin, 0);
  }

  float acc_o[kDT][4];
  zero_fragments(acc_o);
  float row_m[2] = {-INFINITY, -INFINITY};  // running max of the thread's 2 rows over this warp's keys (base 2)
  float row_l[2] = {0.f, 0.f};              // this thread's partial sum of exp2(s - m)

  for (int n = n_begin; n < n_end; ++n) {
    const int buf = (n - n_begin) & 1;
    const int n0 = n * kBN + warp * Tr::kWarpKeys;  // this warp's first key
    const T* sKb = sK + buf * Tr::kSmemKV;
    const T* sVb = sV + buf * Tr::kSmemKV;
    // -- prefetch tile n + 1 into the other buffer (freed by the barrier that ended step n - 1); two groups every
    // step, possibly empty, so the wait counts below are constant
    if (n + 1 < n_end) {
      load_kv(n + 1, buf ^ 1);
    } else {
      cp_async_commit();
      cp_async_commit();
    }
    cp_async_wait<3>();  // K_n (and Q) landed
    __syncthreads();

    // -- S = Q K^T   [16 rows x this warp's 16 keys]
    float acc_s[2][4];
    zero_fragments(acc_s);
#pragma unroll
    for (int kk = 0; kk < kD / 16; ++kk) {
      uint32_t qf[4];
      ldmatrix_x4(qf, smem_addr(sQ + ((lane & 7) + ((lane >> 3) & 1) * 8) * kLd + kk * 16 + (lane >> 4) * 8));
      uint32_t bk[4];  // b0, b1 of keys n0..n0+7, then of n0+8..n0+15
      ldmatrix_x4(bk, smem_addr(sKb + (warp * Tr::kWarpKeys + (lane & 7) + ((lane >> 4) & 1) * 8) * kLd + kk * 16 +
                                ((lane >> 3) & 1) * 8));
      mma_16816_n16<T>(acc_s[0], acc_s[1], qf, bk);
    }

    // -- scale (base 2); keys past the sequence's end or a row's causal diagonal -> -inf
#pragma unroll
    for (int nt = 0; nt < 2; ++nt)
#pragma unroll
      for (int e = 0; e < 4; ++e) {
        const int j = n0 + nt * 8 + 2 * t + (e & 1);
        float x = acc_s[nt][e] * p.scale_log2;
        if (j >= sd.Lk || (p.causal && j > qi[e >> 1] + sd.causal_off)) x = -INFINITY;
        acc_s[nt][e] = x;
      }

    // -- online softmax update: new max, rescale O and l, P = exp2(S - m)
    online_softmax_step(acc_s, acc_o, row_m, row_l);

    cp_async_wait<2>();  // V_n landed
    __syncthreads();

    // -- O += P V   [16 x kD]; P rounded to T, one MMA per tile (forward only: no backward needs more of it)
    uint32_t a[4];
    a[0] = pack2<T>(acc_s[0][0], acc_s[0][1]);
    a[1] = pack2<T>(acc_s[0][2], acc_s[0][3]);
    a[2] = pack2<T>(acc_s[1][0], acc_s[1][1]);
    a[3] = pack2<T>(acc_s[1][2], acc_s[1][3]);
#pragma unroll
    for (int dt2 = 0; dt2 < kDT / 2; ++dt2) {
      uint32_t bv[4];
      ldmatrix_x4_trans(bv, smem_addr(sVb + (warp * Tr::kWarpKeys + (lane & 7) + ((lane >> 3) & 1) * 8) * kLd +
                                      dt2 * 16 + (lane >> 4) * 8));
      mma_16816_n16<T>(acc_o[2 * dt2], acc_o[2 * dt2 + 1], a, bv);
    }
    __syncthreads();  // this step's K/V buffer is free for the prefetch of step n + 1 (and, last, for the merge)
  }

  // -- the warps' softmaxes -> one, through the K/V buffers: every warp stores its (m, l, O), then warp w
  // finishes the n8 column tiles [w * kDT / kWarps, (w + 1) * kDT / kWarps) of every row
  float* red_o = reinterpret_cast<float*>(sK);   // [kWarps][kDT][32][4]
  float* red_ml = red_o + kWarps * kDT * 32 * 4;  // [kWarps][32][4]: m0, m1, l0, l1
#pragma unroll
  for (int dt = 0; dt < kDT; ++dt)
    *reinterpret_cast<float4*>(red_o + ((warp * kDT + dt) * 32 + lane) * 4) =
        make_float4(acc_o[dt][0], acc_o[dt][1], acc_o[dt][2], acc_o[dt][3]);
  *reinterpret_cast<float4*>(red_ml + (warp * 32 + lane) * 4) =
      make_float4(row_m[0], row_m[1], quad_sum(row_l[0]), quad_sum(row_l[1]));
  __syncthreads();

  const bool split_out = p.num_splits > 1;
  const int64_t rows_all = int64_t(p.B) * p.Hq * p.Lq;  // rows of out; a split's partials are rows_all apart
#pragma unroll
  for (int r = 0; r < 2; ++r) {
    const int pr = r0 + g + 8 * r;
    float m_w[kWarps], l_w[kWarps];
    float m = -INFINITY;
#pragma unroll
    for (int w = 0; w < kWarps; ++w) {
      const float4 ml = *reinterpret_cast<const float4*>(red_ml + (w * 32 + lane) * 4);
      m_w[w] = r ? ml.y : ml.x;
      l_w[w] = r ? ml.w : ml.z;
      m = fmaxf(m, m_w[w]);
    }
    const float m_use = m == -INFINITY ? 0.f : m;
    float l = 0.f;
#pragma unroll
    for (int w = 0; w < kWarps; ++w) {
      m_w[w] = exp2f(m_w[w] - m_use);  // now each warp's weight
      l += m_w[w] * l_w[w];
    }
    // exactly 0 and -inf for a row with no key; a NaN score reaches l through exp2f and makes the row NaN
    const bool empty = l == 0.f;
    const float inv_l = empty ? 0.f : 1.f / l;
    const float lse = empty ? -INFINITY : m + __log2f(l);
    if (pr >= R) continue;
    const int h = hk * p.group + pr / sd.Lq, i = pr % sd.Lq;
    const int64_t row = (int64_t(b) * p.Hq + h) * p.Lq + i;  // (b, h, i) of out (B, Hq, Lq)
    T* o_row = static_cast<T*>(p.out) + b * p.o_sb + h * p.o_sh + int64_t(i) * p.o_sl;
    const T* g_row = p.gate ? static_cast<const T*>(p.gate) + b * p.g_sb + h * p.g_sh + int64_t(i) * p.g_si : nullptr;
    float* part_row = split_out ? p.out_part + (split * rows_all + row) * kD : nullptr;
#pragma unroll
    for (int dt = warp * (kDT / kWarps); dt < (warp + 1) * (kDT / kWarps); ++dt) {
      const int c = dt * 8 + 2 * t;
      float o0 = 0.f, o1 = 0.f;
#pragma unroll
      for (int w = 0; w < kWarps; ++w) {
        const float* src = red_o + ((w * kDT + dt) * 32 + lane) * 4 + 2 * r;
        o0 += m_w[w] * src[0];
        o1 += m_w[w] * src[1];
      }
      o0 = empty ? 0.f : o0 * inv_l, o1 = empty ? 0.f : o1 * inv_l;
      if (split_out) {
        *reinterpret_cast<float2*>(part_row + c) = make_float2(o0, o1);
        continue;
      }
      if (g_row) {
        o0 *= sigmoidf(to_float(g_row[int64_t(c) * p.g_sc]));
        o1 *= sigmoidf(to_float(g_row[int64_t(c + 1) * p.g_sc]));
      }
      *reinterpret_cast<uint32_t*>(o_row + c) = pack2<T>(o0, o1);
    }
    if (warp == 0 && t == 0) {
      if (split_out) p.lse_part[split * rows_all + row] = lse;
      else p.lse[row] = lse;
    }
  }
}

// One warp per row (b, h, i) of out: the splits' (out_s, lse_s) -> out (gated), lse.
template <typename T, int kD>
__global__ void __launch_bounds__(128) merge_splits_kernel(const DecodeParams p) {
  constexpr int kCols = kD / 32;  // columns per lane
  const int64_t rows_all = int64_t(p.B) * p.Hq * p.Lq;
  const int64_t row = int64_t(blockIdx.x) * 4 + threadIdx.x / 32;
  if (row >= rows_all) return;  // the whole warp: no lane is left out of the shuffles below
  const int lane = threadIdx.x % 32;
  const int i = int(row % p.Lq), h = int(row / p.Lq % p.Hq), b = int(row / p.Lq / p.Hq);
  const int splits = seq_splits<kD>(p, seq_dims(p, b).Lk);
  const float* lse_s = p.lse_part + row;  // split s at lse_s[s * rows_all]

  float m = -INFINITY;
  for (int s = lane; s < splits; s += 32) m = fmaxf(m, lse_s[s * rows_all]);
  m = warp_max(m);
  const float m_use = m == -INFINITY ? 0.f : m;
  float l = 0.f;
  for (int s = lane; s < splits; s += 32) l += exp2f(lse_s[s * rows_all] - m_use);
  l = warp_sum(l);
  // no key in any split: 0 and -inf; a NaN lse_s (a NaN score) makes l, and with it the row, NaN
  const bool empty = l == 0.f;
  const float inv_l = empty ? 0.f : 1.f / l;

  float o[kCols] = {};
  for (int s = 0; s < splits; ++s) {
    const float w = exp2f(lse_s[s * rows_all] - m_use) * inv_l;
    const float* src = p.out_part + (s * rows_all + row) * kD + lane * kCols;
#pragma unroll
    for (int c = 0; c < kCols; c += 2) {
      const float2 x = *reinterpret_cast<const float2*>(src + c);
      o[c] += w * x.x;
      o[c + 1] += w * x.y;
    }
  }
  T* o_row = static_cast<T*>(p.out) + b * p.o_sb + h * p.o_sh + int64_t(i) * p.o_sl + lane * kCols;
  const T* g_row = p.gate ? static_cast<const T*>(p.gate) + b * p.g_sb + h * p.g_sh + int64_t(i) * p.g_si : nullptr;
#pragma unroll
  for (int c = 0; c < kCols; c += 2) {
    float o0 = empty ? 0.f : o[c], o1 = empty ? 0.f : o[c + 1];
    if (g_row) {
      o0 *= sigmoidf(to_float(g_row[int64_t(lane * kCols + c) * p.g_sc]));
      o1 *= sigmoidf(to_float(g_row[int64_t(lane * kCols + c + 1) * p.g_sc]));
    }
    *reinterpret_cast<uint32_t*>(o_row + c) = pack2<T>(o0, o1);
  }
  if (lane == 0) p.lse[row] = empty ? -INFINITY : m + __log2f(l);
}

template <typename T, int kD>
cudaError_t launch_decode(const DecodeParams& p, cudaStream_t stream) {
  using Tr = DecodeTraits<kD>;
  const dim3 grid = tiles_grid(p.num_splits, int64_t(p.B) * p.Hkv * p.row_tiles);
  const cudaError_t err =
      launch_with_smem(attention_decode_kernel<T, kD>, grid, Tr::kThreads, Tr::kSmemBytes, p, stream);
  if (err != cudaSuccess || p.num_splits == 1) return err;
  const dim3 merge_grid(unsigned((int64_t(p.B) * p.Hq * p.Lq + 3) / 4));
  merge_splits_kernel<T, kD><<<merge_grid, 128, 0, stream>>>(p);
  return cudaGetLastError();
}

cudaError_t attention_decode(const DecodeParams& p, cudaStream_t stream) {
  return FA_DTYPE_SWITCH(p.is_bf16, T, [&] {
    return p.D == 64 ? launch_decode<T, 64>(p, stream) : launch_decode<T, 128>(p, stream);
  });
}

}  // namespace fastattn::cuda
