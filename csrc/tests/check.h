#pragma once

// Minimal check helpers of the C++ unit tests: every check counts as passed or failed, and main()
// prints "N passed, M failed" and fails when M > 0.

#include <cmath>
#include <cstdio>

namespace invk_test {

inline int g_passed = 0;
inline int g_failed = 0;

inline void check(bool ok, const char* what, const char* file, int line) {
  if (ok) {
    ++g_passed;
  } else {
    ++g_failed;
    std::printf("FAILED %s:%d: %s\n", file, line, what);
  }
}

inline void check_close(double actual, double expected, double rtol, double atol, const char* what, const char* file,
                        int line) {
  const bool ok = std::isfinite(actual) && std::isfinite(expected) &&
                  std::fabs(actual - expected) <= atol + rtol * std::fabs(expected);
  if (ok) {
    ++g_passed;
  } else {
    ++g_failed;
    std::printf("FAILED %s:%d: %s: got %.17g, expected %.17g (rtol %g, atol %g)\n", file, line, what, actual,
                expected, rtol, atol);
  }
}

void run_coupling_math_tests();
void run_actnorm_math_tests();
void run_spline_math_tests();

}  // namespace invk_test

#define CHECK(...) ::invk_test::check((__VA_ARGS__), #__VA_ARGS__, __FILE__, __LINE__)
#define CHECK_CLOSE(actual, expected, rtol, atol) \
  ::invk_test::check_close((actual), (expected), (rtol), (atol), #actual, __FILE__, __LINE__)
