// CUDA registration of the invertible 1x1 convolution: weight assembly (csrc/ops/invconv_weight.h) and
// per-position product (csrc/ops/conv1x1.h); the products run in cuBLAS. Host code only (ATen
// calls, no kernel of its own), so the host compiler builds it: the ATen-level fold of an ActNorm
// instantiates the shared host-device formulas of csrc/kernels/actnorm.h with at::Tensor.

#include <c10/cuda/CUDAGuard.h>
#include <torch/library.h>

#include "../ops/conv1x1.h"
#include "../ops/invconv_weight.h"

namespace {

at::Tensor weight_cuda(const at::Tensor& perm, const at::Tensor& lower, const at::Tensor& upper,
                       const at::Tensor& sign, const at::Tensor& log_s) {
  const c10::cuda::CUDAGuard guard(lower.device());
  return invk::invconv_weight(perm, lower, upper, sign, log_s);
}

std::tuple<at::Tensor, at::Tensor, at::Tensor> weight_bwd_cuda(const at::Tensor& grad_w, const at::Tensor& perm,
                                                               const at::Tensor& lower, const at::Tensor& upper,
                                                               const at::Tensor& sign, const at::Tensor& log_s) {
  const c10::cuda::CUDAGuard guard(lower.device());
  return invk::invconv_weight_bwd(grad_w, perm, lower, upper, sign, log_s);
}

at::Tensor conv1x1_cuda(const at::Tensor& x, const at::Tensor& weight, const std::optional<at::Tensor>& bias,
                        const std::optional<at::Tensor>& log_scale) {
  const c10::cuda::CUDAGuard guard(x.device());
  return invk::conv1x1(x, weight, bias, log_scale);
}

std::tuple<at::Tensor, at::Tensor, at::Tensor, at::Tensor> conv1x1_bwd_cuda(
    const at::Tensor& grad_y, const at::Tensor& x, const at::Tensor& weight, const std::optional<at::Tensor>& bias,
    const std::optional<at::Tensor>& log_scale, std::array<bool, 3> output_mask) {
  const c10::cuda::CUDAGuard guard(x.device());
  return invk::conv1x1_bwd(grad_y, x, weight, bias, log_scale, output_mask);
}

}  // namespace

TORCH_LIBRARY_IMPL(invkernels, CUDA, m) {
  m.impl("invconv_weight", &weight_cuda);
  m.impl("invconv_weight_bwd", &weight_bwd_cuda);
  m.impl("conv1x1", &conv1x1_cuda);
  m.impl("conv1x1_bwd", &conv1x1_bwd_cuda);
}
