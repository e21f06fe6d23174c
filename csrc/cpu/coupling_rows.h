#pragma once

// The coupling ops on samples of only a few transformed elements (coupling_rows.cpp), which the ops of
// coupling_kernel.cpp call where rows_path says so.

#include <ATen/ATen.h>
#include <ATen/TensorIterator.h>

#include <algorithm>
#include <cstdint>

#include "../kernels/coupling.h"

namespace invk::cpu {

// Tasks per parallel_for grain for tasks of `elems` elements each: a thread takes at least aten's grain of
// element-wise ops, so that an op on a few thousand elements runs on the calling thread (waking the pool cost more
// than the work: affine_coupling_fwd on [512, 8] float32 took 52 us on 2 threads, 21 on one).
inline int64_t grain_tasks(int64_t elems) {
  return std::max<int64_t>(1, at::internal::GRAIN_SIZE / std::max<int64_t>(1, elems));
}

// A tensor whose passthrough halves (on the paths of coupling_rows.cpp: whole rows) an op copies from src to dst;
// coupling_kernel.cpp's tasks skip a null dst.
template <typename scalar_t>
struct Copy {
  const scalar_t* src;
  scalar_t* dst;
};

// The kinds of op that take the paths of coupling_rows.cpp from different sample lengths on.
enum class RowsOp { kAffineLogdet, kAffineBackward, kAdditive };

// Per CPU capability, as aten names its kernels: every capability's build of these functions has a name of its own.
namespace CPU_CAPABILITY {

// Whether the *_rows functions below run an op of this kind on inputs of this geometry and dtype: few transformed
// elements per sample, below one or two vectors of the dtype (coupling_rows.cpp, small_rows), and for the affine ops
// float or double (the element-wise types keep the per-sample kernels).
bool rows_path(const CouplingShape& sh, at::ScalarType dtype, RowsOp op);

// Each op's kernel: contiguous inputs, outputs allocated by the caller with the op's shapes and dtypes.
void affine_coupling_rows(bool inverse, ScaleKind kind, double clamp, const CouplingShape& sh, const at::Tensor& in,
                          const at::Tensor& h, at::Tensor& out, at::Tensor& logdet);
void affine_coupling_bwd_rows(bool reverse, ScaleKind kind, double clamp, const CouplingShape& sh, const at::Tensor& g,
                              const at::Tensor& gl, const at::Tensor& x, const at::Tensor& h, at::Tensor& gin,
                              at::Tensor& gh);
void affine_coupling_inv_bwd_rows(ScaleKind kind, double clamp, const CouplingShape& sh, const at::Tensor& y,
                                  const at::Tensor& h, const at::Tensor& g, const at::Tensor& gl, at::Tensor& x,
                                  at::Tensor& gin, at::Tensor& gh);
void additive_coupling_rows(bool inverse, const CouplingShape& sh, const at::Tensor& in, const at::Tensor& h,
                            at::Tensor& out);
void additive_coupling_bwd_rows(bool reverse, const CouplingShape& sh, const at::Tensor& g, at::Tensor& gin,
                                at::Tensor& gh);
void additive_coupling_inv_bwd_rows(const CouplingShape& sh, const at::Tensor& y, const at::Tensor& h,
                                    const at::Tensor& g, at::Tensor& x, at::Tensor& gin, at::Tensor& gh);

}  // namespace CPU_CAPABILITY
}  // namespace invk::cpu
