// The host entry points of params.h, as the binding calls them under the CUDA emulation: forwarded
// to the build of the kernels in use (fastattn_emu_use_kernels).
#include "emu.h"
#include "host_entries.h"

namespace fastattn::cuda {

#define FASTATTN_EMU_ENTRY(name, Params)                                                          \
  cudaError_t name(const Params& p, cudaStream_t stream) {                                        \
    auto* table = static_cast<const fastattn_emu::KernelTable*>(fastattn_emu::kernel_table()); \
    return table ? table->name(p, stream) : cudaErrorInvalidDeviceFunction;                       \
  }
FASTATTN_EMU_HOST_ENTRIES(FASTATTN_EMU_ENTRY)
#undef FASTATTN_EMU_ENTRY

}  // namespace fastattn::cuda
