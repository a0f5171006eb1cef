// Attention forward on CPU: FlashAttention-2 tiling with an online softmax.
// One task = (batch, query head, block of kBlockM queries); it streams kBlockN-key tiles of its kv
// head, keeping a running max / sum per query row and rescaling its output accumulator.
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

namespace fastattn::cpu {

namespace {
// Tile sizes (forward). CPU time of the forward at B=2 H=8 L=1024 D=64, 2 threads, f32+bf16,
// causal and not (perf task-clock, mean of 4 configs, all-MKL GEMMs): 256 x 512 = 37 ms/call,
// 128x512 38-42, 64x512 40-42, 128x1024 38, 128x256 45, 256x256 47. Wide key tiles keep the GEMMs
// efficient; the 256 x 512 float score tile (512 KiB) still fits a core's L2 (SDPA uses the same).
constexpr int64_t kBlockM = 256;  // query rows per task
constexpr int64_t kBlockN = 512;  // keys per streamed tile
}  // namespace

namespace detail {

AttnShape check_and_describe(const char* op, const at::Tensor& q, const at::Tensor& k, const at::Tensor& v,
                             const std::optional<at::Tensor>& mask, const std::optional<at::Tensor>& gate,
                             int64_t causal) {
  TORCH_CHECK(q.dim() == 4, op, ": q must be (B, Hq, Lq, D), got ", q.sizes());
  TORCH_CHECK(k.dim() == 4, op, ": k must be (B, Hkv, Lk, D), got ", k.sizes());
  TORCH_CHECK(v.dim() == 4, op, ": v must be (B, Hkv, Lk, Dv), got ", v.sizes());
  TORCH_CHECK(q.device().is_cpu() && k.device().is_cpu() && v.device().is_cpu(), op, ": q, k, v must be CPU tensors");
  const auto dt = q.scalar_type();
  TORCH_CHECK(dt == at::kFloat || dt == at::kDouble || dt == at::kBFloat16 || dt == at::kHalf, op,
              ": q must be float32, float64, bfloat16 or float16, got ", dt);
  TORCH_CHECK(k.scalar_type() == dt && v.scalar_type() == dt, op, ": k and v must have q's dtype ", dt,
              ", got k ", k.scalar_type(), " and v ", v.scalar_type());
  AttnShape s{};
  s.B = q.size(0); s.Hq = q.size(1); s.Lq = q.size(2); s.D = q.size(3);
  s.Hkv = k.size(1); s.Lk = k.size(2); s.Dv = v.size(3);
  TORCH_CHECK(k.size(0) == s.B && v.size(0) == s.B, op, ": batch of k ", k.size(0), " and v ", v.size(0),
              " must equal q's ", s.B);
  TORCH_CHECK(s.Hkv > 0 && s.Hq % s.Hkv == 0, op, ": query heads ", s.Hq, " must be a multiple of kv heads ", s.Hkv);
  TORCH_CHECK(v.size(1) == s.Hkv, op, ": v has ", v.size(1), " heads, k has ", s.Hkv);
  TORCH_CHECK(k.size(3) == s.D, op, ": k head dim ", k.size(3), " must equal q's ", s.D);
  TORCH_CHECK(v.size(2) == s.Lk, op, ": v length ", v.size(2), " must equal k's ", s.Lk);
  TORCH_CHECK(q.stride(3) == 1 || s.D <= 1, op, ": q must have stride(-1) == 1");
  TORCH_CHECK(k.stride(3) == 1 || s.D <= 1, op, ": k must have stride(-1) == 1");
  TORCH_CHECK(v.stride(3) == 1 || s.Dv <= 1, op, ": v must have stride(-1) == 1");
  TORCH_CHECK(causal >= 0 && causal <= 2, op, ": causal must be 0, 1 (top_left) or 2 (bottom_right), got ", causal);
  s.group = s.Hq / s.Hkv;
  s.q_sb = q.stride(0); s.q_sh = q.stride(1); s.q_sl = q.stride(2);
  s.k_sb = k.stride(0); s.k_sh = k.stride(1); s.k_sl = k.stride(2);
  s.v_sb = v.stride(0); s.v_sh = v.stride(1); s.v_sl = v.stride(2);
  s.mask_kind = MaskKind::kNone;
  if (mask.has_value()) {
    const at::Tensor& m = *mask;
    TORCH_CHECK(m.device().is_cpu(), op, ": attn_mask must be a CPU tensor");
    const int64_t full[4] = {s.B, s.Hq, s.Lq, s.Lk};
    bool ok = m.dim() == 4;
    for (int d = 0; ok && d < 4; ++d) ok = m.size(d) == full[d] || m.size(d) == 1;
    TORCH_CHECK(ok, op, ": attn_mask must be 4-D with each dim 1 or that of (B, Hq, Lq, Lk) = (", s.B, ", ", s.Hq,
                ", ", s.Lq, ", ", s.Lk, "), got ", m.sizes());
    TORCH_CHECK(m.scalar_type() == at::kBool || m.scalar_type() == dt, op, ": attn_mask must be bool or q's dtype ",
                dt, ", got ", m.scalar_type());
    s.mask_kind = m.scalar_type() == at::kBool ? MaskKind::kBool : MaskKind::kBias;
    int64_t* strides[4] = {&s.m_sb, &s.m_sh, &s.m_si, &s.m_sj};
    for (int d = 0; d < 4; ++d) {
      s.m_bcast[d] = m.size(d) == 1 && full[d] != 1;
      *strides[d] = m.size(d) == 1 ? 0 : m.stride(d);  // a size-1 dim is read at index 0 for every index
    }
  }
  s.has_gate = gate.has_value();
  if (s.has_gate) {
    const at::Tensor& g = *gate;
    TORCH_CHECK(g.device().is_cpu(), op, ": gate must be a CPU tensor");
    TORCH_CHECK(g.dim() == 4 && g.size(0) == s.B && g.size(1) == s.Hq && g.size(2) == s.Lq &&
                    (g.size(3) == s.Dv || g.size(3) == 1),
                op, ": gate must be (B, Hq, Lq, Dv) = (", s.B, ", ", s.Hq, ", ", s.Lq, ", ", s.Dv,
                ") or headwise (B, Hq, Lq, 1), got ", g.sizes());
    TORCH_CHECK(g.scalar_type() == dt, op, ": gate must have q's dtype ", dt, ", got ", g.scalar_type());
    s.gate_headwise = g.size(3) == 1 && s.Dv != 1;
    s.g_sb = g.stride(0); s.g_sh = g.stride(1); s.g_si = g.stride(2); s.g_sc = g.size(3) == 1 ? 0 : g.stride(3);
  }
  s.causal = causal != 0;
  s.causal_off = causal == 2 ? s.Lk - s.Lq : 0;
  return s;
}

}  // namespace detail

namespace {

using detail::AttnShape;

template <typename scalar_t, typename acc_t>
void attention_fwd_kernel(const scalar_t* q, const scalar_t* k, const scalar_t* v, const at::Tensor* mask,
                          const scalar_t* gate, scalar_t* out, float* out_acc, acc_t* lse, const AttnShape& s,
                          acc_t alpha) {
  constexpr acc_t kNegInf = -std::numeric_limits<acc_t>::infinity();
  constexpr bool kConvert = !std::is_same_v<scalar_t, acc_t>;  // bf16 / half tiles are widened once each
  // bfloat16 on AVX512-BF16: Q K^T straight from the bf16 tiles (no widening of Q and K).
  const bool bf16_dot = std::is_same_v<scalar_t, c10::BFloat16> && has_bf16_dot();
  // S = alpha * Q K^T in log2 units; alpha = scale * LOG2E rounded once from double, exactly as the backward
  // does: the same S there gives P = exp2(S - lse) = 1 for a saturated row, whose exact gradient is 0
  const int64_t D = s.D, Dv = s.Dv;
  const int64_t n_qblocks = (s.Lq + kBlockM - 1) / kBlockM;

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
      const int64_t i0 = qb * kBlockM, bm = std::min(kBlockM, s.Lq - i0);
      const scalar_t* k_head = k + b * s.k_sb + hk * s.k_sh;  // [Lk, D], row stride k_sl
      const scalar_t* v_head = v + b * s.v_sb + hk * s.v_sh;  // [Lk, Dv], row stride v_sl
      const scalar_t* q_tile = q + b * s.q_sb + h * s.q_sh + i0 * s.q_sl;  // [bm, D], row stride q_sl
      int64_t ldq = s.q_sl, ldk = s.k_sl, ldv;
      const acc_t* Q = bf16_dot ? nullptr : tile_as(q_tile, s.q_sl, bm, D, q_buf.data(), &ldq);

      std::fill_n(acc, bm * Dv, acc_t(0));
      std::fill_n(m_buf.data(), bm, kNegInf);
      std::fill_n(l_buf.data(), bm, acc_t(0));

      // Causal: keys past the last row's diagonal are skipped entirely.
      const int64_t j_end = s.causal ? std::min(s.Lk, i0 + bm + s.causal_off) : s.Lk;
      for (int64_t j0 = 0; j0 < j_end; j0 += kBlockN) {
        const int64_t bn = std::min(kBlockN, j_end - j0);
        const acc_t* V = tile_as(v_head + j0 * s.v_sl, s.v_sl, bn, Dv, v_buf.data(), &ldv);  // [bn, Dv]

        // -- scores: S = scale * LOG2E * Q K^T   [bm, bn]
        if constexpr (std::is_same_v<scalar_t, c10::BFloat16>) {
          if (bf16_dot) {
            pack_bt_bf16(k_pack.data(), k_head + j0 * s.k_sl, s.k_sl, bn, D);
            gemm_nt_bf16(bm, bn, D, float(alpha), q_tile, s.q_sl, k_pack.data(), S, kBlockN);
          }
        }
        if (!bf16_dot) {
          const acc_t* K = tile_as(k_head + j0 * s.k_sl, s.k_sl, bn, D, k_buf.data(), &ldk);  // [bn, D]
          gemm(false, true, bm, bn, D, alpha, Q, ldq, K, ldk, acc_t(0), S, kBlockN);
        }
        detail::mask_score_tile<scalar_t>(S, kBlockN, i0, bm, j0, bn, s, detail::mask_ptr(mask, s, b, h, i0, j0));

        // -- online softmax update: P = 2^(S - m_new), l = l * 2^(m_old - m_new) + rowsum(P)
        for (int64_t r = 0; r < bm; ++r) {
          acc_t* row = S + r * kBlockN;
          const acc_t m_old = m_buf[r];
          const acc_t m_new = nan_max(m_old, row_max(row, bn));  // a NaN score makes the whole row NaN
          if (m_new == kNegInf) {  // no allowed key yet: contributes nothing
            std::fill_n(row, bn, acc_t(0));
            continue;
          }
          const acc_t correction = std::exp2(m_old - m_new);  // 0 when m_old = -inf
          l_buf[r] = l_buf[r] * correction + exp2_shift_sum(row, bn, m_new);
          m_buf[r] = m_new;
          if (correction != acc_t(1)) scale_row(acc + r * Dv, correction, Dv);
        }

        // -- O += P V   [bm, Dv]
        gemm(false, false, bm, Dv, bn, acc_t(1), S, kBlockN, V, ldv, acc_t(1), acc, Dv);
      }

      // -- normalise, gate, store; lse = log2(sum) + max in log2 units (the op's contract)
      for (int64_t r = 0; r < bm; ++r) {
        const int64_t i = i0 + r;
        const int64_t row_idx = (b * s.Hq + h) * s.Lq + i;
        acc_t* o = acc + r * Dv;
        const acc_t l = l_buf[r];
        const bool empty = l == acc_t(0);  // no allowed key: exactly 0 (not 0 * V, which is NaN for V = inf)
        if (empty) std::fill_n(o, Dv, acc_t(0));
        else scale_row(o, acc_t(1) / l, Dv);
        lse[row_idx] = empty ? kNegInf : m_buf[r] + std::log2(l);
        if (gate != nullptr) {
          const scalar_t* g = gate + b * s.g_sb + h * s.g_sh + i * s.g_si;
          for (int64_t c = 0; c < Dv; ++c) o[c] *= sigmoid(acc_t(g[c * s.g_sc]));
        }
        if constexpr (std::is_same_v<acc_t, float>) {
          if (out_acc != nullptr) std::copy_n(o, Dv, out_acc + row_idx * Dv);
        }
        convert_row(out + row_idx * Dv, o, Dv);
      }
    }
  });
}

}  // namespace

