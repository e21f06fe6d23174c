// CPU backend of the rational-quadratic spline ops (docs/ops/spline.md), with the shared
// per-element math of csrc/kernels/spline.h. float and double inputs run it on vectors of
// consecutive elements (Vectorized<scalar_t>: the bin search, softmax, root and VJP lane by lane,
// branch-free); float16 and bfloat16 inputs one element at a time in float. The raw parameters
// of a vector of elements in one (b, c) plane are consecutive in memory (h is [B, C * params,
// S]) and are loaded as vectors; a vector that spans planes (few positions per plane, e.g. [B, D]
// vectors) gathers them into a small buffer first. Each element's log-derivative is kept and the
// log-det of a sample summed over them in double, in element order, so it does not depend on
// the number of threads. Compiled once per CPU capability, like coupling_kernel.cpp.

#include <ATen/ATen.h>
#include <ATen/Dispatch.h>
#include <ATen/Parallel.h>
#include <torch/library.h>

#include <algorithm>
#include <array>
#include <vector>

#include "../checks.h"
#include "../kernels/spline.h"
#include "lanes.h"
#include "vec_math.h"

namespace invk::cpu {
namespace {

// Elements per task: each costs a few hundred flops.
constexpr int64_t kGrain = 1024;
// Largest 3 * bins - 1 whose parameters a gathered vector keeps on the stack (beyond it, a heap
// buffer per task).
constexpr int kStackParams = 64;

template <typename A>
SplineSpec<A> spec_of(int64_t bins, double tail_bound, double min_bin_width, double min_bin_height,
                      double min_derivative) {
  return {static_cast<int>(bins), static_cast<A>(tail_bound), static_cast<A>(min_bin_width),
          static_cast<A>(min_bin_height), static_cast<A>(min_derivative)};
}

// Parameter j of every lane: base[j * stride], a vector load; the softmax terms are kept in
// `cache` (2 * bins vectors) once computed.
template <typename V>
struct LaneParams {
  static constexpr bool cached = true;
  const typename V::value_type* base;
  int64_t stride;
  V* cache;
  V operator()(int j) const { return V::loadu(base + j * stride); }
};

// Stores parameter j's gradient of every lane at base[j * stride].
template <typename V>
struct LaneGrads {
  typename V::value_type* base;
  int64_t stride;
  void operator()(int j, const V& v) const { v.store(base + j * stride); }
};

// Where the parameters of a vector of `count` elements starting at flat index e0 are: consecutive
// in h when the elements share a plane (and the vector is full), else gathered into `buffer`
// (padded lanes repeat the first element, so they compute finite values that are never stored).
template <typename scalar_t>
struct ParamWindow {
  const scalar_t* h;
  const SplineShape& sh;
  scalar_t* buffer;
  Vec<scalar_t>* cache;

  // Offsets in h of each lane's first parameter; returns whether they are consecutive.
  bool offsets(int64_t e0, int count, int64_t* off) const {
    const int64_t s0 = e0 % sh.spatial;
    for (int l = 0; l < count; ++l) {
      const int64_t e = e0 + l;
      off[l] = sh.param_offset(e / sh.spatial, e % sh.spatial);
    }
    return s0 + count <= sh.spatial;
  }

  LaneParams<Vec<scalar_t>> load(int64_t e0, int count, const int64_t* off, bool direct) const {
    constexpr int V = Vec<scalar_t>::size();
    if (direct && count == V) return {h + off[0], sh.spatial, cache};
    for (int64_t j = 0; j < sh.params; ++j) {
      for (int l = 0; l < V; ++l) buffer[j * V + l] = h[off[l < count ? l : 0] + j * sh.spatial];
    }
    return {buffer, V, cache};
  }
};

// Runs body(e0, count) over the flat elements [0, n) in vectors, in parallel.
template <typename scalar_t, typename Body>
void for_vectors(int64_t n, const Body& body) {
  constexpr int64_t V = Vec<scalar_t>::size();
  const int64_t vectors = (n + V - 1) / V;
  at::parallel_for(0, vectors, std::max<int64_t>(1, kGrain / V), [&](int64_t begin, int64_t end) {
    for (int64_t v = begin; v < end; ++v) body(v * V, static_cast<int>(std::min(V, n - v * V)));
  });
}

// A vector's scratch: gathered parameters and gradients (2 * params vectors of values) and the
// softmax terms (params + 1 >= 2 * bins vectors).
template <typename scalar_t>
struct Scratch {
  static constexpr int V = Vec<scalar_t>::size();
  std::array<scalar_t, 2 * kStackParams * V> stack;
  std::array<Vec<scalar_t>, kStackParams + 1> stack_terms;
  std::vector<scalar_t> heap;
  std::vector<Vec<scalar_t>> heap_terms;

