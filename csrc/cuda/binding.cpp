// The CUDA backend's one torch-facing file: checks the inputs (naming the argument), turns tensors
// into the params structs of params.h, launches on the current stream, checks the launch, and
// registers the kernels for the CUDA dispatch key of the ops defined in csrc/fastattn.cpp.
//
// Coverage (fastattn/backends.py refuses the rest, so backend="auto" falls through to triton):
// attention: float16 / bfloat16, D == Dv in {64, 128}, sm_80+, any causal mode, bool or float mask
// (with its gradient), gate, GQA. varlen_attention: the same without a mask, forward only (no
// varlen_attention_bwd here: backends.py then refuses a gradient). attention_kvcache: the same head dims and
// dtypes, contiguous or paged caches. softmax gates: float16 / bfloat16. attention_pool: float16 / bfloat16, any D,
// Hd and K (more than 16 branches run 16 at a time).
#include <ATen/ATen.h>
#include <cuda_runtime_api.h>
#include <torch/library.h>
#ifdef FASTATTN_CUDA_EMU
#include "emu/binding_emu.h"  // the CPU emulation runs this file on CPU tensors (csrc/cuda/emu/emu.h)
#else
#include <c10/cuda/CUDAException.h>
#include <c10/cuda/CUDAGuard.h>
#include <c10/cuda/CUDAStream.h>
constexpr c10::DeviceType kKernelDevice = c10::DeviceType::CUDA;
#define FASTATTN_CUDA_OPS(m) TORCH_LIBRARY_IMPL(fastattn, CUDA, m)
#define FASTATTN_CUDA_OP(m, name, fn) m.impl(name, fn)
#endif

#include <algorithm>
#include <cmath>
#include <optional>
#include <string>
#include <tuple>

#include "describe.h"
#include "kernel_traits.h"
#include "params.h"

