// The kernel contract of fastattn's ops, shared by every C++ and CUDA backend. Torch-free: the CUDA
// kernels include it through csrc/cuda/params.h and compile with nvcc or under the CPU emulation
// without torch. docs/CONTRACT.md §6 describes the same ops (§1 the public ones); csrc/fastattn.cpp
// holds their schemas. csrc/describe.h turns checked tensors into the params below (one function for
// CPU and CUDA); fastattn._C.contract() exports the enums and constants, which fastattn/contract.py
// (the reference and the Triton launchers) mirrors under the same names.
//
// attention_fwd / attention_bwd. Shapes (B batch, Hq query heads, Hkv kv heads with Hq % Hkv == 0,
// Lq queries, Lk keys, D q/k head dim, Dv v head dim):
//   q     (B, Hq,  Lq, D)    any strides, stride(-1) == 1
//   k     (B, Hkv, Lk, D)    same; query head h reads kv head h / (Hq / Hkv) (GQA / MQA)
//   v     (B, Hkv, Lk, Dv)   same
//   mask  (B, Hq,  Lq, Lk)   optional, 4-D with each dim 1 or full (size-1 dims are broadcast inside the
//                            kernel: their stride is 0 here), any strides; bool (true = may attend) or q's
//                            dtype (a bias added to the scores)
//   gate  (B, Hq,  Lq, Dv)   optional, q's dtype, or (B, Hq, Lq, 1) headwise (read with stride 0 over Dv);
//                            output = attention * sigmoid(gate)
//   out   (B, Hq,  Lq, Dv)   contiguous, q's dtype (the gated output when a gate is given)
//   out_acc                  float32 out before rounding, for bf16 / half q (else empty); the backward's
//                            `out` is this where it exists (delta from the unrounded output)
//   lse   (B, Hq,  Lq)       contiguous, float32 (float64 for double q): log2 of the softmax denominator of
//                            the scores in log2 units (scale_log2 * q.k); -inf (and out row 0) for a row with
//                            no key. The backward takes it as it is: no change of base
//   dout  (B, Hq,  Lq, Dv)   any strides, stride(-1) == 1
//   dlse  (B, Hq,  Lq)       optional, lse's dtype: the gradient of this (log2-unit) lse
//   dq, dk, dv               contiguous, shapes and dtypes of q, k, v
//   dmask                    dL/d(mask) in the mask's own shape and dtype when asked for: dS summed over the
//                            mask's broadcast dims in float32 or wider, deterministically
//   dgate                    the gate's shape and dtype; a headwise gate's gradient is summed over Dv
//   window_left, window_right    the sliding window (-1: unbounded on that side)
//   softcap                      > 0 caps the scores (0: none)
//   alibi_slopes (Hq) or (B, Hq) optional, the statistics' dtype (lse's), any strides
//   dropout_p, dropout_seed      dropout on the weights p (below); the seed an int64 tensor of one element on q's
//                                device (read by the kernels: no host sync, CUDA-graph safe)
// Math per (b, h, i), in this order (FlashAttention's and Gemma 2's):
//   s_j = scale * q_i.k_j;  s_j = softcap * tanh(s_j / softcap) (softcap > 0);  s_j += bias_ij (float mask);
//   s_j -= slope_bh * |i + Lk - Lq - j| (ALiBi);  s_j = -inf where hidden: a false bool mask, the causal rule,
//   or the window (j < i + Lk - Lq - window_left or j > i + Lk - Lq + window_right, for a side that is >= 0);
//   p = softmax(s); out_i = sum_j p_j z_j v_j (* sigmoid(gate_i)). A row with no visible key gives 0 and lse -inf.
//   z = 1 without dropout; with it z_j = keep(b, h, i, j) / (1 - dropout_p) (dropout_keep below; 0 when p = 1),
//   as SDPA's dropout of the weights; lse stays the undropped softmax's. The backward regenerates z.
// Kernels keep scores in base 2: s * log2(e), so exp becomes exp2 and lse is in log2 units (the softcap too:
// c * tanh(s / c) in base 2 is c2 * tanh(s2 / c2) with c2 = c * log2(e)). The backward multiplies dS by
// 1 - tanh^2 under the cap, after dmask takes it (the bias is added past the cap); slopes get no gradient.
//
// varlen_attention_fwd / varlen_attention_bwd: the same math over B sequences of their own lengths,
// packed without padding (FlashAttention's varlen layout):
//   q     (total_q, Hq,  D)  any strides, stride(-1) == 1; sequence b owns rows [cu_seqlens_q[b], cu_seqlens_q[b+1])
//   k, v  (total_k, Hkv, D / Dv)  same, rows [cu_seqlens_k[b], cu_seqlens_k[b+1])
//   cu_seqlens_q, cu_seqlens_k   int32 (B + 1), contiguous, 0 = cu[0] <= cu[1] <= ... <= cu[B] = total
//   max_seqlen_q, max_seqlen_k   bounds of the lengths (launch sizes; a larger value is harmless)
//   gate  (total_q, Hq, Dv) or headwise (total_q, Hq, 1); no mask
//   out   (total_q, Hq, Dv) contiguous; out_acc likewise (float32, as above)
//   lse   (Hq, total_q) contiguous (FlashAttention's varlen layout), log2 units as above; dlse the same
//   dq, dk, dv, dgate            contiguous, the shapes of q, k, v, gate
//   causal per sequence: top_left (i sees j <= i) or bottom_right (j <= i + Lk_b - Lq_b).
//   In the params: B sequences; Lq, Lk = max_seqlen_q, max_seqlen_k; q_sb = k_sb = v_sb = g_sb = 0; the
//   row strides in q_sl, k_sl, v_sl, g_si; cu_seqlens_q/k set (seq_extent gives each sequence's rows).
//
// attention_kvcache_fwd: decoding over a KV cache (Lq >= 1 new queries per sequence), forward only:
//   q     (B, Hq, Lq, D)     as attention_fwd
//   k_cache, v_cache         (B, Hkv, Lcache, D / Dv), or paged: (num_pages, Hkv, page_size, D / Dv) with
//   page_table               int32 (B, max_pages), stride(-1) == 1: key j of sequence b is row j % page_size of
//                            page page_table[b, j / page_size]
//   seqlens_k                int32 (B), contiguous: sequence b attends to its keys [0, seqlens_k[b])
//   gate                     as attention_fwd; no mask
//   out, lse                 as attention_fwd (lse (B, Hq, Lq) float32, log2 units)
//   causal per sequence: bottom_right (query i sees keys j <= i + seqlens_k[b] - Lq: the new queries are
//   the last Lq positions), or none (every valid key); top_left is refused.
//   In the params: Lk = Lcache or max_pages * page_size; seqlens_k set; paged: page_table, pt_sb, page_size,
//   and k_sb / v_sb step pages.
#pragma once

