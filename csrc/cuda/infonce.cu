// Queue InfoNCE in CUDA C++ (the Triton kernel is the main GPU path; this one mirrors the CPU kernel's
// algorithm and shares its math through common/infonce.h).
//
// Forward: grid (K splits, row blocks, G). A block stages its query rows and a tile of queue rows at a time
// in shared memory and keeps an online (max, sum-exp) per row, merged across the row's threads at the end
// -> partial per (g, n, split). A combine kernel merges the splits in order with the positive logit.
// Backward: p is recomputed per tile from the saved lse and p @ tile is added into a shared dq tile. By
// default the backward has the forward's grid and each block adds its dq tile into one [G, N, D] fp32
// buffer with atomics (extra memory G x N x D); under torch.use_deterministic_algorithms it writes one
// partial per split to [splits, G, N, D] (at most kMaxBackwardSplits splits) instead, summed in a fixed
// order by the last kernel. Nothing of size N x K is allocated.
//
// Two versions of the two partials kernels:
// - tensor cores (*_tc_kernel, the default for fp32 accumulation with D % 16 == 0 on sm_80 and newer):
//   both products (q . tile^T and p @ tile) as WMMA m16n16k8 TF32 with fp32 accumulation, each fp32
//   operand split into a TF32 high and low part, three products (hi.hi + hi.lo + lo.hi: about fp32
//   accuracy, the "TF32x3" of the Triton kernel); an operand that came in as fp16/bf16 is exact in TF32
//   and needs no low part. Kernels only apply element-wise operations to fragments, so the (opaque)
//   fragment layout never matters.
// - CUDA cores (fp32/fp64 FMA): everything else, and INSLOC_OPS_CUDA_INFONCE_TC=0.
#include <ATen/Context.h>
#include <ATen/Dispatch.h>
#include <ATen/core/Tensor.h>
#include <ATen/ops/empty.h>
#include <c10/core/DispatchKeySet.h>
#include <c10/core/impl/LocalDispatchKeySet.h>

#include <algorithm>
#include <cmath>
#include <cstdint>
#include <cstdlib>
#include <cstring>
#include <type_traits>
#include <utility>

#include "common/infonce.h"
#include "common/infonce_args.h"
#include "cuda/runtime.h"

