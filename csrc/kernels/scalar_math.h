#pragma once

#include <math.h>

#include "macros.h"

namespace invk {

// Elementary functions used by the shared kernels. MathOps<T> is specialized for float and
// double here (host and device: the CUDA threads, the CPU loops over reduced-precision types, the
// C++ unit tests) and for at::vec::Vectorized<T> in csrc/cpu/vec_math.h (the CPU loops over float
// and double), so one templated formula serves every backend.
template <typename T>
struct MathOps;

template <>
struct MathOps<float> {
  using scalar = float;
  static INVK_HOST_DEVICE float splat(float v) { return v; }
  static INVK_HOST_DEVICE float exp(float v) { return expf(v); }
  static INVK_HOST_DEVICE float log1p(float v) { return log1pf(v); }
  static INVK_HOST_DEVICE float log(float v) { return logf(v); }
  static INVK_HOST_DEVICE float atan(float v) { return atanf(v); }
  static INVK_HOST_DEVICE float sqrt(float v) { return sqrtf(v); }
  static INVK_HOST_DEVICE float abs(float v) { return fabsf(v); }
  // |magnitude| with the sign of sign.
  static INVK_HOST_DEVICE float copysign(float magnitude, float sign) { return copysignf(magnitude, sign); }
  // Propagates NaN from either argument (fminf would drop it).
  static INVK_HOST_DEVICE float min(float a, float b) { return (a != a || a < b) ? a : b; }
  // a where z >= 0, b elsewhere (NaN z gives b).
  static INVK_HOST_DEVICE float select_nonneg(float z, float a, float b) { return z >= 0.0f ? a : b; }
  // Propagates NaN from either argument (fmaxf would drop it).
  static INVK_HOST_DEVICE float max(float a, float b) { return (a != a || a > b) ? a : b; }
  // Comparisons and selects of the branch-free kernels (csrc/kernels/spline.h): a mask per lane,
  // here one bool.
  using Mask = bool;
  static INVK_HOST_DEVICE bool lt(float a, float b) { return a < b; }
  static INVK_HOST_DEVICE bool le(float a, float b) { return a <= b; }
  static INVK_HOST_DEVICE bool gt(float a, float b) { return a > b; }
  static INVK_HOST_DEVICE bool ge(float a, float b) { return a >= b; }
  static INVK_HOST_DEVICE bool eq(float a, float b) { return a == b; }
  static INVK_HOST_DEVICE bool mask_or(bool a, bool b) { return a || b; }
  // a where m, b elsewhere.
  static INVK_HOST_DEVICE float select(bool m, float a, float b) { return m ? a : b; }
};

template <>
struct MathOps<double> {
  using scalar = double;
  static INVK_HOST_DEVICE double splat(double v) { return v; }
  static INVK_HOST_DEVICE double exp(double v) { return ::exp(v); }
  static INVK_HOST_DEVICE double log1p(double v) { return ::log1p(v); }
  static INVK_HOST_DEVICE double log(double v) { return ::log(v); }
  static INVK_HOST_DEVICE double atan(double v) { return ::atan(v); }
  static INVK_HOST_DEVICE double sqrt(double v) { return ::sqrt(v); }
  static INVK_HOST_DEVICE double abs(double v) { return fabs(v); }
  static INVK_HOST_DEVICE double copysign(double magnitude, double sign) { return ::copysign(magnitude, sign); }
  static INVK_HOST_DEVICE double min(double a, double b) { return (a != a || a < b) ? a : b; }
  static INVK_HOST_DEVICE double select_nonneg(double z, double a, double b) { return z >= 0.0 ? a : b; }
  // Propagates NaN from either argument (fmax would drop it).
  static INVK_HOST_DEVICE double max(double a, double b) { return (a != a || a > b) ? a : b; }
  // Comparisons and selects of the branch-free kernels (csrc/kernels/spline.h): a mask per lane,
  // here one bool.
  using Mask = bool;
  static INVK_HOST_DEVICE bool lt(double a, double b) { return a < b; }
  static INVK_HOST_DEVICE bool le(double a, double b) { return a <= b; }
  static INVK_HOST_DEVICE bool gt(double a, double b) { return a > b; }
  static INVK_HOST_DEVICE bool ge(double a, double b) { return a >= b; }
  static INVK_HOST_DEVICE bool eq(double a, double b) { return a == b; }
  static INVK_HOST_DEVICE bool mask_or(bool a, bool b) { return a || b; }
  // a where m, b elsewhere.
  static INVK_HOST_DEVICE double select(bool m, double a, double b) { return m ? a : b; }
};

}  // namespace invk
