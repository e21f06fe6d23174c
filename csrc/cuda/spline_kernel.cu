// CUDA backend of the rational-quadratic spline ops (docs/ops/spline.md), with the shared
// per-element math of csrc/kernels/spline.h. The forward and inverse give each thread block tiles
// of kChunk elements of one sample; the block reduces the tile's log-derivatives with CUB into one
// partial sum, and the partials of a sample are added in a fixed order (no atomics). The VJPs are
// elementwise (one thread per element, grid-stride).

#include <ATen/ATen.h>
#include <ATen/OpMathType.h>
#include <ATen/cuda/CUDAContext.h>
#include <c10/cuda/CUDAException.h>
#include <c10/cuda/CUDAGuard.h>
#include <torch/library.h>

#include <cub/block/block_reduce.cuh>

#include "../checks.h"
#include "../kernels/spline.h"
#include "../ops/spline_passthrough.h"
#include "launch.h"

namespace invk::cuda {
namespace {

constexpr int64_t kChunk = 4096;

// in, out: [B, skip + C * S] per sample (the transformed elements after the passed-through ones);
// h: [B, C * params, S]; partial: [B, chunks] per-tile log-det sums.
template <typename scalar_t, bool Inverse>
__global__ void spline_apply_kernel(const scalar_t* __restrict__ in, const scalar_t* __restrict__ h,
                                    scalar_t* __restrict__ out, acc_t<scalar_t>* __restrict__ partial,
                                    SplineSpec<acc_t<scalar_t>> spec, SplineShape sh, int64_t chunks) {
  using A = acc_t<scalar_t>;
  using Reduce = cub::BlockReduce<A, kThreads>;
  __shared__ typename Reduce::TempStorage tmp;
  const int64_t per_sample = sh.channels * sh.spatial;
  for (int64_t tile = blockIdx.x; tile < sh.batch * chunks; tile += gridDim.x) {
    const int64_t b = tile / chunks;
    const int64_t start = (tile % chunks) * kChunk;
    const int64_t stop = min(start + kChunk, per_sample);
    A sum = 0;
    for (int64_t k = start + threadIdx.x; k < stop; k += kThreads) {
      const int64_t i = b * per_sample + k;
      const int64_t plane = i / sh.spatial;
      A v, log_d;
      const int64_t d = sh.data_offset(i);
      spline_element(spec, StridedParams<A, scalar_t>{h + sh.param_offset(plane, i % sh.spatial), sh.spatial}, A(in[d]),
                     Inverse, &v, &log_d);
      out[d] = static_cast<scalar_t>(v);
      sum += log_d;
    }
    const A total = Reduce(tmp).Sum(sum);
    if (threadIdx.x == 0) partial[tile] = total;
    __syncthreads();
  }
}

// g, x, gin: [B, skip + C * S] per sample; h, gh: [B, C * params, S]; gl: [B].
template <typename scalar_t>
__global__ void spline_vjp_kernel(const scalar_t* __restrict__ g, const acc_t<scalar_t>* __restrict__ gl,
                                  const scalar_t* __restrict__ x, const scalar_t* __restrict__ h,
                                  scalar_t* __restrict__ gin, scalar_t* __restrict__ gh,
                                  SplineSpec<acc_t<scalar_t>> spec, SplineShape sh, bool reverse) {
  using A = acc_t<scalar_t>;
  const int64_t total = sh.planes() * sh.spatial;
  for (int64_t i = blockIdx.x * int64_t{kThreads} + threadIdx.x; i < total; i += int64_t{gridDim.x} * kThreads) {
    const int64_t plane = i / sh.spatial;
    const int64_t off = sh.param_offset(plane, i % sh.spatial);
    const int64_t d = sh.data_offset(i);
    gin[d] = static_cast<scalar_t>(spline_element_vjp(spec, StridedParams<A, scalar_t>{h + off, sh.spatial}, A(x[d]),
                                                      A(g[d]), gl[plane / sh.channels], reverse,
                                                      StridedGrads<A, scalar_t>{gh + off, sh.spatial}));
  }
}

// y, g, x, gx: [B, skip + C * S] per sample; h, gh: [B, C * params, S]; gl: [B].
template <typename scalar_t>
__global__ void spline_inv_vjp_kernel(const scalar_t* __restrict__ y, const scalar_t* __restrict__ h,
                                      const scalar_t* __restrict__ g, const acc_t<scalar_t>* __restrict__ gl,
                                      scalar_t* __restrict__ x, scalar_t* __restrict__ gx, scalar_t* __restrict__ gh,
                                      SplineSpec<acc_t<scalar_t>> spec, SplineShape sh) {
  using A = acc_t<scalar_t>;
  const int64_t total = sh.planes() * sh.spatial;
  for (int64_t i = blockIdx.x * int64_t{kThreads} + threadIdx.x; i < total; i += int64_t{gridDim.x} * kThreads) {
    const int64_t plane = i / sh.spatial;
    const int64_t off = sh.param_offset(plane, i % sh.spatial);
    const int64_t d = sh.data_offset(i);
    A g_x;
    x[d] = static_cast<scalar_t>(spline_element_inv_vjp(spec, StridedParams<A, scalar_t>{h + off, sh.spatial}, A(y[d]),
                                                        A(g[d]), gl[plane / sh.channels], &g_x,
                                                        StridedGrads<A, scalar_t>{gh + off, sh.spatial}));
    gx[d] = static_cast<scalar_t>(g_x);
  }
}

template <bool Inverse>
std::tuple<at::Tensor, at::Tensor> rq_spline(const at::Tensor& in_, const at::Tensor& h_, int64_t bins,
                                             double tail_bound, double min_bin_width, double min_bin_height,
                                             double min_derivative, int64_t passthrough) {
  constexpr const char* op = Inverse ? "rq_spline_inv" : "rq_spline_fwd";
  const SplineShape sh = check_spline(op, in_, h_, bins, tail_bound, min_bin_width, min_bin_height, min_derivative,
                                      passthrough, Inverse ? "y" : "x");
  const c10::cuda::CUDAGuard guard(in_.device());
  const at::Tensor in = in_.contiguous(), h = h_.contiguous();
  at::Tensor out = at::empty(in.sizes(), in.options());
  const int64_t chunks = std::max<int64_t>(1, (sh.channels * sh.spatial + kChunk - 1) / kChunk);
  at::Tensor partial = at::zeros({sh.batch, chunks}, in.options().dtype(logdet_dtype(in.scalar_type())));
  if (h.numel() > 0) {
    AT_DISPATCH_FLOATING_TYPES_AND2(at::kBFloat16, at::kHalf, in.scalar_type(), op, [&] {
      using A = acc_t<scalar_t>;
      spline_apply_kernel<scalar_t, Inverse>
          <<<grid_for(sh.batch * chunks), kThreads, 0, at::cuda::getCurrentCUDAStream()>>>(
              in.const_data_ptr<scalar_t>(), h.const_data_ptr<scalar_t>(), out.mutable_data_ptr<scalar_t>(),
              partial.mutable_data_ptr<A>(),
              spline_spec<A>(bins, tail_bound, min_bin_width, min_bin_height, min_derivative), sh, chunks);
      C10_CUDA_KERNEL_LAUNCH_CHECK();
    });
  }
  copy_passthrough(out, in, passthrough);
  return {out, partial.sum(1)};
}

std::tuple<at::Tensor, at::Tensor> rq_spline_bwd(const at::Tensor& g_, const at::Tensor& gl_, const at::Tensor& x_,
                                                 const at::Tensor& h_, int64_t bins, double tail_bound,
                                                 double min_bin_width, double min_bin_height, double min_derivative,
                                                 bool reverse, int64_t passthrough) {
  constexpr const char* op = "rq_spline_bwd";
  const SplineShape sh =
      check_spline(op, x_, h_, bins, tail_bound, min_bin_width, min_bin_height, min_derivative, passthrough);
  check_grad(op, g_, x_, "grad_out", "x");
  check_grad_logdet(op, gl_, x_);
  const c10::cuda::CUDAGuard guard(x_.device());
  const at::Tensor g = g_.contiguous(), gl = gl_.contiguous(), x = x_.contiguous(), h = h_.contiguous();
  at::Tensor gin = at::empty(x.sizes(), x.options());
  at::Tensor gh = at::empty(h.sizes(), h.options());
  if (h.numel() > 0) {
    AT_DISPATCH_FLOATING_TYPES_AND2(at::kBFloat16, at::kHalf, x.scalar_type(), op, [&] {
      using A = acc_t<scalar_t>;
      spline_vjp_kernel<scalar_t>
          <<<grid_for_elements(sh.planes() * sh.spatial), kThreads, 0, at::cuda::getCurrentCUDAStream()>>>(
          g.const_data_ptr<scalar_t>(), gl.const_data_ptr<A>(), x.const_data_ptr<scalar_t>(),
          h.const_data_ptr<scalar_t>(), gin.mutable_data_ptr<scalar_t>(), gh.mutable_data_ptr<scalar_t>(),
          spline_spec<A>(bins, tail_bound, min_bin_width, min_bin_height, min_derivative), sh, reverse);
      C10_CUDA_KERNEL_LAUNCH_CHECK();
    });
  }
  copy_passthrough(gin, g, passthrough);
  return {gin, gh};
}

std::tuple<at::Tensor, at::Tensor, at::Tensor> rq_spline_inv_bwd(const at::Tensor& y_, const at::Tensor& h_,
                                                                 const at::Tensor& g_, const at::Tensor& gl_,
                                                                 int64_t bins, double tail_bound, double min_bin_width,
                                                                 double min_bin_height, double min_derivative,
                                                                 int64_t passthrough) {
  constexpr const char* op = "rq_spline_inv_bwd";
  const SplineShape sh =
      check_spline(op, y_, h_, bins, tail_bound, min_bin_width, min_bin_height, min_derivative, passthrough, "y");
  check_grad(op, g_, y_, "grad_y", "y");
  check_grad_logdet(op, gl_, y_);
  const c10::cuda::CUDAGuard guard(y_.device());
  const at::Tensor y = y_.contiguous(), h = h_.contiguous(), g = g_.contiguous(), gl = gl_.contiguous();
  at::Tensor x = at::empty(y.sizes(), y.options());
  at::Tensor gx = at::empty(y.sizes(), y.options());
  at::Tensor gh = at::empty(h.sizes(), h.options());
  if (h.numel() > 0) {
    AT_DISPATCH_FLOATING_TYPES_AND2(at::kBFloat16, at::kHalf, y.scalar_type(), op, [&] {
      using A = acc_t<scalar_t>;
      spline_inv_vjp_kernel<scalar_t>
          <<<grid_for_elements(sh.planes() * sh.spatial), kThreads, 0, at::cuda::getCurrentCUDAStream()>>>(
              y.const_data_ptr<scalar_t>(), h.const_data_ptr<scalar_t>(), g.const_data_ptr<scalar_t>(),
              gl.const_data_ptr<A>(), x.mutable_data_ptr<scalar_t>(), gx.mutable_data_ptr<scalar_t>(),
              gh.mutable_data_ptr<scalar_t>(),
              spline_spec<A>(bins, tail_bound, min_bin_width, min_bin_height, min_derivative), sh);
      C10_CUDA_KERNEL_LAUNCH_CHECK();
    });
  }
  copy_passthrough(x, y, passthrough);
  copy_passthrough(gx, g, passthrough);
  return {x, gx, gh};
}

}  // namespace

TORCH_LIBRARY_IMPL(invkernels, CUDA, m) {
  m.impl("rq_spline_fwd", &rq_spline<false>);
  m.impl("rq_spline_inv", &rq_spline<true>);
  m.impl("rq_spline_bwd", &rq_spline_bwd);
  m.impl("rq_spline_inv_bwd", &rq_spline_inv_bwd);
}

}  // namespace invk::cuda
