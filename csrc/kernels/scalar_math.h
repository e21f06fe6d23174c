#pragma once

#include <math.h>

#include "macros.h"

namespace invk {

// Elementary functions used by the shared kernels. MathOps<T> is specialized for float and
// double here (host and device) and for at::vec::Vectorized<T> in csrc/cpu/vec_math.h, so one
// templated formula serves the scalar CUDA threads, the scalar CPU tails and the CPU vector loop.
template <typename T>
struct MathOps;

template <>
struct MathOps<float> {
  using scalar = float;
  static INVK_HOST_DEVICE float splat(float v) { return v; }
  static INVK_HOST_DEVICE float exp(float v) { return expf(v); }
  static INVK_HOST_DEVICE float tanh(float v) { return tanhf(v); }
  static INVK_HOST_DEVICE float log1p(float v) { return log1pf(v); }
  static INVK_HOST_DEVICE float abs(float v) { return fabsf(v); }
  // Propagates NaN from either argument (fminf would drop it).
  static INVK_HOST_DEVICE float min(float a, float b) { return (a != a || a < b) ? a : b; }
  // a where z >= 0, b elsewhere (NaN z gives b).
  static INVK_HOST_DEVICE float select_nonneg(float z, float a, float b) { return z >= 0.0f ? a : b; }
};

template <>
struct MathOps<double> {
  using scalar = double;
  static INVK_HOST_DEVICE double splat(double v) { return v; }
  static INVK_HOST_DEVICE double exp(double v) { return ::exp(v); }
  static INVK_HOST_DEVICE double tanh(double v) { return ::tanh(v); }
  static INVK_HOST_DEVICE double log1p(double v) { return ::log1p(v); }
  static INVK_HOST_DEVICE double abs(double v) { return fabs(v); }
  static INVK_HOST_DEVICE double min(double a, double b) { return (a != a || a < b) ? a : b; }
  static INVK_HOST_DEVICE double select_nonneg(double z, double a, double b) { return z >= 0.0 ? a : b; }
};

}  // namespace invk
