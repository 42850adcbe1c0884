#pragma once
// Indices<B>: an owning buffer of int32 values in B's memory (host memory for Cpu, device memory
// for Cuda): the routing tables of a mixture-of-experts layer (which rows go to which expert, and
// where their outputs come back from), passed as `const std::int32_t*` to B::gather_rows,
// B::combine_rows and B::gather_dot_rows. Like Tensor, it reallocates only when it must grow, and
// then to at least twice its capacity, so a training step with varying routing allocates nothing
// once the largest size has been seen. Free of Eigen: Cuda translation units include it.
#include <algorithm>
#include <cstddef>
#include <cstdint>
#include <utility>
#include <vector>

#include "hatch/backend/concept.hpp"

namespace hatch {

template <Backend B>
class Indices {
 public:
  Indices() = default;
  explicit Indices(std::size_t n) { resize(n); }
  Indices(const Indices&) = delete;
  Indices& operator=(const Indices&) = delete;
  Indices(Indices&& o) noexcept { swap(o); }
  Indices& operator=(Indices&& o) noexcept {
    if (this != &o) {
      Indices tmp(std::move(o));
      swap(tmp);
    }
    return *this;
  }
  ~Indices() { release(); }

  // n values; reallocates only when n exceeds the capacity (which grows to max(n, 2 capacity)).
  // The contents are unspecified after a reallocation.
  void resize(std::size_t n) {
    if (n > capacity_) {
      const std::size_t cap = std::max(n, 2 * capacity_);
      std::int32_t* p = B::allocate_indices(cap);  // may throw: this buffer is then unchanged
      release();
      data_ = p;
      capacity_ = cap;
    }
    size_ = n;
  }
  // resize(h.size()) and copy h into B's memory.
  void from_host(const std::vector<std::int32_t>& h) {
    resize(h.size());
    if (!h.empty()) B::upload_indices(data_, h.data(), h.size());
  }
  std::vector<std::int32_t> to_host() const {
    std::vector<std::int32_t> h(size_);
    if (size_) B::download_indices(h.data(), data_, size_);
    return h;
  }

  std::int32_t* data() { return data_; }
  const std::int32_t* data() const { return data_; }
  std::size_t size() const { return size_; }
  std::size_t capacity() const { return capacity_; }
  bool empty() const { return size_ == 0; }

  void swap(Indices& o) noexcept {
    std::swap(data_, o.data_);
    std::swap(size_, o.size_);
    std::swap(capacity_, o.capacity_);
  }

 private:
  void release() noexcept {
    if (data_) B::deallocate_indices(data_, capacity_);
    data_ = nullptr;
    size_ = capacity_ = 0;
  }

  std::int32_t* data_ = nullptr;
  std::size_t size_ = 0;
  std::size_t capacity_ = 0;
};

}  // namespace hatch
