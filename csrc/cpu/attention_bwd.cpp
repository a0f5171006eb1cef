// Attention backward on CPU: FlashAttention-2, recomputing P = exp(S - lse) tile by tile.
//   dO = dout * sigmoid(g)                          (gate folded in; the ungated output is never stored)
//   delta_i = rowsum(dout_i * out_i) - dlse_i       (== rowsum(dO_i * o_i) - dlse_i; out unrounded, float32,
//                                                    for bf16 / half: rowsum(dS_i) = 0 then holds to fp32)
//   dgate = dout * out * (1 - sigmoid(g))
//   per tile: dV += P^T dO,  dP = dO V^T,  dS = P * (dP - delta),  dK += scale dS^T Q,  dQ += scale dS K
//   A row's dominant key j (P_j > 1/2) takes Z_j dP_j - delta as Z_j dO_i . v_j - delta_i, dots in double (below).
//
// Two schedules, both free of races and atomics:
//   kv-owner  (default): one task per (batch, kv head) owns dK/dV of that head and dQ of its query-head
//             group; outer loop over key blocks, inner over the group's heads and query blocks.
//   two-pass  (when B*Hkv tasks would leave cores idle): pass 1 = one task per (batch, head, query
//             block) accumulating dQ; pass 2 = one task per (batch, kv head, key block) for dK/dV.
//             It recomputes S and dP twice (7 tile GEMMs instead of 5) but exposes L/BLOCK times
//             more parallelism. With a float-mask gradient, pass 1 has one task per block of the
//             mask's own shape (b', h', query block'), looping over the (b, h, query blocks) that
//             broadcast into it: every dmask element and every dQ row has one owner, and dmask is
//             summed in acc_t in a fixed order (deterministic, no atomics, memory O(mask)).
// Tiles are float (double for double inputs); bf16 / half tiles are widened once per tile, except
// that with bf16 on AVX512-BF16 the S = Q K^T and dP = dO V^T GEMMs run on bf16 tiles.
// Packed sequences (varlen) run the same schedules over B sequences: blocks are launched for the
// longest one, seq_extent gives each sequence's rows, and blocks past a shorter sequence's end do nothing.
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
// Tile sizes (backward). CPU time of the backward at B=2 H=8 L=1024 D=64, 2 threads, f32+bf16,
// causal and not (perf task-clock, all-MKL GEMMs): 128 x 128 = 90 ms/call; 128x64 94, 64x256 98, 256x128 100,
// 128x256 104, 64x128 119. Five GEMMs share each tile, so square mid-size tiles balance them.
constexpr int64_t kBlockM = 128;  // query rows per tile
constexpr int64_t kBlockN = 128;  // keys per tile
// Measured: the two-pass schedule costs 1.38-1.40x the kv-owner one (same shape, task-clock), so it
// is used only when ceil(tasks / threads) of the kv-owner schedule exceeds 1.4x tasks / threads.
constexpr double kTwoPassCost = 1.4;

using detail::AttnParams;
using detail::RowLayout;

// Where the backward's tensors keep their rows (RowLayout, attention.h). dO_bf16 has dO's layout, and dlse and
// delta lse's (all three contiguous in lse's shape).
struct BwdLayouts {
  RowLayout dout, out, dO, lse, dq, dgate, dk, dv;
};

template <typename scalar_t, typename acc_t>
struct BwdCtx {
  const AttnParams& s;
  const BwdLayouts& lay;
  const scalar_t *q, *k, *v;  // s.q, s.k, s.v
  const acc_t* dO;         // out's shape, contiguous: dout * sigmoid(gate)
  const c10::BFloat16* dO_bf16;  // the same rounded to bfloat16 when bf16_dp, else nullptr
  bool bf16_dot;           // bfloat16 on AVX512-BF16: S = Q K^T by gemm_nt_bf16
  bool bf16_dp;            // and dP = dO V^T too; not with a gate, whose dO = dout * sig(g) would be rounded to
                           // bf16 there while delta takes it unrounded (rowsum(dS) = 0 would break)
  const acc_t* lse2;       // lse's shape: lse, in log2 units
  const double* delta;     // lse's shape, summed in double (dominant_key_grad)
  bool need_dmask;         // accumulate dS into the caller's dmask buffer (see backward_tile)
  acc_t* dq;               // q's shape, contiguous accumulator
  scalar_t *dk, *dv;       // outputs, shapes of k and v
  acc_t scale_log2, scale;  // s.scale_log2, s.scale rounded once
};

