#pragma once
// Helpers shared by the tests: the public gradient checker (random tensors, parameter
// randomisation, finite differences) under hatch::test, relative errors, per-stage loops.
#include <doctest/doctest.h>

#include <algorithm>
#include <cmath>
#include <functional>
#include <limits>
#include <hatch/hatch.hpp>
#include <hatch/testing/gradcheck.hpp>
#include <omp.h>

#include <random>
#include <string>
#include <utility>
#include <vector>

#include "error_message.hpp"
#include "learnable_set.hpp"

namespace hatch::test {

// The gradient checker is public (hatch/testing/gradcheck.hpp), so users can check their layers.
using testing::check_parameter_grads;
using testing::compare_central_differences;
using testing::gradcheck;
using testing::GradReport;
using testing::random_tensor;
using testing::randomize_parameters;
using testing::zero_grads;

// Central differences in double for `layer` with random parameters (param_seed) on a random input
// (check_seed): every checked gradient entry within 1e-6 relative, the worst one reported.
template <class L>
void expect_gradients(L& layer, Shape in, bool training = false, int samples = 40, std::uint64_t param_seed = 7,
                      std::uint64_t check_seed = 3) {
  randomize_parameters(layer, param_seed);
  const auto rep = gradcheck(layer, in, training, check_seed, samples);
  INFO("worst: " << rep.worst);
  CHECK(rep.max_rel <= 1e-6);
}

// max |a - b| / max |b|: relative to the tensor's scale, so entries near zero do not dominate.
inline double rel_error(const std::vector<float>& a, const std::vector<float>& b) {
  double num = 0, den = 0;
  for (std::size_t i = 0; i < a.size(); ++i) {
    num = std::max(num, std::abs(double(a[i]) - double(b[i])));
    den = std::max(den, std::abs(double(b[i])));
  }
  return num / std::max(den, 1e-30);
}

// max |got - want| / (1 + |want|) against a double reference: relative for large values, absolute
// near zero; a NaN in `got` (an element never written) counts as infinitely wrong.
template <class T>
double max_error_vs(const std::vector<T>& got, const std::vector<double>& want) {
  REQUIRE(got.size() == want.size());
  double worst = 0;
  for (std::size_t i = 0; i < got.size(); ++i) {
    const double e = std::abs(double(got[i]) - want[i]) / (1.0 + std::abs(want[i]));
    if (std::isnan(e)) return std::numeric_limits<double>::infinity();
    worst = std::max(worst, e);
  }
  return worst;
}

// The largest |gradient| over a module's parameters (0 when it received none).
template <class M>
double max_abs_grad(M& module) {
  double m = 0;
  module.visit(
      [&](const std::string&, Parameter<typename M::backend>& p) {
        for (double g : p.grad.to_host()) m = std::max(m, std::abs(g));
      },
      "");
  return m;
}

// f(std::integral_constant<std::size_t, I>{}) for I = 0..K-1: a loop over a model's stages.
template <std::size_t K, class F>
void for_each_index(F&& f) {
  [&]<std::size_t... I>(std::index_sequence<I...>) {
    (f(std::integral_constant<std::size_t, I>{}), ...);
  }(std::make_index_sequence<K>{});
}

// Tiny models run faster on one thread than on two, and much faster than on two on a loaded
// machine, where OpenMP's barriers wait for a descheduled thread. Restores the count after.
struct OneThread {
  int before = omp_get_max_threads();
  OneThread() { omp_set_num_threads(1); }
  ~OneThread() { omp_set_num_threads(before); }
};
// The other way round: at least two threads, so that a test reaches the paths that split work
// over threads even on a one-core machine. Restores the count after.
struct TwoThreads {
  int before = omp_get_max_threads();
  TwoThreads() { omp_set_num_threads(std::max(before, 2)); }
  ~TwoThreads() { omp_set_num_threads(before); }
};

// Cpu's and Cpu64's GEMMs through the given kernel (Eigen's or OpenBLAS's) while it lives, so that
// a test covers both whatever kernel the machine would choose (Cpu::gemm_kernel_choice).
struct WithGemmKernel {
  detail::GemmKernel before32 = Cpu::gemm_kernel(), before64 = Cpu64::gemm_kernel();
  explicit WithGemmKernel(detail::GemmKernel k) {
    Cpu::gemm_kernel_choice().store(k);
    Cpu64::gemm_kernel_choice().store(k);
  }
  ~WithGemmKernel() {
    Cpu::gemm_kernel_choice().store(before32);
    Cpu64::gemm_kernel_choice().store(before64);
  }
};
// The kernels a build has: Eigen's, and OpenBLAS's when built with it.
inline std::vector<detail::GemmKernel> gemm_kernels() {
#if defined(HATCH_WITH_OPENBLAS)
  return {detail::GemmKernel::eigen, detail::GemmKernel::openblas};
#else
  return {detail::GemmKernel::eigen};
#endif
}

}  // namespace hatch::test
