#pragma once

// The passed-through channels of the spline ops (docs/ops/spline.md), device-agnostic: a coupling
// runs the spline on its transformed channels in place in the full tensor, and the first
// `passthrough` channels of an op's output (or of a gradient) are those of its input (or of the
// output's gradient). One copy through ATen, which the CPU and CUDA backends share.

#include <ATen/ATen.h>

namespace invk {

inline void copy_passthrough(const at::Tensor& to, const at::Tensor& from, int64_t passthrough) {
  if (passthrough > 0) to.narrow(1, 0, passthrough).copy_(from.narrow(1, 0, passthrough));
}

}  // namespace invk
