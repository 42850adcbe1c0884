#pragma once
// NCCL as the collective engine for CUDA device buffers (target hatch::nccl: nccl.h, libnccl and
// the CUDA runtime; compiles with nvcc or a host compiler). An NcclCollective wraps a host
// collective — normally the MpiCollective of the job — which it uses to hand rank 0's
// ncclUniqueId to every rank and for everything in host memory:
//
//   hatch::MpiSession mpi(argc, argv);
//   auto world = mpi.mpi_world();
//   auto nccl = std::make_shared<hatch::NcclCollective>(world, hatch::NcclCollective::Options{
//       .device = world->local_rank() % gpus_per_machine});
//   fit_options.collective = nccl;   // fit on Cuda: gradients summed in device memory
//
//   allreduce_sum_device, broadcast_device   NCCL, in place, on the stream of Options (the legacy
//                                            default stream, the one the Cuda backend runs on)
//   allreduce_sum, broadcast, barrier        the host collective (host memory)
//   abort                                    ncclCommAbort, then the host collective's abort
//
// A device collective returns when its result is in memory (the stream is polled like an MPI
// request, detail::poll_until), so it obeys the same time-out as MpiCollective
// (HATCH_COLLECTIVE_TIMEOUT, default 600 s): past it, this rank prints what it waited for and
// stops the job. NCCL needs one GPU per rank: two ranks cannot share a device.
#include <cuda_runtime.h>
#include <nccl.h>

#include <chrono>
#include <cstdio>
#include <cstdlib>
#include <memory>
#include <optional>
#include <string>

#include "hatch/backend/host_waits.hpp"
#include "hatch/core/error.hpp"
#include "hatch/distributed/collective.hpp"

namespace hatch {

struct NcclOptions {
  int device = -1;                                // the GPU of this rank (-1: the current device)
  cudaStream_t stream = nullptr;                  // where the buffers' producers run (0: the
                                                  // legacy default stream, with which the Cuda
                                                  // backend's own stream is ordered; after
                                                  // Cuda::set_stream(s), pass s)
  std::optional<std::chrono::seconds> timeout{};  // default: default_collective_timeout()
};

class NcclCollective final : public Collective {
 public:
  using Options = NcclOptions;

  // Collective over the ranks of `host`: every rank of it constructs one at the same time. A
  // rank without a usable GPU makes every rank throw (they agree through `host` first).
  explicit NcclCollective(std::shared_ptr<Collective> host, Options o = {})
      : host_(std::move(host)), stream_(o.stream) {
    require(host_ != nullptr, "NcclCollective", "needs a host collective (the job's MpiCollective)");
    timeout_ = checked_timeout(o.timeout ? *o.timeout : default_collective_timeout(), "NcclCollective");
    std::string problem;
    int count = 0;
    if (const cudaError_t e = cudaGetDeviceCount(&count); e != cudaSuccess || count == 0)
      problem = std::string("no CUDA device (") + (e == cudaSuccess ? "none found" : cudaGetErrorString(e)) + ")";
    else if (o.device >= count)
      problem = "device " + std::to_string(o.device) + " requested, " + std::to_string(count) + " present";
    else if (o.device >= 0)
      if (const cudaError_t e = cudaSetDevice(o.device); e != cudaSuccess)
        problem = std::string("cudaSetDevice: ") + cudaGetErrorString(e);
    if (problem.empty()) cudaGetDevice(&device_);
    agree(problem);

    struct {
      ncclUniqueId id;
      int status;
    } hello{};
    if (host_->rank() == 0) hello.status = int(ncclGetUniqueId(&hello.id));
    host_->broadcast(&hello, sizeof hello);
    require(hello.status == int(ncclSuccess), "NcclCollective",
            std::string("ncclGetUniqueId on rank 0: ") + ncclGetErrorString(ncclResult_t(hello.status)));
    const ncclResult_t r = ncclCommInitRank(&comm_, host_->size(), hello.id, host_->rank());
    if (r != ncclSuccess) comm_ = nullptr;
    agree(r == ncclSuccess ? std::string() : std::string("ncclCommInitRank: ") + ncclGetErrorString(r));
  }
  ~NcclCollective() override {
    if (comm_) ncclCommDestroy(comm_);
  }
  NcclCollective(const NcclCollective&) = delete;
  NcclCollective& operator=(const NcclCollective&) = delete;

  int rank() const override { return host_->rank(); }
  int size() const override { return host_->size(); }
  int device() const { return device_; }
  ncclComm_t comm() const { return comm_; }
  void set_timeout(std::chrono::seconds t) { timeout_ = checked_timeout(t, "NcclCollective::set_timeout"); }
  std::chrono::seconds timeout() const { return timeout_; }

