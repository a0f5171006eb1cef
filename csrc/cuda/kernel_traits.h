// Tile sizes of the CUDA attention kernels, in one place.
//
// No GPU measurement exists yet (the first GPU round tunes these). Every number below is
// a starting point with its reason; replace the reason with the measurement when there is one.
// sm_90a builds these same sm_80-style kernels (mma.sync + ldmatrix + cp.async); a wgmma/TMA
// Hopper path is out of scope for now.
#pragma once

#include <cstdint>

namespace fastattn::cuda {

// One mma.sync.m16n8k16 covers 16 rows; every warp owns whole 16-row slabs.
constexpr int kMmaM = 16;
// Shared-memory rows are padded by 8 half-words (16 bytes): consecutive rows then start 4 banks
// apart, so the 8 row addresses of an ldmatrix phase hit 8 distinct 16-byte bank groups
// (conflict-free) without a swizzle. Costs 8/64 (D=64) or 8/128 (D=128) extra shared memory.
constexpr int kSmemPad = 8;

template <int kHeadDim_>
struct FwdTraits {
  static constexpr int kHeadDim = kHeadDim_;
  // 8 warps x one 16-row slab: a 128-query tile, as FlashAttention-2's sm80 forward (128 x 64/128);
  // each K/V tile in shared memory then feeds 8 warps.
  static constexpr int kWarps = 8;
  static constexpr int kThreads = kWarps * 32;
  static constexpr int kBlockM = kWarps * kMmaM;
  // 64 keys per step: the score tile S (16 x 64 per warp) is 32 fp32 registers per thread; with the
  // O accumulator (64 registers at D=128) that stays under the 255-register cap without spills.
  static constexpr int kBlockN = 64;
  static constexpr int kLd = kHeadDim + kSmemPad;  // shared-memory row length in elements
  // Q, then K and V double-buffered (the next tile's cp.async runs under this tile's math).
  static constexpr int kSmemQ = kBlockM * kLd;
  static constexpr int kSmemKV = kBlockN * kLd;
  static constexpr int kSmemBytes = (kSmemQ + 4 * kSmemKV) * 2;  // 2 bytes per fp16/bf16 element
  // Blocks per SM the varlen forward is compiled for (__launch_bounds__; per architecture, as nvcc compiles device
  // code once for each): ptxas makes attention's D = 64 inference kernel fit two (128 registers); the varlen one,
  // with a sequence's extent in registers, needs telling, and fits without spills on sm_80 alone. With out_acc, at
  // D = 128, or on sm_90, one (two would spill).
  static constexpr int varlen_min_blocks(bool keep_acc) {
#if defined(__CUDA_ARCH__) && __CUDA_ARCH__ >= 900
    return 1;
#else
    return kHeadDim == 64 && !keep_acc ? 2 : 1;
#endif
  }
};

template <int kHeadDim_>
struct BwdTraits {
  static constexpr int kHeadDim = kHeadDim_;
  // A block owns 64 keys (K, V and the dK, dV accumulators stay on chip) and streams 64-query tiles
  // of Q and dO, double-buffered. 8 warps split every product 4 (rows) x 2 (columns), so dK + dV
  // are 2 x 16 x D/2 fp32 per warp: 64 registers per thread at D=128 (FlashAttention-2's sm80
  // backward uses 64 x 128 with 8 warps for D=128; this is the smaller, simpler 64 x 64).
  static constexpr int kWarps = 8;
  static constexpr int kThreads = kWarps * 32;
  static constexpr int kBlockM = 64;  // queries per step
  static constexpr int kBlockN = 64;  // keys per block
  static constexpr int kWarpsM = 4;   // warps along the 64 rows of each product
  static constexpr int kWarpsN = 2;   // warps along its columns
  static constexpr int kLd = kHeadDim + kSmemPad;
  static constexpr int kLdP = kBlockN + kSmemPad;  // P and dS tiles (queries x keys)
  static constexpr int kSmemElems = 2 * kBlockN * kLd        // K, V
                                    + 2 * 2 * kBlockM * kLd  // Q, dO, double-buffered
                                    + 3 * kBlockM * kLdP;    // P, dS and dS's low part (dQ's)
  static constexpr int kSmemBytes = kSmemElems * 2;
};

template <int kHeadDim_>
struct DecodeTraits {
  static constexpr int kHeadDim = kHeadDim_;
  // Decoding has a few rows per kv head (the group's query heads x a few queries, GQA-packed): one 16-row MMA
  // slab, shared by 4 warps that split each key tile 16 keys apiece, so a 64-row or 128-row tile's idle rows cost
  // no tensor-core time while the K/V stream (what decoding is bound by) is read once per block.
  static constexpr int kWarps = 4;
  static constexpr int kThreads = kWarps * 32;
  static constexpr int kBlockM = kMmaM;
  static constexpr int kWarpKeys = 16;  // one k16 step of P V per warp and tile
  static constexpr int kBlockN = kWarps * kWarpKeys;
  static constexpr int kLd = kHeadDim + kSmemPad;
  static constexpr int kSmemQ = kBlockM * kLd;
  static constexpr int kSmemKV = kBlockN * kLd;
  static constexpr int kSmemBytes = (kSmemQ + 4 * kSmemKV) * 2;  // Q, then K and V double-buffered
  // Blocks per SM (__launch_bounds__): decoding hides its K/V loads' latency with other blocks. As many as sm_90's
  // shared memory holds (228 KB: 3 at D = 128, 74 KB each; 5 at D = 64, of which 128 threads' registers allow 4
  // without spills: Q is read from shared memory at every tile rather than held in 32 more registers).
  static constexpr int kMinBlocks = kHeadDim == 64 ? 4 : 3;
  // The warps' (m, l, O) merge through the K/V buffers once the keys are done: O as [warp][n8 tile][lane][4]
  // floats, (m0, m1, l0, l1) as [warp][lane][4].
  static constexpr int kMergeFloats = kWarps * (kHeadDim / 8) * 32 * 4 + kWarps * 32 * 4;
  static_assert(kMergeFloats * 4 <= 4 * kSmemKV * 2, "the warps' merge must fit in the K/V buffers");
  // Splits of the keys (flash-decoding) when batch x kv heads x row tiles leave the GPU idle: enough blocks for
  // kSplitWaves blocks per SM, each split at least kMinSplitTiles key tiles (its pipeline start and the merge's
  // reads must pay off), at most kMaxSplits. Starting points, like every number above; a GPU round tunes them.
  static constexpr int kSplitWaves = 2;
  static constexpr int kMinSplitTiles = 4;
  static constexpr int kMaxSplits = 64;
};

// How many splits of the keys attention_kvcache_fwd runs: `blocks` blocks without splitting, `key_tiles` key tiles
// of the longest sequence, `sms` multiprocessors (host code: the binding sizes the merge's workspaces with it).
template <int kHeadDim>
inline int decode_num_splits(int64_t blocks, int key_tiles, int sms) {
  using Tr = DecodeTraits<kHeadDim>;
  const int64_t want = (int64_t(Tr::kSplitWaves) * sms + blocks - 1) / blocks;
  const int64_t most = key_tiles / Tr::kMinSplitTiles;
  const int64_t n = want < most ? want : most;
  return n < 1 ? 1 : n > Tr::kMaxSplits ? Tr::kMaxSplits : int(n);
}

}  // namespace fastattn::cuda
