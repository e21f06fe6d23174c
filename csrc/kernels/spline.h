#pragma once

#include <stdint.h>

#include "macros.h"
#include "scalar_math.h"

// Shared per-element math of the rational-quadratic spline kernels (CPU and CUDA): nflows'
// conventions with linear tails. Formulas, layout and numerics: docs/ops/spline.md; the float64
// oracle is invkernels/reference/spline.py.
//
// One element's raw parameters are read at p[j * stride], j < 3 * bins - 1: bins widths, bins
// heights, bins - 1 interior derivatives. The computation has two steps, as in the reference:
// spline_locate normalizes the parameters into the knots of the element's bin (the one step that
// differs between the parameterizations of the flow libraries), and the spline is evaluated from
// those knots (spline_forward, spline_inverse, spline_forward_vjp); spline_param_grads takes the
// bin's gradients back to the raw parameters.

namespace invk {

// The largest knot derivative the spline uses when computing in T: 2^(e/2 - 4) for T's largest
// exponent e (2^60 in float, 2^508 in double), a sixteenth of the square root of T's largest
// value. Below it every intermediate of the forward, the inverse's quadratic and the VJPs stays
// finite; a larger min_derivative + softplus(raw) is held at it and gets no gradient.
template <typename T>
struct SplineLimits;

template <>
struct SplineLimits<float> {
  static constexpr float derivative = 0x1p60f;
};

template <>
struct SplineLimits<double> {
  static constexpr double derivative = 0x1p508;
};

template <typename T>
struct SplineSpec {
  int bins;
  T bound;           // tail_bound: the spline covers [-bound, bound], identity outside
  T min_width;       // min_bin_width
  T min_height;      // min_bin_height
  T min_derivative;  // min_derivative
};

// Softmax statistics (max and sum of exp(r - max)) of n raw values: exact for any finite values.
template <typename T>
struct SoftmaxStats {
  T max;
  T sum;
};

template <typename T, typename P>
INVK_HOST_DEVICE SoftmaxStats<T> spline_softmax_stats(const P* p, int64_t stride, int n) {
  using M = MathOps<T>;
  T m = static_cast<T>(p[0]);
  for (int j = 1; j < n; ++j) {
    const T r = static_cast<T>(p[j * stride]);
    m = r > m ? r : m;
  }
  T sum = T(0);
  for (int j = 0; j < n; ++j) sum += M::exp(static_cast<T>(p[j * stride]) - m);
  return {m, sum};
}

// The bin of one element: its index k, its knots (x0, y0) and (x1, y1) with the derivatives d0,
// d1 there, and for the gradients the softmax statistics and the cumulative softmax of the widths
// (cw0 = sum of the first k normalized-softmax terms, cw1 the first k + 1) and of the heights.
template <typename T>
struct SplineBin {
  int k;
  T x0, x1, y0, y1, d0, d1;
  SoftmaxStats<T> w, h;
  T cw0, cw1, ch0, ch1;
};

template <typename T>
INVK_HOST_DEVICE T spline_softplus(T r) {
  using M = MathOps<T>;
  return (r > T(0) ? r : T(0)) + M::log1p(M::exp(-M::abs(r)));
}

template <typename T>
INVK_HOST_DEVICE T spline_sigmoid(T r) {
  using M = MathOps<T>;
  const T e = M::exp(-M::abs(r));
  return r >= T(0) ? T(1) / (T(1) + e) : e / (T(1) + e);
}

// An interior knot derivative from its raw value: min_derivative + softplus(r), held at
// SplineLimits<T>::derivative.
template <typename T>
INVK_HOST_DEVICE T spline_derivative(const SplineSpec<T>& spec, T r) {
  const T d = spec.min_derivative + spline_softplus(r);
  return d > SplineLimits<T>::derivative ? SplineLimits<T>::derivative : d;
}

// d spline_derivative / d r: sigmoid(r), 0 where the derivative is held at the limit.
template <typename T>
INVK_HOST_DEVICE T spline_derivative_grad(const SplineSpec<T>& spec, T r) {
  return spec.min_derivative + spline_softplus(r) > SplineLimits<T>::derivative ? T(0) : spline_sigmoid(r);
}

// The bin of v (inside [-bound, bound]) among the knots in x (by_y false: the forward) or in y
// (by_y true: the inverse): the last knot <= v among the first bins (a value on an interior knot
// belongs to the bin on its right). Knot positions: bound * (2 * cumulative normalized size - 1),
// the ends set exactly; boundary derivatives 1.
template <typename T, typename P>
INVK_HOST_DEVICE SplineBin<T> spline_locate(const SplineSpec<T>& spec, const P* p, int64_t stride, T v, bool by_y) {
  using M = MathOps<T>;
  const int n = spec.bins;
  const P* pw = p;
  const P* ph = p + n * stride;
  const P* pd = p + 2 * n * stride;
  SplineBin<T> b;
  b.w = spline_softmax_stats<T>(pw, stride, n);
  b.h = spline_softmax_stats<T>(ph, stride, n);
  const T scale_w = T(1) - spec.min_width * T(n);
  const T scale_h = T(1) - spec.min_height * T(n);
  T cum_w = T(0), cum_h = T(0);
  b.cw0 = T(0);
  b.ch0 = T(0);
  b.x0 = -spec.bound;
  b.y0 = -spec.bound;
  int k = 0;
  for (;; ++k) {
    const T sw = M::exp(static_cast<T>(pw[k * stride]) - b.w.max) / b.w.sum;
    const T sh = M::exp(static_cast<T>(ph[k * stride]) - b.h.max) / b.h.sum;
    b.cw1 = b.cw0 + sw;
    b.ch1 = b.ch0 + sh;
    cum_w += spec.min_width + scale_w * sw;
    cum_h += spec.min_height + scale_h * sh;
    const bool last = k == n - 1;
    // bound * (2 cum - 1) rather than 2 bound cum - bound: 2 bound overflows float for bounds
    // beyond half its range.
    b.x1 = last ? spec.bound : spec.bound * (T(2) * cum_w - T(1));
    b.y1 = last ? spec.bound : spec.bound * (T(2) * cum_h - T(1));
    if (last || v < (by_y ? b.y1 : b.x1)) break;
    b.cw0 = b.cw1;
    b.ch0 = b.ch1;
    b.x0 = b.x1;
    b.y0 = b.y1;
  }
  b.k = k;
  b.d0 = k == 0 ? T(1) : spline_derivative(spec, static_cast<T>(pd[(k - 1) * stride]));
  b.d1 = k == n - 1 ? T(1) : spline_derivative(spec, static_cast<T>(pd[k * stride]));
  return b;
}

// The spline's pieces at the fraction theta of a bin of width w, height H, slope s = H / w:
// y = y0 + H A / D and L = log dy/dx = 2 log s + log Q - 2 log D (the product s^2 Q could
// overflow where s and Q do not).
template <typename T>
struct SplineTerms {
  T w, H, s, theta, t, A, D, Q;
};

template <typename T>
INVK_HOST_DEVICE SplineTerms<T> spline_terms(const SplineBin<T>& b, T theta) {
  SplineTerms<T> q;
  q.w = b.x1 - b.x0;
  q.H = b.y1 - b.y0;
  q.s = q.H / q.w;
  q.theta = theta;
  q.t = theta * (T(1) - theta);
  q.A = q.s * theta * theta + b.d0 * q.t;
  q.D = q.s + (b.d0 + b.d1 - T(2) * q.s) * q.t;
  const T u = T(1) - theta;
  q.Q = b.d1 * theta * theta + T(2) * q.s * q.t + b.d0 * u * u;
  return q;
}

template <typename T>
INVK_HOST_DEVICE T spline_log_derivative(const SplineTerms<T>& q) {
  using M = MathOps<T>;
  return T(2) * M::log(q.s) + M::log(q.Q) - T(2) * M::log(q.D);
}

// Forward inside the bounds: y and log dy/dx at x in bin b.
template <typename T>
INVK_HOST_DEVICE void spline_forward(const SplineBin<T>& b, T x, T* y, T* log_d) {
  const SplineTerms<T> q = spline_terms(b, (x - b.x0) / (b.x1 - b.x0));
  *y = b.y0 + q.H * (q.A / q.D);
  *log_d = spline_log_derivative(q);
}

// The fraction of the bin at which the spline rises by dy from the end whose derivative is
// d_near (d_far at the other end): the root in [0, 1] of a theta^2 + b theta + c = 0, divided by
// H so b^2 stays finite for any tail bound. c = -s dy / H <= 0 and a + b + c = s (1 - dy / H) >= 0,
// so the root is taken in the form without cancellation: 2c / (-b - sqrt(b^2 - 4ac)) for b >= 0,
// (-b + sqrt(b^2 - 4ac)) / 2a for b < 0 (then a > 0; a rise beyond the bin with a <= 0 gives 1).
// The discriminant is clamped at 0 and the root to [0, 1].
template <typename T>
INVK_HOST_DEVICE T spline_root(T dy, T H, T s, T d_near, T d_far) {
  using M = MathOps<T>;
  const T rise = dy / H;
  const T slope = d_near + d_far - T(2) * s;
  const T a = rise * slope + (s - d_near);
  const T bq = d_near - rise * slope;
  const T c = -s * rise;
  const T disc = bq * bq - T(4) * a * c;
  const T sq = M::sqrt(disc > T(0) ? disc : T(0));
  const T root = bq >= T(0) ? T(2) * c / (-bq - sq) : (a > T(0) ? (sq - bq) / (T(2) * a) : T(1));
  return root < T(0) ? T(0) : (root > T(1) ? T(1) : root);
}

// Inverse inside the bounds: x and log dx/dy at y in bin b (located by y). The quadratic is
// solved from the bin's end nearer to y (read backwards, the spline is the same spline with d0
// and d1 exchanged).
template <typename T>
INVK_HOST_DEVICE void spline_inverse(const SplineBin<T>& b, T y, T* x, T* log_d) {
  const T w = b.x1 - b.x0, H = b.y1 - b.y0, s = H / w;
  const T dy = y - b.y0;
  const bool upper = dy > T(0.5) * H;
  SplineBin<T> near = b;
  if (upper) {
    near.d0 = b.d1;
    near.d1 = b.d0;
  }
  const T theta = spline_root(upper ? b.y1 - y : dy, H, s, near.d0, near.d1);
  *x = upper ? b.x1 - theta * w : theta * w + b.x0;
  *log_d = -spline_log_derivative(spline_terms(near, theta));
}

// Gradients of g_y * y + g_l * log dy/dx with respect to the input x and the bin's knots and
// derivatives.
template <typename T>
struct SplineGrads {
  T x, x0, x1, y0, y1, d0, d1;
};

// The partial derivatives of y (or of L = log dy/dx) with respect to theta, s, H, d0, d1 at the
// terms q, the other variables of the bin fixed.
template <typename T>
struct SplinePartials {
  T theta, s, H, d0, d1;
};

template <typename T>
INVK_HOST_DEVICE SplinePartials<T> spline_value_partials(const SplineBin<T>& b, const SplineTerms<T>& q) {
  const T th = q.theta;
  const T r = q.A / q.D;
  const T hd = q.H / q.D;
  SplinePartials<T> y;
  // dy/dtheta = H s Q / D^2 (dy/dx = s^2 Q / D^2): the quotient rule's A'D - AD' would cancel
  // between terms of the size of the derivatives.
  y.theta = hd * q.s * q.Q / q.D;
  y.s = hd * (th * th - r * (T(1) - T(2) * q.t));
  y.H = r;
  y.d0 = hd * q.t * (T(1) - r);
  y.d1 = -hd * r * q.t;
  return y;
}

template <typename T>
INVK_HOST_DEVICE SplinePartials<T> spline_log_partials(const SplineBin<T>& b, const SplineTerms<T>& q) {
  const T th = q.theta;
  const T slope = b.d0 + b.d1 - T(2) * q.s;
  const T u = T(1) - th;
  SplinePartials<T> l;
  l.theta = (T(2) * b.d1 * th + T(2) * q.s * (T(1) - T(2) * th) - T(2) * b.d0 * u) / q.Q -
            T(2) * slope * (T(1) - T(2) * th) / q.D;
  l.s = T(2) / q.s + T(2) * q.t / q.Q - T(2) * (T(1) - T(2) * q.t) / q.D;
  l.H = T(0);
  l.d0 = u * u / q.Q - T(2) * q.t / q.D;
  l.d1 = th * th / q.Q - T(2) * q.t / q.D;
  return l;
}

// theta = (x - x0) / w, s = H / w, H = y1 - y0 and y = y0 + ...: the partials taken to x and the
// knots, for F = y (value true: the explicit y0 term) or F = L.
template <typename T>
INVK_HOST_DEVICE SplineGrads<T> spline_chain(const SplineTerms<T>& q, const SplinePartials<T>& f, bool value) {
  SplineGrads<T> g;
  g.x = f.theta / q.w;
  g.x0 = (f.theta * (q.theta - T(1)) + f.s * q.s) / q.w;
  g.x1 = -(f.theta * q.theta + f.s * q.s) / q.w;
  g.y0 = (value ? T(1) : T(0)) - f.H - f.s / q.w;
  g.y1 = f.H + f.s / q.w;
  g.d0 = f.d0;
  g.d1 = f.d1;
  return g;
}

// g_y * (partials of y) + g_l * (partials of L), taken to x and the knots.
template <typename T>
INVK_HOST_DEVICE SplineGrads<T> spline_combine(const SplineTerms<T>& q, const SplinePartials<T>& py,
                                               const SplinePartials<T>& pl, T g_y, T g_l) {
  const SplineGrads<T> gy = spline_chain(q, py, true);
  const SplineGrads<T> gl = spline_chain(q, pl, false);
  return {g_y * gy.x + g_l * gl.x,   g_y * gy.x0 + g_l * gl.x0, g_y * gy.x1 + g_l * gl.x1,
          g_y * gy.y0 + g_l * gl.y0, g_y * gy.y1 + g_l * gl.y1, g_y * gy.d0 + g_l * gl.d0,
          g_y * gy.d1 + g_l * gl.d1};
}

// Forward VJP inside the bounds: the gradients of g_y * y(x) + g_l * log dy/dx at x in bin b.
template <typename T>
INVK_HOST_DEVICE SplineGrads<T> spline_forward_vjp(const SplineBin<T>& b, T x, T g_y, T g_l) {
  const SplineTerms<T> q = spline_terms(b, (x - b.x0) / (b.x1 - b.x0));
  return spline_combine(q, spline_value_partials(b, q), spline_log_partials(b, q), g_y, g_l);
}

// Inverse VJP inside the bounds: at the rebuilt x = f^-1(y) (bin b located by x or y alike), the
// gradients of g_x * x(y) + g_l * log dx/dy. With u = (g_x - g_l L_x) / y_x they are those of
// the forward VJP for (g_y, g_l) = (-u, -g_l), and the input gradient is u.
template <typename T>
INVK_HOST_DEVICE SplineGrads<T> spline_inverse_vjp(const SplineBin<T>& b, T x, T g_x, T g_l) {
  const SplineTerms<T> q = spline_terms(b, (x - b.x0) / (b.x1 - b.x0));
  const SplinePartials<T> py = spline_value_partials(b, q), pl = spline_log_partials(b, q);
  const T u = (g_x - g_l * pl.theta / q.w) / (py.theta / q.w);
  SplineGrads<T> g = spline_combine(q, py, pl, -u, -g_l);
  g.x = u;
  return g;
}

// The bin's gradients (g.x0 ... g.d1) taken back to the raw parameters: out[j * out_stride],
// j < 3 * bins - 1, each written once (0 where a parameter does not reach the bin, or for a
// derivative held at the limit).
// Knot m (0 < m < bins) sits at 2 * bound * (m * min_width + (1 - bins * min_width) * C_m) - bound
// with C_m the sum of the first m softmax terms, so d knot_m / d r_j = 2 * bound * (1 - bins *
// min_width) * softmax_j * ([j < m] - C_m); the end knots are fixed.
template <typename T, typename P, typename G>
INVK_HOST_DEVICE void spline_param_grads(const SplineSpec<T>& spec, const P* p, int64_t stride, const SplineBin<T>& b,
                                         const SplineGrads<T>& g, G* out, int64_t out_stride) {
  using M = MathOps<T>;
  const int n = spec.bins;
  const int k = b.k;
  const T g0w = k > 0 ? g.x0 : T(0), g1w = k + 1 < n ? g.x1 : T(0);
  const T g0h = k > 0 ? g.y0 : T(0), g1h = k + 1 < n ? g.y1 : T(0);
  const T base_w = g0w * b.cw0 + g1w * b.cw1;
  const T base_h = g0h * b.ch0 + g1h * b.ch1;
  for (int j = 0; j < n; ++j) {
    const T rw = static_cast<T>(p[j * stride]);
    const T rh = static_cast<T>(p[(n + j) * stride]);
    const T sw = M::exp(rw - b.w.max) / b.w.sum;
    const T sh = M::exp(rh - b.h.max) / b.h.sum;
    const T in_w = (j < k ? g0w : T(0)) + (j < k + 1 ? g1w : T(0));
    const T in_h = (j < k ? g0h : T(0)) + (j < k + 1 ? g1h : T(0));
    const T gw = T(2) * (spec.bound * ((T(1) - spec.min_width * T(n)) * sw * (in_w - base_w)));
    const T gh = T(2) * (spec.bound * ((T(1) - spec.min_height * T(n)) * sh * (in_h - base_h)));
    out[j * out_stride] = static_cast<G>(gw);
    out[(n + j) * out_stride] = static_cast<G>(gh);
  }
  for (int j = 0; j + 1 < n; ++j) {
    const T r = static_cast<T>(p[(2 * n + j) * stride]);
    // Interior derivative j is d at knot j + 1: the bin's d1 when j == k, its d0 when j == k - 1.
    const T gd = (j == k ? g.d1 : T(0)) + (j + 1 == k ? g.d0 : T(0));
    out[(2 * n + j) * out_stride] = static_cast<G>(gd * spline_derivative_grad(spec, r));
  }
}

// The geometry of the spline ops: x is [batch, channels, spatial]; h is [batch, channels * params,
// spatial] with params = 3 * bins - 1, so the parameters of element (b, c, s) sit at
// param_offset(b, c, s) + j * spatial, j < params.
struct SplineShape {
  int64_t batch;
  int64_t channels;
  int64_t spatial;
  int64_t params;

