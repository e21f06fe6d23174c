#pragma once

// Loop helpers of the CPU kernels: a body written once as a generic lambda runs on
// Vectorized<scalar_t> lanes (float, double) and on single elements for the tail and for the
// reduced-precision types, which compute in float.

#include <ATen/OpMathType.h>
#include <ATen/cpu/vec/vec.h>

#if defined(CPU_CAPABILITY_AVX512) || defined(CPU_CAPABILITY_AVX2)
#include <immintrin.h>
#endif

#include <array>
#include <cstddef>
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

// Calls body(Lane<C>{}, i) over [0, n); body returns std::array<C, N>. Returns the N sums,
// accumulated in acc_t<scalar_t> per vector lane and then lane by lane in a fixed order.
template <typename scalar_t, size_t N, typename Body>
inline std::array<acc_t<scalar_t>, N> sum_lanes_n(int64_t n, const Body& body) {
  using A = acc_t<scalar_t>;
  std::array<A, N> total{};
  int64_t i = 0;
  if constexpr (kVectorized<scalar_t>) {
    using V = at::vec::Vectorized<scalar_t>;
    std::array<V, N> vacc;
    vacc.fill(V(A(0)));
    for (; i + V::size() <= n; i += V::size()) {
      const std::array<V, N> terms = body(Lane<V>{}, i);
      for (size_t k = 0; k < N; ++k) vacc[k] = vacc[k] + terms[k];
    }
    alignas(64) A lanes[V::size()];
    for (size_t k = 0; k < N; ++k) {
      vacc[k].store(lanes);
      for (int64_t l = 0; l < V::size(); ++l) total[k] += lanes[l];
    }
  }
  for (; i < n; ++i) {
    const std::array<A, N> terms = body(Lane<A>{}, i);
    for (size_t k = 0; k < N; ++k) total[k] += terms[k];
  }
  return total;
}

// One sum: body returns C.
template <typename scalar_t, typename Body>
inline acc_t<scalar_t> sum_lanes(int64_t n, const Body& body) {
  return sum_lanes_n<scalar_t, 1>(n, [&](auto lane, int64_t i) {
    using C = typename decltype(lane)::type;
    return std::array<C, 1>{body(lane, i)};
  })[0];
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

// Streaming (non-temporal) stores exist in this build's vector ISA for float and double.
template <typename scalar_t>
inline constexpr bool kStreams =
#if defined(CPU_CAPABILITY_AVX512) || defined(CPU_CAPABILITY_AVX2)
    kVectorized<scalar_t>;
#else
    false;
#endif

// Stores v at p (aligned to the vector size) without reading the destination's cache lines first.
template <typename scalar_t>
inline void store_stream(scalar_t* p, const at::vec::Vectorized<scalar_t>& v) {
#if defined(CPU_CAPABILITY_AVX512)
  if constexpr (std::is_same_v<scalar_t, float>) {
    _mm512_stream_ps(p, v);
  } else {
    _mm512_stream_pd(p, v);
  }
#elif defined(CPU_CAPABILITY_AVX2)
  if constexpr (std::is_same_v<scalar_t, float>) {
    _mm256_stream_ps(p, v);
  } else {
    _mm256_stream_pd(p, v);
  }
#else
  v.store(p);
#endif
}

// dst[i] = body(Lane<C>{}, i) over [0, n). With stream = true (for outputs much larger than the
// caches, not read back soon) the aligned vector part uses streaming stores, which skip reading
// the destination first and so cut the memory traffic of a bandwidth-bound pass by a third.
template <typename scalar_t, typename Body>
inline void store_lanes(scalar_t* dst, int64_t n, bool stream, const Body& body) {
  if constexpr (kStreams<scalar_t>) {
    if (stream) {
      using V = at::vec::Vectorized<scalar_t>;
      constexpr auto kAlign = static_cast<uintptr_t>(sizeof(V));
      int64_t i = 0;
      for (; i < n && reinterpret_cast<uintptr_t>(dst + i) % kAlign != 0; ++i) {
        dst[i] = static_cast<scalar_t>(body(Lane<acc_t<scalar_t>>{}, i));
      }
      for (; i + V::size() <= n; i += V::size()) store_stream(dst + i, body(Lane<V>{}, i));
      for (; i < n; ++i) dst[i] = static_cast<scalar_t>(body(Lane<acc_t<scalar_t>>{}, i));
      _mm_sfence();
      return;
    }
  }
  for_lanes<scalar_t>(n, [&](auto lane, int64_t i) { store(dst + i, body(lane, i)); });
}

}  // namespace invk::cpu
