// CUDA backend of the ActNorm ops (docs/ops/actnorm.md), with the shared formulas of
// csrc/kernels/actnorm.h. The backward gives each thread block one tile of kChunk elements of one
// channel; the block reduces its bias and log-scale terms with CUB into per-tile partial sums,
// which are then added per channel in a fixed order (no atomics).

#include <ATen/ATen.h>
#include <ATen/OpMathType.h>
#include <ATen/cuda/CUDAContext.h>
#include <c10/cuda/CUDAException.h>
#include <c10/cuda/CUDAGuard.h>
#include <torch/library.h>

#include <cub/block/block_reduce.cuh>

#include "../checks.h"
#include "../kernels/actnorm.h"
#include "launch.h"

namespace invk::cuda {
namespace {

constexpr int64_t kChunk = 4096;

// in, out: [B, C, S]; bias, log_scale: [C].
template <typename scalar_t, bool Inverse>
__global__ void actnorm_apply_kernel(const scalar_t* __restrict__ in, const scalar_t* __restrict__ bias,
                                     const scalar_t* __restrict__ log_scale, scalar_t* __restrict__ out,
                                     ActNormShape sh) {
  using A = acc_t<scalar_t>;
  const int64_t total = sh.batch * sh.channels * sh.spatial;
  for (int64_t idx = blockIdx.x * int64_t{kThreads} + threadIdx.x; idx < total;
       idx += int64_t{gridDim.x} * kThreads) {
    const int64_t c = (idx / sh.spatial) % sh.channels;
    const A b = A(bias[c]), ls = A(log_scale[c]);
    const A v = A(in[idx]);
    out[idx] = static_cast<scalar_t>(Inverse ? actnorm_inverse<A>(v, b, actnorm_inv_scale(ls))
                                             : actnorm_forward<A>(v, b, actnorm_scale(ls)));
  }
}

// g, x, gin: [B, C, S]; partial_b, partial_ls: [C, chunks] per-tile sums.
template <typename scalar_t, bool Reverse>
__global__ void actnorm_backward_kernel(const scalar_t* __restrict__ g, const scalar_t* __restrict__ x,
                                        const scalar_t* __restrict__ bias, const scalar_t* __restrict__ log_scale,
                                        scalar_t* __restrict__ gin, acc_t<scalar_t>* __restrict__ partial_b,
                                        acc_t<scalar_t>* __restrict__ partial_ls, ActNormShape sh, int64_t chunks) {
  using A = acc_t<scalar_t>;
  using Reduce = cub::BlockReduce<A, kThreads>;
  __shared__ typename Reduce::TempStorage tmp;
  const int64_t per_channel = sh.batch * sh.spatial;
  for (int64_t tile = blockIdx.x; tile < sh.channels * chunks; tile += gridDim.x) {
    const int64_t c = tile / chunks;
    const int64_t start = (tile % chunks) * kChunk;
    const int64_t stop = min(start + kChunk, per_channel);
    const A b = A(bias[c]), ls = A(log_scale[c]);
    const A s = actnorm_scale(ls), inv_s = actnorm_inv_scale(ls);
    A sum_b = 0, sum_ls = 0;
    for (int64_t k = start + threadIdx.x; k < stop; k += kThreads) {
      const int64_t idx = sh.channel_element(c, k);
      A g_in, g_b, g_ls;
      actnorm_backward<Reverse, A>(A(g[idx]), A(x[idx]), b, s, inv_s, g_in, g_b, g_ls);
      gin[idx] = static_cast<scalar_t>(g_in);
      sum_b += g_b;
      sum_ls += g_ls;
    }
    const A total_b = Reduce(tmp).Sum(sum_b);
    __syncthreads();
    const A total_ls = Reduce(tmp).Sum(sum_ls);
    if (threadIdx.x == 0) {
      partial_b[tile] = total_b;
      partial_ls[tile] = total_ls;
    }
    __syncthreads();
  }
}

template <bool Inverse>
std::tuple<at::Tensor, at::Tensor> actnorm(const at::Tensor& in_, const at::Tensor& bias_, const at::Tensor& ls_) {
  constexpr const char* op = Inverse ? "actnorm_inv" : "actnorm_fwd";
  const ActNormShape sh = check_actnorm(op, in_, bias_, ls_, Inverse ? "y" : "x");
  const c10::cuda::CUDAGuard guard(in_.device());
  const at::Tensor in = in_.contiguous(), bias = bias_.contiguous(), ls = ls_.contiguous();
  at::Tensor out = at::empty(in.sizes(), in.options());
  const int64_t total = in.numel();
  if (total > 0) {
    AT_DISPATCH_FLOATING_TYPES_AND2(at::kBFloat16, at::kHalf, in.scalar_type(), op, [&] {
      actnorm_apply_kernel<scalar_t, Inverse>
          <<<grid_for_elements(total), kThreads, 0, at::cuda::getCurrentCUDAStream()>>>(
              in.const_data_ptr<scalar_t>(), bias.const_data_ptr<scalar_t>(), ls.const_data_ptr<scalar_t>(),
              out.mutable_data_ptr<scalar_t>(), sh);
      C10_CUDA_KERNEL_LAUNCH_CHECK();
    });
  }
  const at::Tensor per_sample =
      ls.to(logdet_dtype(in.scalar_type())).sum() * static_cast<double>(Inverse ? -sh.spatial : sh.spatial);
  return {out, per_sample.expand({sh.batch}).contiguous()};
}

std::tuple<at::Tensor, at::Tensor, at::Tensor> actnorm_bwd(const at::Tensor& g_, const at::Tensor& gl_,
                                                           const at::Tensor& x_, const at::Tensor& bias_,
                                                           const at::Tensor& ls_, bool reverse) {
  constexpr const char* op = "actnorm_bwd";
  const ActNormShape sh = check_actnorm(op, x_, bias_, ls_);
  check_grad(op, g_, x_, "grad_out", "x");
  check_grad_logdet(op, gl_, x_);
  const c10::cuda::CUDAGuard guard(x_.device());
  const at::Tensor g = g_.contiguous(), x = x_.contiguous(), bias = bias_.contiguous(), ls = ls_.contiguous();
  at::Tensor gin = at::empty(x.sizes(), x.options());
  const auto acc_type = at::toOpMathType(x.scalar_type());
  const int64_t chunks = std::max<int64_t>(1, (sh.batch * sh.spatial + kChunk - 1) / kChunk);
  at::Tensor partial_b = at::zeros({sh.channels, chunks}, x.options().dtype(acc_type));
  at::Tensor partial_ls = at::zeros({sh.channels, chunks}, x.options().dtype(acc_type));
  if (x.numel() > 0) {
    AT_DISPATCH_FLOATING_TYPES_AND2(at::kBFloat16, at::kHalf, x.scalar_type(), op, [&] {
      using A = acc_t<scalar_t>;
      const auto launch = [&](auto rev) {
        actnorm_backward_kernel<scalar_t, decltype(rev)::value>
            <<<grid_for(sh.channels * chunks), kThreads, 0, at::cuda::getCurrentCUDAStream()>>>(
                g.const_data_ptr<scalar_t>(), x.const_data_ptr<scalar_t>(), bias.const_data_ptr<scalar_t>(),
                ls.const_data_ptr<scalar_t>(), gin.mutable_data_ptr<scalar_t>(), partial_b.mutable_data_ptr<A>(),
                partial_ls.mutable_data_ptr<A>(), sh, chunks);
      };
      if (reverse) {
        launch(std::true_type{});
      } else {
        launch(std::false_type{});
      }
      C10_CUDA_KERNEL_LAUNCH_CHECK();
    });
  }
  const at::Tensor logdet_term = gl_.sum() * static_cast<double>(reverse ? -sh.spatial : sh.spatial);
  return {gin, partial_b.sum(1).to(x.scalar_type()), (partial_ls.sum(1) + logdet_term).to(x.scalar_type())};
}

}  // namespace

TORCH_LIBRARY_IMPL(invkernels, CUDA, m) {
  m.impl("actnorm_fwd", &actnorm<false>);
  m.impl("actnorm_inv", &actnorm<true>);
  m.impl("actnorm_bwd", &actnorm_bwd);
}

}  // namespace invk::cuda
