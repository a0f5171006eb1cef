// Scaling and masking of a score tile held in MMA accumulator fragments (shared by forward and
// backward), and the forward's online-softmax step over it. Scores leave in base-2 units (scale * log2(e) * q.k + log2(e) * bias), -inf where masked.
#pragma once

#include <cmath>

#include "params.h"
#include "ptx.h"

namespace fastattn::cuda {

// Sequence b's extent (attention_contract.h's seq_extent) in the kernels' int sizes: its own for packed sequences
// (varlen) and kv caches. Attention's kernels pass the params themselves where a `Dims` is taken (they hold Lq,
// Lk and causal_off under the same names, the same for every batch item, rows from 0): read from the kernel's
// parameters where used, those cost no register.
struct SeqDims {
  int q_row0, k_row0;  // first rows in q (out, gate, lse) and in k, v
  int Lq, Lk;
  int causal_off;  // query i sees keys j <= i + causal_off (when causal)
};

__device__ __forceinline__ SeqDims seq_dims(const AttnParams& p, int b) {
  const SeqExtent e = seq_extent(p, b);
  return {int(e.q_row0), int(e.k_row0), int(e.Lq), int(e.Lk), int(e.causal_off)};
}

// s[nt][e] is the accumulator of query row0 + g + 8 * (e / 2) and key col0 + 8 * nt + 2t + e % 2
// (g = lane / 4, t = lane % 4: the m16n8 C layout), rows and keys of the sequence sd (SeqDims, or the params:
// see above). check_bounds: the tile reaches past Lk or crosses an edge of the band of keys its rows see
// (tile_needs_checks; interior tiles skip the per-element tests). mask_bh points at mask[b, h, 0, 0] (kHasMask
// only; bool or T by p.mask_kind). The score modifiers of attention_contract.h, in its order: the softcap (p's,
// dcap (or nullptr) gets its derivative 1 - tanh^2 per element), the bias, ALiBi (slope2 = the slope of the
// tile's (b, h) times log2(e)), the window's lower edge; kScoreMods = false compiles them out (the kernels of
// calls without one, has_score_mods: the code cost registers even where it never ran).
template <typename T, bool kHasMask, int kNT, typename Dims, bool kScoreMods = true>
__device__ __forceinline__ void scale_and_mask(float (&s)[kNT][4], int row0, int col0, int lane, bool check_bounds,
                                               const Dims& sd, const AttnParams& p, const char* mask_bh,
                                               float slope2 = 0.f, float (*dcap)[4] = nullptr) {
  const int g = lane >> 2, t = lane & 3;
#pragma unroll
  for (int nt = 0; nt < kNT; ++nt) {
#pragma unroll
    for (int e = 0; e < 4; ++e) {
      const int i = row0 + g + 8 * (e >> 1);
      const int j = col0 + 8 * nt + 2 * t + (e & 1);
      float x = s[nt][e] * p.scale_log2;
      if (kScoreMods && p.softcap_log2 != 0.f) {  // first: the bias is added to the capped score
        const float th = tanhf(x / p.softcap_log2);
        x = p.softcap_log2 * th;
        if (dcap != nullptr) dcap[nt][e] = 1.f - th * th;
      }
      if constexpr (kHasMask) {
        if (i < sd.Lq && j < sd.Lk) {  // the mask view has no element outside (Lq, Lk)
          const int64_t off = int64_t(i) * p.m_si + int64_t(j) * p.m_sj;
          if (p.mask_kind == kMaskBool) {
            if (!reinterpret_cast<const bool*>(mask_bh)[off]) x = -INFINITY;
          } else {
            x += kLog2e * to_float(reinterpret_cast<const T*>(mask_bh)[off]);
          }
        }
      }
      if (kScoreMods && p.alibi != nullptr) x -= slope2 * fabsf(float(i + (sd.Lk - sd.Lq) - j));
      // after the bias: a key the band hides is -inf even where the bias is NaN (as torch's masked_fill)
      if (check_bounds && (j >= sd.Lk || (p.causal && j > i + sd.causal_off) ||
                           (kScoreMods && p.windowed && j < i + p.lo_off)))
        x = -INFINITY;
      s[nt][e] = x;
    }
  }
}

// Whether a key tile [col0, col0 + n) seen by query rows [row0, row0 + m) needs per-element tests (kScoreMods as
// in scale_and_mask).
template <typename Dims, bool kScoreMods = true>
__device__ __forceinline__ bool tile_needs_checks(int row0, int m, int col0, int n, const Dims& sd,
                                                  const AttnParams& p) {
  return col0 + n > sd.Lk || (p.causal && col0 + n - 1 > row0 + sd.causal_off) ||
         (kScoreMods && p.windowed && col0 < row0 + m - 1 + p.lo_off);
}

// ALiBi's slope of (b, h) times log2(e) (the contract's base), 0 without slopes.
__device__ __forceinline__ float alibi_slope2(const AttnParams& p, int b, int h) {
  return p.alibi ? float(kLog2e) * static_cast<const float*>(p.alibi)[b * p.al_sb + h * p.al_sh] : 0.f;
}

// Dropout's keep bits (attention_contract.h's dropout_words) of a score tile in the layout of scale_and_mask, of
// (b, h); col0 a multiple of 8: bit 4 nt + e is element [nt][e], set where the weight is kept. A thread's key pair
// 2t, 2t + 1 of an n8 tile is half of one draw's four keys (j / 4 = col0 / 4 + 2 nt + t / 2), lane t ^ 1's pair the
// other half: each lane of the two draws the words of one of their two rows and hands its partner the half it needs,
// so the quad draws 8 Philox blocks per n8 tile instead of 16.
template <int kNT>
__device__ __forceinline__ uint32_t dropout_keep_bits(const AttnParams& p, uint64_t seed, int b, int h, int row0,
                                                      int col0, int lane) {
  const int g = lane >> 2, t = lane & 3, odd = t & 1;
  uint32_t bits = 0;
#pragma unroll
  for (int nt = 0; nt < kNT; ++nt) {
    // this lane draws row g + 8 odd; it keeps words 2 odd, 2 odd + 1 (its keys') and sends the other two
    const Philox4 w = dropout_words(seed, b, h, row0 + g + 8 * odd, (col0 >> 2) + 2 * nt + (t >> 1));
    const uint32_t own0 = odd ? w.w[2] : w.w[0], own1 = odd ? w.w[3] : w.w[1];
    const uint32_t got0 = __shfl_xor_sync(0xffffffffu, odd ? w.w[0] : w.w[2], 1);
    const uint32_t got1 = __shfl_xor_sync(0xffffffffu, odd ? w.w[1] : w.w[3], 1);
    // element e = 2 r + c: row r, key 2t + c; row odd is the lane's own draw, the other row its partner's
    const uint32_t words[4] = {odd ? got0 : own0, odd ? got1 : own1, odd ? own0 : got0, odd ? own1 : got1};
#pragma unroll
    for (int e = 0; e < 4; ++e) bits |= uint32_t(dropout_kept(p, words[e])) << (4 * nt + e);
  }
  return bits;
}

// Element [nt][e] of a tile's keep bits as a factor, 1 where set, else 0 (a NaN weight times it stays NaN, as
// torch's dropout)
__device__ __forceinline__ float dropout_factor(uint32_t bits, int nt, int e) {
  return (bits >> (4 * nt + e)) & 1u ? 1.f : 0.f;
}

__device__ __forceinline__ const char* mask_head_ptr(const AttnParams& p, int b, int h, int elem_bytes) {
  if (p.mask == nullptr) return nullptr;
  return static_cast<const char*>(p.mask) + (int64_t(b) * p.m_sb + int64_t(h) * p.m_sh) * elem_bytes;
}

// One online-softmax step over a scaled, masked score tile s (base 2, the layout of scale_and_mask) for the warp's
// two accumulator rows: new row max m, P = exp2(s - m) in place, l and the output accumulator o rescaled.
template <int kNT, int kDT>
__device__ __forceinline__ void online_softmax_step(float (&s)[kNT][4], float (&o)[kDT][4], float (&row_m)[2],
                                                    float (&row_l)[2]) {
#pragma unroll
  for (int r = 0; r < 2; ++r) {
    float mx = row_m[r];
#pragma unroll
    for (int i = 0; i < kNT; ++i) mx = fmaxf(mx, fmaxf(s[i][2 * r], s[i][2 * r + 1]));
    mx = quad_max(mx);
    // A row with no allowed key so far keeps m = -inf; shift by 0 instead so exp2 never sees inf - inf.
    const float m_use = mx == -INFINITY ? 0.f : mx;
    const float corr = exp2f(row_m[r] - m_use);  // 0 when the old max was -inf
    row_m[r] = mx;
    float sum = 0.f;
#pragma unroll
    for (int i = 0; i < kNT; ++i) {
      s[i][2 * r] = exp2f(s[i][2 * r] - m_use);
      s[i][2 * r + 1] = exp2f(s[i][2 * r + 1] - m_use);
      sum += s[i][2 * r] + s[i][2 * r + 1];
    }
    row_l[r] = row_l[r] * corr + sum;
#pragma unroll
    for (int i = 0; i < kDT; ++i) {
      o[i][2 * r] *= corr;
      o[i][2 * r + 1] *= corr;
    }
  }
}

}  // namespace fastattn::cuda
