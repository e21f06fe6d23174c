#pragma once

#include <stdint.h>

#include "macros.h"
#include "scalar_math.h"

// Shared per-element math of the rational-quadratic spline kernels (CPU and CUDA): nflows'
// conventions with linear tails. Formulas, layout and numerics: docs/ops/spline.md; the float64
// oracle is invkernels/reference/spline.py.
//
// Every function is written once for a compute type T that is either a scalar (float, double: the
// CUDA threads, the C++ unit tests, the CPU loops over reduced-precision types) or a vector of
// lanes (at::vec::Vectorized<float / double>: the CPU loops over float and double, with
// csrc/cpu/vec_math.h), so the code is branch-free: the element's bin is chosen by selects over
// all the bins, comparisons give MathOps<T>::Mask values, and MathOps<T>::select picks per lane.
//
// One element's raw parameters are read through a loader: params(j), j < 3 * bins - 1, gives
// parameter j of each lane (bins widths, bins heights, bins - 1 interior derivatives);
// StridedParams reads one element's at p[j * stride]. The computation has two steps, as in the
// reference: spline_locate normalizes the parameters into the knots of the element's bin (the
// one step that differs between the parameterizations of the flow libraries), and the spline is
// evaluated from those knots (spline_forward, spline_inverse, spline_forward_vjp);
// spline_param_grads takes the bin's gradients back to the raw parameters.

