// CPU backend of the affine and additive coupling ops (docs/ops/coupling.md).
//
// One parallel pass: each task transforms kChunk elements of one sample's transformed half with
// the shared formulas of csrc/kernels/coupling.h (writing one partial log-det) and copies a
// matching piece of the passthrough half. Samples of only a few transformed elements go to the
// kernels of coupling_rows.cpp instead (groups of samples per task). This file is compiled once per CPU
// capability (DEFAULT, AVX2, AVX512) into its own library; Python loads the one matching the CPU.
//
// Rounding hazard: GCC contracts a multiplication and an addition into one FMA across inlined calls (its default
// -ffp-contract=fast) depending on how the code around them was inlined, so an edit anywhere in this file can move
// results by an ulp (measured: making run_tasks' parallel grain a computed value moved float16 log-dets of the atan
// scale's inverse, AVX2 and AVX512).

#include <ATen/ATen.h>
#include <ATen/Dispatch.h>
#include <ATen/Parallel.h>
#include <torch/library.h>

#include <algorithm>
#include <array>
#include <cstring>
#include <vector>

#include "../checks.h"
#include "../kernels/coupling.h"
#include "coupling_rows.h"
#include "lanes.h"
#include "vec_math.h"

namespace invk::cpu {
namespace {

constexpr int64_t kChunk = 8192;  // transformed elements per task (one partial log-det)

// Runs transform(task, b, start, n) over the chunks of every sample's transformed half and copies
// the passthrough halves of `copies`: the task of chunk j of a sample also copies the j-th of
// `chunks` equal pieces of that sample's passthrough half, so every task carries the same work and
// the threads stay balanced.
template <typename scalar_t, size_t N, typename Transform>
void run_tasks(const CouplingShape& sh, const std::array<Copy<scalar_t>, N>& copies, const Transform& transform) {
  const int64_t n1 = sh.n1(), n2 = sh.n2();
  const int64_t chunks = num_chunks(n2, kChunk);
  const int64_t piece = chunks == 0 ? 0 : num_chunks(n1, chunks);
  at::parallel_for(0, sh.batch * chunks, grain_tasks(std::min(kChunk, n2) + piece), [&](int64_t begin, int64_t end) {
    for (int64_t task = begin; task < end; ++task) {
      const int64_t b = task / chunks, j = task % chunks;
      transform(task, b, j * kChunk, std::min(kChunk, n2 - j * kChunk));
      const int64_t start = j * piece;
      if (start >= n1) continue;
      const int64_t off = sh.x1_offset(b) + start;
      for (const Copy<scalar_t>& c : copies) {
        if (c.dst != nullptr) std::memcpy(c.dst + off, c.src + off, sizeof(scalar_t) * std::min(piece, n1 - start));
      }
    }
  });
}

template <typename scalar_t, typename Transform>
void run_tasks(const CouplingShape& sh, const scalar_t* src, scalar_t* dst, const Transform& transform) {
  run_tasks<scalar_t, 1>(sh, {Copy<scalar_t>{src, dst}}, transform);
}

template <typename scalar_t>
void sum_partials(const CouplingShape& sh, const std::vector<acc_t<scalar_t>>& partial, bool negate,
                  at::Tensor& logdet) {
  const int64_t chunks = num_chunks(sh.n2(), kChunk);
  acc_t<scalar_t>* out = logdet.mutable_data_ptr<acc_t<scalar_t>>();
  for (int64_t b = 0; b < sh.batch; ++b) {
    acc_t<scalar_t> s = 0;
    for (int64_t j = 0; j < chunks; ++j) s += partial[b * chunks + j];
    out[b] = negate ? -s : s;
  }
}

template <ScaleKind K, bool Inverse, typename scalar_t>
void affine_apply(const at::Tensor& in, const at::Tensor& h, at::Tensor& out, at::Tensor& logdet,
                  const CouplingShape& sh, double clamp) {
  using A = acc_t<scalar_t>;
  const scalar_t* in_p = in.const_data_ptr<scalar_t>();
  const scalar_t* h_p = h.const_data_ptr<scalar_t>();
  scalar_t* out_p = out.mutable_data_ptr<scalar_t>();
  std::vector<A> partial(sh.batch * num_chunks(sh.n2(), kChunk));
  const ScaleParams<A> p{A(clamp), A(1.0 / clamp)};
  run_tasks<scalar_t>(sh, in_p, out_p, [&](int64_t task, int64_t b, int64_t start, int64_t n) {
    const scalar_t* x2 = in_p + sh.x2_offset(b) + start;
    const scalar_t* hs = h_p + sh.affine_scale_offset(b) + start;
    const scalar_t* t = h_p + sh.affine_shift_offset(b) + start;
    scalar_t* y2 = out_p + sh.x2_offset(b) + start;
    partial[task] = sum_lanes<scalar_t>(n, [&](auto lane, int64_t i) {
      using C = typename decltype(lane)::type;
      using M = MathOps<C>;
      const ScaleParams<C> pc{C(p.clamp), C(p.inv_clamp)};
      C L;
      const C v = Inverse ? affine_inverse<K, C, M>(lane.load(x2 + i), lane.load(hs + i), lane.load(t + i), pc, L)
                          : affine_forward<K, C, M>(lane.load(x2 + i), lane.load(hs + i), lane.load(t + i), pc, L);
      lane.store(y2 + i, v);
      return L;
    });
  });
  sum_partials<scalar_t>(sh, partial, Inverse, logdet);
}

template <ScaleKind K, bool Reverse, typename scalar_t>
void affine_backward_apply(const at::Tensor& g, const at::Tensor& gl, const at::Tensor& x, const at::Tensor& h,
                           at::Tensor& gin, at::Tensor& gh, const CouplingShape& sh, double clamp) {
  using A = acc_t<scalar_t>;
  const scalar_t* g_p = g.const_data_ptr<scalar_t>();
  const A* gl_p = gl.const_data_ptr<A>();
  const scalar_t* x_p = x.const_data_ptr<scalar_t>();
  const scalar_t* h_p = h.const_data_ptr<scalar_t>();
  scalar_t* gin_p = gin.mutable_data_ptr<scalar_t>();
  scalar_t* gh_p = gh.mutable_data_ptr<scalar_t>();
  const ScaleParams<A> p{A(clamp), A(1.0 / clamp)};
  run_tasks<scalar_t>(sh, g_p, gin_p, [&](int64_t, int64_t b, int64_t start, int64_t n) {
    const int64_t xo = sh.x2_offset(b) + start;
    const int64_t so = sh.affine_scale_offset(b) + start;
    const int64_t to = sh.affine_shift_offset(b) + start;
    const A glb = gl_p[b];
    for_lanes<scalar_t>(n, [&](auto lane, int64_t i) {
      using C = typename decltype(lane)::type;
      using M = MathOps<C>;
      const ScaleParams<C> pc{C(p.clamp), C(p.inv_clamp)};
      C g_in, g_hs, g_t;
      affine_backward<K, Reverse, C, M>(lane.load(g_p + xo + i), C(glb), lane.load(x_p + xo + i),
                                        lane.load(h_p + so + i), pc, g_in, g_hs, g_t);
      lane.store(gin_p + xo + i, g_in);
      lane.store(gh_p + so + i, g_hs);
      lane.store(gh_p + to + i, g_t);
    });
  });
}

template <bool Inverse>
std::tuple<at::Tensor, at::Tensor> affine_coupling(const at::Tensor& in_, const at::Tensor& h_,
                                                   c10::string_view scale, double clamp, std::optional<int64_t> passthrough) {
  constexpr const char* op = Inverse ? "affine_coupling_inv" : "affine_coupling_fwd";
  const ScaleKind kind = parse_scale(op, scale, clamp);
  const CouplingShape sh = check_coupling(op, in_, h_, /*affine=*/true, Inverse ? "y" : "x", passthrough);
  const at::Tensor in = in_.contiguous(), h = h_.contiguous();
  at::Tensor out = at::empty(in.sizes(), in.options());
  at::Tensor logdet = at::empty({sh.batch}, in.options().dtype(logdet_dtype(in.scalar_type())));
  if (CPU_CAPABILITY::rows_path(sh, in.scalar_type(), RowsOp::kAffineLogdet)) {
    CPU_CAPABILITY::affine_coupling_rows(Inverse, kind, clamp, sh, in, h, out, logdet);
    return {out, logdet};
  }
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kBFloat16, at::kHalf, in.scalar_type(), op, [&] {
    dispatch_scale(kind, [&](auto k) { affine_apply<decltype(k)::value, Inverse, scalar_t>(in, h, out, logdet, sh, clamp); });
  });
  return {out, logdet};
}

std::tuple<at::Tensor, at::Tensor> affine_coupling_bwd(const at::Tensor& g_, const at::Tensor& gl_,
                                                       const at::Tensor& x_, const at::Tensor& h_,
                                                       c10::string_view scale, double clamp, bool reverse,
                                                       std::optional<int64_t> passthrough) {
  constexpr const char* op = "affine_coupling_bwd";
  const ScaleKind kind = parse_scale(op, scale, clamp);
  const CouplingShape sh = check_coupling(op, x_, h_, /*affine=*/true, "x", passthrough);
  check_grad(op, g_, x_, "grad_out", "x");
  check_grad_logdet(op, gl_, x_);
  const at::Tensor g = g_.contiguous(), gl = gl_.contiguous(), x = x_.contiguous(), h = h_.contiguous();
  at::Tensor gin = at::empty(x.sizes(), x.options());
  at::Tensor gh = at::empty(h.sizes(), h.options());
  if (CPU_CAPABILITY::rows_path(sh, x.scalar_type(), RowsOp::kAffineBackward)) {
    CPU_CAPABILITY::affine_coupling_bwd_rows(reverse, kind, clamp, sh, g, gl, x, h, gin, gh);
    return {gin, gh};
  }
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kBFloat16, at::kHalf, x.scalar_type(), op, [&] {
    dispatch_scale(kind, [&](auto k) {
      if (reverse) {
        affine_backward_apply<decltype(k)::value, true, scalar_t>(g, gl, x, h, gin, gh, sh, clamp);
      } else {
        affine_backward_apply<decltype(k)::value, false, scalar_t>(g, gl, x, h, gin, gh, sh, clamp);
      }
    });
  });
  return {gin, gh};
}

