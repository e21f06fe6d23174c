// CPU registration of the invertible 1x1 convolution: weight assembly (csrc/ops/invconv_weight.h) and
// per-position product (csrc/ops/conv1x1.h); the products run in torch's BLAS. Weights of at most
// kDirectChannels channels (the tabular and 2-D flows) are assembled, and their VJP taken, by the
// loops below instead: there the dozen small tensor ops of the BLAS path cost more than the
// arithmetic (C^3 / 3 multiply-adds, in the factors' accumulation type).

#include <ATen/ATen.h>
#include <ATen/Dispatch.h>
#include <ATen/OpMathType.h>
#include <torch/library.h>

#include <algorithm>
#include <cmath>
#include <tuple>
#include <vector>

#include "../ops/conv1x1.h"
#include "../ops/invconv_weight.h"

namespace invk::cpu {
namespace {

constexpr int64_t kDirectChannels = 32;

bool direct(const at::Tensor& lower) { return lower.size(0) <= kDirectChannels; }

// perm must be a permutation of the rows: the loops index by it, and with an entry twice W would be
// singular while the log-det still reported sum(log_s) (and the VJP, which writes dM by perm, wrong).
void check_perm(const char* op, const at::Tensor& perm_) {
  const at::Tensor perm = perm_.contiguous();
  const int64_t c = perm.size(0);
  const int64_t* p = perm.const_data_ptr<int64_t>();
  std::vector<bool> seen(c, false);
  for (int64_t i = 0; i < c; ++i) {
    INVK_CHECK(p[i] >= 0 && p[i] < c, op, "perm should be a permutation of [0, ", c, "), got ", p[i], " at ", i);
    INVK_CHECK(!seen[p[i]], op, "perm should be a permutation of [0, ", c, "), got ", p[i], " twice");
    seen[p[i]] = true;
  }
}

// d_k = sign_k * exp(log_s_k), the diagonal of U'.
template <typename A, typename scalar_t>
std::vector<A> diagonal(const scalar_t* sign, const scalar_t* log_s, int64_t c) {
  std::vector<A> d(c);
  for (int64_t k = 0; k < c; ++k) d[k] = static_cast<A>(sign[k]) * std::exp(static_cast<A>(log_s[k]));
  return d;
}

// W[i, :] = M[perm[i], :] with M = L U': M[r, j] = Σ_{k < min(r, j)} lower[r, k] upper[k, j], plus
// upper[r, j] (r < j), d_r (r = j) or lower[r, j] d_j (r > j).
at::Tensor invconv_weight_direct(const at::Tensor& perm_, const at::Tensor& lower_, const at::Tensor& upper_,
                                 const at::Tensor& sign_, const at::Tensor& log_s_) {
  const int64_t c = lower_.size(0);
  const at::Tensor perm = perm_.contiguous(), lower = lower_.contiguous(), upper = upper_.contiguous();
  const at::Tensor sign = sign_.contiguous(), log_s = log_s_.contiguous();
  at::Tensor w = at::empty({c, c}, lower.options());
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, lower.scalar_type(), "invconv_weight", [&] {
    using A = at::opmath_type<scalar_t>;
    const int64_t* p = perm.const_data_ptr<int64_t>();
    const scalar_t* lo = lower.const_data_ptr<scalar_t>();
    const scalar_t* up = upper.const_data_ptr<scalar_t>();
    const std::vector<A> d = diagonal<A>(sign.const_data_ptr<scalar_t>(), log_s.const_data_ptr<scalar_t>(), c);
    scalar_t* out = w.mutable_data_ptr<scalar_t>();
    for (int64_t i = 0; i < c; ++i) {
      const int64_t r = p[i];
      for (int64_t j = 0; j < c; ++j) {
        A acc = 0;
        for (int64_t k = 0; k < std::min(r, j); ++k) {
          acc += static_cast<A>(lo[r * c + k]) * static_cast<A>(up[k * c + j]);
        }
        acc += r < j ? static_cast<A>(up[r * c + j]) : (r == j ? d[r] : static_cast<A>(lo[r * c + j]) * d[j]);
        out[i * c + j] = static_cast<scalar_t>(acc);
      }
    }
  });
  return w;
}

// dM = P^T dW (dM[perm[i], :] = dW[i, :]); dlower[r, k] = Σ_{j >= k} dM[r, j] U'[k, j] for k < r;
// dU'[k, j] = dM[k, j] + Σ_{r > k} lower[r, k] dM[r, j]; dupper = dU' above the diagonal;
// dlog_s[k] = dU'[k, k] d_k.
std::tuple<at::Tensor, at::Tensor, at::Tensor> invconv_weight_bwd_direct(const at::Tensor& grad_w_,
                                                                         const at::Tensor& perm_,
                                                                         const at::Tensor& lower_,
                                                                         const at::Tensor& upper_,
                                                                         const at::Tensor& sign_,
                                                                         const at::Tensor& log_s_) {
  const int64_t c = lower_.size(0);
  const at::Tensor grad_w = grad_w_.contiguous(), perm = perm_.contiguous(), lower = lower_.contiguous();
  const at::Tensor upper = upper_.contiguous(), sign = sign_.contiguous(), log_s = log_s_.contiguous();
  at::Tensor grad_lower = at::zeros({c, c}, lower.options());
  at::Tensor grad_upper = at::zeros({c, c}, lower.options());
  at::Tensor grad_log_s = at::empty({c}, lower.options());
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, lower.scalar_type(), "invconv_weight_bwd", [&] {
    using A = at::opmath_type<scalar_t>;
    const int64_t* p = perm.const_data_ptr<int64_t>();
    const scalar_t* g = grad_w.const_data_ptr<scalar_t>();
    const scalar_t* lo = lower.const_data_ptr<scalar_t>();
    const scalar_t* up = upper.const_data_ptr<scalar_t>();
    const std::vector<A> d = diagonal<A>(sign.const_data_ptr<scalar_t>(), log_s.const_data_ptr<scalar_t>(), c);
    std::vector<A> dm(c * c);
    for (int64_t i = 0; i < c; ++i) {
      for (int64_t j = 0; j < c; ++j) dm[p[i] * c + j] = static_cast<A>(g[i * c + j]);
    }
    scalar_t* gl = grad_lower.mutable_data_ptr<scalar_t>();
    scalar_t* gu = grad_upper.mutable_data_ptr<scalar_t>();
    scalar_t* gs = grad_log_s.mutable_data_ptr<scalar_t>();
    for (int64_t r = 0; r < c; ++r) {
      for (int64_t k = 0; k < r; ++k) {
        A acc = dm[r * c + k] * d[k];
        for (int64_t j = k + 1; j < c; ++j) acc += dm[r * c + j] * static_cast<A>(up[k * c + j]);
        gl[r * c + k] = static_cast<scalar_t>(acc);
      }
    }
    for (int64_t k = 0; k < c; ++k) {
      for (int64_t j = k; j < c; ++j) {
        A acc = dm[k * c + j];
        for (int64_t r = k + 1; r < c; ++r) acc += static_cast<A>(lo[r * c + k]) * dm[r * c + j];
        if (j == k) {
          gs[k] = static_cast<scalar_t>(acc * d[k]);
        } else {
          gu[k * c + j] = static_cast<scalar_t>(acc);
        }
      }
    }
  });
  return {grad_lower, grad_upper, grad_log_s};
}