namespace invk {

// The largest knot derivative the spline uses when computing in T: 2^(e/2 - 4) for T's largest
// exponent e (2^60 in float, 2^508 in double), a sixteenth of the square root of T's largest
// value. Below it every intermediate of the forward, the inverse's quadratic and the VJPs stays
// finite; a larger min_derivative + softplus(raw) is held at it and gets no gradient.
template <typename S>
struct SplineLimits;

template <>
struct SplineLimits<float> {
  static constexpr float derivative = 0x1p60f;
};

template <>
struct SplineLimits<double> {
  static constexpr double derivative = 0x1p508;
};

// The settings, in the scalar type S of the computation (float or double).
template <typename S>
struct SplineSpec {
  int bins;
  S bound;           // tail_bound: the spline covers [-bound, bound], identity outside
  S min_width;       // min_bin_width
  S min_height;      // min_bin_height
  S min_derivative;  // min_derivative
};

// The spec of an op's settings (as the schemas pass them) in the compute type S.
template <typename S>
SplineSpec<S> spline_spec(int64_t bins, double tail_bound, double min_bin_width, double min_bin_height,
                          double min_derivative) {
  return {static_cast<int>(bins), static_cast<S>(tail_bound), static_cast<S>(min_bin_width),
          static_cast<S>(min_bin_height), static_cast<S>(min_derivative)};
}

// Parameter j of one element at p[j * stride] (a scalar T). A loader with `cached` true also has
// `T* cache`, room for 2 * bins values: the softmax terms exp(r_j - max) of the widths then the
// heights are kept there when first computed instead of being computed again (the CPU loops; a
// CUDA thread keeps no per-bin array).
template <typename T, typename P>
struct StridedParams {
  static constexpr bool cached = false;
  const P* p;
  int64_t stride;
  INVK_HOST_DEVICE T operator()(int j) const { return static_cast<T>(p[j * stride]); }
};

// Writes the gradient of one element's parameter j at out[j * stride] (a scalar T).
template <typename T, typename G>
struct StridedGrads {
  G* out;
  int64_t stride;
  INVK_HOST_DEVICE void operator()(int j, T v) const { out[j * stride] = static_cast<G>(v); }
};

// Softmax statistics (max and sum of exp(r - max)) of n raw values starting at parameter
// `first`: exact for any finite values.
template <typename T>
struct SoftmaxStats {
  T max;
  T sum;
};

template <typename T, typename Params>
INVK_HOST_DEVICE SoftmaxStats<T> spline_softmax_stats(const Params& params, int first, int n) {
  using M = MathOps<T>;
  T m = params(first);
  for (int j = 1; j < n; ++j) m = M::max(m, params(first + j));
  T sum = T(0);
  for (int j = 0; j < n; ++j) {
    const T e = M::exp(params(first + j) - m);
    if constexpr (Params::cached) params.cache[first + j] = e;
    sum = sum + e;
  }
  return {m, sum};
}

// Softmax term j (of the widths from first = 0, of the heights from first = bins), normalized.
template <typename T, typename Params>
INVK_HOST_DEVICE T spline_softmax_term(const Params& params, const SoftmaxStats<T>& stats, int index) {
  using M = MathOps<T>;
  if constexpr (Params::cached) {
    return params.cache[index] / stats.sum;
  } else {
    return M::exp(params(index) - stats.max) / stats.sum;
  }
}

// The bin of one element: its index k (as a T: lanes may differ), its knots (x0, y0) and (x1, y1)
// with the derivatives d0, d1 there, and for the gradients the derivatives of d0, d1 with
// respect to their raw values (dd0, dd1: 0 at the boundary knots and at the limit), the softmax
// statistics and the cumulative softmax of the widths (cw0 = sum of the first k
// normalized-softmax terms, cw1 the first k + 1) and of the heights.
template <typename T>
struct SplineBin {
  T k;
  T x0, x1, y0, y1, d0, d1, dd0, dd1;
  SoftmaxStats<T> w, h;
  T cw0, cw1, ch0, ch1;
};

// An interior knot derivative from its raw value r, d = min_derivative + softplus(r) held at
// SplineLimits<S>::derivative, and dd = d d / d r = sigmoid(r) (0 where d is held), sharing
// exp(-|r|).
template <typename T, typename S>
INVK_HOST_DEVICE void spline_derivative_and_grad(const SplineSpec<S>& spec, T r, T* d, T* dd) {
  using M = MathOps<T>;
  const T e = M::exp(T(0) - M::abs(r));
  const T raw = T(spec.min_derivative) + (M::max(r, T(0)) + M::log1p(e));
  const T inv = T(1) / (T(1) + e);
  const auto held = M::gt(raw, T(SplineLimits<S>::derivative));
  *d = M::select(held, T(SplineLimits<S>::derivative), raw);
  *dd = M::select(held, T(0), M::select(M::ge(r, T(0)), inv, e * inv));
}

// The bin of v (inside [-bound, bound]) among the knots in x (by_y false: the forward) or in y
// (by_y true: the inverse): the last knot <= v among the first bins (a value on an interior knot
// belongs to the bin on its right), chosen by a select per bin. Knot positions: bound * (2 *
// cumulative normalized size - 1) (2 * bound would overflow float for bounds beyond half its
// range), the ends set exactly; boundary derivatives 1.
template <typename T, typename S, typename Params>
INVK_HOST_DEVICE SplineBin<T> spline_locate(const SplineSpec<S>& spec, const Params& params, T v, bool by_y) {
  using M = MathOps<T>;
  const int n = spec.bins;
  SplineBin<T> b;
  b.w = spline_softmax_stats<T>(params, 0, n);
  b.h = spline_softmax_stats<T>(params, n, n);
  const T scale_w = T(S(1) - spec.min_width * S(n));
  const T scale_h = T(S(1) - spec.min_height * S(n));
  const T bound = T(spec.bound), neg_bound = T(-spec.bound);
  T cum_w = T(0), cum_h = T(0), soft_w = T(0), soft_h = T(0);
  T lo_x = neg_bound, lo_y = neg_bound;
  T raw_d0 = T(0), raw_d1 = T(0);
  for (int j = 0; j < n; ++j) {
    const T sw = spline_softmax_term(params, b.w, j);
    const T sh = spline_softmax_term(params, b.h, n + j);
    const T next_w = soft_w + sw, next_h = soft_h + sh;
    cum_w = cum_w + (T(spec.min_width) + scale_w * sw);
    cum_h = cum_h + (T(spec.min_height) + scale_h * sh);
    const bool last = j == n - 1;
    const T hi_x = last ? bound : bound * (T(2) * cum_w - T(1));
    const T hi_y = last ? bound : bound * (T(2) * cum_h - T(1));
    const T raw_lo = j > 0 ? params(2 * n + j - 1) : T(0);
    const T raw_hi = last ? T(0) : params(2 * n + j);
    if (j == 0) {
      b.k = T(0);
      b.x0 = lo_x, b.x1 = hi_x, b.y0 = lo_y, b.y1 = hi_y;
      b.cw0 = soft_w, b.cw1 = next_w, b.ch0 = soft_h, b.ch1 = next_h;
      raw_d0 = raw_lo, raw_d1 = raw_hi;
    } else {
      const auto here = M::ge(v, by_y ? lo_y : lo_x);
      b.k = M::select(here, T(S(j)), b.k);
      b.x0 = M::select(here, lo_x, b.x0);
      b.x1 = M::select(here, hi_x, b.x1);
      b.y0 = M::select(here, lo_y, b.y0);
      b.y1 = M::select(here, hi_y, b.y1);
      b.cw0 = M::select(here, soft_w, b.cw0);
      b.cw1 = M::select(here, next_w, b.cw1);
      b.ch0 = M::select(here, soft_h, b.ch0);
      b.ch1 = M::select(here, next_h, b.ch1);
      raw_d0 = M::select(here, raw_lo, raw_d0);
      raw_d1 = M::select(here, raw_hi, raw_d1);
    }
    soft_w = next_w, soft_h = next_h;
    lo_x = hi_x, lo_y = hi_y;
  }
  T d0, dd0, d1, dd1;
  spline_derivative_and_grad(spec, raw_d0, &d0, &dd0);
  spline_derivative_and_grad(spec, raw_d1, &d1, &dd1);
  const auto first = M::eq(b.k, T(0)), last = M::eq(b.k, T(S(n - 1)));
  b.d0 = M::select(first, T(1), d0);
  b.dd0 = M::select(first, T(0), dd0);
  b.d1 = M::select(last, T(1), d1);
  b.dd1 = M::select(last, T(0), dd1);
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
// Each form divides by a stand-in (-1, 1) on the lanes that use the other. The discriminant is
// clamped at 0 and the root to [0, 1].
template <typename T>
INVK_HOST_DEVICE T spline_root(T dy, T H, T s, T d_near, T d_far) {
  using M = MathOps<T>;
  const T rise = dy / H;
  const T slope = d_near + d_far - T(2) * s;
  const T a = rise * slope + (s - d_near);
  const T bq = d_near - rise * slope;
  const T c = T(0) - s * rise;
  const T sq = M::sqrt(M::max(bq * bq - T(4) * a * c, T(0)));
  const auto plus = M::ge(bq, T(0));
  const auto minus = M::gt(a, T(0));
  const T root_plus = T(2) * c / M::select(plus, T(0) - bq - sq, T(-1));
  const T root_minus = (sq - bq) / (T(2) * M::select(minus, a, T(1)));
  const T root = M::select(plus, root_plus, M::select(minus, root_minus, T(1)));
  return M::min(M::max(root, T(0)), T(1));
}

// Inverse inside the bounds: x and log dx/dy at y in bin b (located by y). The quadratic is
// solved from the bin's end nearer to y (read backwards, the spline is the same spline with d0
// and d1 exchanged).
template <typename T>
INVK_HOST_DEVICE void spline_inverse(const SplineBin<T>& b, T y, T* x, T* log_d) {
  using M = MathOps<T>;
  const T w = b.x1 - b.x0, H = b.y1 - b.y0, s = H / w;
  const T dy = y - b.y0;
  const auto upper = M::gt(dy, T(0.5) * H);
  SplineBin<T> near = b;
  near.d0 = M::select(upper, b.d1, b.d0);
  near.d1 = M::select(upper, b.d0, b.d1);
  const T theta = spline_root(M::select(upper, b.y1 - y, dy), H, s, near.d0, near.d1);
  *x = M::select(upper, b.x1 - theta * w, theta * w + b.x0);
  *log_d = T(0) - spline_log_derivative(spline_terms(near, theta));
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
  y.d1 = T(0) - hd * r * q.t;
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
  g.x1 = T(0) - (f.theta * q.theta + f.s * q.s) / q.w;
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
  SplineGrads<T> g = spline_combine(q, py, pl, T(0) - u, T(0) - g_l);
  g.x = u;
  return g;
}

// The bin's gradients (g.x0 ... g.d1) taken back to the raw parameters, each written once through
// grads(j, value), j < 3 * bins - 1 (0 where a parameter does not reach the bin, for a derivative
// held at the limit, and on the lanes of `zero`). Knot m (0 < m < bins) sits at bound * (2 * (m *
// min_width + (1 - bins * min_width) * C_m) - 1) with C_m the sum of the first m softmax terms, so
// d knot_m / d r_j = 2 * bound * (1 - bins * min_width) * softmax_j * ([j < m] - C_m); the end
// knots are fixed.
template <typename T, typename S, typename Params, typename Grads, typename Mask>
INVK_HOST_DEVICE void spline_param_grads(const SplineSpec<S>& spec, const Params& params, const SplineBin<T>& b,
                                         const SplineGrads<T>& g, const Grads& grads, Mask zero) {
  using M = MathOps<T>;
  const int n = spec.bins;
  const T k = b.k;
  const auto inner_lo = M::gt(k, T(0)), inner_hi = M::lt(k, T(S(n - 1)));
  const T g0w = M::select(inner_lo, g.x0, T(0)), g1w = M::select(inner_hi, g.x1, T(0));
  const T g0h = M::select(inner_lo, g.y0, T(0)), g1h = M::select(inner_hi, g.y1, T(0));
  const T base_w = g0w * b.cw0 + g1w * b.cw1;
  const T base_h = g0h * b.ch0 + g1h * b.ch1;
  const T scale_w = T(S(2) * spec.bound) * T(S(1) - spec.min_width * S(n));
  const T scale_h = T(S(2) * spec.bound) * T(S(1) - spec.min_height * S(n));
  for (int j = 0; j < n; ++j) {
    const T sw = spline_softmax_term(params, b.w, j);
    const T sh = spline_softmax_term(params, b.h, n + j);
    // Bin k's lower knot is knot k (reached by r_j for j < k), its upper knot k + 1 (j < k + 1).
    const auto below_lo = M::lt(T(S(j)), k), below_hi = M::le(T(S(j)), k);
    const T in_w = M::select(below_lo, g0w, T(0)) + M::select(below_hi, g1w, T(0));
    const T in_h = M::select(below_lo, g0h, T(0)) + M::select(below_hi, g1h, T(0));
    grads(j, M::select(zero, T(0), scale_w * (sw * (in_w - base_w))));
    grads(n + j, M::select(zero, T(0), scale_h * (sh * (in_h - base_h))));
  }
  const T gd1 = g.d1 * b.dd1, gd0 = g.d0 * b.dd0;
  for (int j = 0; j + 1 < n; ++j) {
    // Interior derivative j is d at knot j + 1: the bin's d1 when j == k, its d0 when j == k - 1.
    const T gd = M::select(M::eq(T(S(j)), k), gd1, T(0)) + M::select(M::eq(T(S(j + 1)), k), gd0, T(0));
    grads(2 * n + j, M::select(zero, T(0), gd));
  }
}

// The geometry of the spline ops: the transformed elements are [batch, channels, spatial], stored
// in the data tensors (x, y and their gradients) after `skip` passed-through elements of each
// sample; h is [batch, channels * params, spatial] with params = 3 * bins - 1, so the parameters
// of element (b, c, s) sit at param_offset(b * channels + c, s) + j * spatial, j < params.
struct SplineShape {
  int64_t batch;
  int64_t channels;  // the transformed channels
  int64_t spatial;
  int64_t params;
  int64_t skip;  // elements per sample passed through ahead of the transformed ones

  INVK_HOST_DEVICE int64_t planes() const { return batch * channels; }
  INVK_HOST_DEVICE int64_t per_sample() const { return channels * spatial; }
  INVK_HOST_DEVICE int64_t param_offset(int64_t plane, int64_t s) const { return plane * params * spatial + s; }
  // Where transformed element e (flat over [B, channels, spatial]) sits in the data tensors
  // ([B, skip + channels * spatial] per sample).
  INVK_HOST_DEVICE int64_t data_offset(int64_t e) const {
    return skip == 0 ? e : e + (e / per_sample() + 1) * skip;
  }
};

// Whether v lies outside [-bound, bound] (where the transform is the identity); NaN is inside.
template <typename T, typename S>
INVK_HOST_DEVICE auto spline_outside(const SplineSpec<S>& spec, T v) {
  using M = MathOps<T>;
  return M::mask_or(M::lt(v, T(-spec.bound)), M::gt(v, T(spec.bound)));
}

// The whole transform of one element (identity outside [-bound, bound]): the forward (inverse
// false) or the inverse, its output and log |d out / d in|. The spline runs at v, or at 0 on the
// lanes outside (a finite point inside), whose results are then replaced.
template <typename T, typename S, typename Params>
INVK_HOST_DEVICE void spline_element(const SplineSpec<S>& spec, const Params& params, T v, bool inverse, T* out,
                                     T* log_d) {
  using M = MathOps<T>;
  const auto outside = spline_outside(spec, v);
  const T inside_v = M::select(outside, T(0), v);
  const SplineBin<T> b = spline_locate(spec, params, inside_v, inverse);
  T o, l;
  if (inverse) {
    spline_inverse(b, inside_v, &o, &l);
  } else {
    spline_forward(b, inside_v, &o, &l);
  }
  *out = M::select(outside, v, o);
  *log_d = M::select(outside, T(0), l);
}

// The VJP of one element's forward at its input x (reverse false) or of its inverse at its output
// x (reverse true) for the gradients g (of the output) and g_l (of the log-det): the input's
// gradient, and every raw parameter's through grads (0 in the tails).
template <typename T, typename S, typename Params, typename Grads>
INVK_HOST_DEVICE T spline_element_vjp(const SplineSpec<S>& spec, const Params& params, T x, T g, T g_l, bool reverse,
                                      const Grads& grads) {
  using M = MathOps<T>;
  const auto outside = spline_outside(spec, x);
  const T inside_x = M::select(outside, T(0), x);
  const SplineBin<T> b = spline_locate(spec, params, inside_x, false);
  const SplineGrads<T> d = reverse ? spline_inverse_vjp(b, inside_x, g, g_l) : spline_forward_vjp(b, inside_x, g, g_l);
  spline_param_grads(spec, params, b, d, grads, outside);
  return M::select(outside, g, d.x);
}

// Inverse and backward of one element in one pass: x rebuilt from the forward's output y, and the
// VJP of the forward at x for (g, g_l): returns x, the input's gradient in *g_x, the parameters'
// through grads.
template <typename T, typename S, typename Params, typename Grads>
INVK_HOST_DEVICE T spline_element_inv_vjp(const SplineSpec<S>& spec, const Params& params, T y, T g, T g_l, T* g_x,
                                          const Grads& grads) {
  using M = MathOps<T>;
  const auto outside = spline_outside(spec, y);
  const T inside_y = M::select(outside, T(0), y);
  const SplineBin<T> b = spline_locate(spec, params, inside_y, true);
  T x, log_d;
  spline_inverse(b, inside_y, &x, &log_d);
  const SplineGrads<T> d = spline_forward_vjp(b, x, g, g_l);
  spline_param_grads(spec, params, b, d, grads, outside);
  *g_x = M::select(outside, g, d.x);
  return M::select(outside, y, x);
}

}  // namespace invk
