// Multi-level RoIAlign on CPU. Per (level, RoI) the samples of every bin are folded, once, into
// per-axis pixel weights (RoIAlign's weights are a y factor times an x factor), which every channel then
// reuses: a bin costs (span_y x span_x) multiply-adds per channel instead of 4 x grid_h x grid_w.
// Forward tasks are (level, RoI); backward tasks are (level, image, channel block), each owning its
// slice of the gradient, so the backward needs no atomics and sums in a fixed order (deterministic).
#include <ATen/Dispatch.h>
#include <ATen/OpMathType.h>
#include <ATen/Parallel.h>
#include <ATen/core/Tensor.h>
#include <ATen/ops/empty.h>
#include <torch/library.h>

#include <algorithm>
#include <atomic>
#include <climits>
#include <optional>
#include <vector>

#include "common/roi_align.h"
#include "common/roi_align_args.h"

namespace insloc {
namespace {

// For each bin of one axis of one RoI: the first pixel its samples touch and the summed bilinear weights
// of the pixels from there on, already divided by the axis' grid.
template <typename T>
struct AxisTable {
  std::vector<int> first;   // [pooled]
  std::vector<int> offset;  // [pooled + 1]: bin p's weights are w[offset[p] : offset[p + 1]]
  std::vector<T> w;
  int lo = 0, hi = -1;  // union of the spans, inclusive (hi < lo: no pixel)

