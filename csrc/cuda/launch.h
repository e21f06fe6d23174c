#pragma once

// Launch helpers shared by the CUDA kernels: block size, grid size for a grid-stride loop, and the
// accumulation type.

#include <ATen/OpMathType.h>

#include <algorithm>
#include <cstdint>

namespace invk::cuda {

constexpr int kThreads = 256;
constexpr int64_t kMaxBlocks = 65535;

template <typename scalar_t>
using acc_t = at::opmath_type<scalar_t>;

// Blocks for `tiles` units of work, capped: the kernels loop over the rest (grid-stride).
inline int grid_for(int64_t tiles) { return static_cast<int>(std::max<int64_t>(1, std::min(tiles, kMaxBlocks))); }

// Blocks for one thread per element over `n` elements, capped likewise.
inline int grid_for_elements(int64_t n) { return grid_for((n + kThreads - 1) / kThreads); }

}  // namespace invk::cuda