template <ScaleKind K, typename scalar_t>
void affine_inv_bwd_apply(const at::Tensor& y, const at::Tensor& h, const at::Tensor& g, const at::Tensor& gl,
                          at::Tensor& x, at::Tensor& gin, at::Tensor& gh, const CouplingShape& sh, double clamp) {
  using A = acc_t<scalar_t>;
  const scalar_t* y_p = y.const_data_ptr<scalar_t>();
  const scalar_t* h_p = h.const_data_ptr<scalar_t>();
  const scalar_t* g_p = g.const_data_ptr<scalar_t>();
  const A* gl_p = gl.const_data_ptr<A>();
  scalar_t* x_p = x.mutable_data_ptr<scalar_t>();
  scalar_t* gin_p = gin.mutable_data_ptr<scalar_t>();
  scalar_t* gh_p = gh.mutable_data_ptr<scalar_t>();
  const ScaleParams<A> p{A(clamp), A(1.0 / clamp)};
  run_tasks<scalar_t, 2>(sh, {Copy<scalar_t>{y_p, x_p}, Copy<scalar_t>{g_p, gin_p}},
                         [&](int64_t, int64_t b, int64_t start, int64_t n) {
    const int64_t xo = sh.x2_offset(b) + start;
    const int64_t so = sh.affine_scale_offset(b) + start;
    const int64_t to = sh.affine_shift_offset(b) + start;
    const A glb = gl_p[b];
    for_lanes<scalar_t>(n, [&](auto lane, int64_t i) {
      using C = typename decltype(lane)::type;
      using M = MathOps<C>;
      const ScaleParams<C> pc{C(p.clamp), C(p.inv_clamp)};
      C x2, g_in, g_hs, g_t;
      affine_inverse_backward<K, C, M>(lane.load(y_p + xo + i), lane.load(h_p + so + i), lane.load(h_p + to + i),
                                       lane.load(g_p + xo + i), C(glb), pc, x2, g_in, g_hs, g_t);
      lane.store(x_p + xo + i, x2);
      lane.store(gin_p + xo + i, g_in);
      lane.store(gh_p + so + i, g_hs);
      lane.store(gh_p + to + i, g_t);
    });
  });
}