at::Tensor invconv_weight(const at::Tensor& perm, const at::Tensor& lower, const at::Tensor& upper,
                          const at::Tensor& sign, const at::Tensor& log_s) {
  check_invconv_factors("invconv_weight", perm, lower, upper, sign, log_s);
  check_perm("invconv_weight", perm);
  if (!direct(lower)) return invk::invconv_weight(perm, lower, upper, sign, log_s);
  return invconv_weight_direct(perm, lower, upper, sign, log_s);
}

std::tuple<at::Tensor, at::Tensor, at::Tensor> invconv_weight_bwd(const at::Tensor& grad_w, const at::Tensor& perm,
                                                                  const at::Tensor& lower, const at::Tensor& upper,
                                                                  const at::Tensor& sign, const at::Tensor& log_s) {
  constexpr const char* op = "invconv_weight_bwd";
  check_invconv_factors(op, perm, lower, upper, sign, log_s);
  check_grad(op, grad_w, lower, "grad_w", "lower");
  check_perm(op, perm);
  if (!direct(lower)) return invk::invconv_weight_bwd(grad_w, perm, lower, upper, sign, log_s);
  return invconv_weight_bwd_direct(grad_w, perm, lower, upper, sign, log_s);
}

}  // namespace
}  // namespace invk::cpu

TORCH_LIBRARY_IMPL(invkernels, CPU, m) {
  m.impl("invconv_weight", &invk::cpu::invconv_weight);
  m.impl("invconv_weight_bwd", &invk::cpu::invconv_weight_bwd);
  m.impl("conv1x1", &invk::conv1x1);
  m.impl("conv1x1_bwd", &invk::conv1x1_bwd);
}
