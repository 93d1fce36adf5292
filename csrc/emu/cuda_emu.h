// A small CUDA emulator, for tests: csrc/cuda/*.cu compiled as host C++ (with INSLOC_CUDA_EMU defined,
// see csrc/cuda/runtime.h) run their kernels' own code on the CPU.
//
// Every thread of a block is a fiber (ucontext) with its own stack, on the calling OS thread. A block runs
// in rounds: each runnable thread runs until it reaches __syncthreads, a warp shuffle or its end; then
// the barrier is released and the next round runs the threads in the opposite order. So a missing
// __syncthreads shows up as a read of data another thread has not written yet, or has already
// overwritten, whichever direction the race goes. INSLOC_EMU_SCHEDULE (read at every launch) picks the
// order: "alternate" (the default), "forward", "reverse", or "random:SEED" (threads shuffled every round,
// blocks shuffled too). A kernel whose results change with the schedule has a race: two threads of one
// round, or two blocks, touching the same memory without a barrier or an atomic between them.
// Checked, and reported as a C++ exception at the launch:
// - launch limits (block <= 1024 threads, grid.y/z <= 65535, dynamic shared memory over 48 KiB only after
//   allow_dynamic_shared and never over the opt-in limit, grid sizes that do not fit their field);
// - __syncthreads that some threads of the block never reach (they exited or wait elsewhere);
// - warp shuffles and WMMA operations (csrc/emu/wmma.h) that not every lane of the warp reaches, or whose
//   lanes wait at different ones; WMMA's own rules (see there).
// Dynamic shared memory is filled with 0xff bytes (NaN for floats) before every block, and starts 128-byte
// aligned, as on a GPU.
// Built with INSLOC_EMU_RACES (and -fsanitize=thread, whose per-access hooks csrc/emu/races.cpp supplies
// instead of the sanitizer's runtime), every memory access of a kernel thread is also checked against the
// others: two threads of a block touching one 4-byte word (one byte, for narrower accesses) in the same
// barrier interval, or two blocks touching one global word, at least one of them writing and neither
// through an atomic, is a race.
// That catches what no schedule shows: a lost update (two threads adding to one value without an atomic).
// Not emulated: the memory model, timing, registers. Static __shared__ variables are function statics:
// they keep their values between blocks.
#pragma once

#include <sys/mman.h>
#include <ucontext.h>
#include <unistd.h>

#include <algorithm>
#include <cstdint>
#include <cstdio>
#include <cstdlib>
#include <cstring>
#include <functional>
#include <map>
#include <mutex>
#include <new>
#include <numeric>
#include <random>
#include <stdexcept>
#include <string>
#include <tuple>
#include <type_traits>
#include <unordered_map>
#include <utility>
#include <vector>

#define __global__
#define __device__
#define __host__
#define __forceinline__ inline
#define __launch_bounds__(...)
#define __shared__ static

struct uint3 {
  unsigned x, y, z;
};

struct dim3 {
  unsigned x = 1, y = 1, z = 1;
  // CUDA's dim3 truncates silently; here a value that does not fit is an error at the launch.
  dim3(long long x_ = 1, long long y_ = 1, long long z_ = 1) : x(fit(x_)), y(fit(y_)), z(fit(z_)) {}

 private:
  static unsigned fit(long long v) {
    if (v < 0 || v > 0xffffffffLL) throw std::runtime_error("cuda_emu: dim3 component out of range: " + std::to_string(v));
    return unsigned(v);
  }
};

// Emulator code that runs inside kernel threads is left out of the race build's instrumentation.
#define INSLOC_EMU_INTERNAL __attribute__((no_sanitize_thread))

