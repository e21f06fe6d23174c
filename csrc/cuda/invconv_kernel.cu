// CUDA registration of the invertible 1x1 convolution's weight assembly (csrc/ops/invconv_weight.h;
// the products run in cuBLAS).

#include <c10/cuda/CUDAGuard.h>
#include <torch/library.h>

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

}  // namespace

TORCH_LIBRARY_IMPL(invkernels, CUDA, m) {
  m.impl("invconv_weight", &weight_cuda);
  m.impl("invconv_weight_bwd", &weight_bwd_cuda);
}
