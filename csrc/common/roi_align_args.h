// Host-side argument checks of roi_align_multilevel shared by the CPU and CUDA entry points, so that a
// direct torch.ops call with malformed arguments fails with a message instead of reading out of bounds.
// (The Python API validates first; these are the last line.)
#pragma once

#include <ATen/core/Tensor.h>
#include <c10/util/Exception.h>

#include <cstdint>
#include <optional>
#include <vector>

#include "common/roi_align.h"

namespace insloc {

inline void check_roi_align_rois(const at::Tensor& rois, const std::optional<at::Tensor>& levels,
                                 int64_t num_levels, size_t num_scales) {
  TORCH_CHECK(num_levels > 0, "roi_align_multilevel: features must not be empty");
  TORCH_CHECK(size_t(num_levels) == num_scales, "roi_align_multilevel: spatial_scales has ", num_scales,
              " entries but there are ", num_levels, " levels");
  TORCH_CHECK(rois.dim() == 2 && rois.size(1) == 5, "roi_align_multilevel: rois must be [R, 5], got ",
              rois.sizes());
  TORCH_CHECK(rois.is_floating_point(), "roi_align_multilevel: rois must be floating point, got ",
              rois.scalar_type());
  if (levels.has_value()) {
    TORCH_CHECK(levels->dim() == 1 && levels->size(0) == rois.size(0),
                "roi_align_multilevel: levels must be [R] with R = ", rois.size(0), ", got ", levels->sizes());
    TORCH_CHECK(levels->scalar_type() == at::kLong, "roi_align_multilevel: levels must be int64, got ",
                levels->scalar_type());
    TORCH_CHECK(levels->device() == rois.device(), "roi_align_multilevel: levels must be on rois' device");
  }
}

// The pooled size and sampling ratio, which the kernels take as 32-bit ints (a direct torch.ops call is not
// checked by the Python API).
inline void check_roi_align_pool(int64_t pooled_height, int64_t pooled_width, int64_t sampling_ratio) {
  TORCH_CHECK_VALUE(pooled_height > 0 && pooled_width > 0 && pooled_height <= MAX_POOLED_SIZE &&
                        pooled_width <= MAX_POOLED_SIZE,
                    "roi_align_multilevel: output_size must be in [1, ", MAX_POOLED_SIZE, "], got ", pooled_height,
                    " x ", pooled_width);
  TORCH_CHECK_VALUE(sampling_ratio >= INT32_MIN && sampling_ratio <= MAX_ADAPTIVE_GRID,
                    "roi_align_multilevel: sampling_ratio must be at most ", MAX_ADAPTIVE_GRID,
                    " (<= 0: adaptive) and fit in 32 bits, got ", sampling_ratio);
}

inline bool is_channels_last(const at::Tensor& f) {
  return !f.is_contiguous() && f.is_contiguous(at::MemoryFormat::ChannelsLast);
}

// Checks every level against features[0] (rank, batch, channels, dtype, device, and rois' device) and
// returns them in a layout the kernels read: NCHW-contiguous or channels_last, as given when possible.
inline std::vector<at::Tensor> readable_features(at::TensorList features, const at::Tensor& rois) {
  const at::Tensor& f0 = features[0];
  TORCH_CHECK(f0.dim() == 4, "roi_align_multilevel: features[0] must be [B, C, H, W], got ", f0.sizes());
  std::vector<at::Tensor> feats;
  for (size_t l = 0; l < features.size(); ++l) {
    const at::Tensor& f = features[l];
    TORCH_CHECK(f.dim() == 4 && f.size(0) == f0.size(0) && f.size(1) == f0.size(1),
                "roi_align_multilevel: features[", l, "] must be [B, C, H, W] with B, C of features[0], got ",
                f.sizes());
    TORCH_CHECK_VALUE(f.size(2) <= INT32_MAX && f.size(3) <= INT32_MAX, "roi_align_multilevel: features[", l,
                      "] is ", f.size(2), " x ", f.size(3), " pixels; height and width must fit in 32 bits");
    TORCH_CHECK(f.scalar_type() == f0.scalar_type() && f.device() == f0.device() && rois.device() == f0.device(),
                "roi_align_multilevel: all tensors must share features[0]'s dtype and device");
    feats.push_back(f.is_contiguous() || f.is_contiguous(at::MemoryFormat::ChannelsLast) ? f : f.contiguous());
  }
  return feats;
}

// The backward's grad against the problem: [L, R, C, ph, pw] (all levels) or [R, C, ph, pw] (by level).
inline void check_roi_align_grad(const at::Tensor& grad, const at::Tensor& rois, bool by_level, int64_t L,
                                 int64_t C, at::IntArrayRef heights, at::IntArrayRef widths) {
  TORCH_CHECK(widths.size() == heights.size(), "roi_align_multilevel_backward: heights and widths differ in length");
  TORCH_CHECK(C >= 0, "roi_align_multilevel_backward: channels must be >= 0");
  const int64_t R = rois.size(0);
  TORCH_CHECK(grad.dim() == (by_level ? 4 : 5), "roi_align_multilevel_backward: grad must be ",
              by_level ? "[R, C, ph, pw]" : "[L, R, C, ph, pw]", ", got ", grad.sizes());
  TORCH_CHECK(by_level || grad.size(0) == L, "roi_align_multilevel_backward: grad has ", grad.size(0),
              " levels, expected ", L);
  TORCH_CHECK(grad.size(-4) == R && grad.size(-3) == C, "roi_align_multilevel_backward: grad must have R = ", R,
              " RoIs and C = ", C, " channels, got ", grad.sizes());
  TORCH_CHECK(grad.device() == rois.device(), "roi_align_multilevel_backward: grad and rois on different devices");
  for (size_t l = 0; l < heights.size(); ++l)
    TORCH_CHECK(heights[l] >= 0 && widths[l] >= 0 && heights[l] <= INT32_MAX && widths[l] <= INT32_MAX,
                "roi_align_multilevel_backward: level ", l, " is ", heights[l], " x ", widths[l],
                " pixels; sizes must be >= 0 and fit in 32 bits");
}

}  // namespace insloc
