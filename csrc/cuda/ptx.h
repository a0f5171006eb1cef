// Inline-PTX building blocks of the attention kernels (sm_80+): cp.async, ldmatrix, mma.sync.
//
// Fragment layouts of mma.sync.aligned.m16n8k16 (PTX ISA, "Matrix fragments for mma.m16n8k16"),
// with g = lane / 4 (groupID) and t = lane % 4 (threadID_in_group):
//   A 16x16 (row): a0 = A[g][2t..2t+1], a1 = A[g+8][2t..2t+1], a2 = A[g][2t+8..], a3 = A[g+8][2t+8..]
//   B 16x8 (col):  b0 = B[2t..2t+1][g], b1 = B[2t+8..2t+9][g]           (k x n, pairs along k)
//   C 16x8 fp32:   c0, c1 = C[g][2t, 2t+1], c2, c3 = C[g+8][2t, 2t+1]
// ldmatrix.m8n8.x4 gives lane l, for each of its 4 matrices (row addresses from lanes 8i..8i+7),
// the pair M[l/4][2(l%4)..+1]; with .trans the pair M[2(l%4)..+1][l/4]. So a row-major tile whose
// rows are the fragment's "row" index loads without .trans (A of Q, B of K), and a tile stored
// k-major (V as [key][d] for P V) loads with .trans.
#pragma once

#include <cuda_bf16.h>
#include <cuda_fp16.h>

#include <cstdint>
#include <cstring>
#include <type_traits>

