// The CUDA emulation's runtime (emu.h says what it does and what it cannot show): fibers and their
// scheduler, barriers, warp collectives, cp.async, the memory checks behind the instrumented kernel
// code, and the few CUDA runtime calls the kernels and the binding make.
#include "emu.h"

#include <dlfcn.h>
#include <link.h>
#include <pthread.h>
#include <sys/mman.h>

#include <algorithm>
#include <cmath>
#include <cstdarg>
#include <cstdio>
#include <cstring>
#include <deque>
#include <limits>
#include <string>
#include <vector>

#if !defined(__x86_64__) || !defined(__linux__)
#error "the CUDA emulation's context switch is written for x86-64 Linux"
#endif

// Saves the callee-saved registers of the running context on its stack, stores its stack pointer in
// *save, and continues the context whose stack pointer is `next` (the System V ABI leaves every other
// register to the caller, so these six and rsp are the whole context).
extern "C" void fastattn_emu_switch(void** save, void* next);
asm(R"(
  .text
  .p2align 4
  .globl fastattn_emu_switch
  .hidden fastattn_emu_switch
  .type fastattn_emu_switch, @function
fastattn_emu_switch:
  pushq %rbp
  pushq %rbx
  pushq %r12
  pushq %r13
  pushq %r14
  pushq %r15
  movq %rsp, (%rdi)
  movq %rsi, %rsp
  popq %r15
  popq %r14
  popq %r13
  popq %r12
  popq %rbx
  popq %rbp
  ret
  .size fastattn_emu_switch, .-fastattn_emu_switch
)");

