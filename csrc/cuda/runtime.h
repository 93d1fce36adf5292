// Every place csrc/cuda/*.cu touches the CUDA runtime, in one header: kernel launches, dynamic shared
// memory, device properties, tensor-core WMMA, 16-byte vector accesses, the device guard and stream, and op
// registration. Built by setup.py these are the CUDA runtime and c10::cuda calls. With INSLOC_CUDA_EMU
// defined (tests/cuda_emu.py), the same .cu files compile as host C++ against csrc/emu/cuda_emu.h, so CI runs
// the CUDA kernels' own code on the CPU and registers them as torch.ops.insloc_emu.* for CPU tensors.
#pragma once

#include <ATen/core/Tensor.h>
#include <torch/library.h>

#include <algorithm>
#include <cstddef>
#include <cstdlib>

#ifdef INSLOC_CUDA_EMU

#include "emu/cuda_emu.h"

// INSLOC_LAUNCH(grid, block, shared_bytes, stream, kernel)(args...) is kernel<<<...>>>(args...); the
// kernel comes last so that template arguments may contain commas.
#define INSLOC_LAUNCH(grid, block, shared_bytes, stream, ...) \
  ::insloc_emu::launch(grid, block, shared_bytes, __VA_ARGS__)
#define INSLOC_DYNAMIC_SHARED(name) unsigned char* name = ::insloc_emu::dynamic_shared()
#define INSLOC_LAUNCH_CHECK() ((void)0)
#define INSLOC_CUDA_LIBRARY_IMPL(m) TORCH_LIBRARY_IMPL(insloc_emu, CPU, m)
// Records a host-side choice (which kernel runs) for the tests; nothing in the CUDA build.
#define INSLOC_EMU_NOTE(label) ::insloc_emu::note(label)
#define INSLOC_EMU_VALUE(label, v) ::insloc_emu::value(label, int64_t(v))

namespace insloc::gpu {
using DeviceGuard = ::insloc_emu::DeviceGuard;
inline int current_stream() { return 0; }
inline bool on_device(const at::Tensor& t) { return t.is_cpu(); }
inline int sm_count(int /*device*/) { return ::insloc_emu::sm_count(); }
inline size_t max_shared_per_block_optin(int /*device*/) { return size_t(::insloc_emu::max_shared_per_block_optin()); }
// INSLOC_EMU_CC_MAJOR (read at every call, default 9: the emulator has WMMA) lets tests ask for an older GPU.
inline int compute_capability_major(int /*device*/) {
  const char* v = std::getenv("INSLOC_EMU_CC_MAJOR");
  return v != nullptr && std::atoi(v) > 0 ? std::atoi(v) : 9;
}
template <typename Kernel>
void allow_dynamic_shared(Kernel kernel, size_t bytes) {
  ::insloc_emu::allow_dynamic_shared(reinterpret_cast<const void*>(kernel), bytes);
}
// The virtual architecture the kernel's code on this device was compiled from (here: the emulated GPU's).
template <typename Kernel>
int kernel_arch(Kernel /*kernel*/) {
  return compute_capability_major(0) * 10;
}
// Blocks of the kernel an SM holds at once: here by threads (2048 an SM) and shared memory (228 KiB) alone.
template <typename Kernel>
int resident_blocks(Kernel /*kernel*/, int threads, size_t shared_bytes) {
  const size_t by_shared = shared_bytes > 0 ? (228 * 1024) / (shared_bytes + 1024) : 2048;
  return std::max(1, int(std::min<size_t>(size_t(2048 / threads), by_shared)));
}
// load16 / store16 (see the CUDA versions below): element by element, so that the checked builds see each
// access, after the alignment check a GPU would fault on.
template <typename T>
inline void load16(T* out, const T* p) {
  ::insloc_emu::check_vector_aligned(p, "a 16-byte load");
  for (size_t i = 0; i < 16 / sizeof(T); ++i) out[i] = p[i];
}
inline void store16(float* p, const float* v) {
  ::insloc_emu::check_vector_aligned(p, "a 16-byte store");
  for (int i = 0; i < 4; ++i) p[i] = v[i];
}
}  // namespace insloc::gpu

#else

#include <c10/cuda/CUDAException.h>
#include <c10/cuda/CUDAGuard.h>
#include <c10/cuda/CUDAStream.h>
#include <mma.h>  // WMMA (tensor cores); the emulator has its own (csrc/emu/wmma.h)

#include <map>
#include <mutex>
#include <tuple>
#include <utility>

#define INSLOC_LAUNCH(grid, block, shared_bytes, stream, ...) __VA_ARGS__<<<grid, block, shared_bytes, stream>>>
#define INSLOC_DYNAMIC_SHARED(name) extern __shared__ __align__(128) unsigned char name[]
#define INSLOC_LAUNCH_CHECK() C10_CUDA_KERNEL_LAUNCH_CHECK()
#define INSLOC_CUDA_LIBRARY_IMPL(m) TORCH_LIBRARY_IMPL(insloc_ops, CUDA, m)
#define INSLOC_EMU_NOTE(label) ((void)0)
#define INSLOC_EMU_VALUE(label, v) ((void)0)

