// Kernels with deliberate bugs, so the tests can show that the CUDA emulator catches each class of bug it
// claims to (see csrc/emu/cuda_emu.h): torch.ops.insloc_emu.selftest(case) runs one;
// torch.ops.insloc_emu.selftest_wmma(case, a, b, c) runs one of the WMMA kernels (csrc/emu/wmma.h).
#define INSLOC_CUDA_EMU
#include <ATen/ops/arange.h>
#include <ATen/ops/empty.h>
#include <ATen/ops/empty_like.h>
#include <ATen/ops/zeros.h>

#include <string>
#include <type_traits>
#include <utility>

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

// 16-byte vector copy, 4 floats a thread, the load and the store `load_offset` / `store_offset` floats past
// 16-byte aligned addresses: a GPU faults on any offset not a multiple of 4.
__global__ void vector_copy_kernel(const float* in, float* out, int load_offset, int store_offset) {
  alignas(16) float v[4];
  insloc::gpu::load16(v, in + load_offset + 4 * threadIdx.x);
  insloc::gpu::store16(out + store_offset + 4 * threadIdx.x, v);
}

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
  } else if (name == "vector_copy") {
    INSLOC_LAUNCH(1, 64, 0, 0, vector_copy_kernel)(i, o, 0, 0);
  } else if (name == "misaligned_vector_load") {
    INSLOC_LAUNCH(1, 64, 0, 0, vector_copy_kernel)(i, o, 1, 0);
  } else if (name == "misaligned_vector_store") {
    INSLOC_LAUNCH(1, 64, 0, 0, vector_copy_kernel)(i, o, 0, 2);
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

// ---- WMMA ----

namespace wmma = nvcuda::wmma;
constexpr int kGemmM = 32, kGemmN = 32, kGemmK = 24;
constexpr int kPad = 4;  // floats of row padding: leading dimensions 28 and 36, multiples of 16 bytes as WMMA needs

template <typename Layout>
constexpr bool kRowMajor = std::is_same<Layout, wmma::row_major>::value;

// Element (r, c) of a rows x cols matrix staged with padded leading dimension in the given layout.
template <typename Layout>
__device__ int staged(int r, int c, int rows, int cols) {
  return kRowMajor<Layout> ? r * (cols + kPad) + c : c * (rows + kPad) + r;
}

// out = c + a b with a [32, 24], b [24, 32] and c [32, 32] row-major, out [32, 32] column-major; a and b are
// staged in shared memory with padded rows in the fragments' layouts and rounded to TF32 in the fragments.
// Warp w computes the 16 x 16 tile (w / 2, w % 2). `synced` false drops the barrier between the staging and
// the fragment loads: the warp-collective loads happen to wait until every thread has staged its part, so
// only the race build sees it.
template <typename LayoutA, typename LayoutB>
__global__ void wmma_gemm_kernel(const float* a, const float* b, const float* c, float* out, bool synced) {
  INSLOC_DYNAMIC_SHARED(raw);
  float* a_s = reinterpret_cast<float*>(raw);
  float* b_s = a_s + (kGemmM + kPad) * (kGemmK + kPad);
  for (int i = threadIdx.x; i < kGemmM * kGemmK; i += blockDim.x)
    a_s[staged<LayoutA>(i / kGemmK, i % kGemmK, kGemmM, kGemmK)] = a[i];
  for (int i = threadIdx.x; i < kGemmK * kGemmN; i += blockDim.x)
    b_s[staged<LayoutB>(i / kGemmN, i % kGemmN, kGemmK, kGemmN)] = b[i];
  if (synced) __syncthreads();
  const int m0 = threadIdx.x / 32 / 2 * 16, n0 = threadIdx.x / 32 % 2 * 16;
  const unsigned lda = kRowMajor<LayoutA> ? kGemmK + kPad : kGemmM + kPad;
  const unsigned ldb = kRowMajor<LayoutB> ? kGemmN + kPad : kGemmK + kPad;
  wmma::fragment<wmma::accumulator, 16, 16, 8, float> acc;
  wmma::load_matrix_sync(acc, c + m0 * kGemmN + n0, kGemmN, wmma::mem_row_major);
  for (int k0 = 0; k0 < kGemmK; k0 += 8) {
    wmma::fragment<wmma::matrix_a, 16, 16, 8, wmma::precision::tf32, LayoutA> fa;
    wmma::fragment<wmma::matrix_b, 16, 16, 8, wmma::precision::tf32, LayoutB> fb;
    wmma::load_matrix_sync(fa, a_s + staged<LayoutA>(m0, k0, kGemmM, kGemmK), lda);
    wmma::load_matrix_sync(fb, b_s + staged<LayoutB>(k0, n0, kGemmK, kGemmN), ldb);
    for (int i = 0; i < fa.num_elements; ++i) fa.x[i] = wmma::__float_to_tf32(fa.x[i]);
    for (int i = 0; i < fb.num_elements; ++i) fb.x[i] = wmma::__float_to_tf32(fb.x[i]);
    wmma::mma_sync(acc, fa, fb, acc);
  }
  wmma::store_matrix_sync(out + n0 * kGemmM + m0, acc, kGemmM, wmma::mem_col_major);
}

__global__ void to_tf32_kernel(const float* in, float* out, int64_t n) {
  for (int64_t i = threadIdx.x; i < n; i += blockDim.x) out[i] = wmma::__float_to_tf32(in[i]);
}

enum WmmaBug { kNone, kMisaligned, kLdm, kLanePointers, kSkippingLanes, kNotTf32, kFragmentTypes, kShuffleAndWmma,
               kOverlap, kOverlapSynced };

// One misuse of WMMA per case (kNone: none), by warps that load the 16 x 16 tile at `in` (32-byte aligned,
// ldm 16) and store it to warp w's columns [16 w, 16 w + 16) of `out` [16, 32]. kOverlap is no error a launch
// sees: two warps store overlapping tiles in one barrier interval, a race for the race build; kOverlapSynced
// puts a __syncthreads between them.
__global__ void wmma_misuse_kernel(const float* in, float* out, int bug) {
  const int lane = threadIdx.x % 32, warp = threadIdx.x / 32;
  wmma::fragment<wmma::accumulator, 16, 16, 8, float> acc;
  wmma::fragment<wmma::matrix_a, 16, 16, 8, wmma::precision::tf32, wmma::row_major> fa;
  wmma::fragment<wmma::matrix_b, 16, 16, 8, wmma::precision::tf32, wmma::col_major> fb;
  wmma::fill_fragment(acc, 0.f);
  switch (bug) {
    case kMisaligned:
      wmma::load_matrix_sync(acc, in + 4, 16, wmma::mem_row_major);  // 16-byte aligned only
      break;
    case kLdm:
      wmma::load_matrix_sync(fa, in, 10);
      break;
    case kLanePointers:
      wmma::load_matrix_sync(acc, in + (lane < 16 ? 0 : 8), 16, wmma::mem_row_major);
      break;
    case kSkippingLanes:
      if (lane >= 16) return;
      wmma::load_matrix_sync(acc, in, 16, wmma::mem_row_major);
      break;
    case kNotTf32:
      wmma::load_matrix_sync(fa, in, 16);
      wmma::load_matrix_sync(fb, in, 16);
      wmma::mma_sync(acc, fa, fb, acc);  // the elements were never rounded with __float_to_tf32
      break;
    case kFragmentTypes:
      if (lane < 16) wmma::load_matrix_sync(fa, in, 16); else wmma::load_matrix_sync(fb, in, 16);
      break;
    case kShuffleAndWmma:
      if (lane < 16) acc.x[0] = __shfl_down_sync(0xffffffffu, acc.x[0], 1);
      else wmma::load_matrix_sync(acc, in, 16, wmma::mem_row_major);
      break;
    case kOverlap:
    case kOverlapSynced:
      wmma::load_matrix_sync(acc, in, 16, wmma::mem_row_major);
      if (warp == 0) wmma::store_matrix_sync(out, acc, 32, wmma::mem_row_major);  // columns 0..15
      if (bug == kOverlapSynced) __syncthreads();
      if (warp == 1) wmma::store_matrix_sync(out + 8, acc, 32, wmma::mem_row_major);  // columns 8..23
      return;
    default:
      wmma::load_matrix_sync(acc, in, 16, wmma::mem_row_major);
  }
  wmma::store_matrix_sync(out + warp * 16, acc, 32, wmma::mem_row_major);
}

at::Tensor selftest_wmma(const std::string& name, const at::Tensor& a, const at::Tensor& b, const at::Tensor& c) {
  for (const at::Tensor& t : {a, b, c})
    TORCH_CHECK(t.scalar_type() == at::kFloat && t.is_cpu() && t.is_contiguous(),
                "selftest_wmma: inputs must be contiguous float32 CPU tensors");
  auto shaped = [](const at::Tensor& t, int64_t rows, int64_t cols) {
    return t.dim() == 2 && t.size(0) == rows && t.size(1) == cols;
  };
  auto gemm = [&](auto kernel, bool synced = true) {
    TORCH_CHECK(shaped(a, kGemmM, kGemmK) && shaped(b, kGemmK, kGemmN) && shaped(c, kGemmM, kGemmN),
                "selftest_wmma: a [32, 24], b [24, 32] and c [32, 32]");
    auto out = at::empty({kGemmN, kGemmM}, a.options());  // column-major [32, 32]
    const size_t shared = 2 * (kGemmM + kPad) * (kGemmK + kPad) * sizeof(float);  // enough for either layout
    INSLOC_LAUNCH(1, 128, shared, 0, kernel)(a.data_ptr<float>(), b.data_ptr<float>(), c.data_ptr<float>(),
                                             out.data_ptr<float>(), synced);
    return out.t();
  };
  if (name == "gemm") return gemm(wmma_gemm_kernel<wmma::row_major, wmma::col_major>);
  if (name == "gemm_b_row_major") return gemm(wmma_gemm_kernel<wmma::row_major, wmma::row_major>);
  if (name == "gemm_a_col_major") return gemm(wmma_gemm_kernel<wmma::col_major, wmma::row_major>);
  if (name == "gemm_unsynced") return gemm(wmma_gemm_kernel<wmma::row_major, wmma::col_major>, false);
  if (name == "to_tf32") {
    auto out = at::empty_like(a);
    INSLOC_LAUNCH(1, 32, 0, 0, to_tf32_kernel)(a.data_ptr<float>(), out.data_ptr<float>(), a.numel());
    return out;
  }
  static const std::pair<const char*, WmmaBug> cases[] = {
      {"copy", kNone},                     {"partial_warp", kNone},
      {"misaligned", kMisaligned},         {"ldm", kLdm},
      {"lane_pointers", kLanePointers},    {"skipping_lanes", kSkippingLanes},
      {"not_tf32", kNotTf32},              {"fragment_types", kFragmentTypes},
      {"shuffle_and_wmma", kShuffleAndWmma}, {"overlap", kOverlap},
      {"overlap_synced", kOverlapSynced}};
  for (const auto& [case_name, bug] : cases) {
    if (name != case_name) continue;
    TORCH_CHECK(a.numel() >= 16 * 16, "selftest_wmma: the WMMA misuse kernels load a 16 x 16 tile from a");
    auto out = at::zeros({16, 32}, a.options());
    // partial_warp: a 48-thread block, whose second warp has 16 lanes.
    INSLOC_LAUNCH(1, name == "partial_warp" ? 48 : 64, 0, 0, wmma_misuse_kernel)(a.data_ptr<float>(),
                                                                                out.data_ptr<float>(), int(bug));
    return out;
  }
  TORCH_CHECK(false, "selftest_wmma: unknown case ", name);
}

}  // namespace

// How many 16-byte vector loads and stores kernels have made since the library was loaded.
int64_t vector_accesses() { return int64_t(insloc_emu::state().vector_accesses); }

// How many times host code has noted `label` (INSLOC_EMU_NOTE) since the library was loaded.
int64_t notes(const std::string& label) {
  const auto& n = insloc_emu::state().notes;
  const auto it = n.find(label);
  return it == n.end() ? 0 : it->second;
}

// The last value host code recorded under `label` (INSLOC_EMU_VALUE), or -1 if none.
int64_t value(const std::string& label) {
  const auto& v = insloc_emu::state().values;
  const auto it = v.find(label);
  return it == v.end() ? -1 : it->second;
}

TORCH_LIBRARY_FRAGMENT(insloc_emu, m) {
  m.def("selftest(str name) -> Tensor", &selftest);
  m.def("vector_accesses() -> int", &vector_accesses);
  m.def("notes(str label) -> int", &notes);
  m.def("value(str label) -> int", &value);
  m.def("selftest_wmma(str name, Tensor a, Tensor b, Tensor c) -> Tensor", &selftest_wmma);
}
