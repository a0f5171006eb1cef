// fastattn CPU attention: fused scores -> online softmax -> value weighting -> output gate,
// FlashAttention-2 style (tiled, never an Lq x Lk matrix), forward and backward.
//
// Shapes (B batch, Hq query heads, Hkv kv heads with Hq % Hkv == 0, Lq queries, Lk keys,
// D q/k head dim, Dv v head dim):
//   q     (B, Hq,  Lq, D)    any strides, stride(-1) == 1; float, double, bfloat16 or half
//   k     (B, Hkv, Lk, D)    same; query head h reads kv head h / (Hq / Hkv) (GQA / MQA)
//   v     (B, Hkv, Lk, Dv)   same
//   mask  (B, Hq,  Lq, Lk)   optional, 4-D with each dim 1 or full (size-1 dims are broadcast here),
//                            any strides; bool (true = may attend) or q's dtype (added to scores)
//   gate  (B, Hq,  Lq, Dv)   optional, q's dtype, or (B, Hq, Lq, 1) headwise (read with stride 0 over Dv);
//                            output = attention * sigmoid(gate)
//   out   (B, Hq,  Lq, Dv)   contiguous, q's dtype (the gated output when a gate is given)
//   out_acc                  float32 out before rounding, for bf16 / half q (else empty); the
//                            backward's `out` is this where it exists (delta from the unrounded output)
//   lse   (B, Hq,  Lq)       contiguous, float32 (float64 for double q): log2 of the softmax denominator
//                            of the scores in log2 units (scale * LOG2E * q.k); -inf (and out row 0) for a
//                            row with no key. The backward takes it as it is: no change of base
//   dout  (B, Hq,  Lq, Dv)   any strides, stride(-1) == 1
//   dlse  (B, Hq,  Lq)       optional, lse's dtype
//   dq, dk, dv               contiguous, shapes and dtypes of q, k, v
//   dmask                    dL/d(mask) in the mask's own shape and dtype when need_dmask, else empty:
//                            dS summed over the mask's broadcast dims in acc_t, deterministically
//   dgate                    contiguous, the gate's shape and dtype when a gate is given, else empty; a
//                            headwise gate's gradient is summed over Dv in acc_t
// scale multiplies q.k; causal: 0 none, 1 top_left (key j <= i), 2 bottom_right (j <= i + Lk - Lq).
#pragma once

#include <ATen/ATen.h>

#include <cstdint>
#include <limits>
#include <optional>
#include <tuple>

#include "cpu_utils.h"

namespace fastattn::cpu {

std::tuple<at::Tensor, at::Tensor, at::Tensor> attention_fwd(
    const at::Tensor& q, const at::Tensor& k, const at::Tensor& v,
    const std::optional<at::Tensor>& mask, const std::optional<at::Tensor>& gate,
    double scale, int64_t causal, bool need_acc);

std::tuple<at::Tensor, at::Tensor, at::Tensor, at::Tensor, at::Tensor> attention_bwd(
    const at::Tensor& dout, const at::Tensor& q, const at::Tensor& k, const at::Tensor& v,
    const at::Tensor& out, const at::Tensor& lse,
    const std::optional<at::Tensor>& mask, const std::optional<at::Tensor>& gate,
    const std::optional<at::Tensor>& dlse,
    double scale, int64_t causal, bool need_dmask);

// ---------------------------------------------------------------------------------------------
// Shared by attention_fwd.cpp and attention_bwd.cpp: problem description, boundary checks and
// the masking of one score tile.
// ---------------------------------------------------------------------------------------------
namespace detail {

enum class MaskKind { kNone, kBool, kBias };

// Sizes and element strides (int64) of one attention call; the last dim of every tensor is
// contiguous except the mask's and gate's, whose last strides are given.
struct AttnShape {
  int64_t B, Hq, Hkv, Lq, Lk, D, Dv;
  int64_t group;                          // Hq / Hkv query heads per kv head
  int64_t q_sb, q_sh, q_sl;               // q (B, Hq, Lq, D)
  int64_t k_sb, k_sh, k_sl;               // k (B, Hkv, Lk, D)
  int64_t v_sb, v_sh, v_sl;               // v (B, Hkv, Lk, Dv)
  MaskKind mask_kind;
  int64_t m_sb, m_sh, m_si, m_sj;         // mask (B, Hq, Lq, Lk), 0 on broadcast dims
  bool m_bcast[4];                        // mask dim of size 1 broadcast over B, Hq, Lq, Lk
  bool has_gate, gate_headwise;
  int64_t g_sb, g_sh, g_si, g_sc;         // gate (B, Hq, Lq, Dv)
  bool causal;
  int64_t causal_off;                     // query i sees keys j <= i + causal_off
};

// Validates the inputs (naming the offending argument) and gathers sizes and strides.
AttnShape check_and_describe(const char* op, const at::Tensor& q, const at::Tensor& k, const at::Tensor& v,
                             const std::optional<at::Tensor>& mask, const std::optional<at::Tensor>& gate,
                             int64_t causal);

// -- masking of the score tile S[bm, bn] (row stride lds) for queries i0.., keys j0..
// Scores are in log2 units (already multiplied by LOG2E), so a float bias is too. Masked -> -inf.
// mask_tile points at mask[b, h, i0, j0] (unused for kNone).
template <typename scalar_t, typename acc_t>
void mask_score_tile(acc_t* S, int64_t lds, int64_t i0, int64_t bm, int64_t j0, int64_t bn,
                     const AttnShape& s, const void* mask_tile) {
  constexpr acc_t kNegInf = -std::numeric_limits<acc_t>::infinity();
  // Causal masking only where the tile crosses the diagonal.
  const bool cut = s.causal && j0 + bn - 1 > i0 + s.causal_off;
  if (s.mask_kind == MaskKind::kNone && !cut) return;
  for (int64_t r = 0; r < bm; ++r) {
    acc_t* row = S + r * lds;
    int64_t n_ok = bn;  // keys [0, n_ok) of this tile pass the causal test
    if (cut) {
      n_ok = std::min(bn, std::max<int64_t>(0, i0 + r + s.causal_off - j0 + 1));
      for (int64_t c = n_ok; c < bn; ++c) row[c] = kNegInf;
    }
    if (s.mask_kind == MaskKind::kBool) {
      const bool* m = static_cast<const bool*>(mask_tile) + r * s.m_si;
      for (int64_t c = 0; c < n_ok; ++c)
        if (!m[c * s.m_sj]) row[c] = kNegInf;
    } else if (s.mask_kind == MaskKind::kBias) {
      const scalar_t* m = static_cast<const scalar_t*>(mask_tile) + r * s.m_si;
      const acc_t log2e = acc_t(kLog2e);
      if (s.m_sj == 1) {
        for (int64_t c = 0; c < n_ok; ++c) row[c] += log2e * acc_t(m[c]);
      } else {
        for (int64_t c = 0; c < n_ok; ++c) row[c] += log2e * acc_t(m[c * s.m_sj]);
      }
    }
  }
}

// Pointer to mask[b, h, i, j] (nullptr without a mask).
inline const void* mask_ptr(const at::Tensor* mask, const AttnShape& s, int64_t b, int64_t h, int64_t i, int64_t j) {
  if (s.mask_kind == MaskKind::kNone) return nullptr;
  const int64_t off = b * s.m_sb + h * s.m_sh + i * s.m_si + j * s.m_sj;
  return static_cast<const char*>(mask->data_ptr()) + off * int64_t(mask->element_size());
}

}  // namespace detail
}  // namespace fastattn::cpu
