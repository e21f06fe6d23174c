#pragma once

#include <stdint.h>

#include "macros.h"
#include "scalar_math.h"

// Shared math and indexing of the ActNorm kernels (CPU and CUDA). Formulas: docs/ops/actnorm.md.

namespace invk {

// x: [batch, channels, spatial] contiguous; one (b, c) plane holds `spatial` elements.
struct ActNormShape {
  int64_t batch;
  int64_t channels;
  int64_t spatial;

  INVK_HOST_DEVICE int64_t plane_offset(int64_t b, int64_t c) const { return (b * channels + c) * spatial; }
  // The k-th element of channel c, k in [0, batch * spatial).
  INVK_HOST_DEVICE int64_t channel_element(int64_t c, int64_t k) const {
    return plane_offset(k / spatial, c) + k % spatial;
  }
};

// ActNorm's per-channel factors: the scale s = exp(log_scale) and the inverse scale exp(-log_scale)
// (the inverse multiplies, never divides). T is any type with a MathOps<T>: float and double in the
// kernels, whole ATen tensors where csrc/ops/conv1x1.h folds an ActNorm into the 1x1 convolution.
template <typename T>
INVK_HOST_DEVICE T actnorm_scale(const T& log_scale) { return MathOps<T>::exp(log_scale); }

template <typename T>
INVK_HOST_DEVICE T actnorm_inv_scale(const T& log_scale) { return MathOps<T>::exp(-log_scale); }

// y = (x + b) * s with s = exp(log_scale).
template <typename T>
INVK_HOST_DEVICE T actnorm_forward(T x, T b, T s) { return (x + b) * s; }

// x = y * exp(-log_scale) - b.
template <typename T>
INVK_HOST_DEVICE T actnorm_inverse(T y, T b, T inv_s) { return y * inv_s - b; }

// VJP of one element given its centred value x + b (x the data-side value: the forward's input or
// the inverse's output). g_b and g_ls are this element's terms of the bias and log-scale gradients
// (the log-det term S * Σ gl is added once per channel by the caller). The folded 1x1 convolution
// runs it on whole tensors: W diag(s) is this forward with the weight's entries as x + b.
template <bool Reverse, typename T>
INVK_HOST_DEVICE void actnorm_backward_centred(const T& g, const T& centred, const T& s, const T& inv_s, T& g_in, T& g_b,
                                               T& g_ls) {
  if constexpr (!Reverse) {
    g_in = g * s;
    g_b = g_in;
    g_ls = g_in * centred;
  } else {
    g_in = g * inv_s;
    g_b = T(0) - g;
    g_ls = T(0) - g * centred;
  }
}

template <bool Reverse, typename T>
INVK_HOST_DEVICE void actnorm_backward(T g, T x, T b, T s, T inv_s, T& g_in, T& g_b, T& g_ls) {
  actnorm_backward_centred<Reverse, T>(g, x + b, s, inv_s, g_in, g_b, g_ls);
}

}  // namespace invk
