// Compile-time switches: turn a run-time value into a constexpr for the lambda body, so that one
// call site instantiates each variant. Every switch of the CUDA kernels goes through these.
//
// What the attention kernels specialise, and why the rest stays a run-time test (Triton specialises
// causal and the mask kind as constexprs too: it compiles per launch signature anyway, where this build
// compiles every variant ahead of time and each switch doubles the kernels, nvcc time and binary):
//   compile time: dtype, head dim (one file each), whether there is a mask (kHasMask: a mask load per
//     score), whether out_acc is kept (kKeepAcc: the P V of the forward), whether the scores are modified
//     (kScoreMods: a left window, softcap or ALiBi; compiled in, those paths took 6-70 more registers in
//     every kernel, e.g. the D 128 backward 176 -> 245 and the D 64 forward 128 -> 142-161);
//   run time, uniform over the grid: causal, which sets each block's tile range and is tested per
//     element only on the tiles that cross the diagonal or the end of the keys (scale_and_mask's
//     check_bounds; interior tiles skip every test); bool vs bias, one warp-uniform branch per score
//     inside the kHasMask kernels; the gate, read in the epilogue (forward) and the row preparation
//     (backward), outside the tile loop.
// A GPU round that measures one of the run-time tests on the hot path turns it into a switch here.
#pragma once

#include <cuda_runtime_api.h>

#include <cstdint>

#define FA_BOOL_SWITCH(COND, NAME, ...)   \
  [&] {                                   \
    if (COND) {                           \
      constexpr static bool NAME = true;  \
      return __VA_ARGS__();               \
    } else {                              \
      constexpr static bool NAME = false; \
      return __VA_ARGS__();               \
    }                                     \
  }()

// T = __half or __nv_bfloat16
#define FA_DTYPE_SWITCH(IS_BF16, T, ...) \
  [&] {                                  \
    if (IS_BF16) {                       \
      using T = __nv_bfloat16;           \
      return __VA_ARGS__();              \
    } else {                             \
      using T = __half;                  \
      return __VA_ARGS__();              \
    }                                    \
  }()

// Launches one instance of a kernel with `smem_bytes` of dynamic shared memory, which it opts in to first
// (every request above 48 KB needs that; below, it is harmless). Returns the launch's error.
template <typename Kernel, typename Params>
cudaError_t launch_with_smem(Kernel kernel, dim3 grid, int threads, int smem_bytes, const Params& p,
                             cudaStream_t stream) {
  cudaError_t err = cudaFuncSetAttribute(kernel, cudaFuncAttributeMaxDynamicSharedMemorySize, smem_bytes);
  if (err != cudaSuccess) return err;
  kernel<<<grid, threads, smem_bytes, stream>>>(p);
  return cudaGetLastError();
}

// Grids of (tile, slice) blocks put n_tiles x slices blocks on the x axis, tiles fastest: the order of an
// (n_tiles, slices) grid, without the 65535 bound of the y and z axes (slices count B * H, or batch items).
// Past the x axis' 2^31 - 1 the grid is empty, so that the launch fails instead of wrapping around.
inline dim3 tiles_grid(int64_t n_tiles, int64_t slices) {
  const int64_t blocks = n_tiles * slices;
  return dim3(blocks <= 2147483647 ? unsigned(blocks) : 0u);
}

struct GridTile {
  int tile, slice;
};
// This block's place in a tiles_grid(n_tiles, ...).
__device__ __forceinline__ GridTile grid_tile(int n_tiles) {
  return {int(blockIdx.x % unsigned(n_tiles)), int(blockIdx.x / unsigned(n_tiles))};
}