namespace insloc::gpu {
using DeviceGuard = c10::cuda::CUDAGuard;
inline cudaStream_t current_stream() { return c10::cuda::getCurrentCUDAStream(); }
inline bool on_device(const at::Tensor& t) { return t.is_cuda(); }
inline int device_attribute(cudaDeviceAttr attr, int device) {
  int value = 0;
  C10_CUDA_CHECK(cudaDeviceGetAttribute(&value, attr, device));
  return value;
}
inline int sm_count(int device) { return device_attribute(cudaDevAttrMultiProcessorCount, device); }
inline int compute_capability_major(int device) {
  return device_attribute(cudaDevAttrComputeCapabilityMajor, device);
}
inline size_t max_shared_per_block_optin(int device) {
  return size_t(device_attribute(cudaDevAttrMaxSharedMemoryPerBlockOptin, device));
}
// Needed before a launch with more than 48 KiB of dynamic shared memory. The attribute is a per-device upper
// bound, so it is set only when a launch needs more than the largest bound set so far for (kernel, device):
// cached, as the call costs host time on every launch otherwise.
template <typename Kernel>
void allow_dynamic_shared(Kernel kernel, size_t bytes) {
  int device = 0;
  C10_CUDA_CHECK(cudaGetDevice(&device));
  static std::mutex mutex;
  static std::map<std::pair<const void*, int>, size_t> allowed;
  const auto key = std::make_pair(reinterpret_cast<const void*>(kernel), device);
  const std::lock_guard<std::mutex> lock(mutex);
  const auto found = allowed.find(key);
  if (found != allowed.end() && found->second >= bytes) return;
  C10_CUDA_CHECK(cudaFuncSetAttribute(kernel, cudaFuncAttributeMaxDynamicSharedMemorySize, int(bytes)));
  allowed[key] = bytes;
}
// Blocks of the kernel an SM of the current device holds at once (registers, shared memory, threads), at
// least 1. A kernel over 48 KiB of dynamic shared memory needs allow_dynamic_shared first (else the driver
// answers 0). Cached per (kernel, threads, bytes, device): the answer never changes, the query costs a few us
// of host time per launch.
template <typename Kernel>
int resident_blocks(Kernel kernel, int threads, size_t shared_bytes) {
  int device = 0;
  C10_CUDA_CHECK(cudaGetDevice(&device));
  static std::mutex mutex;
  static std::map<std::tuple<const void*, int, size_t, int>, int> cache;
  const auto key = std::make_tuple(reinterpret_cast<const void*>(kernel), threads, shared_bytes, device);
  {
    const std::lock_guard<std::mutex> lock(mutex);
    const auto found = cache.find(key);
    if (found != cache.end()) return found->second;
  }
  int n = 0;
  C10_CUDA_CHECK(cudaOccupancyMaxActiveBlocksPerMultiprocessor(&n, kernel, threads, shared_bytes));
  n = n > 0 ? n : 1;
  const std::lock_guard<std::mutex> lock(mutex);
  cache.emplace(key, n);
  return n;
}
// The virtual architecture (e.g. 90 for compute_90) the code the current device runs for this kernel was
// compiled from: below the GPU's own when the build has only older PTX for it, JIT-compiled by the driver.
// Cached per (kernel, device).
template <typename Kernel>
int kernel_arch(Kernel kernel) {
  int device = 0;
  C10_CUDA_CHECK(cudaGetDevice(&device));
  static std::mutex mutex;
  static std::map<std::pair<const void*, int>, int> cache;
  const auto key = std::make_pair(reinterpret_cast<const void*>(kernel), device);
  {
    const std::lock_guard<std::mutex> lock(mutex);
    const auto found = cache.find(key);
    if (found != cache.end()) return found->second;
  }
  cudaFuncAttributes attributes{};
  C10_CUDA_CHECK(cudaFuncGetAttributes(&attributes, kernel));
  const std::lock_guard<std::mutex> lock(mutex);
  cache.emplace(key, attributes.ptxVersion);
  return attributes.ptxVersion;
}
// out[0 .. 16 / sizeof(T)) = p[0 .. 16 / sizeof(T)) as one 16-byte load through the read-only path; p must be
// 16-byte aligned (a GPU faults otherwise), out 16-byte aligned registers.
template <typename T>
__device__ __forceinline__ void load16(T* out, const T* p) {
  const uint4 v = __ldg(reinterpret_cast<const uint4*>(p));
  memcpy(out, &v, 16);
}
// p[0 .. 4) = v[0 .. 4) as one 16-byte store; p must be 16-byte aligned.
__device__ __forceinline__ void store16(float* p, const float* v) {
  *reinterpret_cast<float4*>(p) = make_float4(v[0], v[1], v[2], v[3]);
}
}  // namespace insloc::gpu

#endif