// Per-thread tile buffers; q/k/v hold widened bf16 / half tiles (empty for float / double),
// k_pack/v_pack the bf16 K and V tiles packed for gemm_nt_bf16 (bf16_dot / bf16_dp only).
template <typename scalar_t, typename acc_t>
struct BwdBuffers {
  static constexpr bool kConvert = !std::is_same_v<scalar_t, acc_t>;
  // T: the softcap's tanh, Z: dropout's factors (0 or 1 / (1 - p)), PZ = P Z (empty without them)
  std::vector<acc_t> P, dS, T, Z, PZ, dK, dV, q, k, v;
  std::vector<uint32_t> k_pack, v_pack;
  BwdBuffers(int64_t D, int64_t Dv, bool bf16_dot, bool bf16_dp, bool softcap, bool dropout)
      : P(kBlockM * kBlockN), dS(kBlockM * kBlockN), T(softcap ? kBlockM * kBlockN : 0),
        Z(dropout ? kBlockM * kBlockN : 0), PZ(dropout ? kBlockM * kBlockN : 0), dK(kBlockN * D),
        dV(kBlockN * Dv),
        q(kConvert ? kBlockM * D : 0), k(kConvert ? kBlockN * D : 0), v(kConvert && !bf16_dp ? kBlockN * Dv : 0),
        k_pack(bf16_dot ? bf16_pack_size(kBlockN, D) : 0), v_pack(bf16_dp ? bf16_pack_size(kBlockN, Dv) : 0) {}
};

// K [bn, D] and V [bn, Dv] tiles of kv head hk from row `row` of k and v (seq_extent's k_row0 included), in the
// accumulation type; with bf16_dot, K is also packed into buf.k_pack; with bf16_dp, V is packed into buf.v_pack
// instead of widened (V = nullptr).
struct KVTile {
  const void* K;
  const void* V;
  int64_t ldk, ldv;
};
template <typename scalar_t, typename acc_t>
KVTile kv_tile(const BwdCtx<scalar_t, acc_t>& c, BwdBuffers<scalar_t, acc_t>& buf, int64_t b, int64_t hk, int64_t row,
               int64_t bn) {
  const AttnParams& s = c.s;
  KVTile t;
  const scalar_t* k_tile = c.k + b * s.k_sb + hk * s.k_sh + row * s.k_sl;
  const scalar_t* v_tile = c.v + b * s.v_sb + hk * s.v_sh + row * s.v_sl;
  t.K = tile_as(k_tile, s.k_sl, bn, s.D, buf.k.data(), &t.ldk);  // still needed by dQ += dS K
  if constexpr (std::is_same_v<scalar_t, c10::BFloat16>) {
    if (c.bf16_dot) pack_bt_bf16(buf.k_pack.data(), k_tile, s.k_sl, bn, s.D);
    if (c.bf16_dp) {
      pack_bt_bf16(buf.v_pack.data(), v_tile, s.v_sl, bn, s.Dv);
      t.V = nullptr;
      return t;
    }
  }
  t.V = tile_as(v_tile, s.v_sl, bn, s.Dv, buf.v.data(), &t.ldv);
  return t;
}

// dS = P * (dP - delta) for one row of a tile, dP (times Z under dropout) given in dS. delta = rowsum(dout * out) -
// dlse and dP = dO V^T are rounded apart, so where the exact dS is ~0 because one key takes (nearly) all the weight (a
// row with one allowed key, a softmax saturated by large logits) their difference, times scale * |k| in dq and |q| in
// dk, would miss the float32 rule (docs/CONTRACT.md §4) where torch's math path, which differentiates its own
// softmax, is exact. A key with P > 1/2 (at most one per row) takes its term as P (Z dO . v - delta) instead, both
// dots in double (for float, bfloat16 and half inputs every product is exact there): a row with one key and neither
// gate nor dropout then gets 0 (out = v), a saturated one the rounding of out alone; a gate or dropout leaves the
// rounding of out = sig * o or of Z v. The row's other keys take delta' = Z dP_j - that difference (the same delta up
// to dP_j's rounding, times their P < 1/2). The cost: a vectorised max per row, and a Dv-long dot per dominated row
// each time its tile is recomputed.
template <typename scalar_t, typename acc_t>
void dominant_key_grad(const BwdCtx<scalar_t, acc_t>& c, acc_t* ds, const acc_t* p, const acc_t* z, const acc_t* dO,
                       double delta, int64_t b, int64_t hk, int64_t key0, int64_t n) {
  const acc_t p_top = row_max(p, n);  // vectorised; NaN (a NaN row) fails the test below
  if (!(p_top > acc_t(0.5))) {
    softmax_grad(ds, p, ds, acc_t(delta), n);
    return;
  }
  const int64_t top = std::find(p, p + n, p_top) - p;
  const AttnParams& s = c.s;
  const scalar_t* v = c.v + b * s.v_sb + hk * s.v_sh + (key0 + top) * s.v_sl;
  const double diff = (z ? double(z[top]) : 1.0) * dot_double(dO, v, s.Dv) - delta;  // Z dP_j - delta
  softmax_grad(ds, p, ds, acc_t(double(ds[top]) - diff), n);
  ds[top] = acc_t(double(p_top) * diff);
}