namespace fastattn::cuda {
namespace {

using Tensor = at::Tensor;
using OptTensor = std::optional<at::Tensor>;

void check_device(const Tensor& t, const char* op, const char* name, const Tensor& ref) {
  TORCH_CHECK(t.device().type() == kKernelDevice, op, " (cuda): ", name, " must be a ", c10::DeviceTypeName(kKernelDevice),
              " tensor, got ", t.device());
  TORCH_CHECK(t.device() == ref.device(), op, " (cuda): ", name, " must be on ", ref.device(), " like the other inputs, got ",
              t.device());
}

void check_half_dtype(const Tensor& t, const char* op, const char* name) {
  TORCH_CHECK(t.scalar_type() == at::kHalf || t.scalar_type() == at::kBFloat16, op, " (cuda): ", name,
              " must be float16 or bfloat16 on the cuda backend, got ", t.scalar_type(),
              " (backend='auto' uses triton or reference for other dtypes)");
}

void check_same_dtype(const Tensor& t, const Tensor& ref, const char* op, const char* name) {
  TORCH_CHECK(t.scalar_type() == ref.scalar_type(), op, " (cuda): ", name, " must have dtype ", ref.scalar_type(),
              ", got ", t.scalar_type());
}

void check_sm80(const Tensor& t, const char* op) {
  int major = 0, minor = 0;
  C10_CUDA_CHECK(cudaDeviceGetAttribute(&major, cudaDevAttrComputeCapabilityMajor, t.get_device()));
  C10_CUDA_CHECK(cudaDeviceGetAttribute(&minor, cudaDevAttrComputeCapabilityMinor, t.get_device()));
  TORCH_CHECK(major >= 8, op, " (cuda): needs compute capability 8.0 or newer (mma.sync bf16/fp16, cp.async), got ",
              major, ".", minor);
}

// cp.async moves 16-byte chunks: the base must be 16-byte aligned and every row stride a multiple
// of 8 elements. A tensor that is not (a rare offset view) is copied into a fresh contiguous one.
Tensor for_cp_async(const Tensor& t) {
  bool ok = t.stride(-1) == 1 && reinterpret_cast<uintptr_t>(t.data_ptr()) % 16 == 0;
  for (int64_t d = 0; d + 1 < t.dim(); ++d) ok = ok && (t.stride(d) % 8 == 0 || t.size(d) == 1);
  if (ok) return t;
  Tensor c = at::empty(t.sizes(), t.options());  // fresh allocation: aligned
  c.copy_(t);
  return c;
}

// What only these kernels require of q, checked before the shared checks (describe.h): device and dtype.
void check_cuda_q(const Tensor& q, const char* op) {
  check_device(q, op, "q", q);
  check_half_dtype(q, op, "q");
}

// What only these kernels require of a described call: head dims, sm_80.
void check_cuda_params(AttnParams& p, const Tensor& q, const char* op) {
  p.is_bf16 = q.scalar_type() == at::kBFloat16;
  TORCH_CHECK(p.D == p.Dv && (p.D == 64 || p.D == 128), op, " (cuda): head dims D=", p.D, ", Dv=", p.Dv,
              " are not covered by the cuda backend (it needs D == Dv in {64, 128}); use backend='triton' or 'auto'");
  check_sm80(q, op);
}

// Checks what only these kernels require, then fills p as every backend does (describe_attention: shapes,
// strides, pointers, mask and gate).
void describe_cuda_attention(AttnParams& p, const char* op, const Tensor& q, const Tensor& k, const Tensor& v,
                             const OptTensor& mask, const OptTensor& gate, double scale, int64_t causal,
                             const ScoreMods& mods = {}, const Dropout& dropout = {}) {
  check_cuda_q(q, op);
  describe_attention(p, (std::string(op) + " (cuda)").c_str(), q, k, v, mask, gate, scale, causal, mods, dropout);
  check_cuda_params(p, q, op);
}

std::tuple<Tensor, Tensor, Tensor> attention_fwd(const Tensor& q_in, const Tensor& k_in, const Tensor& v_in,
                                         const OptTensor& mask, const OptTensor& gate, double scale, int64_t causal,
                                         bool need_acc, int64_t window_left, int64_t window_right, double softcap,
                                         const OptTensor& alibi_slopes, bool /*deterministic: the backward's*/,
                                         double dropout_p, const OptTensor& dropout_seed) {
  const char* op = "attention_fwd";
  const c10::cuda::CUDAGuard guard(q_in.device());
  const Tensor q = for_cp_async(q_in), k = for_cp_async(k_in), v = for_cp_async(v_in);
  AttnParams p{};
  describe_cuda_attention(p, op, q, k, v, mask, gate, scale, causal,
                          {window_left, window_right, softcap, alibi_slopes}, {dropout_p, dropout_seed});
  Tensor out = at::empty({p.B, p.Hq, p.Lq, p.D}, q.options());
  Tensor lse = at::empty({p.B, p.Hq, p.Lq}, q.options().dtype(at::kFloat));
  // out before rounding (these kernels take float16/bfloat16 alone), where a backward follows
  Tensor out_acc = need_acc ? at::empty({p.B, p.Hq, p.Lq, p.D}, q.options().dtype(at::kFloat)) : at::empty({0}, q.options());
  if (out.numel() == 0) return {out, lse, out_acc};
  p.out = out.data_ptr();
  p.o_sb = out.stride(0), p.o_sh = out.stride(1), p.o_sl = out.stride(2);
  p.lse = lse.data_ptr<float>();
  p.lse_sl = p.Lq;
  p.out_acc = need_acc ? out_acc.data_ptr<float>() : nullptr;
  const cudaStream_t stream = c10::cuda::getCurrentCUDAStream().stream();
  C10_CUDA_CHECK(p.D == 64 ? attention_fwd_hdim64(p, stream) : attention_fwd_hdim128(p, stream));
  return {out, lse, out_acc};
}

// The forward kernel over packed sequences: blockIdx.z walks the sequences (seq_dims), out and out_acc are
// (total_q, Hq, Dv) and lse (Hq, total_q).
std::tuple<Tensor, Tensor, Tensor> varlen_attention_fwd(const Tensor& q_in, const Tensor& k_in, const Tensor& v_in,
                                                        const Tensor& cu_seqlens_q, const Tensor& cu_seqlens_k,
                                                        int64_t max_seqlen_q, int64_t max_seqlen_k,
                                                        const OptTensor& gate, double scale, int64_t causal,
                                                        bool need_acc) {
  const char* op = "varlen_attention_fwd";
  const c10::cuda::CUDAGuard guard(q_in.device());
  const Tensor q = for_cp_async(q_in), k = for_cp_async(k_in), v = for_cp_async(v_in);
  AttnParams p{};
  check_cuda_q(q, op);
  describe_varlen_attention(p, (std::string(op) + " (cuda)").c_str(), q, k, v, cu_seqlens_q, cu_seqlens_k,
                            max_seqlen_q, max_seqlen_k, gate, scale, causal);
  check_cuda_params(p, q, op);
  const int64_t total_q = q.size(0);
  Tensor out = at::empty({total_q, p.Hq, p.D}, q.options());
  Tensor lse = at::empty({p.Hq, total_q}, q.options().dtype(at::kFloat));
  Tensor out_acc =
      need_acc ? at::empty({total_q, p.Hq, p.D}, q.options().dtype(at::kFloat)) : at::empty({0}, q.options());
  if (out.numel() == 0) return {out, lse, out_acc};
  p.out = out.data_ptr();
  p.o_sb = 0, p.o_sh = out.stride(1), p.o_sl = out.stride(0);
  p.lse = lse.data_ptr<float>();
  p.lse_sl = total_q;
  p.out_acc = need_acc ? out_acc.data_ptr<float>() : nullptr;
  const cudaStream_t stream = c10::cuda::getCurrentCUDAStream().stream();
  C10_CUDA_CHECK(p.D == 64 ? attention_fwd_hdim64(p, stream) : attention_fwd_hdim128(p, stream));
  return {out, lse, out_acc};
}

// Decoding over a kv cache (decode.cu): GQA-packed row tiles per kv head, the keys split when batch x kv heads x
// row tiles is too few blocks for the GPU (the splits' partial results merged by a second kernel).
std::tuple<Tensor, Tensor> attention_kvcache_fwd(const Tensor& q_in, const Tensor& k_cache_in,
                                                 const Tensor& v_cache_in, const Tensor& seqlens_k,
                                                 const OptTensor& page_table, const OptTensor& gate, double scale,
                                                 int64_t causal) {
  const char* op = "attention_kvcache_fwd";
  const c10::cuda::CUDAGuard guard(q_in.device());
  const Tensor q = for_cp_async(q_in), k_cache = for_cp_async(k_cache_in), v_cache = for_cp_async(v_cache_in);
  DecodeParams p{};
  check_cuda_q(q, op);
  describe_kvcache_attention(p, (std::string(op) + " (cuda)").c_str(), q, k_cache, v_cache, seqlens_k, page_table,
                             gate, scale, causal);
  check_cuda_params(p, q, op);
  Tensor out = at::empty({p.B, p.Hq, p.Lq, p.D}, q.options());
  Tensor lse = at::empty({p.B, p.Hq, p.Lq}, q.options().dtype(at::kFloat));
  if (out.numel() == 0) return {out, lse};
  p.out = out.data_ptr();
  p.o_sb = out.stride(0), p.o_sh = out.stride(1), p.o_sl = out.stride(2);
  p.lse = lse.data_ptr<float>();
  p.lse_sl = p.Lq;

  constexpr int kRows = DecodeTraits<64>::kBlockM, kKeys = DecodeTraits<64>::kBlockN;  // as for D = 128
  p.row_tiles = int((int64_t(p.group) * p.Lq + kRows - 1) / kRows);
  const int key_tiles = (p.Lk + kKeys - 1) / kKeys;  // of the cache's capacity: seqlens_k stays on the device
  int sms = 0;
  C10_CUDA_CHECK(cudaDeviceGetAttribute(&sms, cudaDevAttrMultiProcessorCount, q.get_device()));
  const int64_t blocks = int64_t(p.B) * p.Hkv * p.row_tiles;
  const int want = p.D == 64 ? decode_num_splits<64>(blocks, key_tiles, sms)
                             : decode_num_splits<128>(blocks, key_tiles, sms);
  p.split_tiles = std::max(1, (key_tiles + want - 1) / want);
  p.num_splits = std::max(1, (key_tiles + p.split_tiles - 1) / p.split_tiles);
  Tensor out_part, lse_part;  // workspaces of the splits, written before they are read: no zero fill
  if (p.num_splits > 1) {
    out_part = at::empty({p.num_splits, p.B, p.Hq, p.Lq, p.D}, q.options().dtype(at::kFloat));
    lse_part = at::empty({p.num_splits, p.B, p.Hq, p.Lq}, q.options().dtype(at::kFloat));
    p.out_part = out_part.data_ptr<float>();
    p.lse_part = lse_part.data_ptr<float>();
  }
  C10_CUDA_CHECK(attention_decode(p, c10::cuda::getCurrentCUDAStream().stream()));
  return {out, lse};
}

std::tuple<Tensor, Tensor, Tensor, Tensor, Tensor> attention_bwd(
    const Tensor& dout_in, const Tensor& q_in, const Tensor& k_in, const Tensor& v_in, const Tensor& out_in,
    const Tensor& lse_in, const OptTensor& mask, const OptTensor& gate, const OptTensor& dlse_in, double scale,
    int64_t causal, bool need_dmask, int64_t window_left, int64_t window_right, double softcap,
    const OptTensor& alibi_slopes, bool deterministic, double dropout_p, const OptTensor& dropout_seed) {
  const char* op = "attention_bwd";
  const c10::cuda::CUDAGuard guard(q_in.device());
  const Tensor q = for_cp_async(q_in), k = for_cp_async(k_in), v = for_cp_async(v_in);
  AttnBwdParams p{};
  describe_cuda_attention(p, op, q, k, v, mask, gate, scale, causal,
                          {window_left, window_right, softcap, alibi_slopes}, {dropout_p, dropout_seed});
  const std::vector<int64_t> out_shape{p.B, p.Hq, p.Lq, p.D}, row_shape{p.B, p.Hq, p.Lq};
  check_device(dout_in, op, "dout", q);
  check_device(out_in, op, "out", q);
  check_device(lse_in, op, "lse", q);
  check_same_dtype(dout_in, q, op, "dout");
  TORCH_CHECK(out_in.scalar_type() == q.scalar_type() || out_in.scalar_type() == at::kFloat, op,
              " (cuda): out must be q's dtype ", q.scalar_type(), " or the forward's float32 out_acc, got ",
              out_in.scalar_type());
  TORCH_CHECK(dout_in.sizes() == out_shape && out_in.sizes() == out_shape, op, " (cuda): dout and out must be ",
              at::IntArrayRef(out_shape), ", got dout ", dout_in.sizes(), ", out ", out_in.sizes());
  TORCH_CHECK(lse_in.scalar_type() == at::kFloat && lse_in.sizes() == row_shape, op,
              " (cuda): lse must be float32 ", at::IntArrayRef(row_shape), ", got ", lse_in.scalar_type(), " ",
              lse_in.sizes());
  TORCH_CHECK(!need_dmask || p.mask_kind == kMaskBias, op, " (cuda): need_dmask asks for the gradient of a float mask; "
              "mask is ", p.mask_kind == kMaskBool ? "bool" : "absent");
  // The main kernel streams dO with cp.async; with a gate it reads the gated copy instead.
  const Tensor dout = p.gate ? last_dim_contiguous(dout_in) : for_cp_async(dout_in);
  const Tensor out = last_dim_contiguous(out_in);
  const Tensor lse = lse_in.contiguous();
  Tensor dlse;
  if (dlse_in.has_value() && dlse_in->defined()) {
    check_device(*dlse_in, op, "dlse", q);
    TORCH_CHECK(dlse_in->sizes() == row_shape, op, " (cuda): dlse must be ", at::IntArrayRef(row_shape), ", got ",
                dlse_in->sizes());
    dlse = (dlse_in->to(at::kFloat) * ::fastattn::kLog2e).contiguous();  // d/d(lse2) -> d/d(natural lse)
  }

  const auto f32 = q.options().dtype(at::kFloat);
  Tensor dq = at::empty(q.sizes(), q.options());
  Tensor dk = at::empty(k.sizes(), k.options());
  Tensor dv = at::empty(v.sizes(), v.options());
  // The gradient of a float mask: dS per (b, h, i, j) for a full-shape mask; for a broadcast one its sum over the
  // broadcast dims, which the kernel accumulates in float32 in the mask's own shape (O(mask) memory, one rounding),
  // with atomics. Deterministic, the kernel writes dS in float32 in the scores' full shape instead (O(B Hq Lq Lk)
  // memory) and torch sums it here, in a fixed order.
  const std::vector<int64_t> full{p.B, p.Hq, p.Lq, p.Lk};
  const bool dmask_bcast = need_dmask && (p.mask_bcast[0] || p.mask_bcast[1] || p.mask_bcast[2] || p.mask_bcast[3]);
  Tensor dmask = need_dmask && !dmask_bcast ? at::zeros(full, q.options()) : q.new_empty({0});
  Tensor dmask_accum =
      dmask_bcast ? at::zeros(deterministic ? at::IntArrayRef(full) : mask->sizes(), q.options().dtype(at::kFloat))
                  : Tensor();
  auto bcast_dmask = [&] {
    std::vector<int64_t> dims;
    for (int64_t d = 0; d < 4; ++d)
      if (mask->size(d) == 1 && full[size_t(d)] != 1) dims.push_back(d);
    const Tensor sum = deterministic && !dims.empty() ? dmask_accum.sum(dims, /*keepdim=*/true) : dmask_accum;
    return sum.view(mask->sizes()).to(q.scalar_type());
  };
  Tensor dgate = p.gate ? at::empty({p.B, p.Hq, p.Lq, p.gate_headwise ? 1 : p.D}, q.options()) : q.new_empty({0});
  if (dq.numel() == 0 || dk.numel() == 0) {  // no query or no key: every gradient is 0
    dq.zero_(), dk.zero_(), dv.zero_();
    if (dgate.numel()) dgate.zero_();
    return {dq, dk, dv, dmask_bcast ? bcast_dmask() : dmask, dgate};
  }
  // Deterministic dq: dq_splits slices of dq_accum (params.h). Enough blocks to fill the GPU twice over, at most 8
  // slices (memory: 8 float32 copies of dq at most) and one per key tile.
  int dq_splits = 1;
  if (deterministic) {
    int sms = 0;
    C10_CUDA_CHECK(cudaDeviceGetAttribute(&sms, cudaDevAttrMultiProcessorCount, q.get_device()));
    constexpr int kKeyTile = BwdTraits<64>::kBlockN;
    static_assert(BwdTraits<128>::kBlockN == kKeyTile, "both head dims tile the keys alike");
    const int64_t key_tiles = (p.Lk + kKeyTile - 1) / kKeyTile, blocks = int64_t(p.B) * p.Hkv;
    dq_splits = int(std::clamp<int64_t>((2 * sms + blocks - 1) / blocks, 1, std::min<int64_t>(8, key_tiles)));
  }
  Tensor delta = at::empty(row_shape, f32);
  std::vector<int64_t> accum_shape{dq_splits};
  accum_shape.insert(accum_shape.end(), out_shape.begin(), out_shape.end());
  Tensor dq_accum = at::zeros(accum_shape, f32);
  Tensor do_gated = p.gate ? at::empty(out_shape, q.options()) : Tensor();

  p.out = const_cast<void*>(out.data_ptr());
  p.out_is_acc = out.scalar_type() == at::kFloat;
  p.o_sb = out.stride(0), p.o_sh = out.stride(1), p.o_sl = out.stride(2);
  p.lse = lse.data_ptr<float>();
  p.dout = dout.data_ptr();
  p.do_sb = dout.stride(0), p.do_sh = dout.stride(1), p.do_sl = dout.stride(2);
  p.dlse = dlse.defined() ? dlse.data_ptr<float>() : nullptr;
  p.delta = delta.data_ptr<float>();
  p.do_gated = do_gated.defined() ? do_gated.data_ptr() : nullptr;
  p.dq_accum = dq_accum.data_ptr<float>();
  p.dq_splits = dq_splits;
  p.deterministic = deterministic;
  p.dq = dq.data_ptr();
  p.dk = dk.data_ptr();
  p.dv = dv.data_ptr();
  p.dmask = need_dmask && !dmask_bcast ? dmask.data_ptr() : nullptr;
  p.dmask_accum = dmask_bcast ? dmask_accum.data_ptr<float>() : nullptr;
  if (dmask_bcast) {
    int64_t* strides[4] = {&p.dm_sb, &p.dm_sh, &p.dm_si, &p.dm_sj};
    for (int d = 0; d < 4; ++d) *strides[d] = mask->size(d) == 1 && !deterministic ? 0 : dmask_accum.stride(d);
  }
  p.dgate = p.gate ? dgate.data_ptr() : nullptr;
  const cudaStream_t stream = c10::cuda::getCurrentCUDAStream().stream();
  C10_CUDA_CHECK(p.D == 64 ? attention_bwd_hdim64(p, stream) : attention_bwd_hdim128(p, stream));
  return {dq, dk, dv, dmask_bcast ? bcast_dmask() : dmask, dgate};
}

// ------------------------------------------------------------------------------------ softmax gates
// x checked for these kernels (device, dtype), then as every backend does (describe_gate).
GateShape describe_cuda_gate(const Tensor& x, int64_t H, const char* op, const std::string& where) {
  check_device(x, op, "x", x);
  check_half_dtype(x, op, "x");
  return describe_gate(where.c_str(), x, H);
}

bool vec16_ok(const Tensor& t) {
  if (reinterpret_cast<uintptr_t>(t.data_ptr()) % 16 != 0) return false;
  for (int64_t d = 0; d + 1 < t.dim(); ++d)
    if (t.stride(d) % 8 != 0) return false;
  return true;
}

// mask_c: the checked mask made contiguous, or undefined.
void fill_gate(GateParams& p, const GateShape& s, const Tensor& x, const Tensor& alpha, const Tensor& mask_c,
               double scale, bool pool) {
  p.x = x.data_ptr();
  p.x_sb = x.stride(0), p.x_sn = x.stride(1);
  p.mask = mask_c.defined() ? mask_c.data_ptr<bool>() : nullptr;
  p.alpha = alpha.data_ptr<float>();
  p.B = int(s.B), p.N = int(s.N), p.D = int(s.D), p.H = int(s.H);
  p.scale = float(scale);
  p.pool = pool;
  p.is_bf16 = x.scalar_type() == at::kBFloat16;
  p.vec = (s.D / s.H) % 8 == 0 && vec16_ok(x) ? 8 : 1;
}

std::tuple<Tensor, Tensor> gate_fwd(const Tensor& x_in, const OptTensor& scores_in, const OptTensor& weight_in,
                                    const OptTensor& mask, double scale, bool pool, const char* op) {
  const c10::cuda::CUDAGuard guard(x_in.device());
  const std::string where = std::string(op) + " (cuda)";
  const Tensor x = last_dim_contiguous(x_in);
  const int64_t H = scores_in ? gate_num_heads(where.c_str(), *scores_in, "scores", false)
                              : gate_num_heads(where.c_str(), *weight_in, "weight", true);
  const GateShape s = describe_cuda_gate(x, H, op, where);
  GateParams p{};
  Tensor scores, weight;
  if (scores_in) {
    scores = last_dim_contiguous(*scores_in);
    check_gate_rows(where.c_str(), scores, x, s, "scores");
    check_gate_dtype(where.c_str(), scores, x, "scores");
    p.scores = scores.data_ptr();
    p.s_sb = scores.stride(0), p.s_sn = scores.stride(1);
  } else {
    check_gate_weight(where.c_str(), *weight_in, x, s);
    weight = weight_in->to(at::kFloat).contiguous();  // (H, D), small
    p.weight = weight.data_ptr<float>();
  }
  check_gate_mask(where.c_str(), mask, x, s);
  // the kernel reads this copy after fill_gate returns: it lives to the end of the call
  const Tensor mask_c = mask.has_value() && mask->defined() ? mask->contiguous() : Tensor();
  Tensor alpha = at::empty({s.B, s.N, s.H}, x.options().dtype(at::kFloat));
  fill_gate(p, s, x, alpha, mask_c, scale, pool);
  Tensor y, y_accum;
  if (pool) {
    y_accum = at::zeros({s.B, s.D}, x.options().dtype(at::kFloat));
    p.y_accum = y_accum.data_ptr<float>();
  } else {
    y = at::empty({s.B, s.N, s.D}, x.options());
    p.y = y.data_ptr();
  }
  C10_CUDA_CHECK(softmax_gate_fwd(p, c10::cuda::getCurrentCUDAStream().stream()));
  return {pool ? y_accum.to(x.scalar_type()) : y, alpha};
}

std::tuple<Tensor, Tensor, Tensor> gate_bwd(const Tensor& dy_in, const Tensor& x_in, const OptTensor& weight_in,
                                            const Tensor& alpha_in, const OptTensor& dalpha_in, double scale, bool pool,
                                            const char* op) {
  const c10::cuda::CUDAGuard guard(x_in.device());
  const std::string where = std::string(op) + " (cuda)";
  const Tensor x = last_dim_contiguous(x_in), dy = last_dim_contiguous(dy_in);
  const GateShape s = describe_cuda_gate(x, gate_num_heads(where.c_str(), alpha_in, "alpha", false), op, where);
  check_gate_dy(where.c_str(), dy, x, s, pool);
  check_gate_rows(where.c_str(), alpha_in, x, s, "alpha");
  const Tensor alpha = alpha_in.to(at::kFloat).contiguous();
  Tensor dalpha;
  if (dalpha_in.has_value() && dalpha_in->defined()) {
    check_gate_rows(where.c_str(), *dalpha_in, x, s, "dalpha");
    dalpha = dalpha_in->to(at::kFloat).contiguous();
  }
  GateBwdParams p{};
  Tensor weight;
  if (weight_in) {
    check_gate_weight(where.c_str(), *weight_in, x, s);
    weight = weight_in->to(at::kFloat).contiguous();
    p.weight = weight.data_ptr<float>();
  }
  fill_gate(p, s, x, alpha, Tensor(), scale, pool);
  if (!vec16_ok(dy)) p.vec = 1;
  Tensor g = at::empty({s.B, s.N, s.H}, x.options().dtype(at::kFloat));
  Tensor dscores = weight_in ? Tensor() : at::empty({s.B, s.N, s.H}, x.options());
  Tensor dx = at::empty({s.B, s.N, s.D}, x.options());
  Tensor dweight_accum = weight_in ? at::zeros({s.H, s.D}, x.options().dtype(at::kFloat)) : Tensor();
  p.dy = dy.data_ptr();
  p.dy_sb = dy.stride(0), p.dy_sn = pool ? 0 : dy.stride(1);
  p.dalpha = dalpha.defined() ? dalpha.data_ptr<float>() : nullptr;
  p.g = g.data_ptr<float>();
  p.dscores = dscores.defined() ? dscores.data_ptr() : nullptr;
  p.dx = dx.data_ptr();
  p.dweight_accum = weight_in ? dweight_accum.data_ptr<float>() : nullptr;
  C10_CUDA_CHECK(softmax_gate_bwd(p, c10::cuda::getCurrentCUDAStream().stream()));
  if (weight_in) return {dx, dweight_accum.to(weight_in->scalar_type()), Tensor()};
  return {dscores, dx, Tensor()};
}

std::tuple<Tensor, Tensor> softmax_gate_fwd_cuda(const Tensor& scores, const Tensor& x, const OptTensor& mask,
                                                 bool pool) {
  return gate_fwd(x, scores, std::nullopt, mask, 1.0, pool, "softmax_gate_fwd");
}

std::tuple<Tensor, Tensor> softmax_gate_bwd_cuda(const Tensor& dy, const Tensor& x, const Tensor& alpha,
                                                 const OptTensor& dalpha, bool pool) {
  auto [dscores, dx, unused] = gate_bwd(dy, x, std::nullopt, alpha, dalpha, 1.0, pool, "softmax_gate_bwd");
  return {dscores, dx};
}

std::tuple<Tensor, Tensor> score_softmax_gate_fwd_cuda(const Tensor& x, const Tensor& weight, const OptTensor& mask,
                                                       double scale, bool pool) {
  return gate_fwd(x, std::nullopt, weight, mask, scale, pool, "score_softmax_gate_fwd");
}

std::tuple<Tensor, Tensor> score_softmax_gate_bwd_cuda(const Tensor& dy, const Tensor& x, const Tensor& weight,
                                                       const Tensor& alpha, const OptTensor& dalpha, double scale,
                                                       bool pool) {
  auto [dx, dweight, unused] = gate_bwd(dy, x, weight, alpha, dalpha, scale, pool, "score_softmax_gate_bwd");
  return {dx, dweight};
}

// ------------------------------------------------------------------------------------ attention_pool
// The inputs as attention_pool.cu reads them (params.h): x with rows of Dp = D rounded up to 8 elements in 16-byte
// aligned rows (a copy only when x's are not), the weights padded and laid out in its column tiles.
struct PoolInputs {
  Tensor x, offsets, mask, wt, wi, bias, w;
  int64_t N, B, D, Dp, Hd, Hdp, G, K;
  bool gated;
};

PoolInputs prepare_pool(const char* op, const Tensor& x_in, const Tensor& offsets, const OptTensor& mask,
                        const Tensor& V, const OptTensor& U, const Tensor& w, const OptTensor& bV,
                        const OptTensor& bU) {
  check_device(x_in, op, "x", x_in);
  check_half_dtype(x_in, op, "x");
  TORCH_CHECK(x_in.dim() == 2, op, " (cuda): x must be (N, D), got ", x_in.sizes());
  check_device(offsets, op, "offsets", x_in);
  TORCH_CHECK(offsets.scalar_type() == at::kLong && offsets.dim() == 1 && offsets.numel() >= 1, op,
              " (cuda): offsets must be int64 (B + 1), got ", offsets.scalar_type(), " ", offsets.sizes());
  const std::pair<const char*, const OptTensor*> weights[] = {{"U", &U}, {"bV", &bV}, {"bU", &bU}};
  check_device(V, op, "V", x_in);
  check_same_dtype(V, x_in, op, "V");
  check_device(w, op, "w", x_in);
  check_same_dtype(w, x_in, op, "w");
  for (const auto& [name, t] : weights)
    if (t->has_value()) {
      check_device(**t, op, name, x_in);
      check_same_dtype(**t, x_in, op, name);
    }
  PoolInputs in;
  in.N = x_in.size(0), in.D = x_in.size(1), in.B = offsets.numel() - 1;
  in.Hd = V.size(1), in.K = w.size(1), in.gated = U.has_value();
  TORCH_CHECK(V.dim() == 2 && V.size(0) == in.D, op, " (cuda): V must be (D=", in.D, ", Hd), got ", V.sizes());
  TORCH_CHECK(!U || U->sizes() == V.sizes(), op, " (cuda): U must be ", V.sizes(), " like V, got ", U->sizes());
  TORCH_CHECK(w.dim() == 2 && w.size(0) == in.Hd, op, " (cuda): w must be (Hd=", in.Hd, ", K), got ", w.sizes());
  TORCH_CHECK(in.K >= 1 && in.K <= kPoolMaxBranches, op, " (cuda): the kernels take 1 to ", kPoolMaxBranches,
              " branches (w's columns) at once, got K=", in.K);
  for (const auto& [name, t] : {std::make_pair("bV", &bV), std::make_pair("bU", &bU)})
    TORCH_CHECK(!t->has_value() || ((*t)->dim() == 1 && (*t)->size(0) == in.Hd), op, " (cuda): ", name,
                " must be (Hd=", in.Hd, "), got ", (*t)->sizes());
  TORCH_CHECK(!bU || U, op, " (cuda): bU needs U");
  if (mask.has_value()) {
    check_device(*mask, op, "mask", x_in);
    TORCH_CHECK(mask->scalar_type() == at::kBool && mask->dim() == 1 && mask->size(0) == in.N, op,
                " (cuda): mask must be bool (N=", in.N, "), got ", mask->scalar_type(), " ", mask->sizes());
    in.mask = mask->contiguous();
  }
  check_sm80(x_in, op);
  in.offsets = offsets.contiguous();

  in.Dp = (in.D + 7) / 8 * 8;
  if (in.D == in.Dp && x_in.stride(1) == 1 && vec16_ok(x_in)) {
    in.x = x_in;
  } else {  // rows padded to 16 bytes, zeros past D
    in.x = at::zeros({in.N, in.Dp}, x_in.options());
    in.x.narrow(1, 0, in.D).copy_(x_in);
  }
  // [V|U] in column tiles: gated, tile t = V's units 32 t .. 32 t + 31, then U's; ungated, V's 64 t .. 64 t + 63
  const int64_t U32 = kPoolUnits;
  in.Hdp = in.gated ? (in.Hd + U32 - 1) / U32 * U32 : (in.Hd + 2 * U32 - 1) / (2 * U32) * (2 * U32);
  in.G = in.gated ? 2 * in.Hdp : in.Hdp;
  const auto f32 = x_in.options().dtype(at::kFloat);
  in.wi = at::zeros({in.Dp, in.G}, x_in.options());
  in.bias = at::zeros({in.G}, f32);
  auto place = [&](const Tensor& W, const OptTensor& b, int64_t part) {
    Tensor Wp = in.gated ? in.wi.view({in.Dp, in.Hdp / U32, 2, U32}).select(2, part) : in.wi.view({in.Dp, 1, in.Hdp});
    Tensor Wpad = at::zeros({in.Dp, in.Hdp}, x_in.options());
    Wpad.narrow(0, 0, in.D).narrow(1, 0, in.Hd).copy_(W);
    Wp.copy_(Wpad.view(Wp.sizes()));
    if (b) {
      Tensor bp = in.gated ? in.bias.view({in.Hdp / U32, 2, U32}).select(1, part) : in.bias.view({1, in.Hdp});
      Tensor bpad = at::zeros({in.Hdp}, f32);
      bpad.narrow(0, 0, in.Hd).copy_(*b);
      bp.copy_(bpad.view(bp.sizes()));
    }
  };
  place(V, bV, 0);
  if (in.gated) place(*U, bU, 1);
  in.wt = in.wi.t().contiguous();
  in.w = at::zeros({in.Hdp, pool_branch_slots(int(in.K))}, f32);
  in.w.narrow(0, 0, in.Hd).narrow(1, 0, in.K).copy_(w);
  return in;
}

void fill_pool(PoolParams& p, const PoolInputs& in) {
  p.x = in.x.data_ptr();
  p.x_ld = in.x.stride(0);
  p.offsets = in.offsets.data_ptr<int64_t>();
  p.mask = in.mask.defined() ? in.mask.data_ptr<bool>() : nullptr;
  p.wt = in.wt.data_ptr();
  p.wi = in.wi.data_ptr();
  p.bias = in.bias.data_ptr<float>();
  p.w = in.w.data_ptr<float>();
  p.N = in.N;
  p.B = int(in.B), p.D = int(in.D), p.Dp = int(in.Dp), p.G = int(in.G), p.K = int(in.K);
  p.gated = in.gated;
  p.is_bf16 = in.x.scalar_type() == at::kBFloat16;
}

// The tanh and sigmoid parts of a tensor in [V|U]'s column layout (last dim G): (..., Hd) each.
std::pair<Tensor, Tensor> split_columns(const Tensor& t, const PoolInputs& in) {
  std::vector<int64_t> shape(t.sizes().begin(), t.sizes().end() - 1);
  if (!in.gated) return {t.narrow(-1, 0, in.Hd), Tensor()};
  std::vector<int64_t> tiles = shape;
  tiles.insert(tiles.end(), {in.Hdp / kPoolUnits, 2, kPoolUnits});
  shape.push_back(in.Hdp);
  const Tensor v = t.reshape(tiles);
  return {v.select(-2, 0).reshape(shape).narrow(-1, 0, in.Hd), v.select(-2, 1).reshape(shape).narrow(-1, 0, in.Hd)};
}

std::tuple<Tensor, Tensor, Tensor> attention_pool_fwd_cuda(const Tensor& x, const Tensor& offsets,
                                                           const OptTensor& mask, const Tensor& V, const OptTensor& U,
                                                           const Tensor& w, const OptTensor& bV, const OptTensor& bU,
                                                           bool return_scores) {
  const char* op = "attention_pool_fwd";
  const c10::cuda::CUDAGuard guard(x.device());
  if (w.dim() == 2 && w.size(1) > kPoolMaxBranches) {  // branches are independent: kPoolMaxBranches at a time
    std::vector<Tensor> ys, lses, scores;
    for (int64_t k0 = 0; k0 < w.size(1); k0 += kPoolMaxBranches) {
      auto [y, lse, s] = attention_pool_fwd_cuda(x, offsets, mask, V, U,
                                                 w.narrow(1, k0, std::min<int64_t>(kPoolMaxBranches, w.size(1) - k0)),
                                                 bV, bU, return_scores);
      ys.push_back(y), lses.push_back(lse), scores.push_back(s);
    }
    return {at::cat(ys, 1), at::cat(lses, 1), return_scores ? at::cat(scores, 1) : scores[0]};
  }
  const PoolInputs in = prepare_pool(op, x, offsets, mask, V, U, w, bV, bU);
  const auto f32 = x.options().dtype(at::kFloat);
  Tensor y = at::empty({in.B, in.K, in.D}, f32), lse = at::empty({in.B, in.K}, f32);
  Tensor scores = at::empty({in.N, in.K}, f32);
  if (in.N == 0 || in.B == 0) {  // no row: every bag empty
    y.zero_(), lse.fill_(-INFINITY);
    return {y, lse, return_scores ? scores : at::empty({0}, f32)};
  }
  // The splits of each bag (its rows cut at multiples of kPoolSplitRows), numbered bag after bag on the device:
  // no copy of offsets to the host
  constexpr int64_t R = kPoolSplitRows;
  const Tensor lo = in.offsets.narrow(0, 0, in.B), hi = in.offsets.narrow(0, 1, in.B);
  const Tensor count = at::where(hi > lo, at::floor_divide(hi - 1, R) - at::floor_divide(lo, R) + 1, at::zeros_like(lo));
  const Tensor pair_start = at::cat({at::zeros({1}, in.offsets.options()), at::cumsum(count, 0)}).contiguous();
  const int64_t max_pairs = in.B + (in.N + R - 1) / R;
  Tensor part_acc = at::empty({max_pairs, in.K, in.Dp}, f32);
  Tensor part_ml = at::empty({2, max_pairs, in.K}, f32);
  PoolParams p{};
  fill_pool(p, in);
  p.scores = scores.data_ptr<float>();
  p.lse = lse.data_ptr<float>();
  p.pair_start = pair_start.data_ptr<int64_t>();
  p.max_pairs = max_pairs;
  p.part_acc = part_acc.data_ptr<float>();
  p.part_m = part_ml[0].data_ptr<float>();
  p.part_l = part_ml[1].data_ptr<float>();
  p.y = y.data_ptr<float>();
  C10_CUDA_CHECK(attention_pool_fwd_kernels(p, c10::cuda::getCurrentCUDAStream().stream()));
  return {y, lse, return_scores ? scores : at::empty({0}, f32)};
}

std::tuple<Tensor, Tensor, Tensor, Tensor, Tensor, Tensor> attention_pool_bwd_cuda(
    const Tensor& dy, const Tensor& x, const Tensor& offsets, const OptTensor& mask, const Tensor& V,
    const OptTensor& U, const Tensor& w, const OptTensor& bV, const OptTensor& bU, const Tensor& y, const Tensor& lse,
    const OptTensor& scores, const OptTensor& dlse, const OptTensor& dscores) {
  // the forward's scores go unused: these kernels recompute them with the rest, from lse
  const char* op = "attention_pool_bwd";
  // dw and d[V|U] are summed with float32 atomics: the order, and so the last bits, vary from run to run
  at::globalContext().alertNotDeterministic("fastattn attention_pool_bwd (cuda)");
  const c10::cuda::CUDAGuard guard(x.device());
  if (w.dim() == 2 && w.size(1) > kPoolMaxBranches && dy.dim() == 3 && y.dim() == 3 && lse.dim() == 2) {
    // kPoolMaxBranches branches at a time: every gradient is a sum over the branches (dw: its columns)
    Tensor acc[5];  // dx, dV, dU, dbV, dbU in float32
    std::vector<Tensor> dws;
    for (int64_t k0 = 0; k0 < w.size(1); k0 += kPoolMaxBranches) {
      const int64_t kn = std::min<int64_t>(kPoolMaxBranches, w.size(1) - k0);
      auto part = [&](const OptTensor& t) -> OptTensor { return t ? OptTensor(t->narrow(1, k0, kn)) : std::nullopt; };
      auto [dx, dV, dU, dw, dbV, dbU] = attention_pool_bwd_cuda(
          dy.narrow(1, k0, kn), x, offsets, mask, V, U, w.narrow(1, k0, kn), bV, bU, y.narrow(1, k0, kn),
          lse.narrow(1, k0, kn), std::nullopt, part(dlse), part(dscores));
      const Tensor grads[5] = {dx, dV, dU, dbV, dbU};
      for (int i = 0; i < 5; ++i) acc[i] = k0 == 0 ? grads[i].to(at::kFloat) : acc[i] + grads[i].to(at::kFloat);
      dws.push_back(dw);
    }
    const auto dt = x.scalar_type();
    return {acc[0].to(dt), acc[1].to(dt), acc[2].to(dt), at::cat(dws, 1), acc[3].to(dt), acc[4].to(dt)};
  }
  const PoolInputs in = prepare_pool(op, x, offsets, mask, V, U, w, bV, bU);
  const std::vector<int64_t> y_shape{in.B, in.K, in.D}, row_shape{in.B, in.K}, s_shape{in.N, in.K};
  for (const auto& [name, t, shape] : {std::make_tuple("dy", &dy, &y_shape), std::make_tuple("y", &y, &y_shape),
                                       std::make_tuple("lse", &lse, &row_shape)}) {
    check_device(*t, op, name, x);
    TORCH_CHECK(t->sizes() == at::IntArrayRef(*shape), op, " (cuda): ", name, " must be ", at::IntArrayRef(*shape),
                ", got ", t->sizes());
  }
  const auto f32 = x.options().dtype(at::kFloat);
  const Tensor dy_f = dy.to(at::kFloat).contiguous(), y_f = y.to(at::kFloat).contiguous();
  Tensor delta = at::zeros(row_shape, f32);  // -dlse: the rows kernel takes y · dy with x · dy, as (x - y) · dy
  if (dlse.has_value()) {
    check_device(*dlse, op, "dlse", x);
    TORCH_CHECK(dlse->sizes() == at::IntArrayRef(row_shape), op, " (cuda): dlse must be ", at::IntArrayRef(row_shape),
                ", got ", dlse->sizes());
    delta = -dlse->to(at::kFloat);
  }
  delta = delta.contiguous();
  Tensor dscores_f;
  if (dscores.has_value()) {
    check_device(*dscores, op, "dscores", x);
    TORCH_CHECK(dscores->sizes() == at::IntArrayRef(s_shape), op, " (cuda): dscores must be ", at::IntArrayRef(s_shape),
                ", got ", dscores->sizes());
    dscores_f = dscores->to(at::kFloat).contiguous();
  }
  const Tensor lse_f = lse.to(at::kFloat).contiguous();
  Tensor dx = at::empty({in.N, in.Dp}, x.options());
  Tensor dw_acc = at::zeros({in.Hdp, pool_branch_slots(int(in.K))}, f32);
  Tensor dW_acc = at::zeros({in.Dp, in.G}, f32);
  Tensor dpre = at::empty({in.N, in.G}, x.options());
  Tensor work = at::empty({3, in.N, in.K}, f32);  // scores, alpha, ds
  if (in.N == 0 || in.B == 0) {
    dx.zero_(), dpre.zero_();
  } else {
    PoolBwdParams p{};
    fill_pool(p, in);
    p.scores = work[0].data_ptr<float>();
    p.lse = const_cast<float*>(lse_f.data_ptr<float>());
    p.dy = dy_f.data_ptr<float>();
    p.y = y_f.data_ptr<float>();
    p.delta = delta.data_ptr<float>();
    p.dscores = dscores_f.defined() ? dscores_f.data_ptr<float>() : nullptr;
    p.alpha = work[1].data_ptr<float>();
    p.ds = work[2].data_ptr<float>();
    p.dpre = dpre.data_ptr();
    p.dx = dx.data_ptr();
    p.dw_acc = dw_acc.data_ptr<float>();
    p.dW_acc = dW_acc.data_ptr<float>();
    C10_CUDA_CHECK(attention_pool_bwd_kernels(p, c10::cuda::getCurrentCUDAStream().stream()));
  }
  const auto dt = x.scalar_type();
  const auto none = [&]() { return x.new_empty({0}); };  // one tensor per output: the schema declares no aliasing
  const auto [dV, dU] = split_columns(dW_acc.narrow(0, 0, in.D), in);
  const auto [dbV, dbU] = split_columns(at::sum(dpre, at::IntArrayRef{0}, /*keepdim=*/false, at::kFloat), in);  // left-out rows hold 0
  return {in.Dp == in.D ? dx : dx.narrow(1, 0, in.D).contiguous(),
          dV.to(dt),
          in.gated ? dU.to(dt) : none(),
          dw_acc.narrow(0, 0, in.Hd).narrow(1, 0, in.K).to(dt),
          bV ? dbV.to(dt) : none(),
          bU ? dbU.to(dt) : none()};
}

}  // namespace
}  // namespace fastattn::cuda