  explicit Scratch(int64_t params) {
    if (params > kStackParams) {
      heap.resize(2 * params * V);
      heap_terms.resize(params + 1);
    }
  }
  scalar_t* params_buffer() { return heap.empty() ? stack.data() : heap.data(); }
  scalar_t* grads_buffer(int64_t params) { return params_buffer() + params * V; }
  Vec<scalar_t>* terms() { return heap_terms.empty() ? stack_terms.data() : heap_terms.data(); }
};

// logdet[b] = sum of sample b's log-derivatives, in double, in element order.
template <typename A>
at::Tensor sum_samples(const std::vector<A>& log_d, const SplineShape& sh, const at::Tensor& like) {
  at::Tensor logdet = at::empty({sh.batch}, like.options().dtype(logdet_dtype(like.scalar_type())));
  A* out = logdet.mutable_data_ptr<A>();
  const int64_t per_sample = sh.channels * sh.spatial;
  at::parallel_for(0, sh.batch, std::max<int64_t>(1, kGrain / std::max<int64_t>(1, per_sample)),
                   [&](int64_t begin, int64_t end) {
                     for (int64_t b = begin; b < end; ++b) {
                       double total = 0;
                       for (int64_t i = b * per_sample; i < (b + 1) * per_sample; ++i) total += log_d[i];
                       out[b] = static_cast<A>(total);
                     }
                   });
  return logdet;
}

template <bool Inverse, typename scalar_t>
void transform_vectorized(const scalar_t* in, const scalar_t* h, scalar_t* out, scalar_t* log_d,
                          const SplineSpec<scalar_t>& spec, const SplineShape& sh) {
  using V = Vec<scalar_t>;
  for_vectors<scalar_t>(sh.planes() * sh.spatial, [&](int64_t e0, int count) {
    Scratch<scalar_t> scratch(sh.params);
    const ParamWindow<scalar_t> window{h, sh, scratch.params_buffer(), scratch.terms()};
    int64_t off[V::size()];
    const bool direct = window.offsets(e0, count, off);
    V o, l;
    spline_element(spec, window.load(e0, count, off, direct), V::loadu(in + e0, count), Inverse, &o, &l);
    o.store(out + e0, count);
    l.store(log_d + e0, count);
  });
}

template <bool Inverse, typename scalar_t>
void transform_scalar(const scalar_t* in, const scalar_t* h, scalar_t* out, float* log_d,
                      const SplineSpec<float>& spec, const SplineShape& sh) {
  at::parallel_for(0, sh.planes() * sh.spatial, kGrain, [&](int64_t begin, int64_t end) {
    for (int64_t e = begin; e < end; ++e) {
      const StridedParams<float, scalar_t> params{h + sh.param_offset(e / sh.spatial, e % sh.spatial), sh.spatial};
      float o, l;
      spline_element(spec, params, static_cast<float>(in[e]), Inverse, &o, &l);
      out[e] = static_cast<scalar_t>(o);
      log_d[e] = l;
    }
  });
}

template <bool Inverse, typename scalar_t, typename A>
void transform(const scalar_t* in, const scalar_t* h, scalar_t* out, A* log_d, const SplineSpec<A>& spec,
               const SplineShape& sh) {
  if constexpr (kVectorized<scalar_t>) {
    transform_vectorized<Inverse>(in, h, out, log_d, spec, sh);
  } else {
    transform_scalar<Inverse>(in, h, out, log_d, spec, sh);
  }
}

template <bool Inverse>
std::tuple<at::Tensor, at::Tensor> rq_spline(const at::Tensor& in_, const at::Tensor& h_, int64_t bins,
                                             double tail_bound, double min_bin_width, double min_bin_height,
                                             double min_derivative) {
  constexpr const char* op = Inverse ? "rq_spline_inv" : "rq_spline_fwd";
  const SplineShape sh = check_spline(op, in_, h_, bins, tail_bound, min_bin_width, min_bin_height, min_derivative,
                                      Inverse ? "y" : "x");
  const at::Tensor in = in_.contiguous(), h = h_.contiguous();
  at::Tensor out = at::empty(in.sizes(), in.options());
  at::Tensor logdet;
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kBFloat16, at::kHalf, in.scalar_type(), op, [&] {
    using A = acc_t<scalar_t>;
    const SplineSpec<A> spec = spec_of<A>(bins, tail_bound, min_bin_width, min_bin_height, min_derivative);
    std::vector<A> log_d(in.numel());
    transform<Inverse>(in.const_data_ptr<scalar_t>(), h.const_data_ptr<scalar_t>(), out.mutable_data_ptr<scalar_t>(),
                       log_d.data(), spec, sh);
    logdet = sum_samples(log_d, sh, in);
  });
  return {out, logdet};
}

// Each lane's log-det gradient: grad_logdet of the lane's sample.
template <typename scalar_t>
Vec<scalar_t> lane_grad_logdet(const scalar_t* gl, const SplineShape& sh, int64_t e0, int count) {
  using V = Vec<scalar_t>;
  scalar_t lanes[V::size()];
  const int64_t per_sample = sh.channels * sh.spatial;
  for (int l = 0; l < V::size(); ++l) lanes[l] = gl[(e0 + (l < count ? l : 0)) / per_sample];
  return V::loadu(lanes);
}

// The parameter gradients of a vector: stored straight into grad_h when the parameters were
// loaded straight from h, else into a buffer scattered to each lane's element afterwards.
template <typename scalar_t, typename Body>
void with_lane_grads(scalar_t* gh, const SplineShape& sh, int count, const int64_t* off, bool direct,
                     scalar_t* buffer, const Body& body) {
  using V = Vec<scalar_t>;
  if (direct && count == V::size()) {
    body(LaneGrads<V>{gh + off[0], sh.spatial});
    return;
  }
  body(LaneGrads<V>{buffer, V::size()});
  for (int64_t j = 0; j < sh.params; ++j) {
    for (int l = 0; l < count; ++l) gh[off[l] + j * sh.spatial] = buffer[j * V::size() + l];
  }
}

// Runs body(e0, count, params, g_l, grads) over the vectors of elements of a VJP: each vector's
// parameters, each lane's log-det gradient, and where its parameter gradients go (with_lane_grads).
template <typename scalar_t, typename Body>
void for_vjp_vectors(const scalar_t* h, const scalar_t* gl, scalar_t* gh, const SplineShape& sh, const Body& body) {
  using V = Vec<scalar_t>;
  for_vectors<scalar_t>(sh.planes() * sh.spatial, [&](int64_t e0, int count) {
    Scratch<scalar_t> scratch(sh.params);
    const ParamWindow<scalar_t> window{h, sh, scratch.params_buffer(), scratch.terms()};
    int64_t off[V::size()];
    const bool direct = window.offsets(e0, count, off);
    const LaneParams<V> params = window.load(e0, count, off, direct);
    const V g_l = lane_grad_logdet(gl, sh, e0, count);
    with_lane_grads(gh, sh, count, off, direct, scratch.grads_buffer(sh.params),
                    [&](const LaneGrads<V>& grads) { body(e0, count, params, g_l, grads); });
  });
}

template <typename scalar_t>
void vjp_vectorized(const scalar_t* g, const scalar_t* gl, const scalar_t* x, const scalar_t* h, scalar_t* gin,
                    scalar_t* gh, const SplineSpec<scalar_t>& spec, const SplineShape& sh, bool reverse) {
  using V = Vec<scalar_t>;
  for_vjp_vectors(h, gl, gh, sh, [&](int64_t e0, int count, const auto& params, const V& g_l, const auto& grads) {
    spline_element_vjp(spec, params, V::loadu(x + e0, count), V::loadu(g + e0, count), g_l, reverse, grads)
        .store(gin + e0, count);
  });
}

template <typename scalar_t>
void inv_vjp_vectorized(const scalar_t* y, const scalar_t* h, const scalar_t* g, const scalar_t* gl, scalar_t* x,
                        scalar_t* gx, scalar_t* gh, const SplineSpec<scalar_t>& spec, const SplineShape& sh) {
  using V = Vec<scalar_t>;
  for_vjp_vectors(h, gl, gh, sh, [&](int64_t e0, int count, const auto& params, const V& g_l, const auto& grads) {
    V g_x;
    spline_element_inv_vjp(spec, params, V::loadu(y + e0, count), V::loadu(g + e0, count), g_l, &g_x, grads)
        .store(x + e0, count);
    g_x.store(gx + e0, count);
  });
}

// The scalar loops (float16, bfloat16): one element at a time in float.
template <typename scalar_t>
void vjp_scalar(const scalar_t* g, const float* gl, const scalar_t* x, const scalar_t* h, scalar_t* gin, scalar_t* gh,
                const SplineSpec<float>& spec, const SplineShape& sh, bool reverse) {
  at::parallel_for(0, sh.planes() * sh.spatial, kGrain, [&](int64_t begin, int64_t end) {
    for (int64_t e = begin; e < end; ++e) {
      const int64_t off = sh.param_offset(e / sh.spatial, e % sh.spatial);
      gin[e] = static_cast<scalar_t>(spline_element_vjp(
          spec, StridedParams<float, scalar_t>{h + off, sh.spatial}, static_cast<float>(x[e]),
          static_cast<float>(g[e]), gl[e / (sh.channels * sh.spatial)], reverse,
          StridedGrads<float, scalar_t>{gh + off, sh.spatial}));
    }
  });
}

template <typename scalar_t>
void inv_vjp_scalar(const scalar_t* y, const scalar_t* h, const scalar_t* g, const float* gl, scalar_t* x,
                    scalar_t* gx, scalar_t* gh, const SplineSpec<float>& spec, const SplineShape& sh) {
  at::parallel_for(0, sh.planes() * sh.spatial, kGrain, [&](int64_t begin, int64_t end) {
    for (int64_t e = begin; e < end; ++e) {
      const int64_t off = sh.param_offset(e / sh.spatial, e % sh.spatial);
      float g_x;
      x[e] = static_cast<scalar_t>(spline_element_inv_vjp(
          spec, StridedParams<float, scalar_t>{h + off, sh.spatial}, static_cast<float>(y[e]),
          static_cast<float>(g[e]), gl[e / (sh.channels * sh.spatial)], &g_x,
          StridedGrads<float, scalar_t>{gh + off, sh.spatial}));
      gx[e] = static_cast<scalar_t>(g_x);
    }
  });
}

template <typename scalar_t, typename A>
void vjp(const scalar_t* g, const A* gl, const scalar_t* x, const scalar_t* h, scalar_t* gin, scalar_t* gh,
         const SplineSpec<A>& spec, const SplineShape& sh, bool reverse) {
  if constexpr (kVectorized<scalar_t>) {
    vjp_vectorized(g, gl, x, h, gin, gh, spec, sh, reverse);
  } else {
    vjp_scalar(g, gl, x, h, gin, gh, spec, sh, reverse);
  }
}

template <typename scalar_t, typename A>
void inv_vjp(const scalar_t* y, const scalar_t* h, const scalar_t* g, const A* gl, scalar_t* x, scalar_t* gx,
             scalar_t* gh, const SplineSpec<A>& spec, const SplineShape& sh) {
  if constexpr (kVectorized<scalar_t>) {
    inv_vjp_vectorized(y, h, g, gl, x, gx, gh, spec, sh);
  } else {
    inv_vjp_scalar(y, h, g, gl, x, gx, gh, spec, sh);
  }
}

std::tuple<at::Tensor, at::Tensor> rq_spline_bwd(const at::Tensor& g_, const at::Tensor& gl_, const at::Tensor& x_,
                                                 const at::Tensor& h_, int64_t bins, double tail_bound,
                                                 double min_bin_width, double min_bin_height, double min_derivative,
                                                 bool reverse) {
  constexpr const char* op = "rq_spline_bwd";
  const SplineShape sh = check_spline(op, x_, h_, bins, tail_bound, min_bin_width, min_bin_height, min_derivative);
  check_grad(op, g_, x_, "grad_out", "x");
  check_grad_logdet(op, gl_, x_);
  const at::Tensor g = g_.contiguous(), gl = gl_.contiguous(), x = x_.contiguous(), h = h_.contiguous();
  at::Tensor gin = at::empty(x.sizes(), x.options());
  at::Tensor gh = at::empty(h.sizes(), h.options());
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kBFloat16, at::kHalf, x.scalar_type(), op, [&] {
    using A = acc_t<scalar_t>;
    const SplineSpec<A> spec = spec_of<A>(bins, tail_bound, min_bin_width, min_bin_height, min_derivative);
    vjp(g.const_data_ptr<scalar_t>(), gl.const_data_ptr<A>(), x.const_data_ptr<scalar_t>(),
        h.const_data_ptr<scalar_t>(), gin.mutable_data_ptr<scalar_t>(), gh.mutable_data_ptr<scalar_t>(), spec, sh,
        reverse);
  });
  return {gin, gh};
}

