// Linked into every build of the kernels for the CUDA emulation: their host entry points as a table.
#include "host_entries.h"

extern "C" const fastattn_emu::KernelTable* fastattn_emu_kernels() {
  static const fastattn_emu::KernelTable table = {
#define FASTATTN_EMU_ENTRY(name, Params) &fastattn::cuda::name,
      FASTATTN_EMU_HOST_ENTRIES(FASTATTN_EMU_ENTRY)
#undef FASTATTN_EMU_ENTRY
  };
  return &table;
}
