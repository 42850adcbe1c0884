#pragma once
// What a training step needs so that the host waits for the device at most once per step:
//
//  - StepScalars<B>: a few double-precision values a step reduces (the loss, the number of
//    correct predictions, the squared gradient norm), computed where the backend computes and
//    read by the host together, with one wait. Gradient clipping reads the norm where it lies,
//    so the host never needs it.
//  - HostStaging<B>: host memory a batch is assembled in and uploaded from without waiting
//    (pinned memory on a GPU, so the copy is asynchronous and the host goes on launching work).
//
// As in fused.hpp, a backend opts in with static members; any other backend (Cpu, Cpu64) runs the
// definitions below, which compute each value at once with the concept's primitives, so results
// are bit-identical to calling those primitives directly. The members, all or none of a group:
//
//   scalars (values in backend memory, doubles):
//     static double* allocate_scalars(std::size_t n);
//     static void deallocate_scalars(double* p, std::size_t n) noexcept;
//     static void zero_scalars(double* p, std::size_t n);
//     static void read_scalars(double* host, const double* p, std::size_t n);   // waits: the sync point
//     static void softmax_cross_entropy_into(double* out, T* dz, const T* z, const T* t, int rows,
//                                            int cols, T scale, double divisor); // *out = sum / divisor
//     static void argmax_matches_into(double* out, const T* z, const T* t, int rows, int cols);
//     static void sum_squares_into(double* out, const T* x, std::size_t n);
//     static void clip_to_norm(T* g, std::size_t n, const double* sumsq, double max_norm);
//   and, to wait for a step's values while later steps are already queued (fit reads step i's
//   values after enqueuing step i + 1), a nested type:
//     struct ScalarFetch {                        // one copy of n scalars to the host in flight
//       explicit ScalarFetch(std::size_t n);
//       void start(const double* p);              // enqueue the copy, return at once
//       const double* wait();                     // wait for that copy only: the sync point
//     };
//   staging (page-locked host memory):
//     static T* allocate_pinned(std::size_t n);
//     static void deallocate_pinned(T* p, std::size_t n) noexcept;
//     static void upload_async(T* dst, const T* pinned_src, std::size_t n);  // does not wait
//
// Ordering: everything a backend enqueues runs in order (Cuda: one stream), so a value written
// into a slot is there when a later copy of the slots runs, and a staged upload has finished by
// the time the host has the values of a fetch queued after it. HostStaging's contract follows:
// refill a staging buffer only after values() of a fetch (or any other wait) queued after its
// last upload. fit alternates two of each, so that it can wait for step i while step i + 1 runs.
#include <algorithm>
#include <cmath>
#include <cstddef>
#include <cstdint>
#include <initializer_list>
#include <iterator>
#include <optional>
#include <string>
#include <utility>
#include <vector>

#include "hatch/backend/concept.hpp"
#include "hatch/core/error.hpp"
#include "hatch/tensor.hpp"

namespace hatch {

template <class B>
concept HasBackendScalars = requires(double* d, const double* cd, typename B::Scalar* y, const typename B::Scalar* x,
                                     typename B::Scalar a, std::size_t n, int i) {
  { B::allocate_scalars(n) } -> std::same_as<double*>;
  B::deallocate_scalars(d, n);
  B::zero_scalars(d, n);
  B::read_scalars(d, cd, n);
  B::softmax_cross_entropy_into(d, y, x, x, i, i, a, 1.0);
  B::argmax_matches_into(d, x, x, i, i);
  B::sum_squares_into(d, x, n);
  B::clip_to_norm(y, n, cd, 1.0);
};

template <class B>
concept HasScalarFetch = HasBackendScalars<B> && requires(typename B::ScalarFetch f, const double* p) {
  requires std::constructible_from<typename B::ScalarFetch, std::size_t>;
  f.start(p);
  { f.wait() } -> std::same_as<const double*>;
};

template <class B>
concept HasPinnedStaging = requires(typename B::Scalar* y, const typename B::Scalar* x, std::size_t n) {
  { B::allocate_pinned(n) } -> std::same_as<typename B::Scalar*>;
  B::deallocate_pinned(y, n);
  B::upload_async(y, x, n);
};

// The index of the largest value of a row, the first one on ties (std::max_element's rule, which
// backends with their own argmax_matches_into follow too).
template <class T>
int argmax_row(const T* row, int cols) {
  return int(std::max_element(row, row + cols) - row);
}

namespace detail {
template <class B>
struct FetchType {
  struct None {
    explicit None(std::size_t) {}
  };
  using type = None;
};
template <class B>
  requires HasScalarFetch<B>
struct FetchType<B> {
  using type = typename B::ScalarFetch;
};
}  // namespace detail
template <class B>
using FetchOf = typename detail::FetchType<B>::type;

template <Backend B>
class StepScalars {
 public:
  using T = typename B::Scalar;
  static constexpr bool on_backend = HasBackendScalars<B>;
  static constexpr bool async_fetch = HasScalarFetch<B>;

