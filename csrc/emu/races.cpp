// The race build's memory-access hooks (see csrc/emu/cuda_emu.h). Code compiled with -fsanitize=thread
// calls __tsan_readN / __tsan_writeN before every load and store; instead of ThreadSanitizer's runtime,
// these record which kernel thread touched which 4-byte word (which byte, for 1- and 2-byte accesses) in
// which barrier interval, and report two unordered accesses to one, at least one a write, as a race. Empty unless INSLOC_EMU_RACES.
#ifdef INSLOC_EMU_RACES

#define INSLOC_CUDA_EMU
#include <link.h>

#include <cstdio>

#include "emu/cuda_emu.h"

namespace insloc_emu {
namespace {

constexpr uintptr_t kWordKey = uintptr_t(1) << (sizeof(uintptr_t) * 8 - 1);

struct Search {
  uintptr_t probe;
  std::vector<std::pair<uintptr_t, uintptr_t>>* ranges;
};

INSLOC_EMU_INTERNAL int find_object(dl_phdr_info* info, size_t, void* data) {
  auto* search = static_cast<Search*>(data);
  bool mine = false;
  for (int i = 0; i < info->dlpi_phnum; ++i) {
    const ElfW(Phdr)& ph = info->dlpi_phdr[i];
    const uintptr_t lo = info->dlpi_addr + ph.p_vaddr;
    if (ph.p_type == PT_LOAD && search->probe >= lo && search->probe < lo + ph.p_memsz) mine = true;
  }
  if (!mine) return 0;
  for (int i = 0; i < info->dlpi_phnum; ++i) {
    const ElfW(Phdr)& ph = info->dlpi_phdr[i];
    const uintptr_t lo = info->dlpi_addr + ph.p_vaddr;
    if (ph.p_type == PT_LOAD && (ph.p_flags & PF_W)) search->ranges->push_back({lo, lo + ph.p_memsz});
  }
  return 1;
}

// Function statics of this library are the kernels' static __shared__ variables: per block.
INSLOC_EMU_INTERNAL bool is_static(State& s, uintptr_t a) {
  if (s.static_ranges.empty()) {
    Search search{reinterpret_cast<uintptr_t>(&s), &s.static_ranges};
    dl_iterate_phdr(find_object, &search);
    if (s.static_ranges.empty()) s.static_ranges.push_back({0, 0});
  }
  for (const auto& r : s.static_ranges)
    if (a >= r.first && a < r.second) return true;
  return false;
}

INSLOC_EMU_INTERNAL bool unordered(const Access& other, const Access& me) {
  return other.thread >= 0 && (other.block != me.block || (other.phase == me.phase && other.thread != me.thread));
}

INSLOC_EMU_INTERNAL void report(uintptr_t word, bool shared, const Access& me, bool write, const Access& other,
                                bool other_wrote) {
  char buf[320];
  const bool is_word = (word & kWordKey) != 0;
  const uintptr_t address = is_word ? (word & ~kWordKey) << 2 : word;
  std::snprintf(buf, sizeof buf,
                "race on %s %s %#lx: thread %d of block %ld %s it, and thread %d of block %ld %s it, in %s "
                "(barrier interval %ld), with no __syncthreads or atomic between",
                shared ? "shared" : "global", is_word ? "word" : "byte", static_cast<unsigned long>(address), me.thread,
                static_cast<long>(me.block), write ? "writes" : "reads", other.thread, static_cast<long>(other.block),
                other_wrote ? "wrote" : "read",
                other.block == me.block ? "the same barrier interval" : "another block", static_cast<long>(me.phase));
  fail(buf);
}

INSLOC_EMU_INTERNAL void check(std::unordered_map<uintptr_t, WordRecord>& words, uintptr_t word, bool shared,
                               bool write, const Access& me) {
  WordRecord& r = words[word];
  if (unordered(r.write, me)) report(word, shared, me, write, r.write, true);
  if (write) {
    const bool other_readers = r.readers && r.read.block == me.block && r.read.phase == me.phase;
    if (unordered(r.read, me) || other_readers) report(word, shared, me, write, r.read, false);
    r.write = me;
    r.read = Access{};
    r.readers = false;
  } else if (r.read.thread >= 0 && r.read.block == me.block && r.read.phase == me.phase) {
    r.readers = r.readers || r.read.thread != me.thread;
  } else {
    r.read = me;
    r.readers = false;
  }
}

INSLOC_EMU_INTERNAL void on_access(const void* address, size_t size, bool write) {
  if (!recording.in_kernel || recording.quiet != 0 || size == 0) return;
  State& s = state();
  if (s.current == nullptr) return;
  Quiet quiet;  // the bookkeeping below is not the kernel's
  const uintptr_t a = reinterpret_cast<uintptr_t>(address);
  const uintptr_t stacks = reinterpret_cast<uintptr_t>(s.stacks);
  if (a >= stacks && a < stacks + s.stack_slots * kStackBytes) return;  // a thread's own locals
  const uintptr_t dyn = reinterpret_cast<uintptr_t>(s.dynamic_shared.data());
  const bool shared = (a >= dyn && a < dyn + s.dynamic_shared.size()) || is_static(s, a);
  auto& words = shared ? s.shared_words : s.global_words;
  const Access me{s.block_linear, s.phase, s.current->linear};
  if (size < 4) {  // bytes: two threads may store neighbouring halves or bytes of one word
    for (uintptr_t b = a; b < a + size; ++b) check(words, b, shared, write, me);
  } else {  // 4-byte words (a separate key space: the top bit set)
    for (uintptr_t w = a >> 2; w <= (a + size - 1) >> 2; ++w) check(words, w | kWordKey, shared, write, me);
  }
}

}  // namespace
}  // namespace insloc_emu

