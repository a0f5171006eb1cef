// fastattn._C: the op schemas (one place for all backends) and the CPU kernels' registration.
//
// Path of a call: fastattn/functional.py (public API, checks) -> fastattn/ops.py (fake + autograd)
// -> torch.ops.fastattn.<op> (schemas below) -> csrc/cpu/*.cpp (CPU) or csrc/cuda/*.cu (CUDA).
#include <torch/extension.h>
#include <torch/library.h>

#include "attention_contract.h"
#include "cpu/attention.h"
#include "cpu/attention_pool.h"
#include "cpu/softmax_gate.h"

#ifndef FASTATTN_VERSION
#define FASTATTN_VERSION "unknown"
#endif

// Shapes and semantics of every op: attention_contract.h.
TORCH_LIBRARY(fastattn, m) {
  // causal: a CausalMode (0 none, 1 top_left, 2 bottom_right). mask: 4-D, each dim of size 1 or of (B,Hq,Lq,Lk) (broadcast
  // inside the kernel); gate: (B,Hq,Lq,Dv), or (B,Hq,Lq,1) headwise (broadcast over Dv inside the kernel, its
  // gradient summed over Dv in float32 there).
  // Returns (out, lse, out_acc); out is gated when a gate is given; lse is float32 (float64 for float64 inputs)
  // and in log2 units (log2 of the softmax denominator of the scores in log2 units: the base every kernel computes
  // in, so forward and backward never convert it; dlse in the backward is the gradient of this lse);
  // out_acc is out before its rounding, float32, for float16/bfloat16 inputs (the backward's delta comes from it),
  // and an empty tensor for float32/float64 inputs (where out is that already). need_acc=false (a forward no
  // gradient will follow) returns it empty too and lets a kernel skip the extra precision kept for the backward.
  // window_left / window_right (-1 unbounded), softcap (0 none) and alibi_slopes ((Hq) or (B, Hq), the statistics'
  // dtype) modify the scores as attention_contract.h says; the backward takes the forward's. deterministic asks the
  // backward for the same gradients, bit for bit, run after run (the forward carries it for autograd): the cpu and
  // triton kernels always give them; the cuda kernels then add dq without atomics. dropout_p > 0 drops weights
  // as attention_contract.h says, drawn from dropout_seed (an int64 tensor of one element on q's device); the
  // backward takes the forward's p and seed and draws the same.
  m.def("attention_fwd(Tensor q, Tensor k, Tensor v, Tensor? mask, Tensor? gate, float scale, int causal,"
        " bool need_acc=True, int window_left=-1, int window_right=-1, float softcap=0., Tensor? alibi_slopes=None,"
        " bool deterministic=False, float dropout_p=0., Tensor? dropout_seed=None) -> (Tensor, Tensor, Tensor)");
  // out: the forward's out_acc where it has one, else its out. Returns (dq, dk, dv, dmask, dgate); dmask has the
  // mask's own (4-D, broadcast) shape and dtype, summed over broadcast dims in float32; dmask / dgate are empty
  // tensors when not asked for.
  m.def("attention_bwd(Tensor dout, Tensor q, Tensor k, Tensor v, Tensor out, Tensor lse, Tensor? mask,"
        " Tensor? gate, Tensor? dlse, float scale, int causal, bool need_dmask, int window_left=-1,"
        " int window_right=-1, float softcap=0., Tensor? alibi_slopes=None, bool deterministic=False,"
        " float dropout_p=0., Tensor? dropout_seed=None) -> (Tensor, Tensor, Tensor, Tensor, Tensor)");
  // Packed sequences of their own lengths (attention_contract.h): q (total_q, Hq, D), k / v (total_k, Hkv, D / Dv),
  // cu_seqlens int32 (B + 1), gate (total_q, Hq, Dv or 1). Returns (out, lse, out_acc) as attention_fwd, with
  // out (total_q, Hq, Dv) and lse (Hq, total_q).
  m.def("varlen_attention_fwd(Tensor q, Tensor k, Tensor v, Tensor cu_seqlens_q, Tensor cu_seqlens_k,"
        " int max_seqlen_q, int max_seqlen_k, Tensor? gate, float scale, int causal, bool need_acc=True)"
        " -> (Tensor, Tensor, Tensor)");
  // Returns (dq, dk, dv, dgate); dgate is empty without a gate.
  m.def("varlen_attention_bwd(Tensor dout, Tensor q, Tensor k, Tensor v, Tensor out, Tensor lse,"
        " Tensor cu_seqlens_q, Tensor cu_seqlens_k, int max_seqlen_q, int max_seqlen_k, Tensor? gate, Tensor? dlse,"
        " float scale, int causal) -> (Tensor, Tensor, Tensor, Tensor)");
  // Decoding over a kv cache, contiguous (B, Hkv, Lcache, D) or paged (num_pages, Hkv, page_size, D) with
  // page_table (B, max_pages); seqlens_k (B) valid keys per sequence; causal 0 or 2 (bottom_right). Forward only:
  // returns (out, lse) as attention_fwd.
  m.def("attention_kvcache_fwd(Tensor q, Tensor k_cache, Tensor v_cache, Tensor seqlens_k, Tensor? page_table,"
        " Tensor? gate, float scale, int causal) -> (Tensor, Tensor)");
  // Returns (y, alpha); alpha (B,N,H) is float32 (float64 for float64 inputs).
  m.def("softmax_gate_fwd(Tensor scores, Tensor x, Tensor? mask, bool pool) -> (Tensor, Tensor)");
  // Returns (dscores, dx).
  m.def("softmax_gate_bwd(Tensor dy, Tensor x, Tensor alpha, Tensor? dalpha, bool pool) -> (Tensor, Tensor)");
  m.def("score_softmax_gate_fwd(Tensor x, Tensor weight, Tensor? mask, float scale, bool pool)"
        " -> (Tensor, Tensor)");
  // Returns (dx, dweight).
  m.def("score_softmax_gate_bwd(Tensor dy, Tensor x, Tensor weight, Tensor alpha, Tensor? dalpha, float scale,"
        " bool pool) -> (Tensor, Tensor)");
  // Attention pooling of packed bags (cpu/attention_pool.h): x (N, D), offsets int64 (B + 1), mask bool (N) (False
  // leaves a row out), V, U (D, Hd), w (Hd, K), bV, bU (Hd). Returns (y (B, K, D), lse (B, K), scores (N, K) or empty),
  // all in the statistics' dtype (float32; float64 for float64 x).
  m.def("attention_pool_fwd(Tensor x, Tensor offsets, Tensor? mask, Tensor V, Tensor? U, Tensor w, Tensor? bV,"
        " Tensor? bU, bool return_scores) -> (Tensor, Tensor, Tensor)");
  // y, lse, scores: the forward's (scores may be none: a kernel then makes them again, or does without them);
  // dy, dlse, dscores: the gradients of the forward's outputs. Returns (dx, dV, dU, dw, dbV, dbU), empty for an absent
  // U, bV or bU.
  m.def("attention_pool_bwd(Tensor dy, Tensor x, Tensor offsets, Tensor? mask, Tensor V, Tensor? U, Tensor w,"
        " Tensor? bV, Tensor? bU, Tensor y, Tensor lse, Tensor? scores, Tensor? dlse, Tensor? dscores)"
        " -> (Tensor, Tensor, Tensor, Tensor, Tensor, Tensor)");
}

