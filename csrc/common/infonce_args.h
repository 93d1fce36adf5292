// Host-side argument checks of queue_infonce and its backwards, shared by the CPU and CUDA entry points
// (device placement and grid limits stay with the CUDA one).
#pragma once

#include <ATen/core/Tensor.h>
#include <c10/util/Exception.h>

#include <cmath>

namespace insloc {

// The smallest temperature: the kernels scale by 1 / temperature in float32, which must stay finite.
constexpr double kMinTemperature = 1e-38;

// q, k: [G, N, D], floating point, one dtype; temperature finite and at least kMinTemperature. `op`
// prefixes the messages.
inline void check_infonce_qk(const char* op, const at::Tensor& q, const at::Tensor& k, double temperature) {
  TORCH_CHECK(q.dim() == 3, op, ": q must be [G, N, D], got ", q.sizes());
  TORCH_CHECK(k.sizes() == q.sizes(), op, ": k must have q's shape ", q.sizes(), ", got ", k.sizes());
  TORCH_CHECK(at::isFloatingType(q.scalar_type()), op, ": q must be floating point, got ", q.scalar_type());
  TORCH_CHECK(k.scalar_type() == q.scalar_type(), op, ": k must have q's dtype ", q.scalar_type(), ", got ",
              k.scalar_type());
  TORCH_CHECK(std::isfinite(temperature) && temperature >= kMinTemperature, op,
              ": temperature must be a finite number >= 1e-38 (1 / temperature must be a finite float32), got ",
              temperature);
}

// queue: [G, K, D] with q's G and D, floating point.
inline void check_infonce_args(const at::Tensor& q, const at::Tensor& k, const at::Tensor& queue,
                               double temperature) {
  check_infonce_qk("queue_infonce", q, k, temperature);
  TORCH_CHECK(queue.dim() == 3 && queue.size(0) == q.size(0) && queue.size(2) == q.size(2),
              "queue_infonce: queue must be [G, K, D] with q's G and D ", q.sizes(), ", got ", queue.sizes());
  TORCH_CHECK(at::isFloatingType(queue.scalar_type()), "queue_infonce: queue must be floating point, got ",
              queue.scalar_type());
}

// A per-row tensor of the backward (grad_loss, lse): [G, N] of q.
inline void check_infonce_rows(const char* op, const char* name, const at::Tensor& t, const at::Tensor& q) {
  TORCH_CHECK(t.dim() == 2 && t.size(0) == q.size(0) && t.size(1) == q.size(1), op, ": ", name,
              " must be [G, N] = [", q.size(0), ", ", q.size(1), "], got ", t.sizes());
  TORCH_CHECK(t.device() == q.device(), op, ": ", name, " must be on q's device ", q.device(), ", got ",
              t.device());
}

// fp64 inputs accumulate in fp64, everything else in fp32.
inline at::ScalarType infonce_acc_type(const at::Tensor& q) {
  return q.scalar_type() == at::kDouble ? at::kDouble : at::kFloat;
}

}  // namespace insloc
