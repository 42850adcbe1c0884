#pragma once
// Stands in for NCCL's header in builds that run the Cuda backend on the CPU (tests/cuda_on_cpu):
// the calls hatch::NcclCollective makes, carried out over MPI between the processes of the job
// (hatch_nccl_on_cpu_tests runs under mpirun; each rank's emulated device memory is its own
// process's). An operation runs when it is issued, on the host, after the device work it depends
// on (what its stream must wait for, as NCCL's kernel would) and with the device allocations it
// names opened for it as for a kernel (hatch_cuda_on_cpu::DeviceAccess).
//
// What it refuses, as NCCL does: an id that ncclGetUniqueId did not make, a rank outside
// [0, nranks) or a communicator whose ranks do not add up to nranks, two ranks on one machine
// with the same device ("Duplicate GPU detected"), buffers that are not device memory or that
// run past their allocation, unknown data types and reductions, a null communicator.
//
// What it cannot show: a collective that some rank never joins blocks here in MPI (NCCL's
// asynchronous errors and hatch's time-out on them are not exercised); every communicator is
// made by a split of MPI_COMM_WORLD, so every process of the job must create it, as hatch's do.
#include <mpi.h>
#include <unistd.h>

#include <algorithm>
#include <cstddef>
#include <cstdint>
#include <cstdio>
#include <cstring>
#include <functional>
#include <string>
#include <vector>

#include "cuda_on_cpu.hpp"

enum ncclResult_t {
  ncclSuccess = 0,
  ncclUnhandledCudaError = 1,
  ncclSystemError = 2,
  ncclInternalError = 3,
  ncclInvalidArgument = 4,
  ncclInvalidUsage = 5,
  ncclRemoteError = 6,
  ncclInProgress = 7
};
enum ncclDataType_t {
  ncclInt8 = 0,
  ncclChar = 0,
  ncclUint8 = 1,
  ncclInt32 = 2,
  ncclInt = 2,
  ncclUint32 = 3,
  ncclInt64 = 4,
  ncclUint64 = 5,
  ncclFloat16 = 6,
  ncclHalf = 6,
  ncclFloat32 = 7,
  ncclFloat = 7,
  ncclFloat64 = 8,
  ncclDouble = 8
};
enum ncclRedOp_t { ncclSum = 0, ncclProd = 1, ncclMax = 2, ncclMin = 3, ncclAvg = 4 };

#define NCCL_UNIQUE_ID_BYTES 128
struct ncclUniqueId {
  char internal[NCCL_UNIQUE_ID_BYTES];
};
struct ncclComm {
  MPI_Comm mpi = MPI_COMM_NULL;
  int rank = 0, size = 0, device = 0;
};
using ncclComm_t = ncclComm*;

namespace hatch_cuda_on_cpu::nccl {

inline constexpr char kMagic[] = "hatch cuda_on_cpu nccl id ";

inline ncclResult_t warn(ncclResult_t r, const std::string& why) {
  std::fprintf(stderr, "cuda_on_cpu nccl: %s\n", why.c_str());
  return r;
}
inline bool mpi_ready() {
  int init = 0, fin = 0;
  MPI_Initialized(&init);
  MPI_Finalized(&fin);
  return init && !fin;
}
// (float16 has no MPI type: NCCL takes it, this stand-in does not)
inline MPI_Datatype mpi_type(ncclDataType_t t) {
  switch (t) {
    case ncclInt8: return MPI_INT8_T;
    case ncclUint8: return MPI_UINT8_T;
    case ncclInt32: return MPI_INT32_T;
    case ncclUint32: return MPI_UINT32_T;
    case ncclInt64: return MPI_INT64_T;
    case ncclUint64: return MPI_UINT64_T;
    case ncclFloat32: return MPI_FLOAT;
    case ncclFloat64: return MPI_DOUBLE;
    default: return MPI_DATATYPE_NULL;
  }
}
inline std::size_t type_bytes(ncclDataType_t t) {
  switch (t) {
    case ncclInt8:
    case ncclUint8: return 1;
    case ncclInt32:
    case ncclUint32:
    case ncclFloat32: return 4;
    default: return 8;
  }
}
// (ncclAvg divides after the sum on the device: not stood in for)
inline MPI_Op mpi_op(ncclRedOp_t op) {
  switch (op) {
    case ncclSum: return MPI_SUM;
    case ncclProd: return MPI_PROD;
    case ncclMax: return MPI_MAX;
    case ncclMin: return MPI_MIN;
    default: return MPI_OP_NULL;
  }
}
// The checks every collective makes on its buffers, as NCCL's argument checks do.
inline ncclResult_t check_buffer(const void* p, std::size_t bytes, const char* op, const char* which) {
  if (bytes && !on_device(p, bytes))
    return warn(ncclInvalidArgument, std::string(op) + ": " + which + " (" + std::to_string(bytes) +
                                         " bytes) is not inside one device allocation");
  return ncclSuccess;
}
// MPI counts are ints: a call over more elements runs in pieces.
inline constexpr std::size_t kPiece = std::size_t(1) << 30;
template <class F>
ncclResult_t in_pieces(std::size_t count, std::size_t elem, F&& f) {
  for (std::size_t at = 0; at < count || (count == 0 && at == 0); at += kPiece) {
    const std::size_t n = std::min(kPiece, count - at);
    if (f(at * elem, int(n)) != MPI_SUCCESS) return warn(ncclSystemError, "an MPI call failed");
    if (count == 0) break;
  }
  return ncclSuccess;
}

}  // namespace hatch_cuda_on_cpu::nccl

