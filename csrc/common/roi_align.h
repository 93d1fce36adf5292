// RoIAlign sample-grid geometry, bilinear weights and the out-of-range rule (torchvision's), written once
// for the CPU and CUDA kernels. T is the coordinate/accumulation type: float (double for double inputs).
// RoIAlign's 2-D bilinear weight is the product of a y factor and an x factor, and a sample is skipped
// when either coordinate is out of range, so everything here is per axis.
#pragma once

#include <cmath>

#include "common/macros.h"

namespace insloc {

// Same clamp as insloc_ops/reference.py: bounds every kernel's sample loop.
constexpr int MAX_ADAPTIVE_GRID = 65536;
constexpr int MAX_LEVELS = 8;
// Largest pooled height or width (insloc_ops/reference.py's MAX_POOLED_SIZE): bin indices p * pw + q stay in
// 32 bits.
constexpr int MAX_POOLED_SIZE = 1 << 15;

// nvcc contracts a * b + c into an fma by default; products rounded on their own keep the sample
// coordinates bitwise equal between the CPU and CUDA kernels.
INSLOC_HD float mul_rn(float a, float b) {
#if defined(__CUDA_ARCH__)
  return __fmul_rn(a, b);
#else
  return a * b;
#endif
}
INSLOC_HD double mul_rn(double a, double b) {
#if defined(__CUDA_ARCH__)
  return __dmul_rn(a, b);
#else
  return a * b;
#endif
}

template <typename T>
struct RoiAxis {
  T start;  // first coordinate of the box on this axis, in feature pixels
  T bin;    // bin size
  int grid; // samples per bin on this axis
};

// lo, hi: box edges in image pixels.
template <typename T>
INSLOC_HD RoiAxis<T> roi_axis(T lo, T hi, T scale, bool aligned, int pooled, int sampling_ratio) {
  const T offset = aligned ? T(0.5) : T(0);
  RoiAxis<T> a;
  a.start = mul_rn(lo, scale) - offset;
  T size = (mul_rn(hi, scale) - offset) - a.start;
  if (!aligned && size < T(1)) size = T(1);  // NaN stays NaN, as with torchvision's std::max
  a.bin = size / T(pooled);
  if (sampling_ratio > 0) {
    a.grid = sampling_ratio;
  } else {
    const T g = ceil(a.bin);
    // Same as the reference: a non-finite box gets no samples, else ceil(bin) clamped to
    // [0, MAX_ADAPTIVE_GRID]. `g >= 0` is false for NaN; g - g is NaN for infinities.
    if (!(g >= T(0)) || !(g - g == T(0))) a.grid = 0;
    else a.grid = g > T(MAX_ADAPTIVE_GRID) ? MAX_ADAPTIVE_GRID : int(g);
  }
  return a;
}

// 1 / count, with count = max(grid_h * grid_w, 1) as in torchvision (in T: 65536^2 overflows int).
template <typename T>
INSLOC_HD T inv_count(int grid_h, int grid_w) {
  T count = T(grid_h) * T(grid_w);
  return T(1) / (count > T(1) ? count : T(1));
}

// First coordinate of bin p: start + p * bin.
template <typename T>
INSLOC_HD T bin_origin(const RoiAxis<T>& a, int p) {
  return a.start + mul_rn(T(p), a.bin);
}

// Coordinate of sample s of a bin: origin + ((s + 0.5) * bin) / grid (torchvision's order of operations).
template <typename T>
INSLOC_HD T sample_coord(T origin, T bin, int s, int grid) {
  return origin + mul_rn(T(s) + T(0.5), bin) / T(grid);
}

template <typename T>
struct AxisSample {
  int low, high;  // the two pixels interpolated between
  T w_low, w_high;
};

// torchvision's bilinear rule on one axis. Returns false (skip the sample) when the coordinate lies
// outside [-1, size], NaN included.
template <typename T>
INSLOC_HD bool axis_sample(T y, int size, AxisSample<T>& out) {
  if (!(y >= T(-1) && y <= T(size)) || size <= 0) return false;
  if (y <= T(0)) y = T(0);
  int low = int(y);
  int high;
  if (low >= size - 1) {
    low = high = size - 1;
    y = T(low);
  } else {
    high = low + 1;
  }
  const T frac = y - T(low);
  out.low = low;
  out.high = high;
  out.w_low = T(1) - frac;
  out.w_high = frac;
  return true;
}

// Samples of a bin whose coordinate lies in [-1, size]: the half-open range [s0, s1). Coordinates are
// monotone in s (every step of sample_coord is a monotone rounding), so the in-range samples are
// contiguous and found by bisection with the exact sample_coord; boxes far larger than the map then
// cost O(map size), not O(grid^2). Callers still apply axis_sample's test to each sample.
template <typename T>
INSLOC_HD int first_sample_where(T origin, T bin, int grid, T bound, bool above) {
  // Smallest s in [0, grid] with coord(s) >= bound (above) or coord(s) <= bound (!above); the predicate
  // is false-then-true along s when the direction matches, NaN is never true.
  int lo = 0, hi = grid;
  while (lo < hi) {
    const int mid = lo + (hi - lo) / 2;
    const T y = sample_coord(origin, bin, mid, grid);
    if (above ? (y >= bound) : (y <= bound)) hi = mid; else lo = mid + 1;
  }
  return lo;
}

template <typename T>
INSLOC_HD void valid_samples(T origin, T bin, int grid, int size, int& s0, int& s1) {
  s0 = s1 = 0;
  if (grid <= 0 || size <= 0) return;
  if (bin >= T(0)) {
    s0 = first_sample_where(origin, bin, grid, T(-1), true);
    // First s with coord > size: bisect "not (coord <= size)" via the complementary predicate.
    int lo = s0, hi = grid;
    while (lo < hi) {
      const int mid = lo + (hi - lo) / 2;
      if (sample_coord(origin, bin, mid, grid) > T(size)) hi = mid; else lo = mid + 1;
    }
    s1 = lo;
  } else if (bin < T(0)) {
    s0 = first_sample_where(origin, bin, grid, T(size), false);
    int lo = s0, hi = grid;
    while (lo < hi) {
      const int mid = lo + (hi - lo) / 2;
      if (sample_coord(origin, bin, mid, grid) < T(-1)) hi = mid; else lo = mid + 1;
    }
    s1 = lo;
  }  // NaN bin: no samples
}

// The RoI's batch index if it names an image of the batch, else -1 (NaN and out-of-range included).
template <typename T>
INSLOC_HD int roi_batch(T b, int batch_size) {
  return (b >= T(0) && b < T(batch_size)) ? int(b) : -1;
}

}  // namespace insloc