namespace fastattn_emu {
namespace {

constexpr int kWarpSize = 32;
constexpr int kMaxThreads = 1024;
constexpr size_t kStackBytes = 128 * 1024;   // per thread: the kernels' register arrays and call frames
constexpr size_t kGuardBytes = 4096;         // PROT_NONE below each stack: an overflow faults at once
constexpr size_t kSmemCapacity = 256 * 1024; // >= every architecture's opt-in limit
constexpr size_t kDefaultDynSmem = 48 * 1024;
constexpr int16_t kNobody = -1, kMany = -2;

size_t smem_limit(int sm) { return sm >= 90 ? 232448 : 166912; }  // per block, opt-in maximum

enum class State : uint8_t { kReady, kBarrier, kWarp, kDone };
enum class Op : uint8_t { kNone, kShfl, kLdmatrix, kMma };
const char* op_name(Op op) {
  switch (op) {
    case Op::kShfl: return "__shfl_xor_sync";
    case Op::kLdmatrix: return "ldmatrix";
    case Op::kMma: return "mma.sync";
    default: return "nothing";
  }
}

struct Copy {
  uint32_t dst;
  const unsigned char* src;
  int cp_size, src_size;
};

struct Thread {
  void* sp = nullptr;
  int index = 0;
  State state = State::kReady;
  std::vector<Copy> open;                // cp.async issued, not committed
  std::deque<std::vector<Copy>> groups;  // committed, not retired; oldest first
};

// One warp's rendezvous: operands of the lanes that arrived, results once the last one has.
struct WarpSync {
  Op op = Op::kNone;
  int arrived = 0;
  unsigned mask = 0;  // shfl: the lanes named by the first arrival
  int arg = 0;        // shfl: lane mask; ldmatrix: number of matrices
  bool flag = false;  // ldmatrix: .trans; mma: bf16
  uint32_t in[kWarpSize][4];
  uint32_t in_b[kWarpSize][2];
  float in_c[kWarpSize][4];
  uint32_t out[kWarpSize][4];
  float out_f[kWarpSize][4];
};

// Per byte of shared memory: the last barrier interval (epoch) it was written / read in and by whom,
// and how many cp.async copies to it are in flight.
struct ByteShadow {
  uint32_t w_epoch = 0, r_epoch = 0;
  int16_t writer = kNobody, reader = kNobody;
  uint16_t inflight = 0;
};

struct Range {
  uintptr_t lo, hi;
};

struct Launch {
  dim3 grid, block, block_id;
  size_t dyn_smem = 0, smem_size = 0;
  void (*thunk)(void*) = nullptr;
  void* ctx = nullptr;
  int nthreads = 0, live = 0, barrier_arrived = 0;
  const void* barrier_site = nullptr;  // the __syncthreads the waiting threads called
  std::vector<Thread> threads;
  std::vector<WarpSync> warps;
  std::vector<std::pair<std::string, size_t>> statics;  // __shared__ declaration -> offset
  bool failed = false;
};

struct Emu {
  int arch = 80;
  int schedule = 0;
  int mma_block = 0, mma_bits = 0;  // > 0: mma.sync sums as the tensor cores do (truncating_sum)
  uint64_t block_ends = 0;  // > 0: a launch runs only its first and last block_ends blocks (in linear order)
  unsigned char* smem = nullptr;
  ByteShadow* shadow = nullptr;
  char* stacks = nullptr;  // kMaxThreads x (guard + stack)
  void* sched_sp = nullptr;
  Thread* cur = nullptr;
  Launch* launch = nullptr;
  uint32_t epoch = 1;
  uintptr_t host_stack_lo = 0, host_stack_hi = 0;
  std::vector<std::pair<const void*, int>> max_dyn_smem;  // cudaFuncSetAttribute per kernel
  std::vector<Range> inputs, allocs;  // global memory the kernels may read / read and write
  size_t input_hint = 0, alloc_hint = 0;
  cudaError_t pending = cudaSuccess;  // returned (and cleared) by cudaGetLastError
  std::string error;                  // the message of the last failure
  void* kernels_handle = nullptr;
  const void* table = nullptr;
  int64_t stats[5] = {0, 0, 0, 0, 0};  // launches, blocks, threads, switches, collectives
  uint64_t rng = 0;
};

Emu& emu() {
  static Emu e;
  return e;
}

std::string vformat(const char* fmt, va_list ap) {
  char buf[2048];
  vsnprintf(buf, sizeof(buf), fmt, ap);
  return buf;
}

std::string format(const char* fmt, ...) {
  va_list ap;
  va_start(ap, fmt);
  std::string s = vformat(fmt, ap);
  va_end(ap);
  return s;
}

std::string where() {
  Emu& e = emu();
  if (e.cur == nullptr || e.launch == nullptr) return "host";
  const Launch& L = *e.launch;
  const int i = e.cur->index;
  return format("block (%u,%u,%u) thread %d (warp %d lane %d)", L.block_id.x, L.block_id.y, L.block_id.z, i,
                i / kWarpSize, i % kWarpSize);
}

void yield() {
  Emu& e = emu();
  Thread* t = e.cur;
  ++e.stats[3];
  fastattn_emu_switch(&t->sp, e.sched_sp);
}

// *p, the state of the kernel running now; `what` (a device function) aborts when called outside one.
template <typename T>
T& inside_kernel(T* p, const char* what) {
  if (p == nullptr) {
    std::fprintf(stderr, "fastattn CUDA emulation: %s called outside a kernel\n", what);
    std::abort();
  }
  return *p;
}

Thread& current(const char* what) { return inside_kernel(emu().cur, what); }

// ------------------------------------------------------------------------------------ memory checks
// The range of `list` that holds [p, p + n), or nullptr; `hint` remembers the last hit.
const Range* find_range(const std::vector<Range>& list, size_t& hint, uintptr_t p, size_t n) {
  if (hint < list.size() && p >= list[hint].lo && p + n <= list[hint].hi) return &list[hint];
  for (size_t i = 0; i < list.size(); ++i)
    if (p >= list[i].lo && p + n <= list[i].hi) {
      hint = i;
      return &list[i];
    }
  return nullptr;
}

void check_global(uintptr_t p, size_t n, size_t align, bool write, const char* what) {
  Emu& e = emu();
  if (p % align != 0)
    fail("misaligned global %s of %zu bytes at %p (%s)", write ? "store" : "load", n, (void*)p, what);
  // an input may also be an allocation of an earlier call (a forward's output in the backward): read-only wins
  if (find_range(e.inputs, e.input_hint, p, n) != nullptr) {
    if (write) fail("global store of %zu bytes at %p writes into an input tensor (%s)", n, (void*)p, what);
    return;
  }
  if (find_range(e.allocs, e.alloc_hint, p, n) == nullptr)
    fail("global %s of %zu bytes at %p is outside every tensor of the call (%s)", write ? "store" : "load", n,
         (void*)p, what);
}

void shared_byte(size_t off, int tid, bool write, const char* what) {
  Emu& e = emu();
  ByteShadow& s = e.shadow[off];
  if (s.inflight) fail("%s of shared byte %zu while a cp.async to it is in flight", what, off);
  if (s.w_epoch == e.epoch && s.writer != tid)
    fail("race on shared byte %zu: %s by thread %d after a write by thread %d in the same barrier interval", off, what,
         tid, s.writer);
  if (write) {
    if (s.r_epoch == e.epoch && s.reader != tid)
      fail("race on shared byte %zu: %s by thread %d after a read by %s in the same barrier interval", off, what, tid,
           s.reader == kMany ? "several threads" : format("thread %d", s.reader).c_str());
    s.w_epoch = e.epoch;
    s.writer = int16_t(tid);
  } else if (s.r_epoch != e.epoch) {
    s.r_epoch = e.epoch;
    s.reader = int16_t(tid);
  } else if (s.reader != tid) {
    s.reader = kMany;
  }
}

// An access of n bytes at shared offset off by thread tid; `align` is the alignment it needs.
void check_shared(size_t off, size_t n, size_t align, int tid, bool write, const char* what) {
  Emu& e = emu();
  const size_t size = e.launch->smem_size;
  if (off + n > size)
    fail("%s of %zu bytes at shared offset %zu is beyond the %zu bytes of shared memory the launch has", what, n, off,
         size);
  if (off % align != 0) fail("misaligned %s of %zu bytes at shared offset %zu (needs %zu)", what, n, off, align);
  for (size_t i = 0; i < n; ++i) shared_byte(off + i, tid, write, what);
}

// `align`: what the access needs (its size for the plain hooks; 1 for the unaligned ones, which the
// compiler emits where it cannot prove alignment, as for a memcpy that nvcc would split by alignment).
void access(const void* a, size_t n, bool write, size_t align) {
  Emu& e = emu();
  Thread* t = e.cur;
  if (t == nullptr) return;  // the kernel files' host code (launch set-up)
  const uintptr_t p = reinterpret_cast<uintptr_t>(a);
  const uintptr_t smem = reinterpret_cast<uintptr_t>(e.smem);
  if (p - smem < kSmemCapacity) {
    check_shared(p - smem, n, align, t->index, write, write ? "store" : "load");
    return;
  }
  const uintptr_t stacks = reinterpret_cast<uintptr_t>(e.stacks);
  if (p - stacks < kMaxThreads * (kStackBytes + kGuardBytes)) return;  // the threads' registers and locals
  if (p - e.host_stack_lo < e.host_stack_hi - e.host_stack_lo) return;  // the kernel's arguments
  check_global(p, n, align, write, write ? "store" : "load");
}

// ------------------------------------------------------------------------------------ scheduling
Launch& launch_of(const char* what) { return inside_kernel(emu().launch, what); }

void release_barrier(Launch& L) {
  for (Thread& t : L.threads)
    if (t.state == State::kBarrier) t.state = State::kReady;
  L.barrier_arrived = 0;
  ++emu().epoch;
}

void land(Thread& t, const std::vector<Copy>& group) {
  Emu& e = emu();
  for (const Copy& c : group) {
    for (int i = 0; i < c.cp_size; ++i) {
      ByteShadow& s = e.shadow[c.dst + i];
      --s.inflight;
      s.w_epoch = e.epoch;
      s.writer = int16_t(t.index);
    }
    if (c.src_size > 0) std::memcpy(e.smem + c.dst, c.src, size_t(c.src_size));
    std::memset(e.smem + c.dst + c.src_size, 0, size_t(c.cp_size - c.src_size));
  }
}

[[noreturn]] void thread_exit() {
  Emu& e = emu();
  Thread& t = *e.cur;
  Launch& L = *e.launch;
  // copies still in flight complete (the hardware finishes them after the thread exits)
  if (!t.open.empty()) t.groups.push_back(std::move(t.open));
  for (auto& g : t.groups) land(t, g);
  t.groups.clear();
  t.state = State::kDone;
  --L.live;
  if (L.barrier_arrived > 0 && L.barrier_arrived == L.live) release_barrier(L);
  yield();
  std::abort();  // a finished thread is never resumed
}

extern "C" void fastattn_emu_thread_main() {
  Launch& L = *emu().launch;
  L.thunk(L.ctx);
  thread_exit();
}

void* initial_sp(int i) {
  Emu& e = emu();
  char* top = e.stacks + size_t(i + 1) * (kStackBytes + kGuardBytes);
  // fastattn_emu_switch pops six registers and returns: the return address is the thread's entry, and
  // the entry then starts with rsp = 8 (mod 16), as after a call.
  void** sp = reinterpret_cast<void**>(top - 64);
  for (int k = 0; k < 6; ++k) sp[k] = nullptr;
  sp[6] = reinterpret_cast<void*>(&fastattn_emu_thread_main);
  return sp;
}

uint64_t next_random() {
  uint64_t& x = emu().rng;
  x ^= x << 13;
  x ^= x >> 7;
  x ^= x << 17;
  return x;
}

void order_for(std::vector<int>& order, int n) {
  Emu& e = emu();
  order.resize(size_t(n));
  for (int i = 0; i < n; ++i) order[size_t(i)] = e.schedule == 1 ? n - 1 - i : i;
  if (e.schedule >= 2)
    for (int i = n - 1; i > 0; --i) std::swap(order[size_t(i)], order[size_t(next_random() % uint64_t(i + 1))]);
}

std::string deadlock_report(const Launch& L) {
  std::string s = "deadlock: no thread can run;";
  int shown = 0;
  for (size_t w = 0; w < L.warps.size() && shown < 6; ++w) {
    int barrier = 0, warp = 0, done = 0;
    for (int l = 0; l < kWarpSize; ++l) {
      const size_t i = w * kWarpSize + size_t(l);
      if (i >= L.threads.size()) break;
      const State st = L.threads[i].state;
      barrier += st == State::kBarrier;
      warp += st == State::kWarp;
      done += st == State::kDone;
    }
    if (warp == 0 && done == 0) continue;
    s += format(" warp %zu: %d lanes at __syncthreads, %d in %s, %d exited;", w, barrier, warp,
                op_name(L.warps[w].op), done);
    ++shown;
  }
  if (shown == 0) s += format(" %d threads at __syncthreads, %d live", L.barrier_arrived, L.live);
  return s;
}

bool run_block(Launch& L) {
  Emu& e = emu();
  std::memset(e.smem, 0xff, kSmemCapacity);  // NaN in every float format: reads of unwritten shared memory show
  ++e.epoch;
  for (int i = 0; i < L.nthreads; ++i) {
    Thread& t = L.threads[size_t(i)];
    t.sp = initial_sp(i);
    t.index = i;
    t.state = State::kReady;
    t.open.clear();
    t.groups.clear();
  }
  for (WarpSync& w : L.warps) w.op = Op::kNone, w.arrived = 0;
  L.live = L.nthreads;
  L.barrier_arrived = 0;
  std::vector<int> order;
  while (L.live > 0 && !L.failed) {
    order_for(order, L.nthreads);
    bool ran = false;
    for (int i : order) {
      Thread& t = L.threads[size_t(i)];
      if (t.state != State::kReady) continue;
      ran = true;
      e.cur = &t;
      ++e.stats[3];
      fastattn_emu_switch(&e.sched_sp, t.sp);
      e.cur = nullptr;
      if (L.failed) break;
    }
    if (!ran && !L.failed) {
      L.failed = true;
      e.error = format("block (%u,%u,%u): %s", L.block_id.x, L.block_id.y, L.block_id.z,
                       deadlock_report(L).c_str());
    }
  }
  if (L.failed)  // threads abandoned mid-flight leave copies behind
    for (size_t i = 0; i < kSmemCapacity; ++i) e.shadow[i].inflight = 0;
  return !L.failed;
}

void ensure_memory() {
  Emu& e = emu();
  if (e.smem != nullptr) return;
  e.smem = static_cast<unsigned char*>(std::aligned_alloc(128, kSmemCapacity));
  e.shadow = new ByteShadow[kSmemCapacity];
  const size_t bytes = size_t(kMaxThreads) * (kStackBytes + kGuardBytes);
  void* m = mmap(nullptr, bytes, PROT_READ | PROT_WRITE, MAP_PRIVATE | MAP_ANONYMOUS | MAP_NORESERVE, -1, 0);
  if (m == MAP_FAILED) {
    std::perror("fastattn CUDA emulation: mmap of the thread stacks");
    std::abort();
  }
  e.stacks = static_cast<char*>(m);
  for (int i = 0; i < kMaxThreads; ++i) mprotect(e.stacks + size_t(i) * (kStackBytes + kGuardBytes), kGuardBytes, PROT_NONE);
}

void host_stack_bounds() {
  Emu& e = emu();
  static thread_local uintptr_t lo = 0, hi = 0;  // pthread_getattr_np reads /proc on the main thread: once
  if (hi != 0) {
    e.host_stack_lo = lo, e.host_stack_hi = hi;
    return;
  }
  pthread_attr_t attr;
  void* addr = nullptr;
  size_t size = 0;
  if (pthread_getattr_np(pthread_self(), &attr) == 0) {
    pthread_attr_getstack(&attr, &addr, &size);
    pthread_attr_destroy(&attr);
  }
  lo = reinterpret_cast<uintptr_t>(addr), hi = lo + size;
  e.host_stack_lo = lo, e.host_stack_hi = hi;
}

cudaError_t launch_error(cudaError_t code, const std::string& msg) {
  Emu& e = emu();
  e.error = msg;
  e.pending = code;
  return code;
}

// ------------------------------------------------------------------------------------ collectives
template <typename Fill, typename Compute>
WarpSync& rendezvous(Op op, const char* what, Fill fill, Compute compute) {
  Thread& t = current(what);
  Launch& L = *emu().launch;
  const int w = t.index / kWarpSize, lane = t.index % kWarpSize;
  WarpSync& ws = L.warps[size_t(w)];
  if (ws.arrived > 0 && ws.op != op)
    fail("lanes of warp %d reached different collectives: lane %d %s while others wait in %s", w, lane, what,
         op_name(ws.op));
  if (ws.arrived == 0) ws.op = op;
  const int first = w * kWarpSize, lanes = std::min(kWarpSize, L.nthreads - first);
  for (int l = 0; l < lanes; ++l)
    if (L.threads[size_t(first + l)].state == State::kDone)
      fail("%s in warp %d while its lane %d has exited", what, w, l);
  fill(ws, lane);
  ++emu().stats[4];
  if (++ws.arrived == lanes) {
    compute(ws, lanes);
    ws.arrived = 0;
    ws.op = Op::kNone;
    for (int l = 0; l < lanes; ++l) {
      Thread& o = L.threads[size_t(first + l)];
      if (o.state == State::kWarp) o.state = State::kReady;
    }
  } else {
    t.state = State::kWarp;
    yield();
  }
  return ws;
}

template <typename T>
T shfl_xor_impl(unsigned mask, T v, int lane_mask, int width) {
  static_assert(sizeof(T) == 4, "32-bit shuffles");
  uint32_t bits;
  std::memcpy(&bits, &v, 4);
  WarpSync& ws = rendezvous(
      Op::kShfl, "__shfl_xor_sync",
      [&](WarpSync& s, int lane) {
        if (s.arrived == 0) s.mask = mask, s.arg = lane_mask;
        if (s.mask != mask || s.arg != lane_mask)
          fail("__shfl_xor_sync: lanes of one warp disagree on the mask or the lane mask");
        if (!(mask >> lane & 1u)) fail("__shfl_xor_sync: lane %d is not in its own mask 0x%08x", lane, mask);
        if (width < 1 || width > kWarpSize || (width & (width - 1)))
          fail("__shfl_xor_sync: width %d is not a power of two up to 32", width);
        s.in[lane][0] = bits;
      },
      [&](WarpSync& s, int lanes) {
        if (mask != 0xffffffffu || lanes != kWarpSize)
          fail("__shfl_xor_sync with mask 0x%08x in a warp of %d lanes: the emulation covers full warps", mask, lanes);
        for (int l = 0; l < kWarpSize; ++l) {
          int src = l ^ lane_mask;
          if (src / width != l / width) src = l;  // outside the lane's segment: its own value
          s.out[l][0] = s.in[src][0];
        }
      });
  const uint32_t r = ws.out[emu().cur->index % kWarpSize][0];
  T out;
  std::memcpy(&out, &r, 4);
  return out;
}

float f16_to_float(uint16_t h) {
  const int sign = h >> 15, exp = (h >> 10) & 0x1f, man = h & 0x3ff;
  float v;
  if (exp == 0) v = std::ldexp(float(man), -24);
  else if (exp == 31) v = man ? NAN : INFINITY;
  else v = std::ldexp(float(man | 0x400), exp - 25);
  return sign ? -v : v;
}

float bf16_to_float(uint16_t b) {
  const uint32_t u = uint32_t(b) << 16;
  float f;
  std::memcpy(&f, &u, 4);
  return f;
}

}  // namespace

// ------------------------------------------------------------------------------------ emu.h
[[noreturn]] void fail(const char* fmt, ...) {
  Emu& e = emu();
  va_list ap;
  va_start(ap, fmt);
  const std::string msg = vformat(fmt, ap);
  va_end(ap);
  if (e.cur == nullptr || e.launch == nullptr) {
    std::fprintf(stderr, "fastattn CUDA emulation: %s\n", msg.c_str());
    std::abort();
  }
  e.launch->failed = true;
  e.error = where() + ": " + msg;
  Thread* t = e.cur;
  t->state = State::kDone;
  fastattn_emu_switch(&t->sp, e.sched_sp);
  std::abort();
}

dim3 thread_idx() {
  const Launch& L = launch_of("threadIdx");
  const int i = current("threadIdx").index;
  return dim3(unsigned(i) % L.block.x, unsigned(i) / L.block.x % L.block.y, unsigned(i) / (L.block.x * L.block.y));
}
dim3 block_idx() { return launch_of("blockIdx").block_id; }
dim3 block_dim() { return launch_of("blockDim").block; }
dim3 grid_dim() { return launch_of("gridDim").grid; }
unsigned char* dynamic_smem() { return emu().smem; }

void* static_smem(const char* key, size_t bytes, size_t align) {
  Launch& L = launch_of("__shared__");
  for (const auto& s : L.statics)
    if (s.first == key) return emu().smem + s.second;
  const size_t off = (L.smem_size + align - 1) / align * align;
  if (off + bytes > smem_limit(emu().arch))
    fail("__shared__ %s: %zu bytes of shared memory in all, over sm_%d's %zu", key, off + bytes, emu().arch,
         smem_limit(emu().arch));
  L.statics.emplace_back(key, off);
  L.smem_size = off + bytes;
  return emu().smem + off;
}

void syncthreads() {
  const void* site = __builtin_return_address(0);
  Thread& t = current("__syncthreads");
  Launch& L = *emu().launch;
  if (L.barrier_arrived == 0) L.barrier_site = site;
  if (site != L.barrier_site)  // a __syncthreads in code the block does not run uniformly: a hang on a GPU
    fail("threads of the block wait at different __syncthreads (code at %p and %p)", L.barrier_site, site);
  t.state = State::kBarrier;
  if (++L.barrier_arrived == L.live) {
    release_barrier(L);  // the last thread to arrive goes on
  } else {
    yield();
  }
}

float shfl_xor(unsigned mask, float v, int lane_mask, int width) { return shfl_xor_impl(mask, v, lane_mask, width); }
int shfl_xor(unsigned mask, int v, int lane_mask, int width) { return shfl_xor_impl(mask, v, lane_mask, width); }
unsigned shfl_xor(unsigned mask, unsigned v, int lane_mask, int width) {
  return shfl_xor_impl(mask, v, lane_mask, width);
}

float atomic_add(float* address, float v) {
  current("atomicAdd");
  check_global(reinterpret_cast<uintptr_t>(address), 4, 4, true, "atomicAdd");
  const float old = *address;  // threads never run at the same time: a plain add is atomic here
  *address = old + v;
  return old;
}

uint32_t cvta_generic_to_shared(const void* p) {
  const uintptr_t off = reinterpret_cast<uintptr_t>(p) - reinterpret_cast<uintptr_t>(emu().smem);
  if (off >= kSmemCapacity) fail("__cvta_generic_to_shared of %p, which is not a shared-memory address", p);
  return uint32_t(off);
}

void cp_async(uint32_t dst, const void* src, int cp_size, int src_size) {
  Thread& t = current("cp.async");
  Emu& e = emu();
  if (cp_size != 4 && cp_size != 8 && cp_size != 16) fail("cp.async: cp-size %d is not 4, 8 or 16", cp_size);
  if (src_size < 0 || src_size > cp_size) fail("cp.async: src-size %d outside [0, %d]", src_size, cp_size);
  check_shared(dst, size_t(cp_size), size_t(cp_size), t.index, true, "cp.async destination");
  for (int i = 0; i < cp_size; ++i) ++e.shadow[dst + size_t(i)].inflight;
  if (src_size > 0) {
    if (reinterpret_cast<uintptr_t>(src) % uintptr_t(cp_size) != 0)
      fail("cp.async: source %p not aligned to its cp-size %d", src, cp_size);
    check_global(reinterpret_cast<uintptr_t>(src), size_t(src_size), 1, false, "cp.async source");
  }
  t.open.push_back({dst, static_cast<const unsigned char*>(src), cp_size, src_size});
}

void cp_async_commit() {
  Thread& t = current("cp.async.commit_group");
  t.groups.push_back(std::move(t.open));
  t.open.clear();
}

void cp_async_wait(int n) {
  Thread& t = current("cp.async.wait_group");
  while (t.groups.size() > size_t(n)) {
    land(t, t.groups.front());
    t.groups.pop_front();
  }
}

// PTX ISA, ldmatrix: lane 8 m + r (r < 8) gives the address of row r of matrix m (16 bytes, eight
// 16-bit elements); lane l receives, of each matrix, the elements (l / 4, 2 (l % 4) + {0, 1}) -- with
// .trans the elements (2 (l % 4) + {0, 1}, l / 4) -- the first in the low half of its register.
void ldmatrix(uint32_t* r, int num, bool trans, uint32_t addr) {
  if (num != 1 && num != 2 && num != 4) fail("ldmatrix: .x%d is not .x1, .x2 or .x4", num);
  WarpSync& ws = rendezvous(
      Op::kLdmatrix, "ldmatrix",
      [&](WarpSync& s, int lane) {
        if (s.arrived == 0) s.arg = num, s.flag = trans;
        if (s.arg != num || s.flag != trans) fail("ldmatrix: lanes of one warp use different shapes");
        s.in[lane][0] = addr;
      },
      [&](WarpSync& s, int lanes) {
        if (lanes != kWarpSize) fail("ldmatrix in a warp of %d lanes (needs all 32)", lanes);
        Emu& e = emu();
        const int warp0 = e.cur->index / kWarpSize * kWarpSize;
        uint16_t m[4][8][8];
        for (int mi = 0; mi < num; ++mi)
          for (int row = 0; row < 8; ++row) {
            const int src_lane = 8 * mi + row;
            const uint32_t a = s.in[src_lane][0];
            check_shared(a, 16, 16, warp0 + src_lane, false, "ldmatrix row");
            std::memcpy(m[mi][row], e.smem + a, 16);
          }
        for (int l = 0; l < kWarpSize; ++l)
          for (int mi = 0; mi < num; ++mi) {
            const int i = l / 4, j = 2 * (l % 4);
            const uint16_t lo = trans ? m[mi][j][i] : m[mi][i][j];
            const uint16_t hi = trans ? m[mi][j + 1][i] : m[mi][i][j + 1];
            s.out[l][mi] = uint32_t(lo) | uint32_t(hi) << 16;
          }
      });
  const int lane = emu().cur->index % kWarpSize;
  for (int mi = 0; mi < num; ++mi) r[mi] = ws.out[lane][mi];
}

// c + the 16 exact products p of an mma.sync output. block 0: summed exactly, rounded once to nearest (what
// float32 arithmetic would give at best). block > 0: as NVIDIA's tensor cores add (Fasi, Higham, Mikaitis and
// Pranesh, "Numerical behavior of NVIDIA tensor cores", PeerJ CS 2021): the products of each group of `block`
// and the accumulator are aligned to the largest exponent among them and cut toward zero `bits` bits below it
// (no guard bits), summed exactly, and the sum goes back into float32 toward zero; the groups in k order. On a
// GPU a saturated softmax row's dP - delta, which cancels to far below |dP|, loses 2-4x the bits it loses to one
// rounding to nearest; this lets the emulation show it. Non-finite terms: the IEEE sum (NaN and Inf as torch).
static float truncating_sum(float c, const double (&p)[16], int block, int bits) {
  double exact = c;
  for (double x : p) exact += x;
  if (block <= 0 || !std::isfinite(exact)) return float(exact);
  float acc = c;
  for (int k0 = 0; k0 < 16; k0 += block) {
    int emax = std::numeric_limits<int>::min();
    if (acc != 0.f) emax = std::ilogb(acc);
    for (int k = k0; k < k0 + block; ++k)
      if (p[k] != 0.0) emax = std::max(emax, std::ilogb(p[k]));
    if (emax == std::numeric_limits<int>::min()) continue;  // all zero: acc stays (its sign too)
    const double unit = std::ldexp(1.0, emax - bits);  // every term a multiple of it: the sum is exact
    double sum = std::trunc(double(acc) / unit) * unit;
    for (int k = k0; k < k0 + block; ++k) sum += std::trunc(p[k] / unit) * unit;
    float f = float(sum);
    if (std::fabs(double(f)) > std::fabs(sum)) f = std::nextafter(f, 0.f);  // toward zero (past FLT_MAX: FLT_MAX)
    acc = f;
  }
  return acc;
}

// PTX ISA, mma.m16n8k16 with .f16/.bf16 inputs and .f32 accumulators; g = lane / 4, t = lane % 4:
//   A (16 x 16, .row): element a_i (i = 0..7, two per register, a_0 in the low half of register 0)
//     is A[g + 8 * (i % 4 >= 2)][2 t + i % 2 + 8 * (i >= 4)]
//   B (16 x 8, .col): b_i (i = 0..3) is B[2 t + i % 2 + 8 * (i >= 2)][g]
//   C, D (16 x 8): c_i (i = 0..3) is C[g + 8 * (i >= 2)][2 t + i % 2]
void mma_m16n8k16(float* d, const uint32_t* a, const uint32_t* b, const float* c, bool bf16) {
  WarpSync& ws = rendezvous(
      Op::kMma, "mma.sync",
      [&](WarpSync& s, int lane) {
        if (s.arrived == 0) s.flag = bf16;
        if (s.flag != bf16) fail("mma.sync: lanes of one warp use different input types");
        for (int i = 0; i < 4; ++i) s.in[lane][i] = a[i], s.in_c[lane][i] = c[i];
        s.in_b[lane][0] = b[0], s.in_b[lane][1] = b[1];
      },
      [&](WarpSync& s, int lanes) {
        if (lanes != kWarpSize) fail("mma.sync in a warp of %d lanes (needs all 32)", lanes);
        auto cvt = [&](uint32_t reg, int half) {
          const uint16_t h = uint16_t(reg >> (16 * half));
          return s.flag ? bf16_to_float(h) : f16_to_float(h);
        };
        float A[16][16], B[16][8], C[16][8];
        for (int l = 0; l < kWarpSize; ++l) {
          const int g = l / 4, t = l % 4;
          for (int i = 0; i < 8; ++i)
            A[g + 8 * (i % 4 >= 2)][2 * t + i % 2 + 8 * (i >= 4)] = cvt(s.in[l][i / 2], i % 2);
          for (int i = 0; i < 4; ++i) B[2 * t + i % 2 + 8 * (i >= 2)][g] = cvt(s.in_b[l][i / 2], i % 2);
          for (int i = 0; i < 4; ++i) C[g + 8 * (i >= 2)][2 * t + i % 2] = s.in_c[l][i];
        }
        for (int l = 0; l < kWarpSize; ++l) {
          const int g = l / 4, t = l % 4;
          for (int i = 0; i < 4; ++i) {
            const int row = g + 8 * (i >= 2), col = 2 * t + i % 2;
            double prod[16];
            for (int k = 0; k < 16; ++k) prod[k] = double(A[row][k]) * double(B[k][col]);  // exact
            s.out_f[l][i] = truncating_sum(C[row][col], prod, emu().mma_block, emu().mma_bits);
          }
        }
      });
  const int lane = emu().cur->index % kWarpSize;
  for (int i = 0; i < 4; ++i) d[i] = ws.out_f[lane][i];
}

cudaError_t run_launch(const void* kernel, dim3 grid, dim3 block, size_t dyn_smem, void (*thunk)(void*), void* ctx) {
  Emu& e = emu();
  ensure_memory();
  host_stack_bounds();
  ++e.stats[0];
  const uint64_t threads = uint64_t(block.x) * block.y * block.z;
  if (threads == 0 || threads > uint64_t(kMaxThreads) || block.z > 64 || grid.x == 0 || grid.y == 0 || grid.z == 0 ||
      grid.y > 65535 || grid.z > 65535 || grid.x > 2147483647u)
    return launch_error(cudaErrorInvalidConfiguration,
                        format("invalid launch configuration: grid (%u,%u,%u), block (%u,%u,%u)", grid.x, grid.y,
                               grid.z, block.x, block.y, block.z));
  int allowed = int(kDefaultDynSmem);
  for (const auto& a : e.max_dyn_smem)
    if (a.first == kernel) allowed = a.second;
  if (dyn_smem > size_t(allowed))
    return launch_error(cudaErrorInvalidValue,
                        format("launch with %zu bytes of dynamic shared memory, over the %d allowed (above 48 KB a "
                               "kernel needs cudaFuncSetAttribute(cudaFuncAttributeMaxDynamicSharedMemorySize))",
                               dyn_smem, allowed));
  if (dyn_smem > smem_limit(e.arch))
    return launch_error(cudaErrorInvalidValue, format("launch with %zu bytes of dynamic shared memory, over sm_%d's %zu",
                                                      dyn_smem, e.arch, smem_limit(e.arch)));
  Launch L;
  L.grid = grid, L.block = block, L.dyn_smem = dyn_smem, L.smem_size = dyn_smem;
  L.thunk = thunk, L.ctx = ctx;
  L.nthreads = int(threads);
  L.threads.resize(size_t(L.nthreads));
  L.warps.resize(size_t((L.nthreads + kWarpSize - 1) / kWarpSize));
  e.launch = &L;
  std::vector<uint64_t> blocks;
  for (unsigned z = 0; z < grid.z; ++z)
    for (unsigned y = 0; y < grid.y; ++y)
      for (unsigned x = 0; x < grid.x; ++x) blocks.push_back(uint64_t(z) << 48 | uint64_t(y) << 32 | x);
  if (e.block_ends > 0 && blocks.size() > 2 * e.block_ends)
    blocks.erase(blocks.begin() + ptrdiff_t(e.block_ends), blocks.end() - ptrdiff_t(e.block_ends));
  if (e.schedule == 1) std::reverse(blocks.begin(), blocks.end());
  if (e.schedule >= 2)
    for (size_t i = blocks.size(); i > 1; --i) std::swap(blocks[i - 1], blocks[size_t(next_random() % i)]);
  bool ok = true;
  for (uint64_t id : blocks) {
    L.block_id = dim3(unsigned(id & 0xffffffffu), unsigned(id >> 32 & 0xffff), unsigned(id >> 48));
    ++e.stats[1];
    e.stats[2] += L.nthreads;
    if (!(ok = run_block(L))) break;
  }
  e.launch = nullptr;
  if (!ok) return launch_error(cudaErrorLaunchFailure, e.error);
  return cudaSuccess;
}

void register_buffer(const void* p, size_t bytes, bool writable) {
  const uintptr_t lo = reinterpret_cast<uintptr_t>(p);
  (writable ? emu().allocs : emu().inputs).push_back({lo, lo + bytes});
}

void unregister_buffer(const void* p, bool writable) {
  auto& list = writable ? emu().allocs : emu().inputs;
  const uintptr_t lo = reinterpret_cast<uintptr_t>(p);
  for (size_t i = list.size(); i-- > 0;)
    if (list[i].lo == lo) {
      list.erase(list.begin() + long(i));
      break;
    }
}

const void* kernel_table() { return emu().table; }

}  // namespace fastattn_emu