inline const char* ncclGetErrorString(ncclResult_t r) {
  switch (r) {
    case ncclSuccess: return "no error";
    case ncclUnhandledCudaError: return "unhandled cuda error (run with NCCL_DEBUG=INFO for details)";
    case ncclSystemError: return "unhandled system error (run with NCCL_DEBUG=INFO for details)";
    case ncclInternalError: return "internal error - please report this issue to the NCCL developers";
    case ncclInvalidArgument: return "invalid argument (run with NCCL_DEBUG=WARN for details)";
    case ncclInvalidUsage: return "invalid usage (run with NCCL_DEBUG=WARN for details)";
    case ncclRemoteError: return "remote process exited or there was a network error";
    case ncclInProgress: return "NCCL operation in progress";
  }
  return "unknown result code";
}

inline ncclResult_t ncclGetUniqueId(ncclUniqueId* id) {
  namespace n = hatch_cuda_on_cpu::nccl;
  if (!id) return n::warn(ncclInvalidArgument, "ncclGetUniqueId: null id");
  static std::uint64_t made = 0;
  std::memset(id->internal, 0, sizeof id->internal);
  std::snprintf(id->internal, sizeof id->internal, "%s%ld:%llu", n::kMagic, long(getpid()),
                (unsigned long long)made++);
  return ncclSuccess;
}

inline ncclResult_t ncclCommInitRank(ncclComm_t* comm, int nranks, ncclUniqueId id, int rank) {
  namespace n = hatch_cuda_on_cpu::nccl;
  if (!comm) return n::warn(ncclInvalidArgument, "ncclCommInitRank: null communicator pointer");
  *comm = nullptr;
  if (!n::mpi_ready()) return n::warn(ncclInvalidUsage, "ncclCommInitRank: this stand-in runs over MPI: call it inside MPI_Init .. MPI_Finalize");
  if (std::strncmp(id.internal, n::kMagic, sizeof n::kMagic - 1) != 0)
    return n::warn(ncclInvalidArgument, "ncclCommInitRank: the id was not made by ncclGetUniqueId");
  if (nranks < 1 || rank < 0 || rank >= nranks)
    return n::warn(ncclInvalidArgument, "ncclCommInitRank: rank " + std::to_string(rank) + " of " +
                                            std::to_string(nranks) + " ranks");
  // The processes that hold the same id make one communicator, ordered by their NCCL rank.
  const std::size_t h = std::hash<std::string>{}(std::string(id.internal, strnlen(id.internal, sizeof id.internal)));
  MPI_Comm c = MPI_COMM_NULL;
  if (MPI_Comm_split(MPI_COMM_WORLD, int(h & 0x3fffffff), rank, &c) != MPI_SUCCESS)
    return n::warn(ncclSystemError, "ncclCommInitRank: MPI_Comm_split failed");
  int size = 0, mpi_rank = 0;
  MPI_Comm_size(c, &size);
  MPI_Comm_rank(c, &mpi_rank);
  int device = 0;
  (void)cudaGetDevice(&device);
  std::vector<int> ranks(std::size_t(size), -1);
  MPI_Allgather(&rank, 1, MPI_INT, ranks.data(), 1, MPI_INT, c);
  ncclResult_t r = ncclSuccess;
  if (size != nranks) {
    r = n::warn(ncclInvalidArgument, "ncclCommInitRank: " + std::to_string(size) + " ranks joined, nranks is " +
                                         std::to_string(nranks));
  } else {
    for (int i = 0; i < size; ++i)
      if (ranks[std::size_t(i)] != i) r = n::warn(ncclInvalidArgument, "ncclCommInitRank: rank " +
                                                                           std::to_string(ranks[std::size_t(i)]) +
                                                                           " given twice or out of order");
  }
  // One device per rank on a machine, as NCCL requires.
  MPI_Comm node = MPI_COMM_NULL;
  MPI_Comm_split_type(c, MPI_COMM_TYPE_SHARED, mpi_rank, MPI_INFO_NULL, &node);
  int local = 0;
  MPI_Comm_size(node, &local);
  std::vector<int> devices(std::size_t(local), -1), world_ranks(std::size_t(local), -1);
  MPI_Allgather(&device, 1, MPI_INT, devices.data(), 1, MPI_INT, node);
  MPI_Allgather(&rank, 1, MPI_INT, world_ranks.data(), 1, MPI_INT, node);
  MPI_Comm_free(&node);
  for (int i = 0; i < local && r == ncclSuccess; ++i)
    for (int j = 0; j < i; ++j)
      if (devices[std::size_t(i)] == devices[std::size_t(j)])
        r = n::warn(ncclInvalidUsage, "Duplicate GPU detected : rank " + std::to_string(world_ranks[std::size_t(i)]) +
                                          " and rank " + std::to_string(world_ranks[std::size_t(j)]) +
                                          " both on CUDA device " + std::to_string(devices[std::size_t(i)]));
  if (r != ncclSuccess) {
    MPI_Comm_free(&c);
    return r;
  }
  *comm = new ncclComm{c, rank, nranks, device};
  return ncclSuccess;
}