using a8 = unsigned char;
using a16 = unsigned short;
using a32 = unsigned int;
using a64 = unsigned long long;

#define INSLOC_HOOK extern "C" INSLOC_EMU_INTERNAL __attribute__((visibility("default")))

INSLOC_HOOK void __tsan_init() {}
INSLOC_HOOK void __tsan_vptr_update(void**, void*) {}
INSLOC_HOOK void __tsan_read1(void* p) { insloc_emu::on_access(p, 1, false); }
INSLOC_HOOK void __tsan_read2(void* p) { insloc_emu::on_access(p, 2, false); }
INSLOC_HOOK void __tsan_read4(void* p) { insloc_emu::on_access(p, 4, false); }
INSLOC_HOOK void __tsan_read8(void* p) { insloc_emu::on_access(p, 8, false); }
INSLOC_HOOK void __tsan_read16(void* p) { insloc_emu::on_access(p, 16, false); }
INSLOC_HOOK void __tsan_write1(void* p) { insloc_emu::on_access(p, 1, true); }
INSLOC_HOOK void __tsan_write2(void* p) { insloc_emu::on_access(p, 2, true); }
INSLOC_HOOK void __tsan_write4(void* p) { insloc_emu::on_access(p, 4, true); }
INSLOC_HOOK void __tsan_write8(void* p) { insloc_emu::on_access(p, 8, true); }
INSLOC_HOOK void __tsan_write16(void* p) { insloc_emu::on_access(p, 16, true); }
INSLOC_HOOK void __tsan_unaligned_read2(void* p) { insloc_emu::on_access(p, 2, false); }
INSLOC_HOOK void __tsan_unaligned_read4(void* p) { insloc_emu::on_access(p, 4, false); }
INSLOC_HOOK void __tsan_unaligned_read8(void* p) { insloc_emu::on_access(p, 8, false); }
INSLOC_HOOK void __tsan_unaligned_read16(void* p) { insloc_emu::on_access(p, 16, false); }
INSLOC_HOOK void __tsan_unaligned_write2(void* p) { insloc_emu::on_access(p, 2, true); }
INSLOC_HOOK void __tsan_unaligned_write4(void* p) { insloc_emu::on_access(p, 4, true); }
INSLOC_HOOK void __tsan_unaligned_write8(void* p) { insloc_emu::on_access(p, 8, true); }
INSLOC_HOOK void __tsan_unaligned_write16(void* p) { insloc_emu::on_access(p, 16, true); }
INSLOC_HOOK void __tsan_read_range(void* p, unsigned long n) { insloc_emu::on_access(p, n, false); }
INSLOC_HOOK void __tsan_write_range(void* p, unsigned long n) { insloc_emu::on_access(p, n, true); }

// Atomics the host code in these translation units uses (reference counts, once-flags): carried out,
// sequentially consistent, and not recorded.
#define INSLOC_ATOMIC_HOOKS(bits, T)                                                                         \
  INSLOC_HOOK T __tsan_atomic##bits##_load(const volatile T* a, int) { return __atomic_load_n(a, __ATOMIC_SEQ_CST); } \
  INSLOC_HOOK void __tsan_atomic##bits##_store(volatile T* a, T v, int) { __atomic_store_n(a, v, __ATOMIC_SEQ_CST); } \
  INSLOC_HOOK T __tsan_atomic##bits##_fetch_add(volatile T* a, T v, int) {                                    \
    return __atomic_fetch_add(a, v, __ATOMIC_SEQ_CST);                                                      \
  }                                                                                                         \
  INSLOC_HOOK T __tsan_atomic##bits##_fetch_sub(volatile T* a, T v, int) {                                    \
    return __atomic_fetch_sub(a, v, __ATOMIC_SEQ_CST);                                                      \
  }                                                                                                         \
  INSLOC_HOOK int __tsan_atomic##bits##_compare_exchange_weak(volatile T* a, T* expected, T v, int, int) {    \
    return __atomic_compare_exchange_n(a, expected, v, true, __ATOMIC_SEQ_CST, __ATOMIC_SEQ_CST);           \
  }                                                                                                         \
  INSLOC_HOOK int __tsan_atomic##bits##_compare_exchange_strong(volatile T* a, T* expected, T v, int, int) {  \
    return __atomic_compare_exchange_n(a, expected, v, false, __ATOMIC_SEQ_CST, __ATOMIC_SEQ_CST);          \
  }

INSLOC_ATOMIC_HOOKS(8, a8)
INSLOC_ATOMIC_HOOKS(16, a16)
INSLOC_ATOMIC_HOOKS(32, a32)
INSLOC_ATOMIC_HOOKS(64, a64)
INSLOC_HOOK void __tsan_atomic_thread_fence(int) { __atomic_thread_fence(__ATOMIC_SEQ_CST); }
INSLOC_HOOK void __tsan_atomic_signal_fence(int) { __atomic_signal_fence(__ATOMIC_SEQ_CST); }

#endif  // INSLOC_EMU_RACES
