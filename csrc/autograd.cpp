// Autograd of the coupling, ActNorm and 1x1-convolution ops in C++ (the Autograd dispatch key of
// invkernels::affine_coupling_fwd, _inv, additive_coupling_fwd, _inv, actnorm_fwd, _inv,
// invconv_weight and conv1x1), for every device the C++ kernels serve. The formulas are those of
// invkernels/ops/coupling.py's, actnorm.py's and invconv.py's docstrings: the affine forward saves x
// and h, the affine inverse its output x and h, and the backward is the fused affine_coupling_bwd
// op; the additive ops save nothing and their backward is views of the output gradient; ActNorm
// saves x (the inverse: its output) and the parameters, and its backward is actnorm_bwd;
// invconv_weight saves its inputs and its backward is invconv_weight_bwd (perm and sign, constants
// of the parameterization, get no gradient); conv1x1 saves its inputs and its backward is
// conv1x1_bwd, asked only for the gradients needed.
//
// Why C++: on a tabular flow (x of shape [512, 8]) an op's work is a few microseconds, and a
// Python autograd kernel (torch.library.register_autograd) added ~60 us to each forward+backward:
// the Python kernel runs on every call, grad or not, and its backward node runs Python too.
//
// Higher derivatives: the backward runs the fused op below autograd when grad mode is off (the
// usual backward). Under create_graph=True it calls the backward op through the dispatcher, whose
// Autograd kernel (registered in Python by invkernels/ops/_registry.py) computes the same formula
// in differentiable reference ops, as the Triton twins' backward does.

#include <ATen/ATen.h>
#include <ATen/core/dispatch/Dispatcher.h>
#include <torch/autograd.h>
#include <torch/library.h>

#include <array>
#include <optional>
#include <string>
#include <tuple>

namespace invk {
namespace {

using torch::autograd::AutogradContext;
using torch::autograd::variable_list;
using Pair = std::tuple<at::Tensor, at::Tensor>;

const c10::TypedOperatorHandle<Pair(const at::Tensor&, const at::Tensor&, c10::string_view, double,
                                    std::optional<int64_t>)>&
affine_op(bool inverse) {
  static const auto fwd = c10::Dispatcher::singleton()
                              .findSchemaOrThrow("invkernels::affine_coupling_fwd", "")
                              .typed<Pair(const at::Tensor&, const at::Tensor&, c10::string_view, double,
                                          std::optional<int64_t>)>();
  static const auto inv = c10::Dispatcher::singleton()
                              .findSchemaOrThrow("invkernels::affine_coupling_inv", "")
                              .typed<Pair(const at::Tensor&, const at::Tensor&, c10::string_view, double,
                                          std::optional<int64_t>)>();
  return inverse ? inv : fwd;
}

const c10::TypedOperatorHandle<at::Tensor(const at::Tensor&, const at::Tensor&, std::optional<int64_t>)>&
additive_op(bool inverse) {
  using Sig = at::Tensor(const at::Tensor&, const at::Tensor&, std::optional<int64_t>);
  static const auto fwd =
      c10::Dispatcher::singleton().findSchemaOrThrow("invkernels::additive_coupling_fwd", "").typed<Sig>();
  static const auto inv =
      c10::Dispatcher::singleton().findSchemaOrThrow("invkernels::additive_coupling_inv", "").typed<Sig>();
  return inverse ? inv : fwd;
}

// A backward op: below autograd in the usual backward, through its Autograd kernel (differentiable)
// when grad mode is on.
template <typename Sig, typename... Args>
auto call_backward(const c10::TypedOperatorHandle<Sig>& op, Args&&... args) {
  if (at::GradMode::is_enabled()) return op.call(std::forward<Args>(args)...);
  at::AutoDispatchBelowADInplaceOrView below;
  return op.call(std::forward<Args>(args)...);
}

Pair affine_bwd(const at::Tensor& grad_out, const at::Tensor& grad_logdet, const at::Tensor& x, const at::Tensor& h,
                c10::string_view scale, double clamp, bool reverse, std::optional<int64_t> passthrough) {
  static const auto op = c10::Dispatcher::singleton()
                             .findSchemaOrThrow("invkernels::affine_coupling_bwd", "")
                             .typed<Pair(const at::Tensor&, const at::Tensor&, const at::Tensor&, const at::Tensor&,
                                         c10::string_view, double, bool, std::optional<int64_t>)>();
  return call_backward(op, grad_out, grad_logdet, x, h, scale, clamp, reverse, passthrough);
}

std::optional<int64_t> passthrough_of(const AutogradContext* ctx) {
  const c10::IValue& p = ctx->saved_data.at("passthrough");
  return p.isNone() ? std::nullopt : std::optional<int64_t>(p.toInt());
}

class AffineCoupling : public torch::autograd::Function<AffineCoupling> {
 public:
  static variable_list forward(AutogradContext* ctx, const at::Tensor& in, const at::Tensor& h,
                               c10::string_view scale, double clamp, std::optional<int64_t> passthrough,
                               bool inverse) {
    Pair out;
    {
      at::AutoDispatchBelowADInplaceOrView below;
      out = affine_op(inverse).call(in, h, scale, clamp, passthrough);
    }
    // The backward needs the forward's input x: the input of the forward op, the output of the
    // inverse op.
    ctx->save_for_backward({inverse ? std::get<0>(out) : in, h});
    ctx->saved_data["scale"] = std::string(scale);
    ctx->saved_data["clamp"] = clamp;
    ctx->saved_data["passthrough"] = passthrough;
    ctx->saved_data["inverse"] = inverse;
    return {std::get<0>(out), std::get<1>(out)};
  }

