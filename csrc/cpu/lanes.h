#pragma once

// Loop helpers of the CPU kernels: a body written once as a generic lambda runs on
// Vectorized<scalar_t> lanes for float and double, and on single elements (computed in float) for
// the reduced-precision types.
//
// The remainder of a float/double loop (and the unaligned head of a streaming store) runs as one
// partial vector by default (Remainder::kVector): loaded and stored with a count, so every element
// goes through the vector code and its result depends only on its inputs, not on the tensor's size
// or on where the element falls in it (a scalar remainder would run libm's functions instead of
// SLEEF's and round differently). Bodies of additions and multiplications alone, which round the
// same in a lane and in a scalar, may take Remainder::kScalar, cheaper for remainders of one or
// two elements.

#include <ATen/OpMathType.h>
#include <ATen/cpu/vec/vec.h>

#if defined(CPU_CAPABILITY_AVX512) || defined(CPU_CAPABILITY_AVX2)
#include <immintrin.h>
#endif

#include <algorithm>
#include <array>
#include <cstddef>
#include <cstdint>
#include <limits>
#include <type_traits>

namespace invk::cpu {

template <typename scalar_t>
using acc_t = at::opmath_type<scalar_t>;

template <typename scalar_t>
inline constexpr bool kVectorized = std::is_same_v<scalar_t, float> || std::is_same_v<scalar_t, double>;

enum class Remainder { kVector, kScalar };

// Whether the remainder of a loop over scalar_t is a partial vector (else single elements).
template <typename scalar_t, Remainder R>
inline constexpr bool kVectorRemainder = kVectorized<scalar_t> && R == Remainder::kVector;

// What a loop body sees: the compute type C (Vectorized<scalar_t>, or acc_t<scalar_t> for one
// element) and how to move `count` consecutive elements of scalar_t between memory and C. A full
// vector lane (Partial = false) moves V::size() elements; a partial one moves `count` < V::size().
// Its padded lanes are never stored and keep() drops them from sums; with AVX2 and AVX512 they
// hold 0 (masked loads), elsewhere they are zero-filled.
template <typename scalar_t, typename C, bool Partial = false>
struct Lane {
  using type = C;
  int64_t count = 1;

  C load(const scalar_t* p) const {
    if constexpr (!std::is_same_v<C, at::vec::Vectorized<scalar_t>>) {
      return static_cast<C>(*p);
    } else if constexpr (Partial) {
#if defined(CPU_CAPABILITY_AVX512) || defined(CPU_CAPABILITY_AVX2)
      return C::loadu(p, count);
#else
      return C::set(C(scalar_t(0)), C::loadu(p, count), count);
#endif
    } else {
      return C::loadu(p);
    }
  }

  void store(scalar_t* p, const C& v) const {
    if constexpr (!std::is_same_v<C, at::vec::Vectorized<scalar_t>>) {
      *p = static_cast<scalar_t>(v);
    } else if constexpr (Partial) {
      v.store(p, count);
    } else {
      v.store(p);
    }
  }

