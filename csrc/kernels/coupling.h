#pragma once

#include <stdint.h>

#include <type_traits>

#include "macros.h"
#include "scalar_math.h"

// Shared math and indexing of the affine and additive coupling kernels (CPU and CUDA).
// Formulas and conventions: docs/ops/coupling.md.

namespace invk {

// The scale functions (docs/ops/coupling.md): "exp" L = c tanh(h / c); "sigmoid" s = sigmoid(h + 2)
// (Glow); "sigmoid_eps" s = sigmoid(h + 2) + 1e-3 (nflows); "atan" L = c (0.636 atan(h)) (FrEIA's
// ATAN clamp); "rational" L = h / (1 + |h| / c) (zuko's soft clamp, c = -log(slope)).
enum class ScaleKind : int { Exp = 0, Sigmoid = 1, SigmoidEps = 2, Atan = 3, Rational = 4 };

constexpr double kSigmoidEps = 1e-3;  // nflows' floor of the sigmoid scale
constexpr double kAtanFactor = 0.636;  // FrEIA's ATAN clamp: 0.636 atan(h), within (-1, 1)

// Geometry of a coupling input x: [batch, channels, spatial] contiguous, split into the
// conditioning half (c1 channels) and the transformed half (c2 channels).
struct CouplingShape {
  int64_t batch;
  int64_t channels;
  int64_t c1;
  int64_t c2;
  int64_t spatial;

