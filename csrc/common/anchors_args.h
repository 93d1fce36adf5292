// Host-side argument checks of sample_anchor_boxes shared by the CPU and CUDA entry points (the device
// placement check stays with each).
#pragma once

#include <ATen/core/Tensor.h>
#include <c10/util/Exception.h>

#include <cmath>

#include "common/anchors.h"

namespace insloc {

inline void check_sample_anchor_boxes_args(const at::Tensor& gt_boxes, const at::Tensor& anchors,
                                           double iou_threshold) {
  TORCH_CHECK_VALUE(gt_boxes.dim() == 2 && gt_boxes.size(1) == 4, "gt_boxes must be [N, 4], got ",
                    gt_boxes.sizes());
  TORCH_CHECK_VALUE(anchors.dim() == 2 && anchors.size(1) == 4, "anchors must be [A, 4], got ", anchors.sizes());
  TORCH_CHECK_VALUE(gt_boxes.is_floating_point(), "gt_boxes must be floating point, got ", gt_boxes.scalar_type());
  TORCH_CHECK_VALUE(anchors.is_floating_point(), "anchors must be floating point, got ", anchors.scalar_type());
  TORCH_CHECK_VALUE(std::isfinite(iou_threshold), "iou_threshold must be finite, got ", iou_threshold);
  const int64_t N = gt_boxes.size(0), A = anchors.size(0);
  TORCH_CHECK_VALUE(A <= kMaxAnchors, "anchors must have at most ", kMaxAnchors, " rows, got ", A);
  TORCH_CHECK_VALUE(N == 0 || A > 0, "anchors must not be empty when gt_boxes is not");
}

}  // namespace insloc
