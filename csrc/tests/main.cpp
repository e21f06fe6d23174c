// Entry point of the C++ unit tests of the shared host/device math (ctest: invk_math_tests).

#include <cstdio>

#include "check.h"

int main() {
  invk_test::run_coupling_math_tests();
  invk_test::run_actnorm_math_tests();
  invk_test::run_spline_math_tests();
  std::printf("%d passed, %d failed\n", invk_test::g_passed, invk_test::g_failed);
  return invk_test::g_failed == 0 ? 0 : 1;
}