  INVK_HOST_DEVICE int64_t n1() const { return c1 * spatial; }  // passthrough elements per sample
  INVK_HOST_DEVICE int64_t n2() const { return c2 * spatial; }  // transformed elements per sample
  INVK_HOST_DEVICE int64_t x_stride() const { return channels * spatial; }
  INVK_HOST_DEVICE int64_t x1_offset(int64_t b) const { return b * x_stride(); }
  INVK_HOST_DEVICE int64_t x2_offset(int64_t b) const { return b * x_stride() + n1(); }
  // Affine h: [batch, 2 * c2, spatial] = (raw log-scale, shift).
  INVK_HOST_DEVICE int64_t affine_scale_offset(int64_t b) const { return b * 2 * n2(); }
  INVK_HOST_DEVICE int64_t affine_shift_offset(int64_t b) const { return b * 2 * n2() + n2(); }
  // Additive h: [batch, c2, spatial] = shift.
  INVK_HOST_DEVICE int64_t additive_shift_offset(int64_t b) const { return b * n2(); }
};

// The transformed half of each sample is processed in fixed-size chunks; each chunk writes one
// partial log-det sum, and the partial sums of a sample are added in chunk order, so the result
// is the same for every thread count.
INVK_HOST_DEVICE int64_t num_chunks(int64_t n, int64_t chunk) { return (n + chunk - 1) / chunk; }

// Calls f(std::integral_constant<ScaleKind, K>{}) for the runtime kind (host code: picks the
// kernel instantiation).
template <typename F>
inline void dispatch_scale(ScaleKind kind, const F& f) {
  switch (kind) {
    case ScaleKind::Exp:
      f(std::integral_constant<ScaleKind, ScaleKind::Exp>{});
      break;
    case ScaleKind::Sigmoid:
      f(std::integral_constant<ScaleKind, ScaleKind::Sigmoid>{});
      break;
    case ScaleKind::SigmoidEps:
      f(std::integral_constant<ScaleKind, ScaleKind::SigmoidEps>{});
      break;
    case ScaleKind::Atan:
      f(std::integral_constant<ScaleKind, ScaleKind::Atan>{});
      break;
    case ScaleKind::Rational:
      f(std::integral_constant<ScaleKind, ScaleKind::Rational>{});
      break;
  }
}

template <typename T>
struct ScaleParams {
  T clamp;
  T inv_clamp;
};

// The soft clamp of the "exp" scale, L = c * tanh(h / c), and L' = dL/dh = 1 - tanh(h / c)^2, to a
// few ulps of relative accuracy for every h and c (Cephes' tanh). With u = h / c and a = |u|:
//   a <= 0.625: tanh(u) = u (1 + q), q = u^2 P(u^2) (float) or u^2 P(u^2) / Q(u^2) (double), a
//               minimax fit; L = h + h q (h is not rounded through c) and L' = 1 - tanh(u)^2 >= 0.69;
//   otherwise:  with e = exp(-2a) <= 0.29 (no overflow), tanh(a) = (1 - e) / (1 + e) without
//               cancellation, L = c (1 - e) / (1 + e) with the sign of h and
//               L' = (1 - tanh)(1 + tanh) = 4e / (1 + e)^2.
// The textbook tanh(u) = 1 - 2 / (1 + exp(2u)) for every u is off by an ulp of 1, which is all of
// tanh(u) as u -> 0: with a large clamp every L is small next to c and the log-det comes out wrong.
// Both branches are evaluated and one is selected per element (vector lanes, GPU threads); the
// polynomial runs beside the exponential, so the chain from h to L (and on to exp(L)) is one
// exponential, one division and a few additions long, as long as the textbook formula's. NaN
// takes the second branch and stays NaN; |h| = inf gives L = +-c and L' = 0.
template <typename T, typename M>
INVK_HOST_DEVICE void soft_clamp(T h, const ScaleParams<T>& p, T& L, T& dL) {
  using S = typename M::scalar;
  const T u = h * p.inv_clamp;
  const T a = M::abs(u);
  const T z = u * u;
  T q;
  if constexpr (std::is_same_v<S, float>) {
    q = z * ((((M::splat(S(-5.70498872745e-3)) * z + M::splat(S(2.06390887954e-2))) * z +
               M::splat(S(-5.37397155531e-2))) * z + M::splat(S(1.33314422036e-1))) * z +
             M::splat(S(-3.33332819422e-1)));
  } else {
    q = z * ((M::splat(S(-9.64399179425052238628e-1)) * z + M::splat(S(-9.92877231001918586564e1))) * z +
             M::splat(S(-1.61468768441708447952e3))) /
        (((z + M::splat(S(1.12811678491632931402e2))) * z + M::splat(S(2.23548839060100448583e3))) * z +
         M::splat(S(4.84406305325125486048e3)));
  }
  // small >= 0 exactly where a <= 0.625: the first branch.
  const T small = M::splat(S(0.625)) - a;
  const T one = M::splat(S(1));
  const T e = M::exp(M::splat(S(-2)) * a);
  const T one_e = one + e;
  const T signed_clamp = M::copysign(p.clamp, h);
  const T t = u + u * q;
  L = M::select_nonneg(small, h + h * q, (signed_clamp - signed_clamp * e) / one_e);
  dL = M::select_nonneg(small, one - t * t, (M::splat(S(4)) * e) / (one_e * one_e));
}

// The sigmoid scale s = sigmoid(z), z = h + 2, from one exponential e = exp(-|z|) in (0, 1]:
// with d = 1 + e, s = (z >= 0 ? 1 : e) / d, 1 / s = d / (z >= 0 ? 1 : e), 1 - s = (z >= 0 ? e : 1) / d
// and L = log s = min(z, 0) - log1p(e), so no term overflows and each costs at most one division.
template <typename T, typename M>
struct SigmoidScale {
  T z, e, d;
  INVK_HOST_DEVICE explicit SigmoidScale(T h) : z(h + M::splat(2)), e(M::exp(M::splat(0) - M::abs(z))),
                                                d(M::splat(1) + e) {}
  INVK_HOST_DEVICE T log_s() const { return M::min(z, M::splat(0)) - M::log1p(e); }
  INVK_HOST_DEVICE T numerator() const { return M::select_nonneg(z, M::splat(1), e); }
  INVK_HOST_DEVICE T one_minus_numerator() const { return M::select_nonneg(z, e, M::splat(1)); }
};

// nflows' scale s = sigmoid(z) + 1e-3, z = h + 2, evaluated directly (not as exp(L)), so that the
// forward multiplies and the inverse divides by s to an ulp or two; L = log s for the log-det and
// dL/dh = sigmoid(z) (1 - sigmoid(z)) / s.
template <typename T, typename M>
struct SigmoidEpsScale {
  T s, sigma, one_minus_sigma;
  INVK_HOST_DEVICE explicit SigmoidEpsScale(T h) {
    const SigmoidScale<T, M> sg(h);
    const T r = M::splat(1) / sg.d;
    sigma = sg.numerator() * r;
    one_minus_sigma = sg.one_minus_numerator() * r;
    s = sigma + M::splat(typename M::scalar(kSigmoidEps));
  }
  INVK_HOST_DEVICE T log_s() const { return M::log(s); }
  INVK_HOST_DEVICE T dlog_s() const { return sigma * one_minus_sigma / s; }
};

// L = log-scale of the raw value h.
template <ScaleKind K, typename T, typename M = MathOps<T>>
INVK_HOST_DEVICE T log_scale(T h, const ScaleParams<T>& p) {
  using S = typename M::scalar;
  if constexpr (K == ScaleKind::Exp) {
    T L, dL;
    soft_clamp<T, M>(h, p, L, dL);
    return L;
  } else if constexpr (K == ScaleKind::Sigmoid) {
    const T z = h + M::splat(2);
    return M::min(z, M::splat(0)) - M::log1p(M::exp(M::splat(0) - M::abs(z)));
  } else if constexpr (K == ScaleKind::SigmoidEps) {
    return SigmoidEpsScale<T, M>(h).log_s();
  } else if constexpr (K == ScaleKind::Atan) {
    return p.clamp * (M::splat(S(kAtanFactor)) * M::atan(h));
  } else {
    return h / (M::splat(S(1)) + M::abs(h) * p.inv_clamp);
  }
}

// L and dL/dh together.
template <ScaleKind K, typename T, typename M = MathOps<T>>
INVK_HOST_DEVICE void log_scale_with_grad(T h, const ScaleParams<T>& p, T& L, T& dL) {
  using S = typename M::scalar;
  if constexpr (K == ScaleKind::Exp) {
    soft_clamp<T, M>(h, p, L, dL);
  } else if constexpr (K == ScaleKind::Sigmoid) {
    // dL/dh = sigmoid(-z) = exp(log sigmoid(-z)), with log sigmoid(-z) sharing log1p(exp(-|z|)).
    const T z = h + M::splat(2);
    const T lp = M::log1p(M::exp(M::splat(0) - M::abs(z)));
    L = M::min(z, M::splat(0)) - lp;
    dL = M::exp(M::min(M::splat(0) - z, M::splat(0)) - lp);
  } else if constexpr (K == ScaleKind::SigmoidEps) {
    const SigmoidEpsScale<T, M> sc(h);
    L = sc.log_s();
    dL = sc.dlog_s();
  } else if constexpr (K == ScaleKind::Atan) {
    const T k = p.clamp * M::splat(S(kAtanFactor));
    L = p.clamp * (M::splat(S(kAtanFactor)) * M::atan(h));
    dL = k / (M::splat(S(1)) + h * h);
  } else {
    const T q = M::splat(S(1)) + M::abs(h) * p.inv_clamp;
    L = h / q;
    dL = M::splat(S(1)) / (q * q);
  }
}

// y2 = x2 * exp(L) + t; L returned for the log-det.
template <ScaleKind K, typename T, typename M = MathOps<T>>
INVK_HOST_DEVICE T affine_forward(T x2, T hs, T t, const ScaleParams<T>& p, T& L) {
  if constexpr (K == ScaleKind::Sigmoid) {
    const SigmoidScale<T, M> sg(hs);
    L = sg.log_s();
    return x2 * (sg.numerator() / sg.d) + t;
  } else if constexpr (K == ScaleKind::SigmoidEps) {
    const SigmoidEpsScale<T, M> sc(hs);
    L = sc.log_s();
    return x2 * sc.s + t;
  } else {
    L = log_scale<K, T, M>(hs, p);
    return x2 * M::exp(L) + t;
  }
}

// x2 = (y2 - t) * exp(-L): a product with the inverse scale (for the sigmoid scale d / (1 or e)),
// never a division by the scale.
template <ScaleKind K, typename T, typename M = MathOps<T>>
INVK_HOST_DEVICE T affine_inverse(T y2, T hs, T t, const ScaleParams<T>& p, T& L) {
  if constexpr (K == ScaleKind::Sigmoid) {
    const SigmoidScale<T, M> sg(hs);
    L = sg.log_s();
    return (y2 - t) * (sg.d / sg.numerator());
  } else if constexpr (K == ScaleKind::SigmoidEps) {
    const SigmoidEpsScale<T, M> sc(hs);
    L = sc.log_s();
    return (y2 - t) / sc.s;
  } else {
    L = log_scale<K, T, M>(hs, p);
    return (y2 - t) * M::exp(M::splat(0) - L);
  }
}

// VJP of the transformed half. x2 is the data-side value: the forward's input (Reverse = false)
// or the inverse's output (Reverse = true). g is the gradient of the op's output, gl the gradient
// of its log-det for this sample. The sigmoid scale needs no logarithm here.
template <ScaleKind K, bool Reverse, typename T, typename M = MathOps<T>>
INVK_HOST_DEVICE void affine_backward(T g, T gl, T x2, T hs, const ScaleParams<T>& p, T& g_in,
                                      T& g_hs, T& g_t) {
  T s_or_inv, dL;
  if constexpr (K == ScaleKind::Sigmoid) {
    const SigmoidScale<T, M> sg(hs);
    const T r = M::splat(1) / sg.d;
    dL = sg.one_minus_numerator() * r;
    s_or_inv = Reverse ? sg.d / sg.numerator() : sg.numerator() * r;
  } else if constexpr (K == ScaleKind::SigmoidEps) {
    const SigmoidEpsScale<T, M> sc(hs);
    dL = sc.dlog_s();
    s_or_inv = Reverse ? M::splat(1) / sc.s : sc.s;
  } else {
    T L;
    log_scale_with_grad<K, T, M>(hs, p, L, dL);
    s_or_inv = M::exp(Reverse ? M::splat(0) - L : L);
  }
  g_in = g * s_or_inv;
  if constexpr (!Reverse) {
    g_t = g;
    g_hs = (g_in * x2 + gl) * dL;
  } else {
    g_t = M::splat(0) - g_in;
    g_hs = M::splat(0) - (g * x2 + gl) * dL;
  }
}

// Inverse and VJP in one pass, for memory-free backprop: from the forward's output y2 and the
// subnet output (hs, t), rebuild the forward's input x2 and back-propagate g (the gradient of y2)
// and gl (of this sample's log-det) through the forward. The scale is evaluated once, and
// g_in * x2 = g * s * (y2 - t) / s is taken as g * (y2 - t).
template <ScaleKind K, typename T, typename M = MathOps<T>>
INVK_HOST_DEVICE void affine_inverse_backward(T y2, T hs, T t, T g, T gl, const ScaleParams<T>& p, T& x2, T& g_in,
                                              T& g_hs, T& g_t) {
  T s, inv_s, dL;
  if constexpr (K == ScaleKind::Sigmoid) {
    const SigmoidScale<T, M> sg(hs);
    const T r = M::splat(1) / sg.d;
    dL = sg.one_minus_numerator() * r;
    s = sg.numerator() * r;
    inv_s = sg.d / sg.numerator();
  } else if constexpr (K == ScaleKind::SigmoidEps) {
    const SigmoidEpsScale<T, M> sc(hs);
    dL = sc.dlog_s();
    s = sc.s;
    inv_s = M::splat(1) / sc.s;
  } else {
    T L;
    log_scale_with_grad<K, T, M>(hs, p, L, dL);
    s = M::exp(L);
    inv_s = M::exp(M::splat(0) - L);
  }
  const T shifted = y2 - t;
  x2 = shifted * inv_s;
  g_in = g * s;
  g_t = g;
  g_hs = (g * shifted + gl) * dL;
}

template <typename T>
INVK_HOST_DEVICE T additive_forward(T x2, T t) { return x2 + t; }

template <typename T>
INVK_HOST_DEVICE T additive_inverse(T y2, T t) { return y2 - t; }

}  // namespace invk
