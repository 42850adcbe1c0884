// The doctest main of hatch_cuda_tests (kept apart so the test files compile independently).
#define DOCTEST_CONFIG_IMPLEMENT_WITH_MAIN
#include <doctest/doctest.h>

#include <cuda_runtime.h>

#include <cstdio>
#include <cstdlib>
#include <string>

namespace {

// A kernel that faults (an illegal address, say) ends the CUDA context: every later CUDA call
// fails with the same error, so every later test case would fail too, and the error surfaces at
// whatever call comes next, often in another test case than the one whose work faulted. This
// listener waits for the device at the end of each test case; if the device failed, it names the
// test case whose work (or an earlier one's) failed, and stops the run there. Without a device
// it does nothing (the tests skip, or fail under HATCH_EXPECT_GPU=1, on their own).
struct DeviceFaultListener : doctest::IReporter {
  explicit DeviceFaultListener(const doctest::ContextOptions&) {
    int n = 0;
    has_device_ = cudaGetDeviceCount(&n) == cudaSuccess && n > 0;
    (void)cudaGetLastError();
  }
  void report_query(const doctest::QueryData&) override {}
  void test_run_start() override {}
  void test_run_end(const doctest::TestRunStats&) override {}
  void test_case_start(const doctest::TestCaseData& t) override { name_ = t.m_name; }
  void test_case_reenter(const doctest::TestCaseData&) override {}
  void test_case_end(const doctest::CurrentTestCaseStats&) override {
    if (!has_device_) return;
    const cudaError_t e = cudaDeviceSynchronize();
    if (e == cudaSuccess) return;
    std::fprintf(stderr,
                 "hatch_cuda_tests: the device failed by the end of test case \"%s\": %s (%s). Such a fault ends "
                 "the CUDA context and every later case would fail with it: stopping here.\n",
                 name_.c_str(), cudaGetErrorName(e), cudaGetErrorString(e));
    std::fflush(nullptr);
    std::_Exit(3);
  }
  void test_case_exception(const doctest::TestCaseException&) override {}
  void subcase_start(const doctest::SubcaseSignature&) override {}
  void subcase_end() override {}
  void log_assert(const doctest::AssertData&) override {}
  void log_message(const doctest::MessageData&) override {}
  void test_case_skipped(const doctest::TestCaseData&) override {}

 private:
  bool has_device_ = false;
  std::string name_;
};

}  // namespace

REGISTER_LISTENER("device_faults", 1, DeviceFaultListener);