namespace insloc {
namespace {

using namespace infonce;

constexpr int kThreads = 256;
constexpr int kRows = 16;                   // query rows per block
constexpr int kLanes = kThreads / kRows;    // threads per row
constexpr int kTile = 32;                   // queue rows per shared-memory tile
constexpr int kCols = kTile / kLanes;       // logits per thread per tile
constexpr int64_t kMaxBackwardSplits = 16;  // deterministic backward: bounds the dq partials at 16 x G x N x D
constexpr int kLoadBatch = 8;               // queue elements a thread loads before it stores any (tile loader)

// Flat indices start, start + stride, ... of a row-major [rows, width] array as (row r, column c), stepped
// without a division (which for a width known only at run time costs a call per element on a GPU). Width 0
// (D = 0) has no elements: r starts past every row.
struct Walk {
  int r, c, dr, dc, width;
  __device__ __forceinline__ Walk(int start, int stride, int w)
      : r(w > 0 ? start / w : 0x7fffffff), c(w > 0 ? start - r * w : 0), dr(w > 0 ? stride / w : 0),
        dc(stride - dr * w), width(w) {}
  __device__ __forceinline__ void next() {
    r += dr;
    c += dc;
    if (c >= width) c -= width, ++r;
  }
};

// Queue rows [k0, k0 + Tile) element by element into tile [Tile, ld] (a block of Threads threads); rows
// past k_end are zero so that 0 * p stays 0. Each thread has kLoadBatch loads in flight before it stores
// them, instead of one load, then its store. The loads take no branch: an element of a row past k_end (or
// past the tile) reads the last valid row instead (k0 < k_end, so there is one) and stores zero (or nothing).
template <int Threads, int Tile, typename acc_t, typename queue_t>
__device__ __forceinline__ void load_tile(acc_t* tile, const queue_t* queue, int64_t k0, int64_t k_end, int D,
                                          int ld) {
  const queue_t* src = queue + k0 * D;
  const int valid = int(min(int64_t(Tile), k_end - k0));
  for (Walk w(threadIdx.x, Threads, D); w.r < Tile;) {
    queue_t v[kLoadBatch];
    const Walk first = w;
#pragma unroll
    for (int u = 0; u < kLoadBatch; ++u, w.next()) v[u] = src[min(w.r, valid - 1) * D + w.c];
    w = first;
#pragma unroll
    for (int u = 0; u < kLoadBatch; ++u, w.next()) {
      if (w.r < Tile) tile[w.r * ld + w.c] = w.r < valid ? static_cast<acc_t>(v[u]) : acc_t(0);
    }
  }
}

// logits of this thread's row against its kCols columns of the tile, already divided by T.
template <typename acc_t>
__device__ void tile_logits(acc_t (&out)[kCols], const acc_t* q_row, const acc_t* tile, int lane, int D,
                            acc_t inv_t) {
#pragma unroll
  for (int c = 0; c < kCols; ++c) out[c] = 0;
  for (int d = 0; d < D; ++d) {
    const acc_t qd = q_row[d];
#pragma unroll
    for (int c = 0; c < kCols; ++c) out[c] += qd * tile[(lane + c * kLanes) * (D + 1) + d];
  }
#pragma unroll
  for (int c = 0; c < kCols; ++c) out[c] *= inv_t;
}

// The block's query rows [r0, r0 + kRows) of group g into q_s [kRows, ld]; rows past N are zero. Threads:
// the block's size.
template <int Threads, typename acc_t>
__device__ void load_rows(acc_t* q_s, const acc_t* qa, int64_t g, int64_t r0, int64_t N, int D, int ld) {
  for (Walk w(threadIdx.x, Threads, D); w.r < kRows; w.next())
    q_s[w.r * ld + w.c] = r0 + w.r < N ? qa[(g * N + r0 + w.r) * D + w.c] : acc_t(0);
}

// Stages queue rows [k0, k0 + kTile) in shared memory, once every thread is done with the previous tile
// (and, for the first, once q_s is loaded), then this thread's logits against them.
template <typename acc_t, typename queue_t>
__device__ __forceinline__ void next_tile_logits(acc_t (&logits)[kCols], acc_t* tile, const acc_t* q_s,
                                                 const queue_t* queue_g, int64_t k0, int64_t k_end, int D,
                                                 int row, int lane, acc_t inv_t) {
  __syncthreads();
  load_tile<kThreads, kTile>(tile, queue_g, k0, k_end, D, D + 1);
  __syncthreads();
  tile_logits(logits, q_s + row * (D + 1), tile, lane, D, inv_t);
}

// What a partials block (split, row block, group) covers, and this thread's row and lane in it.
struct Place {
  int64_t split, r0, g, k_begin, k_end;
  int row, lane;
};

// Lanes: the threads that share a row (kLanes here, kTcLanes in the tensor-core kernels).
template <int Lanes = kLanes>
__device__ __forceinline__ Place place(int64_t K, int64_t per_split) {
  const int64_t split = blockIdx.x, k_begin = split * per_split;
  return {split, int64_t(blockIdx.y) * kRows, int64_t(blockIdx.z), k_begin, min(K, k_begin + per_split),
          int(threadIdx.x / Lanes), int(threadIdx.x % Lanes)};
}

template <typename acc_t, typename queue_t>
__global__ void __launch_bounds__(kThreads)
    forward_partials_kernel(const acc_t* __restrict__ qa, const queue_t* __restrict__ queue, acc_t* part_m,
                            acc_t* part_s, int64_t N, int64_t K, int D, int64_t per_split, int64_t splits,
                            acc_t inv_t) {
  INSLOC_DYNAMIC_SHARED(smem_raw);
  acc_t* q_s = reinterpret_cast<acc_t*>(smem_raw);  // [kRows, D + 1]
  acc_t* tile = q_s + kRows * (D + 1);               // [kTile, D + 1]
  // In the dynamic buffer too: without the opt-in a block may use 48 KiB of static plus dynamic shared
  // memory together, and allow_shared opts in by the dynamic size alone.
  acc_t* red_m = tile + kTile * (D + 1);             // [kThreads]
  acc_t* red_s = red_m + kThreads;                   // [kThreads]
  const auto [split, r0, g, k_begin, k_end, row, lane] = place(K, per_split);
  const queue_t* queue_g = queue + g * K * D;
  load_rows<kThreads>(q_s, qa, g, r0, N, D, D + 1);
  acc_t m = neg_inf<acc_t>(), s = 0;
  for (int64_t k0 = k_begin; k0 < k_end; k0 += kTile) {
    acc_t logits[kCols];
    next_tile_logits(logits, tile, q_s, queue_g, k0, k_end, D, row, lane, inv_t);
#pragma unroll
    for (int c = 0; c < kCols; ++c) {
      if (k0 + lane + c * kLanes < k_end) lse_add(m, s, logits[c]);
    }
  }
  red_m[threadIdx.x] = m;
  red_s[threadIdx.x] = s;
  __syncthreads();
  if (lane == 0 && r0 + row < N) {
    for (int l = 1; l < kLanes; ++l) lse_merge(m, s, red_m[threadIdx.x + l], red_s[threadIdx.x + l]);
    const int64_t out = ((g * N) + r0 + row) * splits + split;
    part_m[out] = m;
    part_s[out] = s;
  }
}

template <typename acc_t>
__global__ void forward_combine_kernel(const acc_t* qa, const acc_t* ka, const acc_t* part_m, const acc_t* part_s,
                                       acc_t* loss, acc_t* lse, int64_t rows, int64_t D, int64_t splits,
                                       acc_t inv_t) {
  const int64_t i = int64_t(blockIdx.x) * blockDim.x + threadIdx.x;
  if (i >= rows) return;
  acc_t dot = 0;
  for (int64_t d = 0; d < D; ++d) dot += qa[i * D + d] * ka[i * D + d];
  const acc_t positive = dot * inv_t;
  acc_t m = positive, s = 1;
  for (int64_t c = 0; c < splits; ++c) lse_merge(m, s, part_m[i * splits + c], part_s[i * splits + c]);
  lse[i] = lse_value(m, s);
  loss[i] = infonce_loss(lse[i], positive);
}

template <typename acc_t, typename queue_t>
__global__ void __launch_bounds__(kThreads)
    backward_partials_kernel(const acc_t* __restrict__ qa, const queue_t* __restrict__ queue,
                             const acc_t* __restrict__ lse, const acc_t* __restrict__ grad, acc_t* dq_part,
                             int64_t G, int64_t N, int64_t K, int D, int64_t per_split, acc_t inv_t,
                             bool atomic) {
  INSLOC_DYNAMIC_SHARED(smem_raw);
  acc_t* q_s = reinterpret_cast<acc_t*>(smem_raw);  // [kRows, D + 1]
  acc_t* tile = q_s + kRows * (D + 1);               // [kTile, D + 1]
  acc_t* dq_s = tile + kTile * (D + 1);              // [kRows, D]
  acc_t* p_s = dq_s + kRows * D;                     // [kRows, kTile + 1] (dynamic: see the forward)
  const auto [split, r0, g, k_begin, k_end, row, lane] = place(K, per_split);
  const queue_t* queue_g = queue + g * K * D;
  load_rows<kThreads>(q_s, qa, g, r0, N, D, D + 1);
  for (int i = threadIdx.x; i < kRows * D; i += kThreads) dq_s[i] = 0;
  const bool row_ok = r0 + row < N;
  const acc_t row_lse = row_ok ? lse[g * N + r0 + row] : acc_t(0);
  const acc_t row_coef = row_ok ? grad[g * N + r0 + row] * inv_t : acc_t(0);
  for (int64_t k0 = k_begin; k0 < k_end; k0 += kTile) {
    acc_t logits[kCols];
    next_tile_logits(logits, tile, q_s, queue_g, k0, k_end, D, row, lane, inv_t);
#pragma unroll
    for (int c = 0; c < kCols; ++c) {
      const int col = lane + c * kLanes;
      p_s[row * (kTile + 1) + col] =
          (row_ok && k0 + col < k_end) ? row_coef * infonce_prob(logits[c], row_lse) : acc_t(0);
    }
    __syncthreads();
    for (Walk w(threadIdx.x, kThreads, D); w.r < kRows; w.next()) {
      acc_t sum = 0;
#pragma unroll 8
      for (int c = 0; c < kTile; ++c) sum += p_s[w.r * (kTile + 1) + c] * tile[c * (D + 1) + w.c];
      dq_s[w.r * D + w.c] += sum;  // each element has one owner thread: no race
    }
  }
  __syncthreads();
  // atomic: every split adds into slot 0 (zeroed); otherwise each split owns its slot.
  acc_t* out = dq_part + ((int64_t(atomic ? 0 : split) * G + g) * N) * D;
  for (Walk w(threadIdx.x, kThreads, D); w.r < kRows; w.next()) {
    if (r0 + w.r >= N) continue;
    if (atomic)
      atomicAdd(out + (r0 + w.r) * D + w.c, dq_s[w.r * D + w.c]);
    else
      out[(r0 + w.r) * D + w.c] = dq_s[w.r * D + w.c];
  }
}

template <typename acc_t>
__global__ void backward_finish_kernel(const acc_t* qa, const acc_t* ka, const acc_t* grad, const acc_t* lse,
                                       const acc_t* dq_part, acc_t* dq, acc_t* dk, int64_t rows, int64_t D,
                                       int64_t splits, acc_t inv_t) {
  // One block per row (g, n): the positive logit once, then its D elements.
  const int64_t i = blockIdx.x;
  __shared__ acc_t coef;
  if (threadIdx.x == 0) {
    acc_t dot = 0;
    for (int64_t d = 0; d < D; ++d) dot += qa[i * D + d] * ka[i * D + d];
    coef = positive_coef(grad[i], inv_t, dot * inv_t, lse[i]);
  }
  __syncthreads();
  for (int64_t d = threadIdx.x; d < D; d += blockDim.x) {
    acc_t sum = coef * ka[i * D + d];
    for (int64_t c = 0; c < splits; ++c) sum += dq_part[(c * rows + i) * D + d];
    dq[i * D + d] = sum;
    dk[i * D + d] = coef * qa[i * D + d];
  }
}

// ---- Tensor-core partials kernels (see the top of the file) ----

constexpr int kTcWarps = 4;
constexpr int kTcThreads = kTcWarps * 32;
constexpr int kTcRows = 16;                        // query rows per block: one WMMA M
constexpr int kTcTile = kTcWarps * 16;             // queue rows per tile: one 16-column slice per warp
constexpr int kTcPad = 4;                          // floats of row padding: keeps WMMA's 16-byte ldm rule
constexpr int kTcLdS = kTcTile + kTcPad;           // leading dimension of the [kTcRows, kTcTile] logits
constexpr int kTcLanes = kTcThreads / kTcRows;     // threads per row for the element-wise work (8)
constexpr int kTcCols = kTcTile / kTcLanes;        // logits per thread per tile (8)
constexpr int kTcBatch = 4;                        // 16-byte queue loads a thread has in flight at once
static_assert(kTcRows == kRows, "the host's row blocks are the same for both versions");
// Whether every value of T is exact in TF32 (fp16 and bf16 are), so that it needs no low part.
template <typename T>
constexpr bool kExactInTf32 = !std::is_same<T, float>::value && !std::is_same<T, double>::value;

// WMMA TF32 exists from sm_80 on; the host launches these kernels only there. Code for older GPUs
// (an arch added for the build machine's own GPU) gets an empty body.
#if !defined(__CUDA_ARCH__) || __CUDA_ARCH__ >= 800
#define INSLOC_TC_BODY 1
namespace wmma = nvcuda::wmma;
using TcA = wmma::fragment<wmma::matrix_a, 16, 16, 8, wmma::precision::tf32, wmma::row_major>;
using TcBCol = wmma::fragment<wmma::matrix_b, 16, 16, 8, wmma::precision::tf32, wmma::col_major>;
using TcBRow = wmma::fragment<wmma::matrix_b, 16, 16, 8, wmma::precision::tf32, wmma::row_major>;
using TcAcc = wmma::fragment<wmma::accumulator, 16, 16, 8, float>;

// hi = x rounded to TF32, lo = the rest rounded to TF32 (x = hi + lo to about 2^-22 relative).
template <typename Frag>
__device__ __forceinline__ void tf32_split(Frag& hi, Frag& lo) {
#pragma unroll
  for (int i = 0; i < hi.num_elements; ++i) {
    const float x = hi.x[i];
    hi.x[i] = wmma::__float_to_tf32(x);
    lo.x[i] = wmma::__float_to_tf32(x - hi.x[i]);
  }
}

template <typename Frag>
__device__ __forceinline__ void tf32_round(Frag& f) {
#pragma unroll
  for (int i = 0; i < f.num_elements; ++i) f.x[i] = wmma::__float_to_tf32(f.x[i]);
}

// acc += a . b, with the low parts where an operand is not exact in TF32 (small terms first).
template <typename B>
__device__ __forceinline__ void tf32x3_mma(TcAcc& acc, const float* a_ptr, unsigned lda, const float* b_ptr,
                                           unsigned ldb, bool a_exact, bool b_exact) {
  TcA a_hi, a_lo;
  B b_hi, b_lo;
  wmma::load_matrix_sync(a_hi, a_ptr, lda);
  wmma::load_matrix_sync(b_hi, b_ptr, ldb);
  if (a_exact) tf32_round(a_hi); else tf32_split(a_hi, a_lo);
  if (b_exact) tf32_round(b_hi); else tf32_split(b_hi, b_lo);
  if (!a_exact) wmma::mma_sync(acc, a_lo, b_hi, acc);
  if (!b_exact) wmma::mma_sync(acc, a_hi, b_lo, acc);
  wmma::mma_sync(acc, a_hi, b_hi, acc);
}
#endif

// One 16-byte chunk of queue values as fp32 at dst (16-byte aligned when the chunk holds 4 or more values).
template <typename queue_t>
__device__ __forceinline__ void store_chunk(float* dst, const queue_t (&v)[16 / sizeof(queue_t)]) {
  constexpr int kVec = 16 / sizeof(queue_t);
#pragma unroll
  for (int e = 0; e < kVec; e += 4) {
    float f[4];
#pragma unroll
    for (int t = 0; t < 4; ++t) f[t] = e + t < kVec ? static_cast<float>(v[e + t]) : 0.f;
    if constexpr (kVec >= 4) {
      gpu::store16(dst + e, f);
    } else {
#pragma unroll
      for (int t = 0; t < kVec; ++t) dst[e + t] = f[t];
    }
  }
}

// Queue rows [k0, k0 + kTcTile) of one group as fp32 into tile [kTcTile, ld]; rows past k_end are zero.
// vec (the queue's base address a multiple of 16 bytes): in 16-byte chunks (4 fp32, 8 fp16/bf16, 2 fp64).
// D % 16 == 0 makes a row a whole, even number of chunks, 16-byte aligned in global and shared memory
// (ld % 4 == 0), and the tile kTcThreads x (chunks per row / 2) chunks: the same count for every thread.
// Each thread issues kTcBatch loads (half as many for 16-bit types: the same number of values) before it
// stores any, so that a block has up to kTcThreads x kTcBatch x 16 bytes in flight instead of one 4-byte load
// per thread. Otherwise element by element, as the CUDA-core kernels load theirs.
template <typename queue_t>
__device__ __forceinline__ void load_tile_tc(float* tile, const queue_t* queue, int64_t k0, int64_t k_end, int D,
                                             int ld, bool vec) {
  if (!vec) {
    load_tile<kTcThreads, kTcTile>(tile, queue, k0, k_end, D, ld);
    return;
  }
  const queue_t* src = queue + k0 * D;
  const int64_t valid = min(int64_t(kTcTile), k_end - k0);
  constexpr int kVec = 16 / sizeof(queue_t);
  constexpr int kBatch = sizeof(queue_t) == 2 ? kTcBatch / 2 : kTcBatch;  // 16-bit: as many elements as fp32
  const int per_row = D / kVec, per_thread = per_row / 2;
  // Chunk threadIdx.x + j * kTcThreads is (row w.r, chunk w.c of the row).
  Walk w(threadIdx.x, kTcThreads, per_row);
  for (int j = 0; j < per_thread; j += kBatch) {
    alignas(16) queue_t v[kBatch][kVec];
    const Walk first = w;  // the batch's first chunk: the stores below step from it again
#pragma unroll
    for (int u = 0; u < kBatch; ++u) {
      if (j + u >= per_thread) break;
      if (w.r < valid) {
        gpu::load16(v[u], src + w.r * D + w.c * kVec);
      } else {
#pragma unroll
        for (int e = 0; e < kVec; ++e) v[u][e] = queue_t(0);
      }
      w.next();
    }
    w = first;
#pragma unroll
    for (int u = 0; u < kBatch; ++u) {
      if (j + u >= per_thread) break;
      store_chunk(tile + w.r * ld + w.c * kVec, v[u]);
      w.next();
    }
  }
}

// Pipelined tensor-core kernels (INSLOC_OPS_CUDA_INFONCE_PIPELINE=1; never run on a GPU yet): each thread
// holds its chunks of the next tile in registers. fetch() issues their loads (all of them at once: the
// block's whole tile in flight) before the current tile's products, commit() stores them to shared memory
// after, so that the loads' latency overlaps the products. Up to kPrefetchChunks chunks a thread (the
// tile's 16-byte chunks over kTcThreads): D <= 128 for fp32 queues, D <= 256 for 16-bit ones.
constexpr int kPrefetchChunks = 16;

template <typename queue_t>
bool prefetch_fits(int64_t D) {
  return D % 16 == 0 && D / (16 / int64_t(sizeof(queue_t))) / 2 <= kPrefetchChunks;
}

template <typename queue_t>
struct TilePrefetch {
  static constexpr int kVec = 16 / sizeof(queue_t);
  alignas(16) queue_t v[kPrefetchChunks][kVec];

