#pragma once
// Tensor<B>: a dense, row-major array in the memory of backend B (host memory for Cpu, device
// memory for Cuda). Layers never touch elements: they pass data() to B's primitives. A tensor
// owns a buffer that only grows, so re-shaping to the same or a smaller size in a steady-state
// training step allocates nothing.
//
// A tensor can also be a view (view_of): a new shape over another tensor's elements, without a
// copy. Flatten and Reshape return views. A view owns nothing and is valid while its source
// keeps its buffer; resizing or assigning to a view detaches it first (it gets its own buffer),
// so it never writes into the source through resize() or operator=.
//
// A bound tensor (bind) is a view that stays put: a ParameterArena binds every parameter's value
// and gradient to its slice of the arena. resize() to the same number of elements, from_host()
// and assignment write into the slice instead of detaching, so loading a checkpoint or
// re-initialising a parameter keeps it in the arena; changing its size throws. detach() gives
// it its own buffer again (a copy of the slice).
#include <algorithm>
#include <array>
#include <cstddef>
#include <cstdint>
#include <initializer_list>
#include <span>
#include <sstream>
#include <string>
#include <utility>
#include <vector>

#include "hatch/backend/concept.hpp"
#include "hatch/core/error.hpp"

namespace hatch {

struct Shape {
  static constexpr int kMaxRank = 5;
  std::array<std::int64_t, kMaxRank> dims{};
  int rank = 0;

  Shape() = default;
  Shape(std::initializer_list<std::int64_t> d) {
    if (d.size() > kMaxRank) throw Error("Shape: rank " + std::to_string(d.size()) + " exceeds 5");
    for (auto v : d) dims[rank++] = v;
  }
  std::int64_t operator[](int i) const { return dims[i < 0 ? rank + i : i]; }
  std::int64_t numel() const {
    std::int64_t n = 1;
    for (int i = 0; i < rank; ++i) n *= dims[i];
    return n;
  }
  // Product of all dims but the last: the number of rows when the tensor is read as a matrix.
  std::int64_t rows() const { return rank == 0 ? 1 : numel() / dims[rank - 1]; }
  std::int64_t cols() const { return rank == 0 ? 1 : dims[rank - 1]; }
  std::vector<std::int64_t> vec() const { return {dims.begin(), dims.begin() + rank}; }
  friend bool operator==(const Shape& a, const Shape& b) {
    return a.rank == b.rank && std::equal(a.dims.begin(), a.dims.begin() + a.rank, b.dims.begin());
  }
  std::string str() const {
    std::ostringstream s;
    s << '[';
    for (int i = 0; i < rank; ++i) s << (i ? "," : "") << dims[i];
    s << ']';
    return s.str();
  }
};

template <Backend B>
class Tensor {
 public:
  using Scalar = typename B::Scalar;

  Tensor() = default;
  explicit Tensor(Shape s) { resize(s); }
  Tensor(const Tensor& o) { *this = o; }
  Tensor(Tensor&& o) noexcept { swap(o); }
  Tensor& operator=(const Tensor& o) {
    if (this != &o) {
      if (bound_) {  // write into the bound slice
        resize(o.shape_);
        if (numel()) B::copy(data_, o.data_, numel());
        return *this;
      }
      if (!owner_) release();  // a copy of anything (a view too) is an owning tensor
      resize(o.shape_);
      if (numel()) B::copy(data_, o.data_, numel());
    }
    return *this;
  }
  Tensor& operator=(Tensor&& o) {
    if (bound_) return *this = static_cast<const Tensor&>(o);
    swap(o);
    return *this;
  }
  ~Tensor() { release(); }

