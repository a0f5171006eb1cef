// Backward instantiations for D = 64 (fp16, bf16) x (no mask, mask). See attention_bwd_kernel.h.
#include "attention_bwd_kernel.h"

namespace fastattn::cuda {
cudaError_t attention_bwd_hdim64(const AttnBwdParams& p, cudaStream_t stream) {
  return run_attention_bwd<64>(p, stream);
}
}  // namespace fastattn::cuda
