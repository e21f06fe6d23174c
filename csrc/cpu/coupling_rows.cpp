// The CPU coupling ops on samples of only a few transformed elements (a tabular flow's [512, 8] with passthrough 4
// transforms 4 per sample), for coupling_kernel.cpp (coupling_rows.h). There, a task and a partial vector per sample
// spent most of the time on the task, on the vector's idle lanes and on the log-det's lane sum: affine_coupling_fwd
// on [512, 8] float32 took 21 us on one thread, twice aten's tanh over all 4096 elements. Here a task takes a group
// of whole samples; the affine ops pack the group's rows into contiguous buffers and run the vector body over them
// on full vectors (RowGroup), the additive ones transform sample by sample. Results are bit for bit those of the
// per-sample kernels, but for which of two NaNs an operation passes on (the compiler orders operands as it likes).

#include "coupling_rows.h"

#include <ATen/Dispatch.h>
#include <ATen/Parallel.h>

#include <algorithm>
#include <array>
#include <cstddef>
#include <cstring>
#include <type_traits>

#include "lanes.h"
#include "vec_math.h"

namespace invk::cpu::CPU_CAPABILITY {
namespace {

// Whether samples of n transformed elements take the paths of this file. The affine ops pack them where the
// per-sample kernel leaves enough of its lanes idle for the copies to pay: a quarter (a third for the backward ops,
// which copy 7 or 9 rows per sample, not 4). Measured, x of [65536 / n2, 2 n2] with passthrough n2, 1 thread, AVX512,
// against the per-sample kernels: float32 forward 2.6x faster at n2 = 4, 1.25x at 12; backward 1.5x at 17, 1.25x at
// 20, about even at 24 (a quarter idle); float64 inverse-backward 1.1x at n2 = 4, 0.9x at 6 (a quarter idle), 1.25x
// at 9. The ops with a log-det pack below one vector only: above, its sums cost about what the idle lanes do; below,
// the packed log-dets are exact without more ado: there the per-sample kernel's log-det is one partial vector whose
// terms go through keep() (a blend) before the addition, so no multiplication is fused into it (GCC contracts
// acc + c * u into an FMA where it can, as for the atan scale's inverse on full vectors), and its lanes are added in
// order as sum_rows_in_lane_order adds them. The additive ops, which copy nothing, take samples below two vectors.
template <typename scalar_t>
bool small_rows(int64_t n, RowsOp op) {
  const int64_t V = Vec<scalar_t>::size();
  const int64_t lanes = num_chunks(n, V) * V;
  switch (op) {
    case RowsOp::kAffineLogdet:
      return n < V && 4 * (lanes - n) >= lanes;
    case RowsOp::kAffineBackward:
      return n < 2 * V && 3 * (lanes - n) >= lanes;
    case RowsOp::kAdditive:
      return n < 2 * V;
  }
  return false;
}

// Elements of one buffer of a RowGroup: a group's buffers (up to RowGroup::kBuffers) stay in the L1 cache.
template <typename scalar_t>
constexpr int64_t kGroupElems = 2048 / sizeof(scalar_t);

// Samples per group: as many as fill a RowGroup's buffers.
template <typename scalar_t>
int64_t group_rows(const CouplingShape& sh) {
  return std::max<int64_t>(1, kGroupElems<scalar_t> / sh.n2());
}

// The samples [b0, b0 + rows) of a task, packed for the vector body: each buffer holds one kind of row (x2, the raw
// scale, a gradient, ...) of every sample of the group back to back, n elements each, so that the body runs over
// rows * n contiguous elements on full vectors but for the last. An element's result is that of the per-sample
// kernel: the body's result depends only on the element's inputs (lanes.h, Remainder), and a log-det is summed from
// its sample's terms in sum_lanes' order (sum_rows_in_lane_order; small_rows says why that is exact). For the
// vectorized types, whose log-det terms and log-det gradients (acc_t) have the buffers' type.
template <typename scalar_t>
class RowGroup {
  static_assert(kVectorized<scalar_t> && std::is_same_v<acc_t<scalar_t>, scalar_t>);

 public:
  static constexpr size_t kBuffers = 9;  // affine_coupling_inv_bwd's 5 inputs and 4 outputs

  RowGroup(int64_t b0, int64_t rows, int64_t n) : b0(b0), rows(rows), n(n) {}

  const int64_t b0, rows, n;

  int64_t size() const { return rows * n; }