std::tuple<at::Tensor, at::Tensor, at::Tensor> affine_coupling_inv_bwd(const at::Tensor& y_, const at::Tensor& h_,
                                                                       const at::Tensor& g_, const at::Tensor& gl_,
                                                                       c10::string_view scale, double clamp, std::optional<int64_t> passthrough) {
  constexpr const char* op = "affine_coupling_inv_bwd";
  const ScaleKind kind = parse_scale(op, scale, clamp);
  const CouplingShape sh = check_coupling(op, y_, h_, /*affine=*/true, "y", passthrough);
  check_grad(op, g_, y_, "grad_y", "y");
  check_grad_logdet(op, gl_, y_);
  const at::Tensor y = y_.contiguous(), h = h_.contiguous(), g = g_.contiguous(), gl = gl_.contiguous();
  at::Tensor x = at::empty(y.sizes(), y.options());
  at::Tensor gin = at::empty(y.sizes(), y.options());
  at::Tensor gh = at::empty(h.sizes(), h.options());
  if (CPU_CAPABILITY::rows_path(sh, y.scalar_type(), RowsOp::kAffineBackward)) {
    CPU_CAPABILITY::affine_coupling_inv_bwd_rows(kind, clamp, sh, y, h, g, gl, x, gin, gh);
    return {x, gin, gh};
  }
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kBFloat16, at::kHalf, y.scalar_type(), op, [&] {
    dispatch_scale(kind, [&](auto k) {
      affine_inv_bwd_apply<decltype(k)::value, scalar_t>(y, h, g, gl, x, gin, gh, sh, clamp);
    });
  });
  return {x, gin, gh};
}

