// One warp runs csrc/cuda/ptx.h's ldmatrix (plain and .trans), mma.sync and quad reduction on known
// tiles, the way the attention kernels address them, and writes every lane's registers out: on a GPU
// and under the CPU emulation (csrc/cuda/emu/), so that the emulation's fragment layouts are compared
// with the hardware's (tests/test_cuda.py), and D = A B is checked on the CPU (tests/test_cuda_emu.py).
#include <cuda_bf16.h>
#include <cuda_fp16.h>
#include <cuda_runtime.h>

#include <cstring>

#include "ptx.h"

namespace {

using namespace fastattn::cuda;

constexpr int kWords = 17;  // per lane: A, A.trans, B (4 each), D (4 floats as bits), a quad sum

template <typename T>
__global__ void layout_probe_kernel(uint32_t* out) {
  __shared__ __align__(16) T a[16][24];   // A (16 x 16), rows padded by 8 as the kernels' tiles
  __shared__ __align__(16) T bt[16][24];  // B^T: two n8 tiles of B (16 x 8) stored [n][k], as K is
  const int lane = threadIdx.x;
  for (int e = lane; e < 16 * 16; e += 32) {
    const int i = e / 16, j = e % 16;
    a[i][j] = from_float<T>(float(i * 16 + j));                 // exact in fp16 and bf16
    bt[i][j] = from_float<T>(float((i * 7 + j * 3) % 17 - 8));  // small signed integers
  }
  __syncthreads();
  uint32_t ra[4], rat[4], rb[4];
  ldmatrix_x4(ra, smem_addr(&a[(lane & 7) + ((lane >> 3) & 1) * 8][(lane >> 4) * 8]));
  ldmatrix_x4_trans(rat, smem_addr(&a[(lane & 7) + ((lane >> 3) & 1) * 8][(lane >> 4) * 8]));
  ldmatrix_x4(rb, smem_addr(&bt[(lane & 7) + ((lane >> 4) & 1) * 8][((lane >> 3) & 1) * 8]));
  float d[4] = {0.f, 0.f, 0.f, 0.f};
  mma_16816<T>(d, ra, rb[0], rb[1]);  // D = A B, B = the first n8 tile of B
  const float q = quad_sum(float(lane));
  uint32_t* o = out + lane * kWords;
  for (int r = 0; r < 4; ++r) o[r] = ra[r], o[4 + r] = rat[r], o[8 + r] = rb[r];
  memcpy(o + 12, d, sizeof(d));
  memcpy(o + 16, &q, sizeof(q));
}

}  // namespace

// out: 32 x kWords uint32 (device memory on a GPU)
extern "C" cudaError_t fastattn_layout_probe(int bf16, uint32_t* out) {
  if (bf16)
    layout_probe_kernel<__nv_bfloat16><<<1, 32>>>(out);
  else
    layout_probe_kernel<__half><<<1, 32>>>(out);
  return cudaGetLastError();
}