// One (query block, key block) tile of head h: recomputes P and dS, then applies the updates
// asked for: dQ (into ctx.dq), dK/dV (into buf.dK / buf.dV, [bn, D] / [bn, Dv]), dmask. i0 and j0 count
// from sequence b's first query and key (e).
template <typename scalar_t, typename acc_t>
// dmask_acc (or nullptr): the task's acc_t rows of the mask gradient, row stride dmask_ld, into which dS is
// added; its row 0 takes every query row when the mask broadcasts over Lq, its column 0 every key when it
// broadcasts over Lk.
void backward_tile(const BwdCtx<scalar_t, acc_t>& c, BwdBuffers<scalar_t, acc_t>& buf, const KVTile& kv, int64_t b,
                   int64_t h, const SeqExtent& e, int64_t i0, int64_t bm, int64_t j0, int64_t bn, bool do_dq,
                   bool do_dkv, acc_t* dmask_acc = nullptr, int64_t dmask_ld = 0) {
  constexpr acc_t kNegInf = -std::numeric_limits<acc_t>::infinity();
  const AttnParams& s = c.s;
  const BwdLayouts& lay = c.lay;
  const int64_t D = s.D, Dv = s.Dv;
  const int64_t row0 = e.q_row0 + i0;  // the tile's first row of q, dO, lse, delta, dq
  const scalar_t* q_tile = c.q + b * s.q_sb + h * s.q_sh + row0 * s.q_sl;
  int64_t ldq;
  const acc_t* Q = tile_as(q_tile, s.q_sl, bm, D, buf.q.data(), &ldq);  // [bm, D]
  const acc_t* K = static_cast<const acc_t*>(kv.K);  // [bn, D]
  const acc_t* V = static_cast<const acc_t*>(kv.V);  // [bn, Dv]
  const int64_t dO_off = lay.dO(b, h, row0), ldo = lay.dO.sl;
  const acc_t* dO = c.dO + dO_off;                   // [bm, Dv], row stride ldo
  const acc_t* lse2 = c.lse2 + lay.lse(b, h, row0);  // [bm], stride lay.lse.sl (delta too)
  const double* delta = c.delta + lay.lse(b, h, row0);
  acc_t* P = buf.P.data();
  acc_t* dS = buf.dS.data();

  // -- recompute P = 2^(S - lse2)   [bm, bn]
  if constexpr (std::is_same_v<scalar_t, c10::BFloat16>) {
    if (c.bf16_dot) gemm_nt_bf16(bm, bn, D, float(c.scale_log2), q_tile, s.q_sl, buf.k_pack.data(), P, kBlockN);
  }
  if (!c.bf16_dot) gemm(false, true, bm, bn, D, c.scale_log2, Q, ldq, K, kv.ldk, acc_t(0), P, kBlockN);
  const bool capped = !buf.T.empty();
  detail::mask_score_tile<scalar_t>(P, kBlockN, i0, bm, j0, bn, s, e, detail::mask_ptr<scalar_t>(s, b, h, i0, j0),
                                    detail::alibi_slope2<acc_t>(s, b, h), capped ? buf.T.data() : nullptr);
  for (int64_t r = 0; r < bm; ++r) {
    acc_t* row = P + r * kBlockN;
    const acc_t l2 = lse2[r * lay.lse.sl];
    if (l2 == kNegInf) std::fill_n(row, bn, acc_t(-0.0));  // fully masked row: no gradient (-0.0: masked)
    else exp2_shift_sum(row, bn, l2);
  }

  // -- dropout: the forward's weights were P Z; Z regenerated (attention_contract.h), never stored
  const bool dropout = !buf.Z.empty();
  acc_t* Z = buf.Z.data();
  acc_t* PZ = dropout ? buf.PZ.data() : P;
  if (dropout) {
    detail::dropout_tile(P, kBlockN, b, h, i0, bm, j0, bn, s, acc_t(s.dropout_scale), Z);
    for (int64_t r = 0; r < bm; ++r)
      for (int64_t col = 0; col < bn; ++col) PZ[r * kBlockN + col] = P[r * kBlockN + col] * Z[r * kBlockN + col];
  }

  // -- dV += (P Z)^T dO   [bn, Dv]
  if (do_dkv) gemm(true, false, bn, Dv, bm, acc_t(1), PZ, kBlockN, dO, ldo, acc_t(1), buf.dV.data(), Dv);

  // -- dP = dO V^T (times Z: the gradient of P through dropout), dS = P * (dP - delta)   [bm, bn]. delta =
  // rowsum(dO o) = rowsum(P dP) still: o = (P Z) V
  if constexpr (std::is_same_v<scalar_t, c10::BFloat16>) {
    if (c.bf16_dp) gemm_nt_bf16(bm, bn, Dv, 1.f, c.dO_bf16 + dO_off, ldo, buf.v_pack.data(), dS, kBlockN);
  }
  if (!c.bf16_dp) gemm(false, true, bm, bn, Dv, acc_t(1), dO, ldo, V, kv.ldv, acc_t(0), dS, kBlockN);
  if (dropout)
    for (int64_t r = 0; r < bm; ++r)
      for (int64_t col = 0; col < bn; ++col) dS[r * kBlockN + col] *= Z[r * kBlockN + col];
  for (int64_t r = 0; r < bm; ++r)
    dominant_key_grad(c, dS + r * kBlockN, P + r * kBlockN, dropout ? Z + r * kBlockN : nullptr,
                      dO + r * ldo, delta[r * lay.lse.sl], b, h / s.group, e.k_row0 + j0, bn);

  // -- dmask += dS (dL/ds_ij: the bias enters the scores with weight 1), summed over broadcast dims
  if (dmask_acc != nullptr) {
    const bool sum_rows = s.mask_bcast[2], sum_cols = s.mask_bcast[3];
    for (int64_t r = 0; r < bm; ++r) {
      acc_t* dst = dmask_acc + (sum_rows ? 0 : r * dmask_ld);
      const acc_t* src = dS + r * kBlockN;
      if (sum_cols) {
        acc_t t = 0;
        for (int64_t col = 0; col < bn; ++col) t += src[col];
        dst[0] += t;
      } else {
        for (int64_t col = 0; col < bn; ++col) dst[j0 + col] += src[col];
      }
    }
  }

  // -- through the softcap: ds2 / ds2_raw = 1 - tanh^2 (after dmask: the bias is added past the cap)
  if (capped) {
    for (int64_t r = 0; r < bm; ++r) {
      acc_t* d = dS + r * kBlockN;
      const acc_t* t = buf.T.data() + r * kBlockN;
      for (int64_t col = 0; col < bn; ++col) d[col] *= acc_t(1) - t[col] * t[col];
    }
  }

  // -- dK += scale dS^T Q   [bn, D];  dQ += scale dS K   [bm, D]
  if (do_dkv) gemm(true, false, bn, D, bm, c.scale, dS, kBlockN, Q, ldq, acc_t(1), buf.dK.data(), D);
  if (do_dq) gemm(false, false, bm, D, bn, c.scale, dS, kBlockN, K, kv.ldk, acc_t(1), c.dq + lay.dq(b, h, row0),
                  lay.dq.sl);
}

