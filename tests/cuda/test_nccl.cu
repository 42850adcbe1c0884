// NcclCollective on CUDA device buffers (hatch_nccl_tests; main in test_nccl_main.cpp). Every
// rank of the MPI job runs these on its own GPU:
//   - in-place device all-reduce of floats and doubles, and a device broadcast, against the
//     sums computed on the host;
//   - allreduce_sum<Cuda> / broadcast<Cuda> (what fit calls) take the device path with NCCL
//     (the staging vector stays empty; one host wait counted) and the host path with the plain
//     MPI collective;
//   - data-parallel fit on Cuda (2 ranks or more): every gradient all-reduce reaches NCCL in device memory (none
//     goes through a host float all-reduce), and the weights equal those of the same fit whose
//     gradients are staged through host memory and MPI, to float tolerance;
//   - after Cuda::set_stream(s) (non-blocking), NCCL on s (NcclOptions::stream) sums what hatch
//     wrote there;
//   - two ranks of one machine given the same GPU: every rank throws (2 ranks or more).
#include <hatch/cuda.hpp>
#include <hatch/distributed/nccl.hpp>

#include <cmath>
#include <cstdio>
#include <memory>
#include <string>
#include <vector>

#include "../learnable_set.hpp"

namespace {
using namespace hatch;

int g_failures = 0;
#define NCCL_TEST_CHECK(cond, ...)                                             \
  do {                                                                         \
    if (!(cond)) {                                                             \
      ++g_failures;                                                            \
      std::fprintf(stderr, "FAIL %s:%d: %s: ", __FILE__, __LINE__, #cond);     \
      std::fprintf(stderr, __VA_ARGS__);                                       \
      std::fprintf(stderr, "\n");                                              \
    }                                                                          \
  } while (0)

template <class T>
void device_allreduce(Collective& c) {
  const int r = c.rank(), R = c.size();
  const std::size_t n = (std::size_t(1) << 20) + 3;  // not a multiple of anything NCCL likes
  std::vector<T> h(n), back(n);
  for (std::size_t i = 0; i < n; ++i) h[i] = T(r + 1) * T(i % 1000) + T(0.25);
  T* d = nullptr;
  HATCH_CUDA_CHECK(cudaMalloc(&d, n * sizeof(T)));
  HATCH_CUDA_CHECK(cudaMemcpy(d, h.data(), n * sizeof(T), cudaMemcpyHostToDevice));
  NCCL_TEST_CHECK(c.allreduce_sum_device(d, n), "the device all-reduce was not taken");
  HATCH_CUDA_CHECK(cudaMemcpy(back.data(), d, n * sizeof(T), cudaMemcpyDeviceToHost));
  HATCH_CUDA_CHECK(cudaFree(d));
  std::size_t wrong = 0;
  for (std::size_t i = 0; i < n; ++i) {
    const double expect = double(R) * (R + 1) / 2 * double(i % 1000) + 0.25 * R;
    wrong += std::abs(double(back[i]) - expect) > 1e-6 * std::max(1.0, expect);
  }
  NCCL_TEST_CHECK(wrong == 0, "%zu of %zu sums wrong (%s)", wrong, n, sizeof(T) == 4 ? "float" : "double");
}

void device_broadcast(Collective& c) {
  std::vector<unsigned char> h(100003), back(h.size());
  for (std::size_t i = 0; i < h.size(); ++i) h[i] = (unsigned char)(c.rank() == 0 ? i * 7 : 0);
  void* d = nullptr;
  HATCH_CUDA_CHECK(cudaMalloc(&d, h.size()));
  HATCH_CUDA_CHECK(cudaMemcpy(d, h.data(), h.size(), cudaMemcpyHostToDevice));
  NCCL_TEST_CHECK(c.broadcast_device(d, h.size()), "the device broadcast was not taken");
  HATCH_CUDA_CHECK(cudaMemcpy(back.data(), d, back.size(), cudaMemcpyDeviceToHost));
  HATCH_CUDA_CHECK(cudaFree(d));
  std::size_t wrong = 0;
  for (std::size_t i = 0; i < back.size(); ++i) wrong += back[i] != (unsigned char)(i * 7);
  NCCL_TEST_CHECK(wrong == 0, "%zu bytes differ from rank 0's", wrong);
}

// What fit calls, on a Cuda tensor: the device path with NCCL, host staging without.
void backend_helpers(Collective& nccl, Collective& host) {
  const int R = nccl.size();
  for (Collective* c : {&nccl, &host}) {
    const bool device = c == &nccl;
    Tensor<Cuda> t;
    std::vector<float> h(4099);
    for (std::size_t i = 0; i < h.size(); ++i) h[i] = float(i % 13) + float(nccl.rank());
    t.from_host(h, {int(h.size())});
    std::vector<float> staging;
    const std::int64_t waits = Cuda::host_waits();
    allreduce_sum<Cuda>(*c, t.data(), h.size(), staging);
    NCCL_TEST_CHECK(staging.empty() == device, "%s: staging holds %zu values", device ? "nccl" : "mpi",
                    staging.size());
    // NCCL's all-reduce waits for the device once (the poll for its result), and says so
    if (device)
      NCCL_TEST_CHECK(Cuda::host_waits() == waits + 1, "the NCCL all-reduce counted %lld host waits, expected 1",
                      (long long)(Cuda::host_waits() - waits));
    const auto back = t.to_host();
    std::size_t wrong = 0;
    for (std::size_t i = 0; i < h.size(); ++i)
      wrong += back[i] != float(R * int(i % 13) + R * (R - 1) / 2);
    NCCL_TEST_CHECK(wrong == 0, "%s: %zu sums wrong", device ? "nccl" : "mpi", wrong);
    staging.clear();
    broadcast<Cuda>(*c, t.data(), h.size(), staging);
    NCCL_TEST_CHECK(staging.empty() == device, "broadcast<Cuda> through %s: staging holds %zu values",
                    device ? "nccl" : "mpi", staging.size());
  }
}

// Forwards to another collective and counts which calls fit makes.
struct Counting final : Collective {
  explicit Counting(std::shared_ptr<Collective> c) : inner(std::move(c)) {}
  int rank() const override { return inner->rank(); }
  int size() const override { return inner->size(); }
  void allreduce_sum(float* d, std::size_t n) override { ++host_float, inner->allreduce_sum(d, n); }
  void allreduce_sum(double* d, std::size_t n) override { inner->allreduce_sum(d, n); }
  void broadcast(void* d, std::size_t bytes) override { ++host_broadcast, inner->broadcast(d, bytes); }
  void barrier() override { inner->barrier(); }
  void abort(int code) override { inner->abort(code); }
  bool allreduce_sum_device(float* d, std::size_t n) override {
    const bool taken = inner->allreduce_sum_device(d, n);
    device_float += taken;
    return taken;
  }
  bool allreduce_sum_device(double* d, std::size_t n) override { return inner->allreduce_sum_device(d, n); }
  bool broadcast_device(void* d, std::size_t bytes) override {
    const bool taken = inner->broadcast_device(d, bytes);
    device_broadcast += taken;
    return taken;
  }
  std::shared_ptr<Collective> inner;
  int host_float = 0, host_broadcast = 0, device_float = 0, device_broadcast = 0;
};

std::vector<float> fit_weights(std::shared_ptr<Collective> c) {
  const auto train = test::learnable_set(96, 1), test_set = test::learnable_set(40, 2);
  Model<presets::VitMicro, Cuda> model;
  Initializer init(3);
  model.reset_parameters(init);
  FitOptions o;
  o.epochs = 2;
  o.batch = 16;
  o.lr = 2e-3;
  o.clip = 1.0;
  o.progress = false;
  o.seed = 5;
  o.collective = std::move(c);
  fit(model, train, test_set, o);
  std::vector<float> w;
  model.visit([&](const std::string&, auto& p) {
    const auto h = p.value.to_host();
    w.insert(w.end(), h.begin(), h.end());
  }, "");
  return w;
}

void data_parallel_fit(const std::shared_ptr<Collective>& nccl, const std::shared_ptr<Collective>& host) {
  if (nccl->size() < 2) {  // fit reduces nothing in a job of one
    std::printf("data-parallel fit: needs 2 ranks, skipped\n");
    return;
  }
  auto counting = std::make_shared<Counting>(nccl);
  const auto on_device = fit_weights(counting);
  const auto staged = fit_weights(host);
  const int steps = 2 * (96 / 16);
  NCCL_TEST_CHECK(counting->device_float == steps, "%d gradient all-reduces in device memory, expected %d",
                  counting->device_float, steps);
  NCCL_TEST_CHECK(counting->host_float == 0, "%d float all-reduces went through host memory", counting->host_float);
  NCCL_TEST_CHECK(counting->device_broadcast == 1 && counting->host_broadcast == 0,
                  "the initial weights: %d device and %d host broadcasts", counting->device_broadcast,
                  counting->host_broadcast);
  double sum = 0, worst = 0;
  for (std::size_t i = 0; i < staged.size(); ++i) {
    sum += std::abs(double(on_device[i]) - staged[i]);
    worst = std::max(worst, std::abs(double(on_device[i]) - staged[i]));
  }
  const double mean = sum / double(staged.size());
  std::printf("rank %d: fit with NCCL vs host staging: mean |difference| %.3g, worst %.3g\n", nccl->rank(), mean,
              worst);
  NCCL_TEST_CHECK(on_device.size() == staged.size() && mean < 1e-6 && worst < 1e-4, "weights differ");
}
// After Cuda::set_stream(s), NCCL runs on s too (NcclOptions::stream): its all-reduce then follows
// the work hatch queued there. On the stand-ins (which run exactly what a wait needs) also the
// mistake the option is for: NCCL left on the legacy stream, which a non-blocking s is not
// ordered with, sums the buffer before hatch's fill has run (on a GPU that is a race).
void caller_stream(const std::shared_ptr<Collective>& host, int device) {
  const int r = host->rank(), R = host->size();
  cudaStream_t s = nullptr;
  HATCH_CUDA_CHECK(cudaStreamCreateWithFlags(&s, cudaStreamNonBlocking));
  Cuda::set_stream(s);
  {
    const std::size_t n = 1000;
    Tensor<Cuda> t;
    t.from_host(std::vector<float>(n, 0.f), {int(n)});
    NcclCollective on_s(host, NcclOptions{.device = device, .stream = s});
    Cuda::fill(t.data(), n, float(r + 10));
    NCCL_TEST_CHECK(on_s.allreduce_sum_device(t.data(), n), "the device all-reduce was not taken");
    const float expect = float(10 * R + R * (R - 1) / 2);
    const auto back = t.to_host();
    NCCL_TEST_CHECK(back[0] == expect && back[n - 1] == expect, "on the caller's stream: %g, expected %g",
                    double(back[0]), double(expect));
#if defined(HATCH_CUDA_ON_CPU)
    if (R >= 2) {  // (with one rank an all-reduce changes nothing, early or not)
      NcclCollective on_legacy(host, NcclOptions{.device = device});
      Cuda::fill(t.data(), n, float(r + 10));
      NCCL_TEST_CHECK(on_legacy.allreduce_sum_device(t.data(), n), "the device all-reduce was not taken");
      const auto early = t.to_host();
      NCCL_TEST_CHECK(early[0] != expect, "NCCL on the legacy stream waited for a non-blocking stream's fill");
    }
#endif
  }
  Cuda::reset_stream();
  HATCH_CUDA_CHECK(cudaStreamDestroy(s));
}

// Two ranks of one machine on the same GPU: NCCL refuses the communicator ("Duplicate GPU
// detected"), and every rank throws, naming the call, instead of one rank hanging.
void duplicate_device_refused(const std::shared_ptr<Collective>& host, int device) {
  if (host->size() < 2) return;
  std::string what;
  try {
    NcclCollective same(host, NcclOptions{.device = 0});
  } catch (const Error& e) {
    what = e.what();
  }
  HATCH_CUDA_CHECK(cudaSetDevice(device));
  NCCL_TEST_CHECK(what.find("ncclCommInitRank") != std::string::npos || what.find("could not set up NCCL") != std::string::npos,
                  "every rank on device 0: %s", what.empty() ? "no error" : what.c_str());
}
}  // namespace

// Runs the tests on this rank's GPU (`device`); returns the number of failed checks.
int run_nccl_tests(std::shared_ptr<hatch::Collective> host, int device) {
  auto nccl = std::make_shared<NcclCollective>(host, NcclOptions{.device = device});
  std::printf("rank %d of %d: NCCL on device %d (%s)\n", nccl->rank(), nccl->size(), nccl->device(),
              Cuda::device_name().c_str());
  device_allreduce<float>(*nccl);
  device_allreduce<double>(*nccl);
  device_broadcast(*nccl);
  backend_helpers(*nccl, *host);
  data_parallel_fit(nccl, host);
  caller_stream(host, device);
  duplicate_device_refused(host, device);
  return g_failures;
}
