#pragma once

// The per-position product of the invertible 1x1 convolution, optionally with an ActNorm folded
// in, device-agnostic: every product goes through at::mm / at::bmm (the BLAS / cuBLAS torch uses),
// so the CPU and CUDA backends register the same functions. Formulas: docs/ops/invconv.md.
//
//   y = W' x + b' at every position,  W' = W diag(exp(log_scale)),  b' = W' bias
//   (y = W ((x + bias) * exp(log_scale)): ActNorm then the 1x1 convolution, as one GEMM with a bias).
//   VJP with g = dy and the sums over batch and positions:
//     dx = W'^T g,  A = sum g x^T,  gb = sum g,  dW' = A + gb bias^T,
//     dW = dW' diag(exp(log_scale)),  dbias = W'^T gb,  dlog_scale = colsum(W' * dW').
//   ActNorm's factors and the dW / dlog_scale terms come from csrc/kernels/actnorm.h.
//
// The products run in the dtype of x even under autocast (the layers of a flow keep their inputs'
// precision, so the inverse stays exact to it): autocast is excluded inside the ops.
//
// Layouts: [B, C] inputs are one GEMM; channels-last-like inputs (channel stride 1) give
// channels-last results: 4-D ones go through torch's convolution with a 1x1 kernel (oneDNN on CPU,
// measured about 1.3x faster than the GEMM on the [N, C] view there; cuDNN on CUDA), others are one
// GEMM over all positions; any other input is viewed (or copied) as [B, C, S] and multiplied batch
// by batch with the weight broadcast, giving contiguous results.

#include <ATen/ATen.h>
#include <c10/core/impl/LocalDispatchKeySet.h>

#include <array>
#include <optional>
#include <tuple>
#include <vector>

#include "../checks.h"