  // A buffer holding the group's rows of a tensor whose row b starts at base + b * stride.
  const scalar_t* gather(const scalar_t* base, int64_t stride) {
    scalar_t* dst = take();
    for (int64_t r = 0; r < rows; ++r) copy(dst + r * n, base + (b0 + r) * stride);
    return dst;
  }

  // A buffer holding per_sample[b] over the row of each sample b of the group.
  const scalar_t* splat(const scalar_t* per_sample) {
    scalar_t* dst = take();
    for (int64_t r = 0; r < rows; ++r) {
      const Vec<scalar_t> v(per_sample[b0 + r]);
      for_lanes<scalar_t>(n, [&](auto lane, int64_t i) { lane.store(dst + r * n + i, v); });
    }
    return dst;
  }

  // A buffer for an output, to write back with scatter or to sum with row_sums.
  scalar_t* take() {
    TORCH_INTERNAL_ASSERT_DEBUG_ONLY(used_ < kBuffers);
    return buf_[used_++];
  }

  // Writes the rows of `from` (a buffer of this group) to the tensor whose row b starts at base + b * stride.
  void scatter(const scalar_t* from, scalar_t* base, int64_t stride) const {
    for (int64_t r = 0; r < rows; ++r) copy(base + (b0 + r) * stride, from + r * n);
  }

  // A buffer holding the sum of each row of `terms` (a buffer of this group), as sum_lanes sums that sample's terms.
  const scalar_t* row_sums(const scalar_t* terms) {
    scalar_t* sums = take();
    sum_rows_in_lane_order<scalar_t>(terms, rows, n, sums);
    return sums;
  }

 private:
  // One row: full vectors, then one masked vector (lanes.h), which touches no element past the row.
  void copy(scalar_t* dst, const scalar_t* src) const {
    for_lanes<scalar_t>(n, [&](auto lane, int64_t i) { lane.store(dst + i, lane.load(src + i)); });
  }

