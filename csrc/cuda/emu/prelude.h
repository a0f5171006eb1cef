// Included first (g++ -include) in every kernel translation unit of the CUDA emulation (emu.h):
// CUDA's own headers in host mode for the types (__half, __nv_bfloat16, dim3, uint4, cudaError_t),
// then the qualifiers, built-in variables and device functions the kernels use, mapped onto the
// emulation runtime.
#pragma once

#include <cuda_bf16.h>
#include <cuda_fp16.h>
#include <cuda_runtime.h>

#include <cmath>
#include <cstdint>
#include <cstring>
#include <tuple>
#include <type_traits>
#include <utility>

#include "emu.h"

// host_defines.h maps these onto attributes g++ does not know
#undef __global__
#undef __device__
#undef __host__
#undef __forceinline__
#undef __launch_bounds__
#undef __align__
#define __global__
#define __device__
#define __host__
#define __forceinline__ inline __attribute__((always_inline))
#define __launch_bounds__(...)
#define __align__(n) alignas(n)

#define threadIdx (::fastattn_emu::thread_idx())
#define blockIdx (::fastattn_emu::block_idx())
#define blockDim (::fastattn_emu::block_dim())
#define gridDim (::fastattn_emu::grid_dim())

// The CUDA runtime calls, on the emulation's runtime. Macros, not definitions of the CUDA names: in a
// process that has CUDA's real runtime loaded (torch's CUDA builds) those would bind to it.
template <typename T>
inline cudaError_t fastattn_emu_func_set_attribute(T* func, cudaFuncAttribute attr, int value) {
  return ::fastattn_emu::func_set_attribute(reinterpret_cast<const void*>(func), attr, value);
}
#define cudaFuncSetAttribute fastattn_emu_func_set_attribute
#define cudaGetLastError ::fastattn_emu::get_last_error

// Inlined, so that the runtime sees each call site of the kernel code as its own return address.
__attribute__((always_inline)) inline void __syncthreads() { ::fastattn_emu::syncthreads(); }
inline float __shfl_xor_sync(unsigned mask, float v, int lane_mask, int width = 32) {
  return ::fastattn_emu::shfl_xor(mask, v, lane_mask, width);
}
inline int __shfl_xor_sync(unsigned mask, int v, int lane_mask, int width = 32) {
  return ::fastattn_emu::shfl_xor(mask, v, lane_mask, width);
}
inline unsigned __shfl_xor_sync(unsigned mask, unsigned v, int lane_mask, int width = 32) {
  return ::fastattn_emu::shfl_xor(mask, v, lane_mask, width);
}
inline double __shfl_xor_sync(unsigned mask, double v, int lane_mask, int width = 32) {  // two 32-bit halves
  uint64_t bits;
  std::memcpy(&bits, &v, 8);
  const uint64_t lo = ::fastattn_emu::shfl_xor(mask, unsigned(bits), lane_mask, width);
  const uint64_t hi = ::fastattn_emu::shfl_xor(mask, unsigned(bits >> 32), lane_mask, width);
  bits = hi << 32 | lo;
  std::memcpy(&v, &bits, 8);
  return v;
}
inline float atomicAdd(float* address, float v) { return ::fastattn_emu::atomic_add(address, v); }
inline size_t __cvta_generic_to_shared(const void* p) { return ::fastattn_emu::cvta_generic_to_shared(p); }

// The fast-math intrinsics: the host's correctly rounded functions (the hardware's approximations
// differ in the last bits; emu.h lists that among what the emulation cannot show).
inline float __expf(float x) { return std::exp(x); }
inline float __log2f(float x) { return std::log2(x); }

// CUDA's integer min/max device overloads
inline int min(int a, int b) { return a < b ? a : b; }
inline int max(int a, int b) { return a > b ? a : b; }
inline unsigned min(unsigned a, unsigned b) { return a < b ? a : b; }
inline unsigned max(unsigned a, unsigned b) { return a > b ? a : b; }
inline long long min(long long a, long long b) { return a < b ? a : b; }
inline long long max(long long a, long long b) { return a > b ? a : b; }
inline long min(long a, long b) { return a < b ? a : b; }
inline long max(long a, long b) { return a > b ? a : b; }

namespace fastattn_emu {

// `kernel<<<grid, block, smem, stream>>>(args...)` (translate.py writes this call): the arguments are
// converted to the kernel's parameter types once, here, and every thread calls the kernel with them.
template <typename... Params, typename... Args>
void launch(void (*kernel)(Params...), dim3 grid, dim3 block, size_t smem, cudaStream_t, Args&&... args) {
  struct Call {
    void (*kernel)(Params...);
    std::tuple<std::decay_t<Params>...> args;
  } call{kernel, std::tuple<std::decay_t<Params>...>(std::forward<Args>(args)...)};
  run_launch(reinterpret_cast<const void*>(kernel), grid, block, smem,
             [](void* ctx) {
               Call* c = static_cast<Call*>(ctx);
               std::apply(c->kernel, c->args);
             },
             &call);
}

// `__shared__ T name[...]` inside a kernel (translate.py): one object per declaration and block.
template <typename T>
T& shared_object(const char* key) {
  return *static_cast<T*>(static_smem(key, sizeof(T), alignof(T) < 16 ? 16 : alignof(T)));
}

}  // namespace fastattn_emu