namespace insloc_emu {

constexpr int kWarpSize = 32;
constexpr size_t kDefaultSharedLimit = 48 * 1024;
constexpr size_t kStackBytes = 256 * 1024;

enum class FiberState { kRunnable, kAtBarrier, kAtWarpSync, kDone };

struct Fiber {
  ucontext_t context;
  uint3 thread_idx;
  int linear;
  FiberState state;
  int quiet;               // the thread's Quiet depth while it is suspended
  const char* collective;  // at kAtWarpSync: the warp-collective operation it waits at, for errors
};

// Per OS thread: whether a kernel thread (fiber) is running, and how deep in emulator internals it is
// (accesses are recorded only at depth 0).
struct Recording {
  bool in_kernel = false;
  int quiet = 0;
};
inline thread_local Recording recording;

struct Quiet {
  INSLOC_EMU_INTERNAL Quiet() { ++recording.quiet; }
  INSLOC_EMU_INTERNAL ~Quiet() { --recording.quiet; }
};

// Race build: who last wrote and read a word or byte (block, thread, barrier interval).
struct Access {
  int64_t block = -1, phase = -1;
  int thread = -1;
};
struct WordRecord {
  Access write, read;
  bool readers = false;  // more than one thread read it in read's (block, phase)
};

// Dynamic shared memory starts 128-byte aligned (WMMA needs 32-byte aligned pointers; a GPU's dynamic shared
// memory starts at least that aligned). An allocator rather than an offset into a larger buffer keeps the
// vector's bytes exactly the block's, so AddressSanitizer still sees an access past the end.
template <typename T>
struct SharedAllocator {
  using value_type = T;
  static constexpr std::align_val_t kAlign{128};
  SharedAllocator() = default;
  template <typename U>
  SharedAllocator(const SharedAllocator<U>&) {}
  T* allocate(size_t n) { return static_cast<T*>(::operator new(n * sizeof(T), kAlign)); }
  void deallocate(T* p, size_t) { ::operator delete(p, kAlign); }
  template <typename U>
  bool operator==(const SharedAllocator<U>&) const { return true; }
  template <typename U>
  bool operator!=(const SharedAllocator<U>&) const { return false; }
};

struct State {
  std::mutex mutex;  // one launch at a time
  uint3 block_idx{0, 0, 0};
  uint3 block_dim{1, 1, 1};
  uint3 grid_dim{1, 1, 1};
  std::vector<Fiber> fibers;
  Fiber* current = nullptr;
  ucontext_t scheduler;
  char* stacks = nullptr;
  size_t stack_slots = 0;
  std::vector<unsigned char, SharedAllocator<unsigned char>> dynamic_shared;
  std::vector<uint64_t> exchange;            // a warp shuffle's value, per thread
  std::vector<const void*> exchange_record;  // a WMMA operation's arguments, per thread (fibers share memory)
  const std::function<void()>* body = nullptr;
  std::map<const void*, size_t> shared_allowed;  // kernel -> dynamic shared bytes allowed
  std::string error;
  uint64_t vector_accesses = 0;  // 16-byte loads and stores, for tests (torch.ops.insloc_emu.vector_accesses)
  std::map<std::string, int64_t> notes;  // host code's choices, by label (INSLOC_EMU_NOTE; insloc_emu.notes)
  std::map<std::string, int64_t> values;  // the last value host code recorded (INSLOC_EMU_VALUE; insloc_emu.value)
  // race build
  int64_t block_linear = 0, phase = 0;
  std::unordered_map<uintptr_t, WordRecord> global_words, shared_words;
  std::vector<std::pair<uintptr_t, uintptr_t>> static_ranges;  // this library's writable segments
};

inline State& state() {
  static State s;
  return s;
}

// Host code's record of a choice it made (which kernel it launched), for tests: INSLOC_EMU_NOTE(label) in
// csrc/cuda/*.cu, read back by torch.ops.insloc_emu.notes(label). Compiled out of the CUDA build.
inline void note(const char* label) { ++state().notes[label]; }
// A number host code computed for a launch (a split count, a chunk size), kept by label for tests:
// INSLOC_EMU_VALUE(label, v), read back by torch.ops.insloc_emu.value(label).
inline void value(const char* label, int64_t v) { state().values[label] = v; }

// Device properties the host code asks for; INSLOC_EMU_SM_COUNT sets the SM count (default 4) so that
// tests can vary the launch geometry that depends on it.
inline int sm_count() {
  const char* v = std::getenv("INSLOC_EMU_SM_COUNT");
  const int n = v ? std::atoi(v) : 4;
  return n > 0 ? n : 4;
}
inline int max_shared_per_block_optin() { return 227 * 1024; }  // H100

inline void allow_dynamic_shared(const void* kernel, size_t bytes) {
  if (bytes > size_t(max_shared_per_block_optin()))
    throw std::runtime_error("cuda_emu: cudaFuncSetAttribute asks for " + std::to_string(bytes) +
                             " bytes of dynamic shared memory, over the opt-in limit");
  state().shared_allowed[kernel] = bytes;
}

struct Schedule {
  enum Kind { kAlternate, kForward, kReverse, kRandom } kind = kAlternate;
  uint64_t seed = 0;
};

inline Schedule schedule() {
  Schedule sc;
  const char* v = std::getenv("INSLOC_EMU_SCHEDULE");
  const std::string s = v ? v : "alternate";
  if (s == "alternate") return sc;
  if (s == "forward") sc.kind = Schedule::kForward;
  else if (s == "reverse") sc.kind = Schedule::kReverse;
  else if (s.rfind("random:", 0) == 0) {
    sc.kind = Schedule::kRandom;
    sc.seed = std::stoull(s.substr(7));
  } else {
    throw std::runtime_error("cuda_emu: INSLOC_EMU_SCHEDULE must be alternate, forward, reverse or random:SEED, got " + s);
  }
  return sc;
}

INSLOC_EMU_INTERNAL inline const uint3& thread_idx() {
  State& s = state();
  if (s.current == nullptr) throw std::logic_error("cuda_emu: threadIdx read outside a kernel");
  return s.current->thread_idx;
}

INSLOC_EMU_INTERNAL inline unsigned char* dynamic_shared() {
  Quiet quiet;
  return state().dynamic_shared.data();
}

// Suspends the running thread (fiber) in `to` and returns to the block's scheduler.
INSLOC_EMU_INTERNAL inline void yield(FiberState to) {
  Quiet quiet;
  State& s = state();
  Fiber* f = s.current;
  f->state = to;
  swapcontext(&f->context, &s.scheduler);
}

// Waits at the warp-collective operation `what` (named in errors) until every lane of the warp waits at one.
INSLOC_EMU_INTERNAL inline void warp_sync(const char* what) {
  Quiet quiet;
  state().current->collective = what;
  yield(FiberState::kAtWarpSync);
}

// An error found inside a kernel thread: recorded, the thread never resumes, the launch throws it.
[[noreturn]] INSLOC_EMU_INTERNAL inline void fail(const std::string& message) {
  Quiet quiet;
  State& s = state();
  if (s.error.empty()) s.error = message;
  yield(FiberState::kDone);
  std::abort();  // never resumed
}

INSLOC_EMU_INTERNAL inline void fiber_main() {
  State& s = state();
  (*s.body)();
  s.current->state = FiberState::kDone;
  // returning resumes uc_link, the scheduler
}

INSLOC_EMU_INTERNAL inline void ensure_stacks(size_t threads) {
  State& s = state();
  if (s.stack_slots >= threads) return;
  if (s.stacks != nullptr) munmap(s.stacks, s.stack_slots * kStackBytes);
  void* p = mmap(nullptr, threads * kStackBytes, PROT_READ | PROT_WRITE, MAP_PRIVATE | MAP_ANONYMOUS | MAP_NORESERVE,
                 -1, 0);
  if (p == MAP_FAILED) throw std::runtime_error("cuda_emu: cannot map fiber stacks");
  s.stacks = static_cast<char*>(p);
  s.stack_slots = threads;
  const size_t page = size_t(sysconf(_SC_PAGESIZE));
  for (size_t i = 0; i < threads; ++i) mprotect(s.stacks + i * kStackBytes, page, PROT_NONE);  // overflow guard
}

inline std::string where() {
  const State& s = state();
  return " (block " + std::to_string(s.block_idx.x) + "," + std::to_string(s.block_idx.y) + "," +
         std::to_string(s.block_idx.z) + ")";
}

INSLOC_EMU_INTERNAL inline void run_block(size_t shared_bytes, const Schedule& sc, uint64_t block_number) {
  State& s = state();
  const int n = int(s.block_dim.x * s.block_dim.y * s.block_dim.z);
  s.fibers.resize(size_t(n));
  for (int i = 0; i < n; ++i) {
    Fiber& f = s.fibers[size_t(i)];
    f.linear = i;
    f.thread_idx = {unsigned(i) % s.block_dim.x, (unsigned(i) / s.block_dim.x) % s.block_dim.y,
                    unsigned(i) / (s.block_dim.x * s.block_dim.y)};
    f.state = FiberState::kRunnable;
    f.quiet = 0;
    f.collective = nullptr;
    getcontext(&f.context);
    f.context.uc_stack.ss_sp = s.stacks + size_t(i) * kStackBytes;
    f.context.uc_stack.ss_size = kStackBytes;
    f.context.uc_link = &s.scheduler;
    makecontext(&f.context, fiber_main, 0);
  }
  // A new buffer of exactly this launch's size (assign would keep a larger one from an earlier launch, and
  // AddressSanitizer would miss an access past this launch's end).
  s.dynamic_shared = std::vector<unsigned char, SharedAllocator<unsigned char>>(std::max<size_t>(shared_bytes, 1), 0xff);
  s.block_linear = int64_t(block_number);
  s.phase = 0;
  s.shared_words.clear();
  s.exchange.assign(size_t(n), 0);
  s.exchange_record.assign(size_t(n), nullptr);
  std::vector<int> order(size_t(n), 0);
  std::iota(order.begin(), order.end(), 0);
  std::mt19937_64 rng(sc.seed * 0x9e3779b97f4a7c15ULL + block_number);
  bool reverse = sc.kind == Schedule::kReverse;
  for (;;) {
    if (sc.kind == Schedule::kRandom) std::shuffle(order.begin(), order.end(), rng);
    for (int k = 0; k < n; ++k) {
      Fiber& f = s.fibers[size_t(order[size_t(reverse ? n - 1 - k : k)])];
      if (f.state != FiberState::kRunnable) continue;
      s.current = &f;
      recording = {true, f.quiet};
      swapcontext(&s.scheduler, &f.context);
      f.quiet = recording.quiet;
      recording = {false, 0};
      s.current = nullptr;
      if (!s.error.empty()) throw std::runtime_error("cuda_emu: " + s.error + where());
    }
    if (sc.kind == Schedule::kAlternate) reverse = !reverse;
    // After a round every thread is done or waiting: a warp whose lanes all wait at one warp-collective
    // operation goes on; a warp with some lanes at one and the others done or at __syncthreads never could.
    bool released = false;
    for (int w = 0; w * kWarpSize < n; ++w) {
      const int lo = w * kWarpSize, hi = std::min(n, lo + kWarpSize);
      int waiting = 0;
      const Fiber* first = nullptr;
      for (int i = lo; i < hi; ++i) {
        const Fiber& f = s.fibers[size_t(i)];
        if (f.state != FiberState::kAtWarpSync) continue;
        ++waiting;
        if (first == nullptr) first = &f;
        if (std::strcmp(f.collective, first->collective) != 0)
          throw std::runtime_error("cuda_emu: lanes " + std::to_string(first->linear - lo) + " and " +
                                   std::to_string(i - lo) + " of warp " + std::to_string(w) +
                                   " wait at different warp-collective operations (" + first->collective +
                                   ", " + f.collective + ")" + where());
      }
      if (waiting == hi - lo) {
        for (int i = lo; i < hi; ++i) s.fibers[size_t(i)].state = FiberState::kRunnable;
        released = true;
      } else if (waiting > 0) {
        throw std::runtime_error("cuda_emu: " + std::string(first->collective) + " reached by " +
                                 std::to_string(waiting) + " of the " + std::to_string(hi - lo) + " lanes of warp " +
                                 std::to_string(w) + where());
      }
    }
    if (released) continue;
    int done = 0, at_barrier = 0;
    for (const Fiber& f : s.fibers) {
      done += f.state == FiberState::kDone;
      at_barrier += f.state == FiberState::kAtBarrier;
    }
    if (done == n) return;
    if (at_barrier != n)
      throw std::runtime_error("cuda_emu: __syncthreads reached by " + std::to_string(at_barrier) + " of " +
                               std::to_string(n) + " threads (the others exited)" + where());
    for (Fiber& f : s.fibers) f.state = FiberState::kRunnable;
    ++s.phase;  // accesses on either side of a __syncthreads are ordered
  }
}

inline void check_launch(const dim3& grid, const dim3& block, size_t shared_bytes, const void* kernel) {
  const State& s = state();
  const uint64_t threads = uint64_t(block.x) * block.y * block.z;
  auto bad = [](const std::string& what) { throw std::runtime_error("cuda_emu: invalid launch: " + what); };
  if (threads == 0 || grid.x == 0 || grid.y == 0 || grid.z == 0) bad("a zero grid or block dimension");
  if (threads > 1024 || block.z > 64) bad("more than 1024 threads per block, or block.z > 64");
  if (grid.x > 0x7fffffffu || grid.y > 65535 || grid.z > 65535) bad("grid dimensions over (2^31-1, 65535, 65535)");
  if (shared_bytes > kDefaultSharedLimit) {
    auto it = s.shared_allowed.find(kernel);
    if (it == s.shared_allowed.end() || it->second < shared_bytes)
      bad(std::to_string(shared_bytes) + " bytes of dynamic shared memory without cudaFuncSetAttribute");
  }
}

INSLOC_EMU_INTERNAL inline void run_grid(const dim3& grid, const dim3& block, size_t shared_bytes, const void* kernel,
                     const std::function<void()>& body) {
  State& s = state();
  std::lock_guard<std::mutex> lock(s.mutex);
  check_launch(grid, block, shared_bytes, kernel);
  s.error.clear();
  s.global_words.clear();
  s.block_dim = {block.x, block.y, block.z};
  s.grid_dim = {grid.x, grid.y, grid.z};
  s.body = &body;
  ensure_stacks(size_t(block.x) * block.y * block.z);
  const Schedule sc = schedule();
  const uint64_t blocks = uint64_t(grid.x) * grid.y * grid.z;
  std::vector<uint64_t> block_order;
  if (sc.kind == Schedule::kRandom) {
    block_order.resize(blocks);
    std::iota(block_order.begin(), block_order.end(), uint64_t(0));
    std::mt19937_64 rng(sc.seed);
    std::shuffle(block_order.begin(), block_order.end(), rng);
  }
  for (uint64_t i = 0; i < blocks; ++i) {
    const uint64_t b = block_order.empty() ? i : block_order[i];
    s.block_idx = {unsigned(b % grid.x), unsigned(b / grid.x % grid.y), unsigned(b / (uint64_t(grid.x) * grid.y))};
    run_block(shared_bytes, sc, b);
  }
  s.body = nullptr;
}

// kernel<<<grid, block, shared_bytes, stream>>>(args...) is launch(grid, block, shared_bytes, kernel)(args...):
// the arguments are converted to the kernel's parameter types once, as a launch copies them.
template <typename... P>
struct Launch {
  dim3 grid, block;
  size_t shared_bytes;
  void (*kernel)(P...);

