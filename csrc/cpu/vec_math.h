#pragma once

// MathOps for at::vec::Vectorized<T>: lets the CPU vector loop run the same templated formulas
// (csrc/kernels/coupling.h) as the CUDA threads. The vector functions are SLEEF's 1-ULP versions
// when the translation unit is compiled for AVX2 or AVX512.

#include <ATen/cpu/vec/vec.h>

#include "../kernels/scalar_math.h"

namespace invk {

template <typename T>
struct MathOps<at::vec::Vectorized<T>> {
  using V = at::vec::Vectorized<T>;
  using scalar = T;
  static V splat(T v) { return V(v); }
  static V exp(const V& v) { return v.exp(); }
  // log(1 + v) for v in [0, 1] (the kernels call it for v = exp(-|z|)) to a few ulps: u = 1 + v
  // rounds off r = v - (u - 1), exactly (Fast2Sum), and log(1 + v) = log(u) + log(1 + r / u)
  // = log(u) + r up to r (u - 1) / u, which is below half an ulp of log(u) >= (u - 1) / u.
  // log(1 + v) alone is off by an ulp of 1, which is all of log1p(v) once v < 2^-24 (float);
  // SLEEF's log1p, and Kahan's log(u) * v / (u - 1), cost a division or more here.
  static V log1p(const V& v) {
    const V u = V(T(1)) + v;
    return u.log() + (v - (u - V(T(1))));
  }
  static V abs(const V& v) { return v.abs(); }
  // Bit operations: Vectorized::copysign is a call into SLEEF, not inlined.
  static V copysign(const V& magnitude, const V& sign) { return magnitude.abs() | (sign & V(T(-0.0))); }
  static V min(const V& a, const V& b) { return at::vec::minimum(a, b); }
  static V select_nonneg(const V& z, const V& a, const V& b) { return V::blendv(b, a, z >= V(T(0))); }
  static V log(const V& v) { return v.log(); }
  static V atan(const V& v) { return v.atan(); }
  static V sqrt(const V& v) { return v.sqrt(); }
  static V max(const V& a, const V& b) { return at::vec::maximum(a, b); }
  // Comparisons give a mask per lane (all bits set where true), which select blends with.
  using Mask = V;
  static V lt(const V& a, const V& b) { return a < b; }
  static V le(const V& a, const V& b) { return a <= b; }
  static V gt(const V& a, const V& b) { return a > b; }
  static V ge(const V& a, const V& b) { return a >= b; }
  static V eq(const V& a, const V& b) { return a == b; }
  static V mask_or(const V& a, const V& b) { return a | b; }
  // a where m, b elsewhere.
  static V select(const V& m, const V& a, const V& b) { return V::blendv(b, a, m); }
};

}  // namespace invk