  size_t used_ = 0;
  alignas(64) scalar_t buf_[kBuffers][kGroupElems<scalar_t>];
};

// Runs group(b0, rows) over groups of whole samples (group_rows of them, the last group fewer) after copying the
// group's rows of `copies` whole: one copy, not one per sample's passthrough half; group() overwrites the
// transformed halves. A sample's results come from its own elements, whatever the number of threads.
template <typename scalar_t, size_t N, typename Group>
void run_groups(const CouplingShape& sh, const std::array<Copy<scalar_t>, N>& copies, const Group& group) {
  const int64_t rows = group_rows<scalar_t>(sh);
  at::parallel_for(0, num_chunks(sh.batch, rows), grain_tasks(rows * sh.x_stride()), [&](int64_t begin, int64_t end) {
    for (int64_t task = begin; task < end; ++task) {
      const int64_t b0 = task * rows, count = std::min(rows, sh.batch - b0);
      const int64_t off = sh.x1_offset(b0);
      for (const Copy<scalar_t>& c : copies) {
        std::memcpy(c.dst + off, c.src + off, sizeof(scalar_t) * count * sh.x_stride());
      }
      group(b0, count);
    }
  });
}

template <ScaleKind K, bool Inverse, typename scalar_t>
void affine_rows(double clamp, const CouplingShape& sh, const at::Tensor& in, const at::Tensor& h, at::Tensor& out,
                 at::Tensor& logdet) {
  const scalar_t* in_p = in.const_data_ptr<scalar_t>();
  const scalar_t* h_p = h.const_data_ptr<scalar_t>();
  scalar_t* out_p = out.mutable_data_ptr<scalar_t>();
  scalar_t* logdet_p = logdet.mutable_data_ptr<scalar_t>();
  const ScaleParams<scalar_t> p{scalar_t(clamp), scalar_t(1.0 / clamp)};
  const int64_t xs = sh.x_stride(), hs_stride = 2 * sh.n2();
  run_groups<scalar_t, 1>(sh, {Copy<scalar_t>{in_p, out_p}}, [&](int64_t b0, int64_t rows) {
    RowGroup<scalar_t> grp(b0, rows, sh.n2());
    const scalar_t* x2 = grp.gather(in_p + sh.x2_offset(0), xs);
    const scalar_t* hs = grp.gather(h_p + sh.affine_scale_offset(0), hs_stride);
    const scalar_t* t = grp.gather(h_p + sh.affine_shift_offset(0), hs_stride);
    scalar_t* y2 = grp.take();
    scalar_t* terms = grp.take();
    for_lanes<scalar_t>(grp.size(), [&](auto lane, int64_t i) {
      using C = typename decltype(lane)::type;
      using M = MathOps<C>;
      const ScaleParams<C> pc{C(p.clamp), C(p.inv_clamp)};
      C L;
      const C v = Inverse ? affine_inverse<K, C, M>(lane.load(x2 + i), lane.load(hs + i), lane.load(t + i), pc, L)
                          : affine_forward<K, C, M>(lane.load(x2 + i), lane.load(hs + i), lane.load(t + i), pc, L);
      lane.store(y2 + i, v);
      lane.store(terms + i, L);
    });
    grp.scatter(y2, out_p + sh.x2_offset(0), xs);
    const scalar_t* sums = grp.row_sums(terms);
    for (int64_t r = 0; r < rows; ++r) {
      // As coupling_kernel.cpp's sum_partials adds a sample's one partial log-det.
      scalar_t s = 0;
      s += sums[r];
      logdet_p[b0 + r] = Inverse ? -s : s;
    }
  });
}

template <ScaleKind K, bool Reverse, typename scalar_t>
void affine_bwd_rows(double clamp, const CouplingShape& sh, const at::Tensor& g, const at::Tensor& gl,
                     const at::Tensor& x, const at::Tensor& h, at::Tensor& gin, at::Tensor& gh) {
  const scalar_t* g_p = g.const_data_ptr<scalar_t>();
  const scalar_t* gl_p = gl.const_data_ptr<scalar_t>();
  const scalar_t* x_p = x.const_data_ptr<scalar_t>();
  const scalar_t* h_p = h.const_data_ptr<scalar_t>();
  scalar_t* gin_p = gin.mutable_data_ptr<scalar_t>();
  scalar_t* gh_p = gh.mutable_data_ptr<scalar_t>();
  const ScaleParams<scalar_t> p{scalar_t(clamp), scalar_t(1.0 / clamp)};
  const int64_t xs = sh.x_stride(), hs_stride = 2 * sh.n2();
  run_groups<scalar_t, 1>(sh, {Copy<scalar_t>{g_p, gin_p}}, [&](int64_t b0, int64_t rows) {
    RowGroup<scalar_t> grp(b0, rows, sh.n2());
    const scalar_t* go = grp.gather(g_p + sh.x2_offset(0), xs);
    const scalar_t* glr = grp.splat(gl_p);
    const scalar_t* x2 = grp.gather(x_p + sh.x2_offset(0), xs);
    const scalar_t* hs = grp.gather(h_p + sh.affine_scale_offset(0), hs_stride);
    scalar_t* gi = grp.take();
    scalar_t* ghs = grp.take();
    scalar_t* gt = grp.take();
    for_lanes<scalar_t>(grp.size(), [&](auto lane, int64_t i) {
      using C = typename decltype(lane)::type;
      using M = MathOps<C>;
      const ScaleParams<C> pc{C(p.clamp), C(p.inv_clamp)};
      C g_in, g_hs, g_t;
      affine_backward<K, Reverse, C, M>(lane.load(go + i), lane.load(glr + i), lane.load(x2 + i), lane.load(hs + i),
                                        pc, g_in, g_hs, g_t);
      lane.store(gi + i, g_in);
      lane.store(ghs + i, g_hs);
      lane.store(gt + i, g_t);
    });
    grp.scatter(gi, gin_p + sh.x2_offset(0), xs);
    grp.scatter(ghs, gh_p + sh.affine_scale_offset(0), hs_stride);
    grp.scatter(gt, gh_p + sh.affine_shift_offset(0), hs_stride);
  });
}

template <ScaleKind K, typename scalar_t>
void affine_inv_bwd_rows(double clamp, const CouplingShape& sh, const at::Tensor& y, const at::Tensor& h,
                         const at::Tensor& g, const at::Tensor& gl, at::Tensor& x, at::Tensor& gin, at::Tensor& gh) {
  const scalar_t* y_p = y.const_data_ptr<scalar_t>();
  const scalar_t* h_p = h.const_data_ptr<scalar_t>();
  const scalar_t* g_p = g.const_data_ptr<scalar_t>();
  const scalar_t* gl_p = gl.const_data_ptr<scalar_t>();
  scalar_t* x_p = x.mutable_data_ptr<scalar_t>();
  scalar_t* gin_p = gin.mutable_data_ptr<scalar_t>();
  scalar_t* gh_p = gh.mutable_data_ptr<scalar_t>();
  const ScaleParams<scalar_t> p{scalar_t(clamp), scalar_t(1.0 / clamp)};
  const int64_t xs = sh.x_stride(), hs_stride = 2 * sh.n2();
  run_groups<scalar_t, 2>(sh, {Copy<scalar_t>{y_p, x_p}, Copy<scalar_t>{g_p, gin_p}},
                          [&](int64_t b0, int64_t rows) {
    RowGroup<scalar_t> grp(b0, rows, sh.n2());
    const scalar_t* y2 = grp.gather(y_p + sh.x2_offset(0), xs);
    const scalar_t* hs = grp.gather(h_p + sh.affine_scale_offset(0), hs_stride);
    const scalar_t* t = grp.gather(h_p + sh.affine_shift_offset(0), hs_stride);
    const scalar_t* go = grp.gather(g_p + sh.x2_offset(0), xs);
    const scalar_t* glr = grp.splat(gl_p);
    scalar_t* x2 = grp.take();
    scalar_t* gi = grp.take();
    scalar_t* ghs = grp.take();
    scalar_t* gt = grp.take();
    for_lanes<scalar_t>(grp.size(), [&](auto lane, int64_t i) {
      using C = typename decltype(lane)::type;
      using M = MathOps<C>;
      const ScaleParams<C> pc{C(p.clamp), C(p.inv_clamp)};
      C x2v, g_in, g_hs, g_t;
      affine_inverse_backward<K, C, M>(lane.load(y2 + i), lane.load(hs + i), lane.load(t + i), lane.load(go + i),
                                       lane.load(glr + i), pc, x2v, g_in, g_hs, g_t);
      lane.store(x2 + i, x2v);
      lane.store(gi + i, g_in);
      lane.store(ghs + i, g_hs);
      lane.store(gt + i, g_t);
    });
    grp.scatter(x2, x_p + sh.x2_offset(0), xs);
    grp.scatter(gi, gin_p + sh.x2_offset(0), xs);
    grp.scatter(ghs, gh_p + sh.affine_scale_offset(0), hs_stride);
    grp.scatter(gt, gh_p + sh.affine_shift_offset(0), hs_stride);
  });
}

}  // namespace

bool rows_path(const CouplingShape& sh, at::ScalarType dtype, RowsOp op) {
  bool rows = false;
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kBFloat16, at::kHalf, dtype, "rows_path", [&] {
    rows = (kVectorized<scalar_t> || op == RowsOp::kAdditive) && sh.n2() > 0 && small_rows<scalar_t>(sh.n2(), op);
  });
  return rows;
}

