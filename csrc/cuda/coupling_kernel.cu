// CUDA backend of the affine and additive coupling ops (docs/ops/coupling.md).
//
// The per-element math and the index arithmetic are the shared functions of
// csrc/kernels/coupling.h that the CPU backend runs and tests. Each thread block transforms
// kChunk elements of one sample's transformed half and writes one partial log-det (block
// reduction with CUB, no atomics); the partial sums are added per sample in a fixed order.
// The elementwise backward and fused inverse+backward kernels run one thread per transformed
// element. The passthrough half is a strided ATen copy.

#include <ATen/ATen.h>
#include <ATen/OpMathType.h>
#include <ATen/cuda/CUDAContext.h>
#include <c10/cuda/CUDAException.h>
#include <c10/cuda/CUDAGuard.h>
#include <torch/library.h>

#include <cub/block/block_reduce.cuh>

#include "../checks.h"
#include "../kernels/coupling.h"
#include "launch.h"

namespace invk::cuda {
namespace {

constexpr int64_t kChunk = 4096;

// Copies the passthrough half (x[:, :c1]) of every sample with ATen's strided copy (one kernel
// on the current stream, int64 indexing, no limit on the pitch).
void copy_passthrough(const at::Tensor& src, at::Tensor& dst, const CouplingShape& sh) {
  if (sh.batch == 0 || sh.n1() == 0) return;
  const auto first_half = [&](const at::Tensor& t) { return t.view({sh.batch, sh.x_stride()}).narrow(1, 0, sh.n1()); };
  first_half(dst).copy_(first_half(src));
}

// in, out: [B, C, S]; h: [B, 2 * C2, S]; partial: [B * chunks] log-det partial sums.
template <typename scalar_t, ScaleKind K, bool Inverse>
__global__ void affine_apply_kernel(const scalar_t* __restrict__ in, const scalar_t* __restrict__ h,
                                    scalar_t* __restrict__ out, acc_t<scalar_t>* __restrict__ partial,
                                    CouplingShape sh, int64_t chunks, ScaleParams<acc_t<scalar_t>> p) {
  using A = acc_t<scalar_t>;
  using Reduce = cub::BlockReduce<A, kThreads>;
  __shared__ typename Reduce::TempStorage tmp;
  const int64_t n2 = sh.n2();
  for (int64_t tile = blockIdx.x; tile < sh.batch * chunks; tile += gridDim.x) {
    const int64_t b = tile / chunks;
    const int64_t start = (tile % chunks) * kChunk;
    const int64_t stop = min(start + kChunk, n2);
    const scalar_t* x2 = in + sh.x2_offset(b);
    const scalar_t* hs = h + sh.affine_scale_offset(b);
    const scalar_t* t = h + sh.affine_shift_offset(b);
    scalar_t* y2 = out + sh.x2_offset(b);
    A local = 0;
    for (int64_t i = start + threadIdx.x; i < stop; i += kThreads) {
      A L;
      const A v = Inverse ? affine_inverse<K, A>(A(x2[i]), A(hs[i]), A(t[i]), p, L)
                          : affine_forward<K, A>(A(x2[i]), A(hs[i]), A(t[i]), p, L);
      y2[i] = static_cast<scalar_t>(v);
      local += L;
    }
    const A total = Reduce(tmp).Sum(local);
    if (threadIdx.x == 0) partial[tile] = Inverse ? -total : total;
    __syncthreads();
  }
}

// g, x, gin: [B, C, S]; h, gh: [B, 2 * C2, S]; gl: [B] in acc_t. Transformed half only.
template <typename scalar_t, ScaleKind K, bool Reverse>
__global__ void affine_backward_kernel(const scalar_t* __restrict__ g, const acc_t<scalar_t>* __restrict__ gl,
                                       const scalar_t* __restrict__ x, const scalar_t* __restrict__ h,
                                       scalar_t* __restrict__ gin, scalar_t* __restrict__ gh, CouplingShape sh,
                                       ScaleParams<acc_t<scalar_t>> p) {
  using A = acc_t<scalar_t>;
  const int64_t n2 = sh.n2();
  const int64_t total = sh.batch * n2;
  for (int64_t idx = blockIdx.x * int64_t{kThreads} + threadIdx.x; idx < total;
       idx += int64_t{gridDim.x} * kThreads) {
    const int64_t b = idx / n2, i = idx % n2;
    const int64_t xo = sh.x2_offset(b) + i, so = sh.affine_scale_offset(b) + i, to = sh.affine_shift_offset(b) + i;
    A g_in, g_hs, g_t;
    affine_backward<K, Reverse, A>(A(g[xo]), gl[b], A(x[xo]), A(h[so]), p, g_in, g_hs, g_t);
    gin[xo] = static_cast<scalar_t>(g_in);
    gh[so] = static_cast<scalar_t>(g_hs);
    gh[to] = static_cast<scalar_t>(g_t);
  }
}

// Inverse and backward in one pass (memory-free backprop): rebuilds x2 from y2 and back-propagates
// g (gradient of y2) and gl (of the log-det) through the forward at x2.
// y, g, x, gin: [B, C, S]; h, gh: [B, 2 * C2, S]; gl: [B] in acc_t. Transformed half only.
template <typename scalar_t, ScaleKind K>
__global__ void affine_inverse_backward_kernel(const scalar_t* __restrict__ y, const scalar_t* __restrict__ h,
                                               const scalar_t* __restrict__ g,
                                               const acc_t<scalar_t>* __restrict__ gl,
                                               scalar_t* __restrict__ x, scalar_t* __restrict__ gin,
                                               scalar_t* __restrict__ gh, CouplingShape sh,
                                               ScaleParams<acc_t<scalar_t>> p) {
  using A = acc_t<scalar_t>;
  const int64_t n2 = sh.n2();
  const int64_t total = sh.batch * n2;
  for (int64_t idx = blockIdx.x * int64_t{kThreads} + threadIdx.x; idx < total;
       idx += int64_t{gridDim.x} * kThreads) {
    const int64_t b = idx / n2, i = idx % n2;
    const int64_t xo = sh.x2_offset(b) + i, so = sh.affine_scale_offset(b) + i, to = sh.affine_shift_offset(b) + i;
    A x2, g_in, g_hs, g_t;
    affine_inverse_backward<K, A>(A(y[xo]), A(h[so]), A(h[to]), A(g[xo]), gl[b], p, x2, g_in, g_hs, g_t);
    x[xo] = static_cast<scalar_t>(x2);
    gin[xo] = static_cast<scalar_t>(g_in);
    gh[so] = static_cast<scalar_t>(g_hs);
    gh[to] = static_cast<scalar_t>(g_t);
  }
}

// in, out: [B, C, S]; t: [B, C2, S]. Transformed half only.
template <typename scalar_t, bool Inverse>
__global__ void additive_apply_kernel(const scalar_t* __restrict__ in, const scalar_t* __restrict__ t,
                                      scalar_t* __restrict__ out, CouplingShape sh) {
  using A = acc_t<scalar_t>;
  const int64_t n2 = sh.n2();
  const int64_t total = sh.batch * n2;
  for (int64_t idx = blockIdx.x * int64_t{kThreads} + threadIdx.x; idx < total;
       idx += int64_t{gridDim.x} * kThreads) {
    const int64_t b = idx / n2, i = idx % n2;
    const int64_t xo = sh.x2_offset(b) + i, to = sh.additive_shift_offset(b) + i;
    const A a = A(in[xo]), s = A(t[to]);
    out[xo] = static_cast<scalar_t>(Inverse ? additive_inverse<A>(a, s) : additive_forward<A>(a, s));
  }
}

// g, gin: [B, C, S]; gh: [B, C2, S].
template <typename scalar_t>
__global__ void additive_backward_kernel(const scalar_t* __restrict__ g, scalar_t* __restrict__ gin,
                                         scalar_t* __restrict__ gh, CouplingShape sh, bool reverse) {
  const int64_t n2 = sh.n2();
  const int64_t total = sh.batch * n2;
  for (int64_t idx = blockIdx.x * int64_t{kThreads} + threadIdx.x; idx < total;
       idx += int64_t{gridDim.x} * kThreads) {
    const int64_t b = idx / n2, i = idx % n2;
    const int64_t xo = sh.x2_offset(b) + i;
    const scalar_t v = g[xo];
    gin[xo] = v;
    gh[sh.additive_shift_offset(b) + i] = reverse ? static_cast<scalar_t>(-v) : v;
  }
}

// y, g, x, gin: [B, C, S]; t, gh: [B, C2, S]. Transformed half only: x2 = y2 - t, and the
// forward's gradients grad_x2 = grad_t = g.
template <typename scalar_t>
__global__ void additive_inverse_backward_kernel(const scalar_t* __restrict__ y, const scalar_t* __restrict__ t,
                                                 const scalar_t* __restrict__ g, scalar_t* __restrict__ x,
                                                 scalar_t* __restrict__ gin, scalar_t* __restrict__ gh,
                                                 CouplingShape sh) {
  using A = acc_t<scalar_t>;
  const int64_t n2 = sh.n2();
  const int64_t total = sh.batch * n2;
  for (int64_t idx = blockIdx.x * int64_t{kThreads} + threadIdx.x; idx < total;
       idx += int64_t{gridDim.x} * kThreads) {
    const int64_t b = idx / n2, i = idx % n2;
    const int64_t xo = sh.x2_offset(b) + i, to = sh.additive_shift_offset(b) + i;
    x[xo] = static_cast<scalar_t>(additive_inverse<A>(A(y[xo]), A(t[to])));
    const scalar_t v = g[xo];
    gin[xo] = v;
    gh[to] = v;
  }
}

template <bool Inverse>
std::tuple<at::Tensor, at::Tensor> affine_coupling(const at::Tensor& in_, const at::Tensor& h_,
                                                   c10::string_view scale, double clamp, std::optional<int64_t> passthrough) {
  constexpr const char* op = Inverse ? "affine_coupling_inv" : "affine_coupling_fwd";
  const ScaleKind kind = parse_scale(op, scale, clamp);
  const CouplingShape sh = check_coupling(op, in_, h_, /*affine=*/true, Inverse ? "y" : "x", passthrough);
  const c10::cuda::CUDAGuard guard(in_.device());
  const at::Tensor in = in_.contiguous(), h = h_.contiguous();
  at::Tensor out = at::empty(in.sizes(), in.options());
  const int64_t chunks = num_chunks(sh.n2(), kChunk);
  const auto acc_type = logdet_dtype(in.scalar_type());
  if (sh.batch == 0) return {out, at::empty({0}, in.options().dtype(acc_type))};
  at::Tensor partial = at::zeros({sh.batch, chunks}, in.options().dtype(acc_type));
  const cudaStream_t stream = at::cuda::getCurrentCUDAStream();
  copy_passthrough(in, out, sh);
  if (chunks > 0) {
    AT_DISPATCH_FLOATING_TYPES_AND2(at::kBFloat16, at::kHalf, in.scalar_type(), op, [&] {
      using A = acc_t<scalar_t>;
      const ScaleParams<A> p{A(clamp), A(1.0 / clamp)};
      dispatch_scale(kind, [&](auto k) {
        affine_apply_kernel<scalar_t, decltype(k)::value, Inverse>
            <<<grid_for(sh.batch * chunks), kThreads, 0, stream>>>(
                in.const_data_ptr<scalar_t>(), h.const_data_ptr<scalar_t>(), out.mutable_data_ptr<scalar_t>(),
                partial.mutable_data_ptr<A>(), sh, chunks, p);
        C10_CUDA_KERNEL_LAUNCH_CHECK();
      });
    });
  }
  return {out, partial.sum(1)};
}

std::tuple<at::Tensor, at::Tensor> affine_coupling_bwd(const at::Tensor& g_, const at::Tensor& gl_,
                                                       const at::Tensor& x_, const at::Tensor& h_,
                                                       c10::string_view scale, double clamp, bool reverse,
                                                       std::optional<int64_t> passthrough) {
  constexpr const char* op = "affine_coupling_bwd";
  const ScaleKind kind = parse_scale(op, scale, clamp);
  const CouplingShape sh = check_coupling(op, x_, h_, /*affine=*/true, "x", passthrough);
  check_grad(op, g_, x_, "grad_out", "x");
  check_grad_logdet(op, gl_, x_);
  const c10::cuda::CUDAGuard guard(x_.device());
  const at::Tensor g = g_.contiguous(), gl = gl_.contiguous(), x = x_.contiguous(), h = h_.contiguous();
  at::Tensor gin = at::empty(x.sizes(), x.options());
  at::Tensor gh = at::empty(h.sizes(), h.options());
  const int64_t total = sh.batch * sh.n2();
  if (total == 0) {
    gin.copy_(g);
    return {gin, gh};
  }
  const cudaStream_t stream = at::cuda::getCurrentCUDAStream();
  copy_passthrough(g, gin, sh);
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kBFloat16, at::kHalf, x.scalar_type(), op, [&] {
    using A = acc_t<scalar_t>;
    const ScaleParams<A> p{A(clamp), A(1.0 / clamp)};
    dispatch_scale(kind, [&](auto k) {
      const int grid = grid_for_elements(total);
      const auto launch = [&](auto rev) {
        affine_backward_kernel<scalar_t, decltype(k)::value, decltype(rev)::value><<<grid, kThreads, 0, stream>>>(
            g.const_data_ptr<scalar_t>(), gl.const_data_ptr<A>(), x.const_data_ptr<scalar_t>(),
            h.const_data_ptr<scalar_t>(), gin.mutable_data_ptr<scalar_t>(), gh.mutable_data_ptr<scalar_t>(), sh, p);
      };
      if (reverse) {
        launch(std::true_type{});
      } else {
        launch(std::false_type{});
      }
      C10_CUDA_KERNEL_LAUNCH_CHECK();
    });
  });
  return {gin, gh};
}

std::tuple<at::Tensor, at::Tensor, at::Tensor> affine_coupling_inv_bwd(const at::Tensor& y_, const at::Tensor& h_,
                                                                       const at::Tensor& g_, const at::Tensor& gl_,
                                                                       c10::string_view scale, double clamp, std::optional<int64_t> passthrough) {
  constexpr const char* op = "affine_coupling_inv_bwd";
  const ScaleKind kind = parse_scale(op, scale, clamp);
  const CouplingShape sh = check_coupling(op, y_, h_, /*affine=*/true, "y", passthrough);
  check_grad(op, g_, y_, "grad_y", "y");
  check_grad_logdet(op, gl_, y_);
  const c10::cuda::CUDAGuard guard(y_.device());
  const at::Tensor y = y_.contiguous(), h = h_.contiguous(), g = g_.contiguous(), gl = gl_.contiguous();
  at::Tensor x = at::empty(y.sizes(), y.options());
  at::Tensor gin = at::empty(y.sizes(), y.options());
  at::Tensor gh = at::empty(h.sizes(), h.options());
  const int64_t total = sh.batch * sh.n2();
  if (total == 0) return {x, gin, gh};  // C2 >= 1, so y is empty too
  const cudaStream_t stream = at::cuda::getCurrentCUDAStream();
  copy_passthrough(y, x, sh);
  copy_passthrough(g, gin, sh);
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kBFloat16, at::kHalf, y.scalar_type(), op, [&] {
    using A = acc_t<scalar_t>;
    const ScaleParams<A> p{A(clamp), A(1.0 / clamp)};
    dispatch_scale(kind, [&](auto k) {
      affine_inverse_backward_kernel<scalar_t, decltype(k)::value><<<grid_for_elements(total), kThreads, 0, stream>>>(
          y.const_data_ptr<scalar_t>(), h.const_data_ptr<scalar_t>(), g.const_data_ptr<scalar_t>(),
          gl.const_data_ptr<A>(), x.mutable_data_ptr<scalar_t>(), gin.mutable_data_ptr<scalar_t>(),
          gh.mutable_data_ptr<scalar_t>(), sh, p);
      C10_CUDA_KERNEL_LAUNCH_CHECK();
    });
  });
  return {x, gin, gh};
}