TORCH_LIBRARY_IMPL(fastattn, CPU, m) {
  m.impl("attention_fwd", &fastattn::cpu::attention_fwd);
  m.impl("attention_bwd", &fastattn::cpu::attention_bwd);
  m.impl("varlen_attention_fwd", &fastattn::cpu::varlen_attention_fwd);
  m.impl("varlen_attention_bwd", &fastattn::cpu::varlen_attention_bwd);
  m.impl("attention_kvcache_fwd", &fastattn::cpu::attention_kvcache_fwd);
  m.impl("softmax_gate_fwd", &fastattn::cpu::softmax_gate_fwd);
  m.impl("softmax_gate_bwd", &fastattn::cpu::softmax_gate_bwd);
  m.impl("score_softmax_gate_fwd", &fastattn::cpu::score_softmax_gate_fwd);
  m.impl("score_softmax_gate_bwd", &fastattn::cpu::score_softmax_gate_bwd);
  m.impl("attention_pool_fwd", &fastattn::cpu::attention_pool_fwd);
  m.impl("attention_pool_bwd", &fastattn::cpu::attention_pool_bwd);
}

// A Python module so that `import fastattn._C` loads the library (and with it the registrations above).
PYBIND11_MODULE(TORCH_EXTENSION_NAME, m) {
  // The contract's codes and constants, as attention_contract.h defines them (fastattn/contract.py mirrors
  // them for code that runs without this extension; a test checks that the two agree).
  m.def("contract", []() {
    pybind11::dict c;
    c["CAUSAL_NONE"] = int(fastattn::kCausalNone);
    c["CAUSAL_TOP_LEFT"] = int(fastattn::kCausalTopLeft);
    c["CAUSAL_BOTTOM_RIGHT"] = int(fastattn::kCausalBottomRight);
    c["MASK_NONE"] = int(fastattn::kMaskNone);
    c["MASK_BOOL"] = int(fastattn::kMaskBool);
    c["MASK_BIAS"] = int(fastattn::kMaskBias);
    c["LOG2E"] = fastattn::kLog2e;
    c["LN2"] = fastattn::kLn2;
    c["PHILOX_M"] = pybind11::make_tuple(fastattn::kPhiloxM0, fastattn::kPhiloxM1);
    c["PHILOX_W"] = pybind11::make_tuple(fastattn::kPhiloxW0, fastattn::kPhiloxW1);
    return c;
  });
  m.def("build_info", []() {
    pybind11::dict info;
    info["version"] = FASTATTN_VERSION;
#ifdef FASTATTN_WITH_CUDA
    info["cuda"] = true;
    info["cuda_archs"] = FASTATTN_CUDA_ARCHS;
#else
    info["cuda"] = false;
    info["cuda_archs"] = "";
#endif
    info["openmp"] =
#ifdef _OPENMP
        true;
#else
        false;
#endif
    return info;
  });
}