inline ncclResult_t ncclCommDestroy(ncclComm_t comm) {
  if (!comm) return hatch_cuda_on_cpu::nccl::warn(ncclInvalidArgument, "ncclCommDestroy: null communicator");
  if (hatch_cuda_on_cpu::nccl::mpi_ready()) MPI_Comm_free(&comm->mpi);
  delete comm;
  return ncclSuccess;
}
// The other ranks may be stuck in a collective: the MPI communicator is left as it is (freeing
// it is a collective call), the process is about to stop.
inline ncclResult_t ncclCommAbort(ncclComm_t comm) {
  if (!comm) return hatch_cuda_on_cpu::nccl::warn(ncclInvalidArgument, "ncclCommAbort: null communicator");
  delete comm;
  return ncclSuccess;
}
inline ncclResult_t ncclCommGetAsyncError(ncclComm_t comm, ncclResult_t* result) {
  if (!comm || !result) return hatch_cuda_on_cpu::nccl::warn(ncclInvalidArgument, "ncclCommGetAsyncError: null argument");
  *result = ncclSuccess;  // every operation finished when it was issued
  return ncclSuccess;
}

inline ncclResult_t ncclAllReduce(const void* send, void* recv, std::size_t count, ncclDataType_t type,
                                  ncclRedOp_t op, ncclComm_t comm, cudaStream_t stream) {
  namespace n = hatch_cuda_on_cpu::nccl;
  if (!comm) return n::warn(ncclInvalidArgument, "ncclAllReduce: null communicator");
  const MPI_Datatype t = n::mpi_type(type);
  const MPI_Op o = n::mpi_op(op);
  if (t == MPI_DATATYPE_NULL || o == MPI_OP_NULL)
    return n::warn(ncclInvalidArgument, "ncclAllReduce: data type " + std::to_string(int(type)) + " or operation " +
                                            std::to_string(int(op)) + " not stood in for");
  const std::size_t elem = n::type_bytes(type), bytes = count * elem;
  if (const ncclResult_t r = n::check_buffer(send, bytes, "ncclAllReduce", "sendbuff"); r != ncclSuccess) return r;
  if (const ncclResult_t r = n::check_buffer(recv, bytes, "ncclAllReduce", "recvbuff"); r != ncclSuccess) return r;
  auto* out = static_cast<unsigned char*>(recv);
  const auto* in = static_cast<const unsigned char*>(send);
  // on its stream, after the work it depends on there (and not after other work: a buffer
  // produced on a stream NCCL's does not wait for is read as it is)
  ncclResult_t r = ncclSuccess;
  hatch_cuda_on_cpu::run_now(stream, [&] {
    hatch_cuda_on_cpu::DeviceAccess open{send, recv};
    r = n::in_pieces(count, elem, [&](std::size_t off, int k) {
      return MPI_Allreduce(send == recv ? MPI_IN_PLACE : in + off, out + off, k, t, o, comm->mpi);
    });
  });
  return r;
}

inline ncclResult_t ncclBroadcast(const void* send, void* recv, std::size_t count, ncclDataType_t type, int root,
                                  ncclComm_t comm, cudaStream_t stream) {
  namespace n = hatch_cuda_on_cpu::nccl;
  if (!comm) return n::warn(ncclInvalidArgument, "ncclBroadcast: null communicator");
  if (root < 0 || root >= comm->size)
    return n::warn(ncclInvalidArgument, "ncclBroadcast: root " + std::to_string(root) + " of " +
                                            std::to_string(comm->size) + " ranks");
  const MPI_Datatype t = n::mpi_type(type);
  if (t == MPI_DATATYPE_NULL)
    return n::warn(ncclInvalidArgument, "ncclBroadcast: data type " + std::to_string(int(type)) + " not stood in for");
  const std::size_t elem = n::type_bytes(type), bytes = count * elem;
  if (comm->rank == root)
    if (const ncclResult_t r = n::check_buffer(send, bytes, "ncclBroadcast", "sendbuff"); r != ncclSuccess) return r;
  if (const ncclResult_t r = n::check_buffer(recv, bytes, "ncclBroadcast", "recvbuff"); r != ncclSuccess) return r;
  auto* out = static_cast<unsigned char*>(recv);
  ncclResult_t r = ncclSuccess;
  hatch_cuda_on_cpu::run_now(stream, [&] {
    hatch_cuda_on_cpu::DeviceAccess open{send, recv};
    if (comm->rank == root && send != recv && bytes) std::memmove(recv, send, bytes);
    r = n::in_pieces(count, elem, [&](std::size_t off, int k) { return MPI_Bcast(out + off, k, t, root, comm->mpi); });
  });
  return r;
}
