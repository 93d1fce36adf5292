// Queue InfoNCE on CPU, blocked over K: no N x K buffer, only per-thread blocks of kBlockK logits.
//
// Tasks = groups x row blocks x K splits (so N = 32 still fills every core); each task streams its
// queue rows in blocks: logits = q_rows @ block^T (BLAS), then a partial log-sum-exp per row, merged
// across blocks and, after the parallel loop, across splits in a fixed order (so the result does not
// depend on the thread count). The backward recomputes p from the saved lse block by block and adds
// p @ block into a per-split dq partial ([splits, G, N, D]), summed afterwards.
//
// queue_infonce_onepass (what training uses on CPU) does both in one pass over the queue: while it
// streams the blocks for the log-sum-exp it also accumulates sum_j exp(logit_ij - m) queue_j (rescaled
// when the running max m grows, as in flash attention), so it returns, next to the loss, the
// softmax-weighted mean of the negatives. dq and dk follow from it in O(N D): the queue is read once per
// step instead of twice, and the GEMM that recomputes the logits in the backward disappears.
#include <ATen/Dispatch.h>
#include <ATen/Parallel.h>
#include <ATen/core/Tensor.h>
#include <ATen/ops/empty.h>
#include <ATen/ops/mm.h>
#include <ATen/ops/zeros.h>
#include <torch/library.h>

#include <algorithm>
#include <cmath>
#include <vector>

#include "common/infonce.h"
#include "common/infonce_args.h"

