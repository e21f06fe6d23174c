// Host tests of the shared ActNorm math in csrc/kernels/actnorm.h. Formulas: docs/ops/actnorm.md.

#include <cmath>
#include <cstdint>
#include <initializer_list>

#include "check.h"
#include "kernels/actnorm.h"

namespace {

template <typename T>
double tol() {
  return sizeof(T) == sizeof(float) ? 2e-6 : 1e-14;
}

template <typename T>
void test_round_trip() {
  const double bias = 0.7, log_scale = -0.4;
  for (double x : {-3.0, -0.5, 0.0, 1.25, 8.0}) {
    const T y = invk::actnorm_forward<T>(T(x), T(bias), invk::actnorm_scale(T(log_scale)));
    CHECK_CLOSE(y, (x + bias) * std::exp(log_scale), tol<T>(), tol<T>());
    const T back = invk::actnorm_inverse<T>(y, T(bias), invk::actnorm_inv_scale(T(log_scale)));
    CHECK_CLOSE(back, x, tol<T>(), tol<T>());
  }
}

// One element's VJP terms against central differences of the elementwise maps, in double:
// forward y = (x + b) e^l; inverse x = y e^-l - b with y = (x + b) e^l.
template <bool Reverse>
void test_backward_case(double g, double x, double b, double l) {
  const double eps = 1e-6;
  double g_in, g_b, g_ls;
  invk::actnorm_backward<Reverse, double>(g, x, b, invk::actnorm_scale(l), invk::actnorm_inv_scale(l), g_in, g_b, g_ls);
  if (!Reverse) {
    const auto f = [&](double xx, double bb, double ll) { return g * (xx + bb) * std::exp(ll); };
    CHECK_CLOSE(g_in, (f(x + eps, b, l) - f(x - eps, b, l)) / (2 * eps), 1e-7, 1e-8);
    CHECK_CLOSE(g_b, (f(x, b + eps, l) - f(x, b - eps, l)) / (2 * eps), 1e-7, 1e-8);
    CHECK_CLOSE(g_ls, (f(x, b, l + eps) - f(x, b, l - eps)) / (2 * eps), 1e-7, 1e-8);
  } else {
    const double y = (x + b) * std::exp(l);
    const auto f = [&](double yy, double bb, double ll) { return g * (yy * std::exp(-ll) - bb); };
    CHECK_CLOSE(g_in, (f(y + eps, b, l) - f(y - eps, b, l)) / (2 * eps), 1e-7, 1e-8);
    CHECK_CLOSE(g_b, (f(y, b + eps, l) - f(y, b - eps, l)) / (2 * eps), 1e-7, 1e-8);
    CHECK_CLOSE(g_ls, (f(y, b, l + eps) - f(y, b, l - eps)) / (2 * eps), 1e-7, 1e-8);
  }
}

void test_backward() {
  for (double g : {-1.5, 0.3}) {
    for (double x : {-2.0, 0.4}) {
      test_backward_case<false>(g, x, 0.3, -0.7);
      test_backward_case<true>(g, x, -1.1, 0.5);
    }
  }
}

void test_shape() {
  const invk::ActNormShape sh{3, 4, 5};
  int64_t seen = 0;
  for (int64_t c = 0; c < sh.channels; ++c) {
    for (int64_t k = 0; k < sh.batch * sh.spatial; ++k) {
      const int64_t idx = sh.channel_element(c, k);
      CHECK((idx / sh.spatial) % sh.channels == c);
      CHECK(idx / (sh.channels * sh.spatial) == k / sh.spatial);
      CHECK(idx % sh.spatial == k % sh.spatial);
      ++seen;
    }
  }
  CHECK(seen == sh.batch * sh.channels * sh.spatial);
  CHECK(sh.plane_offset(2, 3) == (2 * 4 + 3) * 5);
}

void test_nan() {
  const double nan = std::nan("");
  CHECK(std::isnan(invk::actnorm_forward<double>(nan, 1.0, 2.0)));
  CHECK(std::isnan(invk::actnorm_inverse<float>(1.0f, static_cast<float>(nan), 0.5f)));
}

}  // namespace

void invk_test::run_actnorm_math_tests() {
  test_round_trip<float>();
  test_round_trip<double>();
  test_backward();
  test_shape();
  test_nan();
}
