// sample_anchor_boxes on CUDA: one launch for all boxes. Block (box group, anchor range) streams over its
// anchors for kBoxesPerBlock boxes at once (each anchor is loaded once per group), reduces the packed
// candidates (csrc/common/anchors.h) with warp shuffles and atomically maxes them into [2, N] per-box
// slots; a tiny kernel unpacks the winner. Memory: O(N + A).
#include <ATen/core/Tensor.h>
#include <ATen/ops/empty.h>
#include <ATen/ops/zeros.h>

#include <algorithm>
#include <cmath>
#include <tuple>

#include "common/anchors.h"
#include "common/anchors_args.h"
#include "cuda/runtime.h"

namespace {

constexpr int kThreads = 256;
constexpr int kWarps = kThreads / 32;
constexpr int kBoxesPerBlock = 4;
constexpr int kFinalizeThreads = 128;

__device__ __forceinline__ int64_t warp_max(int64_t v) {
  for (int offset = 16; offset > 0; offset >>= 1) {
    v = max(v, static_cast<int64_t>(__shfl_down_sync(0xffffffffu, static_cast<long long>(v), offset)));
  }
  return v;
}

__global__ void __launch_bounds__(kThreads)
    scan_anchors_kernel(const float* __restrict__ gt,       // [N, 4]
                        const float* __restrict__ anchors,  // [A, 4]
                        int64_t N, int64_t A, float threshold, uint32_t seed_key, int64_t span,
                        unsigned long long* __restrict__ packed) {  // [2, N]: eligible pick, best IoU
  const int64_t n0 = static_cast<int64_t>(blockIdx.x) * kBoxesPerBlock;
  const int64_t begin = static_cast<int64_t>(blockIdx.y) * span;
  const int64_t end = min(begin + span, A);

  float bx1[kBoxesPerBlock], by1[kBoxesPerBlock], bx2[kBoxesPerBlock], by2[kBoxesPerBlock],
      barea[kBoxesPerBlock];
  uint32_t bkey[kBoxesPerBlock];
  int64_t pick[kBoxesPerBlock], best[kBoxesPerBlock];
#pragma unroll
  for (int b = 0; b < kBoxesPerBlock; ++b) {
    const int64_t n = min(n0 + b, N - 1);  // a short last group repeats box N - 1 and never writes it
    bx1[b] = gt[4 * n];
    by1[b] = gt[4 * n + 1];
    bx2[b] = gt[4 * n + 2];
    by2[b] = gt[4 * n + 3];
    barea[b] = insloc::box_area(bx1[b], by1[b], bx2[b], by2[b]);
    bkey[b] = insloc::box_key(seed_key, n);
    pick[b] = 0;
    best[b] = 0;
  }

  for (int64_t a = begin + threadIdx.x; a < end; a += kThreads) {
    const float ax1 = __ldg(anchors + 4 * a), ay1 = __ldg(anchors + 4 * a + 1);
    const float ax2 = __ldg(anchors + 4 * a + 2), ay2 = __ldg(anchors + 4 * a + 3);
    const float aarea = insloc::box_area(ax1, ay1, ax2, ay2);
#pragma unroll
    for (int b = 0; b < kBoxesPerBlock; ++b) {
      const float iou = insloc::box_iou(bx1[b], by1[b], bx2[b], by2[b], barea[b], ax1, ay1, ax2, ay2, aarea);
      best[b] = max(best[b], insloc::pack_candidate(insloc::float_bits(iou), a));
      if (iou > threshold) pick[b] = max(pick[b], insloc::pack_candidate(insloc::anchor_key(bkey[b], a), a));
    }
  }

  __shared__ int64_t partial[kWarps][2 * kBoxesPerBlock];
  const int warp = threadIdx.x / 32, lane = threadIdx.x % 32;
#pragma unroll
  for (int b = 0; b < kBoxesPerBlock; ++b) {
    const int64_t p = warp_max(pick[b]);
    const int64_t q = warp_max(best[b]);
    if (lane == 0) {
      partial[warp][b] = p;
      partial[warp][kBoxesPerBlock + b] = q;
    }
  }
  __syncthreads();
  if (warp == 0) {
#pragma unroll
    for (int j = 0; j < 2 * kBoxesPerBlock; ++j) {
      const int64_t v = warp_max(lane < kWarps ? partial[lane][j] : 0);
      const int b = j % kBoxesPerBlock;
      const int64_t n = n0 + b;
      if (lane == 0 && n < N && v > 0) {
        atomicMax(packed + (j < kBoxesPerBlock ? 0 : N) + n, static_cast<unsigned long long>(v));
      }
    }
  }
}

__global__ void finalize_kernel(const float* __restrict__ gt, const float* __restrict__ anchors,
                                const unsigned long long* __restrict__ packed, int64_t N,
                                int64_t* __restrict__ index, float* __restrict__ iou) {
  const int64_t n = static_cast<int64_t>(blockIdx.x) * kFinalizeThreads + threadIdx.x;
  if (n >= N) return;
  const int64_t pick = static_cast<int64_t>(packed[n]);
  const int64_t best = static_cast<int64_t>(packed[N + n]);
  const int64_t a = insloc::candidate_index(pick > 0 ? pick : best);
  const float bx1 = gt[4 * n], by1 = gt[4 * n + 1], bx2 = gt[4 * n + 2], by2 = gt[4 * n + 3];
  const float ax1 = anchors[4 * a], ay1 = anchors[4 * a + 1], ax2 = anchors[4 * a + 2], ay2 = anchors[4 * a + 3];
  index[n] = a;
  iou[n] = insloc::box_iou(bx1, by1, bx2, by2, insloc::box_area(bx1, by1, bx2, by2), ax1, ay1, ax2, ay2,
                           insloc::box_area(ax1, ay1, ax2, ay2));
}

std::tuple<at::Tensor, at::Tensor> sample_anchor_boxes_cuda(const at::Tensor& gt_boxes, const at::Tensor& anchors,
                                                            double iou_threshold, int64_t seed) {
  insloc::check_sample_anchor_boxes_args(gt_boxes, anchors, iou_threshold);
  TORCH_CHECK_VALUE(insloc::gpu::on_device(gt_boxes) && anchors.device() == gt_boxes.device(),
                    "gt_boxes and anchors must be on the same CUDA device");
  const int64_t N = gt_boxes.size(0), A = anchors.size(0);
  TORCH_CHECK_VALUE((N + kBoxesPerBlock - 1) / kBoxesPerBlock <= 0x7fffffff, "gt_boxes has too many rows: ", N);
  const insloc::gpu::DeviceGuard guard(gt_boxes.device());
  auto index = at::empty({N}, gt_boxes.options().dtype(at::kLong));  // [N]
  auto iou = at::empty({N}, gt_boxes.options().dtype(at::kFloat));   // [N]
  if (N == 0) return {index, iou};

  const auto gt = gt_boxes.to(at::kFloat).contiguous();  // [N, 4]
  const auto anc = anchors.to(at::kFloat).contiguous();  // [A, 4]
  auto packed = at::zeros({2, N}, gt_boxes.options().dtype(at::kLong));  // [2, N]
  const auto stream = insloc::gpu::current_stream();

  const int sms = insloc::gpu::sm_count(gt_boxes.device().index());
  const int64_t groups = (N + kBoxesPerBlock - 1) / kBoxesPerBlock;
  // Split the anchors into enough ranges to give every SM several blocks, each at least kThreads anchors.
  const int64_t target = 8 * static_cast<int64_t>(std::max(sms, 1));
  int64_t ranges = std::max<int64_t>(1, std::min<int64_t>({(target + groups - 1) / groups,
                                                          (A + kThreads - 1) / kThreads, 65535}));
  const int64_t span = ((A + ranges - 1) / ranges + kThreads - 1) / kThreads * kThreads;
  ranges = (A + span - 1) / span;
  const dim3 grid(static_cast<unsigned>(groups), static_cast<unsigned>(ranges));
  INSLOC_LAUNCH(grid, kThreads, 0, stream, scan_anchors_kernel)(
      gt.const_data_ptr<float>(), anc.const_data_ptr<float>(), N, A, static_cast<float>(iou_threshold),
      insloc::seed_key(seed), span, reinterpret_cast<unsigned long long*>(packed.mutable_data_ptr<int64_t>()));
  INSLOC_LAUNCH_CHECK();
  const unsigned finalize_blocks = static_cast<unsigned>((N + kFinalizeThreads - 1) / kFinalizeThreads);
  INSLOC_LAUNCH(finalize_blocks, kFinalizeThreads, 0, stream, finalize_kernel)(
      gt.const_data_ptr<float>(), anc.const_data_ptr<float>(),
      reinterpret_cast<const unsigned long long*>(packed.const_data_ptr<int64_t>()), N,
      index.mutable_data_ptr<int64_t>(), iou.mutable_data_ptr<float>());
  INSLOC_LAUNCH_CHECK();
  return {index, iou};
}

}  // namespace

INSLOC_CUDA_LIBRARY_IMPL(m) {
  m.impl("sample_anchor_boxes", &sample_anchor_boxes_cuda);
}
