// fastattn CUDA kernels: the parameter structs and the host entry points of every kernel file.
//
// Kernel translation units include this header and no torch header: they see raw pointers, int64
// element strides and a cudaStream_t, so they compile with nvcc on a machine without a GPU or CUDA
// torch (scripts/check_cuda_build.sh). binding.cpp is the one file that turns tensors into these,
// through describe_attention (csrc/describe.h), as the CPU backend does.
//
// Shapes and semantics: csrc/attention_contract.h. These kernels take float16 / bfloat16 with
// D == Dv in {64, 128}; out_acc and the backward's out are float32 contiguous.
#pragma once

#include <cuda_runtime_api.h>

#include <cstdint>

#include "attention_contract.h"

namespace fastattn::cuda {

// The contract's base-2 constant in float: device code must not compute in double.
constexpr float kLog2e = float(::fastattn::kLog2e);

// One attention call: the contract's params (sizes as int, L < 2^31; offsets are computed in int64),
// plus the forward's outputs (the backward's inputs).
struct AttnParams : AttentionParams<int, float> {
  void* out;  // forward: q's dtype; backward: q's dtype, or the forward's out_acc when out_is_acc
  int64_t o_sb, o_sh, o_sl;
  float* lse;       // (B, Hq, Lq) contiguous; varlen forward: (Hq, total_q)
  int64_t lse_sl;   // the forward's lse row length: Lq, or varlen's total_q
  float* out_acc;   // forward: out unrounded, float32, out's shape and strides (nullptr: not kept)
  bool out_is_acc;  // backward: out is float32 (the forward's out_acc)
  bool is_bf16;     // else float16
};

// Backward: AttnParams (q, k, v, mask, gate, out, lse as in the forward) plus these.
struct AttnBwdParams : AttnParams {
  const void* dout;  // dL/d(out), (B, Hq, Lq, Dv), stride(-1) == 1
  int64_t do_sb, do_sh, do_sl;
  const float* dlse;  // (B, Hq, Lq) contiguous or nullptr
  // -- workspaces (allocated by the caller)
  float* delta;     // (B, Hq, Lq): rowsum(dout * out) - dlse
  void* do_gated;   // (B, Hq, Lq, Dv) contiguous, q's dtype: dout * sigmoid(gate); used when gate != nullptr
  // (dq_splits, B, Hq, Lq, D) contiguous, zero-filled by the caller. Atomics (dq_splits 1, deterministic false):
  // every key tile's block adds into it at once, in whatever order the blocks run. deterministic: the grid has
  // dq_splits blocks per (kv head, batch), block s walks the key tiles s, s + dq_splits, ... in turn and alone adds
  // into slice s; the slices are summed in order afterwards. Bitwise the same gradients run after run.
  float* dq_accum;
  int dq_splits;
  bool deterministic;  // also: dmask_accum has the scores' full shape, each element written by one thread
  // -- outputs, contiguous
  void* dq;     // (B, Hq, Lq, D)
  void* dk;     // (B, Hkv, Lk, D)
  void* dv;     // (B, Hkv, Lk, Dv)
  void* dmask;  // (B, Hq, Lq, Lk) in q's dtype (dL/dscore) for a full-shape float mask, or nullptr
  // a float mask broadcast over some dims: its gradient, the sum of dS over them, accumulated in float32 in the
  // mask's own shape (zero-filled by the caller; dm_s* are its strides, 0 on the broadcast dims), or nullptr.
  // deterministic: dS itself in float32, (B, Hq, Lq, Lk), which the caller sums over the broadcast dims
  float* dmask_accum;
  int64_t dm_sb, dm_sh, dm_si, dm_sj;
  void* dgate;  // (B, Hq, Lq, Dv) in q's dtype when gate != nullptr; (B, Hq, Lq, 1) for a headwise gate
  // -- the main kernel's launch: its first batch and kv head (set by launch_attention_bwd)
  int b0, hk0;
};

// attention_kvcache_fwd (decode.cu): AttnParams of the call (kv cache, seqlens_k, page table, out, lse) split
// over the keys: split s of a sequence takes key tiles [s * split_tiles, (s + 1) * split_tiles).
struct DecodeParams : AttnParams {
  int row_tiles;    // tiles of packed (query head of the group, query) rows per kv head
  int num_splits;   // 1: the decode kernel writes out and lse itself
  int split_tiles;  // key tiles (DecodeTraits::kBlockN keys) per split
  // num_splits > 1: each split's out (normalised, float32) and lse, merged by a second kernel; workspaces of
  // (num_splits, B, Hq, Lq, Dv) and (num_splits, B, Hq, Lq) contiguous
  float* out_part;
  float* lse_part;
};

// Host entry points (attention_fwd_hdim*.cu, attention_bwd_hdim*.cu, decode.cu). They launch on `stream` and
// return the launch's error; they never synchronise. attention_fwd_hdim* also run varlen_attention_fwd.
cudaError_t attention_fwd_hdim64(const AttnParams& p, cudaStream_t stream);
cudaError_t attention_fwd_hdim128(const AttnParams& p, cudaStream_t stream);
cudaError_t attention_bwd_hdim64(const AttnBwdParams& p, cudaStream_t stream);
cudaError_t attention_bwd_hdim128(const AttnBwdParams& p, cudaStream_t stream);
// The backward's row preparation (delta, gated dout, dgate) and the dq conversion (attention_bwd_rows.cu).
cudaError_t attention_bwd_preprocess(const AttnBwdParams& p, cudaStream_t stream);
cudaError_t attention_bwd_convert_dq(const AttnBwdParams& p, cudaStream_t stream);
// The decode kernel (and the merge of its splits), D == Dv in {64, 128}.
cudaError_t attention_decode(const DecodeParams& p, cudaStream_t stream);

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

// -------------------------------------------------------------------------------------------------
// attention_pool (attention_pool.cu; math: fastattn/reference.py). Packed bags of x (N, D), bag b rows
// offsets[b] .. offsets[b + 1]. The binding pads what the kernels read in 16-byte chunks: x's row length to Dp
// (a multiple of 8, zeros past D), the hidden units to Hdp (zero weights, bias and w rows past Hd) and the
// branches to pool_branch_slots(K) columns of w.
// -------------------------------------------------------------------------------------------------
constexpr int kPoolSplitRows = 256;   // a bag's rows are split at multiples of this (one forward block each)
constexpr int kPoolUnits = 32;        // hidden units per 64-column tile of the gated [V|U] (ungated: 64)
constexpr int kPoolMaxBranches = 16;  // K at most
inline int pool_branch_slots(int K) { return K <= 4 ? 4 : kPoolMaxBranches; }

struct PoolParams {
  const void* x;  // (N, Dp) rows in x's dtype, row stride x_ld (% 8 == 0), 16-byte aligned
  int64_t x_ld;
  const int64_t* offsets;  // (B + 1)
  const bool* mask;        // (N) or nullptr
  // [V|U]: G columns in tiles of 64, gated: tile t = V's units 32 t .. 32 t + 31, then U's (ungated: V's 64 t ..)
  const void* wt;      // (G, Dp) x's dtype: [V|U] transposed
  const void* wi;      // (Dp, G) x's dtype: [V|U] (backward: dx = dpre [V|U]ᵀ)
  const float* bias;   // (G) float32 (zeros without biases)
  const float* w;      // (Hdp, pool_branch_slots(K)) float32, zeros past Hd and K
  int64_t N;
  int B, D, Dp, G, K;
  bool gated, is_bf16;
  float* scores;  // (N, K) float32: forward output; backward: recomputed (workspace)
  float* lse;     // (B, K): forward output, backward input
  // -- forward: the splits of the bags. pair_start (B + 1): split i of bag b is block pair_start[b] + i; at most
  // max_pairs (B + ceil(N / kPoolSplitRows)) blocks. Workspaces (max_pairs, K, Dp), (max_pairs, K), (max_pairs, K).
  const int64_t* pair_start;
  int64_t max_pairs;
  float* part_acc;
  float* part_m;
  float* part_l;
  float* y;  // (B, K, D) float32
};

struct PoolBwdParams : PoolParams {
  const float* dy;       // (B, K, D) float32 contiguous
  const float* y;        // (B, K, D) float32 contiguous: the forward's
  const float* delta;    // (B, K): -dlse (0 without it)
  const float* dscores;  // (N, K) or nullptr
  // -- workspaces: alpha, ds (N, K) float32; dpre (N, G) x's dtype
  float* alpha;
  float* ds;
  void* dpre;
  // -- outputs: dx (N, Dp) x's dtype; float32 zero-filled: dw_acc (Hdp, pool_branch_slots(K)), dW_acc (Dp, G)
  void* dx;
  float* dw_acc;
  float* dW_acc;
};

// attention_pool.cu
cudaError_t attention_pool_fwd_kernels(const PoolParams& p, cudaStream_t stream);
cudaError_t attention_pool_bwd_kernels(const PoolBwdParams& p, cudaStream_t stream);

}  // namespace fastattn::cuda