namespace insloc {
namespace {

using namespace infonce;

constexpr int64_t kBlockK = 512;  // queue rows per GEMM block: the block and its logits stay in L2
constexpr int64_t kRowBlock = 128;
constexpr int64_t kMaxSplits = 16;  // bounds the backward's dq partials at 16 x G x N x D

struct Geometry {
  int64_t G, N, K, D, rows, row_blocks, splits, per_split;
  Geometry(const at::Tensor& q, const at::Tensor& queue)
      : G(q.size(0)), N(q.size(1)), K(queue.size(1)), D(q.size(2)) {
    rows = std::min<int64_t>(std::max<int64_t>(N, 1), kRowBlock);
    row_blocks = (N + rows - 1) / rows;
    split_k<int64_t>(K, kBlockK, kMaxSplits, splits, per_split);
  }
  int64_t tasks() const { return G * row_blocks * splits; }
};

// Eight running sums: an ordered float sum would not vectorise and is latency-bound.
template <typename T>
T row_sum(const T* x, int64_t n) {
  T acc[8] = {0, 0, 0, 0, 0, 0, 0, 0};
  int64_t j = 0;
  for (; j + 8 <= n; j += 8) {
    for (int l = 0; l < 8; ++l) acc[l] += x[j + l];
  }
  T sum = 0;
  for (; j < n; ++j) sum += x[j];
  for (int l = 0; l < 8; ++l) sum += acc[l];
  return sum;
}

// Calls fn(g, r0, nr, logits [nr, nk], block [nk, D], split) for every queue block of every task, with
// logits = q[g, r0:r0+nr] @ block^T already computed into a per-thread buffer.
template <typename acc_t, typename Fn>
void for_each_logit_block(const Geometry& geo, const at::Tensor& qa, const at::Tensor& queue, const Fn& fn) {
  const auto acc = qa.scalar_type();
  const bool convert = queue.scalar_type() != acc;
  at::parallel_for(0, geo.tasks(), 1, [&](int64_t begin, int64_t end) {
    auto logits_buf = at::empty({geo.rows * kBlockK}, qa.options());  // per thread, bounded
    at::Tensor block_buf;
    if (convert) block_buf = at::empty({kBlockK * geo.D}, qa.options());
    for (int64_t t = begin; t < end; ++t) {
      const int64_t split = t % geo.splits;
      const int64_t rb = (t / geo.splits) % geo.row_blocks;
      const int64_t g = t / (geo.splits * geo.row_blocks);
      const int64_t r0 = rb * geo.rows, nr = std::min(geo.rows, geo.N - r0);
      const int64_t k_begin = split * geo.per_split, k_end = std::min(geo.K, k_begin + geo.per_split);
      const auto q_rows = qa[g].narrow(0, r0, nr);  // [nr, D]
      for (int64_t k0 = k_begin; k0 < k_end; k0 += kBlockK) {
        const int64_t nk = std::min(kBlockK, k_end - k0);
        auto block = queue[g].narrow(0, k0, nk);  // [nk, D]
        if (convert) block = block_buf.narrow(0, 0, nk * geo.D).view({nk, geo.D}).copy_(block);
        auto logits = logits_buf.narrow(0, 0, nr * nk).view({nr, nk});  // [nr, nk]
        at::mm_out(logits, q_rows, block.t());
        fn(g, r0, nr, logits, block, split);
      }
    }
  });
}

// The per-row end of every backward: with e_i = sum_j p_ij queue_j already in `neg` (rows of D, or
// `parts` partial sums laid out [parts, rows, D] summed in a fixed order) and scaled by `neg_scale`_i,
//   dq_i = a_i k_i + neg_scale_i * e_i,  dk_i = a_i q_i,  a_i = (g_i / T) (p_i0 - 1).
template <typename acc_t, typename NegScale>
void finish_rows(int64_t rows, int64_t D, const acc_t* qp, const acc_t* kp, const acc_t* gp, const acc_t* lp,
                 acc_t inv_t, const acc_t* neg, int64_t parts, const NegScale& neg_scale, acc_t* dqp, acc_t* dkp) {
  at::parallel_for(0, rows, 16, [&](int64_t begin, int64_t end) {
    for (int64_t i = begin; i < end; ++i) {
      acc_t dot = 0;
      for (int64_t d = 0; d < D; ++d) dot += qp[i * D + d] * kp[i * D + d];
      const acc_t a = positive_coef(gp[i], inv_t, dot * inv_t, lp[i]);
      const acc_t c = neg_scale(i);
      for (int64_t d = 0; d < D; ++d) {
        acc_t sum = 0;
        for (int64_t p = 0; p < parts; ++p) sum += neg[(p * rows + i) * D + d];
        dqp[i * D + d] = a * kp[i * D + d] + c * sum;
        dkp[i * D + d] = a * qp[i * D + d];
      }
    }
  });
}

// The forward: loss and lse, and with `with_neg` (queue_infonce_onepass) also neg_mean [G, N, D] =
// sum_j p_ij queue_j, in the same pass over the queue.
std::tuple<at::Tensor, at::Tensor, at::Tensor> forward(const at::Tensor& q, const at::Tensor& k, const at::Tensor& queue,
                                                       double temperature, bool with_neg) {
  check_infonce_args(q, k, queue, temperature);
  const auto acc = infonce_acc_type(q);
  const Geometry geo(q, queue);
  auto loss = at::empty({geo.G, geo.N}, q.options().dtype(acc));
  auto lse = at::empty({geo.G, geo.N}, q.options().dtype(acc));
  auto neg_mean = at::empty({with_neg ? geo.G : 0, geo.N, geo.D}, q.options().dtype(acc));
  if (geo.G * geo.N == 0) return {loss, lse, neg_mean};
  const auto qa = q.detach().to(acc).contiguous();  // [G, N, D]
  const auto ka = k.detach().to(acc).contiguous();
  const auto queue_c = queue.detach().contiguous();  // [G, K, D]

  AT_DISPATCH_FLOATING_TYPES(acc, "queue_infonce_cpu", [&] {
    using acc_t = scalar_t;
    const acc_t inv_t = acc_t(1) / static_cast<acc_t>(temperature);
    const int64_t rows_total = geo.G * geo.N, D = geo.D;
    // Per (g, n, split): the running (m, s) and sum_j exp(logit_ij - m) queue_j; each slot is owned by one task.
    std::vector<acc_t> part_m(rows_total * geo.splits, neg_inf<acc_t>());
    std::vector<acc_t> part_s(rows_total * geo.splits, acc_t(0));
    at::Tensor part_e;
    if (with_neg) part_e = at::zeros({geo.splits, geo.G, geo.N, D}, qa.options());
    acc_t* ep = with_neg ? part_e.data_ptr<acc_t>() : nullptr;
    if (geo.K > 0) {
      for_each_logit_block<acc_t>(geo, qa, queue_c, [&](int64_t g, int64_t r0, int64_t nr, at::Tensor& logits,
                                                         const at::Tensor& block, int64_t split) {
        const int64_t nk = logits.size(1);
        acc_t* x = logits.data_ptr<acc_t>();
        for (int64_t r = 0; r < nr; ++r) {
          acc_t* row = x + r * nk;
          acc_t bmax = neg_inf<acc_t>();
          for (int64_t j = 0; j < nk; ++j) bmax = row[j] > bmax ? row[j] : bmax;
          const int64_t slot = ((g * geo.N) + r0 + r) * geo.splits + split;
          const acc_t m_old = part_m[slot], m_new = std::max(m_old, bmax * inv_t);
          if (m_new > m_old) {  // rescale what was summed relative to the old max (nothing, the first time)
            const acc_t scale = m_old == neg_inf<acc_t>() ? acc_t(0) : exp_acc(m_old - m_new);
            part_s[slot] *= scale;
            if (with_neg) {
              acc_t* e = ep + ((split * rows_total) + g * geo.N + r0 + r) * D;
              for (int64_t d = 0; d < D; ++d) e[d] *= scale;
            }
            part_m[slot] = m_new;
          }
          // With every logit so far -inf (overflowed), shift by 0: exp(-inf - -inf) would be NaN, exp(-inf) is 0.
          const acc_t shift = m_new == neg_inf<acc_t>() ? acc_t(0) : m_new;
          for (int64_t j = 0; j < nk; ++j) row[j] = row[j] * inv_t - shift;
        }
        logits.exp_();  // the bulk of the exps: ATen's vectorised exp on the L2-resident block
        for (int64_t r = 0; r < nr; ++r) {
          const int64_t slot = ((g * geo.N) + r0 + r) * geo.splits + split;
          part_s[slot] += row_sum(x + r * nk, nk);
        }
        if (with_neg) part_e[split][g].narrow(0, r0, nr).addmm_(logits, block);  // [nr, D] += [nr, nk] @ [nk, D]
      });
    }
    const acc_t* qp = qa.data_ptr<acc_t>();
    const acc_t* kp = ka.data_ptr<acc_t>();
    acc_t* loss_p = loss.data_ptr<acc_t>();
    acc_t* lse_p = lse.data_ptr<acc_t>();
    acc_t* np = neg_mean.data_ptr<acc_t>();
    at::parallel_for(0, rows_total, 16, [&](int64_t begin, int64_t end) {
      for (int64_t i = begin; i < end; ++i) {
        acc_t dot = 0;
        for (int64_t d = 0; d < D; ++d) dot += qp[i * D + d] * kp[i * D + d];
        const acc_t positive = dot * inv_t;
        acc_t m = positive, s = 1;
        for (int64_t c = 0; c < geo.splits; ++c) lse_merge(m, s, part_m[i * geo.splits + c], part_s[i * geo.splits + c]);
        lse_p[i] = lse_value(m, s);
        loss_p[i] = infonce_loss(lse_p[i], positive);
        if (!with_neg) continue;
        // Splits in a fixed order, each weighted by exp(m_c - lse): the result does not depend on threads.
        for (int64_t d = 0; d < D; ++d) np[i * D + d] = 0;
        for (int64_t c = 0; c < geo.splits; ++c) {
          const acc_t mc = part_m[i * geo.splits + c];
          if (mc == neg_inf<acc_t>()) continue;  // an empty split (or one whose logits were all -inf)
          const acc_t w = infonce_prob(mc, lse_p[i]);
          const acc_t* e = ep + (c * rows_total + i) * D;
          for (int64_t d = 0; d < D; ++d) np[i * D + d] += w * e[d];
        }
      }
    });
  });
  return {loss, lse, neg_mean};
}

std::tuple<at::Tensor, at::Tensor> queue_infonce_cpu(const at::Tensor& q, const at::Tensor& k,
                                                     const at::Tensor& queue, double temperature) {
  auto out = forward(q, k, queue, temperature, /*with_neg=*/false);
  return {std::get<0>(out), std::get<1>(out)};
}

std::tuple<at::Tensor, at::Tensor, at::Tensor> queue_infonce_onepass_cpu(const at::Tensor& q, const at::Tensor& k,
                                                                         const at::Tensor& queue, double temperature) {
  return forward(q, k, queue, temperature, /*with_neg=*/true);
}

std::tuple<at::Tensor, at::Tensor> queue_infonce_backward_cpu(const at::Tensor& grad_loss, const at::Tensor& q,
                                                              const at::Tensor& k, const at::Tensor& queue,
                                                              const at::Tensor& lse, double temperature) {
  check_infonce_args(q, k, queue, temperature);
  const auto acc = infonce_acc_type(q);
  const Geometry geo(q, queue);
  check_infonce_rows("queue_infonce_backward", "grad_loss", grad_loss, q);
  check_infonce_rows("queue_infonce_backward", "lse", lse, q);
  if (q.numel() == 0) return {at::empty(q.sizes(), q.options()), at::empty(k.sizes(), k.options())};
  const auto qa = q.detach().to(acc).contiguous();  // [G, N, D]; detached: out= ops below refuse grad
  const auto ka = k.detach().to(acc).contiguous();
  const auto ga = grad_loss.to(acc).contiguous();  // [G, N]
  const auto la = lse.to(acc).contiguous();
  const auto queue_c = queue.detach().contiguous();
  auto dqa = at::empty({geo.G, geo.N, geo.D}, qa.options());
  auto dka = at::empty({geo.G, geo.N, geo.D}, qa.options());

  AT_DISPATCH_FLOATING_TYPES(acc, "queue_infonce_backward_cpu", [&] {
    using acc_t = scalar_t;
    const acc_t inv_t = acc_t(1) / static_cast<acc_t>(temperature);
    const acc_t* gp = ga.data_ptr<acc_t>();
    const acc_t* lp = la.data_ptr<acc_t>();
    // dq partials per split, each slice written by exactly one task.
    auto dq_part = at::zeros({geo.splits, geo.G, geo.N, geo.D}, qa.options());
    if (geo.K > 0) {
      for_each_logit_block<acc_t>(geo, qa, queue_c, [&](int64_t g, int64_t r0, int64_t nr, at::Tensor& logits,
                                                         const at::Tensor& block, int64_t split) {
        const int64_t nk = logits.size(1);
        acc_t* x = logits.data_ptr<acc_t>();
        for (int64_t r = 0; r < nr; ++r) {
          acc_t* row = x + r * nk;
          const acc_t sh = lp[g * geo.N + r0 + r];
          for (int64_t j = 0; j < nk; ++j) row[j] = row[j] * inv_t - sh;
        }
        logits.exp_();  // p_ij = infonce_prob(logit_ij, lse_i), vectorised
        for (int64_t r = 0; r < nr; ++r) {
          acc_t* row = x + r * nk;
          const acc_t c = gp[g * geo.N + r0 + r] * inv_t;
          for (int64_t j = 0; j < nk; ++j) row[j] *= c;
        }
        dq_part[split][g].narrow(0, r0, nr).addmm_(logits, block);  // [nr, D] += [nr, nk] @ [nk, D]
      });
    }
    // The partials already carry g_i / T.
    finish_rows<acc_t>(geo.G * geo.N, geo.D, qa.data_ptr<acc_t>(), ka.data_ptr<acc_t>(), gp, lp, inv_t,
                       dq_part.data_ptr<acc_t>(), geo.splits, [](int64_t) { return acc_t(1); },
                       dqa.data_ptr<acc_t>(), dka.data_ptr<acc_t>());
  });
  return {dqa.to(q.scalar_type()), dka.to(k.scalar_type())};
}

// The backward of queue_infonce_onepass: no pass over the queue.
std::tuple<at::Tensor, at::Tensor> queue_infonce_onepass_backward_cpu(const at::Tensor& grad_loss, const at::Tensor& q,
                                                                      const at::Tensor& k, const at::Tensor& lse,
                                                                      const at::Tensor& neg_mean, double temperature) {
  constexpr const char* op = "queue_infonce_onepass_backward";
  check_infonce_qk(op, q, k, temperature);
  check_infonce_rows(op, "grad_loss", grad_loss, q);
  check_infonce_rows(op, "lse", lse, q);
  const int64_t G = q.size(0), N = q.size(1), D = q.size(2);
  TORCH_CHECK(neg_mean.sizes() == q.sizes(), op, ": neg_mean must be [G, N, D] = ", q.sizes(), ", got ",
              neg_mean.sizes());
  if (q.numel() == 0) return {at::empty(q.sizes(), q.options()), at::empty(k.sizes(), k.options())};
  const auto acc = infonce_acc_type(q);
  const auto qa = q.detach().to(acc).contiguous();
  const auto ka = k.detach().to(acc).contiguous();
  const auto ga = grad_loss.to(acc).contiguous();
  const auto la = lse.to(acc).contiguous();
  const auto na = neg_mean.to(acc).contiguous();
  auto dqa = at::empty({G, N, D}, qa.options());
  auto dka = at::empty({G, N, D}, qa.options());
  AT_DISPATCH_FLOATING_TYPES(acc, "queue_infonce_onepass_backward_cpu", [&] {
    using acc_t = scalar_t;
    const acc_t inv_t = acc_t(1) / static_cast<acc_t>(temperature);
    const acc_t* gp = ga.data_ptr<acc_t>();
    finish_rows<acc_t>(G * N, D, qa.data_ptr<acc_t>(), ka.data_ptr<acc_t>(), gp, la.data_ptr<acc_t>(), inv_t,
                       na.data_ptr<acc_t>(), 1, [&](int64_t i) { return gp[i] * inv_t; }, dqa.data_ptr<acc_t>(),
                       dka.data_ptr<acc_t>());
  });
  return {dqa.to(q.scalar_type()), dka.to(k.scalar_type())};
}

}  // namespace
}  // namespace insloc

TORCH_LIBRARY_IMPL(insloc_ops, CPU, m) {
  m.impl("queue_infonce", &insloc::queue_infonce_cpu);
  m.impl("queue_infonce_backward", &insloc::queue_infonce_backward_cpu);
  m.impl("queue_infonce_onepass", &insloc::queue_infonce_onepass_cpu);
  m.impl("queue_infonce_onepass_backward", &insloc::queue_infonce_onepass_backward_cpu);
}
