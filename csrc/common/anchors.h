// IoU and the counter-based random key of sample_anchor_boxes, shared by the CPU and CUDA kernels.
// Every backend (and insloc_ops/reference.py) must produce bit-identical IoUs and keys, so that all of
// them pick the same anchor for the same seed: each float op below is rounded on its own (no FMA).
#pragma once

#include <cstdint>
#include <cstring>

#include "common/macros.h"

namespace insloc {

// Host compilers may contract a*b+c into an FMA (GCC does, by default, on FMA targets); an empty asm
// that takes the product in a register forces it to be rounded first, as the reference does.
INSLOC_HD float rounded(float x) {
#if !defined(__CUDA_ARCH__) && defined(__FP_FAST_FMAF) && (defined(__GNUC__) || defined(__clang__))
#if defined(__x86_64__)
  __asm__("" : "+x"(x));
#elif defined(__aarch64__)
  __asm__("" : "+w"(x));
#else
  volatile float v = x;
  x = v;
#endif
#endif
  return x;
}

INSLOC_HD float mul_rn(float a, float b) {
#ifdef __CUDA_ARCH__
  return __fmul_rn(a, b);
#else
  return rounded(a * b);
#endif
}

INSLOC_HD float add_rn(float a, float b) {
#ifdef __CUDA_ARCH__
  return __fadd_rn(a, b);
#else
  return a + b;
#endif
}

INSLOC_HD float sub_rn(float a, float b) {
#ifdef __CUDA_ARCH__
  return __fsub_rn(a, b);
#else
  return a - b;
#endif
}

INSLOC_HD float div_rn(float a, float b) {
#ifdef __CUDA_ARCH__
  return __fdiv_rn(a, b);
#else
  return a / b;
#endif
}

INSLOC_HD uint32_t float_bits(float x) {
#ifdef __CUDA_ARCH__
  return __float_as_uint(x);
#else
  uint32_t u;
  std::memcpy(&u, &x, sizeof(u));
  return u;
#endif
}

INSLOC_HD float bits_float(uint32_t u) {
#ifdef __CUDA_ARCH__
  return __uint_as_float(u);
#else
  float x;
  std::memcpy(&x, &u, sizeof(x));
  return x;
#endif
}

INSLOC_HD float box_area(float x1, float y1, float x2, float y2) {
  return mul_rn(sub_rn(x2, x1), sub_rn(y2, y1));
}

// IoU of box a and box b (xyxy) given their areas, in reference.box_iou's order of operations.
// The clamp writes +0 for any non-positive overlap, so the IoU is never -0 (its float bits order as ints).
INSLOC_HD float box_iou(float ax1, float ay1, float ax2, float ay2, float area_a, float bx1, float by1, float bx2,
                        float by2, float area_b) {
  float iw = sub_rn(ax2 < bx2 ? ax2 : bx2, ax1 > bx1 ? ax1 : bx1);
  float ih = sub_rn(ay2 < by2 ? ay2 : by2, ay1 > by1 ? ay1 : by1);
  iw = iw > 0.0f ? iw : 0.0f;
  ih = ih > 0.0f ? ih : 0.0f;
  const float inter = mul_rn(iw, ih);
  const float uni = sub_rn(add_rn(area_a, area_b), inter);
  // uni > 0 ? inter / uni : 0, as a bit mask: a branch-free select lets host compilers vectorise the loop
  // (they will not if-convert a division that may trap).
  const float q = div_rn(inter, uni);
  return bits_float(float_bits(q) & (uni > 0.0f ? 0xffffffffu : 0u));
}

// The "lowbias32" finaliser: a bijection on uint32 (reference.mix32).
INSLOC_HD uint32_t mix32(uint32_t x) {
  x ^= x >> 16;
  x *= 0x7feb352du;
  x ^= x >> 15;
  x *= 0x846ca68bu;
  x ^= x >> 16;
  return x;
}

INSLOC_HD uint32_t seed_key(int64_t seed) {
  const uint64_t s = static_cast<uint64_t>(seed);
  return mix32(static_cast<uint32_t>(s) ^ mix32(static_cast<uint32_t>(s >> 32)));
}

INSLOC_HD uint32_t box_key(uint32_t seed_key, int64_t box) {
  return mix32(static_cast<uint32_t>(box) ^ seed_key);
}

// key(n, a): distinct for distinct anchors of one box, so "the eligible anchor with the largest key" is a
// uniform choice with no ties.
INSLOC_HD uint32_t anchor_key(uint32_t box_key, int64_t anchor) {
  return mix32(static_cast<uint32_t>(anchor) ^ box_key);
}

// A candidate as one non-negative int64, so a max (or an atomicMax) keeps the best one:
// (value << 31) | (2^31 - 1 - index). value is a key, or the float bits of an IoU (>= +0: monotone as ints);
// equal values keep the lowest index. Needs index < 2^31 - 1; 0 means "no candidate".
constexpr int64_t kIndexMask = (int64_t{1} << 31) - 1;
constexpr int64_t kMaxAnchors = kIndexMask - 1;

INSLOC_HD int64_t pack_candidate(uint32_t value, int64_t index) {
  return (static_cast<int64_t>(value) << 31) | (kIndexMask - index);
}

INSLOC_HD int64_t candidate_index(int64_t packed) {
  return kIndexMask - (packed & kIndexMask);
}

}  // namespace insloc
