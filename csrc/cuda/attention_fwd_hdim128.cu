// Forward instantiations for D = 128 (fp16, bf16) x (no mask, mask, packed sequences) x (out_acc kept or not). See
// attention_fwd_kernel.h.
#include "attention_fwd_kernel.h"

namespace fastattn::cuda {
cudaError_t attention_fwd_hdim128(const AttnParams& p, cudaStream_t stream) {
  return run_attention_fwd<128>(p, stream);
}
}  // namespace fastattn::cuda
