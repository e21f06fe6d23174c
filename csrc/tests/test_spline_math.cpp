// Host tests of the shared rational-quadratic spline math in csrc/kernels/spline.h (the functions
// the CPU backend runs and the CUDA kernels compile for the device). Formulas: docs/ops/spline.md.

#include <cmath>
#include <cstdint>
#include <vector>

#include "check.h"
#include "kernels/spline.h"

namespace {

using invk::SplineBin;
using invk::SplineSpec;

// One element's parameters (or gradients) at consecutive addresses.
template <typename T>
invk::StridedParams<T, T> strided(const T* p) {
  return {p, 1};
}

template <typename T>
invk::StridedGrads<T, T> grads_to(T* out) {
  return {out, 1};
}

// Deterministic parameters of one element: a linear congruential generator mapped to
// [-scale, scale].
std::vector<double> raw_params(int bins, double scale, uint32_t seed) {
  std::vector<double> p(3 * bins - 1);
  uint32_t state = seed;
  for (double& v : p) {
    state = state * 1664525u + 1013904223u;
    v = scale * (2.0 * (state >> 8) / double(1u << 24) - 1.0);
  }
  return p;
}

SplineSpec<double> spec_of(int bins, double bound = 3.0) { return {bins, bound, 1e-3, 2e-3, 1e-2}; }

// y and log dy/dx of the whole transform (identity outside the bounds).
void forward(const SplineSpec<double>& spec, const std::vector<double>& p, double x, double* y, double* log_d) {
  if (x < -spec.bound || x > spec.bound) {
    *y = x;
    *log_d = 0.0;
    return;
  }
  const SplineBin<double> b = invk::spline_locate(spec, strided(p.data()), x, false);
  invk::spline_forward(b, x, y, log_d);
}

void inverse(const SplineSpec<double>& spec, const std::vector<double>& p, double y, double* x, double* log_d) {
  const SplineBin<double> b = invk::spline_locate(spec, strided(p.data()), y, true);
  invk::spline_inverse(b, y, x, log_d);
}

void test_identity() {
  for (int bins : {1, 4, 8}) {
    const SplineSpec<double> spec = spec_of(bins);
    std::vector<double> p(3 * bins - 1, 0.0);
    for (int j = 2 * bins; j < 3 * bins - 1; ++j) p[j] = std::log(std::expm1(1.0 - spec.min_derivative));
    for (double x = -3.0; x <= 3.0; x += 0.37) {
      double y, log_d;
      forward(spec, p, x, &y, &log_d);
      CHECK_CLOSE(y, x, 0.0, 1e-12);
      CHECK_CLOSE(log_d, 0.0, 0.0, 1e-12);
    }
  }
}

void test_round_trip() {
  for (int bins : {1, 3, 8}) {
    for (uint32_t seed : {1u, 2u, 3u}) {
      const SplineSpec<double> spec = spec_of(bins);
      const std::vector<double> p = raw_params(bins, 2.0, seed);
      for (double x = -3.0; x <= 3.0; x += 0.13) {
        double y, log_d, back, log_inv;
        forward(spec, p, x, &y, &log_d);
        CHECK(y >= -3.0 && y <= 3.0);
        inverse(spec, p, y, &back, &log_inv);
        CHECK_CLOSE(back, x, 1e-11, 1e-11);
        CHECK_CLOSE(log_inv, -log_d, 1e-9, 1e-9);
      }
    }
  }
}

// A value on an interior knot belongs to the bin on its right; the ends map to the ends.
void test_knots() {
  const int bins = 5;
  const SplineSpec<double> spec = spec_of(bins);
  const std::vector<double> p = raw_params(bins, 1.5, 7u);
  double knot = -3.0;
  for (int m = 0; m < bins; ++m) {
    const SplineBin<double> b = invk::spline_locate(spec, strided(p.data()), knot, false);
    CHECK(b.k == m);
    CHECK(b.x0 == knot);
    double y, log_d;
    invk::spline_forward(b, knot, &y, &log_d);
    CHECK(y == b.y0);
    knot = b.x1;
  }
  CHECK(knot == 3.0);
  double y, log_d;
  forward(spec, p, 3.0, &y, &log_d);
  CHECK(y == 3.0);
}

// The VJP of F = g_y * y + g_l * log dy/dx (forward) or g_x * x + g_l * log dx/dy (inverse) for
// the input and every raw parameter, against central differences.
void test_vjp(bool inverse_direction) {
  const double g_out = 0.7, g_l = -1.3, step = 1e-6;
  for (int bins : {1, 2, 6}) {
    for (uint32_t seed : {11u, 12u}) {
      const SplineSpec<double> spec = spec_of(bins);
      std::vector<double> p = raw_params(bins, 2.0, seed);
      // One derivative parameter far beyond 50 (it counts in full) and, forward, one whose
      // derivative is held at the limit (no gradient: the central difference is 0 there too;
      // the inverse there is flat to ~1e-150 of the bin, beyond what central differences resolve).
      if (bins > 1) p[2 * bins] = 60.0;
      if (bins > 2 && !inverse_direction) p[2 * bins + 1] = 1e200;
      auto F = [&](double v, const std::vector<double>& q) {
        double out, log_d;
        if (inverse_direction) {
          inverse(spec, q, v, &out, &log_d);
        } else {
          forward(spec, q, v, &out, &log_d);
        }
        return g_out * out + g_l * log_d;
      };
      for (double v : {-2.7, -1.1, 0.3, 1.9, 2.8}) {
        double x = v;
        if (inverse_direction) {
          double log_d;
          inverse(spec, p, v, &x, &log_d);
        }
        const SplineBin<double> b = invk::spline_locate(spec, strided(p.data()), x, false);
        const invk::SplineGrads<double> g = inverse_direction ? invk::spline_inverse_vjp(b, x, g_out, g_l)
                                                              : invk::spline_forward_vjp(b, x, g_out, g_l);
        const double fd_v = (F(v + step, p) - F(v - step, p)) / (2 * step);
        CHECK_CLOSE(g.x, fd_v, 1e-5, 1e-7);
        std::vector<double> grads(p.size());
        invk::spline_param_grads(spec, strided(p.data()), b, g, grads_to(grads.data()), false);
        for (size_t j = 0; j < p.size(); ++j) {
          std::vector<double> up = p, down = p;
          up[j] += step;
          down[j] -= step;
          const double fd = (F(v, up) - F(v, down)) / (2 * step);
          CHECK_CLOSE(grads[j], fd, 1e-5, 1e-7);
        }
      }
    }
  }
}

// Rises beyond the bin (what rounding gives next to a knot, at worst) and a negative
// discriminant (both derivatives below the slope, far from the bin): a root in [0, 1].
void test_root() {
  const double s = 4.0, H = 0.5;
  CHECK(invk::spline_root(0.0, H, s, 0.01, 30.0) == 0.0);
  for (double d_far : {30.0, 0.01}) {
    for (double rise : {1.0 + 1e-9, 1.5, 10.0, 1e3}) {
      CHECK(invk::spline_root(rise * H, H, s, 0.01, d_far) == 1.0);
    }
  }
  const float r = invk::spline_root(1e3f * 0.5f, 0.5f, 4.0f, 0.01f, 0.01f);
  CHECK(r == 1.0f);
}

// float32 evaluation of the same element agrees with double, and every value stays finite for
// huge raw widths and heights (a softmax saturated to one bin).
void test_float() {
  const int bins = 8;
  std::vector<double> p = raw_params(bins, 3.0, 5u);
  p[0] = 1e30;
  p[bins] = -1e30;
  std::vector<float> pf(p.begin(), p.end());
  const SplineSpec<double> spec = spec_of(bins);
  const SplineSpec<float> specf{bins, 3.0f, 1e-3f, 2e-3f, 1e-2f};
  for (double x = -2.95; x <= 3.0; x += 0.25) {
    double y, log_d;
    forward(spec, p, x, &y, &log_d);
    const SplineBin<float> b = invk::spline_locate(specf, strided(pf.data()), float(x), false);
    float yf, log_df;
    invk::spline_forward(b, float(x), &yf, &log_df);
    CHECK(std::isfinite(yf) && std::isfinite(log_df));
    CHECK_CLOSE(yf, y, 1e-5, 1e-5);
    CHECK_CLOSE(log_df, log_d, 1e-4, 1e-4);
    const invk::SplineGrads<float> g = invk::spline_forward_vjp(b, float(x), 1.0f, 1.0f);
    std::vector<float> grads(pf.size());
    invk::spline_param_grads(specf, strided(pf.data()), b, g, grads_to(grads.data()), false);
    bool finite = std::isfinite(g.x);
    for (float v : grads) finite = finite && std::isfinite(v);
    CHECK(finite);
    CHECK(grads[0] == 0.0f && grads[bins] == 0.0f);
  }
}

// Adding a constant to every raw width (height) leaves the knots as they were, to round-off,
// however large the raw values: the softmax is taken relative to their maximum.
void test_shift_invariance() {
  const int bins = 6;
  const SplineSpec<double> spec = spec_of(bins);
  const std::vector<double> p = raw_params(bins, 80.0, 21u);
  for (double shift : {-1e3, 60.0, 1e6}) {
    std::vector<double> q = p;
    for (int j = 0; j < 2 * bins; ++j) q[j] += shift;
    for (double x = -2.9; x <= 3.0; x += 0.4) {
      const SplineBin<double> a = invk::spline_locate(spec, strided(p.data()), x, false);
      const SplineBin<double> b = invk::spline_locate(spec, strided(q.data()), x, false);
      CHECK(a.k == b.k);
      const double tol = 1e-15 * (1.0 + std::fabs(shift)) * 16;
      CHECK_CLOSE(b.x0, a.x0, 0.0, tol);
      CHECK_CLOSE(b.x1, a.x1, 0.0, tol);
      CHECK_CLOSE(b.y0, a.y0, 0.0, tol);
      CHECK_CLOSE(b.y1, a.y1, 0.0, tol);
    }
  }
}

// Raw derivatives so large that the derivative is held at the limit, in float: with a tail
// bound of 1e30 forward and inverse values stay finite (the spline is flat to float precision
// between its knots there, so x is not recoverable from y and no round trip is asked), and with
// tail bound 3 both VJPs too. (With the huge bound the gradients of the raw heights are of the
// order bound * limit, beyond float's range whatever the arithmetic.)
void test_derivative_limit() {
  const int bins = 4;
  std::vector<float> p(3 * bins - 1, 0.0f);
  for (int j = 2 * bins; j < 3 * bins - 1; ++j) p[j] = 3e38f;
  for (float bound : {1e30f, 3.0f}) {
    const SplineSpec<float> spec{bins, bound, 1e-3f, 1e-3f, 1e-3f};
    float d, dd;
    invk::spline_derivative_and_grad(spec, 3e38f, &d, &dd);
    CHECK(d == invk::SplineLimits<float>::derivative && dd == 0.0f);
    invk::spline_derivative_and_grad(spec, 60.0f, &d, &dd);
    CHECK(d == 60.0f + spec.min_derivative && dd == 1.0f);
    for (float fraction : {-0.9f, -0.26f, 0.1f, 0.77f}) {
      const float x = fraction * bound;
      const SplineBin<float> b = invk::spline_locate(spec, strided(p.data()), x, false);
      float y, log_d, back, log_inv;
      invk::spline_forward(b, x, &y, &log_d);
      const SplineBin<float> bi = invk::spline_locate(spec, strided(p.data()), y, true);
      invk::spline_inverse(bi, y, &back, &log_inv);
      CHECK(std::isfinite(y) && std::isfinite(log_d) && std::isfinite(back) && std::isfinite(log_inv));
      if (bound > 1e6f) continue;
      for (bool inv : {false, true}) {
        const invk::SplineGrads<float> g = inv ? invk::spline_inverse_vjp(b, x, 1.0f, 1.0f)
                                               : invk::spline_forward_vjp(b, x, 1.0f, 1.0f);
        std::vector<float> grads(p.size());
        invk::spline_param_grads(spec, strided(p.data()), b, g, grads_to(grads.data()), false);
        bool finite = std::isfinite(g.x);
        for (float v : grads) finite = finite && std::isfinite(v);
        CHECK(finite);
      }
    }
  }
}

// float32, one step from every height knot of steep bins (parameters up to +-8): the inverse,
// solved from the nearer end of the bin, is finite and the forward maps it back to y.
void test_inverse_next_to_knots() {
  const int bins = 8;
  const SplineSpec<float> spec{bins, 3.0f, 1e-3f, 1e-3f, 1e-3f};
  int bad = 0, total = 0;
  for (uint32_t seed = 1; seed <= 400; ++seed) {
    const std::vector<double> pd = raw_params(bins, 8.0, seed);
    const std::vector<float> p(pd.begin(), pd.end());
    float knot = -3.0f;
    for (int m = 0; m <= bins; ++m) {
      for (float toward : {-10.0f, 10.0f}) {
        const float y = std::fmin(3.0f, std::fmax(-3.0f, std::nextafter(knot, toward)));
        const SplineBin<float> b = invk::spline_locate(spec, strided(p.data()), y, true);
        float x, log_d, y_back, log_f;
        invk::spline_inverse(b, y, &x, &log_d);
        const SplineBin<float> bx = invk::spline_locate(spec, strided(p.data()), x, false);
        invk::spline_forward(bx, x, &y_back, &log_f);
        ++total;
        if (!(std::isfinite(x) && std::isfinite(log_d) && std::fabs(y_back - y) <= 1e-5f)) ++bad;
      }
      if (m < bins) knot = invk::spline_locate(spec, strided(p.data()), knot, true).y1;
    }
  }
  CHECK(total == 400 * (bins + 1) * 2);
  CHECK(bad == 0);
}

}  // namespace

namespace invk_test {

void run_spline_math_tests() {
  test_identity();
  test_round_trip();
  test_knots();
  test_vjp(false);
  test_vjp(true);
  test_root();
  test_float();
  test_inverse_next_to_knots();
  test_shift_invariance();
  test_derivative_limit();
}

}  // namespace invk_test
