// CPU registration of the invertible 1x1 convolution's weight assembly (csrc/ops/invconv_weight.h;
// the products run in torch's BLAS).

#include <torch/library.h>

#include "../ops/invconv_weight.h"

TORCH_LIBRARY_IMPL(invkernels, CPU, m) {
  m.impl("invconv_weight", &invk::invconv_weight);
  m.impl("invconv_weight_bwd", &invk::invconv_weight_bwd);
}
