// The CUDA emulation: runs the kernels of csrc/cuda/ on the CPU, one thread block at a time, so
// that their results and their use of shared memory, warp collectives and cp.async are checked on
// every CI run without a GPU.
//
// How a kernel runs here (runtime.cpp):
//   - every CUDA thread of a block is a fiber (its own stack, cooperatively scheduled); a fiber runs
//     until it reaches __syncthreads, a warp collective, or its end. __syncthreads is a barrier of
//     the block's live threads; nothing runnable while threads still wait is reported as a deadlock.
//   - warp collectives (ldmatrix, mma.sync, __shfl_xor_sync) are computed when the last lane of the
//     warp arrives, from the fragment layouts of NVIDIA's PTX ISA (written from that text, not from
//     ptx.h's comments: the emulation is an independent check of them). All lanes of a warp must
//     reach the same collective.
//   - cp.async copies land when the issuing thread's cp.async.wait_group retires their group (the
//     latest moment the PTX ISA allows), zero-filled past src-size; until then any touch of their
//     destination is an error.
//   - every memory access of the kernel code (compiled with GCC's ThreadSanitizer instrumentation,
//     whose hooks __tsan_read*/__tsan_write* are implemented here, not by libtsan) is checked:
//     shared memory within the bytes the launch declared, naturally aligned, and free of races (two
//     threads touch one byte within one barrier interval, one of them writing); global memory
//     inside the tensors of the call (inputs read-only) and naturally aligned.
//   - shared memory is filled with NaN (0xff bytes) at the start of every block; dynamic shared
//     memory over 48 KB needs cudaFuncSetAttribute, and static + dynamic must fit the emulated
//     architecture (sm_80: 166,912 B, sm_90: 232,448 B).
//
// What it cannot show: timing, bank conflicts, register counts and spills, occupancy, races between
// blocks in global memory (blocks run one after another), the tensor cores' own rounding of the
// fp32 sum in mma to the bit (by default exact products summed in double, rounded once; a model of
// their truncating sum on request: fastattn_emu_set_mma), fast-math differences of the hardware's
// exp2/log2 approximations and of FMA contraction, and any behaviour of instructions the kernels do not use.
//
// Kernel sources stay what nvcc compiles: translate.py rewrites `<<<...>>>` launches and
// `__shared__` declarations, prelude.h maps the CUDA qualifiers and built-ins, ptx.h's inline-PTX
// wrappers have their emulated twins in ptx_emu.h.
#pragma once

#include <cuda_runtime_api.h>

#include <cstddef>
#include <cstdint>

namespace fastattn_emu {

// -- launches (prelude.h's launch() template calls this; `thunk(ctx)` runs the kernel in one thread)
cudaError_t run_launch(const void* kernel, dim3 grid, dim3 block, size_t dyn_smem, void (*thunk)(void*), void* ctx);

// -- what a running thread sees
dim3 thread_idx();
dim3 block_idx();
dim3 block_dim();
dim3 grid_dim();
unsigned char* dynamic_smem();
// Static __shared__ storage of `bytes` for the declaration named `key` (one per declaration, shared by
// the block's threads).
void* static_smem(const char* key, size_t bytes, size_t align);

// -- synchronisation and collectives
// Every thread of the block must wait at the same call (its return address tells them apart).
void syncthreads();
float shfl_xor(unsigned mask, float v, int lane_mask, int width);
int shfl_xor(unsigned mask, int v, int lane_mask, int width);
unsigned shfl_xor(unsigned mask, unsigned v, int lane_mask, int width);
float atomic_add(float* address, float v);

// -- inline PTX (ptx_emu.h)
uint32_t cvta_generic_to_shared(const void* p);
void cp_async(uint32_t dst, const void* src, int cp_size, int src_size);
void cp_async_commit();
void cp_async_wait(int n);
// ldmatrix.sync.aligned.m8n8.{x1,x2,x4}[.trans].shared.b16
void ldmatrix(uint32_t* r, int num, bool trans, uint32_t addr);
// mma.sync.aligned.m16n8k16.row.col.f32.{f16,bf16}.{f16,bf16}.f32
void mma_m16n8k16(float* d, const uint32_t* a, const uint32_t* b, const float* c, bool bf16);

// Global memory the kernels may touch: the tensors of the call (inputs read-only) and what the
// binding allocates during it (binding_emu.h registers both). Anything else is an error.
void register_buffer(const void* p, size_t bytes, bool writable);
void unregister_buffer(const void* p, bool writable);
// The kernels' host entry points in use (a KernelTable of host_entries.h), or nullptr.
const void* kernel_table();

// The CUDA runtime calls of the kernels and the binding (cudaFuncSetAttribute, cudaGetLastError,
// cudaDeviceGetAttribute), under names of their own: see prelude.h.
cudaError_t func_set_attribute(const void* func, cudaFuncAttribute attr, int value);
cudaError_t get_last_error();
cudaError_t device_get_attribute(int* value, cudaDeviceAttr attr, int device);

// Records an error for the running launch (the launch returns cudaErrorLaunchFailure and the
// message says what); inside a kernel thread it does not return.
[[noreturn]] void fail(const char* fmt, ...);

}  // namespace fastattn_emu

// -- the control surface, for the driver (tests/cuda_emu.py through ctypes)
extern "C" {
// 80 or 90: the architecture whose limits apply. Returns the previous one.
int fastattn_emu_set_arch(int sm);
// 0: threads in index order, 1: reversed, 2 + seed: a seeded random order; the order in which the
// scheduler resumes runnable threads (and runs blocks). Returns the previous value.
int fastattn_emu_set_schedule(int schedule);
// n > 0: each launch runs only its first n and last n blocks (linear block order), the rest of its grid
// skipped: the far end of a grid too large to emulate whole. 0: every block. Returns the previous value.
int64_t fastattn_emu_set_block_ends(int64_t n);
// block > 0: mma.sync sums as the tensor cores do, each group of `block` products cut `bits` bits below its
// largest term (runtime.cpp: truncating_sum); 0: exactly, rounded once. Returns the previous block * 256 + bits, or
// -1 (nothing changed) unless block is 0 or divides 16 and bits is in [0, 52].
int fastattn_emu_set_mma(int block, int bits);
// The kernels' shared object to run (a build of csrc/cuda/*.cu, or of a mutated copy). Returns 0 on
// success, else -1 (fastattn_emu_last_error says why).
int fastattn_emu_use_kernels(const char* path);
// Global memory for kernels called directly (the tests' probes): see register_buffer.
void fastattn_emu_register_buffer(void* p, size_t bytes, int writable);
void fastattn_emu_unregister_buffer(void* p, int writable);
// The message of the last failed launch or call ("" when none).
const char* fastattn_emu_last_error();
// Counters since the last reset: launches, blocks, threads, context switches, warp collectives.
void fastattn_emu_stats(int64_t* out5, int reset);
}
