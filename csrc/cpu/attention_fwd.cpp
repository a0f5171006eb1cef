// Attention forward on CPU: FlashAttention-2 tiling with an online softmax.
// One task = (batch or packed sequence, query head, block of kBlockM queries); it streams kBlockN-key
// tiles of its kv head, keeping a running max / sum per query row and rescaling its output accumulator.
// Packed sequences launch blocks for the longest one; a shorter sequence's blocks past its end do nothing.
// Statistics and accumulators are float (double for double inputs); bf16 / half tiles are widened
// once per tile, except that bf16 Q K^T runs on the bf16 tiles where AVX512-BF16 exists.
#include <ATen/ATen.h>
#include <ATen/Dispatch.h>
#include <ATen/OpMathType.h>
#include <ATen/Parallel.h>

#include <type_traits>
#include <vector>

#include "attention.h"
#include "cpu_utils.h"
#include "describe.h"

namespace fastattn::cpu {

namespace {
// Tile sizes (forward). CPU time of the forward at B=2 H=8 L=1024 D=64, 2 threads, f32+bf16,
// causal and not (perf task-clock, mean of 4 configs, all-MKL GEMMs): 256 x 512 = 37 ms/call,
// 128x512 38-42, 64x512 40-42, 128x1024 38, 128x256 45, 256x256 47. Wide key tiles keep the GEMMs
// efficient; the 256 x 512 float score tile (512 KiB) still fits a core's L2 (SDPA uses the same).
constexpr int64_t kBlockM = 256;  // query rows per task
constexpr int64_t kBlockN = 512;  // keys per streamed tile
constexpr int64_t kDiagRows = 64;  // rows per chunk of a tile that crosses the causal diagonal
}  // namespace

namespace detail {

namespace {
void check_cpu(const char* op, const at::Tensor& q) {
  TORCH_CHECK(q.device().is_cpu(), op, ": q, k, v must be CPU tensors, got q on ", q.device());
  const auto dt = q.scalar_type();
  TORCH_CHECK(dt == at::kFloat || dt == at::kDouble || dt == at::kBFloat16 || dt == at::kHalf, op,
              ": q must be float32, float64, bfloat16 or float16, got ", dt);
}

// 0 = cu[0] <= cu[1] <= ... <= cu[B] = total with every length <= max_len: the kernels read and write the rows
// cu_seqlens names, and launch max_len rows per sequence.
void check_cu_seqlens(const char* op, const at::Tensor& cu, int64_t total, int64_t max_len, const char* name) {
  const int32_t* c = cu.data_ptr<int32_t>();
  const int64_t n = cu.numel();
  TORCH_CHECK(c[0] == 0 && c[n - 1] == total, op, ": ", name, " must run from 0 to the packed length ", total,
              ", got ", c[0], " to ", c[n - 1]);
  for (int64_t b = 0; b + 1 < n; ++b)
    TORCH_CHECK(c[b] <= c[b + 1] && c[b + 1] - c[b] <= max_len, op, ": ", name,
                " must be non-decreasing with lengths <= ", max_len, ", got ", c[b], " then ", c[b + 1]);
}
}  // namespace

AttnParams check_and_describe(const char* op, const at::Tensor& q, const at::Tensor& k, const at::Tensor& v,
                              const std::optional<at::Tensor>& mask, const std::optional<at::Tensor>& gate,
                              double scale, int64_t causal, const ScoreMods& mods, const Dropout& dropout) {
  check_cpu(op, q);
  AttnParams s{};
  describe_attention(s, op, q, k, v, mask, gate, scale, causal, mods, dropout);
  return s;
}

AttnParams check_and_describe_varlen(const char* op, const at::Tensor& q, const at::Tensor& k, const at::Tensor& v,
                                     const at::Tensor& cu_seqlens_q, const at::Tensor& cu_seqlens_k,
                                     int64_t max_seqlen_q, int64_t max_seqlen_k,
                                     const std::optional<at::Tensor>& gate, double scale, int64_t causal) {
  check_cpu(op, q);
  AttnParams s{};
  describe_varlen_attention(s, op, q, k, v, cu_seqlens_q, cu_seqlens_k, max_seqlen_q, max_seqlen_k, gate, scale,
                            causal);
  check_cu_seqlens(op, cu_seqlens_q, q.size(0), max_seqlen_q, "cu_seqlens_q");
  check_cu_seqlens(op, cu_seqlens_k, k.size(0), max_seqlen_k, "cu_seqlens_k");
  return s;
}

}  // namespace detail

namespace {

using detail::AttnParams;
using detail::RowLayout;

// Where the forward writes: out and out_acc (Dv-wide rows; out_acc nullptr when not kept) and lse.
template <typename scalar_t, typename acc_t>
struct FwdOutputs {
  scalar_t* out;
  float* out_acc;
  acc_t* lse;
  RowLayout out_l, acc_l, lse_l;
};

template <typename scalar_t, typename acc_t>
void attention_fwd_kernel(const AttnParams& s, const FwdOutputs<scalar_t, acc_t>& o) {
  const auto* q = static_cast<const scalar_t*>(s.q);
  const auto* k = static_cast<const scalar_t*>(s.k);
  const auto* v = static_cast<const scalar_t*>(s.v);
  const auto* gate = static_cast<const scalar_t*>(s.gate);
  constexpr acc_t kNegInf = -std::numeric_limits<acc_t>::infinity();
  constexpr bool kConvert = !std::is_same_v<scalar_t, acc_t>;  // bf16 / half tiles are widened once each
  // bfloat16 on AVX512-BF16: Q K^T straight from the bf16 tiles (no widening of Q and K).
  const bool bf16_dot = std::is_same_v<scalar_t, c10::BFloat16> && has_bf16_dot();
  // S = scale_log2 * Q K^T in log2 units; scale_log2 rounded once from double, exactly as the backward does:
  // the same S there gives P = exp2(S - lse) = 1 for a saturated row, whose exact gradient is 0
  const acc_t scale_log2 = acc_t(s.scale_log2);
  const int64_t D = s.D, Dv = s.Dv;
  const int64_t n_qblocks = (s.Lq + kBlockM - 1) / kBlockM;  // s.Lq: the longest sequence's

  parallel_dynamic(s.B * s.Hq * n_qblocks, [&](const auto& claim) {
    // Per-thread tile buffers.
    std::vector<acc_t> S_buf(kBlockM * kBlockN);        // [BM, BN] scores, then P
    std::vector<acc_t> acc_buf(kBlockM * Dv);           // [BM, Dv] unnormalised output
    std::vector<acc_t> m_buf(kBlockM), l_buf(kBlockM);  // running max (log2 units) / sum
    std::vector<acc_t> q_buf(kConvert && !bf16_dot ? kBlockM * D : 0), k_buf(kConvert && !bf16_dot ? kBlockN * D : 0),
        v_buf(kConvert ? kBlockN * Dv : 0);             // widened tiles
    std::vector<uint32_t> k_pack(bf16_dot ? bf16_pack_size(kBlockN, D) : 0);  // K tile packed for gemm_nt_bf16
    acc_t* S = S_buf.data();
    acc_t* acc = acc_buf.data();

    for (int64_t task; (task = claim()) >= 0;) {
      // Last query blocks first: under causal masking they see the most keys.
      const int64_t qb = n_qblocks - 1 - task % n_qblocks, bh = task / n_qblocks;
      const int64_t h = bh % s.Hq, b = bh / s.Hq, hk = h / s.group;
      const SeqExtent e = seq_extent(s, b);
      const int64_t i0 = qb * kBlockM;  // query rows i0.. of sequence b
      if (i0 >= e.Lq) continue;         // past a shorter sequence's end
      const int64_t bm = std::min(kBlockM, e.Lq - i0);
      const scalar_t* k_head = k + b * s.k_sb + hk * s.k_sh + e.k_row0 * s.k_sl;  // [Lk, D], row stride k_sl
      const scalar_t* v_head = v + b * s.v_sb + hk * s.v_sh + e.k_row0 * s.v_sl;  // [Lk, Dv], row stride v_sl
      const scalar_t* q_tile = q + b * s.q_sb + h * s.q_sh + (e.q_row0 + i0) * s.q_sl;  // [bm, D], row stride q_sl
      int64_t ldq = s.q_sl, ldk = s.k_sl, ldv;
      const acc_t* Q = bf16_dot ? nullptr : tile_as(q_tile, s.q_sl, bm, D, q_buf.data(), &ldq);

      std::fill_n(acc, bm * Dv, acc_t(0));
      std::fill_n(m_buf.data(), bm, kNegInf);
      std::fill_n(l_buf.data(), bm, acc_t(0));

      // Keys outside the block's band (past the last row's causal diagonal or right window, before the first
      // row's left window) are skipped entirely.
      const auto [j_begin, j_end] = detail::band_keys(s, e, i0, bm);
      const acc_t slope2 = detail::alibi_slope2<acc_t>(s, b, h);
      for (int64_t j0 = j_begin; j0 < j_end; j0 += kBlockN) {
        const int64_t bn = std::min(kBlockN, j_end - j0);
        const acc_t* V = tile_as(v_head + j0 * s.v_sl, s.v_sl, bn, Dv, v_buf.data(), &ldv);  // [bn, Dv]

        if constexpr (std::is_same_v<scalar_t, c10::BFloat16>) {
          if (bf16_dot) pack_bt_bf16(k_pack.data(), k_head + j0 * s.k_sl, s.k_sl, bn, D);
        }
        const acc_t* K = bf16_dot ? nullptr : tile_as(k_head + j0 * s.k_sl, s.k_sl, bn, D, k_buf.data(), &ldk);

        // A tile that crosses the causal diagonal is worked in chunks of kDiagRows rows, each over the keys up to its
        // last row's diagonal: the masked side of a 256-row diagonal block costs 1/8 of its scores, not 1/2.
        const bool diag = s.causal && j0 + bn - 1 > i0 + e.causal_off;
        const int64_t chunk = diag ? kDiagRows : bm;
        for (int64_t r0 = 0; r0 < bm; r0 += chunk) {
          const int64_t rows = std::min(chunk, bm - r0);
          const int64_t width = diag ? std::min(bn, i0 + r0 + rows + e.causal_off - j0) : bn;
          if (width <= 0) continue;  // these rows see no key of this tile
          acc_t* S_r = S + r0 * kBlockN;

          // -- scores: S = scale * LOG2E * Q K^T   [rows, width]
          if constexpr (std::is_same_v<scalar_t, c10::BFloat16>) {
            if (bf16_dot)
              gemm_nt_bf16(rows, width, D, float(scale_log2), q_tile + r0 * s.q_sl, s.q_sl, k_pack.data(), S_r,
                           kBlockN, bn);
          }
          if (!bf16_dot) gemm(false, true, rows, width, D, scale_log2, Q + r0 * ldq, ldq, K, ldk, acc_t(0), S_r, kBlockN);
          detail::mask_score_tile<scalar_t>(S_r, kBlockN, i0 + r0, rows, j0, width, s, e,
                                            detail::mask_ptr<scalar_t>(s, b, h, i0 + r0, j0), slope2);

          // -- online softmax update: P = 2^(S - m_new), l = l * 2^(m_old - m_new) + rowsum(P)
          for (int64_t r = r0; r < r0 + rows; ++r) {
            acc_t* row = S + r * kBlockN;
            const acc_t m_old = m_buf[r];
            const acc_t m_new = nan_max(m_old, row_max(row, width));  // a NaN score makes the whole row NaN
            if (m_new == kNegInf) {  // no allowed key yet: contributes nothing
              std::fill_n(row, width, acc_t(0));
              continue;
            }
            const acc_t correction = std::exp2(m_old - m_new);  // 0 when m_old = -inf
            l_buf[r] = l_buf[r] * correction + exp2_shift_sum(row, width, m_new);
            m_buf[r] = m_new;
            if (correction != acc_t(1)) scale_row(acc + r * Dv, correction, Dv);
          }

          // -- O += P Z V   [rows, Dv]: dropout's 1 / (1 - p) comes with the normalisation
          if (s.dropout) detail::dropout_tile(S_r, kBlockN, b, h, i0 + r0, rows, j0, width, s, acc_t(1));
          gemm(false, false, rows, Dv, width, acc_t(1), S_r, kBlockN, V, ldv, acc_t(1), acc + r0 * Dv, Dv);
        }
      }

      // -- normalise, gate, store; lse = log2(sum) + max in log2 units (the op's contract)
      for (int64_t r = 0; r < bm; ++r) {
        const int64_t i = e.q_row0 + i0 + r;  // row of q, out, gate, lse
        acc_t* out_row = acc + r * Dv;
        const acc_t l = l_buf[r];
        const bool empty = l == acc_t(0);  // no allowed key: exactly 0 (not 0 * V, which is NaN for V = inf)
        if (empty) std::fill_n(out_row, Dv, acc_t(0));
        else scale_row(out_row, acc_t(s.dropout_scale) / l, Dv);
        o.lse[o.lse_l(b, h, i)] = empty ? kNegInf : m_buf[r] + std::log2(l);
        if (gate != nullptr) {
          const scalar_t* g = gate + b * s.g_sb + h * s.g_sh + i * s.g_si;
          for (int64_t c = 0; c < Dv; ++c) out_row[c] *= sigmoid(acc_t(g[c * s.g_sc]));
        }
        if constexpr (std::is_same_v<acc_t, float>) {
          if (o.out_acc != nullptr) std::copy_n(out_row, Dv, o.out_acc + o.acc_l(b, h, i));
        }
        convert_row(o.out + o.out_l(b, h, i), out_row, Dv);
      }
    }
  });
}

// The forward of attention_fwd (outputs (B, Hq, Lq, Dv) and (B, Hq, Lq)) and of varlen_attention_fwd (packed:
// (total_q, Hq, Dv) and (Hq, total_q)).
std::tuple<at::Tensor, at::Tensor, at::Tensor> run_fwd(const AttnParams& s, const at::Tensor& q, bool packed,
                                                       bool need_acc) {
  const auto acc_type = q.scalar_type() == at::kDouble ? at::kDouble : at::kFloat;
  const int64_t total_q = q.size(0);
  const std::vector<int64_t> out_shape = packed ? std::vector<int64_t>{total_q, s.Hq, s.Dv}
                                                : std::vector<int64_t>{s.B, s.Hq, s.Lq, s.Dv};
  const std::vector<int64_t> lse_shape = packed ? std::vector<int64_t>{s.Hq, total_q}
                                                : std::vector<int64_t>{s.B, s.Hq, s.Lq};
  at::Tensor out = at::empty(out_shape, q.options());
  at::Tensor lse = at::empty(lse_shape, q.options().dtype(acc_type));
  const bool keep_acc = need_acc && (q.scalar_type() == at::kBFloat16 || q.scalar_type() == at::kHalf);
  at::Tensor out_acc = keep_acc ? at::empty(out_shape, q.options().dtype(at::kFloat)) : at::empty({0}, q.options());
  if (out.numel() == 0 && lse.numel() == 0) return {out, lse, out_acc};

  AT_DISPATCH_FLOATING_TYPES_AND2(at::kBFloat16, at::kHalf, q.scalar_type(), "attention_fwd", [&] {
    using acc_t = at::opmath_type<scalar_t>;
    const RowLayout out_l = detail::row_layout(out, packed);
    const FwdOutputs<scalar_t, acc_t> o{out.data_ptr<scalar_t>(), keep_acc ? out_acc.data_ptr<float>() : nullptr,
                                        lse.data_ptr<acc_t>(), out_l, out_l, detail::row_layout(lse, packed)};
    attention_fwd_kernel<scalar_t, acc_t>(s, o);
  });
  return {out, lse, out_acc};
}

}  // namespace

std::tuple<at::Tensor, at::Tensor, at::Tensor> attention_fwd(
    const at::Tensor& q, const at::Tensor& k, const at::Tensor& v,
    const std::optional<at::Tensor>& mask, const std::optional<at::Tensor>& gate,
    double scale, int64_t causal, bool need_acc, int64_t window_left, int64_t window_right, double softcap,
    const std::optional<at::Tensor>& alibi_slopes, bool /*deterministic: the backward's*/, double dropout_p,
    const std::optional<at::Tensor>& dropout_seed) {
  const AttnParams s = detail::check_and_describe("attention_fwd", q, k, v, mask, gate, scale, causal,
                                                  {window_left, window_right, softcap, alibi_slopes},
                                                  {dropout_p, dropout_seed});
  return run_fwd(s, q, /*packed=*/false, need_acc);
}

std::tuple<at::Tensor, at::Tensor, at::Tensor> varlen_attention_fwd(
    const at::Tensor& q, const at::Tensor& k, const at::Tensor& v,
    const at::Tensor& cu_seqlens_q, const at::Tensor& cu_seqlens_k, int64_t max_seqlen_q, int64_t max_seqlen_k,
    const std::optional<at::Tensor>& gate, double scale, int64_t causal, bool need_acc) {
  const AttnParams s = detail::check_and_describe_varlen("varlen_attention_fwd", q, k, v, cu_seqlens_q, cu_seqlens_k,
                                                         max_seqlen_q, max_seqlen_k, gate, scale, causal);
  return run_fwd(s, q, /*packed=*/true, need_acc);
}

}  // namespace fastattn::cpu