  explicit StepScalars(int n) : host_(std::size_t(n), 0.0), from_host_(std::size_t(n), false) {
    require(n > 0, "StepScalars", "needs at least one slot");
    if constexpr (on_backend) {
      dev_ = B::allocate_scalars(host_.size());
      B::zero_scalars(dev_, host_.size());
    }
    if constexpr (async_fetch) fetch_.emplace(host_.size());
  }
  ~StepScalars() {
    if constexpr (on_backend) B::deallocate_scalars(dev_, host_.size());
  }
  StepScalars(const StepScalars&) = delete;
  StepScalars& operator=(const StepScalars&) = delete;

  int size() const { return int(host_.size()); }

  // A value the host already has (an objective that returns its loss, a rank without rows).
  void set(int slot, double v) { host_[written(slot, true)] = v; }
  // slot = sum of c * (slot j) over the terms {j, c}, formed by the host when the values are read
  // (values(), after the other slots arrived): a loss made of several reductions still costs one
  // wait. The terms must be other slots, written in the same step. Writing the slot otherwise ends it.
  void combine(int slot, std::initializer_list<std::pair<int, double>> terms) {
    const auto i = index(slot);
    HATCH_CHECK(terms.size() <= kMaxTerms, "StepScalars::combine",
                "at most " + std::to_string(kMaxTerms) + " terms, got " + std::to_string(terms.size()));
    Derived d;
    for (const auto& [j, c] : terms) {
      HATCH_CHECK(index(j) != i, "StepScalars::combine", "slot " + std::to_string(slot) + " cannot be its own term");
      d.slot[d.n] = index(j);
      d.coef[d.n++] = c;
    }
    derived_[i] = d;
    from_host_[i] = true;  // never copied from the backend
  }
  // slot = (sum over rows of -sum_c t log softmax(z)) / divisor; dz = scale * its gradient (dz may be null).
  void softmax_cross_entropy(int slot, T* dz, const T* z, const T* t, int rows, int cols, T scale, double divisor) {
    const auto i = written(slot, false);
    if constexpr (on_backend) B::softmax_cross_entropy_into(dev_ + i, dz, z, t, rows, cols, scale, divisor);
    else host_[i] = B::softmax_cross_entropy(dz, z, t, rows, cols, scale) / divisor;
  }
  // slot = the number of rows whose largest logit is where their target's largest value is.
  void argmax_matches(int slot, const T* z, const T* t, int rows, int cols) {
    const auto i = written(slot, false);
    if constexpr (on_backend) {
      B::argmax_matches_into(dev_ + i, z, t, rows, cols);
    } else {
      const std::size_t n = std::size_t(std::max(rows, 0)) * std::size_t(std::max(cols, 0));
      const T *hz = z, *ht = t;  // read in place from host memory, else from copies
      std::vector<T> cz, ct;
      if constexpr (!host_memory_v<B>) {
        cz.resize(n);
        ct.resize(n);
        if (n) {
          B::download(cz.data(), z, n);
          B::download(ct.data(), t, n);
        }
        hz = cz.data();
        ht = ct.data();
      }
      std::int64_t right = 0;
      for (int r = 0; r < rows && cols > 0; ++r)
        right += argmax_row(hz + std::size_t(r) * cols, cols) == argmax_row(ht + std::size_t(r) * cols, cols);
      host_[i] = double(right);
    }
  }
  // slot = the sum of squares of x, accumulated in double.
  void sum_squares(int slot, const T* x, std::size_t n) {
    const auto i = written(slot, false);
    if constexpr (on_backend) B::sum_squares_into(dev_ + i, x, n);
    else host_[i] = B::sum_squares(x, n);
  }
  // Scales g (n values) so that its L2 norm, sqrt(slot), is at most max_norm: by
  // clip_factor(norm, max_norm) (core/host_device.hpp), the rule of clip_grad_norm.
  // The slot holds g's sum of squares (sum_squares above); the host does not need its value.
  void clip_to_norm(T* g, std::size_t n, int sumsq_slot, double max_norm) {
    const auto i = index(sumsq_slot);
    if (max_norm <= 0 || n == 0) return;
    if constexpr (on_backend) {
      if (!from_host_[i]) return B::clip_to_norm(g, n, dev_ + i, max_norm);
    }
    const double f = clip_factor(std::sqrt(host_[i]), max_norm);  // a norm the host has
    if (f != 1.0) B::scale(g, T(f), n);
  }
  // Every slot, as last written (set or computed); on a backend with its own scalars this is the
  // one wait for the device. Slots never written read 0.
  const std::vector<double>& read() {
    fetch();
    return values();
  }
  // read() in two halves, so that the host can queue more work before it waits: fetch() starts
  // the copy of every slot as written so far; values() waits for that copy (only, on a backend
  // with ScalarFetch; for everything queued, otherwise) and returns the slots. Slots written
  // after fetch() are not in it. Without a fetch since the last values(), values() returns the
  // slots as last read.
  void fetch() {
    if constexpr (async_fetch) fetch_->start(dev_);
    fetched_ = true;
  }
  const std::vector<double>& values() {
    if (!fetched_) return host_;
    fetched_ = false;
    if constexpr (on_backend) {
      const double* got = nullptr;
      if constexpr (async_fetch) {
        got = fetch_->wait();
      } else {
        buffer_.resize(host_.size());
        B::read_scalars(buffer_.data(), dev_, host_.size());
        got = buffer_.data();
      }
      for (std::size_t i = 0; i < host_.size(); ++i)
        if (!from_host_[i]) host_[i] = got[i];
    }
    for (std::size_t i = 0; i < host_.size(); ++i) {
      const Derived& d = derived_[i];
      if (!d.n) continue;
      double v = 0;
      for (int k = 0; k < d.n; ++k) v += d.coef[k] * host_[d.slot[k]];
      host_[i] = v;
    }
    return host_;
  }