  template <typename... A>
  void operator()(A&&... args) const {
    static_assert(sizeof...(A) == sizeof...(P), "cuda_emu: wrong number of kernel arguments");
    const std::tuple<std::decay_t<P>...> params(std::forward<A>(args)...);
    auto* k = kernel;
    const std::function<void()> body = [&params, k] { std::apply(k, params); };
    run_grid(grid, block, shared_bytes, reinterpret_cast<const void*>(kernel), body);
  }
};

template <typename... P>
Launch<P...> launch(dim3 grid, dim3 block, size_t shared_bytes, void (*kernel)(P...)) {
  return {grid, block, shared_bytes, kernel};
}

struct DeviceGuard {
  template <typename D>
  explicit DeviceGuard(const D&) {}
};

// A 16-byte vector access (uint4 / float4) faults on a GPU unless its address is a multiple of 16.
INSLOC_EMU_INTERNAL inline void check_vector_aligned(const void* p, const char* what) {
  ++state().vector_accesses;
  if (reinterpret_cast<uintptr_t>(p) % 16 == 0) return;
  char buf[32];
  std::snprintf(buf, sizeof buf, "%p", p);
  fail(std::string(what) + ": the address " + buf + " is not 16-byte aligned");
}

}  // namespace insloc_emu

#define threadIdx (::insloc_emu::thread_idx())
#define blockIdx (static_cast<const uint3&>(::insloc_emu::state().block_idx))
#define blockDim (static_cast<const uint3&>(::insloc_emu::state().block_dim))
#define gridDim (static_cast<const uint3&>(::insloc_emu::state().grid_dim))