// dK / dV of key block j0 for kv head hk of batch b, over all query heads of its group; dQ too
// when do_dq (kv-owner schedule). Writes dk/dv rows j0..j0+bn in the output dtype; nothing for a
// block past the sequence's keys.
template <typename scalar_t, typename acc_t>
void key_block_pass(const BwdCtx<scalar_t, acc_t>& c, BwdBuffers<scalar_t, acc_t>& buf, int64_t b, int64_t hk,
                    int64_t j0, bool do_dq) {
  const AttnParams& s = c.s;
  const SeqExtent e = seq_extent(s, b);
  if (j0 >= e.Lk) return;
  const int64_t bn = std::min(kBlockN, e.Lk - j0);
  const KVTile kv = kv_tile(c, buf, b, hk, e.k_row0 + j0, bn);
  std::fill_n(buf.dK.data(), bn * s.D, acc_t(0));
  std::fill_n(buf.dV.data(), bn * s.Dv, acc_t(0));
  // the query blocks whose rows see a key of this block (the band's)
  const auto [i_begin, i_end] = detail::band_queries(s, e, j0, bn);
  for (int64_t h = hk * s.group; h < (hk + 1) * s.group; ++h) {
    for (int64_t i0 = i_begin / kBlockM * kBlockM; i0 < i_end; i0 += kBlockM) {
      const int64_t bm = std::min(kBlockM, e.Lq - i0);
      backward_tile(c, buf, kv, b, h, e, i0, bm, j0, bn, do_dq, /*do_dkv=*/true);
    }
  }
  for (int64_t r = 0; r < bn; ++r) {
    const int64_t j = e.k_row0 + j0 + r;
    convert_row(c.dk + c.lay.dk(b, hk, j), buf.dK.data() + r * s.D, s.D);
    convert_row(c.dv + c.lay.dv(b, hk, j), buf.dV.data() + r * s.Dv, s.Dv);
  }
}