void affine_coupling_rows(bool inverse, ScaleKind kind, double clamp, const CouplingShape& sh, const at::Tensor& in,
                          const at::Tensor& h, at::Tensor& out, at::Tensor& logdet) {
  AT_DISPATCH_FLOATING_TYPES(in.scalar_type(), "affine_coupling_rows", [&] {
    dispatch_scale(kind, [&](auto k) {
      constexpr ScaleKind K = decltype(k)::value;
      if (inverse) {
        affine_rows<K, true, scalar_t>(clamp, sh, in, h, out, logdet);
      } else {
        affine_rows<K, false, scalar_t>(clamp, sh, in, h, out, logdet);
      }
    });
  });
}

void affine_coupling_bwd_rows(bool reverse, ScaleKind kind, double clamp, const CouplingShape& sh, const at::Tensor& g,
                              const at::Tensor& gl, const at::Tensor& x, const at::Tensor& h, at::Tensor& gin,
                              at::Tensor& gh) {
  AT_DISPATCH_FLOATING_TYPES(x.scalar_type(), "affine_coupling_bwd_rows", [&] {
    dispatch_scale(kind, [&](auto k) {
      constexpr ScaleKind K = decltype(k)::value;
      if (reverse) {
        affine_bwd_rows<K, true, scalar_t>(clamp, sh, g, gl, x, h, gin, gh);
      } else {
        affine_bwd_rows<K, false, scalar_t>(clamp, sh, g, gl, x, h, gin, gh);
      }
    });
  });
}

void affine_coupling_inv_bwd_rows(ScaleKind kind, double clamp, const CouplingShape& sh, const at::Tensor& y,
                                  const at::Tensor& h, const at::Tensor& g, const at::Tensor& gl, at::Tensor& x,
                                  at::Tensor& gin, at::Tensor& gh) {
  AT_DISPATCH_FLOATING_TYPES(y.scalar_type(), "affine_coupling_inv_bwd_rows", [&] {
    dispatch_scale(kind, [&](auto k) {
      affine_inv_bwd_rows<decltype(k)::value, scalar_t>(clamp, sh, y, h, g, gl, x, gin, gh);
    });
  });
}