namespace invk {

inline void check_conv1x1(const char* op, const at::Tensor& x, const at::Tensor& weight,
                          const std::optional<at::Tensor>& bias, const std::optional<at::Tensor>& log_scale,
                          const char* x_name = "x") {
  INVK_CHECK(at::isFloatingType(x.scalar_type()), op, x_name, " should be a floating-point tensor, got ",
             x.scalar_type());
  INVK_CHECK(x.dim() >= 2, op, x_name, " should be at least 2-D (B, C, ...), got ", x.dim(), "-D");
  const int64_t c = x.size(1);
  INVK_CHECK(weight.dim() == 2 && weight.size(0) == c && weight.size(1) == c, op, "weight should have shape [C, C] = [",
             c, ", ", c, "] for ", x_name, " with C=", c, ", got ", weight.sizes());
  INVK_CHECK(weight.scalar_type() == x.scalar_type(), op, x_name, " and weight should have the same dtype, got ",
             x_name, " ", x.scalar_type(), " and weight ", weight.scalar_type());
  INVK_CHECK(weight.device() == x.device(), op, x_name, " and weight should be on the same device, got ", x_name,
             " on ", x.device(), " and weight on ", weight.device());
  INVK_CHECK(bias.has_value() == log_scale.has_value(), op,
             "bias and log_scale (the folded ActNorm) should be given together or both be None, got ",
             (bias.has_value() ? "bias" : "log_scale"), " alone");
  if (bias.has_value()) check_actnorm(op, x, *bias, *log_scale, x_name);
}

// Channel stride 1 with the other dimensions in their order: one [N, C] matrix over all positions.
inline bool channels_last_like(const at::Tensor& x) {
  return x.dim() >= 3 && !x.is_contiguous() && x.movedim(1, -1).is_contiguous();
}

// 4-D channels-last inputs: a 1x1 convolution (its weight is w viewed as [C, C, 1, 1]).
inline bool use_convolution(const at::Tensor& x, bool channels_last) { return channels_last && x.dim() == 4; }

inline at::Tensor convolution_1x1(const at::Tensor& x, const at::Tensor& w, const std::optional<at::Tensor>& bias) {
  return at::convolution(x, w.view({w.size(0), w.size(1), 1, 1}), bias, {1, 1}, {0, 0}, {1, 1}, false, {0, 0}, 1);
}

// (grad_x, grad_w) of convolution_1x1 without its bias, each only when asked for.
inline std::tuple<at::Tensor, at::Tensor> convolution_1x1_bwd(const at::Tensor& grad_y, const at::Tensor& x,
                                                              const at::Tensor& w, bool need_x, bool need_w) {
  const int64_t c = w.size(0);
  auto [grad_x, grad_w, unused] = at::convolution_backward(
      grad_y, x, w.view({c, c, 1, 1}), std::nullopt, {1, 1}, {0, 0}, {1, 1}, false, {0, 0}, 1, {need_x, need_w, false});
  return {grad_x, need_w ? grad_w.view({c, c}) : grad_w};
}

inline int64_t conv1x1_spatial(const at::Tensor& x) {
  int64_t s = 1;
  for (int64_t d = 2; d < x.dim(); ++d) s *= x.size(d);
  return s;
}

// out[b, :, p] = w @ x[b, :, p] (+ bias); channels_last picks the layout (the backward multiplies
// grad_y in the layout chosen for x).
inline at::Tensor positionwise_product(const at::Tensor& x, const at::Tensor& w, const std::optional<at::Tensor>& bias,
                                       bool channels_last) {
  const int64_t c = x.size(1);
  if (x.dim() == 2) {
    return bias.has_value() ? at::addmm(*bias, x, w.t()) : at::mm(x, w.t());
  }
  if (use_convolution(x, channels_last)) return convolution_1x1(x, w, bias);
  if (channels_last) {
    const at::Tensor xl = x.movedim(1, -1);
    const at::Tensor x2 = xl.reshape({-1, c});
    const at::Tensor y2 = bias.has_value() ? at::addmm(*bias, x2, w.t()) : at::mm(x2, w.t());
    return y2.view(xl.sizes()).movedim(-1, 1);
  }
  const int64_t b = x.size(0), s = conv1x1_spatial(x);
  const at::Tensor x3 = x.reshape({b, c, s});
  const at::Tensor w3 = w.expand({b, c, c});
  const at::Tensor y3 = bias.has_value() ? at::baddbmm(bias->view({1, c, 1}).expand({b, c, s}), w3, x3)
                                         : at::bmm(w3, x3);
  return y3.view(x.sizes());
}

// The ActNorm formulas of csrc/kernels/actnorm.h over whole tensors (the folded ActNorm's factors).
template <>
struct MathOps<at::Tensor> {
  static at::Tensor exp(const at::Tensor& v) { return at::exp(v); }
};

// An ActNorm folded into the weight, in the accumulation type (float32 for reduced precision):
// W' = W diag(s), ActNorm's scale applied to the weight's columns, and b' = W' bias.
struct FoldedActNorm {
  at::Tensor weight;  // W [C, C]
  at::Tensor scale;  // s [1, C]
  at::Tensor folded_weight;  // W'
  at::Tensor folded_bias;  // b'
};

inline FoldedActNorm fold_actnorm(const at::Tensor& weight, const at::Tensor& bias, const at::Tensor& log_scale,
                                  at::ScalarType acc) {
  FoldedActNorm f{weight.to(acc), actnorm_scale(log_scale.to(acc)).unsqueeze(0), {}, {}};
  f.folded_weight = f.weight * f.scale;
  f.folded_bias = at::mv(f.folded_weight, bias.to(acc));
  return f;
}

inline at::ScalarType conv1x1_acc_type(const at::Tensor& x) {
  return x.scalar_type() == at::kDouble ? at::kDouble : at::kFloat;
}

inline at::Tensor conv1x1(const at::Tensor& x, const at::Tensor& weight, const std::optional<at::Tensor>& bias,
                          const std::optional<at::Tensor>& log_scale) {
  check_conv1x1("conv1x1", x, weight, bias, log_scale);
  const c10::impl::ExcludeDispatchKeyGuard no_autocast(c10::autocast_dispatch_keyset);
  if (!bias.has_value()) return positionwise_product(x, weight, std::nullopt, channels_last_like(x));
  const FoldedActNorm f = fold_actnorm(weight, *bias, *log_scale, conv1x1_acc_type(x));
  return positionwise_product(x, f.folded_weight.to(x.scalar_type()), f.folded_bias.to(x.scalar_type()),
                              channels_last_like(x));
}

// A = sum over batch and positions of g x^T, in the accumulation type.
inline at::Tensor positionwise_outer_sum(const at::Tensor& g, const at::Tensor& x, bool channels_last,
                                         at::ScalarType acc) {
  const int64_t c = x.size(1);
  if (x.dim() == 2) return at::mm(g.t(), x).to(acc);
  if (channels_last) {
    return at::mm(g.movedim(1, -1).reshape({-1, c}).t(), x.movedim(1, -1).reshape({-1, c})).to(acc);
  }
  const int64_t b = x.size(0), s = conv1x1_spatial(x);
  if (c <= s) {
    // B products of C x C; the partial sums take no more memory than x.
    const at::Tensor partial = at::bmm(g.reshape({b, c, s}), x.reshape({b, c, s}).transpose(1, 2));
    return at::sum(partial, {0}, false, acc);
  }
  return at::mm(g.transpose(0, 1).reshape({c, -1}), x.transpose(0, 1).reshape({c, -1}).t()).to(acc);
}

// (grad_x, sum g x^T in the accumulation type) of y = w x, each only when asked for.
inline std::pair<at::Tensor, at::Tensor> product_bwd(const at::Tensor& g, const at::Tensor& x, const at::Tensor& w,
                                                     bool channels_last, bool need_x, bool need_w,
                                                     at::ScalarType acc) {
  if (use_convolution(x, channels_last)) {
    auto [grad_x, grad_w] = convolution_1x1_bwd(g, x, w, need_x, need_w);
    return {grad_x, need_w ? grad_w.to(acc) : grad_w};
  }
  at::Tensor grad_x, grad_w;
  if (need_x) grad_x = positionwise_product(g, w.t(), std::nullopt, channels_last);
  if (need_w) grad_w = positionwise_outer_sum(g, x, channels_last, acc);
  return {grad_x, grad_w};
}

inline std::tuple<at::Tensor, at::Tensor, at::Tensor, at::Tensor> conv1x1_bwd(
    const at::Tensor& grad_y, const at::Tensor& x, const at::Tensor& weight, const std::optional<at::Tensor>& bias,
    const std::optional<at::Tensor>& log_scale, std::array<bool, 3> output_mask) {
  constexpr const char* op = "conv1x1_bwd";
  check_conv1x1(op, x, weight, bias, log_scale);
  check_grad(op, grad_y, x, "grad_y", "x");
  const c10::impl::ExcludeDispatchKeyGuard no_autocast(c10::autocast_dispatch_keyset);
  const bool channels_last = channels_last_like(x);
  const at::ScalarType acc = conv1x1_acc_type(x);
  at::Tensor grad_bias, grad_log_scale;
  if (!bias.has_value()) {
    auto [grad_x, outer] = product_bwd(grad_y, x, weight, channels_last, output_mask[0], output_mask[1], acc);
    return {grad_x, output_mask[1] ? outer.to(weight.scalar_type()) : outer, grad_bias, grad_log_scale};
  }
  const FoldedActNorm f = fold_actnorm(weight, *bias, *log_scale, acc);
  const bool need_outer = output_mask[1] || output_mask[2];
  auto [grad_x, outer] =
      product_bwd(grad_y, x, f.folded_weight.to(x.scalar_type()), channels_last, output_mask[0], need_outer, acc);
  if (!need_outer) return {grad_x, at::Tensor(), grad_bias, grad_log_scale};
  std::vector<int64_t> reduce_dims{0};
  for (int64_t d = 2; d < x.dim(); ++d) reduce_dims.push_back(d);
  const at::Tensor gb = at::sum(grad_y, reduce_dims, false, acc);
  const at::Tensor grad_w_folded = outer + at::outer(gb, bias->to(acc));
  // ActNorm's VJP with W's entries as the centred values: dW and the terms of dlog_scale per entry.
  at::Tensor grad_w, grad_b_terms, grad_ls_terms;
  actnorm_backward_centred<false>(grad_w_folded, f.weight, f.scale, at::Tensor() /* inv_s: unused forward */, grad_w,
                                  grad_b_terms, grad_ls_terms);
  at::Tensor grad_weight;
  if (output_mask[1]) grad_weight = grad_w.to(weight.scalar_type());
  if (output_mask[2]) {
    grad_bias = at::mv(f.folded_weight.t(), gb).to(bias->scalar_type());
    grad_log_scale = grad_ls_terms.sum(0).to(log_scale->scalar_type());
  }
  return {grad_x, grad_weight, grad_bias, grad_log_scale};
}

}  // namespace invk