FASTATTN_CUDA_OPS(m) {
  FASTATTN_CUDA_OP(m, "attention_fwd", &fastattn::cuda::attention_fwd);
  FASTATTN_CUDA_OP(m, "attention_bwd", &fastattn::cuda::attention_bwd);
  FASTATTN_CUDA_OP(m, "varlen_attention_fwd", &fastattn::cuda::varlen_attention_fwd);
  FASTATTN_CUDA_OP(m, "attention_kvcache_fwd", &fastattn::cuda::attention_kvcache_fwd);
  FASTATTN_CUDA_OP(m, "softmax_gate_fwd", &fastattn::cuda::softmax_gate_fwd_cuda);
  FASTATTN_CUDA_OP(m, "softmax_gate_bwd", &fastattn::cuda::softmax_gate_bwd_cuda);
  FASTATTN_CUDA_OP(m, "score_softmax_gate_fwd", &fastattn::cuda::score_softmax_gate_fwd_cuda);
  FASTATTN_CUDA_OP(m, "score_softmax_gate_bwd", &fastattn::cuda::score_softmax_gate_bwd_cuda);
  FASTATTN_CUDA_OP(m, "attention_pool_fwd", &fastattn::cuda::attention_pool_fwd_cuda);
  FASTATTN_CUDA_OP(m, "attention_pool_bwd", &fastattn::cuda::attention_pool_bwd_cuda);
}