// The additive ops, sample by sample: one addition per element leaves no lanes worth packing for.
void additive_coupling_rows(bool inverse, const CouplingShape& sh, const at::Tensor& in, const at::Tensor& h,
                            at::Tensor& out) {
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kBFloat16, at::kHalf, in.scalar_type(), "additive_coupling_rows", [&] {
    const scalar_t* in_p = in.const_data_ptr<scalar_t>();
    const scalar_t* t_p = h.const_data_ptr<scalar_t>();
    scalar_t* out_p = out.mutable_data_ptr<scalar_t>();
    run_groups<scalar_t, 1>(sh, {Copy<scalar_t>{in_p, out_p}}, [&](int64_t b0, int64_t rows) {
      for (int64_t b = b0; b < b0 + rows; ++b) {
        const int64_t xo = sh.x2_offset(b), to = sh.additive_shift_offset(b);
        for_lanes<scalar_t>(sh.n2(), [&](auto lane, int64_t i) {
          using C = typename decltype(lane)::type;
          const C a = lane.load(in_p + xo + i), t = lane.load(t_p + to + i);
          lane.store(out_p + xo + i, inverse ? additive_inverse<C>(a, t) : additive_forward<C>(a, t));
        });
      }
    });
  });
}

// grad_in is grad_out (the row copies, and its transformed halves stored again as the per-sample kernel stores them,
// through the compute type); grad_h is grad_out's transformed halves, negated for the reverse direction.
void additive_coupling_bwd_rows(bool reverse, const CouplingShape& sh, const at::Tensor& g, at::Tensor& gin,
                                at::Tensor& gh) {
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kBFloat16, at::kHalf, g.scalar_type(), "additive_coupling_bwd_rows", [&] {
    const scalar_t* g_p = g.const_data_ptr<scalar_t>();
    scalar_t* gin_p = gin.mutable_data_ptr<scalar_t>();
    scalar_t* gh_p = gh.mutable_data_ptr<scalar_t>();
    run_groups<scalar_t, 1>(sh, {Copy<scalar_t>{g_p, gin_p}}, [&](int64_t b0, int64_t rows) {
      for (int64_t b = b0; b < b0 + rows; ++b) {
        const int64_t xo = sh.x2_offset(b), to = sh.additive_shift_offset(b);
        for_lanes<scalar_t>(sh.n2(), [&](auto lane, int64_t i) {
          using C = typename decltype(lane)::type;
          const C v = lane.load(g_p + xo + i);
          lane.store(gin_p + xo + i, v);
          lane.store(gh_p + to + i, reverse ? C(0) - v : v);
        });
      }
    });
  });
}

// x and grad_in start as copies of y and grad_y (the row copies); x's transformed halves are then y2 - t, grad_in's
// are stored again as in additive_coupling_bwd_rows, and grad_h is grad_y's transformed halves.
void additive_coupling_inv_bwd_rows(const CouplingShape& sh, const at::Tensor& y, const at::Tensor& h,
                                    const at::Tensor& g, at::Tensor& x, at::Tensor& gin, at::Tensor& gh) {
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kBFloat16, at::kHalf, y.scalar_type(), "additive_coupling_inv_bwd_rows", [&] {
    const scalar_t* y_p = y.const_data_ptr<scalar_t>();
    const scalar_t* t_p = h.const_data_ptr<scalar_t>();
    const scalar_t* g_p = g.const_data_ptr<scalar_t>();
    scalar_t* x_p = x.mutable_data_ptr<scalar_t>();
    scalar_t* gin_p = gin.mutable_data_ptr<scalar_t>();
    scalar_t* gh_p = gh.mutable_data_ptr<scalar_t>();
    run_groups<scalar_t, 2>(sh, {Copy<scalar_t>{y_p, x_p}, Copy<scalar_t>{g_p, gin_p}},
                            [&](int64_t b0, int64_t rows) {
      for (int64_t b = b0; b < b0 + rows; ++b) {
        const int64_t xo = sh.x2_offset(b), to = sh.additive_shift_offset(b);
        for_lanes<scalar_t>(sh.n2(), [&](auto lane, int64_t i) {
          using C = typename decltype(lane)::type;
          const C v = lane.load(g_p + xo + i);
          lane.store(x_p + xo + i, additive_inverse<C>(lane.load(y_p + xo + i), lane.load(t_p + to + i)));
          lane.store(gin_p + xo + i, v);
          lane.store(gh_p + to + i, v);
        });
      }
    });
  });
}

}  // namespace invk::cpu::CPU_CAPABILITY
