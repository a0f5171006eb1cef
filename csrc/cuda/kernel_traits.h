// Tile sizes of the CUDA attention kernels, in one place.
//
// No GPU measurement exists yet (the first GPU round tunes these). Every number below is
// a starting point with its reason; replace the reason with the measurement when there is one.
// sm_90a builds these same sm_80-style kernels (mma.sync + ldmatrix + cp.async); a wgmma/TMA
// Hopper path is out of scope for now.
#pragma once

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

}  // namespace fastattn::cuda