template <bool Inverse>
at::Tensor additive_coupling(const at::Tensor& in_, const at::Tensor& h_, std::optional<int64_t> passthrough) {
  constexpr const char* op = Inverse ? "additive_coupling_inv" : "additive_coupling_fwd";
  const CouplingShape sh = check_coupling(op, in_, h_, /*affine=*/false, Inverse ? "y" : "x", passthrough);
  const at::Tensor in = in_.contiguous(), h = h_.contiguous();
  at::Tensor out = at::empty(in.sizes(), in.options());
  if (CPU_CAPABILITY::rows_path(sh, in.scalar_type(), RowsOp::kAdditive)) {
    CPU_CAPABILITY::additive_coupling_rows(Inverse, sh, in, h, out);
    return out;
  }
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kBFloat16, at::kHalf, in.scalar_type(), op, [&] {
    const scalar_t* in_p = in.const_data_ptr<scalar_t>();
    const scalar_t* t_p = h.const_data_ptr<scalar_t>();
    scalar_t* out_p = out.mutable_data_ptr<scalar_t>();
    run_tasks<scalar_t>(sh, in_p, out_p, [&](int64_t, int64_t b, int64_t start, int64_t n) {
      const int64_t xo = sh.x2_offset(b) + start, to = sh.additive_shift_offset(b) + start;
      for_lanes<scalar_t>(n, [&](auto lane, int64_t i) {
        using C = typename decltype(lane)::type;
        const C a = lane.load(in_p + xo + i), t = lane.load(t_p + to + i);
        lane.store(out_p + xo + i, Inverse ? additive_inverse<C>(a, t) : additive_forward<C>(a, t));
      });
    });
  });
  return out;
}

