// fastattn CUDA kernels: the parameter structs and the host entry points of every kernel file.
//
// Kernel translation units include this header and no torch header: they see raw pointers, int64
// element strides and a cudaStream_t, so they compile with nvcc on a machine without a GPU or CUDA
// torch (scripts/check_cuda_build.sh). binding.cpp is the one file that turns tensors into these.
//
// Shapes (csrc/cpu/attention.h has the full contract, shared by every backend):
//   q (B, Hq, Lq, D), k (B, Hkv, Lk, D), v (B, Hkv, Lk, Dv): any strides, stride(-1) == 1
//   mask (B, Hq, Lq, Lk) expanded view (stride 0 on broadcast dims): bool (true = may attend) or
//        q's dtype (a bias added to the scores); gate (B, Hq, Lq, Dv) expanded view, q's dtype
//   out (B, Hq, Lq, Dv) q's dtype, lse (B, Hq, Lq) float32 contiguous; out_acc (B, Hq, Lq, Dv) float32
//        contiguous: out before its rounding to q's dtype, which the backward reads in place of out
#pragma once

#include <cuda_runtime_api.h>

#include <cstdint>

namespace fastattn::cuda {

enum MaskKind : int { kMaskNone = 0, kMaskBool = 1, kMaskBias = 2 };

// One attention call. Sizes are int (L < 2^31); offsets are computed in int64.
struct AttnParams {
  // -- inputs
  const void* q;
  const void* k;
  const void* v;
  const void* mask;  // nullptr when mask_kind == kMaskNone
  const void* gate;  // nullptr without a gate
  int64_t q_sb, q_sh, q_sl;
  int64_t k_sb, k_sh, k_sl;
  int64_t v_sb, v_sh, v_sl;
  int64_t m_sb, m_sh, m_si, m_sj;
  int64_t g_sb, g_sh, g_si, g_sc;  // g_sc == 0 for a headwise gate
  // -- forward outputs (backward inputs): out (gated when a gate is given) and lse
  void* out;  // forward: q's dtype; backward: q's dtype, or the forward's out_acc when out_is_acc
  int64_t o_sb, o_sh, o_sl;
  float* lse;      // (B, Hq, Lq) contiguous
  float* out_acc;  // forward: out unrounded, float32 contiguous (nullptr: not kept)
  bool out_is_acc; // backward: out is float32 (the forward's out_acc)

  int B, Hq, Hkv, group;  // group = Hq / Hkv
  int Lq, Lk, D;          // D == Dv (the kernels cover D in {64, 128})
  int mask_kind;
  bool causal;
  int causal_off;   // query i sees keys j <= i + causal_off (0 top_left, Lk - Lq bottom_right)
  bool is_bf16;     // else float16
  float scale;      // multiplies q.k
  float scale_log2; // scale * log2(e): scores are kept in base-2 units
};

// Backward: AttnParams (q, k, v, mask, gate, out, lse as in the forward) plus these.
struct AttnBwdParams : AttnParams {
  const void* dout;  // dL/d(out), (B, Hq, Lq, Dv), stride(-1) == 1
  int64_t do_sb, do_sh, do_sl;
  const float* dlse;  // (B, Hq, Lq) contiguous or nullptr
  // -- workspaces (allocated by the caller)
  float* delta;     // (B, Hq, Lq): rowsum(dout * out) - dlse
  void* do_gated;   // (B, Hq, Lq, Dv) contiguous, q's dtype: dout * sigmoid(gate); used when gate != nullptr
  float* dq_accum;  // (B, Hq, Lq, D) contiguous, zero-filled by the caller
  // -- outputs, contiguous
  void* dq;     // (B, Hq, Lq, D)
  void* dk;     // (B, Hkv, Lk, D)
  void* dv;     // (B, Hkv, Lk, Dv)
  void* dmask;  // (B, Hq, Lq, Lk) in q's dtype (dL/dscore) for a full-shape float mask, or nullptr
  // a float mask broadcast over some dims: its gradient, the sum of dS over them, accumulated in float32 in the
  // mask's own shape (zero-filled by the caller; dm_s* are its strides, 0 on the broadcast dims), or nullptr
  float* dmask_accum;
  int64_t dm_sb, dm_sh, dm_si, dm_sj;
  void* dgate;  // (B, Hq, Lq, Dv) in q's dtype when gate != nullptr; (B, Hq, Lq, 1) for a headwise gate
};

// Host entry points (attention_fwd_hdim*.cu, attention_bwd_hdim*.cu). They launch on `stream` and
// return the launch's error; they never synchronise.
cudaError_t attention_fwd_hdim64(const AttnParams& p, cudaStream_t stream);
cudaError_t attention_fwd_hdim128(const AttnParams& p, cudaStream_t stream);
cudaError_t attention_bwd_hdim64(const AttnBwdParams& p, cudaStream_t stream);
cudaError_t attention_bwd_hdim128(const AttnBwdParams& p, cudaStream_t stream);
// The backward's row preparation (delta, gated dout, dgate) and the dq conversion (attention_bwd_rows.cu).
cudaError_t attention_bwd_preprocess(const AttnBwdParams& p, cudaStream_t stream);
cudaError_t attention_bwd_convert_dq(const AttnBwdParams& p, cudaStream_t stream);

// -------------------------------------------------------------------------------------------------
// softmax_gate / score_softmax_gate (csrc/cpu/softmax_gate.h has the math). x (B, N, D) with
// stride(-1) == 1; H divides D; channel c belongs to head c / (D / H).
// -------------------------------------------------------------------------------------------------
struct GateParams {
  const void* x;
  int64_t x_sb, x_sn;
  const void* scores;  // (B, N, H), stride(-1) == 1, x's dtype (softmax_gate), else nullptr
  int64_t s_sb, s_sn;
  const float* weight;  // (H, D) float32 contiguous (score_softmax_gate), else nullptr
  const bool* mask;     // (B, N) contiguous or nullptr
  float* alpha;         // (B, N, H) float32 contiguous
  void* y;              // (B, N, D) contiguous in x's dtype (gate) ...
  float* y_accum;       // ... or (B, D) float32, zero-filled (pool); the caller casts it
  int B, N, D, H;
  float scale;  // score_softmax_gate's scale
  bool pool;
  bool is_bf16;
  int vec;  // 8: x, dy, dx rows are 16-byte aligned and D / H % 8 == 0 (16-byte vectors); else 1
};

struct GateBwdParams : GateParams {
  const void* dy;  // (B, N, D) or (B, D) (pool: dy_sn == 0), stride(-1) == 1, x's dtype
  int64_t dy_sb, dy_sn;
  const float* dalpha;  // (B, N, H) contiguous or nullptr
  float* g;             // (B, N, H) float32 workspace: g, then dscores in place
  void* dscores;        // (B, N, H) contiguous in x's dtype (softmax_gate), or nullptr
  void* dx;             // (B, N, D) contiguous in x's dtype
  float* dweight_accum; // (H, D) float32, zero-filled (score_softmax_gate), else nullptr
};

// softmax_gate.cu
cudaError_t softmax_gate_fwd(const GateParams& p, cudaStream_t stream);
cudaError_t softmax_gate_bwd(const GateBwdParams& p, cudaStream_t stream);

}  // namespace fastattn::cuda