  bool allreduce_sum_device(float* data, std::size_t n) override {
    const OnDevice on(device_);
    run(ncclAllReduce(data, data, n, ncclFloat, ncclSum, comm_, stream_), "all-reduce", n, "floats");
    return true;
  }
  bool allreduce_sum_device(double* data, std::size_t n) override {
    const OnDevice on(device_);
    run(ncclAllReduce(data, data, n, ncclDouble, ncclSum, comm_, stream_), "all-reduce", n, "doubles");
    return true;
  }
  bool broadcast_device(void* data, std::size_t bytes) override {
    const OnDevice on(device_);
    run(ncclBroadcast(data, data, bytes, ncclChar, 0, comm_, stream_), "broadcast", bytes, "bytes");
    return true;
  }

  void allreduce_sum(float* data, std::size_t n) override { host_->allreduce_sum(data, n); }
  void allreduce_sum(double* data, std::size_t n) override { host_->allreduce_sum(data, n); }
  void broadcast(void* data, std::size_t bytes) override { host_->broadcast(data, bytes); }
  void barrier() override { host_->barrier(); }
  void abort(int code) override {
    if (comm_) ncclCommAbort(comm_);
    comm_ = nullptr;
    host_->abort(code);
  }

 private:
  // Every rank learns whether any rank has a problem; all of them throw if one does.
  void agree(const std::string& problem) {
    double failed = problem.empty() ? 0 : 1;
    host_->allreduce_sum(&failed, 1);
    if (!problem.empty()) throw Error("NcclCollective: rank " + std::to_string(rank()) + ": " + problem);
    require(failed == 0, "NcclCollective", std::to_string(int(failed)) + " other rank(s) could not set up NCCL");
  }

  // The communicator's device current for the scope of a call (restored after): a stream of 0 is
  // the legacy stream of the current device, so the wait below would otherwise ask another
  // device's stream (done at once) after the caller switched devices.
  struct OnDevice {
    int previous = -1;
    explicit OnDevice(int device) {
      if (cudaGetDevice(&previous) == cudaSuccess && previous != device && cudaSetDevice(device) != cudaSuccess)
        throw Error("NcclCollective: cannot make device " + std::to_string(device) + " current");
    }
    ~OnDevice() {
      int now = -1;
      if (previous >= 0 && cudaGetDevice(&now) == cudaSuccess && now != previous) (void)cudaSetDevice(previous);
    }
    OnDevice(const OnDevice&) = delete;
    OnDevice& operator=(const OnDevice&) = delete;
  };

  // Waits for an enqueued NCCL call to finish on the stream, within the time-out (a host wait
  // for the device, counted as the Cuda backend counts its own: Cuda::host_waits()).
  void run(ncclResult_t enqueued, const char* op, std::size_t count, const char* unit) {
    if (enqueued != ncclSuccess) fail(op, count, unit, std::string("failed: ") + ncclGetErrorString(enqueued));
    ++cuda_detail::host_waits();
    std::string error;
    const bool done = detail::poll_until([&] {
      const cudaError_t e = cudaStreamQuery(stream_);
      if (e == cudaSuccess) return true;
      if (e != cudaErrorNotReady) {
        error = std::string("failed on the stream: ") + cudaGetErrorString(e);
        return true;
      }
      ncclResult_t async = ncclSuccess;
      ncclCommGetAsyncError(comm_, &async);
      if (async != ncclSuccess && async != ncclInProgress) {
        error = std::string("failed: ") + ncclGetErrorString(async);
        return true;
      }
      return false;
    }, spin_, timeout_);
    if (!done)
      fail(op, count, unit, "timed out after " + std::to_string(timeout_.count()) +
                                " s: not every rank joined it (a rank is stuck or gone; the limit is "
                                "HATCH_COLLECTIVE_TIMEOUT or NcclCollective::set_timeout)");
    if (!error.empty()) fail(op, count, unit, error);
  }

  [[noreturn]] void fail(const char* op, std::size_t count, const char* unit, const std::string& why) {
    std::fprintf(stderr, "hatch: NCCL %s of %zu %s on rank %d of %d (device %d) %s. Aborting the job.\n", op, count,
                 unit, rank(), size(), device_, why.c_str());
    std::fflush(stderr);
    abort(3);
    std::abort();  // the host collective's abort does not return
  }

  std::shared_ptr<Collective> host_;
  cudaStream_t stream_;
  std::chrono::seconds timeout_{600};
  std::chrono::microseconds spin_{50000};
  ncclComm_t comm_ = nullptr;
  int device_ = -1;
};

}  // namespace hatch