  // Rows [k0, k0 + kTcTile) of the group's queue; rows past k_end are zero (and not read).
  __device__ __forceinline__ void fetch(const queue_t* queue, int64_t k0, int64_t k_end, int D) {
    const queue_t* src = queue + k0 * D;
    const int64_t valid = min(int64_t(kTcTile), k_end - k0);
    const int per_row = D / kVec, per_thread = per_row / 2;
    Walk w(threadIdx.x, kTcThreads, per_row);
#pragma unroll
    for (int u = 0; u < kPrefetchChunks; ++u) {
      if (u < per_thread) {
        if (w.r < valid) {
          gpu::load16(v[u], src + w.r * D + w.c * kVec);
        } else {
#pragma unroll
          for (int e = 0; e < kVec; ++e) v[u][e] = queue_t(0);
        }
        w.next();
      }
    }
  }

  // The fetched rows as fp32 into tile [kTcTile, ld].
  __device__ __forceinline__ void commit(float* tile, int D, int ld) const {
    const int per_row = D / kVec, per_thread = per_row / 2;
    Walk w(threadIdx.x, kTcThreads, per_row);
#pragma unroll
    for (int u = 0; u < kPrefetchChunks; ++u) {
      if (u < per_thread) {
        store_chunk(tile + w.r * ld + w.c * kVec, v[u]);
        w.next();
      }
    }
  }
};

// s_s [kTcRows, kTcLdS] = q_s . tile^T / T: warp w computes columns [16 w, 16 w + 16).
__device__ __forceinline__ void tile_logits_tc(float* s_s, const float* q_s, const float* tile, int D, int ld,
                                               float inv_t, bool q_exact, bool queue_exact) {
#ifdef INSLOC_TC_BODY
  const int warp = threadIdx.x / 32;
  TcAcc acc;
  wmma::fill_fragment(acc, 0.f);
  const float* b = tile + warp * 16 * ld;  // B[d][n] = tile[16 w + n][d]: column-major with ld
  for (int d0 = 0; d0 < D; d0 += 8) tf32x3_mma<TcBCol>(acc, q_s + d0, ld, b + d0, ld, q_exact, queue_exact);
#pragma unroll
  for (int i = 0; i < acc.num_elements; ++i) acc.x[i] *= inv_t;
  wmma::store_matrix_sync(s_s + warp * 16, acc, kTcLdS, wmma::mem_row_major);
#endif
}

// dq_s [kTcRows, ld] += p_s [kTcRows, kTcTile] @ tile [kTcTile, D]: warp w owns the 16-column slices
// w, w + kTcWarps, ... of dq.
__device__ __forceinline__ void tile_dq_tc(float* dq_s, const float* p_s, const float* tile, int D, int ld,
                                           bool queue_exact) {
#ifdef INSLOC_TC_BODY
  for (int j = threadIdx.x / 32; j < D / 16; j += kTcWarps) {
    TcAcc acc;
    wmma::load_matrix_sync(acc, dq_s + j * 16, ld, wmma::mem_row_major);
    for (int c0 = 0; c0 < kTcTile; c0 += 8)
      tf32x3_mma<TcBRow>(acc, p_s + c0, kTcLdS, tile + c0 * ld + j * 16, ld, false, queue_exact);
    wmma::store_matrix_sync(dq_s + j * 16, acc, ld, wmma::mem_row_major);
  }
#endif
}

// This thread's (m, s) merged with those of the other kTcLanes threads of its row (consecutive lanes of
// one warp); the result is complete in the row's first lane.
__device__ __forceinline__ void merge_row_lanes(float& m, float& s) {
#pragma unroll
  for (int delta = kTcLanes / 2; delta > 0; delta /= 2) {
    const float m2 = __shfl_down_sync(0xffffffffu, m, delta), s2 = __shfl_down_sync(0xffffffffu, s, delta);
    lse_merge(m, s, m2, s2);  // lanes whose partner is outside their row compute what nobody reads
  }
}

// Stages queue rows [k0, k0 + kTcTile) once every thread is done with the previous tile and its logits
// (and, for the first, once q_s is loaded), then the tile's logits into s_s, visible to every thread.
// Pipelined: the rows come from pf (fetched by the previous call, or before the loop for the first tile),
// and pf fetches the next tile's rows before the products.
template <bool Pipelined, typename queue_t>
__device__ __forceinline__ void next_tile_logits_tc(float* s_s, float* tile, const float* q_s, const queue_t* queue_g,
                                                    int64_t k0, int64_t k_end, int D, int ld, float inv_t,
                                                    bool q_exact, bool queue_exact, bool vec,
                                                    TilePrefetch<queue_t>& pf) {
  __syncthreads();
  if constexpr (Pipelined) {
    pf.commit(tile, D, ld);
    if (k0 + kTcTile < k_end) pf.fetch(queue_g, k0 + kTcTile, k_end, D);
  } else {
    load_tile_tc(tile, queue_g, k0, k_end, D, ld, vec);
  }
  __syncthreads();
  tile_logits_tc(s_s, q_s, tile, D, ld, inv_t, q_exact, queue_exact);
  __syncthreads();
}

template <typename queue_t, bool Pipelined>
__global__ void __launch_bounds__(kTcThreads)
    forward_partials_tc_kernel(const float* __restrict__ qa, const queue_t* __restrict__ queue, float* part_m,
                               float* part_s, int64_t N, int64_t K, int D, int64_t per_split, int64_t splits,
                               float inv_t, bool q_exact, bool vec) {
  constexpr bool queue_exact = kExactInTf32<queue_t>;
  INSLOC_DYNAMIC_SHARED(smem_raw);
  const int ld = D + kTcPad;
  float* q_s = reinterpret_cast<float*>(smem_raw);  // [kTcRows, ld]
  float* tile = q_s + kTcRows * ld;                  // [kTcTile, ld]
  float* s_s = tile + kTcTile * ld;                  // [kTcRows, kTcLdS]
  const auto [split, r0, g, k_begin, k_end, row, lane] = place<kTcLanes>(K, per_split);
  const queue_t* queue_g = queue + g * K * D;
  TilePrefetch<queue_t> pf;
  if (Pipelined && k_begin < k_end) pf.fetch(queue_g, k_begin, k_end, D);
  load_rows<kTcThreads>(q_s, qa, g, r0, N, D, ld);
  float m = neg_inf<float>(), s = 0.f;
  for (int64_t k0 = k_begin; k0 < k_end; k0 += kTcTile) {
    next_tile_logits_tc<Pipelined>(s_s, tile, q_s, queue_g, k0, k_end, D, ld, inv_t, q_exact, queue_exact, vec, pf);
#pragma unroll
    for (int c = 0; c < kTcCols; ++c) {
      const int col = lane + c * kTcLanes;
      if (k0 + col < k_end) lse_add(m, s, s_s[row * kTcLdS + col]);
    }
  }
  merge_row_lanes(m, s);
  if (lane == 0 && r0 + row < N) {
    const int64_t out = (g * N + r0 + row) * splits + split;
    part_m[out] = m;
    part_s[out] = s;
  }
}

template <typename queue_t, bool Pipelined>
__global__ void __launch_bounds__(kTcThreads)
    backward_partials_tc_kernel(const float* __restrict__ qa, const queue_t* __restrict__ queue,
                                const float* __restrict__ lse, const float* __restrict__ grad, float* dq_part,
                                int64_t G, int64_t N, int64_t K, int D, int64_t per_split, float inv_t, bool atomic,
                                bool q_exact, bool vec) {
  constexpr bool queue_exact = kExactInTf32<queue_t>;
  INSLOC_DYNAMIC_SHARED(smem_raw);
  const int ld = D + kTcPad;
  float* q_s = reinterpret_cast<float*>(smem_raw);  // [kTcRows, ld]
  float* tile = q_s + kTcRows * ld;                  // [kTcTile, ld]
  float* s_s = tile + kTcTile * ld;                  // [kTcRows, kTcLdS]: logits, then g / T p
  float* dq_s = s_s + kTcRows * kTcLdS;              // [kTcRows, ld]
  const auto [split, r0, g, k_begin, k_end, row, lane] = place<kTcLanes>(K, per_split);
  const queue_t* queue_g = queue + g * K * D;
  TilePrefetch<queue_t> pf;
  if (Pipelined && k_begin < k_end) pf.fetch(queue_g, k_begin, k_end, D);
  load_rows<kTcThreads>(q_s, qa, g, r0, N, D, ld);
  for (int i = threadIdx.x; i < kTcRows * ld; i += kTcThreads) dq_s[i] = 0.f;
  const bool row_ok = r0 + row < N;
  const float row_lse = row_ok ? lse[g * N + r0 + row] : 0.f;
  const float row_coef = row_ok ? grad[g * N + r0 + row] * inv_t : 0.f;
  for (int64_t k0 = k_begin; k0 < k_end; k0 += kTcTile) {
    // (its first barrier also waits until the previous tile's dq products are done with tile and s_s)
    next_tile_logits_tc<Pipelined>(s_s, tile, q_s, queue_g, k0, k_end, D, ld, inv_t, q_exact, queue_exact, vec, pf);
#pragma unroll
    for (int c = 0; c < kTcCols; ++c) {
      const int col = lane + c * kTcLanes;
      float& v = s_s[row * kTcLdS + col];  // each element has one owner thread
      v = (row_ok && k0 + col < k_end) ? row_coef * infonce_prob(v, row_lse) : 0.f;
    }
    __syncthreads();
    tile_dq_tc(dq_s, s_s, tile, D, ld, queue_exact);
  }
  __syncthreads();
  // atomic: every split adds into slot 0 (zeroed); otherwise each split owns its slot.
  float* out = dq_part + ((int64_t(atomic ? 0 : split) * G + g) * N) * D;
  for (int i = threadIdx.x; i < kTcRows * D; i += kTcThreads) {
    const int r = i / D, d = i - r * D;
    if (r0 + r >= N) continue;
    if (atomic)
      atomicAdd(out + (r0 + r) * D + d, dq_s[r * ld + d]);
    else
      out[(r0 + r) * D + d] = dq_s[r * ld + d];
  }
}

// K splits per (group, row block) for about per_sm blocks per SM (4, or, for the tensor-core backward, as
// many as its occupancy allows if fewer): enough to fill the GPU when N is small, in one wave.
int64_t splits_to_fill(int device, int64_t G, int64_t row_blocks, int per_sm = 4) {
  const int64_t per_k = G * row_blocks;
  return std::max<int64_t>(1, (per_sm * gpu::sm_count(device) + per_k - 1) / per_k);
}

// INSLOC_OPS_CUDA_INFONCE_PIPELINE (read at every call): "1" runs the pipelined tensor-core kernels where
// they apply (a 16-byte aligned queue whose rows fit kPrefetchChunks chunks a thread); unset or "0", not.
// Read once per call, at the op's entry (an invalid value is an error whichever kernels run).
bool pipeline_requested() {
  const char* env = std::getenv("INSLOC_OPS_CUDA_INFONCE_PIPELINE");
  TORCH_CHECK(env == nullptr || *env == '\0' || std::strcmp(env, "0") == 0 || std::strcmp(env, "1") == 0,
              "INSLOC_OPS_CUDA_INFONCE_PIPELINE must be 0 or 1, got '", env, "'");
  return env != nullptr && std::strcmp(env, "1") == 0;
}

template <typename queue_t>
bool pipeline_applies(bool requested, int64_t D, bool vec) {
  return requested && vec && prefetch_fits<queue_t>(D);
}

template <typename queue_t>
bool pipelined(bool requested, int64_t D, bool vec) {
  const bool on = pipeline_applies<queue_t>(requested, D, vec);
  if (on) INSLOC_EMU_NOTE("queue_infonce: pipelined tiles");
  return on;
}

size_t tc_forward_smem(int64_t D) { return sizeof(float) * ((kTcRows + kTcTile) * (D + kTcPad) + kTcRows * kTcLdS); }
size_t tc_backward_smem(int64_t D) { return tc_forward_smem(D) + sizeof(float) * kTcRows * (D + kTcPad); }

// Whether the tensor-core kernels run: fp32 accumulation (not fp64), D a positive multiple of 16 whose
// tiles fit in shared memory, a GPU of sm_80 or newer running code built for sm_80 or newer, and
// INSLOC_OPS_CUDA_INFONCE_TC not "0" (read at every call; "1" or unset: where supported).
bool use_tensor_cores(const at::Tensor& q, int device) {
  const char* env = std::getenv("INSLOC_OPS_CUDA_INFONCE_TC");
  TORCH_CHECK(env == nullptr || *env == '\0' || std::strcmp(env, "0") == 0 || std::strcmp(env, "1") == 0,
              "INSLOC_OPS_CUDA_INFONCE_TC must be 0 or 1, got '", env, "'");
  if (env != nullptr && std::strcmp(env, "0") == 0) return false;
  const int64_t D = q.size(2);
  // The kernel's own architecture too: a build with only pre-sm_80 PTX for this GPU (say TORCH_CUDA_ARCH_LIST
  // "7.5+PTX" on an H100) JIT-compiles their empty bodies.
  return infonce_acc_type(q) == at::kFloat && D > 0 && D % 16 == 0 && gpu::compute_capability_major(device) >= 8 &&
         tc_backward_smem(D) <= gpu::max_shared_per_block_optin(device) &&
         gpu::kernel_arch(backward_partials_tc_kernel<float, false>) >= 80;
}

// Whether the tensor-core kernels may read t in 16-byte chunks (a view can start anywhere in its storage).
bool aligned16(const at::Tensor& t) { return reinterpret_cast<uintptr_t>(t.data_ptr()) % 16 == 0; }

void check_inputs(const at::Tensor& q, const at::Tensor& k, const at::Tensor& queue, double temperature) {
  check_infonce_args(q, k, queue, temperature);
  TORCH_CHECK(gpu::on_device(q) && k.device() == q.device() && queue.device() == q.device(),
              "queue_infonce: q, k and queue must be on one CUDA device");
  TORCH_CHECK(q.size(1) <= int64_t(65535) * kRows, "queue_infonce: N too large for the CUDA kernel's grid");
  // The backward's finish kernel has a block per row (forward too: a training step fails before its backward)
  TORCH_CHECK(q.size(0) * q.size(1) <= int64_t(2147483647), "queue_infonce: G * N = ", q.size(0) * q.size(1),
              " rows, more than the CUDA kernels' grid (2^31 - 1)");
}

// ---- The blocked path: feature dims past the CUDA-core kernels' shared memory ----
// The CUDA-core kernels keep whole rows of D in shared memory: on an H100/H200 (227 KiB a block) fp32 fits up to
// D = 1199 forward and 899 backward, fp64 up to 593 and 445. Past that (where the tensor-core kernels do not
// apply either) the partials come from batched matmuls over chunks of the queue instead, in the kernels' form:
// one (max, sum of exp) per row forward, sum_j g_i / T p_ij queue_j backward, which the same combine and finish
// kernels complete. Memory stays bounded (blocked_chunk), whatever K. The matmuls run in the accumulation type
// whatever autocast says (BlockedGuard); as torch's own, they follow torch.backends.cuda.matmul.allow_tf32 and
// need CUBLAS_WORKSPACE_CONFIG under torch.use_deterministic_algorithms.
size_t core_forward_smem(int64_t D, size_t acc_size) {
  return acc_size * (size_t(kRows + kTile) * size_t(D + 1) + 2 * kThreads);
}
size_t core_backward_smem(int64_t D, size_t acc_size) {
  return acc_size * (size_t(kRows + kTile) * size_t(D + 1) + size_t(kRows) * size_t(D) + kRows * (kTile + 1));
}
bool use_blocked(bool tc, size_t smem, int device) { return !tc && smem > gpu::max_shared_per_block_optin(device); }

// Autocast off for the blocked path's ATen calls (the op itself is below the autocast keys only when called
// through the dispatcher's autocast fallthrough, which leaves them on for the ops it calls).
struct BlockedGuard {
  c10::impl::ExcludeDispatchKeyGuard no_autocast{c10::autocast_dispatch_keyset};
};

// Queue rows a chunk: the chunk's logits [G, N, C] and its copy in the accumulation type [G, C, D] hold at most
// 2^22 elements each (16 MiB in fp32).
int64_t blocked_chunk(int64_t G, int64_t N, int64_t D) {
  const int64_t per_row = G * std::max<int64_t>(std::max(N, D), 1);
  return std::max<int64_t>(1, std::min<int64_t>(4096, (int64_t(1) << 22) / per_row));
}

// Queue rows [k0, k0 + n) in the accumulation type, [G, n, D], and their scaled logits q.queue_j / T, [G, N, n].
std::pair<at::Tensor, at::Tensor> blocked_logits(const at::Tensor& qa, const at::Tensor& queue_c, int64_t k0,
                                                 int64_t n, double inv_t) {
  auto chunk = queue_c.narrow(1, k0, n).to(qa.scalar_type());
  auto logits = qa.bmm(chunk.transpose(1, 2)).mul_(inv_t);
  return {chunk, logits};
}

// exp(a - b), 1 where a equals b (also where both are infinite: exp(inf - inf) would be NaN); NaN stays NaN.
at::Tensor exp_from(const at::Tensor& a, const at::Tensor& b) { return a.sub(b).exp_().masked_fill_(a.eq(b), 1); }

// part_m, part_s [G, N, 1]: every logit of the row merged chunk by chunk into one running (max, sum of exp
// (x - max)), the form of the kernels' partials. A logit equal to the max counts 1, also an infinite one: logits
// that are all -inf give (-inf, n), which the combine's merge skips as it skips the kernels' (-inf, 0), and
// +inf ones give +inf, as the reference does. A NaN logit makes both NaN.
void forward_partials_blocked(const at::Tensor& qa, const at::Tensor& queue_c, at::Tensor& part_m,
                              at::Tensor& part_s, double inv_t) {
  const BlockedGuard guard;
  const int64_t K = queue_c.size(1), chunk_rows = blocked_chunk(qa.size(0), qa.size(1), qa.size(2));
  auto m = part_m.select(2, 0).fill_(-INFINITY);
  auto s = part_s.select(2, 0).zero_();
  for (int64_t k0 = 0; k0 < K; k0 += chunk_rows) {
    const auto logits = blocked_logits(qa, queue_c, k0, std::min(chunk_rows, K - k0), inv_t).second;
    const auto m2 = logits.amax(-1, /*keepdim=*/true);
    const auto s2 = exp_from(logits, m2).sum(-1);
    const auto m1 = m2.squeeze(-1);
    const auto top = m.maximum(m1);
    s.mul_(exp_from(m, top)).add_(s2.mul(exp_from(m1, top)));
    m.copy_(top);
  }
}

// dq_sum [G, N, D] (zeroed) += sum_j (g_i / T) exp(x_ij - lse_i) queue_j, chunk by chunk in order.
void backward_partials_blocked(const at::Tensor& qa, const at::Tensor& queue_c, const at::Tensor& la,
                               const at::Tensor& ga, at::Tensor dq_sum, double inv_t) {
  const BlockedGuard guard;
  const int64_t K = queue_c.size(1), chunk_rows = blocked_chunk(qa.size(0), qa.size(1), qa.size(2));
  const auto coef = ga.mul(inv_t).unsqueeze(-1);  // [G, N, 1]
  const auto lse = la.unsqueeze(-1);
  for (int64_t k0 = 0; k0 < K; k0 += chunk_rows) {
    auto [chunk, logits] = blocked_logits(qa, queue_c, k0, std::min(chunk_rows, K - k0), inv_t);
    dq_sum.baddbmm_(logits.sub_(lse).exp_().mul_(coef), chunk);
  }
}

// The kernels launched with dynamic shared memory keep all of it there (no static __shared__ arrays), so
// `bytes` is the block's whole use: what the device's opt-in limit and the 48 KiB default apply to.
template <typename Kernel>
void allow_shared(Kernel kernel, size_t bytes, int device, int64_t D) {
  const size_t limit = gpu::max_shared_per_block_optin(device);
  TORCH_CHECK(bytes <= limit, "queue_infonce: feature dim D=", D, " needs ", bytes,
              " bytes of shared memory per block, more than the device's ", limit);
  if (bytes > 48 * 1024) gpu::allow_dynamic_shared(kernel, bytes);
}

// The blocks an SM holds of the tensor-core backward partials kernel a call will launch, at most 4
// (splits_to_fill's target). Queried for the pipelined kernel only: ptxas gives it 138-166 registers a thread
// (sm_90), so an H100 holds 3 of its 128-thread blocks, where a grid sized for 4 would take 1.3 waves. The
// default kernel's grid stays sized for 4 blocks an SM without a query, the launch configuration measured on an
// H200 (2026-11-27). (The backward's split count only orders fp32 atomics.)
int tc_backward_blocks_per_sm(at::ScalarType queue_type, bool pipeline, int64_t D, bool vec, int device) {
  int n = 4;
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, queue_type, "queue_infonce_occupancy", [&] {
    if (!pipeline_applies<scalar_t>(pipeline, D, vec)) return;
    const auto kernel = backward_partials_tc_kernel<scalar_t, true>;
    const size_t smem = tc_backward_smem(D);
    allow_shared(kernel, smem, device, D);  // the query answers 0 above 48 KiB without it
    n = gpu::resident_blocks(kernel, kTcThreads, smem);
  });
  if (n < 4) INSLOC_EMU_NOTE("queue_infonce: grid for fewer blocks an SM");
  return std::min(n, 4);
}

std::tuple<at::Tensor, at::Tensor> queue_infonce_cuda(const at::Tensor& q, const at::Tensor& k,
                                                      const at::Tensor& queue, double temperature) {
  check_inputs(q, k, queue, temperature);
  const gpu::DeviceGuard guard(q.device());
  const int64_t G = q.size(0), N = q.size(1), D = q.size(2), K = queue.size(1);
  const auto acc = infonce_acc_type(q);
  auto loss = at::empty({G, N}, q.options().dtype(acc));
  auto lse = at::empty({G, N}, q.options().dtype(acc));
  if (G * N == 0) return {loss, lse};
  const auto qa = q.detach().to(acc).contiguous();  // [G, N, D]
  const auto ka = k.detach().to(acc).contiguous();
  const auto queue_c = queue.detach().contiguous();  // [G, K, D]
  const int64_t row_blocks = (N + kRows - 1) / kRows;
  const int device = q.get_device();
  const bool tc = use_tensor_cores(q, device);
  const bool pipeline = pipeline_requested();
  const bool blocked = use_blocked(tc, core_forward_smem(D, qa.element_size()), device);
  int64_t splits, per_split;
  // 4 blocks an SM: every forward kernel fits 4 on sm_90 (ptxas: at most 125 registers a thread), and the split
  // count sets the order in which the partials merge, which the pipelined kernels keep bitwise the default's.
  if (blocked)
    splits = 1, per_split = K;  // one running partial
  else
    split_k<int64_t>(K, tc ? kTcTile : kTile, splits_to_fill(device, G, row_blocks), splits, per_split);
  TORCH_CHECK(splits <= 2147483647 && G <= 65535, "queue_infonce: too many groups for the CUDA grid");
  INSLOC_EMU_VALUE("queue_infonce: forward splits", splits);
  if (blocked) INSLOC_EMU_NOTE("queue_infonce: forward blocked");
  auto part_m = at::empty({G, N, splits}, qa.options());
  auto part_s = at::empty({G, N, splits}, qa.options());
  auto stream = gpu::current_stream();
  AT_DISPATCH_FLOATING_TYPES(acc, "queue_infonce_cuda", [&] {
    using acc_t = scalar_t;
    const acc_t inv_t = acc_t(1) / static_cast<acc_t>(temperature);
    if (blocked) forward_partials_blocked(qa, queue_c, part_m, part_s, static_cast<double>(inv_t));
    else AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, queue.scalar_type(), "queue_infonce_cuda_queue", [&] {
      using queue_t = scalar_t;
      if constexpr (std::is_same<acc_t, float>::value) {
        if (tc) {
          const size_t smem = tc_forward_smem(D);
          const bool vec = aligned16(queue_c);
          auto kernel = pipelined<queue_t>(pipeline, D, vec) ? forward_partials_tc_kernel<queue_t, true>
                                                   : forward_partials_tc_kernel<queue_t, false>;
          allow_shared(kernel, smem, device, D);
          INSLOC_LAUNCH(dim3(splits, row_blocks, G), kTcThreads, smem, stream, kernel)(
              qa.data_ptr<float>(), queue_c.data_ptr<queue_t>(), part_m.data_ptr<float>(), part_s.data_ptr<float>(),
              N, K, int(D), per_split, splits, inv_t, q.scalar_type() != at::kFloat, vec);
          INSLOC_LAUNCH_CHECK();
          return;
        }
      }
      const size_t smem = sizeof(acc_t) * ((kRows + kTile) * (D + 1) + 2 * kThreads);
      allow_shared(forward_partials_kernel<acc_t, queue_t>, smem, device, D);
      INSLOC_LAUNCH(dim3(splits, row_blocks, G), kThreads, smem, stream, forward_partials_kernel<acc_t, queue_t>)(
          qa.data_ptr<acc_t>(), queue_c.data_ptr<queue_t>(), part_m.data_ptr<acc_t>(), part_s.data_ptr<acc_t>(), N,
          K, int(D), per_split, splits, inv_t);
      INSLOC_LAUNCH_CHECK();
    });
    const int64_t rows = G * N;
    INSLOC_LAUNCH((rows + 127) / 128, 128, 0, stream, forward_combine_kernel<acc_t>)(
        qa.data_ptr<acc_t>(), ka.data_ptr<acc_t>(), part_m.data_ptr<acc_t>(), part_s.data_ptr<acc_t>(),
        loss.data_ptr<acc_t>(), lse.data_ptr<acc_t>(), rows, D, splits, inv_t);
    INSLOC_LAUNCH_CHECK();
  });
  return {loss, lse};
}

