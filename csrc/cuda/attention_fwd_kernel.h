// FlashAttention-2 forward on tensor cores (sm_80+): one block per (128-query tile, head, batch).
//
//   Q tile -> shared memory once; K/V tiles of 64 keys stream through a double buffer (cp.async: the
//   next tile's copy runs under this tile's math); each warp owns 16 query rows:
//     S = Q K^T (mma.sync m16n8k16, fp32)  ->  scale, mask (base 2)  ->  online softmax (exp2)
//     ->  dropout (P Z: Z drawn by Philox from the seed, never stored)
//     ->  O = O * corr + P V (P re-used from the S registers as the A operand, no shared memory)
//   epilogue: O / l, output gate, lse = m + log2 l (log2 units, the op's contract).
// One body for attention_fwd and varlen_attention_fwd: a block's slice (grid_tile) b * Hq + h names a batch item or
// a packed sequence b, whose rows, lengths and causal offset come from seq_dims (blocks past a shorter sequence's
// end exit at once); out and out_acc are written through the params' strides, lse by its row length (varlen: out
// (total_q, Hq, Dv), lse (Hq, total_q)).
// Included by attention_fwd_hdim{64,128}.cu, which instantiate it; see kernel_traits.h for tiles.
#pragma once

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

// One block's work. kKeepAcc: a backward follows (p.out_acc set), so P V keeps P to ~16 bits and out_acc is
// stored; without one (inference) P is rounded to T as in FlashAttention, one MMA per tile. kDropout: P V takes the
// kept weights alone (attention_fwd; 1 / (1 - p) comes with the epilogue's 1 / l). sd: the sequence's Lq, Lk and
// causal_off (mask.h's SeqDims, or the params themselves for attention); q_row0, k_row0 its first rows.
template <typename T, int kD, bool kHasMask, bool kKeepAcc, bool kScoreMods, bool kDropout, typename Dims>
__device__ __forceinline__ void attention_fwd_block(const AttnParams& p, const Dims& sd, int q_row0, int k_row0) {
  using Tr = FwdTraits<kD>;
  constexpr int kBM = Tr::kBlockM, kBN = Tr::kBlockN, kLd = Tr::kLd, kThreads = Tr::kThreads;
  constexpr int kNT = kBN / 8;  // n8 score tiles per warp row-slab
  constexpr int kDT = kD / 8;   // n8 output tiles

  extern __shared__ __align__(16) unsigned char smem_raw[];
  T* sQ = reinterpret_cast<T*>(smem_raw);  // [kBM][kLd]
  T* sK = sQ + Tr::kSmemQ;                 // [2][kBN][kLd]
  T* sV = sK + 2 * Tr::kSmemKV;            // [2][kBN][kLd]

  // Heavier (later, under causal) query tiles first: they finish with the light ones.
  const int m_blocks = (p.Lq + kBM - 1) / kBM;
  const GridTile gt = grid_tile(m_blocks);
  const int m_block = m_blocks - 1 - gt.tile;
  const int b = gt.slice / p.Hq, h = gt.slice % p.Hq, hk = h / p.group;
  const int m0 = m_block * kBM;
  constexpr bool kVarlen = std::is_same_v<Dims, SeqDims>;
  if constexpr (kVarlen) {
    if (m0 >= sd.Lq) return;  // the grid covers the longest sequence: the whole block leaves, before any barrier
  }
  const int tid = threadIdx.x, warp = tid / 32, lane = tid % 32;
  const int g = lane >> 2, t = lane & 3;
  const int row0 = m0 + warp * kMmaM;  // this warp's first query row (of the sequence)

  const T* q_ptr = static_cast<const T*>(p.q) + b * p.q_sb + h * p.q_sh + int64_t(q_row0 + m0) * p.q_sl;
  const T* k_ptr = static_cast<const T*>(p.k) + b * p.k_sb + hk * p.k_sh + int64_t(k_row0) * p.k_sl;
  const T* v_ptr = static_cast<const T*>(p.v) + b * p.v_sb + hk * p.v_sh + int64_t(k_row0) * p.v_sl;
  const char* mask_bh = kHasMask ? mask_head_ptr(p, b, h, p.mask_kind == kMaskBool ? 1 : int(sizeof(T))) : nullptr;

  // -- key tiles this query tile sees: all, or up to the causal diagonal (right window) of its last valid row,
  // from the left window's edge of its first
  int n_end = (sd.Lk + kBN - 1) / kBN;
  if (p.causal) {
    const int j_last = min(m0 + kBM, sd.Lq) - 1 + sd.causal_off;  // last key the tile's last row sees
    n_end = j_last < 0 ? 0 : min(n_end, j_last / kBN + 1);
  }
  int n_begin = 0;
  if (kScoreMods && p.windowed) {
    const int j_first = m0 + p.lo_off;  // first key the tile's first row sees
    n_begin = j_first <= 0 ? 0 : min(n_end, j_first / kBN);
  }
  // softcap and ALiBi change every tile's scores, not only those the band's edges cross
  const bool score_mods = kScoreMods && (p.softcap_log2 != 0.f || p.alibi != nullptr);
  const float slope2 = kScoreMods ? alibi_slope2(p, b, h) : 0.f;
  const uint64_t seed = kDropout ? uint64_t(*p.dropout_seed) : 0;

  float acc_o[kDT][4];
  zero_fragments(acc_o);
  float row_m[2] = {-INFINITY, -INFINITY};  // running max of each of the thread's 2 rows (base 2)
  float row_l[2] = {0.f, 0.f};              // this thread's partial sum of exp2(s - m) (its 2 columns per n8)

  if (n_end > n_begin) {
    // -- prologue: Q and K_{n_begin} (group 0), V_{n_begin} (group 1)
    const int nb0 = n_begin * kBN;
    cp_async_tile<kBM, kD, kLd, kThreads>(sQ, q_ptr, p.q_sl, sd.Lq - m0, tid);
    cp_async_tile<kBN, kD, kLd, kThreads>(sK, k_ptr + int64_t(nb0) * p.k_sl, p.k_sl, sd.Lk - nb0, tid);
    cp_async_commit();
    cp_async_tile<kBN, kD, kLd, kThreads>(sV, v_ptr + int64_t(nb0) * p.v_sl, p.v_sl, sd.Lk - nb0, tid);
    cp_async_commit();
  }

  for (int n = n_begin; n < n_end; ++n) {
    const int buf = (n - n_begin) & 1;
    const int n0 = n * kBN;
    T* sKb = sK + buf * Tr::kSmemKV;
    T* sVb = sV + buf * Tr::kSmemKV;
    // -- prefetch K_{n+1}, V_{n+1} into the other buffer (freed by the barrier that ended step n-1).
    // Two groups are committed every step, possibly empty, so the wait counts below are constant.
    if (n + 1 < n_end) {
      const int n1 = n0 + kBN;
      cp_async_tile<kBN, kD, kLd, kThreads>(sK + (buf ^ 1) * Tr::kSmemKV, k_ptr + int64_t(n1) * p.k_sl, p.k_sl,
                                            sd.Lk - n1, tid);
    }
    cp_async_commit();
    if (n + 1 < n_end) {
      const int n1 = n0 + kBN;
      cp_async_tile<kBN, kD, kLd, kThreads>(sV + (buf ^ 1) * Tr::kSmemKV, v_ptr + int64_t(n1) * p.v_sl, p.v_sl,
                                            sd.Lk - n1, tid);
    }
    cp_async_commit();
    cp_async_wait<3>();  // K_n (and Q) landed; V_n, K_{n+1}, V_{n+1} may be in flight
    __syncthreads();

    // -- S = Q K^T   [16 x kBN] per warp
    float acc_s[kNT][4];
    zero_fragments(acc_s);
#pragma unroll
    for (int kk = 0; kk < kD / 16; ++kk) {
      uint32_t a[4];
      ldmatrix_x4(a, smem_addr(sQ + (warp * kMmaM + (lane & 7) + ((lane >> 3) & 1) * 8) * kLd + kk * 16 +
                               (lane >> 4) * 8));
#pragma unroll
      for (int nt2 = 0; nt2 < kNT / 2; ++nt2) {
        uint32_t bk[4];  // b0, b1 of key tile 2*nt2, then of 2*nt2 + 1
        ldmatrix_x4(bk, smem_addr(sKb + (nt2 * 16 + (lane & 7) + ((lane >> 4) & 1) * 8) * kLd + kk * 16 +
                                  ((lane >> 3) & 1) * 8));
        mma_16816_n16<T>(acc_s[2 * nt2], acc_s[2 * nt2 + 1], a, bk);
      }
    }

    // -- scale, mask (base 2)
    const bool checks = tile_needs_checks<Dims, kScoreMods>(row0, kMmaM, n0, kBN, sd, p);
    if (kHasMask || checks || score_mods) {
      scale_and_mask<T, kHasMask, kNT, Dims, kScoreMods>(acc_s, row0, n0, lane, checks, sd, p, mask_bh, slope2);
    } else {
#pragma unroll
      for (int i = 0; i < kNT; ++i)
#pragma unroll
        for (int e = 0; e < 4; ++e) acc_s[i][e] *= p.scale_log2;
    }

    // -- online softmax update: new max, rescale O and l, P = exp2(S - m)
    online_softmax_step(acc_s, acc_o, row_m, row_l);
    if constexpr (kDropout) {  // after the step: l and lse are the undropped softmax's
      const uint32_t keep = dropout_keep_bits<kNT>(p, seed, b, h, row0, n0, lane);
#pragma unroll
      for (int i = 0; i < kNT; ++i)
#pragma unroll
        for (int e = 0; e < 4; ++e) acc_s[i][e] *= dropout_factor(keep, i, e);
    }

    cp_async_wait<2>();  // V_n landed
    __syncthreads();

    // -- O += P V   [16 x kD] per warp; P's C fragments are the A fragments of this product. With kKeepAcc P
    // goes in as P_hi + P_lo (two MMAs per tile, split2), not P rounded to 8 (bf16) / 11 (fp16) bits: the
    // backward's delta = rowsum(dO * O) must equal rowsum(P * dP) for the float32 P it recomputes, or dq and dk
    // of saturated rows and repeated values (exactly 0) get that rounding times the scale (attention_bwd_rows.cu).
#pragma unroll
    for (int kk = 0; kk < kBN / 16; ++kk) {
      uint32_t a[4], a_lo[4];
      if constexpr (kKeepAcc) {
        split2<T>(acc_s[2 * kk][0], acc_s[2 * kk][1], a[0], a_lo[0]);
        split2<T>(acc_s[2 * kk][2], acc_s[2 * kk][3], a[1], a_lo[1]);
        split2<T>(acc_s[2 * kk + 1][0], acc_s[2 * kk + 1][1], a[2], a_lo[2]);
        split2<T>(acc_s[2 * kk + 1][2], acc_s[2 * kk + 1][3], a[3], a_lo[3]);
      } else {
        a[0] = pack2<T>(acc_s[2 * kk][0], acc_s[2 * kk][1]);
        a[1] = pack2<T>(acc_s[2 * kk][2], acc_s[2 * kk][3]);
        a[2] = pack2<T>(acc_s[2 * kk + 1][0], acc_s[2 * kk + 1][1]);
        a[3] = pack2<T>(acc_s[2 * kk + 1][2], acc_s[2 * kk + 1][3]);
      }
#pragma unroll
      for (int dt2 = 0; dt2 < kDT / 2; ++dt2) {
        uint32_t bv[4];  // b0, b1 of d tile 2*dt2, then of 2*dt2 + 1
        ldmatrix_x4_trans(bv, smem_addr(sVb + (kk * 16 + (lane & 7) + ((lane >> 3) & 1) * 8) * kLd + dt2 * 16 +
                                        (lane >> 4) * 8));
        mma_16816_n16<T>(acc_o[2 * dt2], acc_o[2 * dt2 + 1], a, bv);
        if constexpr (kKeepAcc) {
          mma_16816_n16<T>(acc_o[2 * dt2], acc_o[2 * dt2 + 1], a_lo, bv);
        }
      }
    }
    __syncthreads();  // this step's K/V buffer is free for step n + 2's prefetch (issued at step n + 1)
  }

  // -- epilogue: out = O / l (* sigmoid(gate)), lse = m + log2 l; rows with no key: exactly 0 (not 0 * a NaN
  // value), -inf. A NaN score, which fmaxf drops from m, reaches l through exp2f and makes the row NaN.
  // varlen: the sequence's first row and length are read again here rather than held in registers through the loop
  // (b, h too: from the block index again, not held through the loop)
  const GridTile et = grid_tile(m_blocks);
  const int eb = et.slice / p.Hq, eh = et.slice % p.Hq;
  int Lq = sd.Lq;
  if constexpr (kVarlen) {
    const SeqDims e = seq_dims(p, eb);
    q_row0 = e.q_row0, Lq = e.Lq;
  }
  // out_acc has out's shape and strides; lse is (B, Hq, Lq), or varlen's (Hq, total_q), one matrix for all sequences
  const int64_t o_off = eb * p.o_sb + eh * p.o_sh + int64_t(q_row0) * p.o_sl;
  T* o_ptr = static_cast<T*>(p.out) + o_off;
  float* acc_ptr = kKeepAcc ? p.out_acc + o_off : nullptr;
  const T* gate_ptr =
      p.gate ? static_cast<const T*>(p.gate) + eb * p.g_sb + eh * p.g_sh + int64_t(q_row0) * p.g_si : nullptr;
#pragma unroll
  for (int r = 0; r < 2; ++r) {
    const float l = quad_sum(row_l[r]);
    const int i = row0 + g + 8 * r;
    if (i >= Lq) continue;
    const bool empty = l == 0.f;
    const float inv_l = empty ? 0.f : (kDropout ? p.dropout_scale : 1.f) / l;
    T* o_row = o_ptr + int64_t(i) * p.o_sl;
#pragma unroll
    for (int dt = 0; dt < kDT; ++dt) {
      const int c = dt * 8 + 2 * t;
      float o0 = empty ? 0.f : acc_o[dt][2 * r] * inv_l, o1 = empty ? 0.f : acc_o[dt][2 * r + 1] * inv_l;
      if (gate_ptr) {
        const T* g_row = gate_ptr + int64_t(i) * p.g_si;
        o0 *= sigmoidf(to_float(g_row[int64_t(c) * p.g_sc]));
        o1 *= sigmoidf(to_float(g_row[int64_t(c + 1) * p.g_sc]));
      }
      *reinterpret_cast<uint32_t*>(o_row + c) = pack2<T>(o0, o1);
      if constexpr (kKeepAcc) *reinterpret_cast<float2*>(acc_ptr + int64_t(i) * p.o_sl + c) = make_float2(o0, o1);
    }
    if (t == 0)
      p.lse[(int64_t(kVarlen ? 0 : eb) * p.Hq + eh) * p.lse_sl + q_row0 + i] =
          empty ? -INFINITY : row_m[r] + __log2f(l);
  }
}

