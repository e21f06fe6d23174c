// CPU backend of the rational-quadratic spline ops (docs/ops/spline.md), with the shared
// per-element math of csrc/kernels/spline.h. float and double inputs run it on vectors of
// consecutive transformed elements (Vectorized<scalar_t>: the bin search, softmax, root and VJP
// lane by lane, branch-free); float16 and bfloat16 inputs one element at a time in float. The raw
// parameters of a vector of elements in one (b, c) plane are consecutive in memory (h is
// [B, C * params, S]) and are loaded as vectors; a vector that spans planes (few positions per
// plane, e.g. [B, D] vectors) gathers them into a small buffer first. The data of a vector are
// loaded and stored as vectors too, gathered and scattered only where a vector spans two samples
// with passed-through channels between them; the passed-through channels are copied once. Each
// element's log-derivative is kept and the log-det of a sample summed over them in double, in
// element order, so it does not depend on the number of threads. Compiled once per CPU
// capability, like coupling_kernel.cpp.

#include <ATen/ATen.h>
#include <ATen/Dispatch.h>
#include <ATen/Parallel.h>
#include <torch/library.h>

#include <algorithm>
#include <array>
#include <vector>

#include "../checks.h"
#include "../kernels/spline.h"
#include "../ops/spline_passthrough.h"
#include "lanes.h"
#include "vec_math.h"

namespace invk::cpu {
namespace {

// Elements per task: each costs a few hundred flops.
constexpr int64_t kGrain = 1024;
// Largest 3 * bins - 1 whose parameters a gathered vector keeps on the stack (beyond it, a heap
// buffer per task).
constexpr int kStackParams = 64;

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

// Where the data (x, y, gradients) of a vector of `count` transformed elements starting at e0
// are: one vector load or store when they are consecutive in memory, else lane by lane (padded
// lanes read the first element's value).
template <typename scalar_t>
struct DataLanes {
  using V = Vec<scalar_t>;
  int count;
  bool consecutive;
  int64_t off[V::size()];

