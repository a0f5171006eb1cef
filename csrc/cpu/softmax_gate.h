// CPU kernels for fastattn.softmax_gate and fastattn.score_softmax_gate. Shapes and math (forward and backward):
// csrc/attention_contract.h. Here x is float32, float64, bfloat16 or float16 on the CPU, any strides with
// stride(-1) == 1; scores and weight have x's dtype; alpha is float32 (float64 for float64 x), contiguous;
// statistics and accumulators are float (double for float64).
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