// Pass 1 with a float-mask gradient: one task per (b', h', query block') of the mask's own shape; dQ of every
// (b, h, query block) broadcasting into it, and its dmask rows summed in acc_t, then stored once. Attention only
// (packed sequences take no mask): every batch has the extents s.Lq, s.Lk.
template <typename scalar_t, typename acc_t>
void dq_dmask_pass(const BwdCtx<scalar_t, acc_t>& c, scalar_t* dmask) {
  const AttnParams& s = c.s;
  const bool* bc = s.mask_bcast;
  const int64_t mB = bc[0] ? 1 : s.B, mH = bc[1] ? 1 : s.Hq, mL = bc[2] ? 1 : s.Lq, mS = bc[3] ? 1 : s.Lk;
  const int64_t n_qblocks = (s.Lq + kBlockM - 1) / kBlockM;
  const int64_t m_qblocks = bc[2] ? 1 : n_qblocks;  // a mask broadcast over Lq takes every query block
  parallel_dynamic(mB * mH * m_qblocks, [&](const auto& claim) {
    BwdBuffers<scalar_t, acc_t> buf(s.D, s.Dv, c.bf16_dot, c.bf16_dp, s.softcap_log2 != 0, s.dropout);
    std::vector<acc_t> acc;
    for (int64_t t; (t = claim()) >= 0;) {
      const int64_t qb_m = t % m_qblocks, bh_m = t / m_qblocks;
      const int64_t b_m = bh_m / mH, h_m = bh_m % mH;
      const int64_t rows = bc[2] ? 1 : std::min(kBlockM, s.Lq - qb_m * kBlockM);
      acc.assign(size_t(rows * mS), acc_t(0));
      for (int64_t b = bc[0] ? 0 : b_m; b < (bc[0] ? s.B : b_m + 1); ++b)
        for (int64_t h = bc[1] ? 0 : h_m; h < (bc[1] ? s.Hq : h_m + 1); ++h)
          for (int64_t qb = bc[2] ? 0 : qb_m; qb < (bc[2] ? n_qblocks : qb_m + 1); ++qb) {
            const SeqExtent e = seq_extent(s, b);
            const int64_t i0 = qb * kBlockM, bm = std::min(kBlockM, s.Lq - i0);
            const auto [j_begin, j_end] = detail::band_keys(s, e, i0, bm);
            for (int64_t j0 = j_begin; j0 < j_end; j0 += kBlockN) {
              const int64_t bn = std::min(kBlockN, s.Lk - j0);
              const KVTile kv = kv_tile(c, buf, b, h / s.group, j0, bn);
              backward_tile(c, buf, kv, b, h, e, i0, bm, j0, bn, /*do_dq=*/true, /*do_dkv=*/false, acc.data(), mS);
            }
          }
      // dmask is contiguous (mB, mH, mL, mS)
      const int64_t row0 = (b_m * mH + h_m) * mL + (bc[2] ? 0 : qb_m * kBlockM);
      for (int64_t r = 0; r < rows; ++r) convert_row(dmask + (row0 + r) * mS, acc.data() + r * mS, mS);
    }
  });
}

template <typename scalar_t, typename acc_t>
void attention_bwd_kernel(const BwdCtx<scalar_t, acc_t>& c, scalar_t* dmask) {
  const AttnParams& s = c.s;
  const int64_t n_kblocks = (s.Lk + kBlockN - 1) / kBlockN;
  const int64_t n_qblocks = (s.Lq + kBlockM - 1) / kBlockM;
  const int64_t kv_tasks = s.B * s.Hkv;
  const double threads = at::get_num_threads();
  const bool two_pass = c.need_dmask || std::ceil(kv_tasks / threads) > kTwoPassCost * kv_tasks / threads;

  if (!two_pass) {
    // -- kv-owner schedule
    parallel_dynamic(kv_tasks, [&](const auto& claim) {
      BwdBuffers<scalar_t, acc_t> buf(s.D, s.Dv, c.bf16_dot, c.bf16_dp, s.softcap_log2 != 0, s.dropout);
      for (int64_t t; (t = claim()) >= 0;)
        for (int64_t kb = 0; kb < n_kblocks; ++kb)
          key_block_pass(c, buf, t / s.Hkv, t % s.Hkv, kb * kBlockN, /*do_dq=*/true);
    });
    return;
  }

  // -- two-pass schedule, pass 1: dQ per (batch, head, query block), or per block of the mask with dmask
  if (c.need_dmask) dq_dmask_pass(c, dmask);
  else parallel_dynamic(s.B * s.Hq * n_qblocks, [&](const auto& claim) {
    BwdBuffers<scalar_t, acc_t> buf(s.D, s.Dv, c.bf16_dot, c.bf16_dp, s.softcap_log2 != 0, s.dropout);
    for (int64_t t; (t = claim()) >= 0;) {
      const int64_t qb = n_qblocks - 1 - t % n_qblocks, bh = t / n_qblocks;  // heavy (causal) blocks first
      const int64_t b = bh / s.Hq, h = bh % s.Hq;
      const SeqExtent e = seq_extent(s, b);
      const int64_t i0 = qb * kBlockM;
      if (i0 >= e.Lq) continue;
      const int64_t bm = std::min(kBlockM, e.Lq - i0);
      const auto [j_begin, j_end] = detail::band_keys(s, e, i0, bm);
      for (int64_t j0 = j_begin; j0 < j_end; j0 += kBlockN) {
        const int64_t bn = std::min(kBlockN, e.Lk - j0);
        const KVTile kv = kv_tile(c, buf, b, h / s.group, e.k_row0 + j0, bn);
        backward_tile(c, buf, kv, b, h, e, i0, bm, j0, bn, /*do_dq=*/true, /*do_dkv=*/false);
      }
    }
  });
  // -- pass 2: dK / dV per (batch, kv head, key block)
  parallel_dynamic(kv_tasks * n_kblocks, [&](const auto& claim) {
    BwdBuffers<scalar_t, acc_t> buf(s.D, s.Dv, c.bf16_dot, c.bf16_dp, s.softcap_log2 != 0, s.dropout);
    for (int64_t t; (t = claim()) >= 0;) {
      const int64_t kb = t % n_kblocks, bhk = t / n_kblocks;
      key_block_pass(c, buf, bhk / s.Hkv, bhk % s.Hkv, kb * kBlockN, /*do_dq=*/false);
    }
  });
}

