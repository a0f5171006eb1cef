// CPU kernels for fastattn.attention_pool: attention pooling of packed bags (gated ABMIL scorer, K branches).
// Math: fastattn/reference.py's attention_pool and docs/CONTRACT.md §1.5. Here x (N, D) is float32, float64,
// bfloat16 or float16 on the CPU, any row stride with stride(-1) == 1; offsets (B + 1) int64; mask (N) bool or
// none; V, U (D, Hd), w (Hd, K), bV, bU (Hd) in x's dtype. Statistics and the pooled sum are float (double for
// float64 x).
#pragma once

#include <ATen/ATen.h>

#include <optional>
#include <tuple>

namespace fastattn::cpu {

// Returns (y, lse, scores): y (B, K, D) and lse (B, K) in the statistics' dtype; scores (N, K) in that dtype
// (-inf at rows the mask leaves out) when return_scores, else an empty tensor.
std::tuple<at::Tensor, at::Tensor, at::Tensor> attention_pool_fwd(
    const at::Tensor& x, const at::Tensor& offsets, const std::optional<at::Tensor>& mask, const at::Tensor& V,
    const std::optional<at::Tensor>& U, const at::Tensor& w, const std::optional<at::Tensor>& bV,
    const std::optional<at::Tensor>& bU, bool return_scores);

// dy (B, K, D), y, lse and scores the forward's (scores: none, and they are made again); dlse (B, K) and dscores (N, K)
// the gradients of its other outputs, or none. Returns (dx, dV, dU, dw, dbV, dbU) in their inputs' dtypes (empty for
// an absent U, bV or bU).
std::tuple<at::Tensor, at::Tensor, at::Tensor, at::Tensor, at::Tensor, at::Tensor> attention_pool_bwd(
    const at::Tensor& dy, const at::Tensor& x, const at::Tensor& offsets, const std::optional<at::Tensor>& mask,
    const at::Tensor& V, const std::optional<at::Tensor>& U, const at::Tensor& w, const std::optional<at::Tensor>& bV,
    const std::optional<at::Tensor>& bU, const at::Tensor& y, const at::Tensor& lse,
    const std::optional<at::Tensor>& scores, const std::optional<at::Tensor>& dlse,
    const std::optional<at::Tensor>& dscores);

}  // namespace fastattn::cpu
