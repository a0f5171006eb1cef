// FlashAttention-2 backward on tensor cores (sm_80+): one block per (64-key tile, kv head, batch).
//
// K_j, V_j stay in shared memory and dK_j, dV_j in registers while 64-query tiles of Q and dO stream
// through a double buffer, for every query head of the kv head's GQA group (so dK, dV need no
// atomics). Per query tile, with P recomputed from the saved lse (no Lq x Lk tensor is kept):
//     S = Q K^T, dP = dO V^T          [64 x 64]  warps 4 (rows) x 2 (cols)
//     P = exp2(S - lse), dS = P (dP - delta)      -> shared memory (fp16/bf16; dS also its low part), dmask
//       (dropout: Z regenerated from the seed; P Z to shared memory, dS = P (dP Z - delta))
//     dV += P^T dO, dK += dS^T Q     [64 x D]   A operands via ldmatrix.trans of P, dS
//     dQ += (dS_hi + dS_lo) K        [64 x D]   fp32 atomics into dq_accum (many key tiles add to it), or with
//                                                deterministic, plain adds into the block's own slice of it
// dO is the gated upstream gradient and delta = rowsum(dout * out) - dlse, both made by
// attention_bwd_preprocess (attention_bwd_rows.cu). dK = scale * dS^T Q, dQ = scale * dS K: the
// scale is applied once, at the end.
#pragma once

#include <cuda_bf16.h>
#include <cuda_fp16.h>
#include <cuda_runtime.h>

#include <algorithm>
#include <cmath>

#include "kernel_traits.h"
#include "mask.h"
#include "params.h"
#include "ptx.h"
#include "static_switch.h"