// -- per-row preparation: dO = dout * sig, delta = rowsum(dout * out) - dlse, dgate = dout * out * (1 - sig).
// Per-row work needs no sequence bounds: the rows are taken as (nb, Hq, nl), i.e. (B, Hq, Lq) for attention and
// (1, Hq, total_q) for packed sequences.
template <typename scalar_t, typename acc_t>
void prepare_rows(const AttnParams& s, const BwdLayouts& lay, int64_t nb, int64_t nl, const at::Tensor& dout,
                  const at::Tensor& out, const scalar_t* gate, const acc_t* lse2, const acc_t* dlse, acc_t* dO,
                  scalar_t* dO_low, double* delta, scalar_t* dgate) {
  const int64_t Dv = s.Dv;
  const scalar_t* p_dout = dout.data_ptr<scalar_t>();
  // out is the forward's float32 out_acc for bf16 / half (see attention.h), else out itself
  const bool out_acc = out.scalar_type() != dout.scalar_type();
  const void* p_out = out.data_ptr();
  at::parallel_for(0, nb * s.Hq * nl, 64, [&](int64_t begin, int64_t end) {
    std::vector<acc_t> dout_row(Dv), out_row(Dv), tmp(Dv);
    for (int64_t row = begin; row < end; ++row) {
      const int64_t i = row % nl, h = (row / nl) % s.Hq, b = row / (nl * s.Hq);
      const scalar_t* dout_i = p_dout + lay.dout(b, h, i);
      convert_row(dout_row.data(), dout_i, Dv);
      if constexpr (std::is_same_v<acc_t, float>) {
        if (out_acc) std::copy_n(static_cast<const float*>(p_out) + lay.out(b, h, i), Dv, out_row.data());
      }
      if (!out_acc) convert_row(out_row.data(), static_cast<const scalar_t*>(p_out) + lay.out(b, h, i), Dv);
      const int64_t l = lay.lse(b, h, i);
      delta[l] = dot_double(dout_row.data(), out_row.data(), Dv) - (dlse ? double(dlse[l]) : 0.0);
      acc_t* dO_row = dO + lay.dO(b, h, i);
      scalar_t* dO_low_row = dO_low ? dO_low + lay.dO(b, h, i) : nullptr;
      // A row with no allowed key passes no gradient to k and v, even a NaN one (its P is 0, and
      // 0 * NaN inside the GEMMs would be NaN).
      const bool empty = lse2[l] == -std::numeric_limits<acc_t>::infinity();
      if (empty) {
        delta[l] = 0;
        std::fill_n(dO_row, Dv, acc_t(0));
        if (dO_low_row) std::fill_n(dO_low_row, Dv, scalar_t(0));
      }
      if (gate == nullptr) {
        if (empty) continue;
        std::copy_n(dout_row.data(), Dv, dO_row);
        if (dO_low_row) std::copy_n(dout_i, Dv, dO_low_row);
        continue;
      }
      const scalar_t* g = gate + b * s.g_sb + h * s.g_sh + i * s.g_si;
      for (int64_t c = 0; c < Dv; ++c) {
        const acc_t sig = sigmoid(acc_t(g[c * s.g_sc]));
        if (!empty) dO_row[c] = dout_row[c] * sig;
        tmp[c] = dout_row[c] * out_row[c] * (acc_t(1) - sig);
      }
      if (s.gate_headwise) {  // one logit per row: its gradient is the row's sum, taken here in acc_t
        acc_t t = 0;
        for (int64_t c = 0; c < Dv; ++c) t += tmp[c];
        dgate[lay.dgate(b, h, i)] = scalar_t(t);
      } else {
        convert_row(dgate + lay.dgate(b, h, i), tmp.data(), Dv);
      }
      if (dO_low_row && !empty) convert_row(dO_low_row, dO_row, Dv);
    }
  });
}

