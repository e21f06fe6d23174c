#pragma once

// Argument checks shared by every backend of the C++ ops. Messages name the op, the argument and
// the offending value; the Python backends (invkernels/_validation.py) use the same wording.

#include <ATen/ATen.h>
#include <ATen/OpMathType.h>
#include <c10/util/Exception.h>

#include <limits>
#include <optional>
#include <string>
#include <utility>
#include <vector>

#include "kernels/actnorm.h"
#include "kernels/coupling.h"
#include "kernels/spline.h"

namespace invk {

#define INVK_CHECK(cond, op, ...) TORCH_CHECK_VALUE(cond, op, ": ", __VA_ARGS__)

inline ScaleKind parse_scale(const char* op, c10::string_view scale, double clamp) {
  const bool exp = scale == "exp", atan = scale == "atan", rational = scale == "rational";
  if (exp || atan || rational) {
    // 1 / clamp and clamp must both be finite in float32, the compute type of most inputs.
    INVK_CHECK(clamp >= std::numeric_limits<float>::min() && clamp <= std::numeric_limits<float>::max(), op,
               "clamp should be positive and finite (within the float32 range) for scale='", std::string(scale),
               "', got ", clamp);
    return exp ? ScaleKind::Exp : atan ? ScaleKind::Atan : ScaleKind::Rational;
  }
  if (scale == "sigmoid_eps") return ScaleKind::SigmoidEps;
  INVK_CHECK(scale == "sigmoid", op, "scale should be one of 'exp', 'sigmoid', 'sigmoid_eps', 'atan', 'rational', got '",
             std::string(scale), "'");
  return ScaleKind::Sigmoid;
}

// Validates a coupling input x ([B, C, *spatial]) and returns the coupling geometry: the first
// `passthrough` channels pass through (0 <= passthrough < C), C // 2 of them when it is not given
// (then C >= 2).
inline CouplingShape check_coupling_input(const char* op, const at::Tensor& x, const char* x_name = "x",
                                          std::optional<int64_t> passthrough = std::nullopt) {
  INVK_CHECK(at::isFloatingType(x.scalar_type()), op, x_name, " should be a floating-point tensor, got ",
             x.scalar_type());
  INVK_CHECK(x.dim() >= 2, op, x_name, " should be at least 2-D (B, C, ...), got ", x.dim(), "-D");
  const int64_t channels = x.size(1);
  if (passthrough.has_value()) {
    INVK_CHECK(*passthrough >= 0 && *passthrough < channels, op, "passthrough should be an integer in [0, C) = [0, ",
               channels, ") for ", x_name, " with C=", channels, ", got ", *passthrough);
  } else {
    INVK_CHECK(channels >= 2, op, x_name, " should have at least 2 channels to split, got C=", channels);
  }
  CouplingShape shape{};
  shape.batch = x.size(0);
  shape.channels = channels;
  shape.c1 = passthrough.value_or(channels / 2);
  shape.c2 = channels - shape.c1;
  shape.spatial = 1;
  for (int64_t d = 2; d < x.dim(); ++d) shape.spatial *= x.size(d);
  return shape;
}

// Sizes of the additive shift h (and of its gradient) for a coupling input x: [B, C2, *spatial].
inline std::vector<int64_t> additive_shift_sizes(const at::Tensor& x, const CouplingShape& shape) {
  std::vector<int64_t> sizes = x.sizes().vec();
  sizes[1] = shape.c2;
  return sizes;
}

// Validates x ([B, C, *spatial]) and the subnet output h ([B, 2 * C2 or C2, *spatial]) and returns the
// coupling geometry (passthrough as check_coupling_input).
inline CouplingShape check_coupling(const char* op, const at::Tensor& x, const at::Tensor& h, bool affine,
                                    const char* x_name = "x", std::optional<int64_t> passthrough = std::nullopt) {
  const CouplingShape shape = check_coupling_input(op, x, x_name, passthrough);
  INVK_CHECK(h.scalar_type() == x.scalar_type(), op, x_name, " and h should have the same dtype, got ", x_name, " ",
             x.scalar_type(), " and h ", h.scalar_type());
  INVK_CHECK(h.device() == x.device(), op, x_name, " and h should be on the same device, got ", x_name, " on ",
             x.device(), " and h on ", h.device());
  INVK_CHECK(h.dim() == x.dim(), op, "h should have the same number of dimensions as ", x_name, " (", x.dim(),
             "), got ", h.dim());
  INVK_CHECK(h.size(0) == x.size(0), op, "h should have the batch size of ", x_name, " (", x.size(0), "), got ",
             h.size(0));
  INVK_CHECK(h.sizes().slice(2) == x.sizes().slice(2), op, "h should have the spatial shape of ", x_name, " ",
             x.sizes().slice(2), ", got ", h.sizes().slice(2));
  const int64_t want = affine ? 2 * shape.c2 : shape.c2;
  const char* formula = passthrough.has_value() ? (affine ? "2 * (C - passthrough)" : "C - passthrough")
                                                : (affine ? "2 * (C - C // 2)" : "C - C // 2");
  const std::string with_passthrough = passthrough.has_value() ? c10::str(", passthrough=", *passthrough) : "";
  INVK_CHECK(h.size(1) == want, op, "h should have ", formula, " = ", want, " channels for ", x_name, " with C=",
             shape.channels, with_passthrough, ", got ", h.size(1));
  return shape;
}

inline void check_grad(const char* op, const at::Tensor& grad, const at::Tensor& like, const char* name,
                       const char* like_name) {
  INVK_CHECK(grad.sizes() == like.sizes(), op, name, " should have the shape of ", like_name, " ", like.sizes(),
             ", got ", grad.sizes());
  INVK_CHECK(grad.scalar_type() == like.scalar_type(), op, name, " should have the dtype of ", like_name, " (",
             like.scalar_type(), "), got ", grad.scalar_type());
  INVK_CHECK(grad.device() == like.device(), op, name, " should be on the device of ", like_name, " (",
             like.device(), "), got ", grad.device());
}

// The dtype of a log-determinant for inputs of dtype x: the accumulation type, float32 for float16,
// bfloat16 and float32 (a half-precision log-det overflows at 65504), float64 for float64.
inline at::ScalarType logdet_dtype(at::ScalarType x) { return at::toOpMathType(x); }

inline void check_grad_logdet(const char* op, const at::Tensor& grad_logdet, const at::Tensor& x) {
  INVK_CHECK(grad_logdet.dim() == 1 && grad_logdet.size(0) == x.size(0), op,
             "grad_logdet should have shape [", x.size(0), "], got ", grad_logdet.sizes());
  const at::ScalarType want = logdet_dtype(x.scalar_type());
  INVK_CHECK(grad_logdet.scalar_type() == want, op, "grad_logdet should have the log-det dtype ", want, " (for x of ",
             x.scalar_type(), "), got ", grad_logdet.scalar_type());
  INVK_CHECK(grad_logdet.device() == x.device(), op, "grad_logdet should be on the device of x (", x.device(),
             "), got ", grad_logdet.device());
}

// Validates an ActNorm input x ([B, C, *spatial]) and its per-channel parameters.
inline ActNormShape check_actnorm(const char* op, const at::Tensor& x, const at::Tensor& bias,
                                  const at::Tensor& log_scale, const char* x_name = "x") {
  INVK_CHECK(at::isFloatingType(x.scalar_type()), op, x_name, " should be a floating-point tensor, got ",
             x.scalar_type());
  INVK_CHECK(x.dim() >= 2, op, x_name, " should be at least 2-D (B, C, ...), got ", x.dim(), "-D");
  const int64_t channels = x.size(1);
  for (const auto& [p, name] : {std::pair<const at::Tensor&, const char*>{bias, "bias"}, {log_scale, "log_scale"}}) {
    INVK_CHECK(p.dim() == 1 && p.size(0) == channels, op, name, " should have shape [C] = [", channels, "] for ",
               x_name, " with C=", channels, ", got ", p.sizes());
    INVK_CHECK(p.scalar_type() == x.scalar_type(), op, x_name, " and ", name, " should have the same dtype, got ",
               x_name, " ", x.scalar_type(), " and ", name, " ", p.scalar_type());
    INVK_CHECK(p.device() == x.device(), op, x_name, " and ", name, " should be on the same device, got ", x_name,
               " on ", x.device(), " and ", name, " on ", p.device());
  }
  ActNormShape shape{};
  shape.batch = x.size(0);
  shape.channels = channels;
  shape.spatial = 1;
  for (int64_t d = 2; d < x.dim(); ++d) shape.spatial *= x.size(d);
  return shape;
}

// The smallest minimum bin size and derivative of a spline (invkernels/_validation.py's
// SPLINE_MIN_FRACTION; docs/ops/spline.md, numerics).
constexpr double kSplineMinFraction = 1e-6;

inline void check_spline_fraction(const char* op, const char* name, double value, double limit,
                                  const std::string& limit_text) {
  INVK_CHECK(value >= kSplineMinFraction && value < limit, op, name, " should be a number in [", kSplineMinFraction,
             ", ", limit_text, "), got ", value);
}

// Validates a spline input x ([B, C, *spatial]) whose first `passthrough` channels are copied
// through, the parameters h ([B, (C - passthrough) * (3 * bins - 1), *spatial]) of the others and
// the settings; returns the geometry of the transformed channels (the spec is built by the caller
// in its compute type).
inline SplineShape check_spline(const char* op, const at::Tensor& x, const at::Tensor& h, int64_t bins,
                                double tail_bound, double min_bin_width, double min_bin_height,
                                double min_derivative, int64_t passthrough, const char* x_name = "x") {
  INVK_CHECK(at::isFloatingType(x.scalar_type()), op, x_name, " should be a floating-point tensor, got ",
             x.scalar_type());
  INVK_CHECK(x.dim() >= 2, op, x_name, " should be at least 2-D (B, C, ...), got ", x.dim(), "-D");
  INVK_CHECK(bins >= 1, op, "bins should be a positive integer, got ", bins);
  INVK_CHECK(tail_bound >= std::numeric_limits<float>::min() && tail_bound <= std::numeric_limits<float>::max(), op,
             "tail_bound should be positive and finite (within the float32 range), got ", tail_bound);
  const std::string per_bin = c10::str("1 / bins = ", 1.0 / static_cast<double>(bins));
  check_spline_fraction(op, "min_bin_width", min_bin_width, 1.0 / static_cast<double>(bins), per_bin);
  check_spline_fraction(op, "min_bin_height", min_bin_height, 1.0 / static_cast<double>(bins), per_bin);
  check_spline_fraction(op, "min_derivative", min_derivative, 1.0, "1");
  INVK_CHECK(passthrough >= 0 && passthrough < x.size(1), op, "passthrough should be an integer in [0, C) = [0, ",
             x.size(1), ") for ", x_name, " with C=", x.size(1), ", got ", passthrough);
  INVK_CHECK(h.scalar_type() == x.scalar_type(), op, x_name, " and h should have the same dtype, got ", x_name, " ",
             x.scalar_type(), " and h ", h.scalar_type());
  INVK_CHECK(h.device() == x.device(), op, x_name, " and h should be on the same device, got ", x_name, " on ",
             x.device(), " and h on ", h.device());
  const int64_t params = 3 * bins - 1;
  const int64_t channels = x.size(1) - passthrough;
  const int64_t want = channels * params;
  std::vector<int64_t> shape = x.sizes().vec();
  shape[1] = want;
  INVK_CHECK(h.dim() == x.dim() && h.size(0) == x.size(0) && h.sizes().slice(2) == x.sizes().slice(2), op,
             "h should have shape [B, (C - passthrough) * (3 * bins - 1), *spatial] = ", at::IntArrayRef(shape),
             " for ", x_name, " of shape ", x.sizes(), ", passthrough=", passthrough, " and bins=", bins, ", got ",
             h.sizes());
  INVK_CHECK(h.size(1) == want, op, "h should have (C - passthrough) * (3 * bins - 1) = ", want, " channels for ",
             x_name, " with C=", x.size(1), ", passthrough=", passthrough, " and bins=", bins, ", got ", h.size(1));
  SplineShape sh{};
  sh.batch = x.size(0);
  sh.channels = channels;
  sh.params = params;
  sh.spatial = 1;
  for (int64_t d = 2; d < x.dim(); ++d) sh.spatial *= x.size(d);
  sh.skip = passthrough * sh.spatial;
  return sh;
}

}  // namespace invk
