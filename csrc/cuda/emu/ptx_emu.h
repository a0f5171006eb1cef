// ptx.h's inline-PTX wrappers, as the CPU emulation runs them (emu.h). Same names and signatures;
// included by ptx.h inside namespace fastattn::cuda when FASTATTN_CUDA_EMU is defined.
#pragma once

#include <type_traits>

__device__ __forceinline__ void cp_async_16(uint32_t dst, const void* src, bool valid) {
  ::fastattn_emu::cp_async(dst, src, 16, valid ? 16 : 0);
}
__device__ __forceinline__ void cp_async_commit() { ::fastattn_emu::cp_async_commit(); }
template <int N>
__device__ __forceinline__ void cp_async_wait() {
  ::fastattn_emu::cp_async_wait(N);
}

__device__ __forceinline__ void ldmatrix_x4(uint32_t (&r)[4], uint32_t addr) {
  ::fastattn_emu::ldmatrix(r, 4, false, addr);
}
__device__ __forceinline__ void ldmatrix_x4_trans(uint32_t (&r)[4], uint32_t addr) {
  ::fastattn_emu::ldmatrix(r, 4, true, addr);
}

template <typename T>
__device__ __forceinline__ void mma_16816(float (&d)[4], const uint32_t (&a)[4], uint32_t b0, uint32_t b1) {
  static_assert(std::is_same_v<T, __half> || std::is_same_v<T, __nv_bfloat16>, "mma.m16n8k16: f16 or bf16");
  const uint32_t b[2] = {b0, b1};
  ::fastattn_emu::mma_m16n8k16(d, a, b, d, std::is_same_v<T, __nv_bfloat16>);
}
