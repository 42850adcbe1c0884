// Routing primitives for mixture-of-experts layers (B::gather_rows, B::combine_rows,
// B::gather_dot_rows) against straightforward references in double, and Indices<B>, the int32
// buffer their index tables live in.
#include <cstdint>
#include <limits>
#include <type_traits>

#include "support.hpp"

using namespace hatch;

namespace {

template <class T>
std::vector<T> random_values(std::size_t n, std::uint64_t seed) {
  std::mt19937_64 rng(seed);
  std::normal_distribution<double> nd(0.0, 1.0);
  std::vector<T> v(n);
  for (auto& x : v) x = T(nd(rng));
  return v;
}

// Random indices in [0, m), about one in `none_every` replaced by -1 (0: none).
std::vector<std::int32_t> random_indices(std::size_t n, int m, int none_every, std::uint64_t seed) {
  std::mt19937_64 rng(seed);
  std::uniform_int_distribution<int> pick(0, m - 1), none(0, std::max(none_every, 1) - 1);
  std::vector<std::int32_t> v(n);
  for (auto& i : v) i = (none_every > 0 && none(rng) == 0) ? -1 : std::int32_t(pick(rng));
  return v;
}

template <class T>
double tolerance() {
  return std::is_same_v<T, float> ? 1e-5 : 1e-12;
}

// max |got - ref| / max(max |ref|, 1)
template <class T>
double max_rel_err(const std::vector<T>& got, const std::vector<double>& ref) {
  REQUIRE(got.size() == ref.size());
  double diff = 0, scale = 1;
  for (std::size_t j = 0; j < got.size(); ++j) {
    const double d = std::abs(double(got[j]) - ref[j]);
    if (std::isnan(d)) return std::numeric_limits<double>::infinity();
    diff = std::max(diff, d);
    scale = std::max(scale, std::abs(ref[j]));
  }
  return diff / scale;
}

// ---- references ----------------------------------------------------------------------------------
template <class T>
std::vector<double> gather_ref(const std::vector<T>& x, const std::vector<std::int32_t>& idx, const T* scale,
                               int cols) {
  std::vector<double> y(idx.size() * std::size_t(cols), 0.0);
  for (std::size_t i = 0; i < idx.size(); ++i) {
    if (idx[i] < 0) continue;
    const double s = scale ? double(scale[i]) : 1.0;
    for (int c = 0; c < cols; ++c) y[i * cols + c] = s * double(x[std::size_t(idx[i]) * cols + c]);
  }
  return y;
}
template <class T>
std::vector<double> combine_ref(const std::vector<T>& x, const std::vector<std::int32_t>& slots, const T* w,
                                int rows, int k, int cols) {
  std::vector<double> y(std::size_t(rows) * cols, 0.0);
  for (int t = 0; t < rows; ++t)
    for (int j = 0; j < k; ++j) {
      const std::int32_t s = slots[std::size_t(t) * k + j];
      if (s < 0) continue;
      const double wj = w ? double(w[std::size_t(t) * k + j]) : 1.0;
      for (int c = 0; c < cols; ++c) y[std::size_t(t) * cols + c] += wj * double(x[std::size_t(s) * cols + c]);
    }
  return y;
}
template <class T>
std::vector<double> gather_dot_ref(const std::vector<T>& a, const std::vector<T>& b,
                                   const std::vector<std::int32_t>& slots, int rows, int k, int cols) {
  std::vector<double> out(std::size_t(rows) * k, 0.0);
  for (int t = 0; t < rows; ++t)
    for (int j = 0; j < k; ++j) {
      const std::int32_t s = slots[std::size_t(t) * k + j];
      if (s < 0) continue;
      double d = 0;
      for (int c = 0; c < cols; ++c) d += double(a[std::size_t(t) * cols + c]) * double(b[std::size_t(s) * cols + c]);
      out[std::size_t(t) * k + j] = d;
    }
  return out;
}

// Runs each primitive through Tensor<B> / Indices<B> (backend memory) and compares.
template <class B>
void check_gather(const std::vector<std::int32_t>& idx, int m, int cols, bool with_scale, std::uint64_t seed) {
  using T = typename B::Scalar;
  CAPTURE(with_scale);
  CAPTURE(cols);
  const auto x = random_values<T>(std::size_t(m) * cols, seed);
  const auto scale = random_values<T>(idx.size(), seed + 1);
  Tensor<B> tx, ts, ty;
  tx.from_host(x, {std::int64_t(m), std::int64_t(cols)});
  ts.from_host(scale, {std::int64_t(idx.size())});
  ty.resize({std::int64_t(idx.size()), std::int64_t(cols)});
  ty.fill(std::numeric_limits<T>::quiet_NaN());  // every element must be written, -1 rows included
  Indices<B> ti;
  ti.from_host(idx);
  B::gather_rows(ty.data(), tx.data(), ti.data(), with_scale ? ts.data() : nullptr, int(idx.size()), cols);
  const auto ref = gather_ref(x, idx, with_scale ? scale.data() : nullptr, cols);
  CHECK(max_rel_err(ty.to_host(), ref) <= tolerance<T>());
}
template <class B>
void check_combine(const std::vector<std::int32_t>& slots, int m, int rows, int k, int cols, bool with_w,
                   std::uint64_t seed) {
  using T = typename B::Scalar;
  CAPTURE(with_w);
  CAPTURE(k);
  CAPTURE(rows);
  const auto x = random_values<T>(std::size_t(m) * cols, seed);
  const auto w = random_values<T>(slots.size(), seed + 1);
  Tensor<B> tx, tw, ty;
  tx.from_host(x, {std::int64_t(m), std::int64_t(cols)});
  tw.from_host(w, {std::int64_t(w.size())});
  ty.resize({std::int64_t(rows), std::int64_t(cols)});
  ty.fill(std::numeric_limits<T>::quiet_NaN());  // overwritten, not accumulated into
  Indices<B> ti;
  ti.from_host(slots);
  B::combine_rows(ty.data(), tx.data(), ti.data(), with_w ? tw.data() : nullptr, rows, k, cols);
  const auto ref = combine_ref(x, slots, with_w ? w.data() : nullptr, rows, k, cols);
  CHECK(max_rel_err(ty.to_host(), ref) <= tolerance<T>());
}
template <class B>
void check_gather_dot(const std::vector<std::int32_t>& slots, int m, int rows, int k, int cols, std::uint64_t seed) {
  using T = typename B::Scalar;
  CAPTURE(k);
  CAPTURE(rows);
  const auto a = random_values<T>(std::size_t(rows) * cols, seed);
  const auto b = random_values<T>(std::size_t(m) * cols, seed + 1);
  Tensor<B> ta, tb, tout;
  ta.from_host(a, {std::int64_t(rows), std::int64_t(cols)});
  tb.from_host(b, {std::int64_t(m), std::int64_t(cols)});
  tout.resize({std::int64_t(rows) * k});
  tout.fill(std::numeric_limits<T>::quiet_NaN());
  Indices<B> ti;
  ti.from_host(slots);
  B::gather_dot_rows(tout.data(), ta.data(), tb.data(), ti.data(), rows, k, cols);
  const auto ref = gather_dot_ref(a, b, slots, rows, k, cols);
  CHECK(max_rel_err(tout.to_host(), ref) <= tolerance<T>() * std::sqrt(double(cols)));
}

}  // namespace