  DataLanes(const SplineShape& sh, int64_t e0, int n) : count(n) {
    consecutive = sh.skip == 0 || e0 % sh.per_sample() + n <= sh.per_sample();
    off[0] = sh.data_offset(e0);
    if (!consecutive) {
      for (int l = 1; l < V::size(); ++l) off[l] = sh.data_offset(e0 + (l < n ? l : 0));
    }
  }
  V load(const scalar_t* p) const {
    if (consecutive) return V::loadu(p + off[0], count);
    scalar_t lanes[V::size()];
    for (int l = 0; l < V::size(); ++l) lanes[l] = p[off[l]];
    return V::loadu(lanes);
  }
  void store(scalar_t* p, const V& v) const {
    if (consecutive) {
      v.store(p + off[0], count);
      return;
    }
    scalar_t lanes[V::size()];
    v.store(lanes);
    for (int l = 0; l < count; ++l) p[off[l]] = lanes[l];
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
    const DataLanes<scalar_t> data(sh, e0, count);
    V o, l;
    spline_element(spec, window.load(e0, count, off, direct), data.load(in), Inverse, &o, &l);
    data.store(out, o);
    l.store(log_d + e0, count);
  });
}

template <bool Inverse, typename scalar_t>
void transform_scalar(const scalar_t* in, const scalar_t* h, scalar_t* out, float* log_d,
                      const SplineSpec<float>& spec, const SplineShape& sh) {
  at::parallel_for(0, sh.planes() * sh.spatial, kGrain, [&](int64_t begin, int64_t end) {
    for (int64_t e = begin; e < end; ++e) {
      const StridedParams<float, scalar_t> params{h + sh.param_offset(e / sh.spatial, e % sh.spatial), sh.spatial};
      const int64_t d = sh.data_offset(e);
      float o, l;
      spline_element(spec, params, static_cast<float>(in[d]), Inverse, &o, &l);
      out[d] = static_cast<scalar_t>(o);
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
                                             double min_derivative, int64_t passthrough) {
  constexpr const char* op = Inverse ? "rq_spline_inv" : "rq_spline_fwd";
  const SplineShape sh = check_spline(op, in_, h_, bins, tail_bound, min_bin_width, min_bin_height, min_derivative,
                                      passthrough, Inverse ? "y" : "x");
  const at::Tensor in = in_.contiguous(), h = h_.contiguous();
  at::Tensor out = at::empty(in.sizes(), in.options());
  at::Tensor logdet;
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kBFloat16, at::kHalf, in.scalar_type(), op, [&] {
    using A = acc_t<scalar_t>;
    const SplineSpec<A> spec = spline_spec<A>(bins, tail_bound, min_bin_width, min_bin_height, min_derivative);
    std::vector<A> log_d(sh.planes() * sh.spatial);
    transform<Inverse>(in.const_data_ptr<scalar_t>(), h.const_data_ptr<scalar_t>(), out.mutable_data_ptr<scalar_t>(),
                       log_d.data(), spec, sh);
    logdet = sum_samples(log_d, sh, in);
  });
  copy_passthrough(out, in, passthrough);
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
    const DataLanes<scalar_t> data(sh, e0, count);
    data.store(gin, spline_element_vjp(spec, params, data.load(x), data.load(g), g_l, reverse, grads));
  });
}

template <typename scalar_t>
void inv_vjp_vectorized(const scalar_t* y, const scalar_t* h, const scalar_t* g, const scalar_t* gl, scalar_t* x,
                        scalar_t* gx, scalar_t* gh, const SplineSpec<scalar_t>& spec, const SplineShape& sh) {
  using V = Vec<scalar_t>;
  for_vjp_vectors(h, gl, gh, sh, [&](int64_t e0, int count, const auto& params, const V& g_l, const auto& grads) {
    const DataLanes<scalar_t> data(sh, e0, count);
    V g_x;
    data.store(x, spline_element_inv_vjp(spec, params, data.load(y), data.load(g), g_l, &g_x, grads));
    data.store(gx, g_x);
  });
}

// The scalar loops (float16, bfloat16): one element at a time in float.
template <typename scalar_t>
void vjp_scalar(const scalar_t* g, const float* gl, const scalar_t* x, const scalar_t* h, scalar_t* gin, scalar_t* gh,
                const SplineSpec<float>& spec, const SplineShape& sh, bool reverse) {
  at::parallel_for(0, sh.planes() * sh.spatial, kGrain, [&](int64_t begin, int64_t end) {
    for (int64_t e = begin; e < end; ++e) {
      const int64_t off = sh.param_offset(e / sh.spatial, e % sh.spatial);
      const int64_t d = sh.data_offset(e);
      gin[d] = static_cast<scalar_t>(spline_element_vjp(
          spec, StridedParams<float, scalar_t>{h + off, sh.spatial}, static_cast<float>(x[d]),
          static_cast<float>(g[d]), gl[e / sh.per_sample()], reverse,
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
      const int64_t d = sh.data_offset(e);
      float g_x;
      x[d] = static_cast<scalar_t>(spline_element_inv_vjp(
          spec, StridedParams<float, scalar_t>{h + off, sh.spatial}, static_cast<float>(y[d]),
          static_cast<float>(g[d]), gl[e / sh.per_sample()], &g_x,
          StridedGrads<float, scalar_t>{gh + off, sh.spatial}));
      gx[d] = static_cast<scalar_t>(g_x);
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
                                                 bool reverse, int64_t passthrough) {
  constexpr const char* op = "rq_spline_bwd";
  const SplineShape sh =
      check_spline(op, x_, h_, bins, tail_bound, min_bin_width, min_bin_height, min_derivative, passthrough);
  check_grad(op, g_, x_, "grad_out", "x");
  check_grad_logdet(op, gl_, x_);
  const at::Tensor g = g_.contiguous(), gl = gl_.contiguous(), x = x_.contiguous(), h = h_.contiguous();
  at::Tensor gin = at::empty(x.sizes(), x.options());
  at::Tensor gh = at::empty(h.sizes(), h.options());
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kBFloat16, at::kHalf, x.scalar_type(), op, [&] {
    using A = acc_t<scalar_t>;
    const SplineSpec<A> spec = spline_spec<A>(bins, tail_bound, min_bin_width, min_bin_height, min_derivative);
    vjp(g.const_data_ptr<scalar_t>(), gl.const_data_ptr<A>(), x.const_data_ptr<scalar_t>(),
        h.const_data_ptr<scalar_t>(), gin.mutable_data_ptr<scalar_t>(), gh.mutable_data_ptr<scalar_t>(), spec, sh,
        reverse);
  });
  copy_passthrough(gin, g, passthrough);
  return {gin, gh};
}

std::tuple<at::Tensor, at::Tensor, at::Tensor> rq_spline_inv_bwd(const at::Tensor& y_, const at::Tensor& h_,
                                                                 const at::Tensor& g_, const at::Tensor& gl_,
                                                                 int64_t bins, double tail_bound, double min_bin_width,
                                                                 double min_bin_height, double min_derivative,
                                                                 int64_t passthrough) {
  constexpr const char* op = "rq_spline_inv_bwd";
  const SplineShape sh =
      check_spline(op, y_, h_, bins, tail_bound, min_bin_width, min_bin_height, min_derivative, passthrough, "y");
  check_grad(op, g_, y_, "grad_y", "y");
  check_grad_logdet(op, gl_, y_);
  const at::Tensor y = y_.contiguous(), h = h_.contiguous(), g = g_.contiguous(), gl = gl_.contiguous();
  at::Tensor x = at::empty(y.sizes(), y.options());
  at::Tensor gx = at::empty(y.sizes(), y.options());
  at::Tensor gh = at::empty(h.sizes(), h.options());
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kBFloat16, at::kHalf, y.scalar_type(), op, [&] {
    using A = acc_t<scalar_t>;
    const SplineSpec<A> spec = spline_spec<A>(bins, tail_bound, min_bin_width, min_bin_height, min_derivative);
    inv_vjp(y.const_data_ptr<scalar_t>(), h.const_data_ptr<scalar_t>(), g.const_data_ptr<scalar_t>(),
            gl.const_data_ptr<A>(), x.mutable_data_ptr<scalar_t>(), gx.mutable_data_ptr<scalar_t>(),
            gh.mutable_data_ptr<scalar_t>(), spec, sh);
  });
  copy_passthrough(x, y, passthrough);
  copy_passthrough(gx, g, passthrough);
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