// ------------------------------------------------------------------------------------ ThreadSanitizer hooks
// The kernel files are compiled with -fsanitize=thread and linked without libtsan: every load and
// store they make calls one of these.
extern "C" {
void __tsan_init() {}
void __tsan_func_entry(void*) {}
void __tsan_func_exit() {}
void __tsan_vptr_update(void**, void*) {}
void __tsan_vptr_read(void**) {}
void __tsan_read_range(void* a, size_t n) { fastattn_emu::access(a, n, false, 1); }
void __tsan_write_range(void* a, size_t n) { fastattn_emu::access(a, n, true, 1); }
#define FASTATTN_EMU_TSAN_HOOKS(N)                                                   \
  void __tsan_read##N(void* a) { fastattn_emu::access(a, N, false, N); }            \
  void __tsan_write##N(void* a) { fastattn_emu::access(a, N, true, N); }            \
  void __tsan_unaligned_read##N(void* a) { fastattn_emu::access(a, N, false, 1); }  \
  void __tsan_unaligned_write##N(void* a) { fastattn_emu::access(a, N, true, 1); }
FASTATTN_EMU_TSAN_HOOKS(1)
FASTATTN_EMU_TSAN_HOOKS(2)
FASTATTN_EMU_TSAN_HOOKS(4)
FASTATTN_EMU_TSAN_HOOKS(8)
FASTATTN_EMU_TSAN_HOOKS(16)
#undef FASTATTN_EMU_TSAN_HOOKS

}  // extern "C"