TEST_CASE_TEMPLATE("routing: gather_rows with -1 entries, with and without scale", B, Cpu, Cpu64) {
  const int m = 5, cols = 7;
  const std::vector<std::int32_t> idx = {3, -1, 0, 4, 3, 2, -1, 1};  // a row twice, two "none"s
  for (bool with_scale : {false, true}) check_gather<B>(idx, m, cols, with_scale, 11);
  // large enough for the parallel path (rows * cols above the grain)
  const auto big = random_indices(600, 300, 7, 5);
  for (bool with_scale : {false, true}) check_gather<B>(big, 300, 96, with_scale, 12);
}

TEST_CASE_TEMPLATE("routing: combine_rows, k = 1 and 2, with and without weights, all-none rows", B, Cpu, Cpu64) {
  const int m = 6, cols = 9;
  // k = 1: row 2 has no slot
  const std::vector<std::int32_t> s1 = {5, 0, -1, 3};
  // k = 2: row 1 has no slot at all, row 2 one, row 3 the same slot twice
  const std::vector<std::int32_t> s2 = {0, 4, -1, -1, -1, 2, 1, 1, 5, 3};
  for (bool with_w : {false, true}) {
    check_combine<B>(s1, m, 4, 1, cols, with_w, 21);
    check_combine<B>(s2, m, 5, 2, cols, with_w, 22);
  }
  const auto big = random_indices(2 * 512, 700, 9, 6);
  for (bool with_w : {false, true}) check_combine<B>(big, 700, 512, 2, 80, with_w, 23);
}