// attention_fwd: the block's slice b * Hq + h is of a batch item, whose sizes are the params' own.
template <typename T, int kD, bool kHasMask, bool kKeepAcc, bool kScoreMods, bool kDropout>
__global__ void __launch_bounds__(FwdTraits<kD>::kThreads) attention_fwd_kernel(const AttnParams p) {
  attention_fwd_block<T, kD, kHasMask, kKeepAcc, kScoreMods, kDropout>(p, p, 0, 0);
}

// varlen_attention_fwd: the block's slice b * Hq + h is of packed sequence b (no mask), with its own extent.
template <typename T, int kD, bool kKeepAcc>
__global__ void __launch_bounds__(FwdTraits<kD>::kThreads, FwdTraits<kD>::varlen_min_blocks(kKeepAcc))
    attention_varlen_fwd_kernel(const AttnParams p) {
  constexpr int kBM = FwdTraits<kD>::kBlockM;
  const SeqDims sd = seq_dims(p, grid_tile((p.Lq + kBM - 1) / kBM).slice / p.Hq);
  attention_fwd_block<T, kD, false, kKeepAcc, false, false>(p, sd, sd.q_row0, sd.k_row0);
}

template <int kD, typename Kernel>
cudaError_t launch_attention_fwd(Kernel kernel, const AttnParams& p, cudaStream_t stream) {
  using Tr = FwdTraits<kD>;
  const dim3 grid = tiles_grid((p.Lq + Tr::kBlockM - 1) / Tr::kBlockM, int64_t(p.B) * p.Hq);
  return launch_with_smem(kernel, grid, Tr::kThreads, Tr::kSmemBytes, p, stream);
}

template <int kD>
cudaError_t run_attention_fwd(const AttnParams& p, cudaStream_t stream) {
  return FA_DTYPE_SWITCH(p.is_bf16, T, [&] {
    return FA_BOOL_SWITCH(p.out_acc != nullptr, kKeepAcc, [&] {
      if (p.cu_seqlens_q != nullptr)
        return launch_attention_fwd<kD>(attention_varlen_fwd_kernel<T, kD, kKeepAcc>, p, stream);
      return FA_BOOL_SWITCH(p.mask_kind != kMaskNone, kHasMask, [&] {
        // dropout: kernels of its own, with the score modifiers' code (it runs without modifiers too)
        if (p.dropout)
          return launch_attention_fwd<kD>(attention_fwd_kernel<T, kD, kHasMask, kKeepAcc, true, true>, p, stream);
        return FA_BOOL_SWITCH(has_score_mods(p), kScoreMods, [&] {
          return launch_attention_fwd<kD>(attention_fwd_kernel<T, kD, kHasMask, kKeepAcc, kScoreMods, false>, p,
                                          stream);
        });
      });
    });
  });
}

}  // namespace fastattn::cuda