// ------------------------------------------------------------------------------------ CUDA runtime
// Under their own names (prelude.h and binding_emu.h map the CUDA ones onto them): a process that has
// CUDA's real runtime loaded (torch's CUDA builds) must not bind the kernels' calls to it.
namespace fastattn_emu {

cudaError_t func_set_attribute(const void* func, cudaFuncAttribute attr, int value) {
  Emu& e = emu();
  if (attr != cudaFuncAttributeMaxDynamicSharedMemorySize) return cudaSuccess;
  if (value < 0 || size_t(value) > smem_limit(e.arch))
    return launch_error(cudaErrorInvalidValue,
                        format("cudaFuncSetAttribute: %d bytes of dynamic shared memory, over sm_%d's %zu", value,
                               e.arch, smem_limit(e.arch)));
  for (auto& a : e.max_dyn_smem)
    if (a.first == func) {
      a.second = value;
      return cudaSuccess;
    }
  e.max_dyn_smem.emplace_back(func, value);
  return cudaSuccess;
}

cudaError_t get_last_error() {
  Emu& e = emu();
  const cudaError_t r = e.pending;
  e.pending = cudaSuccess;
  return r;
}

cudaError_t device_get_attribute(int* value, cudaDeviceAttr attr, int) {
  const int arch = emu().arch;
  if (attr == cudaDevAttrComputeCapabilityMajor) *value = arch / 10;
  else if (attr == cudaDevAttrComputeCapabilityMinor) *value = arch % 10;
  else if (attr == cudaDevAttrMultiProcessorCount) *value = arch >= 90 ? 132 : 108;  // H100 SXM, A100
  else return cudaErrorInvalidValue;
  return cudaSuccess;
}

}  // namespace fastattn_emu