TEST_CASE_TEMPLATE("routing: gather_dot_rows, k = 1 and 2, -1 slots give 0", B, Cpu, Cpu64) {
  const int m = 6, cols = 13;
  const std::vector<std::int32_t> s1 = {5, -1, 2, 0};
  const std::vector<std::int32_t> s2 = {0, 4, -1, -1, -1, 2, 1, 1, 5, 3};
  check_gather_dot<B>(s1, m, 4, 1, cols, 31);
  check_gather_dot<B>(s2, m, 5, 2, cols, 32);
  const auto big = random_indices(2 * 400, 500, 8, 7);
  check_gather_dot<B>(big, 500, 400, 2, 64, 33);
}

TEST_CASE_TEMPLATE("routing: zero rows, zero columns and k = 0 write nothing they should not", B, Cpu, Cpu64) {
  using T = typename B::Scalar;
  std::vector<T> y(8, T(7)), x(8, T(1));
  const std::vector<std::int32_t> idx = {0, 1, 0, 1};
  B::gather_rows(y.data(), x.data(), idx.data(), nullptr, 0, 4);
  B::combine_rows(y.data(), x.data(), idx.data(), nullptr, 0, 2, 4);
  B::gather_dot_rows(y.data(), x.data(), x.data(), idx.data(), 0, 2, 4);
  CHECK(std::all_of(y.begin(), y.end(), [](T v) { return v == T(7); }));
  // k = 0: every row has no slot, so combine writes zeros; gather_dot_rows has no outputs
  B::combine_rows(y.data(), x.data(), idx.data(), nullptr, 2, 0, 4);
  CHECK(std::all_of(y.begin(), y.end(), [](T v) { return v == T(0); }));
  // cols = 0: the dot products are empty sums
  std::vector<T> out(4, T(7));
  B::gather_dot_rows(out.data(), x.data(), x.data(), idx.data(), 2, 2, 0);
  CHECK(std::all_of(out.begin(), out.end(), [](T v) { return v == T(0); }));
}

TEST_CASE_TEMPLATE("Indices: from_host / to_host round trip, growth, no reallocation when shrinking, moves", B, Cpu,
                   Cpu64) {
  static_assert(!std::is_copy_constructible_v<Indices<B>> && !std::is_copy_assignable_v<Indices<B>>);
  static_assert(std::is_nothrow_move_constructible_v<Indices<B>> && std::is_default_constructible_v<Indices<B>>);
  Indices<B> ix;
  CHECK(ix.size() == 0);
  CHECK(ix.data() == nullptr);
  CHECK(ix.to_host().empty());

  const std::vector<std::int32_t> h = {4, -1, 0, 2147483647, -2147483647 - 1, 3, 3};
  ix.from_host(h);
  CHECK(ix.size() == h.size());
  CHECK(ix.to_host() == h);

  const std::int32_t* p = ix.data();
  const std::int64_t allocs = B::allocation_count();
  ix.resize(3);  // smaller: same buffer
  CHECK(ix.data() == p);
  CHECK(ix.size() == 3);
  ix.resize(h.size());  // back to the capacity: same buffer
  CHECK(ix.data() == p);
  ix.from_host({1, 2});
  CHECK(ix.data() == p);
  CHECK(ix.to_host() == std::vector<std::int32_t>{1, 2});
  CHECK(B::allocation_count() == allocs);

  // growing doubles the capacity, so growing by one again allocates nothing
  ix.resize(h.size() + 1);
  CHECK(ix.capacity() == 2 * h.size());
  CHECK(B::allocation_count() == allocs + 1);
  const std::int32_t* q = ix.data();
  ix.resize(2 * h.size());
  CHECK(ix.data() == q);
  CHECK(B::allocation_count() == allocs + 1);
  ix.resize(10 * h.size());  // more than twice: exactly n
  CHECK(ix.capacity() == 10 * h.size());

  ix.from_host(h);
  Indices<B> moved(std::move(ix));
  CHECK(moved.to_host() == h);
  CHECK(ix.size() == 0);
  CHECK(ix.data() == nullptr);
  Indices<B> assigned;
  assigned.from_host({9});
  assigned = std::move(moved);
  CHECK(assigned.to_host() == h);
  CHECK(moved.data() == nullptr);
}
