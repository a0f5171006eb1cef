// What binding.cpp needs from c10/cuda, for the CPU emulation (emu.h): a device guard and a stream
// that do nothing, C10_CUDA_CHECK with the emulation's message, and the registration of the ops as
// torch.ops.fastattn.cuda_emu_* for CPU tensors, each call wrapped so that the kernels may touch the
// call's tensors (inputs read-only) and what the binding allocates during it, and nothing else.
#pragma once

#include <ATen/ATen.h>
#include <c10/core/CPUAllocator.h>
#include <torch/library.h>

#include <cstring>
#include <optional>
#include <vector>

#include "emu.h"

namespace c10::cuda {
struct CUDAGuard {
  explicit CUDAGuard(c10::Device) {}
};
struct CUDAStream {
  cudaStream_t stream() const { return nullptr; }
};
inline CUDAStream getCurrentCUDAStream() { return {}; }
}  // namespace c10::cuda

#define cudaDeviceGetAttribute ::fastattn_emu::device_get_attribute  // not CUDA's (see prelude.h)

#define C10_CUDA_CHECK(EXPR)                                                                 \
  do {                                                                                       \
    const cudaError_t fastattn_emu_err = (EXPR);                                             \
    TORCH_CHECK(fastattn_emu_err == cudaSuccess, "CUDA emulation: ", fastattn_emu_last_error()); \
  } while (0)

namespace fastattn_emu {

// The CPU allocator during an emulated call: every allocation becomes writable global memory for the
// kernels until it is freed.
struct TrackingAllocator final : c10::Allocator {
  c10::Allocator* base = nullptr;
  c10::DataPtr allocate(size_t n) override {
    c10::DataPtr inner = base->allocate(n);
    void* data = inner.get();
    const c10::Device device = inner.device();
    if (data != nullptr && n > 0) register_buffer(data, n, true);
    return c10::DataPtr(data, new c10::DataPtr(std::move(inner)), &release, device);
  }
  static void release(void* ctx) {
    auto* inner = static_cast<c10::DataPtr*>(ctx);
    if (inner->get() != nullptr) unregister_buffer(inner->get(), true);
    delete inner;
  }
  void copy_data(void* dest, const void* src, std::size_t count) const override { std::memcpy(dest, src, count); }
};

class CallScope {
 public:
  CallScope() {
    static TrackingAllocator tracking;
    prev_ = c10::GetCPUAllocator();
    tracking.base = prev_;
    c10::SetCPUAllocator(&tracking, kPriority);
  }
  ~CallScope() {
    c10::SetCPUAllocator(prev_, kPriority);
    for (const void* p : inputs_) unregister_buffer(p, false);
  }
  // The elements a view reaches: [data, data + (sum of (size - 1) * stride + 1) elements).
  void input(const at::Tensor& t) {
    if (!t.defined() || t.numel() == 0) return;
    int64_t last = 0;
    for (int64_t d = 0; d < t.dim(); ++d) last += (t.size(d) - 1) * t.stride(d);
    register_buffer(t.data_ptr(), size_t(last + 1) * t.element_size(), false);
    inputs_.push_back(t.data_ptr());
  }
  void input(const std::optional<at::Tensor>& t) {
    if (t.has_value()) input(*t);
  }
  template <typename T>
  void input(const T&) {}

 private:
  static constexpr uint8_t kPriority = 200;  // above the default CPU allocator's
  c10::Allocator* prev_ = nullptr;
  std::vector<const void*> inputs_;
};

template <auto F>
struct Guarded;
template <typename R, typename... A, R (*F)(A...)>
struct Guarded<F> {
  static R call(A... args) {
    CallScope scope;
    (scope.input(args), ...);
    return F(args...);
  }
};

}  // namespace fastattn_emu

constexpr c10::DeviceType kKernelDevice = c10::DeviceType::CPU;
#define FASTATTN_CUDA_OPS(m) TORCH_LIBRARY_IMPL(fastattn, CPU, m)
#define FASTATTN_CUDA_OP(m, name, fn) m.impl("cuda_emu_" name, &::fastattn_emu::Guarded<fn>::call)