std::tuple<at::Tensor, at::Tensor, at::Tensor> rq_spline_inv_bwd(const at::Tensor& y_, const at::Tensor& h_,
                                                                 const at::Tensor& g_, const at::Tensor& gl_,
                                                                 int64_t bins, double tail_bound, double min_bin_width,
                                                                 double min_bin_height, double min_derivative) {
  constexpr const char* op = "rq_spline_inv_bwd";
  const SplineShape sh =
      check_spline(op, y_, h_, bins, tail_bound, min_bin_width, min_bin_height, min_derivative, "y");
  check_grad(op, g_, y_, "grad_y", "y");
  check_grad_logdet(op, gl_, y_);
  const at::Tensor y = y_.contiguous(), h = h_.contiguous(), g = g_.contiguous(), gl = gl_.contiguous();
  at::Tensor x = at::empty(y.sizes(), y.options());
  at::Tensor gx = at::empty(y.sizes(), y.options());
  at::Tensor gh = at::empty(h.sizes(), h.options());
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kBFloat16, at::kHalf, y.scalar_type(), op, [&] {
    using A = acc_t<scalar_t>;
    const SplineSpec<A> spec = spec_of<A>(bins, tail_bound, min_bin_width, min_bin_height, min_derivative);
    inv_vjp(y.const_data_ptr<scalar_t>(), h.const_data_ptr<scalar_t>(), g.const_data_ptr<scalar_t>(),
            gl.const_data_ptr<A>(), x.mutable_data_ptr<scalar_t>(), gx.mutable_data_ptr<scalar_t>(),
            gh.mutable_data_ptr<scalar_t>(), spec, sh);
  });
  return {x, gx, gh};
}

}  // namespace

TORCH_LIBRARY_IMPL(invkernels, CPU, m) {
  m.impl("rq_spline_fwd", &rq_spline<false>);
  m.impl("rq_spline_inv", &rq_spline<true>);
  m.impl("rq_spline_bwd", &rq_spline_bwd);
  m.impl("rq_spline_inv_bwd", &rq_spline_inv_bwd);
}

}  // namespace invk::cpu
