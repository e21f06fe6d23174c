// CPU backend of the rational-quadratic spline ops (docs/ops/spline.md): one parallel pass over the
// (b, c) planes with the shared per-element math of csrc/kernels/spline.h, in float for
// half/bfloat16/float inputs and in double for double. Each plane writes one partial log-det,
// accumulated in double; the partials of a sample are added over its channels in a fixed order, so
// the log-det does not depend on the number of threads. Compiled once per CPU capability, like coupling_kernel.cpp.

#include <ATen/ATen.h>
#include <ATen/Dispatch.h>
#include <ATen/Parallel.h>
#include <torch/library.h>

#include <algorithm>
#include <vector>

#include "../checks.h"
#include "../kernels/spline.h"
#include "lanes.h"

namespace invk::cpu {
namespace {

// Planes per task: at least ~512 elements, each a few hundred flops.
int64_t plane_grain(const SplineShape& sh) { return std::max<int64_t>(1, 512 / std::max<int64_t>(1, sh.spatial)); }

template <typename A>
SplineSpec<A> spec_of(int64_t bins, double tail_bound, double min_bin_width, double min_bin_height,
                      double min_derivative) {
  return {static_cast<int>(bins), static_cast<A>(tail_bound), static_cast<A>(min_bin_width),
          static_cast<A>(min_bin_height), static_cast<A>(min_derivative)};
}

// logdet[b] = sum over the channels of b of the planes' partial sums (in double), in channel order.
template <typename A>
at::Tensor sum_planes(const std::vector<double>& part, const SplineShape& sh, const at::Tensor& like) {
  at::Tensor logdet = at::empty({sh.batch}, like.options().dtype(logdet_dtype(like.scalar_type())));
  A* out = logdet.mutable_data_ptr<A>();
  for (int64_t b = 0; b < sh.batch; ++b) {
    double total = 0;
    for (int64_t c = 0; c < sh.channels; ++c) total += part[b * sh.channels + c];
    out[b] = static_cast<A>(total);
  }
  return logdet;
}

template <bool Inverse>
std::tuple<at::Tensor, at::Tensor> rq_spline(const at::Tensor& in_, const at::Tensor& h_, int64_t bins,
                                             double tail_bound, double min_bin_width, double min_bin_height,
                                             double min_derivative) {
  constexpr const char* op = Inverse ? "rq_spline_inv" : "rq_spline_fwd";
  const SplineShape sh = check_spline(op, in_, h_, bins, tail_bound, min_bin_width, min_bin_height, min_derivative,
                                      Inverse ? "y" : "x");
  const at::Tensor in = in_.contiguous(), h = h_.contiguous();
  at::Tensor out = at::empty(in.sizes(), in.options());
  at::Tensor logdet;
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kBFloat16, at::kHalf, in.scalar_type(), op, [&] {
    using A = acc_t<scalar_t>;
    const SplineSpec<A> spec = spec_of<A>(bins, tail_bound, min_bin_width, min_bin_height, min_derivative);
    const scalar_t* in_p = in.const_data_ptr<scalar_t>();
    const scalar_t* h_p = h.const_data_ptr<scalar_t>();
    scalar_t* out_p = out.mutable_data_ptr<scalar_t>();
    std::vector<double> part(sh.planes());
    at::parallel_for(0, sh.planes(), plane_grain(sh), [&](int64_t begin, int64_t end) {
      for (int64_t plane = begin; plane < end; ++plane) {
        double sum = 0;
        for (int64_t s = 0; s < sh.spatial; ++s) {
          const int64_t i = plane * sh.spatial + s;
          A v, log_d;
          spline_element(spec, h_p + sh.param_offset(plane, s), sh.spatial, static_cast<A>(in_p[i]), Inverse, &v,
                         &log_d);
          out_p[i] = static_cast<scalar_t>(v);
          sum += log_d;
        }
        part[plane] = sum;
      }
    });
    logdet = sum_planes<A>(part, sh, in);
  });
  return {out, logdet};
}

// The log-det's gradient of each sample, in the compute type.
template <typename A>
std::vector<A> per_sample(const at::Tensor& grad_logdet) {
  const at::Tensor gl = grad_logdet.contiguous();
  const A* p = gl.const_data_ptr<A>();
  return std::vector<A>(p, p + gl.numel());
}

std::tuple<at::Tensor, at::Tensor> rq_spline_bwd(const at::Tensor& g_, const at::Tensor& gl_, const at::Tensor& x_,
                                                 const at::Tensor& h_, int64_t bins, double tail_bound,
                                                 double min_bin_width, double min_bin_height, double min_derivative,
                                                 bool reverse) {
  constexpr const char* op = "rq_spline_bwd";
  const SplineShape sh = check_spline(op, x_, h_, bins, tail_bound, min_bin_width, min_bin_height, min_derivative);
  check_grad(op, g_, x_, "grad_out", "x");
  check_grad_logdet(op, gl_, x_);
  const at::Tensor g = g_.contiguous(), x = x_.contiguous(), h = h_.contiguous();
  at::Tensor gin = at::empty(x.sizes(), x.options());
  at::Tensor gh = at::empty(h.sizes(), h.options());
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kBFloat16, at::kHalf, x.scalar_type(), op, [&] {
    using A = acc_t<scalar_t>;
    const SplineSpec<A> spec = spec_of<A>(bins, tail_bound, min_bin_width, min_bin_height, min_derivative);
    const std::vector<A> gl = per_sample<A>(gl_);
    const scalar_t* g_p = g.const_data_ptr<scalar_t>();
    const scalar_t* x_p = x.const_data_ptr<scalar_t>();
    const scalar_t* h_p = h.const_data_ptr<scalar_t>();
    scalar_t* gin_p = gin.mutable_data_ptr<scalar_t>();
    scalar_t* gh_p = gh.mutable_data_ptr<scalar_t>();
    at::parallel_for(0, sh.planes(), plane_grain(sh), [&](int64_t begin, int64_t end) {
      for (int64_t plane = begin; plane < end; ++plane) {
        const A g_l = gl[plane / sh.channels];
        for (int64_t s = 0; s < sh.spatial; ++s) {
          const int64_t i = plane * sh.spatial + s, off = sh.param_offset(plane, s);
          gin_p[i] = static_cast<scalar_t>(spline_element_vjp(spec, h_p + off, sh.spatial, static_cast<A>(x_p[i]),
                                                              static_cast<A>(g_p[i]), g_l, reverse, gh_p + off,
                                                              sh.spatial));
        }
      }
    });
  });
  return {gin, gh};
}