namespace fastattn::cuda {

__device__ __forceinline__ uint32_t smem_addr(const void* p) {
  return static_cast<uint32_t>(__cvta_generic_to_shared(p));
}

#ifdef FASTATTN_CUDA_EMU
// The CPU emulation (emu/emu.h) runs the inline-PTX wrappers below as the PTX ISA defines them.
#include "emu/ptx_emu.h"
#else
// 16-byte global -> shared copy that bypasses L1; zero-fills the 16 bytes when !valid (src unread).
__device__ __forceinline__ void cp_async_16(uint32_t dst, const void* src, bool valid) {
  const int src_bytes = valid ? 16 : 0;
  asm volatile("cp.async.cg.shared.global [%0], [%1], 16, %2;\n" ::"r"(dst), "l"(src), "r"(src_bytes) : "memory");
}
__device__ __forceinline__ void cp_async_commit() { asm volatile("cp.async.commit_group;\n" ::: "memory"); }
// Wait until at most N of this thread's committed groups are pending.
template <int N>
__device__ __forceinline__ void cp_async_wait() {
  asm volatile("cp.async.wait_group %0;\n" ::"n"(N) : "memory");
}

__device__ __forceinline__ void ldmatrix_x4(uint32_t (&r)[4], uint32_t addr) {
  asm volatile("ldmatrix.sync.aligned.m8n8.x4.shared.b16 {%0, %1, %2, %3}, [%4];\n"
               : "=r"(r[0]), "=r"(r[1]), "=r"(r[2]), "=r"(r[3])
               : "r"(addr)
               : "memory");
}
__device__ __forceinline__ void ldmatrix_x4_trans(uint32_t (&r)[4], uint32_t addr) {
  asm volatile("ldmatrix.sync.aligned.m8n8.x4.trans.shared.b16 {%0, %1, %2, %3}, [%4];\n"
               : "=r"(r[0]), "=r"(r[1]), "=r"(r[2]), "=r"(r[3])
               : "r"(addr)
               : "memory");
}

// D = A B + D, 16x8x16, fp32 accumulate.
template <typename T>
__device__ __forceinline__ void mma_16816(float (&d)[4], const uint32_t (&a)[4], uint32_t b0, uint32_t b1);

template <>
__device__ __forceinline__ void mma_16816<__half>(float (&d)[4], const uint32_t (&a)[4], uint32_t b0, uint32_t b1) {
  asm volatile(
      "mma.sync.aligned.m16n8k16.row.col.f32.f16.f16.f32 {%0, %1, %2, %3}, {%4, %5, %6, %7}, {%8, %9}, "
      "{%0, %1, %2, %3};\n"
      : "+f"(d[0]), "+f"(d[1]), "+f"(d[2]), "+f"(d[3])
      : "r"(a[0]), "r"(a[1]), "r"(a[2]), "r"(a[3]), "r"(b0), "r"(b1));
}
template <>
__device__ __forceinline__ void mma_16816<__nv_bfloat16>(float (&d)[4], const uint32_t (&a)[4], uint32_t b0,
                                                         uint32_t b1) {
  asm volatile(
      "mma.sync.aligned.m16n8k16.row.col.f32.bf16.bf16.f32 {%0, %1, %2, %3}, {%4, %5, %6, %7}, {%8, %9}, "
      "{%0, %1, %2, %3};\n"
      : "+f"(d[0]), "+f"(d[1]), "+f"(d[2]), "+f"(d[3])
      : "r"(a[0]), "r"(a[1]), "r"(a[2]), "r"(a[3]), "r"(b0), "r"(b1));
}
#endif  // FASTATTN_CUDA_EMU

// Zeroes MMA accumulator fragments (n8 tiles x the 4 floats a thread holds of each).
template <int N>
__device__ __forceinline__ void zero_fragments(float (&acc)[N][4]) {
#pragma unroll
  for (int i = 0; i < N; ++i)
#pragma unroll
    for (int e = 0; e < 4; ++e) acc[i][e] = 0.f;
}

// c0 += A B[:, 0:8] and c1 += A B[:, 8:16] for the 16x16 B tile b that one ldmatrix_x4 loaded (b0, b1 of its
// first n8 tile, then of its second).
template <typename T>
__device__ __forceinline__ void mma_16816_n16(float (&c0)[4], float (&c1)[4], const uint32_t (&a)[4],
                                              const uint32_t (&b)[4]) {
  mma_16816<T>(c0, a, b[0], b[1]);
  mma_16816<T>(c1, a, b[2], b[3]);
}

// Two floats -> one 32-bit register of two 16-bit values (lo = first, the lower column).
template <typename T>
__device__ __forceinline__ uint32_t pack2(float lo, float hi);
template <>
__device__ __forceinline__ uint32_t pack2<__half>(float lo, float hi) {
  const __half2 h = __floats2half2_rn(lo, hi);
  uint32_t r;
  memcpy(&r, &h, sizeof(r));  // not *reinterpret_cast<uint32_t*>(&h): reading an object through another type
  return r;
}
template <>
__device__ __forceinline__ uint32_t pack2<__nv_bfloat16>(float lo, float hi) {
  const __nv_bfloat162 h = __floats2bfloat162_rn(lo, hi);
  uint32_t r;
  memcpy(&r, &h, sizeof(r));
  return r;
}

template <typename T>
__device__ __forceinline__ float to_float(T x) {
  if constexpr (std::is_same_v<T, __half>) return __half2float(x);
  else if constexpr (std::is_same_v<T, __nv_bfloat16>) return __bfloat162float(x);
  else return x;  // float
}

template <typename T>
__device__ __forceinline__ T from_float(float x) {
  static_assert(std::is_same_v<T, __half> || std::is_same_v<T, __nv_bfloat16>, "from_float: half or bfloat16");
  if constexpr (std::is_same_v<T, __half>) return __float2half_rn(x);
  else return __float2bfloat16_rn(x);
}

// Two floats x, y -> (hi, lo) register pairs with x = hi + lo (and y) to ~16 (bf16) / ~22 (fp16) bits: hi
// rounded to T, lo what that rounding left, rounded to T. Two MMAs, one with each, carry what one with hi
// alone rounds away (a value of 1 - 2^-12 is 1 in bfloat16).
template <typename T>
__device__ __forceinline__ void split2(float x, float y, uint32_t& hi, uint32_t& lo) {
  const float hx = to_float(from_float<T>(x)), hy = to_float(from_float<T>(y));
  hi = pack2<T>(hx, hy);
  lo = pack2<T>(x - hx, y - hy);
}

__device__ __forceinline__ float sigmoidf(float x) { return 1.f / (1.f + __expf(-x)); }

// Reductions over the 4 lanes of a quad (the lanes that share an MMA accumulator row).
__device__ __forceinline__ float quad_max(float x) {
  x = fmaxf(x, __shfl_xor_sync(0xffffffffu, x, 1));
  return fmaxf(x, __shfl_xor_sync(0xffffffffu, x, 2));
}
__device__ __forceinline__ float quad_sum(float x) {
  x += __shfl_xor_sync(0xffffffffu, x, 1);
  return x + __shfl_xor_sync(0xffffffffu, x, 2);
}
template <typename F>  // float, or double (CUDA shuffles it as two 32-bit halves)
__device__ __forceinline__ F warp_sum(F x) {
#pragma unroll
  for (int o = 16; o > 0; o >>= 1) x += __shfl_xor_sync(0xffffffffu, x, o);
  return x;
}
__device__ __forceinline__ float warp_max(float x) {
#pragma unroll
  for (int o = 16; o > 0; o >>= 1) x = fmaxf(x, __shfl_xor_sync(0xffffffffu, x, o));
  return x;
}

// Copies a kRows x kCols tile (rows of a global tensor with row stride `row_stride` elements) into
// shared memory with row length kLd, 16 bytes per cp.async; rows >= rows_valid are zero-filled.
// Requires: g 16-byte aligned, row_stride % 8 == 0 (checked by binding.cpp).
template <int kRows, int kCols, int kLd, int kThreads, typename T>
__device__ __forceinline__ void cp_async_tile(T* s, const T* g, int64_t row_stride, int rows_valid, int tid) {
  constexpr int kChunks = kCols / 8;  // 16-byte chunks per row
  static_assert((kRows * kChunks) % kThreads == 0, "tile chunks must split evenly over the threads");
#pragma unroll
  for (int i = 0; i < kRows * kChunks / kThreads; ++i) {
    const int idx = i * kThreads + tid;
    const int r = idx / kChunks, c = (idx % kChunks) * 8;
    const bool valid = r < rows_valid;
    cp_async_16(smem_addr(s + r * kLd + c), valid ? g + r * row_stride + c : g, valid);
  }
}

}  // namespace fastattn::cuda