// grad_h has the shape of the shift, [B, C2, *spatial], which follows from grad_out's.
std::tuple<at::Tensor, at::Tensor> additive_coupling_bwd(const at::Tensor& g_, bool reverse,
                                                         std::optional<int64_t> passthrough) {
  constexpr const char* op = "additive_coupling_bwd";
  const CouplingShape sh = check_coupling_input(op, g_, "grad_out", passthrough);
  const at::Tensor g = g_.contiguous();
  at::Tensor gin = at::empty(g.sizes(), g.options());
  at::Tensor gh = at::empty(additive_shift_sizes(g, sh), g.options());
  if (CPU_CAPABILITY::rows_path(sh, g.scalar_type(), RowsOp::kAdditive)) {
    CPU_CAPABILITY::additive_coupling_bwd_rows(reverse, sh, g, gin, gh);
    return {gin, gh};
  }
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kBFloat16, at::kHalf, g.scalar_type(), op, [&] {
    const scalar_t* g_p = g.const_data_ptr<scalar_t>();
    scalar_t* gin_p = gin.mutable_data_ptr<scalar_t>();
    scalar_t* gh_p = gh.mutable_data_ptr<scalar_t>();
    run_tasks<scalar_t>(sh, g_p, gin_p, [&](int64_t, int64_t b, int64_t start, int64_t n) {
      const int64_t xo = sh.x2_offset(b) + start, to = sh.additive_shift_offset(b) + start;
      for_lanes<scalar_t>(n, [&](auto lane, int64_t i) {
        using C = typename decltype(lane)::type;
        const C v = lane.load(g_p + xo + i);
        lane.store(gin_p + xo + i, v);
        lane.store(gh_p + to + i, reverse ? C(0) - v : v);
      });
    });
  });
  return {gin, gh};
}

std::tuple<at::Tensor, at::Tensor, at::Tensor> additive_coupling_inv_bwd(const at::Tensor& y_, const at::Tensor& h_,
                                                                         const at::Tensor& g_, std::optional<int64_t> passthrough) {
  constexpr const char* op = "additive_coupling_inv_bwd";
  const CouplingShape sh = check_coupling(op, y_, h_, /*affine=*/false, "y", passthrough);
  check_grad(op, g_, y_, "grad_y", "y");
  const at::Tensor y = y_.contiguous(), h = h_.contiguous(), g = g_.contiguous();
  at::Tensor x = at::empty(y.sizes(), y.options());
  at::Tensor gin = at::empty(y.sizes(), y.options());
  at::Tensor gh = at::empty(h.sizes(), h.options());
  if (CPU_CAPABILITY::rows_path(sh, y.scalar_type(), RowsOp::kAdditive)) {
    CPU_CAPABILITY::additive_coupling_inv_bwd_rows(sh, y, h, g, x, gin, gh);
    return {x, gin, gh};
  }
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kBFloat16, at::kHalf, y.scalar_type(), op, [&] {
    const scalar_t* y_p = y.const_data_ptr<scalar_t>();
    const scalar_t* t_p = h.const_data_ptr<scalar_t>();
    const scalar_t* g_p = g.const_data_ptr<scalar_t>();
    scalar_t* x_p = x.mutable_data_ptr<scalar_t>();
    scalar_t* gin_p = gin.mutable_data_ptr<scalar_t>();
    scalar_t* gh_p = gh.mutable_data_ptr<scalar_t>();
    run_tasks<scalar_t, 2>(sh, {Copy<scalar_t>{y_p, x_p}, Copy<scalar_t>{g_p, gin_p}},
                           [&](int64_t, int64_t b, int64_t start, int64_t n) {
      const int64_t xo = sh.x2_offset(b) + start, to = sh.additive_shift_offset(b) + start;
      for_lanes<scalar_t>(n, [&](auto lane, int64_t i) {
        using C = typename decltype(lane)::type;
        const C v = lane.load(g_p + xo + i);
        lane.store(x_p + xo + i, additive_inverse<C>(lane.load(y_p + xo + i), lane.load(t_p + to + i)));
        lane.store(gin_p + xo + i, v);
        lane.store(gh_p + to + i, v);
      });
    });
  });
  return {x, gin, gh};
}

}  // namespace

TORCH_LIBRARY_IMPL(invkernels, CPU, m) {
  m.impl("affine_coupling_fwd", &affine_coupling<false>);
  m.impl("affine_coupling_inv", &affine_coupling<true>);
  m.impl("affine_coupling_bwd", &affine_coupling_bwd);
  m.impl("affine_coupling_inv_bwd", &affine_coupling_inv_bwd);
  m.impl("additive_coupling_fwd", &additive_coupling<false>);
  m.impl("additive_coupling_inv", &additive_coupling<true>);
  m.impl("additive_coupling_bwd", &additive_coupling_bwd);
  m.impl("additive_coupling_inv_bwd", &additive_coupling_inv_bwd);
}

}  // namespace invk::cpu
