// CPU backend of the ActNorm ops (docs/ops/actnorm.md): one parallel pass over the (b, c) planes
// with the shared formulas of csrc/kernels/actnorm.h; the parameter gradients are per-plane
// partial sums added over the batch in a fixed order. The formulas are additions and
// multiplications, so the remainder of a plane runs as scalars (Remainder::kScalar): cheaper for
// the one-element planes of [B, C] inputs. Compiled once per CPU capability, like
// coupling_kernel.cpp.

#include <ATen/ATen.h>
#include <ATen/Dispatch.h>
#include <ATen/Parallel.h>
#include <torch/library.h>

#include <algorithm>
#include <array>
#include <cmath>
#include <vector>

#include "../checks.h"
#include "../kernels/actnorm.h"
#include "lanes.h"
#include "vec_math.h"

namespace invk::cpu {
namespace {

// Planes per task: at least ~16k elements of work per task.
int64_t plane_grain(const ActNormShape& sh) { return std::max<int64_t>(1, 16384 / std::max<int64_t>(1, sh.spatial)); }

// Outputs of at least this many bytes are written with streaming stores: far larger than the last
// level cache, so the next op reads them from memory either way.
constexpr int64_t kStreamBytes = int64_t{64} << 20;

bool streaming_output(const at::Tensor& out) {
  return static_cast<int64_t>(out.numel() * out.element_size()) >= kStreamBytes;
}

// S * sum(log_scale) for every sample, accumulated and returned in acc_t (float32 for half inputs,
// whose log-det overflows at 65504).
template <typename scalar_t>
at::Tensor actnorm_logdet(const at::Tensor& log_scale, const ActNormShape& sh, bool negate, const at::Tensor& like) {
  const scalar_t* ls = log_scale.const_data_ptr<scalar_t>();
  acc_t<scalar_t> total = 0;
  for (int64_t c = 0; c < sh.channels; ++c) total += static_cast<acc_t<scalar_t>>(ls[c]);
  total *= static_cast<acc_t<scalar_t>>(sh.spatial);
  return at::full({sh.batch}, static_cast<double>(negate ? -total : total),
                  like.options().dtype(logdet_dtype(like.scalar_type())));
}

template <bool Inverse>
std::tuple<at::Tensor, at::Tensor> actnorm(const at::Tensor& in_, const at::Tensor& bias_, const at::Tensor& ls_) {
  constexpr const char* op = Inverse ? "actnorm_inv" : "actnorm_fwd";
  const ActNormShape sh = check_actnorm(op, in_, bias_, ls_, Inverse ? "y" : "x");
  const at::Tensor in = in_.contiguous(), bias = bias_.contiguous(), ls = ls_.contiguous();
  at::Tensor out = at::empty(in.sizes(), in.options());
  at::Tensor logdet;
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kBFloat16, at::kHalf, in.scalar_type(), op, [&] {
    using A = acc_t<scalar_t>;
    const scalar_t* in_p = in.const_data_ptr<scalar_t>();
    const scalar_t* b_p = bias.const_data_ptr<scalar_t>();
    const scalar_t* ls_p = ls.const_data_ptr<scalar_t>();
    scalar_t* out_p = out.mutable_data_ptr<scalar_t>();
    const bool stream = streaming_output(out);
    at::parallel_for(0, sh.batch * sh.channels, plane_grain(sh), [&](int64_t begin, int64_t end) {
      for (int64_t plane = begin; plane < end; ++plane) {
        const int64_t c = plane % sh.channels;
        const A b = static_cast<A>(b_p[c]);
        const A s = Inverse ? actnorm_inv_scale(static_cast<A>(ls_p[c])) : actnorm_scale(static_cast<A>(ls_p[c]));
        const scalar_t* src = in_p + plane * sh.spatial;
        scalar_t* dst = out_p + plane * sh.spatial;
        store_lanes<scalar_t, Remainder::kScalar>(dst, sh.spatial, stream, [&](auto lane, int64_t i) {
          using C = typename decltype(lane)::type;
          const C v = lane.load(src + i);
          return Inverse ? actnorm_inverse<C>(v, C(b), C(s)) : actnorm_forward<C>(v, C(b), C(s));
        });
      }
    });
    logdet = actnorm_logdet<scalar_t>(ls, sh, Inverse, in);
  });
  return {out, logdet};
}

template <bool Reverse, typename scalar_t>
void actnorm_backward_apply(const at::Tensor& g, const at::Tensor& gl, const at::Tensor& x, const at::Tensor& bias,
                            const at::Tensor& ls, at::Tensor& gin, at::Tensor& gb, at::Tensor& gls,
                            const ActNormShape& sh) {
  using A = acc_t<scalar_t>;
  const scalar_t* g_p = g.const_data_ptr<scalar_t>();
  const scalar_t* x_p = x.const_data_ptr<scalar_t>();
  const scalar_t* b_p = bias.const_data_ptr<scalar_t>();
  const scalar_t* ls_p = ls.const_data_ptr<scalar_t>();
  scalar_t* gin_p = gin.mutable_data_ptr<scalar_t>();
  std::vector<A> part_b(sh.batch * sh.channels), part_ls(sh.batch * sh.channels);
  at::parallel_for(0, sh.batch * sh.channels, plane_grain(sh), [&](int64_t begin, int64_t end) {
    for (int64_t plane = begin; plane < end; ++plane) {
      const int64_t c = plane % sh.channels;
      const A b = static_cast<A>(b_p[c]), log_s = static_cast<A>(ls_p[c]);
      const A s = actnorm_scale(log_s), inv_s = actnorm_inv_scale(log_s);
      const int64_t off = plane * sh.spatial;
      const auto sums = sum_lanes_n<scalar_t, 2, Remainder::kScalar>(sh.spatial, [&](auto lane, int64_t i) {
        using C = typename decltype(lane)::type;
        C g_in, g_b, g_ls;
        actnorm_backward<Reverse, C>(lane.load(g_p + off + i), lane.load(x_p + off + i), C(b), C(s), C(inv_s), g_in,
                                     g_b, g_ls);
        lane.store(gin_p + off + i, g_in);
        return std::array<C, 2>{g_b, g_ls};
      });
      part_b[plane] = sums[0];
      part_ls[plane] = sums[1];
    }
  });
  const A* gl_p = gl.const_data_ptr<A>();
  A gl_total = 0;
  for (int64_t b = 0; b < sh.batch; ++b) gl_total += gl_p[b];
  const A logdet_term = (Reverse ? -gl_total : gl_total) * static_cast<A>(sh.spatial);
  scalar_t* gb_p = gb.mutable_data_ptr<scalar_t>();
  scalar_t* gls_p = gls.mutable_data_ptr<scalar_t>();
  for (int64_t c = 0; c < sh.channels; ++c) {
    A sb = 0, sls = 0;
    for (int64_t b = 0; b < sh.batch; ++b) {
      sb += part_b[b * sh.channels + c];
      sls += part_ls[b * sh.channels + c];
    }
    gb_p[c] = static_cast<scalar_t>(sb);
    gls_p[c] = static_cast<scalar_t>(sls + logdet_term);
  }
}

std::tuple<at::Tensor, at::Tensor, at::Tensor> actnorm_bwd(const at::Tensor& g_, const at::Tensor& gl_,
                                                           const at::Tensor& x_, const at::Tensor& bias_,
                                                           const at::Tensor& ls_, bool reverse) {
  constexpr const char* op = "actnorm_bwd";
  const ActNormShape sh = check_actnorm(op, x_, bias_, ls_);
  check_grad(op, g_, x_, "grad_out", "x");
  check_grad_logdet(op, gl_, x_);
  const at::Tensor g = g_.contiguous(), gl = gl_.contiguous(), x = x_.contiguous();
  const at::Tensor bias = bias_.contiguous(), ls = ls_.contiguous();
  at::Tensor gin = at::empty(x.sizes(), x.options());
  at::Tensor gb = at::empty(bias.sizes(), bias.options());
  at::Tensor gls = at::empty(ls.sizes(), ls.options());
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kBFloat16, at::kHalf, x.scalar_type(), op, [&] {
    if (reverse) {
      actnorm_backward_apply<true, scalar_t>(g, gl, x, bias, ls, gin, gb, gls, sh);
    } else {
      actnorm_backward_apply<false, scalar_t>(g, gl, x, bias, ls, gin, gb, gls, sh);
    }
  });
  return {gin, gb, gls};
}

}  // namespace

TORCH_LIBRARY_IMPL(invkernels, CPU, m) {
  m.impl("actnorm_fwd", &actnorm<false>);
  m.impl("actnorm_inv", &actnorm<true>);
  m.impl("actnorm_bwd", &actnorm_bwd);
}

}  // namespace invk::cpu