std::tuple<at::Tensor, at::Tensor, at::Tensor> rq_spline_inv_bwd(const at::Tensor& y_, const at::Tensor& h_,
                                                                 const at::Tensor& g_, const at::Tensor& gl_,
                                                                 int64_t bins, double tail_bound, double min_bin_width,
                                                                 double min_bin_height, double min_derivative) {
  constexpr const char* op = "rq_spline_inv_bwd";
  const SplineShape sh =
      check_spline(op, y_, h_, bins, tail_bound, min_bin_width, min_bin_height, min_derivative, "y");
  check_grad(op, g_, y_, "grad_y", "y");
  check_grad_logdet(op, gl_, y_);
  const at::Tensor y = y_.contiguous(), h = h_.contiguous(), g = g_.contiguous();
  at::Tensor x = at::empty(y.sizes(), y.options());
  at::Tensor gx = at::empty(y.sizes(), y.options());
  at::Tensor gh = at::empty(h.sizes(), h.options());
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kBFloat16, at::kHalf, y.scalar_type(), op, [&] {
    using A = acc_t<scalar_t>;
    const SplineSpec<A> spec = spec_of<A>(bins, tail_bound, min_bin_width, min_bin_height, min_derivative);
    const std::vector<A> gl = per_sample<A>(gl_);
    const scalar_t* y_p = y.const_data_ptr<scalar_t>();
    const scalar_t* g_p = g.const_data_ptr<scalar_t>();
    const scalar_t* h_p = h.const_data_ptr<scalar_t>();
    scalar_t* x_p = x.mutable_data_ptr<scalar_t>();
    scalar_t* gx_p = gx.mutable_data_ptr<scalar_t>();
    scalar_t* gh_p = gh.mutable_data_ptr<scalar_t>();
    at::parallel_for(0, sh.planes(), plane_grain(sh), [&](int64_t begin, int64_t end) {
      for (int64_t plane = begin; plane < end; ++plane) {
        const A g_l = gl[plane / sh.channels];
        for (int64_t s = 0; s < sh.spatial; ++s) {
          const int64_t i = plane * sh.spatial + s, off = sh.param_offset(plane, s);
          A g_x;
          x_p[i] = static_cast<scalar_t>(spline_element_inv_vjp(spec, h_p + off, sh.spatial, static_cast<A>(y_p[i]),
                                                                static_cast<A>(g_p[i]), g_l, &g_x, gh_p + off,
                                                                sh.spatial));
          gx_p[i] = static_cast<scalar_t>(g_x);
        }
      }
    });
  });
  return {x, gx, gh};
}

}  // namespace

TORCH_LIBRARY_IMPL(invkernels, CPU, m) {
  m.impl("rq_spline_fwd", &rq_spline<false>);
  m.impl("rq_spline_inv", &rq_spline<true>);
  m.impl("rq_spline_bwd", &rq_spline_bwd);
  m.impl("rq_spline_inv_bwd", &rq_spline_inv_bwd);
}

}  // namespace invk::cpu