namespace fastattn::cuda {

// dst += v: an atomic add where many blocks add to dst at once, a plain one where this thread alone does
// (kDeterministic: in a fixed order, the same bits every run)
template <bool kDeterministic>
__device__ __forceinline__ void accumulate(float* dst, float v) {
  if constexpr (kDeterministic)
    *dst += v;
  else
    atomicAdd(dst, v);
}

// The work of one key tile (n_block) of kv head hk0 + blockIdx.y, batch b0 + blockIdx.z; dq_slice: this block's
// slice of dq_accum
template <typename T, int kD, bool kHasMask, bool kScoreMods, bool kDeterministic, bool kDropout>
__device__ __forceinline__ void attention_bwd_key_tile(const AttnBwdParams& p, const int n_block, float* dq_slice,
                                                       unsigned char* smem_raw) {
  using Tr = BwdTraits<kD>;
  constexpr int kBM = Tr::kBlockM, kBN = Tr::kBlockN, kLd = Tr::kLd, kLdP = Tr::kLdP, kThreads = Tr::kThreads;
  constexpr int kSCols = kBN / Tr::kWarpsN;  // key columns of S / dP per warp (32)
  constexpr int kNT = kSCols / 8;            // n8 tiles of them (4)
  constexpr int kDCols = kD / Tr::kWarpsN;   // head-dim columns of dK / dV / dQ per warp
  constexpr int kDT = kDCols / 8;            // n8 tiles of them
  static_assert(Tr::kWarpsM * kMmaM == kBM && kBM == kBN, "warps tile the 64 x 64 products 4 x 2");

  T* sK = reinterpret_cast<T*>(smem_raw);  // [kBN][kLd]
  T* sV = sK + kBN * kLd;                  // [kBN][kLd]
  T* sQ = sV + kBN * kLd;                  // [2][kBM][kLd]
  T* sdO = sQ + 2 * kBM * kLd;             // [2][kBM][kLd]
  T* sP = sdO + 2 * kBM * kLd;             // [kBM][kLdP]  queries x keys
  T* sdS = sP + kBM * kLdP;                // [kBM][kLdP]
  T* sdS_lo = sdS + kBM * kLdP;            // [kBM][kLdP]  what rounding dS to T left (split2)

  const int hk = p.hk0 + int(blockIdx.y), b = p.b0 + int(blockIdx.z);
  const int tid = threadIdx.x, warp = tid / 32, lane = tid % 32;
  const int g = lane >> 2, t = lane & 3;
  const int wm = warp % Tr::kWarpsM, wn = warp / Tr::kWarpsM;
  const int n0 = n_block * kBN;

  const T* k_ptr = static_cast<const T*>(p.k) + b * p.k_sb + hk * p.k_sh + int64_t(n0) * p.k_sl;
  const T* v_ptr = static_cast<const T*>(p.v) + b * p.v_sb + hk * p.v_sh + int64_t(n0) * p.v_sl;
  const int mask_bytes = p.mask_kind == kMaskBool ? 1 : int(sizeof(T));
  const uint64_t seed = kDropout ? uint64_t(*p.dropout_seed) : 0;

  // -- query tiles that see this key tile: all, or those from the causal diagonal (right window) on, up to the
  // left window's edge
  int m_begin = 0;
  if (p.causal) {
    const int first_row = n0 - p.causal_off;  // first query row that sees key n0
    m_begin = first_row <= 0 ? 0 : first_row / kBM;
  }
  int m_end = (p.Lq + kBM - 1) / kBM;
  if (kScoreMods && p.windowed) {
    const int last_row = n0 + kBN - 1 - p.lo_off;  // last query row that sees key n0 + kBN - 1
    m_end = last_row < 0 ? 0 : min(m_end, last_row / kBM + 1);
  }
  const int m_tiles = max(0, m_end - m_begin);
  const int steps = p.group * m_tiles;  // (query head of the group, query tile) pairs

  auto q_tile = [&](int step, int& h, int& m0) {
    h = hk * p.group + step / m_tiles;
    m0 = (m_begin + step % m_tiles) * kBM;
  };
  auto load_q_do = [&](int step, int buf) {
    int h, m0;
    q_tile(step, h, m0);
    const T* q = static_cast<const T*>(p.q) + b * p.q_sb + h * p.q_sh + int64_t(m0) * p.q_sl;
    const T* dO = static_cast<const T*>(p.dout) + b * p.do_sb + h * p.do_sh + int64_t(m0) * p.do_sl;
    cp_async_tile<kBM, kD, kLd, kThreads>(sQ + buf * kBM * kLd, q, p.q_sl, p.Lq - m0, tid);
    cp_async_tile<kBM, kD, kLd, kThreads>(sdO + buf * kBM * kLd, dO, p.do_sl, p.Lq - m0, tid);
  };

  float acc_dk[kDT][4], acc_dv[kDT][4];
  zero_fragments(acc_dk);
  zero_fragments(acc_dv);

  if (steps > 0) {
    cp_async_tile<kBN, kD, kLd, kThreads>(sK, k_ptr, p.k_sl, p.Lk - n0, tid);
    cp_async_tile<kBN, kD, kLd, kThreads>(sV, v_ptr, p.v_sl, p.Lk - n0, tid);
    load_q_do(0, 0);
    cp_async_commit();
  }

  for (int step = 0; step < steps; ++step) {
    const int buf = step & 1;
    int h, m0;
    q_tile(step, h, m0);
    const T* sQb = sQ + buf * kBM * kLd;
    const T* sdOb = sdO + buf * kBM * kLd;
    cp_async_wait<0>();  // this step's Q, dO (and at step 0 K, V) landed
    __syncthreads();     // ... for every thread; and step - 1 is done with the other buffer, sP, sdS
    if (step + 1 < steps) load_q_do(step + 1, buf ^ 1);
    cp_async_commit();

    // -- S = Q K^T and dP = dO V^T   [16 x 32] per warp: query rows 16 wm.., key cols 32 wn..
    float acc_s[kNT][4], acc_dp[kNT][4];
    zero_fragments(acc_s);
    zero_fragments(acc_dp);
#pragma unroll
    for (int kk = 0; kk < kD / 16; ++kk) {
      const int a_off = (wm * kMmaM + (lane & 7) + ((lane >> 3) & 1) * 8) * kLd + kk * 16 + (lane >> 4) * 8;
      uint32_t a_q[4], a_do[4];
      ldmatrix_x4(a_q, smem_addr(sQb + a_off));
      ldmatrix_x4(a_do, smem_addr(sdOb + a_off));
#pragma unroll
      for (int nt2 = 0; nt2 < kNT / 2; ++nt2) {
        const int b_off =
            (wn * kSCols + nt2 * 16 + (lane & 7) + ((lane >> 4) & 1) * 8) * kLd + kk * 16 + ((lane >> 3) & 1) * 8;
        uint32_t bk[4], bv[4];
        ldmatrix_x4(bk, smem_addr(sK + b_off));
        ldmatrix_x4(bv, smem_addr(sV + b_off));
        mma_16816_n16<T>(acc_s[2 * nt2], acc_s[2 * nt2 + 1], a_q, bk);
        mma_16816_n16<T>(acc_dp[2 * nt2], acc_dp[2 * nt2 + 1], a_do, bv);
      }
    }

    // -- P = exp2(S - lse), dS = P (dP - delta), lse in log2 units. Rows past Lq and rows with no key
    // (lse = -inf) get lse2 = +inf, hence P = 0 and dS = 0; masked keys (S = -inf) get P = dS = 0 even in
    // a row that a NaN reached.
    const int row0 = m0 + wm * kMmaM;
    const int col0 = n0 + wn * kSCols;
    const int64_t bh = int64_t(b) * p.Hq + h;
    float lse2[2], delta[2];
#pragma unroll
    for (int r = 0; r < 2; ++r) {
      const int i = row0 + g + 8 * r;
      const float lse = i < p.Lq ? p.lse[bh * p.Lq + i] : -INFINITY;
      lse2[r] = lse == -INFINITY ? INFINITY : lse;
      delta[r] = i < p.Lq ? p.delta[bh * p.Lq + i] : 0.f;
    }
    // the sizes the tile is tested against: the params' own (attention alone, no varlen backward here). dcap: the
    // softcap's derivative, for dS past the bias (dmask takes dS before it)
    const bool capped = kScoreMods && p.softcap_log2 != 0.f;
    float dcap[kNT][4];
    scale_and_mask<T, kHasMask, kNT, AttnBwdParams, kScoreMods>(
        acc_s, row0, col0, lane, tile_needs_checks<AttnBwdParams, kScoreMods>(m0, kBM, n0, kBN, p, p), p, p,
        kHasMask ? mask_head_ptr(p, b, h, mask_bytes) : nullptr, kScoreMods ? alibi_slope2(p, b, h) : 0.f,
        kScoreMods ? dcap : nullptr);
    // dropout: the forward's weights were P Z (Z = 0 or 1 / (1 - p)); dP Z is the gradient of P, and dV takes P Z: P
    // times 0 or 1 here, 1 / (1 - p) in the epilogue (P Z itself may be past float16's range where dV is not)
    const uint32_t keep = kDropout ? dropout_keep_bits<kNT>(p, seed, b, h, row0, col0, lane) : 0u;
    T* dmask_bh = p.dmask ? static_cast<T*>(p.dmask) + bh * p.Lq * p.Lk : nullptr;
    float* dmask_acc_bh = p.dmask_accum ? p.dmask_accum + b * p.dm_sb + h * p.dm_sh : nullptr;
#pragma unroll
    for (int nt = 0; nt < kNT; ++nt) {
#pragma unroll
      for (int r = 0; r < 2; ++r) {
        const bool masked0 = acc_s[nt][2 * r] == -INFINITY, masked1 = acc_s[nt][2 * r + 1] == -INFINITY;
        const float p0 = masked0 ? 0.f : exp2f(acc_s[nt][2 * r] - lse2[r]);
        const float p1 = masked1 ? 0.f : exp2f(acc_s[nt][2 * r + 1] - lse2[r]);
        const float k0 = kDropout ? dropout_factor(keep, nt, 2 * r) : 1.f;
        const float k1 = kDropout ? dropout_factor(keep, nt, 2 * r + 1) : 1.f;
        const float z = kDropout ? p.dropout_scale : 1.f;
        const float ds0 = masked0 ? 0.f : p0 * (acc_dp[nt][2 * r] * (k0 * z) - delta[r]);
        const float ds1 = masked1 ? 0.f : p1 * (acc_dp[nt][2 * r + 1] * (k1 * z) - delta[r]);
        const int sr = wm * kMmaM + g + 8 * r, sc = wn * kSCols + nt * 8 + 2 * t;  // tile coordinates
        *reinterpret_cast<uint32_t*>(sP + sr * kLdP + sc) = pack2<T>(p0 * k0, p1 * k1);
        split2<T>(capped ? ds0 * dcap[nt][2 * r] : ds0, capped ? ds1 * dcap[nt][2 * r + 1] : ds1,
                  *reinterpret_cast<uint32_t*>(sdS + sr * kLdP + sc),
                  *reinterpret_cast<uint32_t*>(sdS_lo + sr * kLdP + sc));
        if (dmask_bh != nullptr) {  // dL/dscore = dS, for a float mask that wants its gradient
          const int i = m0 + sr, j = n0 + sc;
          if (i < p.Lq) {
            T* d = dmask_bh + int64_t(i) * p.Lk + j;
            if (j < p.Lk) d[0] = from_float<T>(ds0);
            if (j + 1 < p.Lk) d[1] = from_float<T>(ds1);
          }
        } else if (dmask_acc_bh != nullptr) {  // broadcast: summed in float32, rounded once (by the caller)
          const int i = m0 + sr, j = n0 + sc;
          if (i < p.Lq) {
            float* d = dmask_acc_bh + int64_t(i) * p.dm_si + int64_t(j) * p.dm_sj;
            if (j < p.Lk && ds0 != 0.f) accumulate<kDeterministic>(d, ds0);  // masked entries add nothing
            if (j + 1 < p.Lk && ds1 != 0.f) accumulate<kDeterministic>(d + p.dm_sj, ds1);
          }
        }
      }
    }
    __syncthreads();  // sP, sdS complete

    // -- dV += P^T dO, dK += dS^T Q   [16 x kDCols] per warp: key rows 16 wm.., d cols kDCols wn..
#pragma unroll
    for (int kk = 0; kk < kBM / 16; ++kk) {
      // A = P^T (keys x queries): .trans of the [query][key] tile; rows q, cols key
      const int a_off = (kk * 16 + (lane & 7) + ((lane >> 4) & 1) * 8) * kLdP + wm * kMmaM + ((lane >> 3) & 1) * 8;
      uint32_t a_p[4], a_ds[4];
      ldmatrix_x4_trans(a_p, smem_addr(sP + a_off));
      ldmatrix_x4_trans(a_ds, smem_addr(sdS + a_off));
#pragma unroll
      for (int dt2 = 0; dt2 < kDT / 2; ++dt2) {
        // B = dO or Q (queries x d), k-major in shared memory: .trans
        const int b_off = (kk * 16 + (lane & 7) + ((lane >> 3) & 1) * 8) * kLd + wn * kDCols + dt2 * 16 + (lane >> 4) * 8;
        uint32_t b_do[4], b_q[4];
        ldmatrix_x4_trans(b_do, smem_addr(sdOb + b_off));
        ldmatrix_x4_trans(b_q, smem_addr(sQb + b_off));
        mma_16816_n16<T>(acc_dv[2 * dt2], acc_dv[2 * dt2 + 1], a_p, b_do);
        mma_16816_n16<T>(acc_dk[2 * dt2], acc_dk[2 * dt2 + 1], a_ds, b_q);
      }
    }

    // -- dQ += dS K   [16 x kDCols] per warp: query rows 16 wm.., d cols kDCols wn.. dS goes in as dS_hi +
    // dS_lo (two MMAs per tile): rowsum(dS) = 0 holds to float32 rounding, and dq = scale * sum_j dS_ij k_j
    // keeps it where it matters (every key the same: dq exactly 0) only if dS is not rounded to 8 (bf16) /
    // 11 (fp16) bits first. dK takes dS_hi alone, as FlashAttention (no such cancellation along queries).
    {
      float acc_dq[kDT][4];
      zero_fragments(acc_dq);
#pragma unroll
      for (int kk = 0; kk < kBN / 16; ++kk) {
        uint32_t a[4], a_lo[4];
        const int a_off = (wm * kMmaM + (lane & 7) + ((lane >> 3) & 1) * 8) * kLdP + kk * 16 + (lane >> 4) * 8;
        ldmatrix_x4(a, smem_addr(sdS + a_off));
        ldmatrix_x4(a_lo, smem_addr(sdS_lo + a_off));
#pragma unroll
        for (int dt2 = 0; dt2 < kDT / 2; ++dt2) {
          uint32_t bk[4];
          ldmatrix_x4_trans(bk, smem_addr(sK + (kk * 16 + (lane & 7) + ((lane >> 3) & 1) * 8) * kLd + wn * kDCols +
                                          dt2 * 16 + (lane >> 4) * 8));
          mma_16816_n16<T>(acc_dq[2 * dt2], acc_dq[2 * dt2 + 1], a, bk);
          mma_16816_n16<T>(acc_dq[2 * dt2], acc_dq[2 * dt2 + 1], a_lo, bk);
        }
      }
      float* dq = dq_slice + bh * p.Lq * kD;
#pragma unroll
      for (int r = 0; r < 2; ++r) {
        const int i = row0 + g + 8 * r;
        if (i >= p.Lq) continue;
#pragma unroll
        for (int dt = 0; dt < kDT; ++dt) {
          float* d = dq + int64_t(i) * kD + wn * kDCols + dt * 8 + 2 * t;
          accumulate<kDeterministic>(d, acc_dq[dt][2 * r]);
          accumulate<kDeterministic>(d + 1, acc_dq[dt][2 * r + 1]);
        }
      }
    }
  }

  // -- epilogue: dK = scale * acc_dk, dV = acc_dv (times 1 / (1 - p) with dropout; zero for a key tile no query sees)
  const float dv_scale = kDropout ? p.dropout_scale : 1.f;
  const int64_t kv_row0 = (int64_t(b) * p.Hkv + hk) * p.Lk;
  T* dk = static_cast<T*>(p.dk);
  T* dv = static_cast<T*>(p.dv);
#pragma unroll
  for (int r = 0; r < 2; ++r) {
    const int j = n0 + wm * kMmaM + g + 8 * r;
    if (j >= p.Lk) continue;
#pragma unroll
    for (int dt = 0; dt < kDT; ++dt) {
      const int64_t off = (kv_row0 + j) * kD + wn * kDCols + dt * 8 + 2 * t;
      *reinterpret_cast<uint32_t*>(dk + off) = pack2<T>(acc_dk[dt][2 * r] * p.scale, acc_dk[dt][2 * r + 1] * p.scale);
      *reinterpret_cast<uint32_t*>(dv + off) = pack2<T>(acc_dv[dt][2 * r] * dv_scale, acc_dv[dt][2 * r + 1] * dv_scale);
    }
  }
}

// kDeterministic: its own kernels (the loop and plain adds, compiled into every kernel, cost the others up to 58
// registers), with the score modifiers' code in all of them (it runs without modifiers too)
template <typename T, int kD, bool kHasMask, bool kScoreMods, bool kDeterministic, bool kDropout>
__global__ void __launch_bounds__(BwdTraits<kD>::kThreads) attention_bwd_kernel(const AttnBwdParams p) {
  extern __shared__ __align__(16) unsigned char smem_raw[];
  if constexpr (kDeterministic) {
    const int n_blocks = (p.Lk + BwdTraits<kD>::kBlockN - 1) / BwdTraits<kD>::kBlockN;
    float* dq_slice = p.dq_accum + int64_t(blockIdx.x) * p.B * p.Hq * p.Lq * kD;
    for (int n_block = blockIdx.x; n_block < n_blocks; n_block += gridDim.x) {
      if (n_block != int(blockIdx.x)) __syncthreads();  // the last tile's reads of shared memory are done
      attention_bwd_key_tile<T, kD, kHasMask, kScoreMods, true, kDropout>(p, n_block, dq_slice, smem_raw);
    }
  } else {
    attention_bwd_key_tile<T, kD, kHasMask, kScoreMods, false, kDropout>(p, blockIdx.x, p.dq_accum, smem_raw);
  }
}

// One block per (key tile, kv head, batch) on the grid's x, y and z axes (deterministic: dq_splits blocks per (kv
// head, batch), each over every dq_splits-th key tile): b and hk are blockIdx values, uniform
// registers. Taken from one flattened axis instead (as the forward's tiles_grid does), the divisions put them and
// every address made from them in per-thread registers (bf16 D 128 on sm_90a: 181 registers instead of 176), and an
// H200 ran that form 4-9% slower. Past 65535 kv heads or batches (the y and z bound) it takes several launches.
template <typename T, int kD, bool kHasMask, bool kScoreMods, bool kDeterministic, bool kDropout>
cudaError_t launch_attention_bwd(const AttnBwdParams& p, cudaStream_t stream) {
  using Tr = BwdTraits<kD>;
  constexpr int kAxis = 65535;
  AttnBwdParams part = p;
  for (part.b0 = 0; part.b0 < p.B; part.b0 += kAxis)
    for (part.hk0 = 0; part.hk0 < p.Hkv; part.hk0 += kAxis) {
      const dim3 grid(kDeterministic ? p.dq_splits : (p.Lk + Tr::kBlockN - 1) / Tr::kBlockN,
                      std::min(p.Hkv - part.hk0, kAxis),
                      std::min(p.B - part.b0, kAxis));
      const cudaError_t err =
          launch_with_smem(attention_bwd_kernel<T, kD, kHasMask, kScoreMods, kDeterministic, kDropout>, grid,
                           Tr::kThreads, Tr::kSmemBytes, part, stream);
      if (err != cudaSuccess) return err;
    }
  return cudaSuccess;
}

// preprocess (delta, gated dO, dgate) -> main kernel -> dq = scale * dq_accum
template <int kD>
cudaError_t run_attention_bwd(const AttnBwdParams& params, cudaStream_t stream) {
  cudaError_t err = attention_bwd_preprocess(params, stream);
  if (err != cudaSuccess) return err;
  AttnBwdParams p = params;
  if (p.gate != nullptr) {  // the main kernel reads the gated dO that the preprocess wrote
    p.dout = p.do_gated;
    p.do_sl = p.D;
    p.do_sh = int64_t(p.Lq) * p.D;
    p.do_sb = int64_t(p.Hq) * p.Lq * p.D;
  }
  err = FA_DTYPE_SWITCH(p.is_bf16, T, [&] {
    return FA_BOOL_SWITCH(p.mask_kind != kMaskNone, kHasMask, [&] {
      // deterministic and dropout: kernels of their own, with the score modifiers' code
      if (p.dropout)
        return FA_BOOL_SWITCH(p.deterministic, kDeterministic, [&] {
          return launch_attention_bwd<T, kD, kHasMask, true, kDeterministic, true>(p, stream);
        });
      if (p.deterministic) return launch_attention_bwd<T, kD, kHasMask, true, true, false>(p, stream);
      return FA_BOOL_SWITCH(has_score_mods(p), kScoreMods, [&] {
        return launch_attention_bwd<T, kD, kHasMask, kScoreMods, false, false>(p, stream);
      });
    });
  });
  if (err != cudaSuccess) return err;
  return attention_bwd_convert_dq(p, stream);
}

}  // namespace fastattn::cuda
