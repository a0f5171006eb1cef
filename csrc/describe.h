// Tensors -> the contract's params (attention_contract.h), for every C++ backend: the one place that
// checks an attention call's shapes and dtypes and reads its sizes, strides and pointers. Each backend
// first checks what only it requires (device type, the dtypes it covers), then calls this. Also the
// tensor helpers both backends' bindings share.
#pragma once

#include <ATen/ATen.h>

#include <cmath>
#include <cstdint>
#include <optional>

#include "attention_contract.h"

namespace fastattn {

// t with stride(-1) == 1, copied only when it lacks it (what every kernel needs of its rows).
inline at::Tensor last_dim_contiguous(const at::Tensor& t) { return t.stride(-1) == 1 ? t : t.contiguous(); }

// The score modifiers of attention_fwd / attention_bwd (attention_contract.h): the schemas' window_left,
// window_right, softcap and alibi_slopes. The defaults change nothing.
struct ScoreMods {
  int64_t window_left = -1, window_right = -1;
  double softcap = 0.0;
  std::optional<at::Tensor> alibi_slopes;
};

// Dropout on the attention weights (attention_contract.h): the schemas' dropout_p and dropout_seed.
struct Dropout {
  double p = 0.0;
  std::optional<at::Tensor> seed;
};

// Fills p from q, k, v, mask, gate and the score modifiers (names the offending argument in every error; `op`
// prefixes the message). Every given tensor must be on q's device and have q's dtype (a mask may be bool; ALiBi
// slopes have the statistics' dtype).
template <typename Index, typename Real>
void describe_attention(AttentionParams<Index, Real>& p, const char* op, const at::Tensor& q, const at::Tensor& k,
                        const at::Tensor& v, const std::optional<at::Tensor>& mask,
                        const std::optional<at::Tensor>& gate, double scale, int64_t causal,
                        const ScoreMods& mods = {}, const Dropout& dropout = {}) {
  TORCH_CHECK(q.dim() == 4, op, ": q must be (B, Hq, Lq, D), got ", q.sizes());
  TORCH_CHECK(k.dim() == 4, op, ": k must be (B, Hkv, Lk, D), got ", k.sizes());
  TORCH_CHECK(v.dim() == 4, op, ": v must be (B, Hkv, Lk, Dv), got ", v.sizes());
  auto check_device = [&](const at::Tensor& t, const char* name) {
    TORCH_CHECK(t.device() == q.device(), op, ": ", name, " must be on q's device ", q.device(), ", got ",
                t.device());
  };
  check_device(k, "k");
  check_device(v, "v");
  const auto dt = q.scalar_type();
  TORCH_CHECK(k.scalar_type() == dt && v.scalar_type() == dt, op, ": k and v must have q's dtype ", dt,
              ", got k ", k.scalar_type(), " and v ", v.scalar_type());
  const int64_t B = q.size(0), Hq = q.size(1), Lq = q.size(2), D = q.size(3);
  const int64_t Hkv = k.size(1), Lk = k.size(2), Dv = v.size(3);
  TORCH_CHECK(k.size(0) == B && v.size(0) == B, op, ": batch of k ", k.size(0), " and v ", v.size(0),
              " must equal q's ", B);
  TORCH_CHECK(Hkv > 0 && Hq % Hkv == 0, op, ": query heads ", Hq, " must be a multiple of kv heads ", Hkv);
  TORCH_CHECK(v.size(1) == Hkv, op, ": v has ", v.size(1), " heads, k has ", Hkv);
  TORCH_CHECK(k.size(3) == D, op, ": k head dim ", k.size(3), " must equal q's ", D);
  TORCH_CHECK(v.size(2) == Lk, op, ": v length ", v.size(2), " must equal k's ", Lk);
  TORCH_CHECK(q.stride(3) == 1 || D <= 1, op, ": q must have stride(-1) == 1");
  TORCH_CHECK(k.stride(3) == 1 || D <= 1, op, ": k must have stride(-1) == 1");
  TORCH_CHECK(v.stride(3) == 1 || Dv <= 1, op, ": v must have stride(-1) == 1");
  TORCH_CHECK(causal >= kCausalNone && causal <= kCausalBottomRight, op,
              ": causal must be 0, 1 (top_left) or 2 (bottom_right), got ", causal);
  p.q = q.data_ptr();
  p.k = k.data_ptr();
  p.v = v.data_ptr();
  p.q_sb = q.stride(0), p.q_sh = q.stride(1), p.q_sl = q.stride(2);
  p.k_sb = k.stride(0), p.k_sh = k.stride(1), p.k_sl = k.stride(2);
  p.v_sb = v.stride(0), p.v_sh = v.stride(1), p.v_sl = v.stride(2);
  p.B = Index(B), p.Hq = Index(Hq), p.Hkv = Index(Hkv), p.Lq = Index(Lq), p.Lk = Index(Lk);
  p.D = Index(D), p.Dv = Index(Dv), p.group = Index(Hq / Hkv);
  TORCH_CHECK(mods.window_left >= -1 && mods.window_right >= -1, op,
              ": window_left and window_right must be >= -1 (-1: unbounded), got ", mods.window_left, " and ",
              mods.window_right);
  TORCH_CHECK(std::isfinite(mods.softcap) && mods.softcap >= 0.0, op,
              ": softcap must be finite and >= 0 (0: none), got ", mods.softcap);
  const KeyBand band = key_band(Lq, Lk, int(causal), mods.window_left, mods.window_right);
  p.causal = band.has_hi;
  p.causal_mode = int(causal);
  p.causal_off = Index(band.hi_off);
  p.windowed = band.has_lo;
  p.lo_off = Index(band.lo_off);
  p.cu_seqlens_q = p.cu_seqlens_k = p.seqlens_k = p.page_table = nullptr;
  p.pt_sb = 0;
  p.page_size = 0;
  p.scale = Real(scale);
  p.scale_log2 = Real(scale * kLog2e);
  p.softcap_log2 = Real(mods.softcap * kLog2e);
  TORCH_CHECK(dropout.p >= 0.0 && dropout.p <= 1.0, op, ": dropout_p must be in [0, 1], got ", dropout.p);
  p.dropout = dropout.p > 0.0;
  p.dropout_seed = nullptr;
  p.dropout_threshold = 0;
  p.dropout_scale = Real(1);
  if (p.dropout) {
    const bool has_seed = dropout.seed.has_value() && dropout.seed->defined();
    TORCH_CHECK(has_seed && dropout.seed->scalar_type() == at::kLong && dropout.seed->numel() == 1, op,
                ": dropout_p > 0 needs dropout_seed, an int64 tensor of one element, got ",
                has_seed ? dropout.seed->toString() + " of shape " + c10::str(dropout.seed->sizes()) : "none");
    check_device(*dropout.seed, "dropout_seed");
    p.dropout_seed = dropout.seed->data_ptr<int64_t>();
    // floor(p * 2^32), exact in double; p = 1 gives 2^32, which no 32-bit word reaches
    p.dropout_threshold = uint64_t(std::ldexp(dropout.p, 32));
    p.dropout_scale = dropout.p < 1.0 ? Real(1.0 / (1.0 - dropout.p)) : Real(0);
  }
  p.alibi = nullptr;
  p.al_sb = p.al_sh = 0;
  if (mods.alibi_slopes.has_value() && mods.alibi_slopes->defined()) {
    const at::Tensor& a = *mods.alibi_slopes;
    check_device(a, "alibi_slopes");
    const auto acc = dt == at::kDouble ? at::kDouble : at::kFloat;
    TORCH_CHECK(a.scalar_type() == acc, op, ": alibi_slopes must be ", acc, " (the statistics' dtype) for ", dt,
                " inputs, got ", a.scalar_type());
    TORCH_CHECK((a.dim() == 1 && a.size(0) == Hq) || (a.dim() == 2 && a.size(0) == B && a.size(1) == Hq), op,
                ": alibi_slopes must be (Hq) = (", Hq, ") or (B, Hq) = (", B, ", ", Hq, "), got ", a.sizes());
    p.alibi = a.data_ptr();
    p.al_sb = a.dim() == 2 ? a.stride(0) : 0;
    p.al_sh = a.stride(-1);
  }

  p.mask = nullptr;
  p.mask_kind = kMaskNone;
  p.m_sb = p.m_sh = p.m_si = p.m_sj = 0;
  for (bool& b : p.mask_bcast) b = false;
  if (mask.has_value() && mask->defined()) {
    const at::Tensor& m = *mask;
    check_device(m, "attn_mask");
    const int64_t full[4] = {B, Hq, Lq, Lk};
    bool ok = m.dim() == 4;
    for (int d = 0; ok && d < 4; ++d) ok = m.size(d) == full[d] || m.size(d) == 1;
    TORCH_CHECK(ok, op, ": attn_mask must be 4-D with each dim 1 or that of (B, Hq, Lq, Lk) = (", B, ", ", Hq,
                ", ", Lq, ", ", Lk, "), got ", m.sizes());
    TORCH_CHECK(m.scalar_type() == at::kBool || m.scalar_type() == dt, op, ": attn_mask must be bool or q's dtype ",
                dt, ", got ", m.scalar_type());
    p.mask = m.data_ptr();
    p.mask_kind = m.scalar_type() == at::kBool ? kMaskBool : kMaskBias;
    int64_t* strides[4] = {&p.m_sb, &p.m_sh, &p.m_si, &p.m_sj};
    for (int d = 0; d < 4; ++d) {
      p.mask_bcast[d] = m.size(d) == 1 && full[d] != 1;
      *strides[d] = m.size(d) == 1 ? 0 : m.stride(d);  // a size-1 dim is read at index 0 for every index
    }
  }
  p.gate = nullptr;
  p.gate_headwise = false;
  p.g_sb = p.g_sh = p.g_si = p.g_sc = 0;
  if (gate.has_value() && gate->defined()) {
    const at::Tensor& g = *gate;
    check_device(g, "gate");
    TORCH_CHECK(g.dim() == 4 && g.size(0) == B && g.size(1) == Hq && g.size(2) == Lq &&
                    (g.size(3) == Dv || g.size(3) == 1),
                op, ": gate must be (B, Hq, Lq, Dv) = (", B, ", ", Hq, ", ", Lq, ", ", Dv,
                ") or headwise (B, Hq, Lq, 1), got ", g.sizes());
    TORCH_CHECK(g.scalar_type() == dt, op, ": gate must have q's dtype ", dt, ", got ", g.scalar_type());
    p.gate = g.data_ptr();
    p.gate_headwise = g.size(3) == 1 && Dv != 1;
    p.g_sb = g.stride(0), p.g_sh = g.stride(1), p.g_si = g.stride(2), p.g_sc = g.size(3) == 1 ? 0 : g.stride(3);
  }
}

// An int32 index tensor of the varlen and kv-cache ops: on q's device, `ndim`-D, contiguous rows.
inline const int32_t* index_tensor(const char* op, const at::Tensor& t, const at::Tensor& q, const char* name,
                                   int64_t ndim) {
  TORCH_CHECK(t.device() == q.device(), op, ": ", name, " must be on q's device ", q.device(), ", got ", t.device());
  TORCH_CHECK(t.scalar_type() == at::kInt, op, ": ", name, " must be int32, got ", t.scalar_type());
  TORCH_CHECK(t.dim() == ndim, op, ": ", name, " must be ", ndim, "-D, got shape ", t.sizes());
  TORCH_CHECK(t.numel() == 0 || t.stride(-1) == 1, op, ": ", name, " must have stride(-1) == 1");
  TORCH_CHECK(ndim == 1 || t.numel() == 0 || t.stride(0) >= t.size(1), op, ": ", name, " rows must not overlap");
  return t.data_ptr<int32_t>();
}

// (total, H, D) seen as (1, H, total, D): the packed layout through describe_attention's checks.
inline at::Tensor packed_as_4d(const at::Tensor& t) { return t.dim() == 3 ? t.transpose(0, 1).unsqueeze(0) : t; }

// varlen_attention (attention_contract.h): q (total_q, Hq, D), k (total_k, Hkv, D), v (total_k, Hkv, Dv),
// gate (total_q, Hq, Dv or 1), cu_seqlens (B + 1). The values of cu_seqlens are not read here (they may live on
// a GPU): fastattn.varlen_attention checks them.
template <typename Index, typename Real>
void describe_varlen_attention(AttentionParams<Index, Real>& p, const char* op, const at::Tensor& q,
                               const at::Tensor& k, const at::Tensor& v, const at::Tensor& cu_seqlens_q,
                               const at::Tensor& cu_seqlens_k, int64_t max_seqlen_q, int64_t max_seqlen_k,
                               const std::optional<at::Tensor>& gate, double scale, int64_t causal) {
  TORCH_CHECK(q.dim() == 3, op, ": q must be (total_q, Hq, D), got ", q.sizes());
  TORCH_CHECK(k.dim() == 3, op, ": k must be (total_k, Hkv, D), got ", k.sizes());
  TORCH_CHECK(v.dim() == 3, op, ": v must be (total_k, Hkv, Dv), got ", v.sizes());
  TORCH_CHECK(!gate.has_value() || !gate->defined() || gate->dim() == 3, op,
              ": gate must be (total_q, Hq, Dv) or (total_q, Hq, 1), got ", gate->sizes());
  std::optional<at::Tensor> gate4;
  if (gate.has_value() && gate->defined()) gate4 = packed_as_4d(*gate);
  describe_attention(p, op, packed_as_4d(q), packed_as_4d(k), packed_as_4d(v), std::nullopt, gate4, scale, causal);
  p.cu_seqlens_q = index_tensor(op, cu_seqlens_q, q, "cu_seqlens_q", 1);
  p.cu_seqlens_k = index_tensor(op, cu_seqlens_k, q, "cu_seqlens_k", 1);
  TORCH_CHECK(cu_seqlens_q.numel() >= 1 && cu_seqlens_k.numel() == cu_seqlens_q.numel(), op,
              ": cu_seqlens_q and cu_seqlens_k must both have B + 1 >= 1 entries, got ", cu_seqlens_q.numel(),
              " and ", cu_seqlens_k.numel());
  TORCH_CHECK(max_seqlen_q >= 0 && max_seqlen_k >= 0, op, ": max_seqlen_q and max_seqlen_k must be >= 0, got ",
              max_seqlen_q, " and ", max_seqlen_k);
  p.B = Index(cu_seqlens_q.numel() - 1);
  p.Lq = Index(max_seqlen_q), p.Lk = Index(max_seqlen_k);
  p.q_sb = p.k_sb = p.v_sb = p.g_sb = 0;
  p.causal_off = 0;  // per sequence: seq_extent
}

// attention_kvcache (attention_contract.h): q (B, Hq, Lq, D); k_cache, v_cache (B, Hkv, Lcache, D / Dv) or, with a
// page_table (B, max_pages), paged (num_pages, Hkv, page_size, D / Dv); seqlens_k (B). As for varlen, index
// values are checked by fastattn.attention_with_kvcache.
template <typename Index, typename Real>
void describe_kvcache_attention(AttentionParams<Index, Real>& p, const char* op, const at::Tensor& q,
                                const at::Tensor& k_cache, const at::Tensor& v_cache, const at::Tensor& seqlens_k,
                                const std::optional<at::Tensor>& page_table, const std::optional<at::Tensor>& gate,
                                double scale, int64_t causal) {
  TORCH_CHECK(causal != kCausalTopLeft, op, ": causal must be 0 (none) or 2 (bottom_right) over a kv cache, got 1");
  const bool paged = page_table.has_value() && page_table->defined();
  TORCH_CHECK(q.dim() == 4 && k_cache.dim() == 4 && v_cache.dim() == 4, op,
              ": q, k_cache and v_cache must be 4-D, got ", q.sizes(), ", ", k_cache.sizes(), ", ", v_cache.sizes());
  const int64_t B = q.size(0);
  if (!paged) {
    describe_attention(p, op, q, k_cache, v_cache, std::nullopt, gate, scale, causal);
  } else {
    TORCH_CHECK(k_cache.size(0) == v_cache.size(0), op, ": k_cache has ", k_cache.size(0), " pages, v_cache ",
                v_cache.size(0));
    TORCH_CHECK(k_cache.size(0) > 0, op, ": a paged k_cache needs at least one page");
    // one page per sequence, as a (B, Hkv, page_size, D) cache, through the shared checks
    describe_attention(p, op, q, k_cache.narrow(0, 0, 1).expand({B, -1, -1, -1}),
                       v_cache.narrow(0, 0, 1).expand({B, -1, -1, -1}), std::nullopt, gate, scale, causal);
    p.page_table = index_tensor(op, *page_table, q, "page_table", 2);
    TORCH_CHECK(page_table->size(0) == B, op, ": page_table must have B = ", B, " rows, got ", page_table->size(0));
    p.pt_sb = page_table->stride(0);
    p.page_size = Index(k_cache.size(2));
    p.k = k_cache.data_ptr(), p.v = v_cache.data_ptr();
    p.k_sb = k_cache.stride(0), p.v_sb = v_cache.stride(0);
    p.Lk = Index(page_table->size(1) * k_cache.size(2));
  }
  p.seqlens_k = index_tensor(op, seqlens_k, q, "seqlens_k", 1);
  TORCH_CHECK(seqlens_k.numel() == B, op, ": seqlens_k must have B = ", B, " entries, got ", seqlens_k.numel());
  p.causal_off = 0;  // per sequence: seq_extent
}

// ------------------------------------------------------------------------------------------ softmax gates
// The checks of one gate call (attention_contract.h has the shapes), shared by the C++ backends: each names the
// argument, requires x's device, and x's dtype where the contract does. Backends check first what only they
// require (device type, the dtypes they cover).

// The number of heads H, read from scores or alpha (B, N, H), or from weight (H, D) when is_weight.
inline int64_t gate_num_heads(const char* op, const at::Tensor& t, const char* name, bool is_weight) {
  TORCH_CHECK(t.dim() == (is_weight ? 2 : 3), op, ": ", name, " must be ", is_weight ? "(H, D)" : "(B, N, H)",
              ", got shape ", t.sizes());
  return is_weight ? t.size(0) : t.size(2);
}

// x (B, N, D) with H heads dividing D.
inline GateShape describe_gate(const char* op, const at::Tensor& x, int64_t H) {
  TORCH_CHECK(x.dim() == 3, op, ": x must be (B, N, D), got ", x.sizes());
  TORCH_CHECK(H >= 1 && x.size(2) % H == 0, op, ": the number of heads H = ", H, " must divide D = ", x.size(2));
  return {x.size(0), x.size(1), x.size(2), H};
}

inline void check_gate_device(const char* op, const at::Tensor& t, const at::Tensor& x, const char* name) {
  TORCH_CHECK(t.device() == x.device(), op, ": ", name, " must be on x's device ", x.device(), ", got ", t.device());
}

inline void check_gate_dtype(const char* op, const at::Tensor& t, const at::Tensor& x, const char* name) {
  TORCH_CHECK(t.scalar_type() == x.scalar_type(), op, ": ", name, " must have x's dtype ", x.scalar_type(), ", got ",
              t.scalar_type());
}

// scores, alpha or dalpha: (B, N, H).
inline void check_gate_rows(const char* op, const at::Tensor& t, const at::Tensor& x, const GateShape& s,
                            const char* name) {
  check_gate_device(op, t, x, name);
  TORCH_CHECK(t.dim() == 3 && t.size(0) == s.B && t.size(1) == s.N && t.size(2) == s.H, op, ": ", name,
              " must be (B, N, H) = (", s.B, ", ", s.N, ", ", s.H, "), got ", t.sizes());
}

// weight (H, D), x's dtype.
inline void check_gate_weight(const char* op, const at::Tensor& weight, const at::Tensor& x, const GateShape& s) {
  check_gate_device(op, weight, x, "weight");
  check_gate_dtype(op, weight, x, "weight");
  TORCH_CHECK(weight.dim() == 2 && weight.size(0) == s.H && weight.size(1) == s.D, op, ": weight must be (H, D) = (",
              s.H, ", ", s.D, "), got ", weight.sizes());
}

// mask: bool (B, N), when given.
inline void check_gate_mask(const char* op, const std::optional<at::Tensor>& mask, const at::Tensor& x,
                            const GateShape& s) {
  if (!mask.has_value() || !mask->defined()) return;
  check_gate_device(op, *mask, x, "mask");
  TORCH_CHECK(mask->scalar_type() == at::kBool, op, ": mask must be bool, got ", mask->scalar_type());
  TORCH_CHECK(mask->dim() == 2 && mask->size(0) == s.B && mask->size(1) == s.N, op, ": mask must be (B, N) = (", s.B,
              ", ", s.N, "), got ", mask->sizes());
}

// dy: (B, N, D), or (B, D) with pool; x's dtype.
inline void check_gate_dy(const char* op, const at::Tensor& dy, const at::Tensor& x, const GateShape& s, bool pool) {
  check_gate_device(op, dy, x, "dy");
  check_gate_dtype(op, dy, x, "dy");
  if (pool) {
    TORCH_CHECK(dy.dim() == 2 && dy.size(0) == s.B && dy.size(1) == s.D, op, ": dy must be (B, D) = (", s.B, ", ",
                s.D, ") with pool=True, got ", dy.sizes());
  } else {
    TORCH_CHECK(dy.dim() == 3 && dy.size(0) == s.B && dy.size(1) == s.N && dy.size(2) == s.D, op,
                ": dy must be (B, N, D) = (", s.B, ", ", s.N, ", ", s.D, "), got ", dy.sizes());
  }
}

}  // namespace fastattn