std::tuple<at::Tensor, at::Tensor, at::Tensor> attention_fwd(
    const at::Tensor& q, const at::Tensor& k, const at::Tensor& v,
    const std::optional<at::Tensor>& mask, const std::optional<at::Tensor>& gate,
    double scale, int64_t causal, bool need_acc) {
  const AttnShape s = detail::check_and_describe("attention_fwd", q, k, v, mask, gate, causal);
  const auto acc_type = q.scalar_type() == at::kDouble ? at::kDouble : at::kFloat;
  at::Tensor out = at::empty({s.B, s.Hq, s.Lq, s.Dv}, q.options());
  at::Tensor lse = at::empty({s.B, s.Hq, s.Lq}, q.options().dtype(acc_type));
  const bool keep_acc = need_acc && (q.scalar_type() == at::kBFloat16 || q.scalar_type() == at::kHalf);
  at::Tensor out_acc = keep_acc ? at::empty({s.B, s.Hq, s.Lq, s.Dv}, q.options().dtype(at::kFloat)) : at::empty({0}, q.options());
  if (out.numel() == 0 && lse.numel() == 0) return {out, lse, out_acc};

  const at::Tensor* mask_t = mask.has_value() ? &*mask : nullptr;

  AT_DISPATCH_FLOATING_TYPES_AND2(at::kBFloat16, at::kHalf, q.scalar_type(), "attention_fwd", [&] {
    using acc_t = at::opmath_type<scalar_t>;
    attention_fwd_kernel<scalar_t, acc_t>(
        q.data_ptr<scalar_t>(), k.data_ptr<scalar_t>(), v.data_ptr<scalar_t>(), mask_t,
        gate.has_value() ? gate->data_ptr<scalar_t>() : nullptr, out.data_ptr<scalar_t>(),
        keep_acc ? out_acc.data_ptr<float>() : nullptr, lse.data_ptr<acc_t>(), s, acc_t(scale * kLog2e));
  });
  return {out, lse, out_acc};
}

}  // namespace fastattn::cpu
