// Multi-level RoIAlign on CUDA: one launch covers every level in both modes, forward and backward.
// A thread computes one bin of a (level, RoI) pair for a few channels with torchvision's per-sample loop,
// limited to the samples that fall on the map (csrc/common/roi_align.h): NCHW levels give each thread up
// to kMaxChannelsPerThread channels (see channels_per_thread), so that the bin's geometry and
// each sample's weights and offsets are worked out once for all of them. When the first level is
// channels_last, threads take one channel each, with the channel fastest across threads so that a warp
// reads contiguous memory (a level of the other layout in the same call is read with its own strides).
// Backward: float atomics into an fp32 (fp64 for double) buffer; under
// torch.use_deterministic_algorithms a gather-free, atomic-free variant instead, where each thread owns
// one channel of a band of rows of one image's gradient and adds every RoI's contributions in a fixed
// order (no per-sample buffers). Further down, opt-in separable kernels (forward, backward, deterministic
// backward) that tabulate a RoI's per-axis weights once per block.
#include <ATen/Context.h>
#include <ATen/Dispatch.h>
#include <ATen/OpMathType.h>
#include <ATen/core/Tensor.h>
#include <ATen/ops/empty.h>

#include <algorithm>
#include <cstdlib>
#include <cstring>
#include <optional>
#include <vector>

#include "common/roi_align.h"
#include "common/roi_align_args.h"
#include "cuda/runtime.h"

