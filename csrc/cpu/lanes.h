#pragma once

// Loop helpers of the CPU kernels: a body written once as a generic lambda runs on
// Vectorized<scalar_t> lanes (float, double) and on single elements for the tail and for the
// reduced-precision types, which compute in float.

#include <ATen/OpMathType.h>
#include <ATen/cpu/vec/vec.h>

#include <cstdint>
#include <type_traits>

namespace invk::cpu {

template <typename scalar_t>
using acc_t = at::opmath_type<scalar_t>;

template <typename scalar_t>
inline constexpr bool kVectorized = std::is_same_v<scalar_t, float> || std::is_same_v<scalar_t, double>;

template <typename C>
struct Lane {
  using type = C;
};

template <typename C, typename scalar_t>
inline C load(const scalar_t* p) {
  if constexpr (std::is_same_v<C, at::vec::Vectorized<scalar_t>>) {
    return C::loadu(p);
  } else {
    return static_cast<C>(*p);
  }
}

template <typename scalar_t, typename C>
inline void store(scalar_t* p, const C& v) {
  if constexpr (std::is_same_v<C, at::vec::Vectorized<scalar_t>>) {
    v.store(p);
  } else {
    *p = static_cast<scalar_t>(v);
  }
}

// Calls body(Lane<C>{}, i) over [0, n) and returns the sum of what it returns, accumulated in
// acc_t<scalar_t> per vector lane and then lane by lane in a fixed order.
template <typename scalar_t, typename Body>
inline acc_t<scalar_t> sum_lanes(int64_t n, const Body& body) {
  using A = acc_t<scalar_t>;
  A total = 0;
  int64_t i = 0;
  if constexpr (kVectorized<scalar_t>) {
    using V = at::vec::Vectorized<scalar_t>;
    V vacc(A(0));
    for (; i + V::size() <= n; i += V::size()) vacc = vacc + body(Lane<V>{}, i);
    alignas(64) A lanes[V::size()];
    vacc.store(lanes);
    for (int64_t k = 0; k < V::size(); ++k) total += lanes[k];
  }
  for (; i < n; ++i) total += body(Lane<A>{}, i);
  return total;
}

// Calls body(Lane<C>{}, i) over [0, n).
template <typename scalar_t, typename Body>
inline void for_lanes(int64_t n, const Body& body) {
  int64_t i = 0;
  if constexpr (kVectorized<scalar_t>) {
    using V = at::vec::Vectorized<scalar_t>;
    for (; i + V::size() <= n; i += V::size()) body(Lane<V>{}, i);
  }
  for (; i < n; ++i) body(Lane<acc_t<scalar_t>>{}, i);
}

}  // namespace invk::cpu
