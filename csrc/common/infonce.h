// Queue InfoNCE math shared by the CPU and CUDA kernels.
//
// A row's logits are streamed in blocks; each block (or single logit) is summarised by a partial
// log-sum-exp (m, s): m = max, s = sum exp(x - m). The empty set is (-inf, 0). Partials merge in any
// order, so K can be split across threads/blocks and combined afterwards.
#pragma once

#include <cmath>

#include "common/macros.h"

namespace insloc {
namespace infonce {

INSLOC_HD float exp_acc(float x) { return expf(x); }
INSLOC_HD double exp_acc(double x) { return exp(x); }
INSLOC_HD float log_acc(float x) { return logf(x); }
INSLOC_HD double log_acc(double x) { return log(x); }

template <typename T>
INSLOC_HD T neg_inf() {
  return -static_cast<T>(INFINITY);
}

// (m, s) <- (m, s) merged with (m2, s2). NaN in either propagates into s (and so into the loss).
template <typename T>
INSLOC_HD void lse_merge(T& m, T& s, T m2, T s2) {
  if (m2 > m) {
    T tm = m, ts = s;
    m = m2, s = s2, m2 = tm, s2 = ts;
  }
  // The smaller one has max -inf: it is empty (-inf, 0) or holds logits that are all -inf (a finite input
  // whose scaled dot overflowed), which add exp(-inf) = 0; with both at -inf, exp(-inf - -inf) would be NaN.
  // (-inf, NaN), a NaN logit that arrived before any finite one, must still propagate its NaN.
  if (m2 == neg_inf<T>() && !(s2 != s2)) return;
  s += s2 * exp_acc(m2 - m);
}

// One logit x into the running (m, s).
template <typename T>
INSLOC_HD void lse_add(T& m, T& s, T x) {
  lse_merge(m, s, x, T(1));
}

template <typename T>
INSLOC_HD T lse_value(T m, T s) {
  return m + log_acc(s);
}

// loss_i = lse_i - q_i.k_i / T, with `positive` = q_i.k_i / T.
template <typename T>
INSLOC_HD T infonce_loss(T lse, T positive) {
  return lse - positive;
}

// Softmax probability of a (scaled) logit, recomputed in the backward from the saved lse.
template <typename T>
INSLOC_HD T infonce_prob(T logit, T lse) {
  return exp_acc(logit - lse);
}

// d loss_i / d (q_i.k_i): (g_i / T) * (p_i0 - 1); dk_i = this * q_i, and dq_i gets this * k_i plus
// (g_i / T) * sum_j p_ij queue_j.
template <typename T>
INSLOC_HD T positive_coef(T grad, T inv_temperature, T positive, T lse) {
  return grad * inv_temperature * (infonce_prob(positive, lse) - T(1));
}

// Splits of K: blocks of `block` rows, at most `max_splits` pieces, none empty. Returns the number of
// splits and the rows per split (a multiple of `block`). K = 0 gives one empty split.
template <typename I>
INSLOC_HD void split_k(I K, I block, I max_splits, I& splits, I& per_split) {
  I blocks = (K + block - 1) / block;
  if (blocks < 1) blocks = 1;
  splits = blocks < max_splits ? blocks : max_splits;
  if (splits < 1) splits = 1;
  I blocks_per = (blocks + splits - 1) / splits;
  per_split = blocks_per * block;
  splits = (blocks + blocks_per - 1) / blocks_per;
}

}  // namespace infonce
}  // namespace insloc
