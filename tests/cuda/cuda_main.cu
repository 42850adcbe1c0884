// The doctest main of hatch_cuda_tests (kept apart so the test files compile independently).
#define DOCTEST_CONFIG_IMPLEMENT_WITH_MAIN
#include <doctest/doctest.h>
