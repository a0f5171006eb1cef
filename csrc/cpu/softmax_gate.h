// CPU kernels for fastattn.softmax_gate and fastattn.score_softmax_gate (SPEC §1.2).
//
// Shapes (B batch items, N positions, D channels, H heads, H divides D, channel c belongs to head c / (D / H)):
//   x       (B, N, D)   any strides with stride(-1) == 1
//   scores  (B, N, H)   any strides with stride(-1) == 1; same dtype as x
//   weight  (H, D)      any row stride, stride(-1) == 1; same dtype as x
//   mask    (B, N)      bool, optional, True = position takes part
//   alpha   (B, N, H)   contiguous, float32 (float64 for float64 x): softmax over n of the (masked) scores
//   dalpha  (B, N, H)   optional gradient of the returned alpha, contiguous, alpha's dtype
//   y, dy   (B, N, D), or (B, D) when pool
//
// Math:
//   alpha[b, :, h] = softmax_n(scores[b, :, h]) over unmasked n, 0 at masked n, all 0 when every n is masked
//   y[b, n, c] = alpha[b, n, h(c)] * x[b, n, c]          (pool = false)
//   y[b, c]    = sum_n alpha[b, n, h(c)] * x[b, n, c]    (pool = true)
//   score_softmax_gate: scores[b, n, h] = scale * sum_c x[b, n, c] * weight[h, c]
//
// Backward:
//   g[b, n, h]       = sum_{c in h} dy[b, (n,) c] * x[b, n, c]  (+ dalpha)
//   dscores[b, n, h] = alpha[b, n, h] * (g[b, n, h] - sum_n' alpha[b, n', h] * g[b, n', h])
//   dx[b, n, c]      = dy[b, (n,) c] * alpha[b, n, h(c)]  (+ scale * sum_h dscores[b, n, h] * weight[h, c])
//   dweight[h, c]    = scale * sum_{b, n} dscores[b, n, h] * x[b, n, c]
//
// dtypes float32, float64, bfloat16, float16; statistics and accumulators in float (double for float64).
#pragma once

#include <ATen/ATen.h>

#include <optional>
#include <tuple>

namespace fastattn::cpu {

// Returns (y, alpha): y in x's dtype, contiguous, (B, N, D) or (B, D) if pool; alpha (B, N, H) contiguous,
// float32 (float64 for float64 x).
std::tuple<at::Tensor, at::Tensor> softmax_gate_fwd(const at::Tensor& scores, const at::Tensor& x,
                                                    const std::optional<at::Tensor>& mask, bool pool);

// Returns (dscores, dx): dscores (B, N, H) in scores' (= x's) dtype, dx (B, N, D) in x's dtype, contiguous.
std::tuple<at::Tensor, at::Tensor> softmax_gate_bwd(const at::Tensor& dy, const at::Tensor& x, const at::Tensor& alpha,
                                                    const std::optional<at::Tensor>& dalpha, bool pool);

// Returns (y, alpha) as softmax_gate_fwd, with scores = scale * x @ weight^T made inside the kernel.
std::tuple<at::Tensor, at::Tensor> score_softmax_gate_fwd(const at::Tensor& x, const at::Tensor& weight,
                                                          const std::optional<at::Tensor>& mask, double scale,
                                                          bool pool);

// Returns (dx, dweight): dx (B, N, D) in x's dtype, dweight (H, D) in weight's dtype, contiguous.
std::tuple<at::Tensor, at::Tensor> score_softmax_gate_bwd(const at::Tensor& dy, const at::Tensor& x,
                                                          const at::Tensor& weight, const at::Tensor& alpha,
                                                          const std::optional<at::Tensor>& dalpha, double scale,
                                                          bool pool);

}  // namespace fastattn::cpu