template <bool Inverse>
at::Tensor additive_coupling(const at::Tensor& in_, const at::Tensor& h_, std::optional<int64_t> passthrough) {
  constexpr const char* op = Inverse ? "additive_coupling_inv" : "additive_coupling_fwd";
  const CouplingShape sh = check_coupling(op, in_, h_, /*affine=*/false, Inverse ? "y" : "x", passthrough);
  const c10::cuda::CUDAGuard guard(in_.device());
  const at::Tensor in = in_.contiguous(), h = h_.contiguous();
  at::Tensor out = at::empty(in.sizes(), in.options());
  const int64_t total = sh.batch * sh.n2();
  if (total == 0) return out;
  const cudaStream_t stream = at::cuda::getCurrentCUDAStream();
  copy_passthrough(in, out, sh);
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kBFloat16, at::kHalf, in.scalar_type(), op, [&] {
    additive_apply_kernel<scalar_t, Inverse><<<grid_for_elements(total), kThreads, 0, stream>>>(
        in.const_data_ptr<scalar_t>(), h.const_data_ptr<scalar_t>(), out.mutable_data_ptr<scalar_t>(), sh);
    C10_CUDA_KERNEL_LAUNCH_CHECK();
  });
  return out;
}

// grad_h has the shape of the shift, [B, C2, *spatial], which follows from grad_out's.
std::tuple<at::Tensor, at::Tensor> additive_coupling_bwd(const at::Tensor& g_, bool reverse,
                                                         std::optional<int64_t> passthrough) {
  constexpr const char* op = "additive_coupling_bwd";
  const CouplingShape sh = check_coupling_input(op, g_, "grad_out", passthrough);
  const c10::cuda::CUDAGuard guard(g_.device());
  const at::Tensor g = g_.contiguous();
  at::Tensor gin = at::empty(g.sizes(), g.options());
  at::Tensor gh = at::empty(additive_shift_sizes(g, sh), g.options());
  const int64_t total = sh.batch * sh.n2();
  if (total == 0) return {gin, gh};
  const cudaStream_t stream = at::cuda::getCurrentCUDAStream();
  copy_passthrough(g, gin, sh);
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kBFloat16, at::kHalf, g.scalar_type(), op, [&] {
    additive_backward_kernel<scalar_t><<<grid_for_elements(total), kThreads, 0, stream>>>(
        g.const_data_ptr<scalar_t>(), gin.mutable_data_ptr<scalar_t>(), gh.mutable_data_ptr<scalar_t>(), sh,
        reverse);
    C10_CUDA_KERNEL_LAUNCH_CHECK();
  });
  return {gin, gh};
}