#include <cstdint>

// Host and device code alike (nvcc); plain C++ elsewhere.
#if defined(__CUDACC__)
#define FASTATTN_HOST_DEVICE __host__ __device__
#else
#define FASTATTN_HOST_DEVICE
#endif

namespace fastattn {

constexpr double kLog2e = 1.4426950408889634;  // e^x = 2^(x * kLog2e)
constexpr double kLn2 = 0.6931471805599453;    // = 1 / kLog2e

// The op schemas' `causal` argument.
enum CausalMode : int {
  kCausalNone = 0,
  kCausalTopLeft = 1,      // query i sees keys j <= i (SDPA's is_causal)
  kCausalBottomRight = 2,  // query i sees keys j <= i + Lk - Lq (FlashAttention's; decoding)
};

// What the mask is, from its dtype.
enum MaskKind : int { kMaskNone = 0, kMaskBool = 1, kMaskBias = 2 };

// One attention call: the inputs' pointers, int64 element strides and sizes. Index is the type of the
// sizes (int64_t on the CPU; int in the CUDA kernels, whose offsets are still computed in int64), Real that
// of the scales (double on the CPU, rounded to the accumulation type at use; float in CUDA).
template <typename Index, typename Real>
struct AttentionParams {
  const void* q;
  const void* k;
  const void* v;
  const void* mask;  // nullptr when mask_kind == kMaskNone
  const void* gate;  // nullptr without a gate
  int64_t q_sb, q_sh, q_sl;        // q (B, Hq, Lq, D)
  int64_t k_sb, k_sh, k_sl;        // k (B, Hkv, Lk, D)
  int64_t v_sb, v_sh, v_sl;        // v (B, Hkv, Lk, Dv)
  int64_t m_sb, m_sh, m_si, m_sj;  // mask (B, Hq, Lq, Lk), 0 on broadcast dims
  int64_t g_sb, g_sh, g_si, g_sc;  // gate (B, Hq, Lq, Dv), g_sc == 0 for a headwise gate
  Index B, Hq, Hkv, Lq, Lk, D, Dv;
  Index group;  // Hq / Hkv query heads per kv head
  int mask_kind;
  bool mask_bcast[4];  // the mask has size 1 where (B, Hq, Lq, Lk) has more: its gradient is summed there
  bool gate_headwise;  // gate (B, Hq, Lq, 1) with Dv > 1
  // The keys query i sees form a band (key_band): j <= i + causal_off when `causal` (the causal rule, a right window
  // or both: whatever bounds keys from above, which is what the kernels' tile skipping needs), and
  // j >= i + lo_off when `windowed` (a left window).
  bool causal;
  Index causal_off;  // 0 top_left, Lk - Lq bottom_right; with a right window the smaller of that and Lk - Lq + right
  bool windowed;
  Index lo_off;      // Lk - Lq - window_left
  Real scale;        // multiplies q.k
  Real scale_log2;   // scale * kLog2e: scores in base-2 units
  Real softcap_log2;  // softcap * kLog2e, 0 without a cap
  const void* alibi;  // nullptr, or the slopes (acc type: float, double for double inputs); slope of (b, h) at
  int64_t al_sb, al_sh;  // b * al_sb + h * al_sh (al_sb 0 for (Hq) slopes)
  // Sequences of their own lengths (all nullptr for attention_fwd/bwd; see varlen and kvcache above).
  int causal_mode;               // CausalMode: the per-sequence causal offset needs it
  const int32_t* cu_seqlens_q;   // varlen: (B + 1) row offsets of q (and of out, gate, lse's columns)
  const int32_t* cu_seqlens_k;   // varlen: (B + 1) row offsets of k, v
  const int32_t* seqlens_k;      // kv cache: (B) valid keys per sequence
  const int32_t* page_table;     // paged kv cache: (B, max_pages) page ids, row stride pt_sb
  int64_t pt_sb;
  Index page_size;
  // Dropout (attention_fwd / _bwd alone): dropout_words under the seed *dropout_seed (on q's device), kept when
  // dropout_kept; kept weights times dropout_scale
  bool dropout;
  const int64_t* dropout_seed;
  uint64_t dropout_threshold;
  Real dropout_scale;  // 1 / (1 - dropout_p), 0 for dropout_p = 1
};

// Philox4x32-10 (Salmon et al., "Parallel random numbers: as easy as 1, 2, 3", SC 2011): four 32-bit words from a
// 128-bit counter c and a 64-bit key, counter-based (no state: a kernel draws any element's words directly).
struct Philox4 {
  uint32_t w[4];
};
constexpr uint32_t kPhiloxM0 = 0xD2511F53u, kPhiloxM1 = 0xCD9E8D57u;  // the round's multipliers
constexpr uint32_t kPhiloxW0 = 0x9E3779B9u, kPhiloxW1 = 0xBB67AE85u;  // the key's Weyl increments

FASTATTN_HOST_DEVICE inline Philox4 philox4x32_10(uint32_t c0, uint32_t c1, uint32_t c2, uint32_t c3, uint32_t k0,
                                                  uint32_t k1) {
  for (int round = 0; round < 10; ++round) {
    const uint64_t p0 = uint64_t(kPhiloxM0) * c0, p1 = uint64_t(kPhiloxM1) * c2;
    const uint32_t n0 = uint32_t(p1 >> 32) ^ c1 ^ k0, n2 = uint32_t(p0 >> 32) ^ c3 ^ k1;
    c1 = uint32_t(p1), c3 = uint32_t(p0), c0 = n0, c2 = n2;
    k0 += kPhiloxW0, k1 += kPhiloxW1;
  }
  return {{c0, c1, c2, c3}};
}

// Dropout's random words: weight (b, h, i, j) of a call takes word j % 4 of philox4x32_10(counter (j / 4, i, h, b),
// key (the seed's low and high 32 bits)); i and j count a sequence's own queries and keys. It is kept when that
// word is at least dropout_threshold = floor(dropout_p * 2^32) (2^32 when dropout_p = 1: none is).
// fastattn/contract.py's dropout_keep draws the same over whole tensors. One call gives four neighbouring keys'.
FASTATTN_HOST_DEVICE inline Philox4 dropout_words(uint64_t seed, int64_t b, int64_t h, int64_t i, int64_t j4) {
  return philox4x32_10(uint32_t(j4), uint32_t(i), uint32_t(h), uint32_t(b), uint32_t(seed), uint32_t(seed >> 32));
}

template <typename Index, typename Real>
FASTATTN_HOST_DEVICE inline bool dropout_kept(const AttentionParams<Index, Real>& p, uint32_t word) {
  return uint64_t(word) >= p.dropout_threshold;
}

// The keys query i of a (Lq, Lk) sequence sees: j <= i + hi_off (when has_hi), j >= i + lo_off (when has_lo). A
// window side that hides no key (left >= Lk - 1, right >= Lq - 1) is dropped: the offsets stay within (-Lq, Lk].
struct KeyBand {
  bool has_hi, has_lo;
  int64_t hi_off, lo_off;
};

FASTATTN_HOST_DEVICE inline KeyBand key_band(int64_t Lq, int64_t Lk, int causal_mode, int64_t window_left,
                                             int64_t window_right) {
  const bool has_lo = window_left >= 0 && window_left < Lk - 1;
  KeyBand k{causal_mode != kCausalNone, has_lo, causal_mode == kCausalBottomRight ? Lk - Lq : 0,
            has_lo ? Lk - Lq - window_left : 0};
  if (window_right >= 0 && window_right < Lq - 1) {
    const int64_t w = Lk - Lq + window_right;
    k.hi_off = k.has_hi && k.hi_off < w ? k.hi_off : w;
    k.has_hi = true;
  }
  return k;
}

// Whether a call modifies the scores beyond the causal rule and a mask (a left window, a softcap, ALiBi): the CUDA
// kernels compile those paths only into the variants such calls take.
template <typename Index, typename Real>
FASTATTN_HOST_DEVICE inline bool has_score_mods(const AttentionParams<Index, Real>& p) {
  return p.windowed || p.softcap_log2 != Real(0) || p.alibi != nullptr;
}

// Where sequence b's rows start (in units of q_sl / k_sl rows, on top of b * q_sb / k_sb), how long it is, and the
// band of keys its queries see (`causal` and `windowed` are the params' own). Packed sequences and kv caches take
// no window (their per-sequence band would cost the CUDA kernels registers they do not have: spills on sm_80).
struct SeqExtent {
  int64_t q_row0, k_row0;
  int64_t Lq, Lk;
  int64_t causal_off;  // query i sees keys j <= i + causal_off (when causal)
  int64_t lo_off;      // and j >= i + lo_off (when windowed)
  int64_t diag_off;    // Lk - Lq: ALiBi's distance is |i + diag_off - j|
};

template <typename Index, typename Real>
FASTATTN_HOST_DEVICE inline SeqExtent seq_extent(const AttentionParams<Index, Real>& p, int64_t b) {
  SeqExtent e{0, 0, int64_t(p.Lq), int64_t(p.Lk), int64_t(p.causal_off), int64_t(p.lo_off), int64_t(p.Lk - p.Lq)};
  if (p.cu_seqlens_q != nullptr) e.q_row0 = p.cu_seqlens_q[b], e.Lq = p.cu_seqlens_q[b + 1] - e.q_row0;
  if (p.cu_seqlens_k != nullptr) e.k_row0 = p.cu_seqlens_k[b], e.Lk = p.cu_seqlens_k[b + 1] - e.k_row0;
  if (p.seqlens_k != nullptr) e.Lk = p.seqlens_k[b];
  if (p.cu_seqlens_q != nullptr || p.seqlens_k != nullptr) {
    e.causal_off = p.causal_mode == kCausalBottomRight ? e.Lk - e.Lq : 0;
    e.diag_off = e.Lk - e.Lq;
  }
  return e;
}

// Paged kv cache: the element offset of key row j of sequence b (k_sb steps pages); contiguous: b * k_sb + j * k_sl.
template <typename Index, typename Real>
FASTATTN_HOST_DEVICE inline int64_t kv_row_offset(const AttentionParams<Index, Real>& p, int64_t b, int64_t j,
                                                  int64_t sb, int64_t sl) {
  if (p.page_table == nullptr) return b * sb + j * sl;
  const int64_t page = p.page_table[b * p.pt_sb + j / p.page_size];
  return page * sb + (j % p.page_size) * sl;
}

// softmax_gate / score_softmax_gate. x (B, N, D) with stride(-1) == 1; H heads divide D, channel c
// belongs to head c / (D / H); scores (B, N, H) or scores = scale * x weight^T with weight (H, D);
// mask (B, N) bool, true = position takes part.
//   alpha[b, :, h] = softmax_n(scores[b, :, h]) over unmasked n, 0 at masked n, all 0 when every n is masked
//   y[b, n, c] = alpha[b, n, h(c)] * x[b, n, c]          (pool = false)
//   y[b, c]    = sum_n alpha[b, n, h(c)] * x[b, n, c]    (pool = true)
// Backward:
//   g[b, n, h]       = sum_{c in h} dy[b, (n,) c] * x[b, n, c]  (+ dalpha)
//   dscores[b, n, h] = alpha[b, n, h] * (g[b, n, h] - sum_n' alpha[b, n', h] * g[b, n', h])
//   dx[b, n, c]      = dy[b, (n,) c] * alpha[b, n, h(c)]  (+ scale * sum_h dscores[b, n, h] * weight[h, c])
//   dweight[h, c]    = scale * sum_{b, n} dscores[b, n, h] * x[b, n, c]
// alpha is float32 (float64 for float64 x); statistics and accumulators are float32 or wider.

// One softmax-gate call's sizes (each backend's kernels add their own layout: strides, vector width).
struct GateShape {
  int64_t B, N, D, H;
};

}  // namespace fastattn