  void build(const RoiAxis<T>& a, int pooled, int size) {
    first.assign(pooled, 0);
    offset.assign(pooled + 1, 0);
    w.clear();
    lo = INT_MAX;
    hi = -1;
    const T inv = a.grid > 0 ? T(1) / T(a.grid) : T(0);
    for (int p = 0; p < pooled; ++p) {
      const T origin = bin_origin(a, p);
      int s0, s1;
      valid_samples(origin, a.bin, a.grid, size, s0, s1);
      int plo = INT_MAX, phi = -1;
      AxisSample<T> sm;
      for (int s = s0; s < s1; ++s) {
        if (!axis_sample(sample_coord(origin, a.bin, s, a.grid), size, sm)) continue;
        plo = std::min(plo, sm.low);
        phi = std::max(phi, sm.high);
      }
      const int begin = int(w.size());
      if (phi >= plo) {
        w.resize(begin + (phi - plo + 1), T(0));
        T* wp = w.data() + begin - plo;
        for (int s = s0; s < s1; ++s) {
          if (!axis_sample(sample_coord(origin, a.bin, s, a.grid), size, sm)) continue;
          wp[sm.low] += sm.w_low * inv;
          wp[sm.high] += sm.w_high * inv;
        }
        first[p] = plo;
        lo = std::min(lo, plo);
        hi = std::max(hi, phi);
      }
      offset[p + 1] = int(w.size());
    }
  }
  int count(int p) const { return offset[p + 1] - offset[p]; }
  const T* weights(int p) const { return w.data() + offset[p]; }
};

template <typename acc_t>
struct Level {
  const void* data;
  int64_t H, W;
  acc_t scale;
  bool channels_last;
};

// Runs fn(task) for task in [0, n) on the intra-op pool, handing out tasks one at a time: levels differ
// in cost by 16x, so a static split of the range would leave a thread idle.
template <typename F>
void parallel_tasks(int64_t n, const F& fn) {
  if (n <= 0) return;
  std::atomic<int64_t> next{0};
  const int64_t workers = std::min<int64_t>(at::get_num_threads(), n);
  at::parallel_for(0, workers, 1, [&](int64_t, int64_t) {
    for (int64_t t = next++; t < n; t = next++) fn(t);
  });
}

template <typename T>
struct RoiTables {
  AxisTable<T> y, x;  // weights carry 1 / grid each: their product is torchvision's 1 / count
  int batch;
};

// Geometry of RoI r on a level; false if the RoI names no image of the batch.
template <typename T>
bool build_tables(RoiTables<T>& t, const T* roi, const Level<T>& lv, int64_t batch_size, int ph, int pw,
                  int sampling_ratio, bool aligned) {
  t.batch = roi_batch(roi[0], int(std::min<int64_t>(batch_size, INT_MAX)));
  if (t.batch < 0) return false;
  const RoiAxis<T> ay = roi_axis(roi[2], roi[4], lv.scale, aligned, ph, sampling_ratio);
  const RoiAxis<T> ax = roi_axis(roi[1], roi[3], lv.scale, aligned, pw, sampling_ratio);
  t.y.build(ay, ph, int(lv.H));
  t.x.build(ax, pw, int(lv.W));
  return true;
}

template <typename scalar_t, typename T>
void forward_one(const RoiTables<T>& t, const Level<T>& lv, int64_t C, int ph, int pw, scalar_t* out,
                 std::vector<T>& scratch) {
  const int64_t H = lv.H, W = lv.W;
  const scalar_t* f = static_cast<const scalar_t*>(lv.data);
  const int64_t bins = int64_t(ph) * pw;
  if (!lv.channels_last) {
    const int rows = t.y.hi - t.y.lo + 1;
    if (rows <= 0 || t.x.hi < t.x.lo) {
      std::fill(out, out + C * bins, scalar_t(0));
      return;
    }
    // x-pooled rows first, shared by the bins of neighbouring y bins: rx[row][q].
    scratch.resize(size_t(rows) * pw);
    for (int64_t c = 0; c < C; ++c) {
      const scalar_t* plane = f + (t.batch * C + c) * H * W;
      for (int i = 0; i < rows; ++i) {
        const scalar_t* row = plane + (t.y.lo + i) * W;
        for (int q = 0; q < pw; ++q) {
          const T* wx = t.x.weights(q);
          const scalar_t* px = row + t.x.first[q];
          T acc = 0;
          for (int m = 0, n = t.x.count(q); m < n; ++m) acc += wx[m] * T(px[m]);
          scratch[size_t(i) * pw + q] = acc;
        }
      }
      scalar_t* o = out + c * bins;
      for (int p = 0; p < ph; ++p) {
        const T* wy = t.y.weights(p);
        const int n = t.y.count(p);
        const T* rx = scratch.data() + size_t(t.y.first[p] - t.y.lo) * pw;
        for (int q = 0; q < pw; ++q) {
          T acc = 0;
          for (int k = 0; k < n; ++k) acc += wy[k] * rx[size_t(k) * pw + q];
          o[p * pw + q] = scalar_t(acc);
        }
      }
    }
    return;
  }
  // channels_last: every pixel is a contiguous run of C values; accumulate a bin for all channels at once.
  scratch.resize(C);
  T* acc = scratch.data();
  const scalar_t* img = f + t.batch * H * W * C;
  for (int p = 0; p < ph; ++p) {
    const T* wy = t.y.weights(p);
    for (int q = 0; q < pw; ++q) {
      const T* wx = t.x.weights(q);
      std::fill(acc, acc + C, T(0));
      for (int k = 0, ny = t.y.count(p); k < ny; ++k) {
        for (int m = 0, nx = t.x.count(q); m < nx; ++m) {
          const T w = wy[k] * wx[m];
          const scalar_t* px = img + ((t.y.first[p] + k) * W + t.x.first[q] + m) * C;
          for (int64_t c = 0; c < C; ++c) acc[c] += w * T(px[c]);
        }
      }
      for (int64_t c = 0; c < C; ++c) out[c * bins + p * pw + q] = scalar_t(acc[c]);
    }
  }
}

// Adds RoI r's gradient (channels [c0, c1)) into its image's gradient on one level. g: grad[r], [C, ph, pw].
template <typename scalar_t, typename T>
void backward_one(const RoiTables<T>& t, const scalar_t* g, int64_t C, int64_t c0, int64_t c1, int64_t H,
                  int64_t W, bool channels_last, int ph, int pw, T* grad_img, std::vector<T>& scratch) {
  const int64_t bins = int64_t(ph) * pw;
  const int rows = t.y.hi - t.y.lo + 1;
  if (rows <= 0 || t.x.hi < t.x.lo) return;
  if (!channels_last) {
    // y-spread first: u[row][q] = sum over bins p of wy_p(row) * g[p][q], then spread along x.
    scratch.resize(size_t(rows) * pw);
    for (int64_t c = c0; c < c1; ++c) {
      const scalar_t* gc = g + c * bins;
      std::fill(scratch.begin(), scratch.end(), T(0));
      for (int p = 0; p < ph; ++p) {
        const T* wy = t.y.weights(p);
        T* u = scratch.data() + size_t(t.y.first[p] - t.y.lo) * pw;
        for (int k = 0, n = t.y.count(p); k < n; ++k)
          for (int q = 0; q < pw; ++q) u[size_t(k) * pw + q] += wy[k] * T(gc[p * pw + q]);
      }
      T* plane = grad_img + c * H * W;
      for (int i = 0; i < rows; ++i) {
        T* row = plane + (t.y.lo + i) * W;
        const T* u = scratch.data() + size_t(i) * pw;
        for (int q = 0; q < pw; ++q) {
          const T* wx = t.x.weights(q);
          T* px = row + t.x.first[q];
          const T uq = u[q];
          for (int m = 0, n = t.x.count(q); m < n; ++m) px[m] += uq * wx[m];
        }
      }
    }
    return;
  }
  const int64_t nc = c1 - c0;
  scratch.resize(size_t(bins * nc));
  for (int64_t c = 0; c < nc; ++c)  // [bins, nc]: channel-contiguous like the gradient
    for (int64_t b = 0; b < bins; ++b) scratch[size_t(b * nc + c)] = T(g[(c0 + c) * bins + b]);
  for (int p = 0; p < ph; ++p) {
    const T* wy = t.y.weights(p);
    for (int q = 0; q < pw; ++q) {
      const T* wx = t.x.weights(q);
      const T* gb = scratch.data() + size_t((p * pw + q) * nc);
      for (int k = 0, ny = t.y.count(p); k < ny; ++k) {
        for (int m = 0, nx = t.x.count(q); m < nx; ++m) {
          const T w = wy[k] * wx[m];
          T* px = grad_img + ((t.y.first[p] + k) * W + t.x.first[q] + m) * C + c0;
          for (int64_t c = 0; c < nc; ++c) px[c] += w * gb[c];
        }
      }
    }
  }
}

// The rois are on the host here, so an out-of-range batch index or level (NaN included) is an error, after the
// conversion to the kernels' coordinate type, as the kernels would read it. (The CUDA kernels, which could only
// check with a device sync, pool zeros for such a row; the public Python function checks CPU tensors itself,
// but not under torch.compile or torch.func transforms, which reach this.)
template <typename T>
void check_roi_indices(const T* rp, const int64_t* lv, int64_t R, int64_t B, int64_t L) {
  for (int64_t r = 0; r < R; ++r) {
    TORCH_CHECK_VALUE(roi_batch(rp[r * 5], int(std::min<int64_t>(B, INT_MAX))) >= 0, "roi_align_multilevel: rois[",
                      r, ", 0] (batch index) must lie in [0, ", B, "), got ", double(rp[r * 5]));
    TORCH_CHECK_VALUE(lv == nullptr || (lv[r] >= 0 && lv[r] < L), "roi_align_multilevel: levels[", r,
                      "] must lie in [0, ", L, "), got ", lv == nullptr ? 0 : lv[r]);
  }
}

at::Tensor roi_align_multilevel_cpu(at::TensorList features, const at::Tensor& rois,
                                    const std::optional<at::Tensor>& levels, at::ArrayRef<double> spatial_scales,
                                    int64_t pooled_height, int64_t pooled_width, int64_t sampling_ratio,
                                    bool aligned) {
  const int64_t L = int64_t(features.size());
  check_roi_align_rois(rois, levels, L, spatial_scales.size());
  check_roi_align_pool(pooled_height, pooled_width, sampling_ratio);
  TORCH_CHECK(rois.device().is_cpu(), "roi_align_multilevel (CPU): tensors must be on CPU");
  const std::vector<at::Tensor> feats = readable_features(features, rois);
  const at::Tensor& f0 = feats[0];
  const int64_t B = f0.size(0), C = f0.size(1), R = rois.size(0);
  const int ph = int(pooled_height), pw = int(pooled_width);
  const bool by_level = levels.has_value();
  at::Tensor out = by_level ? at::empty({R, C, ph, pw}, f0.options())
                            : at::empty({L, R, C, ph, pw}, f0.options());
  if (out.numel() == 0) return out;

  AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, f0.scalar_type(), "roi_align_multilevel_cpu", [&] {
    using T = at::opmath_type<scalar_t>;
    const at::Tensor r = rois.to(c10::CppTypeToScalarType<T>::value).contiguous();
    const T* rp = r.data_ptr<T>();
    at::Tensor lv_t = by_level ? levels->contiguous() : at::Tensor();
    const int64_t* lv = by_level ? lv_t.data_ptr<int64_t>() : nullptr;
    check_roi_indices(rp, lv, R, B, L);
    std::vector<Level<T>> lvls;
    for (int64_t l = 0; l < L; ++l)
      lvls.push_back({feats[l].data_ptr(), feats[l].size(2), feats[l].size(3), T(spatial_scales[l]),
                      is_channels_last(feats[l])});
    scalar_t* op = out.data_ptr<scalar_t>();
    const int64_t per_roi = C * ph * pw;
    // Tasks: (RoI, level) with the level fastest, so neighbouring tasks mix cheap and expensive levels.
    const int64_t n = by_level ? R : R * L;
    parallel_tasks(n, [&](int64_t task) {
      thread_local RoiTables<T> t;
      thread_local std::vector<T> scratch;
      const int64_t roi = by_level ? task : task / L;
      const int64_t l = by_level ? lv[roi] : task % L;
      scalar_t* o = op + (by_level ? roi : l * R + roi) * per_roi;
      if (l < 0 || l >= L || !build_tables(t, rp + roi * 5, lvls[l], B, ph, pw, int(sampling_ratio), aligned)) {
        std::fill(o, o + per_roi, scalar_t(0));
        return;
      }
      forward_one<scalar_t, T>(t, lvls[l], C, ph, pw, o, scratch);
    });
  });
  return out;
}

std::vector<at::Tensor> roi_align_multilevel_backward_cpu(
    const at::Tensor& grad, const at::Tensor& rois, const std::optional<at::Tensor>& levels,
    at::ArrayRef<double> spatial_scales, int64_t sampling_ratio, bool aligned, int64_t batch_size,
    int64_t channels, at::IntArrayRef heights, at::IntArrayRef widths, bool channels_last) {
  const int64_t L = int64_t(heights.size());
  check_roi_align_rois(rois, levels, L, spatial_scales.size());
  const bool by_level = levels.has_value();
  const int64_t R = rois.size(0), B = batch_size, C = channels;
  TORCH_CHECK(B >= 0, "roi_align_multilevel_backward: batch_size must be >= 0");
  check_roi_align_grad(grad, rois, by_level, L, C, heights, widths);
  check_roi_align_pool(grad.size(-2), grad.size(-1), sampling_ratio);
  TORCH_CHECK(grad.device().is_cpu(), "roi_align_multilevel_backward (CPU): tensors must be on CPU");
  const int ph = int(grad.size(-2)), pw = int(grad.size(-1));
  const auto fmt = channels_last ? at::MemoryFormat::ChannelsLast : at::MemoryFormat::Contiguous;
  const bool reduced = grad.scalar_type() == at::kHalf || grad.scalar_type() == at::kBFloat16;
  const auto acc_opts = grad.options().dtype(reduced ? at::kFloat : grad.scalar_type());
  std::vector<at::Tensor> acc;
  for (int64_t l = 0; l < L; ++l) acc.push_back(at::empty({B, C, heights[l], widths[l]}, acc_opts.memory_format(fmt)));

  AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, grad.scalar_type(), "roi_align_multilevel_backward_cpu", [&] {
    using T = at::opmath_type<scalar_t>;
    const at::Tensor g = grad.contiguous();
    const scalar_t* gp = g.data_ptr<scalar_t>();
    const at::Tensor r = rois.to(c10::CppTypeToScalarType<T>::value).contiguous();
    const T* rp = r.data_ptr<T>();
    at::Tensor lv_t = by_level ? levels->contiguous() : at::Tensor();
    const int64_t* lv = by_level ? lv_t.data_ptr<int64_t>() : nullptr;
    check_roi_indices(rp, lv, R, B, L);
    std::vector<Level<T>> lvls;
    for (int64_t l = 0; l < L; ++l) lvls.push_back({nullptr, heights[l], widths[l], T(spatial_scales[l]), channels_last});
    // Channel blocks only when (level, image) pairs are too few to keep every thread busy.
    const int64_t want = 16 * int64_t(at::get_num_threads());
    const int64_t nblk = std::max<int64_t>(1, std::min<int64_t>(C, (want + L * B - 1) / std::max<int64_t>(L * B, 1)));
    const int64_t cblk = C > 0 ? (C + nblk - 1) / nblk : 0;
    const int64_t per_roi = C * ph * pw;
    parallel_tasks(L * B * nblk, [&](int64_t task) {
      thread_local RoiTables<T> t;
      thread_local std::vector<T> scratch;
      const int64_t l = task % L;  // level fastest: mixes cheap and expensive tasks
      const int64_t b = (task / L) % B;
      const int64_t blk = task / (L * B);
      const int64_t c0 = blk * cblk, c1 = std::min(C, c0 + cblk);
      if (c0 >= c1) return;
      const int64_t H = heights[l], W = widths[l];
      T* img = acc[l].data_ptr<T>() + b * C * H * W;
      if (channels_last) {
        for (int64_t px = 0; px < H * W; ++px) std::fill(img + px * C + c0, img + px * C + c1, T(0));
      } else {
        std::fill(img + c0 * H * W, img + c1 * H * W, T(0));
      }
      for (int64_t roi = 0; roi < R; ++roi) {
        if (by_level && lv[roi] != l) continue;
        if (roi_batch(rp[roi * 5], int(std::min<int64_t>(B, INT_MAX))) != b) continue;
        if (!build_tables(t, rp + roi * 5, lvls[l], B, ph, pw, int(sampling_ratio), aligned)) continue;
        const scalar_t* groi = gp + (by_level ? roi : l * R + roi) * per_roi;
        backward_one<scalar_t, T>(t, groi, C, c0, c1, H, W, channels_last, ph, pw, img, scratch);
      }
    });
  });
  if (reduced)
    for (auto& a : acc) a = a.to(grad.scalar_type());
  return acc;
}

}  // namespace
}  // namespace insloc

TORCH_LIBRARY_IMPL(insloc_ops, CPU, m) {
  m.impl("roi_align_multilevel", &insloc::roi_align_multilevel_cpu);
  m.impl("roi_align_multilevel_backward", &insloc::roi_align_multilevel_backward_cpu);
}
