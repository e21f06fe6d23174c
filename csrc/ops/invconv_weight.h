#pragma once

// Weight assembly of the LU-decomposed invertible 1x1 convolution (Glow), device-agnostic: the
// products go through at::matmul (the BLAS / cuBLAS torch uses), so the CPU and CUDA backends
// register the same functions; autocast is excluded inside, so W has the factors' dtype.
// Formulas: docs/ops/invconv.md.
//
//   L  = tril(lower, -1) + I,   U' = triu(upper, 1) + diag(sign * exp(log_s)),   W = P L U'
//   with (P M)[i, :] = M[perm[i], :].
//   VJP: dM = P^T dW, dlower = tril(dM U'^T, -1), dU' = L^T dM, dupper = triu(dU', 1),
//        dlog_s = diag(dU') * sign * exp(log_s).

#include <ATen/ATen.h>
#include <c10/core/impl/LocalDispatchKeySet.h>

#include <tuple>

#include "../checks.h"

namespace invk {

inline void check_invconv_factors(const char* op, const at::Tensor& perm, const at::Tensor& lower,
                                  const at::Tensor& upper, const at::Tensor& sign, const at::Tensor& log_s) {
  INVK_CHECK(lower.dim() == 2 && lower.size(0) == lower.size(1), op, "lower should be a square matrix, got shape ",
             lower.sizes());
  const int64_t c = lower.size(0);
  INVK_CHECK(at::isFloatingType(lower.scalar_type()), op, "lower should be a floating-point tensor, got ",
             lower.scalar_type());
  INVK_CHECK(upper.sizes() == lower.sizes(), op, "upper should have the shape of lower ", lower.sizes(), ", got ",
             upper.sizes());
  INVK_CHECK(perm.dim() == 1 && perm.size(0) == c && perm.scalar_type() == at::kLong, op,
             "perm should be an int64 vector of length ", c, ", got ", perm.scalar_type(), " of shape ",
             perm.sizes());
  for (const auto& [t, name] : {std::pair<const at::Tensor&, const char*>{sign, "sign"}, {log_s, "log_s"}}) {
    INVK_CHECK(t.dim() == 1 && t.size(0) == c, op, name, " should have shape [", c, "], got ", t.sizes());
  }
  for (const auto& [t, name] : {std::pair<const at::Tensor&, const char*>{upper, "upper"}, {sign, "sign"},
                                {log_s, "log_s"}}) {
    INVK_CHECK(t.scalar_type() == lower.scalar_type(), op, name, " should have the dtype of lower (",
               lower.scalar_type(), "), got ", t.scalar_type());
  }
  for (const auto& [t, name] : {std::pair<const at::Tensor&, const char*>{perm, "perm"}, {upper, "upper"},
                                {sign, "sign"}, {log_s, "log_s"}}) {
    INVK_CHECK(t.device() == lower.device(), op, name, " should be on the device of lower (", lower.device(),
               "), got ", t.device());
  }
}

inline at::Tensor invconv_lower(const at::Tensor& lower) {
  return at::tril(lower, -1) + at::eye(lower.size(0), lower.options());
}

inline at::Tensor invconv_upper(const at::Tensor& upper, const at::Tensor& sign, const at::Tensor& log_s) {
  return at::triu(upper, 1) + at::diag(sign * at::exp(log_s));
}

inline at::Tensor invconv_weight(const at::Tensor& perm, const at::Tensor& lower, const at::Tensor& upper,
                                 const at::Tensor& sign, const at::Tensor& log_s) {
  check_invconv_factors("invconv_weight", perm, lower, upper, sign, log_s);
  const c10::impl::ExcludeDispatchKeyGuard no_autocast(c10::autocast_dispatch_keyset);
  return at::matmul(invconv_lower(lower), invconv_upper(upper, sign, log_s)).index_select(0, perm);
}

inline std::tuple<at::Tensor, at::Tensor, at::Tensor> invconv_weight_bwd(const at::Tensor& grad_w,
                                                                        const at::Tensor& perm,
                                                                        const at::Tensor& lower,
                                                                        const at::Tensor& upper,
                                                                        const at::Tensor& sign,
                                                                        const at::Tensor& log_s) {
  constexpr const char* op = "invconv_weight_bwd";
  check_invconv_factors(op, perm, lower, upper, sign, log_s);
  check_grad(op, grad_w, lower, "grad_w", "lower");
  const c10::impl::ExcludeDispatchKeyGuard no_autocast(c10::autocast_dispatch_keyset);
  const at::Tensor dm = at::zeros_like(grad_w).index_copy_(0, perm, grad_w);
  const at::Tensor u = invconv_upper(upper, sign, log_s);
  const at::Tensor du = at::matmul(invconv_lower(lower).t(), dm);
  const at::Tensor grad_lower = at::tril(at::matmul(dm, u.t()), -1);
  const at::Tensor grad_log_s = at::diagonal(du) * sign * at::exp(log_s);
  return {grad_lower, at::triu(du, 1), grad_log_s};
}

}  // namespace invk