// The backward of attention_bwd (per-row tensors (B, Hq, Lq, Dv) and (B, Hq, Lq)) and of varlen_attention_bwd
// (packed: (total_q, Hq, Dv) and (Hq, total_q)). Returns (dq, dk, dv, dmask, dgate).
std::tuple<at::Tensor, at::Tensor, at::Tensor, at::Tensor, at::Tensor> run_bwd(
    const char* op, const AttnParams& s, bool packed, const at::Tensor& dout, const at::Tensor& q,
    const at::Tensor& k, const at::Tensor& v, const at::Tensor& out, const at::Tensor& lse,
    const std::optional<at::Tensor>& mask, const std::optional<at::Tensor>& gate,
    const std::optional<at::Tensor>& dlse, bool need_dmask) {
  const auto dt = q.scalar_type();
  const auto acc_type = dt == at::kDouble ? at::kDouble : at::kFloat;
  const int64_t total_q = q.size(0);
  const std::vector<int64_t> out_shape = packed ? std::vector<int64_t>{total_q, s.Hq, s.Dv}
                                                : std::vector<int64_t>{s.B, s.Hq, s.Lq, s.Dv};
  const std::vector<int64_t> row_shape = packed ? std::vector<int64_t>{s.Hq, total_q}
                                                : std::vector<int64_t>{s.B, s.Hq, s.Lq};
  const char* out_name = packed ? "(total_q, Hq, Dv)" : "(B, Hq, Lq, Dv)";
  const char* row_name = packed ? "(Hq, total_q)" : "(B, Hq, Lq)";
  TORCH_CHECK(dout.sizes() == out_shape && dout.scalar_type() == dt, op, ": dout must be ", out_name, " = ",
              out_shape, " of q's dtype, got ", dout.sizes(), " ", dout.scalar_type());
  const bool low = dt == at::kBFloat16 || dt == at::kHalf;
  TORCH_CHECK(out.sizes() == out_shape && (out.scalar_type() == dt || (low && out.scalar_type() == at::kFloat)), op,
              ": out must be ", out_name, " = ", out_shape, " of q's dtype (or float32, the forward's out_acc), got ",
              out.sizes(), " ", out.scalar_type());
  TORCH_CHECK(lse.sizes() == row_shape, op, ": lse must be ", row_name, " = ", row_shape, ", got ", lse.sizes());
  TORCH_CHECK(!dlse.has_value() || dlse->sizes() == row_shape, op, ": dlse must be ", row_name, " = ", row_shape,
              ", got ", dlse->sizes());
  TORCH_CHECK(!need_dmask || s.mask_kind == kMaskBias, op, ": need_dmask requires a float attn_mask");

  at::Tensor dq_acc = at::zeros(q.sizes(), q.options().dtype(acc_type));
  at::Tensor dk = at::empty(k.sizes(), q.options());
  at::Tensor dv = at::empty(v.sizes(), q.options());
  at::Tensor dmask = need_dmask ? at::zeros(mask->sizes(), q.options()) : at::empty({0}, q.options());
  at::Tensor dgate = gate.has_value() ? at::empty(gate->sizes(), q.options()) : at::empty({0}, q.options());

  const at::Tensor dout_c = last_dim_contiguous(dout);
  const at::Tensor out_c = last_dim_contiguous(out);
  const at::Tensor lse2 = lse.to(acc_type).contiguous();  // log2 units, as the forward wrote it
  // dL/dlse2 -> the natural-log gradient the softmax backward takes: lse = lse2 * ln 2
  const at::Tensor dlse_c = dlse.has_value() ? (dlse->to(acc_type) * kLog2e).contiguous() : at::Tensor();
  at::Tensor dO = at::empty(out_shape, q.options().dtype(acc_type));
  at::Tensor delta = at::empty(row_shape, q.options().dtype(at::kDouble));
  // bfloat16 on AVX512-BF16: dP = dO V^T runs on bf16 tiles, so dO is also kept rounded to bf16.
  const bool bf16_dot = dt == at::kBFloat16 && has_bf16_dot(), bf16_dp = bf16_dot && !gate.has_value();
  at::Tensor dO_low = bf16_dp ? at::empty(out_shape, q.options()) : at::Tensor();

  BwdLayouts lay;
  lay.dout = detail::row_layout(dout_c, packed);
  lay.out = detail::row_layout(out_c, packed);
  lay.dO = detail::row_layout(dO, packed);
  lay.lse = detail::row_layout(lse2, packed);  // dlse_c and delta: the same shape, contiguous
  lay.dq = detail::row_layout(dq_acc, packed);
  lay.dgate = gate.has_value() ? detail::row_layout(dgate, packed) : RowLayout{};
  lay.dk = detail::row_layout(dk, packed);
  lay.dv = detail::row_layout(dv, packed);

  AT_DISPATCH_FLOATING_TYPES_AND2(at::kBFloat16, at::kHalf, dt, "attention_bwd", [&] {
    using acc_t = at::opmath_type<scalar_t>;
    const scalar_t* p_gate = gate.has_value() ? gate->data_ptr<scalar_t>() : nullptr;
    prepare_rows<scalar_t, acc_t>(s, lay, packed ? 1 : s.B, packed ? total_q : s.Lq, dout_c, out_c, p_gate,
                                  lse2.data_ptr<acc_t>(), dlse_c.defined() ? dlse_c.data_ptr<acc_t>() : nullptr,
                                  dO.data_ptr<acc_t>(), bf16_dp ? dO_low.data_ptr<scalar_t>() : nullptr,
                                  delta.data_ptr<double>(), gate.has_value() ? dgate.data_ptr<scalar_t>() : nullptr);
    const BwdCtx<scalar_t, acc_t> ctx{s, lay,
                                      q.data_ptr<scalar_t>(), k.data_ptr<scalar_t>(), v.data_ptr<scalar_t>(),
                                      dO.data_ptr<acc_t>(),
                                      bf16_dp ? reinterpret_cast<const c10::BFloat16*>(dO_low.data_ptr()) : nullptr,
                                      bf16_dot, bf16_dp, lse2.data_ptr<acc_t>(), delta.data_ptr<double>(),
                                      need_dmask,
                                      dq_acc.data_ptr<acc_t>(), dk.data_ptr<scalar_t>(), dv.data_ptr<scalar_t>(),
                                      acc_t(s.scale_log2), acc_t(s.scale)};
    attention_bwd_kernel<scalar_t, acc_t>(ctx, need_dmask ? dmask.data_ptr<scalar_t>() : nullptr);
  });
  at::Tensor dq = dq_acc.scalar_type() == dt ? dq_acc : dq_acc.to(dt);
  return {dq, dk, dv, dmask, dgate};
}

}  // namespace

