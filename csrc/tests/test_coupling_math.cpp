// Host tests of the shared coupling math in csrc/kernels/coupling.h (the functions the CPU
// backend runs and the CUDA kernels compile for the device). Formulas: docs/ops/coupling.md.

#include <algorithm>
#include <cmath>
#include <cstdint>
#include <cstdio>
#include <limits>
#include <vector>

#include "check.h"
#include "kernels/coupling.h"

namespace {

using invk::ScaleKind;

template <typename T>
invk::ScaleParams<T> params(double clamp) {
  return invk::ScaleParams<T>{static_cast<T>(clamp), static_cast<T>(1.0 / clamp)};
}

template <typename T>
double tol() {
  return sizeof(T) == sizeof(float) ? 2e-6 : 1e-14;
}

// log(sigmoid(z)) straight from the definition, in long double.
double direct_log_sigmoid(double z) {
  const long double zl = z;
  return static_cast<double>(std::log(1.0L / (1.0L + std::exp(-zl))));
}

template <typename T>
void test_log_scale_exp() {
  for (double c : {1.0, 2.5}) {
    const auto p = params<T>(c);
    for (double h : {-3.0, -0.5, 0.0, 0.7, 4.0}) {
      const T L = invk::log_scale<ScaleKind::Exp, T>(static_cast<T>(h), p);
      CHECK_CLOSE(static_cast<double>(L), c * std::tanh(h / c), tol<T>(), tol<T>());
    }
    // Large |h| saturates at +-c: finite log-scale and finite, nonzero scale.
    for (double h : {-200.0, -50.0, 50.0, 200.0}) {
      const T L = invk::log_scale<ScaleKind::Exp, T>(static_cast<T>(h), p);
      CHECK(std::isfinite(L));
      CHECK_CLOSE(static_cast<double>(L), h > 0 ? c : -c, tol<T>(), 0.0);
      const T s = std::exp(L);
      CHECK(std::isfinite(s) && s > T(0));
    }
  }
}

template <typename T>
void test_log_scale_sigmoid() {
  const auto p = params<T>(1.0);
  for (double h : {-30.0, -7.0, -2.0, -0.3, 0.0, 1.5, 9.0}) {
    const T L = invk::log_scale<ScaleKind::Sigmoid, T>(static_cast<T>(h), p);
    CHECK_CLOSE(static_cast<double>(L), direct_log_sigmoid(h + 2.0), tol<T>(), tol<T>());
  }
  // Large positive h: log sigmoid -> 0 from below, never positive.
  for (double h : {50.0, 200.0}) {
    const T L = invk::log_scale<ScaleKind::Sigmoid, T>(static_cast<T>(h), p);
    CHECK(std::isfinite(L) && L <= T(0));
    CHECK_CLOSE(static_cast<double>(L), 0.0, 0.0, 1e-20);
  }
  // Large negative h: log sigmoid(z) -> z, finite although sigmoid(z) underflows in float.
  for (double h : {-50.0, -200.0}) {
    const T L = invk::log_scale<ScaleKind::Sigmoid, T>(static_cast<T>(h), p);
    CHECK(std::isfinite(L));
    CHECK_CLOSE(static_cast<double>(L), h + 2.0, tol<T>(), 0.0);
  }
  // Infinite inputs reach the limits exactly.
  const T inf = std::numeric_limits<T>::infinity();
  CHECK(invk::log_scale<ScaleKind::Sigmoid, T>(inf, p) == T(0));
  CHECK(invk::log_scale<ScaleKind::Sigmoid, T>(-inf, p) == -inf);
}

// Worst relative errors, in ulps of T, of the soft clamp L = c * tanh(h / c) and of
// L' = 1 - tanh(h / c)^2 over |h| from 1e-12 to 1e4 against long double, with the clamp the kernel
// sees. L' at large |u| = |h / c| is conditioned by 2|u| against the rounding of u, so its error is
// counted in units of (1 + 2|u|) ulps; values of L' near the bottom of T's range are skipped.
template <typename T>
void soft_clamp_worst_ulps(double clamp, double& worst_L, double& worst_dL) {
  const auto p = params<T>(clamp);
  const long double c = p.clamp;
  const long double eps = std::numeric_limits<T>::epsilon();
  worst_L = worst_dL = 0.0;
  for (double mag = 1e-12; mag < 1e4; mag *= 1.01) {
    for (double sign : {-1.0, 1.0}) {
      const T h = static_cast<T>(sign * mag);
      T L, dL;
      invk::log_scale_with_grad<ScaleKind::Exp, T>(h, p, L, dL);
      const long double u = static_cast<long double>(h) / c;
      const long double L_ref = c * std::tanh(u);
      const long double dL_ref = 1.0L / (std::cosh(u) * std::cosh(u));
      worst_L = std::max(worst_L, static_cast<double>(std::fabs(L - L_ref) / (eps * std::fabs(L_ref))));
      if (dL_ref > 1e6L * std::numeric_limits<T>::min()) {
        const long double bound = eps * dL_ref * (1.0L + 2.0L * std::fabs(u));
        worst_dL = std::max(worst_dL, static_cast<double>(std::fabs(dL - dL_ref) / bound));
      }
    }
  }
}

// The scalar instantiation is what the CUDA threads run. The textbook forms lose accuracy at both
// ends: c * tanh(h * (1 / c)) for a huge clamp (h / c below T's normal range), 1 - tanh^2 where
// tanh rounds to 1.
template <typename T>
void test_soft_clamp_accuracy() {
  for (double c : {0.5, 2.0, 100.0, 1e6, 1e30}) {
    double worst_L, worst_dL;
    soft_clamp_worst_ulps<T>(c, worst_L, worst_dL);
    CHECK_CLOSE(worst_L, 0.0, 0.0, 3.0);
    CHECK_CLOSE(worst_dL, 0.0, 0.0, 4.0);
  }
  const auto p = params<T>(2.0);
  const T inf = std::numeric_limits<T>::infinity();
  T L, dL;
  invk::log_scale_with_grad<ScaleKind::Exp, T>(inf, p, L, dL);
  CHECK(L == T(2) && dL == T(0));
  invk::log_scale_with_grad<ScaleKind::Exp, T>(-inf, p, L, dL);
  CHECK(L == T(-2) && dL == T(0));
  invk::log_scale_with_grad<ScaleKind::Exp, T>(T(0), p, L, dL);
  CHECK(L == T(0) && dL == T(1));
}

template <ScaleKind K>
void test_log_scale_grad_kind(double clamp) {
  const auto pd = params<double>(clamp);
  const auto pf = params<float>(clamp);
  const double eps = 1e-6;
  for (double h : {-6.0, -1.0, -0.2, 0.0, 0.4, 2.0, 5.0}) {
    double L, dL;
    invk::log_scale_with_grad<K, double>(h, pd, L, dL);
    CHECK_CLOSE(L, (invk::log_scale<K, double>(h, pd)), 1e-15, 1e-15);
    if (K == ScaleKind::Rational && h == 0.0) {
      // |h| makes L'' jump at 0 (from 2 / c to -2 / c): a central difference is off by eps / c
      // there; L'(0) = 1 exactly.
      CHECK(dL == 1.0);
      continue;
    }
    const double fd = (invk::log_scale<K, double>(h + eps, pd) -
                       invk::log_scale<K, double>(h - eps, pd)) / (2 * eps);
    CHECK_CLOSE(dL, fd, 1e-7, 1e-9);
    float Lf, dLf;
    invk::log_scale_with_grad<K, float>(static_cast<float>(h), pf, Lf, dLf);
    CHECK_CLOSE(static_cast<double>(dLf), dL, 1e-5, 1e-6);
  }
}

// The peers' scale functions against their formulas in long double: nflows' sigmoid(h + 2) + 1e-3,
// FrEIA's clamp * 0.636 atan(h), zuko's h / (1 + |h| / c).
template <typename T>
void test_log_scale_peer_kinds() {
  const double clamp = 1.7;
  const auto p = params<T>(clamp);
  for (double h : {-40.0, -6.0, -1.0, -0.2, 0.0, 0.4, 2.0, 5.0, 40.0}) {
    const long double hl = static_cast<T>(h);
    const long double sigma = 1.0L / (1.0L + std::exp(-(hl + 2.0L)));
    CHECK_CLOSE(static_cast<double>(invk::log_scale<ScaleKind::SigmoidEps, T>(static_cast<T>(h), p)),
                static_cast<double>(std::log(sigma + 1e-3L)), 4 * tol<T>(), 4 * tol<T>());
    CHECK_CLOSE(static_cast<double>(invk::log_scale<ScaleKind::Atan, T>(static_cast<T>(h), p)),
                static_cast<double>(static_cast<long double>(static_cast<T>(clamp)) * 0.636L * std::atan(hl)),
                4 * tol<T>(), 4 * tol<T>());
    CHECK_CLOSE(static_cast<double>(invk::log_scale<ScaleKind::Rational, T>(static_cast<T>(h), p)),
                static_cast<double>(hl / (1.0L + std::fabs(hl) / static_cast<long double>(static_cast<T>(clamp)))),
                4 * tol<T>(), 4 * tol<T>());
  }
}

void test_log_scale_grad() {
  test_log_scale_grad_kind<ScaleKind::Exp>(1.0);
  test_log_scale_grad_kind<ScaleKind::Exp>(2.5);
  test_log_scale_grad_kind<ScaleKind::Sigmoid>(1.0);
  test_log_scale_grad_kind<ScaleKind::SigmoidEps>(1.0);
  test_log_scale_grad_kind<ScaleKind::Atan>(2.0);
  test_log_scale_grad_kind<ScaleKind::Rational>(6.9);
  // Sigmoid limits of dL/dh = sigmoid(-(h + 2)): 1 far left, 0 far right, never NaN.
  const auto p = params<float>(1.0);
  float L, dL;
  invk::log_scale_with_grad<ScaleKind::Sigmoid, float>(-200.0f, p, L, dL);
  CHECK_CLOSE(static_cast<double>(dL), 1.0, 1e-7, 0.0);
  invk::log_scale_with_grad<ScaleKind::Sigmoid, float>(200.0f, p, L, dL);
  CHECK(std::isfinite(dL) && dL >= 0.0f && dL < 1e-30f);
  // Exp: the derivative at the clamp saturation is 0, not NaN.
  invk::log_scale_with_grad<ScaleKind::Exp, float>(200.0f, p, L, dL);
  CHECK(dL == 0.0f);
}

template <ScaleKind K, typename T>
void test_affine_round_trip_kind() {
  const auto p = params<T>(2.0);
  const double xs[] = {-3.0, -0.25, 0.0, 1.0, 7.5};
  const double hss[] = {-4.0, -0.5, 0.0, 0.8, 3.0};
  const double ts[] = {-1.5, 0.0, 2.25};
  for (double x2 : xs) {
    for (double hs : hss) {
      for (double t : ts) {
        T Lf, Li;
        const T y2 = invk::affine_forward<K, T>(static_cast<T>(x2), static_cast<T>(hs),
                                                static_cast<T>(t), p, Lf);
        const double Lref = static_cast<double>(invk::log_scale<K, T>(static_cast<T>(hs), p));
        CHECK_CLOSE(static_cast<double>(Lf), Lref, 0.0, 0.0);
        CHECK_CLOSE(static_cast<double>(y2), x2 * std::exp(Lref) + t, 4 * tol<T>(), 4 * tol<T>());
        const T back = invk::affine_inverse<K, T>(y2, static_cast<T>(hs), static_cast<T>(t), p, Li);
        CHECK_CLOSE(static_cast<double>(Li), Lref, 0.0, 0.0);
        CHECK_CLOSE(static_cast<double>(back), x2, 8 * tol<T>(), 8 * tol<T>() * (1 + std::fabs(t)));
      }
    }
  }
}

void test_affine_round_trip() {
  test_affine_round_trip_kind<ScaleKind::Exp, float>();
  test_affine_round_trip_kind<ScaleKind::Exp, double>();
  test_affine_round_trip_kind<ScaleKind::Sigmoid, float>();
  test_affine_round_trip_kind<ScaleKind::Sigmoid, double>();
  test_affine_round_trip_kind<ScaleKind::SigmoidEps, float>();
  test_affine_round_trip_kind<ScaleKind::SigmoidEps, double>();
  test_affine_round_trip_kind<ScaleKind::Atan, float>();
  test_affine_round_trip_kind<ScaleKind::Atan, double>();
  test_affine_round_trip_kind<ScaleKind::Rational, float>();
  test_affine_round_trip_kind<ScaleKind::Rational, double>();
}

// Central finite differences of the scalar loss of one transformed element:
//   forward (Reverse = false): l(x2, hs, t) = g * y2(x2, hs, t) + gl * L(hs)
//   inverse (Reverse = true):  l(y2, hs, t) = g * x2(y2, hs, t) + gl * (-L(hs))
template <ScaleKind K, bool Reverse>
void test_affine_backward_case(double g, double gl, double in2, double hs, double t,
                               const invk::ScaleParams<double>& p) {
  auto loss = [&](double a, double b, double c) {
    double L;
    if constexpr (!Reverse) {
      const double y2 = invk::affine_forward<K, double>(a, b, c, p, L);
      return g * y2 + gl * L;
    } else {
      const double x2 = invk::affine_inverse<K, double>(a, b, c, p, L);
      return g * x2 - gl * L;
    }
  };
  // affine_backward takes the data-side value: the forward's input or the inverse's output.
  double x2 = in2;
  if constexpr (Reverse) {
    double L;
    x2 = invk::affine_inverse<K, double>(in2, hs, t, p, L);
  }
  double g_in, g_hs, g_t;
  invk::affine_backward<K, Reverse, double>(g, gl, x2, hs, p, g_in, g_hs, g_t);
  const double e = 1e-6;
  const double fd_in = (loss(in2 + e, hs, t) - loss(in2 - e, hs, t)) / (2 * e);
  const double fd_hs = (loss(in2, hs + e, t) - loss(in2, hs - e, t)) / (2 * e);
  const double fd_t = (loss(in2, hs, t + e) - loss(in2, hs, t - e)) / (2 * e);
  CHECK_CLOSE(g_in, fd_in, 1e-7, 1e-8);
  CHECK_CLOSE(g_hs, fd_hs, 1e-7, 1e-8);
  CHECK_CLOSE(g_t, fd_t, 1e-7, 1e-8);

  // The float instantiation agrees with the double one.
  const auto pf = invk::ScaleParams<float>{static_cast<float>(p.clamp),
                                           static_cast<float>(p.inv_clamp)};
  float f_in, f_hs, f_t;
  invk::affine_backward<K, Reverse, float>(static_cast<float>(g), static_cast<float>(gl),
                                           static_cast<float>(x2), static_cast<float>(hs), pf,
                                           f_in, f_hs, f_t);
  CHECK_CLOSE(static_cast<double>(f_in), g_in, 1e-5, 1e-6);
  CHECK_CLOSE(static_cast<double>(f_hs), g_hs, 1e-5, 1e-6);
  CHECK_CLOSE(static_cast<double>(f_t), g_t, 1e-5, 1e-6);
}

template <ScaleKind K, bool Reverse>
void test_affine_backward_kind(double clamp) {
  const auto p = params<double>(clamp);
  const double cases[][3] = {{0.7, -0.4, 1.1}, {-1.3, 1.6, -0.5}, {2.0, 0.0, 0.3}, {0.1, -3.0, 2.0}};
  for (const auto& c : cases) {
    // The central differences need L'' continuous at hs (the rational scale's is not at 0, see
    // test_log_scale_grad_kind).
    if (K == ScaleKind::Rational && c[1] == 0.0) continue;
    // Output gradient and log-det gradient together.
    test_affine_backward_case<K, Reverse>(0.9, -0.6, c[0], c[1], c[2], p);
    // Output gradient alone: no log-det contribution.
    test_affine_backward_case<K, Reverse>(-1.2, 0.0, c[0], c[1], c[2], p);
    // Log-det gradient alone: d(+-L)/dhs scaled by gl, nothing for the data or the shift.
    test_affine_backward_case<K, Reverse>(0.0, 1.3, c[0], c[1], c[2], p);
    double L, dL;
    invk::log_scale_with_grad<K, double>(c[1], p, L, dL);
    double g_in, g_hs, g_t;
    invk::affine_backward<K, Reverse, double>(0.0, 1.3, c[0], c[1], p, g_in, g_hs, g_t);
    CHECK_CLOSE(g_hs, (Reverse ? -1.3 : 1.3) * dL, 1e-15, 1e-15);
    CHECK(g_in == 0.0 && g_t == 0.0);
  }
}

void test_affine_backward() {
  test_affine_backward_kind<ScaleKind::Exp, false>(2.0);
  test_affine_backward_kind<ScaleKind::Exp, true>(2.0);
  test_affine_backward_kind<ScaleKind::Exp, false>(0.5);
  test_affine_backward_kind<ScaleKind::Exp, true>(0.5);
  test_affine_backward_kind<ScaleKind::Sigmoid, false>(1.0);
  test_affine_backward_kind<ScaleKind::Sigmoid, true>(1.0);
  test_affine_backward_kind<ScaleKind::SigmoidEps, false>(1.0);
  test_affine_backward_kind<ScaleKind::SigmoidEps, true>(1.0);
  test_affine_backward_kind<ScaleKind::Atan, false>(2.0);
  test_affine_backward_kind<ScaleKind::Atan, true>(2.0);
  test_affine_backward_kind<ScaleKind::Rational, false>(6.9);
  test_affine_backward_kind<ScaleKind::Rational, true>(6.9);
}

template <typename T>
void test_additive() {
  CHECK(invk::additive_forward<T>(T(1.5), T(0.25)) == T(1.75));
  CHECK(invk::additive_forward<T>(T(-2), T(3)) == T(1));
  CHECK(invk::additive_inverse<T>(T(1.75), T(0.25)) == T(1.5));
  CHECK(invk::additive_inverse<T>(T(1), T(3)) == T(-2));
  const T x2 = T(0.3), t = T(-7.125);
  const T back = invk::additive_inverse<T>(invk::additive_forward<T>(x2, t), t);
  CHECK_CLOSE(static_cast<double>(back), static_cast<double>(x2), 0.0,
              8.0 * std::numeric_limits<T>::epsilon());
}

invk::CouplingShape make_shape(int64_t batch, int64_t channels, int64_t spatial) {
  const int64_t c1 = channels / 2;
  return invk::CouplingShape{batch, channels, c1, channels - c1, spatial};
}

// Every offset against the flat index of a contiguous [B, C, S] x, [B, 2 * C2, S] affine h and
// [B, C2, S] additive h; x1 and x2 of all samples together cover x exactly once.
void test_shape_case(int64_t B, int64_t C, int64_t S) {
  const invk::CouplingShape sh = make_shape(B, C, S);
  CHECK(sh.c1 + sh.c2 == C && sh.c2 >= sh.c1);
  CHECK(sh.n1() == sh.c1 * S && sh.n2() == sh.c2 * S && sh.x_stride() == C * S);
  std::vector<int> hits(static_cast<size_t>(B * C * S), 0);
  bool x_ok = true, h_ok = true;
  for (int64_t b = 0; b < B; ++b) {
    for (int64_t c = 0; c < C; ++c) {
      for (int64_t s = 0; s < S; ++s) {
        const int64_t flat = (b * C + c) * S + s;
        const int64_t off = c < sh.c1 ? sh.x1_offset(b) + c * S + s
                                      : sh.x2_offset(b) + (c - sh.c1) * S + s;
        x_ok = x_ok && off == flat;
        if (off >= 0 && off < B * C * S) ++hits[static_cast<size_t>(off)];
      }
    }
    for (int64_t c = 0; c < sh.c2; ++c) {
      for (int64_t s = 0; s < S; ++s) {
        h_ok = h_ok && sh.affine_scale_offset(b) + c * S + s == (b * 2 * sh.c2 + c) * S + s;
        h_ok = h_ok &&
               sh.affine_shift_offset(b) + c * S + s == (b * 2 * sh.c2 + sh.c2 + c) * S + s;
        h_ok = h_ok && sh.additive_shift_offset(b) + c * S + s == (b * sh.c2 + c) * S + s;
      }
    }
  }
  CHECK(x_ok);
  CHECK(h_ok);
  bool once = true;
  for (int v : hits) once = once && v == 1;
  CHECK(once);
}

void test_shapes() {
  test_shape_case(2, 2, 1);
  test_shape_case(2, 3, 1);
  test_shape_case(3, 5, 7);
  test_shape_case(1, 4, 6);
  test_shape_case(4, 7, 3);
  const invk::CouplingShape odd = make_shape(2, 5, 3);
  CHECK(odd.c1 == 2 && odd.c2 == 3);
  CHECK(odd.x2_offset(1) == 21);
  CHECK(odd.affine_shift_offset(1) == 27);
  CHECK(odd.additive_shift_offset(1) == 9);
}

void test_num_chunks() {
  CHECK(invk::num_chunks(0, 4) == 0);
  CHECK(invk::num_chunks(1, 4) == 1);
  CHECK(invk::num_chunks(4, 4) == 1);
  CHECK(invk::num_chunks(5, 4) == 2);
  CHECK(invk::num_chunks(9, 4) == 3);
  CHECK(invk::num_chunks(1024, 256) == 4);
  CHECK(invk::num_chunks(1025, 256) == 5);
  bool covers = true;
  for (int64_t chunk : {1, 3, 16}) {
    for (int64_t n = 1; n < 50; ++n) {
      const int64_t k = invk::num_chunks(n, chunk);
      covers = covers && (k - 1) * chunk < n && n <= k * chunk;
    }
  }
  CHECK(covers);
}

template <typename T>
void test_nan_kind() {
  using M = invk::MathOps<T>;
  const T nan = std::numeric_limits<T>::quiet_NaN();
  CHECK(std::isnan(M::min(nan, T(0))));
  CHECK(std::isnan(M::min(T(0), nan)));
  CHECK(std::isnan(M::min(nan, nan)));
  CHECK(M::min(T(1), T(2)) == T(1));
  CHECK(M::min(T(3), T(-1)) == T(-1));
  const auto p = params<T>(2.0);
  CHECK(std::isnan(invk::log_scale<ScaleKind::Exp, T>(nan, p)));
  CHECK(std::isnan(invk::log_scale<ScaleKind::Sigmoid, T>(nan, p)));
  T L, dL;
  invk::log_scale_with_grad<ScaleKind::Exp, T>(nan, p, L, dL);
  CHECK(std::isnan(L) && std::isnan(dL));
  invk::log_scale_with_grad<ScaleKind::Sigmoid, T>(nan, p, L, dL);
  CHECK(std::isnan(L) && std::isnan(dL));
  CHECK(std::isnan(invk::affine_forward<ScaleKind::Sigmoid, T>(T(1), nan, T(0), p, L)));
  CHECK(std::isnan(L));
  CHECK(std::isnan(invk::affine_forward<ScaleKind::Exp, T>(nan, T(0.5), T(0), p, L)));
  CHECK(std::isnan(invk::affine_inverse<ScaleKind::Exp, T>(T(1), T(0.5), nan, p, L)));
}

void test_nan() {
  test_nan_kind<float>();
  test_nan_kind<double>();
}

}  // namespace

void invk_test::run_coupling_math_tests() {
  test_log_scale_exp<float>();
  test_log_scale_exp<double>();
  test_log_scale_sigmoid<float>();
  test_log_scale_sigmoid<double>();
  test_log_scale_grad();
  test_log_scale_peer_kinds<float>();
  test_log_scale_peer_kinds<double>();
  test_soft_clamp_accuracy<float>();
  test_soft_clamp_accuracy<double>();
  test_affine_round_trip();
  test_affine_backward();
  test_additive<float>();
  test_additive<double>();
  test_shapes();
  test_num_chunks();
  test_nan();
}