  // v on the lanes that hold elements, 0 on the padded lanes: a term of a sum (the padded lanes
  // compute the body at other inputs, and the body is not 0 at every input, e.g. log sigmoid(0 + 2)).
  C keep(const C& v) const {
    if constexpr (Partial) {
      return C::blendv(C(scalar_t(0)), v, C::arange(scalar_t(0), scalar_t(1)) < C(static_cast<scalar_t>(count)));
    } else {
      return v;
    }
  }
};

template <typename scalar_t>
using Vec = at::vec::Vectorized<scalar_t>;
template <typename scalar_t>
using FullLane = Lane<scalar_t, Vec<scalar_t>, false>;
template <typename scalar_t>
using PartialLane = Lane<scalar_t, Vec<scalar_t>, true>;
template <typename scalar_t>
using ScalarLane = Lane<scalar_t, acc_t<scalar_t>, false>;

// Calls body(lane, i) over [0, n) in steps of lane.count; body returns std::array<C, N>. Returns
// the N sums, accumulated in acc_t<scalar_t> per vector lane and then lane by lane in a fixed order.
template <typename scalar_t, size_t N, Remainder R = Remainder::kVector, typename Body>
inline std::array<acc_t<scalar_t>, N> sum_lanes_n(int64_t n, const Body& body) {
  using A = acc_t<scalar_t>;
  std::array<A, N> total{};
  int64_t i = 0;
  if constexpr (kVectorized<scalar_t>) {
    using V = Vec<scalar_t>;
    std::array<V, N> vacc;
    vacc.fill(V(A(0)));
    for (; i + V::size() <= n; i += V::size()) {
      const std::array<V, N> terms = body(FullLane<scalar_t>{V::size()}, i);
      for (size_t k = 0; k < N; ++k) vacc[k] = vacc[k] + terms[k];
    }
    if constexpr (R == Remainder::kVector) {
      if (i < n) {
        const PartialLane<scalar_t> lane{n - i};
        const std::array<V, N> terms = body(lane, i);
        for (size_t k = 0; k < N; ++k) vacc[k] = vacc[k] + lane.keep(terms[k]);
      }
    }
    alignas(64) A lanes[V::size()];
    for (size_t k = 0; k < N; ++k) {
      vacc[k].store(lanes);
      for (int64_t l = 0; l < V::size(); ++l) total[k] += lanes[l];
    }
  }
  if constexpr (!kVectorRemainder<scalar_t, R>) {
    for (; i < n; ++i) {
      const std::array<A, N> terms = body(ScalarLane<scalar_t>{}, i);
      for (size_t k = 0; k < N; ++k) total[k] += terms[k];
    }
  }
  return total;
}

// One sum: body returns C.
template <typename scalar_t, Remainder R = Remainder::kVector, typename Body>
inline acc_t<scalar_t> sum_lanes(int64_t n, const Body& body) {
  return sum_lanes_n<scalar_t, 1, R>(n, [&](auto lane, int64_t i) {
    using C = typename decltype(lane)::type;
    return std::array<C, 1>{body(lane, i)};
  })[0];
}

// sums[r] = the sum of the row terms[r * n, r * n + n) for r in [0, rows), each in the order in which sum_lanes
// (Remainder::kVector) adds the same terms: per vector lane l the terms l, l + V, l + 2V, ... from 0 (V = 1 for the
// element-wise types), then the lanes in lane order. So a loop that computes the terms of many sums at once (packed
// rows of several samples) gets each sum bit for bit as sum_lanes does. What sum_lanes adds beyond that is left out:
// its padded lanes add exact zeros (keep()), and so do the lanes l >= n that no term reaches when n < V; a lane's sum
// and the total start at +0, so they are never -0 (x + y is -0 only for x = y = -0), and x + (+0) is x for every
// other x, NaN included. The terms are taken as rounded: where the compiler fuses a term's last multiplication into
// sum_lanes' accumulation (an FMA), a lane of two or more full-vector terms rounds differently there. V rows at a
// time go side by side in the lanes of a vector (their terms gathered), so that a row's chain of dependent scalar
// additions becomes one vector addition per term of V rows; the rows left over go one by one.
template <typename scalar_t>
inline void sum_rows_in_lane_order(const acc_t<scalar_t>* terms, int64_t rows, int64_t n, acc_t<scalar_t>* sums) {
  using A = acc_t<scalar_t>;
  constexpr int64_t V = kVectorized<scalar_t> ? Vec<scalar_t>::size() : 1;
  int64_t r = 0;
  if constexpr (kVectorized<scalar_t>) {
    using I = at::vec::Vectorized<at::vec::int_same_size_t<scalar_t>>;
    if (n <= std::numeric_limits<at::vec::int_same_size_t<scalar_t>>::max() / V) {
      const I row_starts = I::arange(0, n);
      for (; r + V <= rows; r += V) {
        Vec<scalar_t> total(A(0));
        for (int64_t l = 0; l < std::min(V, n); ++l) {
          Vec<scalar_t> lane(A(0));
          for (int64_t i = l; i < n; i += V) {
            lane = lane + at::vec::gather<sizeof(scalar_t)>(terms + r * n + i, row_starts);
          }
          total = total + lane;
        }
        total.store(sums + r);
      }
    }
  }
  for (; r < rows; ++r) {
    A total = 0;
    for (int64_t l = 0; l < std::min(V, n); ++l) {
      A lane = 0;
      for (int64_t i = r * n + l; i < r * n + n; i += V) lane += terms[i];
      total += lane;
    }
    sums[r] = total;
  }
}

// Calls body(lane, i) over [0, n) in steps of lane.count.
template <typename scalar_t, Remainder R = Remainder::kVector, typename Body>
inline void for_lanes(int64_t n, const Body& body) {
  int64_t i = 0;
  if constexpr (kVectorized<scalar_t>) {
    using V = Vec<scalar_t>;
    for (; i + V::size() <= n; i += V::size()) body(FullLane<scalar_t>{V::size()}, i);
    if constexpr (R == Remainder::kVector) {
      if (i < n) body(PartialLane<scalar_t>{n - i}, i);
    }
  }
  if constexpr (!kVectorRemainder<scalar_t, R>) {
    for (; i < n; ++i) body(ScalarLane<scalar_t>{}, i);
  }
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
inline void store_stream(scalar_t* p, const Vec<scalar_t>& v) {
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

// dst[i] = body(lane, i) over [0, n). With stream = true (for outputs much larger than the
// caches, not read back soon) the aligned vector part uses streaming stores, which skip reading
// the destination first and so cut the memory traffic of a bandwidth-bound pass by a third; the
// unaligned head and the remainder run as R says.
template <typename scalar_t, Remainder R = Remainder::kVector, typename Body>
inline void store_lanes(scalar_t* dst, int64_t n, bool stream, const Body& body) {
  if constexpr (kStreams<scalar_t>) {
    if (stream) {
      using V = Vec<scalar_t>;
      constexpr auto kAlign = static_cast<uintptr_t>(sizeof(V));
      const auto misaligned = static_cast<int64_t>(reinterpret_cast<uintptr_t>(dst) % kAlign);
      const int64_t head = misaligned == 0 ? 0 : std::min<int64_t>(n, (kAlign - misaligned) / sizeof(scalar_t));
      const auto part = [&](int64_t start, int64_t count) {
        if constexpr (R == Remainder::kVector) {
          const PartialLane<scalar_t> lane{count};
          lane.store(dst + start, body(lane, start));
        } else {
          for (int64_t j = start; j < start + count; ++j) {
            dst[j] = static_cast<scalar_t>(body(ScalarLane<scalar_t>{}, j));
          }
        }
      };
      if (head > 0) part(0, head);
      int64_t i = head;
      for (; i + V::size() <= n; i += V::size()) store_stream(dst + i, body(FullLane<scalar_t>{V::size()}, i));
      if (i < n) part(i, n - i);
      _mm_sfence();
      return;
    }
  }
  for_lanes<scalar_t, R>(n, [&](auto lane, int64_t i) { lane.store(dst + i, body(lane, i)); });
}

}  // namespace invk::cpu
