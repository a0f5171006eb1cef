// Row-wise stages of the attention backward (memory-bound, one pass each):
//   preprocess: delta = rowsum(dout * out) - dlse; with a gate (out = o * sigmoid(gate)):
//               dO = dout * sigmoid(gate) (what the main kernel multiplies with V and P),
//               dgate = dout * out * (1 - sigmoid(gate)).
//               delta must be rowsum(P * dP) for the P and dP the main kernel computes: then rowsum(dS) =
//               rowsum(P * (dP - delta)) is 0 up to float32 sums, which keeps the exact zeros of dq (saturated
//               rows, repeated keys) and the gradient of a mask broadcast over keys. So out is the forward's
//               float32 out_acc, not out rounded to 8 (bf16) / 11 (fp16) bits, whose error times the scale
//               lands in dq and dk; with a gate, delta = rowsum(dO * o) with dO rounded as the kernel reads it
//               and o = out_acc / sigmoid(gate), the ungated output. Where the softmax saturates (one key j
//               takes the row: o = v_j), dP_j - delta cancels to far below |dP_j|, so delta is taken as dP_j
//               is: o = o_hi + o_lo with o_hi = o rounded to T (v_j itself in such a row), and dO o_hi summed
//               by the same chain of m16n8k16 MMAs, 16 columns at a time from an accumulator of 0, as the main
//               kernel's dO V^T (the tensor cores' sum depends only on those terms and their order: the two
//               agree to the bit), plus dO o_lo in double. So delta - dP_j is dO (o - v_j) as o is stored: 0 in
//               an ungated saturated row; with a gate, o = out_acc / sigmoid(gate) keeps that division's
//               rounding (float32's, not the tensor cores'). The tensor cores cut their sums toward zero, a few
//               times float32's rounding: fp16 rows at scale 20 over repeated queries took dq and dk past
//               docs/CONTRACT.md §4 on an H100 and an H200 with delta summed exactly in double (the emulation
//               shows it with cuda_emu.settings(mma=...)). With dropout, dP Z is the term: all of o in o_lo.
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

constexpr int kWarpsPerBlock = 4;  // one warp per 16 (b, h, i) rows: the MMAs' M

