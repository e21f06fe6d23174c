#pragma once

// MathOps for at::vec::Vectorized<T>: lets the CPU vector loop run the same templated formulas
// (csrc/kernels/coupling.h) as the scalar tails and the CUDA threads. The vector functions are
// SLEEF's 1-ULP versions when the translation unit is compiled for AVX2 or AVX512.

#include <ATen/cpu/vec/vec.h>

#include "../kernels/scalar_math.h"

namespace invk {

template <typename T>
struct MathOps<at::vec::Vectorized<T>> {
  using V = at::vec::Vectorized<T>;
  using scalar = T;
  static V splat(T v) { return V(v); }
  static V exp(const V& v) { return v.exp(); }
  // 1 - 2 / (1 + exp(2v)): one SLEEF exp and a division, about half the time of SLEEF's tanh here.
  // Exact limits (+-1 for +-inf, NaN kept); the absolute error stays within a few ulps of 1,
  // which is the accuracy the log-scale c * tanh(h / c) and its sums need.
  static V tanh(const V& v) { return V(T(1)) - V(T(2)) / (V(T(1)) + (v + v).exp()); }
  // log(1 + v): SLEEF's log1p is several times slower than its log here. The kernels call log1p
  // only for v = exp(-|z|) in (0, 1] (log-sigmoid), where an absolute error of an ulp of 1 is
  // the accuracy the result needs.
  static V log1p(const V& v) { return (V(T(1)) + v).log(); }
  static V abs(const V& v) { return v.abs(); }
  static V min(const V& a, const V& b) { return at::vec::minimum(a, b); }
  static V select_nonneg(const V& z, const V& a, const V& b) { return V::blendv(b, a, z >= V(T(0))); }
};

}  // namespace invk