  static variable_list backward(AutogradContext* ctx, variable_list grads) {
    const bool need_in = ctx->needs_input_grad(0), need_h = ctx->needs_input_grad(1);
    variable_list result(6);
    if (!need_in && !need_h) return result;
    const variable_list saved = ctx->get_saved_variables();
    const std::string scale = ctx->saved_data.at("scale").toStringRef();
    auto [grad_in, grad_h] = affine_bwd(grads[0], grads[1], saved[0], saved[1], scale,
                                        ctx->saved_data.at("clamp").toDouble(), ctx->saved_data.at("inverse").toBool(),
                                        passthrough_of(ctx));
    if (need_in) result[0] = grad_in;
    if (need_h) result[1] = grad_h;
    return result;
  }
};

class AdditiveCoupling : public torch::autograd::Function<AdditiveCoupling> {
 public:
  static variable_list forward(AutogradContext* ctx, const at::Tensor& in, const at::Tensor& h,
                               std::optional<int64_t> passthrough, bool inverse) {
    at::Tensor out;
    {
      at::AutoDispatchBelowADInplaceOrView below;
      out = additive_op(inverse).call(in, h, passthrough);
    }
    ctx->saved_data["passthrough"] = passthrough;
    ctx->saved_data["inverse"] = inverse;
    return {out};
  }