  INVK_HOST_DEVICE int64_t planes() const { return batch * channels; }
  INVK_HOST_DEVICE int64_t param_offset(int64_t plane, int64_t s) const { return plane * params * spatial + s; }
};

template <typename T>
INVK_HOST_DEVICE bool spline_outside(const SplineSpec<T>& spec, T v) {
  return v < -spec.bound || v > spec.bound;
}

// The whole transform of one element (identity outside [-bound, bound]): the forward (inverse
// false) or the inverse, its output and log |d out / d in|.
template <typename T, typename P>
INVK_HOST_DEVICE void spline_element(const SplineSpec<T>& spec, const P* p, int64_t stride, T v, bool inverse, T* out,
                                     T* log_d) {
  if (spline_outside(spec, v)) {
    *out = v;
    *log_d = T(0);
    return;
  }
  const SplineBin<T> b = spline_locate(spec, p, stride, v, inverse);
  if (inverse) {
    spline_inverse(b, v, out, log_d);
  } else {
    spline_forward(b, v, out, log_d);
  }
}

// The VJP of one element's forward at its input x (reverse false) or of its inverse at its output
// x (reverse true) for the gradients g (of the output) and g_l (of the log-det): the input's
// gradient, and every raw parameter's at out[j * out_stride] (0 in the tails).
template <typename T, typename P, typename G>
INVK_HOST_DEVICE T spline_element_vjp(const SplineSpec<T>& spec, const P* p, int64_t stride, T x, T g, T g_l,
                                      bool reverse, G* out, int64_t out_stride) {
  if (spline_outside(spec, x)) {
    for (int j = 0; j < 3 * spec.bins - 1; ++j) out[j * out_stride] = G(0);
    return g;
  }
  const SplineBin<T> b = spline_locate(spec, p, stride, x, false);
  const SplineGrads<T> grads = reverse ? spline_inverse_vjp(b, x, g, g_l) : spline_forward_vjp(b, x, g, g_l);
  spline_param_grads(spec, p, stride, b, grads, out, out_stride);
  return grads.x;
}

// Inverse and backward of one element in one pass: x rebuilt from the forward's output y, and the
// VJP of the forward at x for (g, g_l): returns x, the input's gradient in *g_x, the parameters'
// at out[j * out_stride].
template <typename T, typename P, typename G>
INVK_HOST_DEVICE T spline_element_inv_vjp(const SplineSpec<T>& spec, const P* p, int64_t stride, T y, T g, T g_l,
                                          T* g_x, G* out, int64_t out_stride) {
  if (spline_outside(spec, y)) {
    for (int j = 0; j < 3 * spec.bins - 1; ++j) out[j * out_stride] = G(0);
    *g_x = g;
    return y;
  }
  const SplineBin<T> b = spline_locate(spec, p, stride, y, true);
  T x, log_d;
  spline_inverse(b, y, &x, &log_d);
  const SplineGrads<T> grads = spline_forward_vjp(b, x, g, g_l);
  spline_param_grads(spec, p, stride, b, grads, out, out_stride);
  *g_x = grads.x;
  return x;
}

}  // namespace invk
