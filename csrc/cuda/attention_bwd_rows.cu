// Row-wise stages of the attention backward (memory-bound, one pass each):
//   preprocess: delta = rowsum(dout * out) - dlse; with a gate (out = o * sigmoid(gate)):
//               dO = dout * sigmoid(gate) (what the main kernel multiplies with V and P),
//               dgate = dout * out * (1 - sigmoid(gate)).
//               delta must be rowsum(P * dP) for the P and dP the main kernel computes: then rowsum(dS) =
//               rowsum(P * (dP - delta)) is 0 up to float32 sums, which keeps the exact zeros of dq (saturated
//               rows, repeated keys) and the gradient of a mask broadcast over keys. So out is the forward's
//               float32 out_acc, not out rounded to 8 (bf16) / 11 (fp16) bits, whose error times the scale
//               lands in dq and dk; with a gate, delta = rowsum(dO * o) with dO rounded as the kernel reads it
//               and o = out_acc / sigmoid(gate), the ungated output. The row's sum is taken in double: where
//               the softmax saturates, dP - delta cancels to far below |dP|, and a float32 sum's rounding
//               (~2^-24 sum |dO o|) took fp16 dq / dk of 130 repeated query rows at scale 20 past
//               docs/CONTRACT.md §4 under the emulation; this pass is memory-bound.
//   convert:    dq = scale * dq_accum (summed over its slices), in q's dtype
#include <cuda_bf16.h>
#include <cuda_fp16.h>
#include <cuda_runtime.h>

#include <type_traits>

#include "params.h"
#include "ptx.h"
#include "static_switch.h"

namespace fastattn::cuda {
namespace {

constexpr int kRowsPerBlock = 8;  // one warp per (b, h, i) row

template <typename T, typename TOut>
__global__ void __launch_bounds__(kRowsPerBlock * 32) attention_bwd_preprocess_kernel(const AttnBwdParams p) {
  const int64_t rows = int64_t(p.B) * p.Hq * p.Lq;
  const int64_t row = int64_t(blockIdx.x) * kRowsPerBlock + threadIdx.x / 32;
  const int lane = threadIdx.x % 32;
  if (row >= rows) return;
  const int i = int(row % p.Lq);
  const int64_t bh = row / p.Lq;
  const int h = int(bh % p.Hq), b = int(bh / p.Hq);
  const TOut* o = static_cast<const TOut*>(p.out) + b * p.o_sb + h * p.o_sh + int64_t(i) * p.o_sl;
  const T* dout = static_cast<const T*>(p.dout) + b * p.do_sb + h * p.do_sh + int64_t(i) * p.do_sl;
  const T* gate = p.gate ? static_cast<const T*>(p.gate) + b * p.g_sb + h * p.g_sh + int64_t(i) * p.g_si : nullptr;
  T* do_gated = p.gate ? static_cast<T*>(p.do_gated) + row * p.D : nullptr;
  const bool headwise = p.gate && p.g_sc == 0;  // one gate logit per row: its gradient is the row's float32 sum
  T* dgate = p.gate ? static_cast<T*>(p.dgate) + row * (headwise ? 1 : p.D) : nullptr;

  // A row with no allowed key passes no gradient to v, even through a NaN gate (P = 0, but 0 * NaN in the
  // dV product would be NaN).
  const bool empty = p.lse[row] == -INFINITY;
  double dot = 0.0;
  float dgate_sum = 0.f;
  for (int c = lane; c < p.D; c += 32) {
    const float oc = to_float(o[c]), dc = to_float(dout[c]);
    if (gate) {
      const float s = sigmoidf(to_float(gate[int64_t(c) * p.g_sc]));
      const T dg = from_float<T>(empty ? 0.f : dc * s);
      do_gated[c] = dg;
      const float dgc = dc * oc * (1.f - s);
      if (headwise)
        dgate_sum += dgc;
      else
        dgate[c] = from_float<T>(dgc);
      // where sigmoid(gate) = 0 the gated dO is 0 too, and so is its term
      dot += std::is_same_v<TOut, float> ? (s == 0.f ? 0.0 : double(to_float(dg)) * (oc / s)) : double(oc) * dc;
    } else {
      dot += double(oc) * dc;
    }
  }
  dot = warp_sum(dot);
  if (lane == 0) p.delta[row] = float(dot - (p.dlse ? p.dlse[row] : 0.f));
  if (headwise) {
    dgate_sum = warp_sum(dgate_sum);
    if (lane == 0) dgate[0] = from_float<T>(dgate_sum);
  }
}

template <typename T>
__global__ void attention_bwd_convert_dq_kernel(const float* __restrict__ acc, T* __restrict__ dq, int64_t n,
                                                int splits, float scale) {
  for (int64_t idx = int64_t(blockIdx.x) * blockDim.x + threadIdx.x; idx < n; idx += int64_t(gridDim.x) * blockDim.x) {
    float sum = acc[idx];
    for (int s = 1; s < splits; ++s) sum += acc[s * n + idx];  // in order: the same bits every run
    dq[idx] = from_float<T>(sum * scale);
  }
}

int grid_for(int64_t n, int threads) {
  const int64_t blocks = (n + threads - 1) / threads;
  return int(blocks < 65536 ? (blocks > 0 ? blocks : 1) : 65536);
}

}  // namespace

cudaError_t attention_bwd_preprocess(const AttnBwdParams& p, cudaStream_t stream) {
  const int64_t rows = int64_t(p.B) * p.Hq * p.Lq;
  if (rows == 0) return cudaSuccess;
  FA_DTYPE_SWITCH(p.is_bf16, T, [&] {
    const unsigned blocks = unsigned((rows + kRowsPerBlock - 1) / kRowsPerBlock);
    if (p.out_is_acc)
      attention_bwd_preprocess_kernel<T, float><<<blocks, kRowsPerBlock * 32, 0, stream>>>(p);
    else
      attention_bwd_preprocess_kernel<T, T><<<blocks, kRowsPerBlock * 32, 0, stream>>>(p);
  });
  return cudaGetLastError();
}

cudaError_t attention_bwd_convert_dq(const AttnBwdParams& p, cudaStream_t stream) {
  const int64_t n = int64_t(p.B) * p.Hq * p.Lq * p.D;
  if (n == 0) return cudaSuccess;
  FA_DTYPE_SWITCH(p.is_bf16, T, [&] {
    attention_bwd_convert_dq_kernel<T>
        <<<grid_for(n, 256), 256, 0, stream>>>(p.dq_accum, static_cast<T*>(p.dq), n, p.dq_splits, p.scale);
  });
  return cudaGetLastError();
}

}  // namespace fastattn::cuda
