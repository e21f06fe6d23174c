// CPU registration of the invertible 1x1 convolution: weight assembly (csrc/ops/invconv_weight.h) and
// per-position product (csrc/ops/conv1x1.h); the products run in torch's BLAS.

#include <torch/library.h>

#include "../ops/conv1x1.h"
#include "../ops/invconv_weight.h"

TORCH_LIBRARY_IMPL(invkernels, CPU, m) {
  m.impl("invconv_weight", &invk::invconv_weight);
  m.impl("invconv_weight_bwd", &invk::invconv_weight_bwd);
  m.impl("conv1x1", &invk::conv1x1);
  m.impl("conv1x1_bwd", &invk::conv1x1_bwd);
}