// Lane (g, t) of a warp holds rows g and g + 8 of its 16 and, per 16 columns kk.., columns 2t, 2t + 1, 2t + 8,
// 2t + 9: the A fragment of m16n8k16 (dO) and, rows as the columns of B, both n8 tiles of B (o_hi^T); the
// product's diagonal (delta of row g in tile 0, of row g + 8 in tile 1) lands in lane t = g / 2.
template <typename T, typename TOut>
__global__ void __launch_bounds__(kWarpsPerBlock * 32) attention_bwd_preprocess_kernel(const AttnBwdParams p) {
  const int64_t rows = int64_t(p.B) * p.Hq * p.Lq;
  const int lane = threadIdx.x % 32, g = lane >> 2, t = lane & 3;
  const int64_t row0 = (int64_t(blockIdx.x) * kWarpsPerBlock + threadIdx.x / 32) * 16;
  if (row0 >= rows) return;  // the whole warp: the MMAs below need all 32 lanes

  struct Row {
    const TOut* o;
    const T* dout;
    const T* gate;
    T* do_gated;
    T* dgate;
    bool valid, empty;
  } rw[2];
  const bool headwise = p.gate && p.g_sc == 0;  // one gate logit per row: its gradient is the row's float32 sum
#pragma unroll
  for (int r = 0; r < 2; ++r) {
    const int64_t row = row0 + g + 8 * r;
    Row& x = rw[r];
    x.valid = row < rows;
    const int64_t rr = x.valid ? row : 0;
    const int i = int(rr % p.Lq);
    const int64_t bh = rr / p.Lq;
    const int h = int(bh % p.Hq), b = int(bh / p.Hq);
    x.o = static_cast<const TOut*>(p.out) + b * p.o_sb + h * p.o_sh + int64_t(i) * p.o_sl;
    x.dout = static_cast<const T*>(p.dout) + b * p.do_sb + h * p.do_sh + int64_t(i) * p.do_sl;
    x.gate = p.gate ? static_cast<const T*>(p.gate) + b * p.g_sb + h * p.g_sh + int64_t(i) * p.g_si : nullptr;
    x.do_gated = p.gate ? static_cast<T*>(p.do_gated) + rr * p.D : nullptr;
    x.dgate = p.gate ? static_cast<T*>(p.dgate) + rr * (headwise ? 1 : p.D) : nullptr;
    // A row with no allowed key passes no gradient to v, even through a NaN gate (P = 0, but 0 * NaN in the
    // dV product would be NaN).
    x.empty = x.valid && p.lse[rr] == -INFINITY;
  }

  float chain[2][4] = {{0.f, 0.f, 0.f, 0.f}, {0.f, 0.f, 0.f, 0.f}};  // dO o_hi^T, both n8 tiles
  double lo[2] = {0.0, 0.0};                                          // dO o_lo
  float dgate_sum[2] = {0.f, 0.f};
  for (int kk = 0; kk < p.D / 16; ++kk) {
    float a[2][4], ohi[2][4];  // [row][column]: columns kk*16 + 2t, 2t + 1, 2t + 8, 2t + 9
#pragma unroll
    for (int r = 0; r < 2; ++r) {
      const Row& x = rw[r];
#pragma unroll
      for (int e = 0; e < 4; ++e) {
        const int c = kk * 16 + 2 * t + (e & 1) + 8 * (e >> 1);
        float dv = 0.f, ov = 0.f;  // the row's terms: dO as the main kernel reads it, o ungated
        if (x.valid) {
          const float oc = to_float(x.o[c]), dc = to_float(x.dout[c]);
          if (x.gate) {
            const float s = sigmoidf(to_float(x.gate[int64_t(c) * p.g_sc]));
            const T dg = from_float<T>(x.empty ? 0.f : dc * s);
            x.do_gated[c] = dg;
            const float dgc = dc * oc * (1.f - s);
            if (headwise)
              dgate_sum[r] += dgc;
            else
              x.dgate[c] = from_float<T>(dgc);
            // where sigmoid(gate) = 0 the gated dO is 0 too, and so is its term
            if constexpr (std::is_same_v<TOut, float>)
              dv = to_float(dg), ov = s == 0.f ? 0.f : oc / s;
            else
              dv = dc, ov = oc;  // out rounded: dout * out, both as stored
          } else {
            dv = dc, ov = oc;
          }
        }
        a[r][e] = dv;
        // all of o in o_lo (summed in double) with dropout, and past float16's range
        const float h = to_float(from_float<T>(ov));
        ohi[r][e] = p.dropout || (fabsf(h) == INFINITY && fabsf(ov) != INFINITY) ? 0.f : h;
        lo[r] += double(dv) * (double(ov) - double(ohi[r][e]));
      }
    }
    const uint32_t fa[4] = {pack2<T>(a[0][0], a[0][1]), pack2<T>(a[1][0], a[1][1]), pack2<T>(a[0][2], a[0][3]),
                            pack2<T>(a[1][2], a[1][3])};
    mma_16816<T>(chain[0], fa, pack2<T>(ohi[0][0], ohi[0][1]), pack2<T>(ohi[0][2], ohi[0][3]));
    mma_16816<T>(chain[1], fa, pack2<T>(ohi[1][0], ohi[1][1]), pack2<T>(ohi[1][2], ohi[1][3]));
  }
#pragma unroll
  for (int r = 0; r < 2; ++r) {  // the quad's columns together
#pragma unroll
    for (int m = 1; m <= 2; m <<= 1) {
      lo[r] += __shfl_xor_sync(0xffffffffu, lo[r], m);
      dgate_sum[r] += __shfl_xor_sync(0xffffffffu, dgate_sum[r], m);
    }
  }
  if (t != g / 2) return;
#pragma unroll
  for (int r = 0; r < 2; ++r) {
    const Row& x = rw[r];
    if (!x.valid) continue;
    const int64_t row = row0 + g + 8 * r;
    const float diag = (g & 1) ? chain[r][2 * r + 1] : chain[r][2 * r];
    p.delta[row] = float(double(diag) + lo[r] - (p.dlse ? p.dlse[row] : 0.f));
    if (headwise) x.dgate[0] = from_float<T>(dgate_sum[r]);
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
    const unsigned blocks = unsigned((rows + 16 * kWarpsPerBlock - 1) / (16 * kWarpsPerBlock));
    if (p.out_is_acc)
      attention_bwd_preprocess_kernel<T, float><<<blocks, kWarpsPerBlock * 32, 0, stream>>>(p);
    else
      attention_bwd_preprocess_kernel<T, T><<<blocks, kWarpsPerBlock * 32, 0, stream>>>(p);
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
