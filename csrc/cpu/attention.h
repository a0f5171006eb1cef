// fastattn CPU attention: fused scores -> online softmax -> value weighting -> output gate,
// FlashAttention-2 style (tiled, never an Lq x Lk matrix), forward and backward, of attention and of
// varlen attention (packed sequences). Shapes, dtypes and outputs: csrc/attention_contract.h. Here q, k,
// v are float, double, bfloat16 or half CPU tensors; statistics and accumulators (acc_t) are float
// (double for double inputs).
#pragma once

#include <ATen/ATen.h>

#include <cstdint>
#include <limits>
#include <optional>
#include <tuple>
#include <utility>

#include "attention_contract.h"
#include "cpu_utils.h"
#include "describe.h"

namespace fastattn::cpu {

std::tuple<at::Tensor, at::Tensor, at::Tensor> attention_fwd(
    const at::Tensor& q, const at::Tensor& k, const at::Tensor& v,
    const std::optional<at::Tensor>& mask, const std::optional<at::Tensor>& gate,
    double scale, int64_t causal, bool need_acc, int64_t window_left, int64_t window_right, double softcap,
    const std::optional<at::Tensor>& alibi_slopes, bool deterministic, double dropout_p,
    const std::optional<at::Tensor>& dropout_seed);

std::tuple<at::Tensor, at::Tensor, at::Tensor, at::Tensor, at::Tensor> attention_bwd(
    const at::Tensor& dout, const at::Tensor& q, const at::Tensor& k, const at::Tensor& v,
    const at::Tensor& out, const at::Tensor& lse,
    const std::optional<at::Tensor>& mask, const std::optional<at::Tensor>& gate,
    const std::optional<at::Tensor>& dlse,
    double scale, int64_t causal, bool need_dmask, int64_t window_left, int64_t window_right, double softcap,
    const std::optional<at::Tensor>& alibi_slopes, bool deterministic, double dropout_p,
    const std::optional<at::Tensor>& dropout_seed);

std::tuple<at::Tensor, at::Tensor, at::Tensor> varlen_attention_fwd(
    const at::Tensor& q, const at::Tensor& k, const at::Tensor& v,
    const at::Tensor& cu_seqlens_q, const at::Tensor& cu_seqlens_k, int64_t max_seqlen_q, int64_t max_seqlen_k,
    const std::optional<at::Tensor>& gate, double scale, int64_t causal, bool need_acc);

std::tuple<at::Tensor, at::Tensor, at::Tensor, at::Tensor> varlen_attention_bwd(
    const at::Tensor& dout, const at::Tensor& q, const at::Tensor& k, const at::Tensor& v,
    const at::Tensor& out, const at::Tensor& lse,
    const at::Tensor& cu_seqlens_q, const at::Tensor& cu_seqlens_k, int64_t max_seqlen_q, int64_t max_seqlen_k,
    const std::optional<at::Tensor>& gate, const std::optional<at::Tensor>& dlse, double scale, int64_t causal);

// Decoding over a kv cache (decode.cpp): returns (out, lse) as attention_fwd, without out_acc.
std::tuple<at::Tensor, at::Tensor> attention_kvcache_fwd(
    const at::Tensor& q, const at::Tensor& k_cache, const at::Tensor& v_cache, const at::Tensor& seqlens_k,
    const std::optional<at::Tensor>& page_table, const std::optional<at::Tensor>& gate, double scale, int64_t causal);

// ---------------------------------------------------------------------------------------------
// Shared by attention_fwd.cpp and attention_bwd.cpp: problem description, output layouts, boundary
// checks and the masking of one score tile. One set of kernels serves attention and varlen attention:
// seq_extent(s, b) gives batch b's first rows, lengths and causal offset (the fixed ones for attention),
// and RowLayout where each output keeps its rows.
// ---------------------------------------------------------------------------------------------
namespace detail {

// One call's sizes, strides and pointers (checked and filled by describe_attention, csrc/describe.h).
using AttnParams = AttentionParams<int64_t, double>;

// Checks the CPU-only requirements (device, dtypes), then describe_attention.
AttnParams check_and_describe(const char* op, const at::Tensor& q, const at::Tensor& k, const at::Tensor& v,
                              const std::optional<at::Tensor>& mask, const std::optional<at::Tensor>& gate,
                              double scale, int64_t causal, const ScoreMods& mods = {}, const Dropout& dropout = {});

// The same for packed sequences (describe_varlen_attention); also checks the values of cu_seqlens, which the
// kernels index with.
AttnParams check_and_describe_varlen(const char* op, const at::Tensor& q, const at::Tensor& k, const at::Tensor& v,
                                     const at::Tensor& cu_seqlens_q, const at::Tensor& cu_seqlens_k,
                                     int64_t max_seqlen_q, int64_t max_seqlen_k,
                                     const std::optional<at::Tensor>& gate, double scale, int64_t causal);

// Where a tensor of per-query (or per-key) rows keeps row i of batch b, head h: element b * sb + h * sh + i * sl,
// with i counted from the tensor's first row (seq_extent's q_row0 / k_row0 included); a row's elements are
// contiguous. Attention's (B, H, L, W) and (B, H, L) tensors: their strides; packed sequences' (total, H, W) and
// (H, total) (varlen lse): sb = 0, every sequence's rows are rows of the one packed tensor.
struct RowLayout {
  int64_t sb, sh, sl;
  int64_t operator()(int64_t b, int64_t h, int64_t i) const { return b * sb + h * sh + i * sl; }
};

// t in attention's layout, or packed: (total, H, W) or (H, total).
inline RowLayout row_layout(const at::Tensor& t, bool packed) {
  if (!packed) return {t.stride(0), t.stride(1), t.stride(2)};
  return t.dim() == 3 ? RowLayout{0, t.stride(1), t.stride(0)} : RowLayout{0, t.stride(0), t.stride(1)};
}

// -- the score modifiers and masking of the score tile S[bm, bn] (row stride lds) for queries i0.., keys j0..
// Scores arrive as scale * log2(e) * q.k and leave as the contract's scores in log2 units (attention_contract.h):
// capped, the float bias and ALiBi added, -inf where the band (causal rule, window) or a bool mask hides a key.
// i0, j0 count from the sequence's first query and key; e is the sequence's extent (seq_extent). mask_tile points
// at mask[b, h, i0, j0] (unused for kNone); slope2 is ALiBi's slope of (b, h) times log2(e) (alibi_slope2).
// tanh_out (or nullptr): where a softcap's tanh(s2 / c2) goes, [bm, bn] with row stride lds (the backward's
// 1 - tanh^2).
template <typename scalar_t, typename acc_t>
void mask_score_tile(acc_t* S, int64_t lds, int64_t i0, int64_t bm, int64_t j0, int64_t bn,
                     const AttnParams& s, const SeqExtent& e, const void* mask_tile, acc_t slope2,
                     acc_t* tanh_out = nullptr) {
  constexpr acc_t kNegInf = -std::numeric_limits<acc_t>::infinity();
  // The band only where the tile crosses one of its edges.
  const bool cut_hi = s.causal && j0 + bn - 1 > i0 + e.causal_off;
  const bool cut_lo = s.windowed && j0 < i0 + bm - 1 + e.lo_off;
  const acc_t cap = acc_t(s.softcap_log2);
  if (s.mask_kind == kMaskNone && !cut_hi && !cut_lo && cap == acc_t(0) && slope2 == acc_t(0)) return;
  const acc_t log2e = acc_t(kLog2e);
  const acc_t inv_cap = cap != acc_t(0) ? acc_t(1) / cap : acc_t(0);
  for (int64_t r = 0; r < bm; ++r) {
    acc_t* row = S + r * lds;
    const int64_t i = i0 + r;
    if (cap != acc_t(0)) {  // first: the bias is added to the capped score
      acc_t* t_row = tanh_out ? tanh_out + r * lds : nullptr;
      for (int64_t c = 0; c < bn; ++c) {
        const acc_t t = std::tanh(row[c] * inv_cap);
        row[c] = cap * t;
        if (t_row) t_row[c] = t;
      }
    }
    // keys [lo, hi) of this tile are in the band
    const int64_t lo = cut_lo ? std::min(bn, std::max<int64_t>(0, i + e.lo_off - j0)) : 0;
    const int64_t hi = cut_hi ? std::max(lo, std::min(bn, i + e.causal_off - j0 + 1)) : bn;
    for (int64_t c = 0; c < lo; ++c) row[c] = kNegInf;
    for (int64_t c = hi; c < bn; ++c) row[c] = kNegInf;
    if (s.mask_kind == kMaskBool) {
      const bool* m = static_cast<const bool*>(mask_tile) + r * s.m_si;
      for (int64_t c = lo; c < hi; ++c)
        if (!m[c * s.m_sj]) row[c] = kNegInf;
    } else if (s.mask_kind == kMaskBias) {
      const scalar_t* m = static_cast<const scalar_t*>(mask_tile) + r * s.m_si;
      if (s.m_sj == 1) {
        for (int64_t c = lo; c < hi; ++c) row[c] += log2e * acc_t(m[c]);
      } else {
        for (int64_t c = lo; c < hi; ++c) row[c] += log2e * acc_t(m[c * s.m_sj]);
      }
    }
    if (slope2 != acc_t(0)) {
      const int64_t d0 = i + e.diag_off - j0;  // the distance to key j0 + c is |d0 - c|
      for (int64_t c = lo; c < hi; ++c) row[c] -= slope2 * acc_t(std::abs(d0 - c));
    }
  }
}

// Dropout of the weight tile P[bm, bn] (row stride ld) of queries i0.., keys j0.. of (b, h): each weight times
// `kept` where dropout keeps it (attention_contract.h's dropout_words, four keys a draw), else times 0 (a NaN
// weight stays NaN, as torch's dropout). Into Z instead when given: Z = kept or 0 (P unread).
template <typename acc_t>
void dropout_tile(acc_t* P, int64_t ld, int64_t b, int64_t h, int64_t i0, int64_t bm, int64_t j0, int64_t bn,
                  const AttnParams& s, acc_t kept, acc_t* Z = nullptr) {
  const int64_t j_end = j0 + bn;
  const uint64_t seed = uint64_t(*s.dropout_seed);
  for (int64_t r = 0; r < bm; ++r) {
    acc_t* out = (Z ? Z : P) + r * ld - j0;  // indexed by key
    const acc_t* in = P + r * ld - j0;
    for (int64_t j4 = j0 / 4; j4 * 4 < j_end; ++j4) {
      const Philox4 w = dropout_words(seed, b, h, i0 + r, j4);
      for (int t = 0; t < 4; ++t) {
        const int64_t j = j4 * 4 + t;
        if (j < j0 || j >= j_end) continue;
        const acc_t f = dropout_kept(s, w.w[t]) ? kept : acc_t(0);
        out[j] = Z ? f : in[j] * f;
      }
    }
  }
}

// ALiBi's slope of (b, h) times log2(e), in the accumulation type (the slopes' dtype); 0 without slopes.
template <typename acc_t>
acc_t alibi_slope2(const AttnParams& s, int64_t b, int64_t h) {
  if (s.alibi == nullptr) return acc_t(0);
  return acc_t(kLog2e) * static_cast<const acc_t*>(s.alibi)[b * s.al_sb + h * s.al_sh];
}

// The band's keys for a block of queries [i0, i0 + bm) (bm >= 1) of sequence e: [begin, end), empty when no key.
inline std::pair<int64_t, int64_t> band_keys(const AttnParams& s, const SeqExtent& e, int64_t i0, int64_t bm) {
  const int64_t begin = s.windowed ? std::min(e.Lk, std::max<int64_t>(0, i0 + e.lo_off)) : 0;
  const int64_t end = s.causal ? std::min(e.Lk, i0 + bm + e.causal_off) : e.Lk;
  return {begin, std::max(begin, end)};
}

// The band's queries for a block of keys [j0, j0 + bn) (bn >= 1): [begin, end).
inline std::pair<int64_t, int64_t> band_queries(const AttnParams& s, const SeqExtent& e, int64_t j0, int64_t bn) {
  const int64_t begin = s.causal ? std::min(e.Lq, std::max<int64_t>(0, j0 - e.causal_off)) : 0;
  const int64_t end = s.windowed ? std::min(e.Lq, std::max<int64_t>(0, j0 + bn - e.lo_off)) : e.Lq;
  return {begin, std::max(begin, end)};
}

// Pointer to mask[b, h, i, j] (nullptr without a mask).
template <typename scalar_t>
const void* mask_ptr(const AttnParams& s, int64_t b, int64_t h, int64_t i, int64_t j) {
  if (s.mask_kind == kMaskNone) return nullptr;
  const int64_t elem = s.mask_kind == kMaskBool ? int64_t(sizeof(bool)) : int64_t(sizeof(scalar_t));
  const int64_t off = b * s.m_sb + h * s.m_sh + i * s.m_si + j * s.m_sj;
  return static_cast<const char*>(s.mask) + off * elem;
}

}  // namespace detail
}  // namespace fastattn::cpu
