// The host entry points of csrc/cuda/ (params.h), listed once for the CUDA emulation: a build of the
// kernels exports them as a table (kernel_table.cpp) and the binding reaches them through it
// (host_stubs.cpp), so that a mutated build of the kernels can replace the clean one at run time.
#pragma once

#include "../params.h"

#define FASTATTN_EMU_HOST_ENTRIES(X)            \
  X(attention_fwd_hdim64, AttnParams)           \
  X(attention_fwd_hdim128, AttnParams)          \
  X(attention_bwd_hdim64, AttnBwdParams)        \
  X(attention_bwd_hdim128, AttnBwdParams)       \
  X(attention_bwd_preprocess, AttnBwdParams)    \
  X(attention_bwd_convert_dq, AttnBwdParams)    \
  X(attention_decode, DecodeParams)             \
  X(softmax_gate_fwd, GateParams)               \
  X(softmax_gate_bwd, GateBwdParams)            \
  X(attention_pool_fwd_kernels, PoolParams)     \
  X(attention_pool_bwd_kernels, PoolBwdParams)

namespace fastattn_emu {

struct KernelTable {
#define FASTATTN_EMU_ENTRY(name, Params) cudaError_t (*name)(const fastattn::cuda::Params&, cudaStream_t);
  FASTATTN_EMU_HOST_ENTRIES(FASTATTN_EMU_ENTRY)
#undef FASTATTN_EMU_ENTRY
};

}  // namespace fastattn_emu