INSLOC_EMU_INTERNAL inline void __syncthreads() { insloc_emu::yield(insloc_emu::FiberState::kAtBarrier); }

template <typename T>
INSLOC_EMU_INTERNAL T __shfl_down_sync(unsigned mask, T value, unsigned delta, int width = insloc_emu::kWarpSize) {
  insloc_emu::Quiet quiet;
  static_assert(std::is_trivially_copyable<T>::value && sizeof(T) <= 8, "cuda_emu: shuffle of an unsupported type");
  insloc_emu::State& s = insloc_emu::state();
  if (mask != 0xffffffffu || width != insloc_emu::kWarpSize)
    insloc_emu::fail("__shfl_down_sync: only full-warp shuffles are emulated");
  const int i = s.current->linear;
  uint64_t bits = 0;
  std::memcpy(&bits, &value, sizeof(T));
  s.exchange[size_t(i)] = bits;
  insloc_emu::warp_sync("a warp shuffle");  // every lane has published its value
  T out = value;
  const int src = i + int(delta);
  if (i % insloc_emu::kWarpSize + int(delta) < insloc_emu::kWarpSize && src < int(s.exchange.size()))
    std::memcpy(&out, &s.exchange[size_t(src)], sizeof(T));
  insloc_emu::warp_sync("a warp shuffle");  // every lane has read before the next shuffle writes
  return out;
}

// Sequential: the fibers of a launch never run at the same time. Not recorded by the race build.
template <typename T>
INSLOC_EMU_INTERNAL T atomicAdd(T* address, T value) {
  insloc_emu::Quiet quiet;
  const T old = *address;
  *address = old + value;
  return old;
}

template <typename T>
INSLOC_EMU_INTERNAL T atomicMax(T* address, T value) {
  insloc_emu::Quiet quiet;
  const T old = *address;
  *address = old < value ? value : old;
  return old;
}

template <typename T>
T __ldg(const T* address) {
  return *address;
}

// CUDA's integer min/max (its floating-point ones have fminf semantics and are not needed here).
template <typename T, typename = std::enable_if_t<std::is_integral<T>::value>>
T min(T a, T b) {
  return b < a ? b : a;
}

template <typename T, typename = std::enable_if_t<std::is_integral<T>::value>>
T max(T a, T b) {
  return a < b ? b : a;
}

// Tensor-core WMMA (nvcuda::wmma), on top of the warp synchronisation above.
#include "emu/wmma.h"