  // grad_in is the output gradient and grad_h its transformed channels (negated for the inverse):
  // no copies and no op call.
  static variable_list backward(AutogradContext* ctx, variable_list grads) {
    const at::Tensor& g = grads[0];
    variable_list result(4);
    if (ctx->needs_input_grad(0)) result[0] = g;
    if (ctx->needs_input_grad(1)) {
      const int64_t channels = g.size(1);
      const int64_t p = passthrough_of(ctx).value_or(channels / 2);
      at::Tensor g2 = g.narrow(1, p, channels - p);
      result[1] = ctx->saved_data.at("inverse").toBool() ? g2.neg() : g2;
    }
    return result;
  }
};

using Triple = std::tuple<at::Tensor, at::Tensor, at::Tensor>;
using ActNormSig = Pair(const at::Tensor&, const at::Tensor&, const at::Tensor&);

class ActNorm : public torch::autograd::Function<ActNorm> {
 public:
  static variable_list forward(AutogradContext* ctx, const at::Tensor& in, const at::Tensor& bias,
                               const at::Tensor& log_scale, bool inverse) {
    static const auto fwd =
        c10::Dispatcher::singleton().findSchemaOrThrow("invkernels::actnorm_fwd", "").typed<ActNormSig>();
    static const auto inv =
        c10::Dispatcher::singleton().findSchemaOrThrow("invkernels::actnorm_inv", "").typed<ActNormSig>();
    Pair out;
    {
      at::AutoDispatchBelowADInplaceOrView below;
      out = (inverse ? inv : fwd).call(in, bias, log_scale);
    }
    ctx->save_for_backward({inverse ? std::get<0>(out) : in, bias, log_scale});
    ctx->saved_data["inverse"] = inverse;
    return {std::get<0>(out), std::get<1>(out)};
  }

  static variable_list backward(AutogradContext* ctx, variable_list grads) {
    static const auto bwd = c10::Dispatcher::singleton()
                                .findSchemaOrThrow("invkernels::actnorm_bwd", "")
                                .typed<Triple(const at::Tensor&, const at::Tensor&, const at::Tensor&,
                                              const at::Tensor&, const at::Tensor&, bool)>();
    variable_list result(4);
    if (!ctx->needs_input_grad(0) && !ctx->needs_input_grad(1) && !ctx->needs_input_grad(2)) return result;
    const variable_list saved = ctx->get_saved_variables();
    auto [grad_in, grad_bias, grad_log_scale] =
        call_backward(bwd, grads[0], grads[1], saved[0], saved[1], saved[2], ctx->saved_data.at("inverse").toBool());
    if (ctx->needs_input_grad(0)) result[0] = grad_in;
    if (ctx->needs_input_grad(1)) result[1] = grad_bias;
    if (ctx->needs_input_grad(2)) result[2] = grad_log_scale;
    return result;
  }
};

using WeightBwdSig = Triple(const at::Tensor&, const at::Tensor&, const at::Tensor&, const at::Tensor&,
                            const at::Tensor&, const at::Tensor&);

using WeightSig = at::Tensor(const at::Tensor&, const at::Tensor&, const at::Tensor&, const at::Tensor&,
                              const at::Tensor&);

const c10::TypedOperatorHandle<WeightSig>& invconv_weight_op() {
  static const auto op =
      c10::Dispatcher::singleton().findSchemaOrThrow("invkernels::invconv_weight", "").typed<WeightSig>();
  return op;
}

class InvConvWeight : public torch::autograd::Function<InvConvWeight> {
 public:
  static variable_list forward(AutogradContext* ctx, const at::Tensor& perm, const at::Tensor& lower,
                               const at::Tensor& upper, const at::Tensor& sign, const at::Tensor& log_s) {
    at::Tensor w;
    {
      at::AutoDispatchBelowADInplaceOrView below;
      w = invconv_weight_op().call(perm, lower, upper, sign, log_s);
    }
    ctx->save_for_backward({perm, lower, upper, sign, log_s});
    return {w};
  }