 private:
  // Slot `slot` is written now, by the host or on the backend: no longer combined from others.
  std::size_t written(int slot, bool by_host) {
    const auto i = index(slot);
    from_host_[i] = by_host;
    derived_[i].n = 0;
    return i;
  }
  std::size_t index(int slot) const {
    HATCH_CHECK(slot >= 0 && slot < size(), "StepScalars",
                "slot " + std::to_string(slot) + " of " + std::to_string(size()));
    return std::size_t(slot);
  }
  static constexpr std::size_t kMaxTerms = 4;
  struct Derived {  // slot = sum coef[k] * slot[k], k < n (n = 0: not derived)
    int n = 0;
    std::size_t slot[kMaxTerms] = {};
    double coef[kMaxTerms] = {};
  };
  std::vector<double> host_, buffer_;
  std::vector<bool> from_host_;
  std::vector<Derived> derived_ = std::vector<Derived>(host_.size());
  double* dev_ = nullptr;
  bool fetched_ = false;
  std::optional<FetchOf<B>> fetch_;  // on a backend with ScalarFetch
};

// Host memory a batch is staged in before its upload: page-locked on backends that have it, so
// upload() returns at once and the copy overlaps the work the host launches next (a backend whose
// buffers are host memory gets the values written straight into the tensor). Refill it only
// after a wait for work queued after its last upload (StepScalars::values of a later fetch, say);
// see the top of this file.
template <Backend B>
class HostStaging {
 public:
  using T = typename B::Scalar;
  static constexpr bool pinned = HasPinnedStaging<B>;

  HostStaging() = default;
  ~HostStaging() { release(); }
  HostStaging(const HostStaging&) = delete;
  HostStaging& operator=(const HostStaging&) = delete;

  // Room for n values (grown geometrically, never shrunk; contents unspecified after growth).
  T* reserve(std::size_t n) {
    if (n > capacity_) {
      release();
      const std::size_t cap = std::max(n, 2 * capacity_);
      if constexpr (pinned) data_ = B::allocate_pinned(cap);
      else data_ = new T[cap];
      capacity_ = cap;
    }
    return data_;
  }
  // Converts [first, last) into the staging buffer and uploads it to tensor `to`, resized to s.
  template <class It>
  void upload(It first, It last, Tensor<B>& to, Shape s) {
    const auto n = std::size_t(std::distance(first, last));
    require(std::int64_t(n) == s.numel(), "HostStaging::upload",
            "got " + std::to_string(n) + " values for shape " + s.str());
    to.resize(s);
    if constexpr (!pinned && host_memory_v<B>) {
      std::copy(first, last, to.data());
    } else {
      T* p = reserve(n);
      std::copy(first, last, p);
      if (!n) return;
      if constexpr (pinned) B::upload_async(to.data(), p, n);
      else B::upload(to.data(), p, n);
    }
  }
  std::size_t capacity() const { return capacity_; }

 private:
  void release() {
    if (!data_) return;
    if constexpr (pinned) B::deallocate_pinned(data_, capacity_);
    else delete[] data_;
    data_ = nullptr;
    capacity_ = 0;
  }
  T* data_ = nullptr;
  std::size_t capacity_ = 0;
};

}  // namespace hatch