extern "C" {
// ------------------------------------------------------------------------------------ control (emu.h)
int fastattn_emu_set_arch(int sm) {
  auto& e = fastattn_emu::emu();
  const int old = e.arch;
  e.arch = sm;
  return old;
}

int fastattn_emu_set_schedule(int schedule) {
  auto& e = fastattn_emu::emu();
  const int old = e.schedule;
  e.schedule = schedule;
  e.rng = 0x9e3779b97f4a7c15ull ^ uint64_t(schedule);
  return old;
}

int fastattn_emu_set_mma(int block, int bits) {
  auto& e = fastattn_emu::emu();
  if (block < 0 || block > 16 || (block > 0 && 16 % block != 0) || bits < 0 || bits > 52) return -1;
  const int old = e.mma_block * 256 + e.mma_bits;
  e.mma_block = block, e.mma_bits = bits;
  return old;
}

int64_t fastattn_emu_set_block_ends(int64_t n) {
  auto& e = fastattn_emu::emu();
  const int64_t old = int64_t(e.block_ends);
  e.block_ends = uint64_t(n);
  return old;
}

int fastattn_emu_use_kernels(const char* path) {
  auto& e = fastattn_emu::emu();
  void* h = dlopen(path, RTLD_NOW | RTLD_LOCAL);
  if (h == nullptr) {
    e.error = std::string("dlopen: ") + dlerror();
    return -1;
  }
  using Fn = const void* (*)();
  auto fn = reinterpret_cast<Fn>(dlsym(h, "fastattn_emu_kernels"));
  if (fn == nullptr) {
    e.error = std::string(path) + " has no fastattn_emu_kernels";
    dlclose(h);
    return -1;
  }
  e.table = fn();
  e.kernels_handle = h;  // builds stay loaded: a switch back must not unload code a table points into
  return 0;
}

void fastattn_emu_register_buffer(void* p, size_t bytes, int writable) {
  fastattn_emu::register_buffer(p, bytes, writable != 0);
}
void fastattn_emu_unregister_buffer(void* p, int writable) { fastattn_emu::unregister_buffer(p, writable != 0); }

const char* fastattn_emu_last_error() { return fastattn_emu::emu().error.c_str(); }

void fastattn_emu_stats(int64_t* out5, int reset) {
  auto& e = fastattn_emu::emu();
  for (int i = 0; i < 5; ++i) out5[i] = e.stats[i];
  if (reset)
    for (auto& s : e.stats) s = 0;
}
}  // extern "C"
