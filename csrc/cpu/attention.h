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

#include "attention_contract.h"
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
                              double scale, int64_t causal);

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

// -- masking of the score tile S[bm, bn] (row stride lds) for queries i0.., keys j0..
// Scores are in log2 units (already multiplied by LOG2E), so a float bias is too. Masked -> -inf.
// i0, j0 count from the sequence's first query and key; causal_off is the sequence's (seq_extent).
// mask_tile points at mask[b, h, i0, j0] (unused for kNone).
template <typename scalar_t, typename acc_t>
void mask_score_tile(acc_t* S, int64_t lds, int64_t i0, int64_t bm, int64_t j0, int64_t bn,
                     const AttnParams& s, int64_t causal_off, const void* mask_tile) {
  constexpr acc_t kNegInf = -std::numeric_limits<acc_t>::infinity();
  // Causal masking only where the tile crosses the diagonal.
  const bool cut = s.causal && j0 + bn - 1 > i0 + causal_off;
  if (s.mask_kind == kMaskNone && !cut) return;
  for (int64_t r = 0; r < bm; ++r) {
    acc_t* row = S + r * lds;
    int64_t n_ok = bn;  // keys [0, n_ok) of this tile pass the causal test
    if (cut) {
      n_ok = std::min(bn, std::max<int64_t>(0, i0 + r + causal_off - j0 + 1));
      for (int64_t c = n_ok; c < bn; ++c) row[c] = kNegInf;
    }
    if (s.mask_kind == kMaskBool) {
      const bool* m = static_cast<const bool*>(mask_tile) + r * s.m_si;
      for (int64_t c = 0; c < n_ok; ++c)
        if (!m[c * s.m_sj]) row[c] = kNegInf;
    } else if (s.mask_kind == kMaskBias) {
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
template <typename scalar_t>
const void* mask_ptr(const AttnParams& s, int64_t b, int64_t h, int64_t i, int64_t j) {
  if (s.mask_kind == kMaskNone) return nullptr;
  const int64_t elem = s.mask_kind == kMaskBool ? int64_t(sizeof(bool)) : int64_t(sizeof(scalar_t));
  const int64_t off = b * s.m_sb + h * s.m_sh + i * s.m_si + j * s.m_sj;
  return static_cast<const char*>(s.mask) + off * elem;
}

}  // namespace detail
}  // namespace fastattn::cpu