  static variable_list backward(AutogradContext* ctx, variable_list grads) {
    static const auto bwd =
        c10::Dispatcher::singleton().findSchemaOrThrow("invkernels::invconv_weight_bwd", "").typed<WeightBwdSig>();
    variable_list result(5);
    const bool need_lower = ctx->needs_input_grad(1), need_upper = ctx->needs_input_grad(2);
    const bool need_log_s = ctx->needs_input_grad(4);
    if (!need_lower && !need_upper && !need_log_s) return result;
    const variable_list saved = ctx->get_saved_variables();
    auto [grad_lower, grad_upper, grad_log_s] =
        call_backward(bwd, grads[0], saved[0], saved[1], saved[2], saved[3], saved[4]);
    if (need_lower) result[1] = grad_lower;
    if (need_upper) result[2] = grad_upper;
    if (need_log_s) result[4] = grad_log_s;
    return result;
  }
};

using Quad = std::tuple<at::Tensor, at::Tensor, at::Tensor, at::Tensor>;
using Conv1x1Sig = at::Tensor(const at::Tensor&, const at::Tensor&, const std::optional<at::Tensor>&,
                              const std::optional<at::Tensor>&);

const c10::TypedOperatorHandle<Conv1x1Sig>& conv1x1_op() {
  static const auto op =
      c10::Dispatcher::singleton().findSchemaOrThrow("invkernels::conv1x1", "").typed<Conv1x1Sig>();
  return op;
}

std::optional<at::Tensor> given(const at::Tensor& t) {
  return t.defined() ? std::optional<at::Tensor>(t) : std::nullopt;
}

// The backward of conv1x1 for the saved inputs (x, weight[, bias, log_scale]): conv1x1_bwd asked
// for the gradients needed only.
variable_list conv1x1_backward(AutogradContext* ctx, const at::Tensor& grad_y, size_t inputs) {
  static const auto bwd =
      c10::Dispatcher::singleton()
          .findSchemaOrThrow("invkernels::conv1x1_bwd", "")
          .typed<Quad(const at::Tensor&, const at::Tensor&, const at::Tensor&, const std::optional<at::Tensor>&,
                      const std::optional<at::Tensor>&, std::array<bool, 3>)>();
  variable_list result(inputs);
  bool need[4] = {false, false, false, false};
  for (size_t i = 0; i < inputs; ++i) need[i] = ctx->needs_input_grad(i);
  if (!need[0] && !need[1] && !need[2] && !need[3]) return result;
  const variable_list saved = ctx->get_saved_variables();
  const std::optional<at::Tensor> bias = inputs == 4 ? given(saved[2]) : std::nullopt;
  const std::optional<at::Tensor> log_scale = inputs == 4 ? given(saved[3]) : std::nullopt;
  auto [grad_x, grad_weight, grad_bias, grad_log_scale] = call_backward(
      bwd, grad_y, saved[0], saved[1], bias, log_scale, std::array<bool, 3>{need[0], need[1], need[2] || need[3]});
  if (need[0]) result[0] = grad_x;
  if (need[1]) result[1] = grad_weight;
  if (need[2]) result[2] = grad_bias;
  if (need[3]) result[3] = grad_log_scale;
  return result;
}

class Conv1x1 : public torch::autograd::Function<Conv1x1> {
 public:
  static variable_list forward(AutogradContext* ctx, const at::Tensor& x, const at::Tensor& weight) {
    at::Tensor y;
    {
      at::AutoDispatchBelowADInplaceOrView below;
      y = conv1x1_op().call(x, weight, std::nullopt, std::nullopt);
    }
    ctx->save_for_backward({x, weight});
    return {y};
  }

  static variable_list backward(AutogradContext* ctx, variable_list grads) {
    return conv1x1_backward(ctx, grads[0], 2);
  }
};

// conv1x1 with an ActNorm folded in (bias and log_scale, given together).
class FoldedConv1x1 : public torch::autograd::Function<FoldedConv1x1> {
 public:
  static variable_list forward(AutogradContext* ctx, const at::Tensor& x, const at::Tensor& weight,
                               const at::Tensor& bias, const at::Tensor& log_scale) {
    at::Tensor y;
    {
      at::AutoDispatchBelowADInplaceOrView below;
      y = conv1x1_op().call(x, weight, bias, log_scale);
    }
    ctx->save_for_backward({x, weight, bias, log_scale});
    return {y};
  }