std::tuple<at::Tensor, at::Tensor> queue_infonce_backward_cuda(const at::Tensor& grad_loss, const at::Tensor& q,
                                                               const at::Tensor& k, const at::Tensor& queue,
                                                               const at::Tensor& lse, double temperature) {
  check_inputs(q, k, queue, temperature);
  const gpu::DeviceGuard guard(q.device());
  const int64_t G = q.size(0), N = q.size(1), D = q.size(2), K = queue.size(1);
  check_infonce_rows("queue_infonce_backward", "grad_loss", grad_loss, q);
  check_infonce_rows("queue_infonce_backward", "lse", lse, q);
  if (q.numel() == 0) return {at::empty(q.sizes(), q.options()), at::empty(k.sizes(), k.options())};
  const auto acc = infonce_acc_type(q);
  const auto qa = q.detach().to(acc).contiguous();  // [G, N, D]
  const auto ka = k.detach().to(acc).contiguous();
  const auto ga = grad_loss.detach().to(acc).contiguous();  // [G, N]
  const auto la = lse.detach().to(acc).contiguous();
  const auto queue_c = queue.detach().contiguous();
  const int64_t row_blocks = (N + kRows - 1) / kRows;
  const int device = q.get_device();
  // Default: splits for about 4 blocks an SM (the pipelined kernel: as many as its occupancy allows if fewer),
  // enough blocks to fill the GPU in one wave, atomics into one buffer.
  // Deterministic: at most kMaxBackwardSplits partials, summed in order by backward_finish_kernel.
  const bool atomic = !at::globalContext().deterministicAlgorithms();
  const bool tc = use_tensor_cores(q, device);
  const bool pipeline = pipeline_requested();
  // blocked: one sum, its chunks added in order (deterministic in either mode)
  const bool blocked = use_blocked(tc, core_backward_smem(D, qa.element_size()), device);
  const int per_sm =
      tc && atomic ? tc_backward_blocks_per_sm(queue.scalar_type(), pipeline, D, aligned16(queue_c), device) : 4;
  const int64_t max_splits = atomic ? splits_to_fill(device, G, row_blocks, per_sm) : kMaxBackwardSplits;
  int64_t splits, per_split;
  split_k<int64_t>(K, tc ? kTcTile : kTile, blocked ? 1 : max_splits, splits, per_split);
  TORCH_CHECK(splits <= 2147483647 && G <= 65535, "queue_infonce: too many groups for the CUDA grid");
  INSLOC_EMU_VALUE("queue_infonce: backward splits", splits);
  if (blocked) INSLOC_EMU_NOTE("queue_infonce: backward blocked");
  const int64_t slots = atomic || blocked ? 1 : splits;
  auto dq_part = at::empty({slots, G, N, D}, qa.options());  // every slot written when K > 0 and !atomic
  if (atomic || blocked || K == 0) dq_part.zero_();
  auto dqa = at::empty({G, N, D}, qa.options());
  auto dka = at::empty({G, N, D}, qa.options());
  auto stream = gpu::current_stream();
  AT_DISPATCH_FLOATING_TYPES(acc, "queue_infonce_backward_cuda", [&] {
    using acc_t = scalar_t;
    const acc_t inv_t = acc_t(1) / static_cast<acc_t>(temperature);
    if (K > 0 && blocked) {
      backward_partials_blocked(qa, queue_c, la, ga, dq_part.select(0, 0), static_cast<double>(inv_t));
    } else if (K > 0) {
      AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, queue.scalar_type(), "queue_infonce_backward_queue",
                                      [&] {
        using queue_t = scalar_t;
        if constexpr (std::is_same<acc_t, float>::value) {
          if (tc) {
            const size_t smem = tc_backward_smem(D);
            const bool vec = aligned16(queue_c);
            auto kernel = pipelined<queue_t>(pipeline, D, vec) ? backward_partials_tc_kernel<queue_t, true>
                                                     : backward_partials_tc_kernel<queue_t, false>;
            allow_shared(kernel, smem, device, D);
            INSLOC_LAUNCH(dim3(splits, row_blocks, G), kTcThreads, smem, stream, kernel)(
                qa.data_ptr<float>(), queue_c.data_ptr<queue_t>(), la.data_ptr<float>(), ga.data_ptr<float>(),
                dq_part.data_ptr<float>(), G, N, K, int(D), per_split, inv_t, atomic, q.scalar_type() != at::kFloat,
                vec);
            INSLOC_LAUNCH_CHECK();
            return;
          }
        }
        const size_t smem = sizeof(acc_t) * ((kRows + kTile) * (D + 1) + kRows * D + kRows * (kTile + 1));
        allow_shared(backward_partials_kernel<acc_t, queue_t>, smem, device, D);
        INSLOC_LAUNCH(dim3(splits, row_blocks, G), kThreads, smem, stream, backward_partials_kernel<acc_t, queue_t>)(
            qa.data_ptr<acc_t>(), queue_c.data_ptr<queue_t>(), la.data_ptr<acc_t>(), ga.data_ptr<acc_t>(),
            dq_part.data_ptr<acc_t>(), G, N, K, int(D), per_split, inv_t, atomic);
        INSLOC_LAUNCH_CHECK();
      });
    }
    const int64_t rows = G * N;
    INSLOC_LAUNCH(static_cast<unsigned>(rows), 128, 0, stream, backward_finish_kernel<acc_t>)(  // rows < 2^31
        qa.data_ptr<acc_t>(), ka.data_ptr<acc_t>(), ga.data_ptr<acc_t>(), la.data_ptr<acc_t>(),
        dq_part.data_ptr<acc_t>(), dqa.data_ptr<acc_t>(), dka.data_ptr<acc_t>(), rows, D, slots, inv_t);
    INSLOC_LAUNCH_CHECK();
  });
  return {dqa.to(q.scalar_type()), dka.to(k.scalar_type())};
}

}  // namespace
}  // namespace insloc

INSLOC_CUDA_LIBRARY_IMPL(m) {
  m.impl("queue_infonce", &insloc::queue_infonce_cuda);
  m.impl("queue_infonce_backward", &insloc::queue_infonce_backward_cuda);
}