std::tuple<at::Tensor, at::Tensor, at::Tensor, at::Tensor, at::Tensor> attention_bwd(
    const at::Tensor& dout, const at::Tensor& q, const at::Tensor& k, const at::Tensor& v,
    const at::Tensor& out, const at::Tensor& lse,
    const std::optional<at::Tensor>& mask, const std::optional<at::Tensor>& gate,
    const std::optional<at::Tensor>& dlse,
    double scale, int64_t causal, bool need_dmask, int64_t window_left, int64_t window_right, double softcap,
    const std::optional<at::Tensor>& alibi_slopes, bool /*deterministic: every schedule here is*/, double dropout_p,
    const std::optional<at::Tensor>& dropout_seed) {
  const AttnParams s = detail::check_and_describe("attention_bwd", q, k, v, mask, gate, scale, causal,
                                                  {window_left, window_right, softcap, alibi_slopes},
                                                  {dropout_p, dropout_seed});
  return run_bwd("attention_bwd", s, /*packed=*/false, dout, q, k, v, out, lse, mask, gate, dlse, need_dmask);
}

std::tuple<at::Tensor, at::Tensor, at::Tensor, at::Tensor> varlen_attention_bwd(
    const at::Tensor& dout, const at::Tensor& q, const at::Tensor& k, const at::Tensor& v,
    const at::Tensor& out, const at::Tensor& lse,
    const at::Tensor& cu_seqlens_q, const at::Tensor& cu_seqlens_k, int64_t max_seqlen_q, int64_t max_seqlen_k,
    const std::optional<at::Tensor>& gate, const std::optional<at::Tensor>& dlse, double scale, int64_t causal) {
  const AttnParams s = detail::check_and_describe_varlen("varlen_attention_bwd", q, k, v, cu_seqlens_q, cu_seqlens_k,
                                                         max_seqlen_q, max_seqlen_k, gate, scale, causal);
  auto [dq, dk, dv, dmask, dgate] = run_bwd("varlen_attention_bwd", s, /*packed=*/true, dout, q, k, v, out, lse,
                                            std::nullopt, gate, dlse, /*need_dmask=*/false);
  return {dq, dk, dv, dgate};
}

}  // namespace fastattn::cpu