namespace insloc {
namespace {

constexpr int kThreads = 256;
constexpr int kMaxChannelsPerThread = 8;
constexpr int kRowsPerThread = 16;  // deterministic backward: rows of one channel a thread owns

// Passed by value: the level table lives in the kernel's parameter space, so there is no copy to make.
template <typename ptr_t, typename T>
struct LevelTable {
  ptr_t data[MAX_LEVELS];
  int H[MAX_LEVELS];
  int W[MAX_LEVELS];
  T scale[MAX_LEVELS];
  bool channels_last[MAX_LEVELS];
  int num;
};

struct Problem {
  int64_t R, C, pairs;
  int B, ph, pw, sampling_ratio;
  bool aligned, by_level;
};

__device__ __forceinline__ int64_t pixel_offset(bool cl, int64_t b, int64_t c, int64_t C, int H, int W, int i, int j) {
  return cl ? ((b * H + i) * W + j) * C + c : ((b * C + c) * H + i) * W + j;
}

// (pair, channel slot, p, q) of a flat thread index over pairs x slots x bins; the slot varies fastest when
// channel_fastest.
__device__ __forceinline__ void decode(int64_t idx, const Problem& pr, int64_t slots, bool channel_fastest,
                                      int64_t& pair, int64_t& c, int& p, int& q) {
  if (channel_fastest) {
    c = idx % slots;
    int64_t t = idx / slots;
    q = int(t % pr.pw);
    t /= pr.pw;
    p = int(t % pr.ph);
    pair = t / pr.ph;
  } else {
    q = int(idx % pr.pw);
    int64_t t = idx / pr.pw;
    p = int(t % pr.ph);
    t /= pr.ph;
    c = t % slots;
    pair = t / slots;
  }
}

template <typename T>
struct BinGeometry {
  int level, batch;
  RoiAxis<T> y, x;
  T y0, x0;  // origins of this bin
  int sy0, sy1, sx0, sx1;
};

// False when the RoI's level or batch index names nothing: the output is then zero.
template <typename ptr_t, typename T>
__device__ __forceinline__ bool bin_geometry(const LevelTable<ptr_t, T>& lv, const T* rois, const int64_t* levels,
                                             const Problem& pr, int64_t pair, int p, int q, BinGeometry<T>& g) {
  const int64_t r = pr.by_level ? pair : pair % pr.R;
  const int64_t l = pr.by_level ? levels[r] : pair / pr.R;
  if (l < 0 || l >= lv.num) return false;
  g.level = int(l);
  const T* roi = rois + r * 5;
  g.batch = roi_batch(roi[0], pr.B);
  if (g.batch < 0) return false;
  g.y = roi_axis(roi[2], roi[4], lv.scale[l], pr.aligned, pr.ph, pr.sampling_ratio);
  g.x = roi_axis(roi[1], roi[3], lv.scale[l], pr.aligned, pr.pw, pr.sampling_ratio);
  g.y0 = bin_origin(g.y, p);
  g.x0 = bin_origin(g.x, q);
  valid_samples(g.y0, g.y.bin, g.y.grid, lv.H[l], g.sy0, g.sy1);
  valid_samples(g.x0, g.x.bin, g.x.grid, lv.W[l], g.sx0, g.sx1);
  return true;
}

// visit(ys, xs) for every sample of the bin that lies on the map (the others add nothing).
template <typename T, typename Visit>
__device__ __forceinline__ void for_each_sample(const BinGeometry<T>& g, int H, int W, Visit&& visit) {
  for (int sy = g.sy0; sy < g.sy1; ++sy) {
    AxisSample<T> ys;
    if (!axis_sample(sample_coord(g.y0, g.y.bin, sy, g.y.grid), H, ys)) continue;
    for (int sx = g.sx0; sx < g.sx1; ++sx) {
      AxisSample<T> xs;
      if (!axis_sample(sample_coord(g.x0, g.x.bin, sx, g.x.grid), W, xs)) continue;
      visit(ys, xs);
    }
  }
}

// Threads: pairs x slots x bins, slot s covering channels [s * cpt, s * cpt + cpt) (cpt = 1 when
// channel_fastest). The loops over the channels are unrolled to kMaxChannelsPerThread and predicated.
template <typename scalar_t, typename T>
__global__ void __launch_bounds__(kThreads) roi_align_forward_kernel(
    LevelTable<const scalar_t*, T> lv, const T* __restrict__ rois, const int64_t* __restrict__ levels, Problem pr,
    bool channel_fastest, int cpt, int64_t total, scalar_t* __restrict__ out) {
  const int64_t slots = (pr.C + cpt - 1) / cpt;
  for (int64_t idx = blockIdx.x * int64_t(blockDim.x) + threadIdx.x; idx < total;
       idx += int64_t(gridDim.x) * blockDim.x) {
    int64_t pair, slot;
    int p, q;
    decode(idx, pr, slots, channel_fastest, pair, slot, p, q);
    const int64_t c0 = slot * cpt;
    const int nc = int(pr.C - c0 < cpt ? pr.C - c0 : cpt);
    BinGeometry<T> g;
    T sum[kMaxChannelsPerThread];
#pragma unroll
    for (int j = 0; j < kMaxChannelsPerThread; ++j) sum[j] = T(0);
    T inv = T(0);  // zero output where the RoI's level or batch index names nothing
    if (bin_geometry(lv, rois, levels, pr, pair, p, q, g)) {
      const int H = lv.H[g.level], W = lv.W[g.level];
      const bool cl = lv.channels_last[g.level];
      const int64_t cs = cl ? 1 : int64_t(H) * W;  // channel stride
      const scalar_t* f = lv.data[g.level];
      for_each_sample(g, H, W, [&](const AxisSample<T>& ys, const AxisSample<T>& xs) {
        const int64_t o1 = pixel_offset(cl, g.batch, c0, pr.C, H, W, ys.low, xs.low);
        const int64_t o2 = pixel_offset(cl, g.batch, c0, pr.C, H, W, ys.low, xs.high);
        const int64_t o3 = pixel_offset(cl, g.batch, c0, pr.C, H, W, ys.high, xs.low);
        const int64_t o4 = pixel_offset(cl, g.batch, c0, pr.C, H, W, ys.high, xs.high);
        const T w1 = ys.w_low * xs.w_low, w2 = ys.w_low * xs.w_high, w3 = ys.w_high * xs.w_low,
                w4 = ys.w_high * xs.w_high;
#pragma unroll
        for (int j = 0; j < kMaxChannelsPerThread; ++j) {
          if (j < nc) {
            const scalar_t* fj = f + j * cs;
            sum[j] += w1 * static_cast<T>(fj[o1]) + w2 * static_cast<T>(fj[o2]) + w3 * static_cast<T>(fj[o3]) +
                      w4 * static_cast<T>(fj[o4]);
          }
        }
      });
      inv = inv_count<T>(g.y.grid, g.x.grid);
    }
    scalar_t* o = out + ((pair * pr.C + c0) * pr.ph + p) * pr.pw + q;
    const int64_t bins = int64_t(pr.ph) * pr.pw;
#pragma unroll
    for (int j = 0; j < kMaxChannelsPerThread; ++j)
      if (j < nc) o[j * bins] = static_cast<scalar_t>(sum[j] * inv);
  }
}

template <typename scalar_t, typename T>
__global__ void __launch_bounds__(kThreads) roi_align_backward_atomic_kernel(
    LevelTable<T*, T> lv, const T* __restrict__ rois, const int64_t* __restrict__ levels, Problem pr,
    bool channel_fastest, int cpt, int64_t total, const scalar_t* __restrict__ grad) {
  const int64_t slots = (pr.C + cpt - 1) / cpt;
  for (int64_t idx = blockIdx.x * int64_t(blockDim.x) + threadIdx.x; idx < total;
       idx += int64_t(gridDim.x) * blockDim.x) {
    int64_t pair, slot;
    int p, q;
    decode(idx, pr, slots, channel_fastest, pair, slot, p, q);
    const int64_t c0 = slot * cpt;
    const int nc = int(pr.C - c0 < cpt ? pr.C - c0 : cpt);
    BinGeometry<T> g;
    if (!bin_geometry(lv, rois, levels, pr, pair, p, q, g)) continue;
    const T inv = inv_count<T>(g.y.grid, g.x.grid);
    const scalar_t* gr = grad + ((pair * pr.C + c0) * pr.ph + p) * pr.pw + q;
    const int64_t bins = int64_t(pr.ph) * pr.pw;
    T gv[kMaxChannelsPerThread];
#pragma unroll
    for (int j = 0; j < kMaxChannelsPerThread; ++j) gv[j] = j < nc ? static_cast<T>(gr[j * bins]) * inv : T(0);
    const int H = lv.H[g.level], W = lv.W[g.level];
    const bool cl = lv.channels_last[g.level];
    const int64_t cs = cl ? 1 : int64_t(H) * W;
    T* gf = lv.data[g.level];
    for_each_sample(g, H, W, [&](const AxisSample<T>& ys, const AxisSample<T>& xs) {
      const int64_t o1 = pixel_offset(cl, g.batch, c0, pr.C, H, W, ys.low, xs.low);
      const int64_t o2 = pixel_offset(cl, g.batch, c0, pr.C, H, W, ys.low, xs.high);
      const int64_t o3 = pixel_offset(cl, g.batch, c0, pr.C, H, W, ys.high, xs.low);
      const int64_t o4 = pixel_offset(cl, g.batch, c0, pr.C, H, W, ys.high, xs.high);
#pragma unroll
      for (int j = 0; j < kMaxChannelsPerThread; ++j) {
        if (j < nc) {
          T* gj = gf + j * cs;
          atomicAdd(gj + o1, gv[j] * ys.w_low * xs.w_low);
          atomicAdd(gj + o2, gv[j] * ys.w_low * xs.w_high);
          atomicAdd(gj + o3, gv[j] * ys.w_high * xs.w_low);
          atomicAdd(gj + o4, gv[j] * ys.w_high * xs.w_high);
        }
      }
    });
  }
}

// Whether RoI r (at `roi`) pools from level l of image b and its samples there can touch rows [row0, row1)
// (a sample at y touches rows floor(y) and floor(y) + 1, clamped to the map), from its first and last sample
// rows; NaN extents cannot. ay: the RoI's y axis on that level.
template <typename ptr_t, typename T>
__device__ __forceinline__ bool roi_meets_rows(const LevelTable<ptr_t, T>& lv, const T* roi, const int64_t* levels,
                                               const Problem& pr, int64_t r, int l, int b, int row0, int row1,
                                               RoiAxis<T>& ay) {
  if (pr.by_level && levels[r] != l) return false;
  if (roi_batch(roi[0], pr.B) != b) return false;
  ay = roi_axis(roi[2], roi[4], lv.scale[l], pr.aligned, pr.ph, pr.sampling_ratio);
  if (ay.grid <= 0) return false;
  const T ya = sample_coord(bin_origin(ay, 0), ay.bin, 0, ay.grid);
  const T yb = sample_coord(bin_origin(ay, pr.ph - 1), ay.bin, ay.grid - 1, ay.grid);
  const T ylo = ya < yb ? ya : yb, yhi = ya < yb ? yb : ya;
  return ylo <= T(row1) && yhi >= T(row0 - 2);
}

// Deterministic backward: thread (level, image, band of kRowsPerThread rows, channel) with the channel
// fastest. It visits RoIs, bins and samples in a fixed order and adds only into its own rows, so every
// gradient element is one thread's fixed-order sum: bitwise repeatable, no atomics, no extra memory.
template <typename scalar_t, typename T>
__global__ void __launch_bounds__(kThreads) roi_align_backward_deterministic_kernel(
    LevelTable<T*, T> lv, const T* __restrict__ rois, const int64_t* __restrict__ levels, Problem pr, int bands,
    int64_t total, const scalar_t* __restrict__ grad) {
  for (int64_t idx = blockIdx.x * int64_t(blockDim.x) + threadIdx.x; idx < total;
       idx += int64_t(gridDim.x) * blockDim.x) {
    const int64_t c = idx % pr.C;
    int64_t t = idx / pr.C;
    const int band = int(t % bands);
    t /= bands;
    const int b = int(t % pr.B);
    const int l = int(t / pr.B);
    const int H = lv.H[l], W = lv.W[l];
    const int row0 = band * kRowsPerThread;
    const int row1 = min(H, row0 + kRowsPerThread);
    if (row0 >= row1) continue;
    const bool cl = lv.channels_last[l];
    T* gf = lv.data[l];
    for (int64_t r = 0; r < pr.R; ++r) {
      const T* roi = rois + r * 5;
      RoiAxis<T> ay;
      if (!roi_meets_rows(lv, roi, levels, pr, r, l, b, row0, row1, ay)) continue;
      const RoiAxis<T> ax = roi_axis(roi[1], roi[3], lv.scale[l], pr.aligned, pr.pw, pr.sampling_ratio);
      const T inv = inv_count<T>(ay.grid, ax.grid);
      const int64_t pair = pr.by_level ? r : l * pr.R + r;
      const scalar_t* gr = grad + (pair * pr.C + c) * pr.ph * pr.pw;
      for (int p = 0; p < pr.ph; ++p) {
        const T y0 = bin_origin(ay, p);
        int sy0, sy1;
        valid_samples(y0, ay.bin, ay.grid, H, sy0, sy1);
        for (int sy = sy0; sy < sy1; ++sy) {
          AxisSample<T> ys;
          if (!axis_sample(sample_coord(y0, ay.bin, sy, ay.grid), H, ys)) continue;
          const bool low_in = ys.low >= row0 && ys.low < row1;
          const bool high_in = ys.high >= row0 && ys.high < row1;
          if (!low_in && !high_in) continue;
          for (int q = 0; q < pr.pw; ++q) {
            const T gv = static_cast<T>(gr[p * pr.pw + q]) * inv;
            const T x0 = bin_origin(ax, q);
            int sx0, sx1;
            valid_samples(x0, ax.bin, ax.grid, W, sx0, sx1);
            for (int sx = sx0; sx < sx1; ++sx) {
              AxisSample<T> xs;
              if (!axis_sample(sample_coord(x0, ax.bin, sx, ax.grid), W, xs)) continue;
              if (low_in) {
                gf[pixel_offset(cl, b, c, pr.C, H, W, ys.low, xs.low)] += gv * ys.w_low * xs.w_low;
                gf[pixel_offset(cl, b, c, pr.C, H, W, ys.low, xs.high)] += gv * ys.w_low * xs.w_high;
              }
              if (high_in) {
                gf[pixel_offset(cl, b, c, pr.C, H, W, ys.high, xs.low)] += gv * ys.w_high * xs.w_low;
                gf[pixel_offset(cl, b, c, pr.C, H, W, ys.high, xs.high)] += gv * ys.w_high * xs.w_high;
              }
            }
          }
        }
      }
    }
  }
}

// ------------------------------------------------------------------------------------------------
// Separable kernels (opt-in: INSLOC_OPS_CUDA_ROI_FORWARD / INSLOC_OPS_CUDA_ROI_BACKWARD = separable; they
// have not run on a GPU yet). RoIAlign's weight of feature pixel (y, x) in bin (p, q) is a y factor times an
// x factor, wy[p][y] * wx[q][x], where wy[p][y] sums the bilinear weights on row y of bin p's in-range y
// samples (a sample is skipped when either coordinate is out of range, which factors the same way). So
//   out[c][p][q] = inv * sum_y wy[p][y] * sum_x wx[q][x] * f[c][y][x]
//   grad_f[c][y][x] += inv * sum_p wy[p][y] * sum_q wx[q][x] * g[c][p][q]
// A block takes one (level-RoI pair, chunk of channels), tabulates wy and wx over the rows and columns the
// RoI touches (its footprint) in shared memory once, and then reads each footprint pixel once per output
// bin that covers it (forward) or adds each footprint pixel's gradient with one atomic (backward) instead
// of four loads or atomics per sample (about four per pixel and bin with adaptive sampling). The sums run
// in another order than torchvision's per-sample loop (rounding differs in the last bits), and a pixel is
// weighted once by its summed weight, so non-finite values can come out differently: the per-sample loop's
// inf * 1 + inf * 0 is NaN where inf * (1 + 0) is inf, and a zero weight inside a bin's span (fixed
// sampling ratios, or grids clamped at MAX_ADAPTIVE_GRID, leave gaps between samples: columns in the
// forward, rows and columns in the backward) multiplies an inf the per-sample loop never reads into NaN.
// ------------------------------------------------------------------------------------------------

// Shared memory of one block: per bin its first and last touched row (column); per footprint row (column)
// the first and last bin touching it; the dense weight tables wy [ph][cap_h] and wx [pw][cap_w] (only the
// footprint's fh x fw corner is used). cap_h, cap_w: the largest level, which bounds any footprint.
template <typename T>
struct SeparableLayout {
  int ph, pw, cap_h, cap_w;
  INSLOC_HD size_t ints() const { return 2 * (size_t(ph) + pw) + 2 * (size_t(cap_h) + cap_w); }
  INSLOC_HD size_t weights_offset() const { return (ints() * sizeof(int) + sizeof(T) - 1) / sizeof(T) * sizeof(T); }
  INSLOC_HD size_t bytes() const {
    return weights_offset() + sizeof(T) * (size_t(ph) * cap_h + size_t(pw) * cap_w);
  }
};

template <typename T>
struct Footprint {
  int level, batch, H, W;
  int y0, x0, fh, fw;  // first row and column, rows and columns (0 when the RoI touches nothing)
  T inv;
  const int *lo_y, *hi_y, *lo_x, *hi_x;     // per bin: touched rows [lo, hi] (lo > hi: none)
  const int *p_first, *p_last, *q_first, *q_last;  // per footprint row / column: bins [first, last]
  const T *wy, *wx;                          // wy[p * fh + row], wx[q * fw + column]
};

// For bin i of axis a: calls visit(sample) (its two pixels and their weights) for each in-range sample, in order.
template <typename T, typename Visit>
__device__ __forceinline__ void for_each_axis_sample(const RoiAxis<T>& a, int i, int size, Visit&& visit) {
  const T origin = bin_origin(a, i);
  int s0, s1;
  valid_samples(origin, a.bin, a.grid, size, s0, s1);
  for (int s = s0; s < s1; ++s) {
    AxisSample<T> as;
    if (axis_sample(sample_coord(origin, a.bin, s, a.grid), size, as)) visit(as);
  }
}

// Every thread of the block calls this with the same task (the result is uniform across the block). False
// when the RoI's level or batch index names nothing; fp.fh == 0 when no sample lies on the map. Ends with a
// barrier; the caller needs another before the next call overwrites the tables.
template <typename ptr_t, typename T>
__device__ bool footprint_tables(const LevelTable<ptr_t, T>& lv, const T* rois, const int64_t* levels,
                                 const Problem& pr, int64_t pair, const SeparableLayout<T>& layout,
                                 unsigned char* smem, Footprint<T>& fp) {
  const int64_t r = pr.by_level ? pair : pair % pr.R;
  const int64_t l = pr.by_level ? levels[r] : pair / pr.R;
  if (l < 0 || l >= lv.num) return false;
  const T* roi = rois + r * 5;
  fp.batch = roi_batch(roi[0], pr.B);
  if (fp.batch < 0) return false;
  fp.level = int(l);
  fp.H = lv.H[l];
  fp.W = lv.W[l];
  const RoiAxis<T> ay = roi_axis(roi[2], roi[4], lv.scale[l], pr.aligned, pr.ph, pr.sampling_ratio);
  const RoiAxis<T> ax = roi_axis(roi[1], roi[3], lv.scale[l], pr.aligned, pr.pw, pr.sampling_ratio);
  fp.inv = inv_count<T>(ay.grid, ax.grid);
  int* lo_y = reinterpret_cast<int*>(smem);
  int* hi_y = lo_y + pr.ph;
  int* lo_x = hi_y + pr.ph;
  int* hi_x = lo_x + pr.pw;
  int* p_first = hi_x + pr.pw;
  int* p_last = p_first + layout.cap_h;
  int* q_first = p_last + layout.cap_h;
  int* q_last = q_first + layout.cap_w;
  T* wy = reinterpret_cast<T*>(smem + layout.weights_offset());
  const int tid = int(threadIdx.x), nt = int(blockDim.x), bins = pr.ph + pr.pw;
  // 1. The rows (columns) each bin's samples touch.
  for (int i = tid; i < bins; i += nt) {
    const bool is_y = i < pr.ph;
    int lo = INT32_MAX, hi = -1;
    for_each_axis_sample(is_y ? ay : ax, is_y ? i : i - pr.ph, is_y ? fp.H : fp.W, [&](const AxisSample<T>& s) {
      lo = min(lo, s.low);
      hi = max(hi, s.high);
    });
    (is_y ? lo_y : lo_x)[is_y ? i : i - pr.ph] = lo;
    (is_y ? hi_y : hi_x)[is_y ? i : i - pr.ph] = hi;
  }
  __syncthreads();
  // 2. The footprint: the union of the spans (the same reads in every thread).
  int y0 = INT32_MAX, y1 = -1, x0 = INT32_MAX, x1 = -1;
  for (int p = 0; p < pr.ph; ++p) {
    y0 = min(y0, lo_y[p]);
    y1 = max(y1, hi_y[p]);
  }
  for (int q = 0; q < pr.pw; ++q) {
    x0 = min(x0, lo_x[q]);
    x1 = max(x1, hi_x[q]);
  }
  fp.fh = fp.fw = 0;
  if (y0 > y1 || x0 > x1) return true;
  fp.y0 = y0;
  fp.x0 = x0;
  fp.fh = y1 - y0 + 1;  // <= the level's height <= cap_h: spans are clamped to the map
  fp.fw = x1 - x0 + 1;
  T* wx = wy + size_t(pr.ph) * fp.fh;
  for (int i = tid; i < pr.ph * fp.fh + pr.pw * fp.fw; i += nt) wy[i] = T(0);  // wx follows wy
  __syncthreads();
  // 3. The weight tables: one thread per bin adds its samples in order (deterministic).
  for (int i = tid; i < bins; i += nt) {
    const bool is_y = i < pr.ph;
    const int k = is_y ? i : i - pr.ph;
    T* w = is_y ? wy + size_t(k) * fp.fh : wx + size_t(k) * fp.fw;
    const int base = is_y ? y0 : x0;
    for_each_axis_sample(is_y ? ay : ax, k, is_y ? fp.H : fp.W, [&](const AxisSample<T>& s) {
      w[s.low - base] += s.w_low;
      w[s.high - base] += s.w_high;
    });
  }
  // 4. Per footprint row (column), the bins whose span covers it (a contiguous run: spans are monotone).
  for (int i = tid; i < fp.fh + fp.fw; i += nt) {
    const bool is_y = i < fp.fh;
    const int v = is_y ? y0 + i : x0 + i - fp.fh;
    const int* lo = is_y ? lo_y : lo_x;
    const int* hi = is_y ? hi_y : hi_x;
    int first = INT32_MAX, last = -1;
    for (int k = 0; k < (is_y ? pr.ph : pr.pw); ++k)
      if (lo[k] <= v && v <= hi[k]) {
        first = min(first, k);
        last = max(last, k);
      }
    (is_y ? p_first : q_first)[is_y ? i : i - fp.fh] = first;
    (is_y ? p_last : q_last)[is_y ? i : i - fp.fh] = last;
  }
  __syncthreads();
  fp.lo_y = lo_y;
  fp.hi_y = hi_y;
  fp.lo_x = lo_x;
  fp.hi_x = hi_x;
  fp.p_first = p_first;
  fp.p_last = p_last;
  fp.q_first = q_first;
  fp.q_last = q_last;
  fp.wy = wy;
  fp.wx = wx;
  return true;
}

// Blocks loop over tasks (pair, chunk of channels); the task index is the same in every thread of a block.
template <typename scalar_t, typename T>
__global__ void __launch_bounds__(kThreads) roi_align_forward_separable_kernel(
    LevelTable<const scalar_t*, T> lv, const T* __restrict__ rois, const int64_t* __restrict__ levels, Problem pr,
    int chunk, int64_t chunks, SeparableLayout<T> layout, int64_t tasks, scalar_t* __restrict__ out) {
  INSLOC_DYNAMIC_SHARED(smem);
  const int64_t bins = int64_t(pr.ph) * pr.pw;
  for (int64_t task = blockIdx.x; task < tasks; task += gridDim.x) {
    const int64_t pair = task / chunks;
    const int64_t c0 = (task % chunks) * chunk;
    const int nc = int(min(int64_t(chunk), pr.C - c0));
    Footprint<T> fp;
    const bool named = footprint_tables(lv, rois, levels, pr, pair, layout, smem, fp);
    scalar_t* o = out + (pair * pr.C + c0) * bins;
    const bool cl = named && lv.channels_last[fp.level];
    // Outputs (channel, bin): the bin fastest, or the channel fastest when the level is channels_last (a warp
    // then reads consecutive channels of one pixel).
    for (int64_t e = threadIdx.x; e < nc * bins; e += blockDim.x) {
      const int c = int(cl ? e % nc : e / bins);
      const int bin = int(cl ? e / nc : e % bins);
      const int p = bin / pr.pw, q = bin % pr.pw;
      T sum = T(0);
      if (named && fp.fh > 0 && fp.lo_y[p] <= fp.hi_y[p] && fp.lo_x[q] <= fp.hi_x[q]) {
        const scalar_t* f = lv.data[fp.level] + pixel_offset(cl, fp.batch, c0 + c, pr.C, fp.H, fp.W, 0, 0);
        const int64_t ys = cl ? int64_t(fp.W) * pr.C : fp.W, xs = cl ? pr.C : 1;
        const T* wy = fp.wy + size_t(p) * fp.fh;
        const T* wx = fp.wx + size_t(q) * fp.fw;
        for (int y = fp.lo_y[p]; y <= fp.hi_y[p]; ++y) {
          if (wy[y - fp.y0] == T(0)) continue;  // a row between samples (fixed sampling ratios)
          const scalar_t* row = f + y * ys;
          T rs = T(0);
          for (int x = fp.lo_x[q]; x <= fp.hi_x[q]; ++x) rs += wx[x - fp.x0] * static_cast<T>(row[x * xs]);
          sum += wy[y - fp.y0] * rs;
        }
        sum *= fp.inv;
      }
      o[int64_t(c) * bins + bin] = static_cast<scalar_t>(sum);
    }
    __syncthreads();  // the next task overwrites the tables
  }
}

// The digits (hi, mid, lo) of flat indices start, start + stride, ... in the mixed radix (any, mid_n, lo_n),
// stepped without a division per index (a runtime 32-bit division is about 20 instructions on a GPU): each
// step adds the stride's digits with carries; a digit plus its step plus a carry stays under twice its radix.
struct MixedRadix3 {
  int hi, mid, lo, d_hi, d_mid, d_lo, mid_n, lo_n;
  __device__ __forceinline__ MixedRadix3(int start, int stride, int mid_n_, int lo_n_)
      : hi(start / lo_n_ / mid_n_), mid(start / lo_n_ % mid_n_), lo(start % lo_n_), d_hi(stride / lo_n_ / mid_n_),
        d_mid(stride / lo_n_ % mid_n_), d_lo(stride % lo_n_), mid_n(mid_n_), lo_n(lo_n_) {}
  __device__ __forceinline__ void next() {
    lo += d_lo;
    int carry = lo >= lo_n;
    lo -= carry * lo_n;
    mid += d_mid + carry;
    carry = mid >= mid_n;
    mid -= carry * mid_n;
    hi += d_hi + carry;
  }
};

// The gradient one RoI's bins send to footprint rows [i0, i1) (all columns) of channels [c0, c0 + nc),
// from g = its grad at channel c0: one add per element, by the block's threads, consecutive threads on
// consecutive addresses (the column fastest for NCHW, the channel fastest for channels_last). Atomic, or a
// plain read-modify-write where the caller owns the elements.
template <bool Atomic, typename scalar_t, typename T>
__device__ __forceinline__ void add_footprint_gradient(const LevelTable<T*, T>& lv, const Problem& pr,
                                                       const Footprint<T>& fp, const scalar_t* g, int64_t c0, int nc,
                                                       int i0, int i1) {
  const bool cl = lv.channels_last[fp.level];
  // 32-bit indices: tables within kSeparableSharedBytes bound the footprint (with fp32 tables and one bin
  // a side, fh + fw <= 4094, so fh * fw < 2^22) and nc <= 32, so nc * pixels + blockDim.x < 2^31.
  const int rows = i1 - i0;
  if (rows <= 0 || fp.fw <= 0 || nc <= 0) return;
  T* gf = lv.data[fp.level];
  // Element e is (channel, row, column) in that order for NCHW, (row, column, channel) for channels_last.
  MixedRadix3 d = cl ? MixedRadix3(int(threadIdx.x), int(blockDim.x), fp.fw, nc)
                     : MixedRadix3(int(threadIdx.x), int(blockDim.x), rows, fp.fw);
  for (; d.hi < (cl ? rows : nc); d.next()) {
    const int c = cl ? d.lo : d.hi;
    const int i = i0 + (cl ? d.hi : d.mid), j = cl ? d.mid : d.lo;
    const int pf = fp.p_first[i], pl = fp.p_last[i], qf = fp.q_first[j], ql = fp.q_last[j];
    if (pf > pl || qf > ql) continue;  // a row or column between samples that no bin touches
    const scalar_t* gc = g + int64_t(c) * pr.ph * pr.pw;
    T sum = T(0);
    for (int p = pf; p <= pl; ++p) {
      T rs = T(0);
      for (int q = qf; q <= ql; ++q) rs += fp.wx[size_t(q) * fp.fw + j] * static_cast<T>(gc[p * pr.pw + q]);
      sum += fp.wy[size_t(p) * fp.fh + i] * rs;
    }
    if (sum == T(0)) continue;  // rows or columns between samples (fixed sampling ratios): nothing to add
    T* dst = gf + pixel_offset(cl, fp.batch, c0 + c, pr.C, fp.H, fp.W, fp.y0 + i, fp.x0 + j);
    if constexpr (Atomic) atomicAdd(dst, sum * fp.inv);
    else *dst += sum * fp.inv;
  }
}

template <typename scalar_t, typename T>
__global__ void __launch_bounds__(kThreads) roi_align_backward_separable_kernel(
    LevelTable<T*, T> lv, const T* __restrict__ rois, const int64_t* __restrict__ levels, Problem pr, int chunk,
    int64_t chunks, SeparableLayout<T> layout, int64_t tasks, const scalar_t* __restrict__ grad) {
  INSLOC_DYNAMIC_SHARED(smem);
  for (int64_t task = blockIdx.x; task < tasks; task += gridDim.x) {
    const int64_t pair = task / chunks;
    const int64_t c0 = (task % chunks) * chunk;
    const int nc = int(min(int64_t(chunk), pr.C - c0));
    Footprint<T> fp;
    if (footprint_tables(lv, rois, levels, pr, pair, layout, smem, fp) && fp.fh > 0)
      add_footprint_gradient<true>(lv, pr, fp, grad + (pair * pr.C + c0) * pr.ph * pr.pw, c0, nc, 0, fp.fh);
    __syncthreads();  // the next task overwrites the tables
  }
}

// Deterministic separable backward: block (level, image, band of kBandRows rows, chunk of channels) owns
// those gradient elements. It visits the RoIs in index order and, for each that can touch its band,
// tabulates the RoI's weights and adds the RoI's contribution to each element it owns once, by a plain
// read-modify-write (a barrier separates RoIs; no other block writes these elements). Every element sums
// its RoIs in index order: bitwise repeatable, no atomics, no extra memory.
constexpr int kBandRows = 32;
constexpr int kMinDeterministicChunk = 16;  // channels, NCHW (separable_plan; a first guess, not measured)

template <typename scalar_t, typename T>
__global__ void __launch_bounds__(kThreads) roi_align_backward_separable_deterministic_kernel(
    LevelTable<T*, T> lv, const T* __restrict__ rois, const int64_t* __restrict__ levels, Problem pr, int chunk,
    int64_t chunks, int bands, SeparableLayout<T> layout, int64_t tasks, const scalar_t* __restrict__ grad) {
  INSLOC_DYNAMIC_SHARED(smem);
  for (int64_t task = blockIdx.x; task < tasks; task += gridDim.x) {  // the same in every thread of a block
    int64_t t = task;
    const int64_t c0 = (t % chunks) * chunk;
    t /= chunks;
    const int band = int(t % bands);
    t /= bands;
    const int b = int(t % pr.B);
    const int l = int(t / pr.B);
    const int row0 = band * kBandRows, row1 = min(lv.H[l], row0 + kBandRows);
    if (row0 >= row1) continue;  // a band past this level's rows
    const int nc = int(min(int64_t(chunk), pr.C - c0));
    for (int64_t r = 0; r < pr.R; ++r) {
      const T* roi = rois + r * 5;
      RoiAxis<T> ay;
      if (!roi_meets_rows(lv, roi, levels, pr, r, l, b, row0, row1, ay)) continue;
      const int64_t pair = pr.by_level ? r : l * pr.R + r;
      Footprint<T> fp;
      if (footprint_tables(lv, rois, levels, pr, pair, layout, smem, fp) && fp.fh > 0) {
        const int i0 = max(fp.y0, row0) - fp.y0, i1 = min(fp.y0 + fp.fh, row1) - fp.y0;
        if (i0 < i1)
          add_footprint_gradient<false>(lv, pr, fp, grad + (pair * pr.C + c0) * pr.ph * pr.pw, c0, nc, i0, i1);
      }
      __syncthreads();  // the next RoI overwrites the tables and may add to the same elements
    }
  }
}

// Threads for pairs x ceil(C / cpt) x bins.
int64_t thread_count(const Problem& pr, int cpt) {
  return pr.pairs * ((pr.C + cpt - 1) / cpt) * pr.ph * pr.pw;
}

// Channels per thread of the forward and atomic backward kernels: 1 for channels_last levels; else
// INSLOC_OPS_CUDA_ROI_CHANNELS (1 .. kMaxChannelsPerThread; 1 is torchvision's thread per output element)
// or, unset, the most of 8, 4, 2, 1 that still leaves kMinWaves waves of threads (2048 resident per SM).
// Measured on an H200 (2026-11-27, BENCHMARKS.md): 8 channels per thread made the NCHW forward 1.5-2.5x faster at the
// detection shapes (1024 RoIs, 7x7 and 14x14: 6 and 24 waves at 8), where bins hold few samples, and 1.4x
// slower at the InsLoc shape (128 level-RoI pairs: under one wave at 8), where a few threads with up to 81
// samples x 8 channels each held the launch up; one per thread gives it 6 waves.
constexpr int kMinWaves = 4;

int channels_per_thread(bool channel_fastest, const Problem& pr, int device) {
  if (channel_fastest) return 1;
  const char* env = std::getenv("INSLOC_OPS_CUDA_ROI_CHANNELS");
  if (env != nullptr && *env != '\0') {
    char* end = nullptr;
    const long v = std::strtol(env, &end, 10);
    TORCH_CHECK(*end == '\0' && v >= 1 && v <= kMaxChannelsPerThread,
                "INSLOC_OPS_CUDA_ROI_CHANNELS must be an integer in [1, ", kMaxChannelsPerThread, "], got '", env, "'");
    return int(v);
  }
  const int64_t wave = int64_t(gpu::sm_count(device)) * 2048;
  int cpt = kMaxChannelsPerThread;
  while (cpt > 1 && thread_count(pr, cpt) < kMinWaves * wave) cpt /= 2;
  return cpt;
}

unsigned blocks_for(int64_t total) {
  return unsigned(std::max<int64_t>(1, std::min<int64_t>((total + kThreads - 1) / kThreads, int64_t(1) << 20)));
}

// INSLOC_OPS_CUDA_ROI_FORWARD / INSLOC_OPS_CUDA_ROI_BACKWARD (read at every call): "separable" picks the
// separable kernel for that pass, unset or "sample" the per-sample one. Under deterministic algorithms the
// backward is that family's deterministic kernel.
bool separable_requested(const char* name) {
  const char* env = std::getenv(name);
  if (env == nullptr || *env == '\0' || std::strcmp(env, "sample") == 0) return false;
  TORCH_CHECK(std::strcmp(env, "separable") == 0, name, " must be 'sample' or 'separable', got '", env, "'");
  return true;
}

// Separable kernels: a block's tables fit the default 48 KiB of dynamic shared memory, else the per-sample
// kernel runs (a footprint is at most the largest level, so the size is known without reading the RoIs).
constexpr size_t kSeparableSharedBytes = 48 * 1024;

template <typename ptr_t, typename T>
std::optional<SeparableLayout<T>> separable_layout(const Problem& pr, const LevelTable<ptr_t, T>& lv) {
  SeparableLayout<T> layout{pr.ph, pr.pw, 0, 0};
  for (int l = 0; l < lv.num; ++l) {
    layout.cap_h = std::max(layout.cap_h, lv.H[l]);
    layout.cap_w = std::max(layout.cap_w, lv.W[l]);
  }
  if (layout.bytes() > kSeparableSharedBytes) return std::nullopt;
  return layout;
}

// How a separable kernel's launch splits its work: `units` (level-RoI pairs, or, deterministic, level-image-band
// triples) times chunks of `chunk` channels make `tasks`, which `blocks` blocks loop over. A chunk is 32
// channels on channels_last levels (a warp's accesses then span 32 channels of a pixel), else the most of 32,
// 16, ..., min_chunk that still leaves kMinWaves waves of tasks, counting only the `busy` units (those with work:
// the deterministic kernel's bands below a smaller level's height have none); blocks are at most kMinWaves
// waves. A wave: the SMs times the blocks an SM holds at once (the kernel's registers and shared memory decide;
// the emulator counts threads and shared memory only).
struct SeparablePlan {
  int chunk;
  int64_t chunks, tasks;
  unsigned blocks;
};

template <typename Kernel>
SeparablePlan separable_plan(Kernel kernel, size_t shared_bytes, bool channels_last, int64_t units, int64_t C,
                             int device, int64_t busy = -1, int min_chunk = 1) {
  const int64_t wave = int64_t(gpu::sm_count(device)) * gpu::resident_blocks(kernel, kThreads, shared_bytes);
  if (busy < 0) busy = units;
  int chunk = 32;
  while (!channels_last && chunk > min_chunk && busy * ((C + chunk - 1) / chunk) < kMinWaves * wave) chunk /= 2;
  const int64_t chunks = (C + chunk - 1) / chunk, tasks = units * chunks;
  return {chunk, chunks, tasks, unsigned(std::max<int64_t>(1, std::min(tasks, kMinWaves * wave)))};
}

void check_cuda_problem(const at::Tensor& rois, int64_t num_levels) {
  TORCH_CHECK(num_levels <= MAX_LEVELS, "roi_align_multilevel (CUDA): at most ", MAX_LEVELS, " levels, got ",
              num_levels);
  TORCH_CHECK(gpu::on_device(rois), "roi_align_multilevel (CUDA): rois must be a CUDA tensor");
}

at::Tensor roi_align_multilevel_cuda(at::TensorList features, const at::Tensor& rois,
                                     const std::optional<at::Tensor>& levels, at::ArrayRef<double> spatial_scales,
                                     int64_t pooled_height, int64_t pooled_width, int64_t sampling_ratio,
                                     bool aligned) {
  const int64_t L = int64_t(features.size());
  check_roi_align_rois(rois, levels, L, spatial_scales.size());
  check_cuda_problem(rois, L);
  check_roi_align_pool(pooled_height, pooled_width, sampling_ratio);
  const std::vector<at::Tensor> feats = readable_features(features, rois);
  const at::Tensor& f0 = feats[0];
  const gpu::DeviceGuard guard(f0.device());
  const int64_t B = f0.size(0), C = f0.size(1), R = rois.size(0);
  TORCH_CHECK(B <= INT32_MAX, "roi_align_multilevel: batch too large");
  const bool by_level = levels.has_value();
  at::Tensor out = by_level ? at::empty({R, C, pooled_height, pooled_width}, f0.options())
                            : at::empty({L, R, C, pooled_height, pooled_width}, f0.options());
  if (out.numel() == 0) return out;
  const Problem pr{R, C, by_level ? R : L * R, int(B), int(pooled_height), int(pooled_width), int(sampling_ratio),
                   aligned, by_level};
  const bool channel_fastest = is_channels_last(feats[0]);
  const int device = int(f0.device().index());
  const int cpt = channels_per_thread(channel_fastest, pr, device);
  const int64_t total = thread_count(pr, cpt);
  const bool separable = separable_requested("INSLOC_OPS_CUDA_ROI_FORWARD");
  auto stream = gpu::current_stream();
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, f0.scalar_type(), "roi_align_multilevel_cuda", [&] {
    using T = at::opmath_type<scalar_t>;
    const at::Tensor r = rois.to(c10::CppTypeToScalarType<T>::value).contiguous();
    const at::Tensor lv_t = by_level ? levels->contiguous() : at::Tensor();
    LevelTable<const scalar_t*, T> lv{};
    lv.num = int(L);
    for (int64_t l = 0; l < L; ++l) {
      lv.data[l] = feats[l].data_ptr<scalar_t>();
      lv.H[l] = int(feats[l].size(2));
      lv.W[l] = int(feats[l].size(3));
      lv.scale[l] = T(spatial_scales[l]);
      lv.channels_last[l] = is_channels_last(feats[l]);
    }
    const int64_t* lvp = by_level ? lv_t.data_ptr<int64_t>() : nullptr;
    const std::optional<SeparableLayout<T>> layout =
        separable ? separable_layout(pr, lv) : std::optional<SeparableLayout<T>>();
    if (layout) {
      INSLOC_EMU_NOTE("roi_align: separable forward");
      const auto kernel = roi_align_forward_separable_kernel<scalar_t, T>;
      const SeparablePlan plan = separable_plan(kernel, layout->bytes(), channel_fastest, pr.pairs, pr.C, device);
      INSLOC_LAUNCH(plan.blocks, kThreads, layout->bytes(), stream, kernel)(
          lv, r.data_ptr<T>(), lvp, pr, plan.chunk, plan.chunks, *layout, plan.tasks, out.data_ptr<scalar_t>());
    } else {
      INSLOC_LAUNCH(blocks_for(total), kThreads, 0, stream, roi_align_forward_kernel<scalar_t, T>)(
          lv, r.data_ptr<T>(), lvp, pr, channel_fastest, cpt, total, out.data_ptr<scalar_t>());
    }
    INSLOC_LAUNCH_CHECK();
  });
  return out;
}

std::vector<at::Tensor> roi_align_multilevel_backward_cuda(
    const at::Tensor& grad, const at::Tensor& rois, const std::optional<at::Tensor>& levels,
    at::ArrayRef<double> spatial_scales, int64_t sampling_ratio, bool aligned, int64_t batch_size,
    int64_t channels, at::IntArrayRef heights, at::IntArrayRef widths, bool channels_last) {
  const int64_t L = int64_t(heights.size());
  check_roi_align_rois(rois, levels, L, spatial_scales.size());
  check_cuda_problem(rois, L);
  const bool by_level = levels.has_value();
  const int64_t R = rois.size(0), B = batch_size, C = channels;
  TORCH_CHECK(B >= 0 && B <= INT32_MAX, "roi_align_multilevel_backward: bad batch_size");
  check_roi_align_grad(grad, rois, by_level, L, C, heights, widths);
  check_roi_align_pool(grad.size(-2), grad.size(-1), sampling_ratio);
  int max_h = 0;
  for (int64_t l = 0; l < L; ++l) max_h = std::max(max_h, int(heights[l]));
  const gpu::DeviceGuard guard(grad.device());
  const int ph = int(grad.size(-2)), pw = int(grad.size(-1));
  const auto fmt = channels_last ? at::MemoryFormat::ChannelsLast : at::MemoryFormat::Contiguous;
  const bool reduced = grad.scalar_type() == at::kHalf || grad.scalar_type() == at::kBFloat16;
  const auto acc_opts = grad.options().dtype(reduced ? at::kFloat : grad.scalar_type());
  std::vector<at::Tensor> acc;
  // at::zeros ignores a memory format in its options (it would hand back NCHW); at::empty honours it.
  for (int64_t l = 0; l < L; ++l)
    acc.push_back(at::empty({B, C, heights[l], widths[l]}, acc_opts.memory_format(fmt)).zero_());
  const Problem pr{R, C, by_level ? R : L * R, int(B), ph, pw, int(sampling_ratio), aligned, by_level};
  const bool deterministic = at::globalContext().deterministicAlgorithms();
  const bool separable = separable_requested("INSLOC_OPS_CUDA_ROI_BACKWARD");
  const int device = int(grad.device().index());
  const int64_t total = grad.numel();
  if (total > 0 && B > 0) {
    auto stream = gpu::current_stream();
    AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, grad.scalar_type(), "roi_align_multilevel_backward_cuda",
                                    [&] {
      using T = at::opmath_type<scalar_t>;
      const at::Tensor g = grad.contiguous();
      const at::Tensor r = rois.to(c10::CppTypeToScalarType<T>::value).contiguous();
      const at::Tensor lv_t = by_level ? levels->contiguous() : at::Tensor();
      const int64_t* lvp = by_level ? lv_t.data_ptr<int64_t>() : nullptr;
      LevelTable<T*, T> lv{};
      lv.num = int(L);
      for (int64_t l = 0; l < L; ++l) {
        lv.data[l] = acc[l].data_ptr<T>();
        lv.H[l] = int(heights[l]);
        lv.W[l] = int(widths[l]);
        lv.scale[l] = T(spatial_scales[l]);
        lv.channels_last[l] = channels_last;
      }
      const std::optional<SeparableLayout<T>> layout =
          separable ? separable_layout(pr, lv) : std::optional<SeparableLayout<T>>();
      if (deterministic && layout) {
        const int bands = std::max(1, (max_h + kBandRows - 1) / kBandRows);
        int64_t busy = 0;  // (level, image, band) tasks below their level's height
        for (int64_t l = 0; l < L; ++l) busy += B * ((heights[l] + kBandRows - 1) / kBandRows);
        INSLOC_EMU_NOTE("roi_align: separable deterministic backward");
        const auto kernel = roi_align_backward_separable_deterministic_kernel<scalar_t, T>;
        // Chunks of at least kMinDeterministicChunk channels: a block rebuilds the tables of every RoI that meets
        // its band, which fewer channels would not pay for.
        const SeparablePlan plan = separable_plan(kernel, layout->bytes(), channels_last, L * B * bands, C, device,
                                                  busy, kMinDeterministicChunk);
        INSLOC_EMU_VALUE("roi_align: separable deterministic chunk", plan.chunk);
        INSLOC_LAUNCH(plan.blocks, kThreads, layout->bytes(), stream, kernel)(
            lv, r.data_ptr<T>(), lvp, pr, plan.chunk, plan.chunks, bands, *layout, plan.tasks, g.data_ptr<scalar_t>());
        INSLOC_LAUNCH_CHECK();
      } else if (deterministic) {
        const int bands = std::max(1, (max_h + kRowsPerThread - 1) / kRowsPerThread);
        const int64_t threads = L * B * bands * C;
        if (threads > 0) {
          INSLOC_LAUNCH(blocks_for(threads), kThreads, 0, stream, roi_align_backward_deterministic_kernel<scalar_t, T>)(
              lv, r.data_ptr<T>(), lvp, pr, bands, threads, g.data_ptr<scalar_t>());
          INSLOC_LAUNCH_CHECK();
        }
      } else if (layout) {
        INSLOC_EMU_NOTE("roi_align: separable backward");
        const auto kernel = roi_align_backward_separable_kernel<scalar_t, T>;
        const SeparablePlan plan = separable_plan(kernel, layout->bytes(), channels_last, pr.pairs, C, device);
        INSLOC_LAUNCH(plan.blocks, kThreads, layout->bytes(), stream, kernel)(
            lv, r.data_ptr<T>(), lvp, pr, plan.chunk, plan.chunks, *layout, plan.tasks, g.data_ptr<scalar_t>());
        INSLOC_LAUNCH_CHECK();
      } else {
        const int cpt = channels_per_thread(channels_last, pr, device);
        const int64_t threads = thread_count(pr, cpt);
        INSLOC_LAUNCH(blocks_for(threads), kThreads, 0, stream, roi_align_backward_atomic_kernel<scalar_t, T>)(
            lv, r.data_ptr<T>(), lvp, pr, channels_last, cpt, threads, g.data_ptr<scalar_t>());
        INSLOC_LAUNCH_CHECK();
      }
    });
  }
  if (reduced)
    for (auto& a : acc) a = a.to(grad.scalar_type());
  return acc;
}

}  // namespace
}  // namespace insloc

INSLOC_CUDA_LIBRARY_IMPL(m) {
  m.impl("roi_align_multilevel", &insloc::roi_align_multilevel_cuda);
  m.impl("roi_align_multilevel_backward", &insloc::roi_align_multilevel_backward_cuda);
}