  static variable_list backward(AutogradContext* ctx, variable_list grads) {
    return conv1x1_backward(ctx, grads[0], 4);
  }
};

// Without grad (grad mode off, or no input requiring it) the op runs without a node and without
// the context's saved data.
bool records(const at::Tensor& a, const at::Tensor& b) {
  return at::GradMode::is_enabled() && (a.requires_grad() || b.requires_grad());
}

template <bool Inverse>
Pair actnorm(const at::Tensor& in, const at::Tensor& bias, const at::Tensor& log_scale) {
  if (!records(in, bias) && !(at::GradMode::is_enabled() && log_scale.requires_grad())) {
    static const auto op = c10::Dispatcher::singleton()
                               .findSchemaOrThrow(Inverse ? "invkernels::actnorm_inv" : "invkernels::actnorm_fwd", "")
                               .typed<ActNormSig>();
    at::AutoDispatchBelowADInplaceOrView below;
    return op.call(in, bias, log_scale);
  }
  const variable_list out = ActNorm::apply(in, bias, log_scale, Inverse);
  return {out[0], out[1]};
}

template <bool Inverse>
Pair affine_coupling(const at::Tensor& in, const at::Tensor& h, c10::string_view scale, double clamp,
                     std::optional<int64_t> passthrough) {
  if (!records(in, h)) {
    at::AutoDispatchBelowADInplaceOrView below;
    return affine_op(Inverse).call(in, h, scale, clamp, passthrough);
  }
  const variable_list out = AffineCoupling::apply(in, h, scale, clamp, passthrough, Inverse);
  return {out[0], out[1]};
}

template <bool Inverse>
at::Tensor additive_coupling(const at::Tensor& in, const at::Tensor& h, std::optional<int64_t> passthrough) {
  if (!records(in, h)) {
    at::AutoDispatchBelowADInplaceOrView below;
    return additive_op(Inverse).call(in, h, passthrough);
  }
  return AdditiveCoupling::apply(in, h, passthrough, Inverse)[0];
}

at::Tensor invconv_weight(const at::Tensor& perm, const at::Tensor& lower, const at::Tensor& upper,
                          const at::Tensor& sign, const at::Tensor& log_s) {
  if (!records(lower, upper) && !(at::GradMode::is_enabled() && log_s.requires_grad())) {
    at::AutoDispatchBelowADInplaceOrView below;
    return invconv_weight_op().call(perm, lower, upper, sign, log_s);
  }
  return InvConvWeight::apply(perm, lower, upper, sign, log_s)[0];
}

// Given alone, bias or log_scale reaches the op, whose checks refuse it.
at::Tensor conv1x1(const at::Tensor& x, const at::Tensor& weight, const std::optional<at::Tensor>& bias,
                   const std::optional<at::Tensor>& log_scale) {
  const bool folded = bias.has_value() && log_scale.has_value();
  const bool optional_grad = folded && (bias->requires_grad() || log_scale->requires_grad());
  if ((!records(x, weight) && !(at::GradMode::is_enabled() && optional_grad)) || bias.has_value() != folded ||
      log_scale.has_value() != folded) {
    at::AutoDispatchBelowADInplaceOrView below;
    return conv1x1_op().call(x, weight, bias, log_scale);
  }
  return folded ? FoldedConv1x1::apply(x, weight, *bias, *log_scale)[0] : Conv1x1::apply(x, weight)[0];
}

}  // namespace
}  // namespace invk

TORCH_LIBRARY_IMPL(invkernels, Autograd, m) {
  m.impl("invconv_weight", &invk::invconv_weight);
  m.impl("conv1x1", &invk::conv1x1);
  m.impl("affine_coupling_fwd", &invk::affine_coupling<false>);
  m.impl("affine_coupling_inv", &invk::affine_coupling<true>);
  m.impl("additive_coupling_fwd", &invk::additive_coupling<false>);
  m.impl("additive_coupling_inv", &invk::additive_coupling<true>);
  m.impl("actnorm_fwd", &invk::actnorm<false>);
  m.impl("actnorm_inv", &invk::actnorm<true>);
}
