// sample_anchor_boxes on CPU: each (box, anchor range) tile streams over its anchors once, keeping the
// eligible anchor with the largest random key and the highest-IoU anchor; tiles of a box are then merged.
// Memory: O(N + A), never N x A.
#include <ATen/Parallel.h>
#include <ATen/core/Tensor.h>
#include <ATen/ops/empty.h>
#include <torch/library.h>

#include <algorithm>
#include <atomic>
#include <cmath>
#include <tuple>
#include <vector>

#include "common/anchors.h"
#include "common/anchors_args.h"

namespace {

// IoUs of this many anchors are computed in one branch-free (vectorisable) loop before the selection.
constexpr int64_t kChunk = 256;
// Below this many anchors per tile, splitting a box's anchors across threads does not pay.
constexpr int64_t kMinTileAnchors = 4096;

// Coordinates and areas of a set of boxes, one float32 array per field (x1, y1, x2, y2, area).
struct BoxesSoA {
  std::vector<float> x1, y1, x2, y2, area;
};

BoxesSoA to_soa(const at::Tensor& boxes, const char* name) {
  const auto b = boxes.to(at::kFloat).contiguous();  // [M, 4]
  const int64_t M = b.size(0);
  const float* p = b.const_data_ptr<float>();
  BoxesSoA s{std::vector<float>(M), std::vector<float>(M), std::vector<float>(M), std::vector<float>(M),
             std::vector<float>(M)};
  std::atomic<bool> non_finite{false}, reversed{false};
  at::parallel_for(0, M, 16384, [&](int64_t begin, int64_t end) {
    for (int64_t i = begin; i < end; ++i) {
      const float x1 = p[4 * i], y1 = p[4 * i + 1], x2 = p[4 * i + 2], y2 = p[4 * i + 3];
      if (!(std::isfinite(x1) && std::isfinite(y1) && std::isfinite(x2) && std::isfinite(y2))) {
        non_finite = true;
      } else if (x2 < x1 || y2 < y1) {
        reversed = true;
      }
      s.x1[i] = x1;
      s.y1[i] = y1;
      s.x2[i] = x2;
      s.y2[i] = y2;
      s.area[i] = insloc::box_area(x1, y1, x2, y2);
    }
  });
  TORCH_CHECK_VALUE(!non_finite, name, " must be finite (after conversion to float32)");
  TORCH_CHECK_VALUE(!reversed, name, " must satisfy x2 >= x1 and y2 >= y1");
  return s;
}

struct Pick {
  int64_t eligible = 0;  // packed (key, index) of the eligible anchor with the largest key; 0: none
  int64_t best = 0;      // packed (IoU bits, index) of the highest-IoU anchor, lowest index on ties
};

Pick scan_tile(const BoxesSoA& gt, int64_t n, const BoxesSoA& anc, int64_t begin, int64_t end, float threshold,
               uint32_t box_key) {
  const float bx1 = gt.x1[n], by1 = gt.y1[n], bx2 = gt.x2[n], by2 = gt.y2[n], barea = gt.area[n];
  const float* ax1 = anc.x1.data();
  const float* ay1 = anc.y1.data();
  const float* ax2 = anc.x2.data();
  const float* ay2 = anc.y2.data();
  const float* aarea = anc.area.data();
  // IoUs are >= +0, so their float bits order as int32; -1 is below every IoU.
  const int32_t threshold_bits = threshold > 0.0f ? static_cast<int32_t>(insloc::float_bits(threshold))
                                                  : (threshold == 0.0f ? 0 : -1);
  float iou[kChunk];
  float best_iou = -1.0f;
  int64_t best_index = -1;
  int32_t best_bits = -1;
  uint32_t top_key = 0;
  int64_t top_index = -1;
  for (int64_t c = begin; c < end; c += kChunk) {
    const int64_t len = std::min(kChunk, end - c);
    int32_t chunk_max = 0;
    for (int64_t i = 0; i < len; ++i) {
      const float v = insloc::box_iou(bx1, by1, bx2, by2, barea, ax1[c + i], ay1[c + i], ax2[c + i], ay2[c + i],
                                      aarea[c + i]);
      iou[i] = v;
      const int32_t b = static_cast<int32_t>(insloc::float_bits(v));
      chunk_max = b > chunk_max ? b : chunk_max;
    }
    // Most chunks hold no eligible anchor and no new maximum: skip the scalar pass over them.
    if (chunk_max <= std::min(threshold_bits, best_bits)) continue;
    for (int64_t i = 0; i < len; ++i) {
      const float v = iou[i];
      if (v > best_iou) {  // strict: ascending scan keeps the lowest index on ties
        best_iou = v;
        best_index = c + i;
      }
      if (v > threshold) {
        const uint32_t k = insloc::anchor_key(box_key, c + i);
        if (top_index < 0 || k > top_key) {
          top_key = k;
          top_index = c + i;
        }
      }
    }
    best_bits = static_cast<int32_t>(insloc::float_bits(best_iou));
  }
  Pick p;
  if (top_index >= 0) p.eligible = insloc::pack_candidate(top_key, top_index);
  if (best_index >= 0) p.best = insloc::pack_candidate(insloc::float_bits(best_iou), best_index);
  return p;
}

std::tuple<at::Tensor, at::Tensor> sample_anchor_boxes_cpu(const at::Tensor& gt_boxes, const at::Tensor& anchors,
                                                           double iou_threshold, int64_t seed) {
  insloc::check_sample_anchor_boxes_args(gt_boxes, anchors, iou_threshold);
  TORCH_CHECK_VALUE(gt_boxes.device().is_cpu() && anchors.device().is_cpu(),
                    "gt_boxes and anchors must be CPU tensors");
  const int64_t N = gt_boxes.size(0), A = anchors.size(0);
  auto index = at::empty({N}, gt_boxes.options().dtype(at::kLong));  // [N]
  auto iou = at::empty({N}, gt_boxes.options().dtype(at::kFloat));   // [N]
  if (N == 0) return {index, iou};

  const BoxesSoA gt = to_soa(gt_boxes, "gt_boxes");
  const BoxesSoA anc = to_soa(anchors, "anchors");
  const float threshold = static_cast<float>(iou_threshold);  // compared in float32, like the reference
  const uint32_t seed_key = insloc::seed_key(seed);

  // Split each box's anchors into R ranges when there are too few boxes to occupy every thread.
  const int64_t threads = at::get_num_threads();
  const int64_t R = std::max<int64_t>(
      1, std::min((4 * threads + N - 1) / N, (A + kMinTileAnchors - 1) / kMinTileAnchors));
  const int64_t span = (A + R - 1) / R;
  std::vector<Pick> tiles(N * R);  // [N, R]
  at::parallel_for(0, N * R, 1, [&](int64_t begin, int64_t end) {
    for (int64_t t = begin; t < end; ++t) {
      const int64_t n = t / R, r = t % R;
      const int64_t lo = std::min(A, r * span), hi = std::min(A, lo + span);
      tiles[t] = scan_tile(gt, n, anc, lo, hi, threshold, insloc::box_key(seed_key, n));
    }
  });

  int64_t* index_p = index.mutable_data_ptr<int64_t>();
  float* iou_p = iou.mutable_data_ptr<float>();
  for (int64_t n = 0; n < N; ++n) {
    Pick p;
    for (int64_t r = 0; r < R; ++r) {
      p.eligible = std::max(p.eligible, tiles[n * R + r].eligible);
      p.best = std::max(p.best, tiles[n * R + r].best);
    }
    const int64_t a = insloc::candidate_index(p.eligible ? p.eligible : p.best);
    index_p[n] = a;
    iou_p[n] = insloc::box_iou(gt.x1[n], gt.y1[n], gt.x2[n], gt.y2[n], gt.area[n], anc.x1[a], anc.y1[a], anc.x2[a],
                               anc.y2[a], anc.area[a]);
  }
  return {index, iou};
}

}  // namespace

TORCH_LIBRARY_IMPL(insloc_ops, CPU, m) {
  m.impl("sample_anchor_boxes", &sample_anchor_boxes_cpu);
}