std::tuple<at::Tensor, at::Tensor, at::Tensor> additive_coupling_inv_bwd(const at::Tensor& y_, const at::Tensor& h_,
                                                                         const at::Tensor& g_, std::optional<int64_t> passthrough) {
  constexpr const char* op = "additive_coupling_inv_bwd";
  const CouplingShape sh = check_coupling(op, y_, h_, /*affine=*/false, "y", passthrough);
  check_grad(op, g_, y_, "grad_y", "y");
  const c10::cuda::CUDAGuard guard(y_.device());
  const at::Tensor y = y_.contiguous(), h = h_.contiguous(), g = g_.contiguous();
  at::Tensor x = at::empty(y.sizes(), y.options());
  at::Tensor gin = at::empty(y.sizes(), y.options());
  at::Tensor gh = at::empty(h.sizes(), h.options());
  const int64_t total = sh.batch * sh.n2();
  if (total == 0) return {x, gin, gh};  // C2 >= 1, so y is empty too
  const cudaStream_t stream = at::cuda::getCurrentCUDAStream();
  copy_passthrough(y, x, sh);
  copy_passthrough(g, gin, sh);
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kBFloat16, at::kHalf, y.scalar_type(), op, [&] {
    additive_inverse_backward_kernel<scalar_t><<<grid_for_elements(total), kThreads, 0, stream>>>(
        y.const_data_ptr<scalar_t>(), h.const_data_ptr<scalar_t>(), g.const_data_ptr<scalar_t>(),
        x.mutable_data_ptr<scalar_t>(), gin.mutable_data_ptr<scalar_t>(), gh.mutable_data_ptr<scalar_t>(), sh);
    C10_CUDA_KERNEL_LAUNCH_CHECK();
  });
  return {x, gin, gh};
}

}  // namespace

TORCH_LIBRARY_IMPL(invkernels, CUDA, m) {
  m.impl("affine_coupling_fwd", &affine_coupling<false>);
  m.impl("affine_coupling_inv", &affine_coupling<true>);
  m.impl("affine_coupling_bwd", &affine_coupling_bwd);
  m.impl("affine_coupling_inv_bwd", &affine_coupling_inv_bwd);
  m.impl("additive_coupling_fwd", &additive_coupling<false>);
  m.impl("additive_coupling_inv", &additive_coupling<true>);
  m.impl("additive_coupling_bwd", &additive_coupling_bwd);
  m.impl("additive_coupling_inv_bwd", &additive_coupling_inv_bwd);
}

}  // namespace invk::cuda
