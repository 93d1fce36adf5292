// Kernels with deliberate bugs, so the tests can show that the CUDA emulator catches each class of bug it
// claims to (see csrc/emu/cuda_emu.h): torch.ops.insloc_emu.selftest(case) runs one.
#define INSLOC_CUDA_EMU
#include <ATen/ops/arange.h>
#include <ATen/ops/zeros.h>

#include <string>

#include "cuda/runtime.h"

namespace {

constexpr int kThreads = 256;

// Reverses a block's values through shared memory; `synced` false drops the barrier between the writes
// and the reads, which a GPU may or may not get away with and the emulator never does.
__global__ void reverse_kernel(const float* in, float* out, bool synced) {
  __shared__ float s[kThreads];
  s[threadIdx.x] = in[blockIdx.x * kThreads + threadIdx.x];
  if (synced) __syncthreads();
  out[blockIdx.x * kThreads + threadIdx.x] = s[kThreads - 1 - threadIdx.x];
}

// Reuses one shared buffer for two rounds; `synced` false drops the barrier that keeps the second round's
// writes from overtaking the first round's reads (a write-after-read race).
__global__ void two_rounds_kernel(const float* in, float* out, bool synced) {
  __shared__ float s[kThreads];
  float acc = 0;
  for (int round = 0; round < 2; ++round) {
    if (synced) __syncthreads();
    s[threadIdx.x] = in[round * kThreads + threadIdx.x];
    __syncthreads();
    acc += s[(threadIdx.x + 1) % kThreads];
  }
  out[threadIdx.x] = acc;
}

// Every thread writes one shared slot in the same round: the value left depends on who ran last.
__global__ void race_in_round_kernel(float* out) {
  __shared__ float s;
  s = float(threadIdx.x);
  __syncthreads();
  out[threadIdx.x] = s;
}

// Every block writes out[0]: the value left depends on the block order.
__global__ void race_between_blocks_kernel(float* out) {
  if (threadIdx.x == 0) out[0] = float(blockIdx.x);
}

// Every thread adds to out[0]: without an atomic, a GPU loses updates; the emulator's sequential threads
// do not, so only the race build sees it.
__global__ void lost_update_kernel(float* out, bool atomic) {
  if (atomic) {
    atomicAdd(out, 1.0f);
  } else {
    out[0] += 1.0f;
  }
}

__global__ void divergent_barrier_kernel(float* out) {
  if (threadIdx.x < kThreads / 2) __syncthreads();
  out[threadIdx.x] = 1;
}

__global__ void partial_shuffle_kernel(float* out) {
  float v = float(threadIdx.x);
  if (threadIdx.x % 32 < 16) v = __shfl_down_sync(0xffffffffu, v, 1);
  out[threadIdx.x] = v;
}

__global__ void warp_sum_kernel(float* out) {
  float v = float(threadIdx.x);
  for (int offset = 16; offset > 0; offset >>= 1) v += __shfl_down_sync(0xffffffffu, v, offset);
  if (threadIdx.x % 32 == 0) out[threadIdx.x / 32] = v;
}

// Tag 1 is the instance given cudaFuncSetAttribute (an attribute lasts for the process, as on a GPU).
template <int Tag>
__global__ void dynamic_shared_kernel(float* out) {
  INSLOC_DYNAMIC_SHARED(raw);
  out[threadIdx.x] = reinterpret_cast<float*>(raw)[threadIdx.x];  // never written: poison
}

__global__ void noop_kernel(float*) {}

// Reads one element past the end of `in` (n elements): only run under AddressSanitizer, which must stop it.
__global__ void read_past_end_kernel(const float* in, float* out, int n) { out[threadIdx.x] = in[n - 1 + threadIdx.x]; }

at::Tensor selftest(const std::string& name) {
  const auto opts = at::TensorOptions().dtype(at::kFloat);
  auto in = at::arange(2 * kThreads, opts);
  auto out = at::zeros({2 * kThreads}, opts);
  float* o = out.data_ptr<float>();
  const float* i = in.data_ptr<float>();
  if (name == "reverse") {
    INSLOC_LAUNCH(2, kThreads, 0, 0, reverse_kernel)(i, o, true);
  } else if (name == "reverse_unsynced") {
    INSLOC_LAUNCH(2, kThreads, 0, 0, reverse_kernel)(i, o, false);
  } else if (name == "two_rounds") {
    INSLOC_LAUNCH(1, kThreads, 0, 0, two_rounds_kernel)(i, o, true);
  } else if (name == "two_rounds_unsynced") {
    INSLOC_LAUNCH(1, kThreads, 0, 0, two_rounds_kernel)(i, o, false);
  } else if (name == "race_in_round") {
    INSLOC_LAUNCH(1, kThreads, 0, 0, race_in_round_kernel)(o);
  } else if (name == "race_between_blocks") {
    INSLOC_LAUNCH(64, 32, 0, 0, race_between_blocks_kernel)(o);
  } else if (name == "lost_update") {
    INSLOC_LAUNCH(1, kThreads, 0, 0, lost_update_kernel)(o, false);
  } else if (name == "atomic_update") {
    INSLOC_LAUNCH(1, kThreads, 0, 0, lost_update_kernel)(o, true);
  } else if (name == "divergent_barrier") {
    INSLOC_LAUNCH(1, kThreads, 0, 0, divergent_barrier_kernel)(o);
  } else if (name == "partial_shuffle") {
    INSLOC_LAUNCH(1, kThreads, 0, 0, partial_shuffle_kernel)(o);
  } else if (name == "warp_sum") {
    INSLOC_LAUNCH(1, kThreads, 0, 0, warp_sum_kernel)(o);
  } else if (name == "dynamic_shared") {
    INSLOC_LAUNCH(1, kThreads, 1024, 0, dynamic_shared_kernel<0>)(o);
  } else if (name == "shared_over_48k") {
    INSLOC_LAUNCH(1, kThreads, 64 * 1024, 0, dynamic_shared_kernel<0>)(o);
  } else if (name == "shared_over_48k_allowed") {
    insloc::gpu::allow_dynamic_shared(dynamic_shared_kernel<1>, 64 * 1024);
    INSLOC_LAUNCH(1, kThreads, 64 * 1024, 0, dynamic_shared_kernel<1>)(o);
  } else if (name == "grid_y_too_large") {
    INSLOC_LAUNCH(dim3(1, 65536), 32, 0, 0, noop_kernel)(o);
  } else if (name == "block_too_large") {
    INSLOC_LAUNCH(1, 1025, 0, 0, noop_kernel)(o);
  } else if (name == "grid_truncated") {
    INSLOC_LAUNCH(dim3(int64_t(1) << 32), 32, 0, 0, noop_kernel)(o);
  } else if (name == "read_past_end") {
#if defined(__SANITIZE_ADDRESS__)
    INSLOC_LAUNCH(1, 2, 0, 0, read_past_end_kernel)(i, o, 2 * kThreads);
#else
    TORCH_CHECK(false, "selftest: read_past_end runs only in the AddressSanitizer build");
#endif
  } else {
    TORCH_CHECK(false, "selftest: unknown case ", name);
  }
  return out;
}

}  // namespace

TORCH_LIBRARY_FRAGMENT(insloc_emu, m) {
  m.def("selftest(str name) -> Tensor", &selftest);
}