  // Re-shapes; reallocates only when the buffer is too small. Contents are unspecified after
  // a reallocation.
  void resize(Shape s) {
    const auto n = static_cast<std::size_t>(s.numel());
    if (bound_) {
      HATCH_CHECK(s.numel() == numel(), "Tensor::resize",
                  "this tensor lives in a parameter arena as " + shape_.str() + " and cannot become " + s.str() +
                      "; change a parameter's shape before building the arena");
      shape_ = s;
      return;
    }
    if (!owner_) release();  // detach a view from its source
    if (n > capacity_) {
      release();
      data_ = B::allocate(n);
      capacity_ = n;
    }
    shape_ = s;
  }
  // Makes this tensor a zero-copy view of src's elements with shape s (same number of elements;
  // a reshape in place when src is this tensor). Allocates nothing. The view reads and writes
  // src's memory: a layer hands it on as `const Tensor&`.
  void view_of(const Tensor& src, Shape s) {
    HATCH_CHECK(s.numel() == src.numel(), "Tensor::view_of",
                "shape " + s.str() + " has " + std::to_string(s.numel()) + " elements, the source " +
                    src.shape_.str() + " has " + std::to_string(src.numel()));
    if (&src != this) {
      release();
      data_ = src.data_;
      owner_ = false;
    }
    shape_ = s;
  }
  // Makes this tensor a zero-copy view of `count` rows of src (rows = every dimension but the
  // last), starting at row `first`: shape (count, src.cols()). A mixture-of-experts layer hands
  // each expert its rows of one buffer this way.
  void view_rows(const Tensor& src, std::int64_t first, std::int64_t count) {
    HATCH_CHECK(first >= 0 && count >= 0 && first + count <= src.rows(), "Tensor::view_rows",
                "rows [" + std::to_string(first) + ", " + std::to_string(first + count) + ") of a tensor of " +
                    std::to_string(src.rows()) + " rows");
    HATCH_CHECK(&src != this, "Tensor::view_rows", "a tensor cannot be a view of its own rows");
    release();
    data_ = src.data_ + first * src.cols();
    owner_ = false;
    shape_ = Shape{count, src.cols()};
  }
  bool is_view() const { return !owner_; }
  std::size_t capacity() const { return capacity_; }  // elements allocated (0 for a view or a bound tensor)

  // Makes this tensor a bound view of n = s.numel() elements at `data` (memory of B that outlives
  // the binding; see the header comment). Allocates nothing; the contents are data's.
  void bind(Scalar* data, Shape s) {
    release();
    data_ = data;
    owner_ = false;
    bound_ = true;
    shape_ = s;
  }
  bool is_bound() const { return bound_; }
  // Gives a view (bound or not) its own buffer holding a copy of the elements it shows.
  void detach() {
    if (owner_) return;
    Tensor own;
    own.resize(shape_);
    if (numel()) B::copy(own.data_, data_, numel());
    release();
    swap(own);
  }

  void zero() {
    if (numel()) B::fill(data_, numel(), Scalar(0));
  }
  void fill(Scalar v) {
    if (numel()) B::fill(data_, numel(), v);
  }

  Scalar* data() { return data_; }
  const Scalar* data() const { return data_; }
  const Shape& shape() const { return shape_; }
  std::int64_t numel() const { return shape_.numel(); }
  std::int64_t rows() const { return shape_.rows(); }
  std::int64_t cols() const { return shape_.cols(); }
  std::int64_t dim(int i) const { return shape_[i]; }

  std::vector<Scalar> to_host() const {
    std::vector<Scalar> h(static_cast<std::size_t>(numel()));
    if (!h.empty()) B::download(h.data(), data_, h.size());
    return h;
  }
  void from_host(std::span<const Scalar> h, Shape s) {
    require(static_cast<std::int64_t>(h.size()) == s.numel(), "Tensor::from_host",
            "got " + std::to_string(h.size()) + " values for shape " + s.str());
    resize(s);
    if (!h.empty()) B::upload(data_, h.data(), h.size());
  }
  void from_host(std::span<const Scalar> h) { from_host(h, shape_); }

  void swap(Tensor& o) noexcept {
    std::swap(data_, o.data_);
    std::swap(capacity_, o.capacity_);
    std::swap(shape_, o.shape_);
    std::swap(owner_, o.owner_);
    std::swap(bound_, o.bound_);
  }

 private:
  void release() {
    if (data_ && owner_) B::deallocate(data_, capacity_);
    data_ = nullptr;
    capacity_ = 0;
    owner_ = true;
    bound_ = false;
  }
  Scalar* data_ = nullptr;
  std::size_t capacity_ = 0;  // 0 for a view
  Shape shape_;
  bool owner_ = true;
  bool bound_ = false;  // a view that resize() and assignment write through (a parameter arena)
};

// Throws a hatch::Error naming `where` when a tensor's shape is not the expected one.
template <Backend B>
void expect_shape(const Tensor<B>& t, const Shape& s, const std::string& where) {
  require(t.shape() == s, where, "expected shape " + s.str() + ", got " + t.shape().str());
}

}  // namespace hatch
