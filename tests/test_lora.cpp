// LoRA expert: scaling, PEFT initialisation, delta against the double reference, merge and
// unmerge, and its input checks.
#include <doctest/doctest.h>

#include <cmath>

#include "reference.hpp"

namespace test_lora {

using molora::Index;
using molora::LoRA;
using molora::RowMatrix;

namespace {

template <class Scalar>
LoRA<Scalar> random_lora(Index in, Index out, Index r, double alpha, bool rs, std::uint64_t seed) {
  LoRA<Scalar> l(in, out, r, alpha, rs);
  l.set_A(ref::random_x<double>(r, in, seed));
  l.set_B(ref::random_x<double>(out, r, seed + 1));
  return l;
}

// s * B (A x) for each row of x, in double loops.
template <class Scalar>
ref::Mat ref_delta(const LoRA<Scalar>& l, const RowMatrix<Scalar>& x) {
  const auto A = ref::from_eigen(l.A()), B = ref::from_eigen(l.B());
  ref::Mat y = ref::zeros(x.rows(), l.out_features());
  for (Index t = 0; t < x.rows(); ++t)
    for (Index o = 0; o < l.out_features(); ++o) {
      double acc = 0;
      for (Index j = 0; j < l.rank(); ++j) {
        double h = 0;
        for (Index i = 0; i < l.in_features(); ++i) h += A[size_t(j)][size_t(i)] * double(x(t, i));
        acc += B[size_t(o)][size_t(j)] * h;
      }
      y[size_t(t)][size_t(o)] = double(l.scaling()) * acc;
    }
  return y;
}

}  // namespace

TEST_CASE("LoRA scaling is alpha/r, or alpha/sqrt(r) with rsLoRA") {
  CHECK(LoRA<double>(4, 4, 16, 32).scaling() == doctest::Approx(2.0));
  CHECK(LoRA<double>(4, 4, 16, 32, true).scaling() == doctest::Approx(8.0));
  CHECK(LoRA<float>(4, 4, 3, 1).scaling() == doctest::Approx(1.0 / 3.0));
  molora::MoLoRAConfig c;
  c.in_features = c.out_features = 4;
  c.rank = 16;
  c.lora_alpha = 32;
  CHECK(c.scaling() == doctest::Approx(2.0));
  c.use_rslora = true;
  CHECK(c.scaling() == doctest::Approx(8.0));
}

TEST_CASE("LoRA PEFT init: A uniform within 1/sqrt(in), B zero, reproducible from the seed") {
  const Index in = 300, r = 8;
  LoRA<double> a(in, 5, r, 16), b(in, 5, r, 16), c(in, 5, r, 16);
  molora::Generator g1(42), g2(42), g3(43);
  a.init_peft(g1);
  b.init_peft(g2);
  c.init_peft(g3);
  CHECK(a.A() == b.A());
  CHECK(a.A() != c.A());
  CHECK(a.B().isZero(0));
  const double bound = 1.0 / std::sqrt(double(in));
  CHECK(a.A().maxCoeff() < bound);
  CHECK(a.A().minCoeff() >= -bound);
  // Uniform on [-b, b]: mean 0, variance b^2/3. 2400 draws: loose 5-sigma bounds.
  const double mean = a.A().mean();
  const double var = (a.A().array() - mean).square().mean();
  CHECK(std::abs(mean) < 5 * bound / std::sqrt(3.0 * 2400));
  CHECK(var == doctest::Approx(bound * bound / 3).epsilon(0.1));
  // The init leaves the adapter a no-op.
  const auto x = ref::random_x<double>(3, in, 1);
  CHECK(a.delta(x).eval().isZero(0));
}

TEST_CASE_TEMPLATE("LoRA delta matches the double reference on random shapes", Scalar, float, double) {
  const double tol = std::is_same_v<Scalar, float> ? 1e-5 : 1e-12;
  const Index shapes[][4] = {{1, 1, 1, 1}, {1, 7, 3, 2}, {17, 1, 5, 1}, {33, 31, 17, 4}, {64, 40, 16, 0}, {5, 9, 1, 3}};
  std::uint64_t seed = 10;
  for (const auto& s : shapes) {
    CAPTURE(s[0]);
    CAPTURE(s[1]);
    CAPTURE(s[2]);
    CAPTURE(s[3]);
    const auto l = random_lora<Scalar>(s[0], s[1], s[2], 7.0, seed % 2 == 0, seed);
    const RowMatrix<Scalar> x = ref::random_x<Scalar>(s[3], s[0], seed + 5);
    const RowMatrix<Scalar> y = l.delta(x);
    CHECK(y.rows() == s[3]);
    CHECK(ref::rel_err(y, ref_delta(l, x)) < tol);
    // Accumulates into an output the caller holds, and reads a Map over a raw buffer.
    std::vector<Scalar> buf(size_t(x.size()));
    Eigen::Map<RowMatrix<Scalar>>(buf.data(), x.rows(), x.cols()) = x;
    RowMatrix<Scalar> acc = RowMatrix<Scalar>::Ones(s[3], s[1]);
    acc += l.delta(Eigen::Map<const RowMatrix<Scalar>>(buf.data(), x.rows(), x.cols()));
    if (s[3] > 0) CHECK(((acc.array() - 1).matrix() - y).cwiseAbs().maxCoeff() <= tol * (1 + y.cwiseAbs().maxCoeff()));
    ++seed;
  }
}

TEST_CASE_TEMPLATE("LoRA merge then base forward equals unmerged base + delta; unmerge restores", Scalar, float, double) {
  const double tol = std::is_same_v<Scalar, float> ? 1e-5 : 1e-12;
  const Index in = 19, out = 23, r = 5;
  const auto l = random_lora<Scalar>(in, out, r, 10.0, false, 77);
  const RowMatrix<Scalar> w0 = ref::random_x<Scalar>(out, in, 78);
  const RowMatrix<Scalar> x = ref::random_x<Scalar>(6, in, 79);
  const RowMatrix<Scalar> unmerged = x * w0.transpose() + l.delta(x);
  RowMatrix<Scalar> w = w0;
  l.merge(w);
  const RowMatrix<Scalar> merged = x * w.transpose();
  CHECK(ref::rel_err(merged, ref::from_eigen(unmerged)) < tol * 10);
  l.unmerge(w);
  CHECK(ref::rel_err(w, ref::from_eigen(w0)) < tol * 10);
  // merge into a block of a bigger row-major buffer (a host model's weight in place)
  RowMatrix<Scalar> big = RowMatrix<Scalar>::Zero(out + 2, in + 3);
  big.block(1, 2, out, in) = w0;
  l.merge(big.block(1, 2, out, in));
  CHECK(ref::rel_err(big.block(1, 2, out, in), ref::from_eigen(RowMatrix<Scalar>(w0 + l.scaling() * (l.B() * l.A())))) < tol);
  CHECK(big.col(0).isZero(0));
}

TEST_CASE("LoRA rejects bad sizes, shapes and non-finite values, leaving itself unchanged") {
  CHECK_THROWS_WITH_AS(LoRA<float>(0, 4, 2, 1), "molora config error: in_features: expected a value >= 1, got 0",
                       molora::config_error);
  CHECK_THROWS_WITH_AS(LoRA<float>(4, 0, 2, 1), "molora config error: out_features: expected a value >= 1, got 0",
                       molora::config_error);
  CHECK_THROWS_WITH_AS(LoRA<float>(4, 4, 0, 1), "molora config error: rank: expected a value >= 1, got 0",
                       molora::config_error);
  CHECK_THROWS_WITH_AS(LoRA<float>(4, 4, 2, -1), "molora config error: lora_alpha: expected a finite value > 0, got -1",
                       molora::config_error);
  CHECK_THROWS_AS(LoRA<float>(4, 4, 2, std::nan("")), molora::config_error);
  LoRA<double> l(4, 3, 2, 1);
  CHECK_THROWS_WITH_AS(l.set_A(RowMatrix<double>::Ones(3, 4)),
                       "molora shape error: lora_A.weight: expected [2, 4], got [3, 4]", molora::shape_error);
  CHECK_THROWS_WITH_AS(l.set_B(RowMatrix<double>::Ones(2, 3)),
                       "molora shape error: lora_B.weight: expected [3, 2], got [2, 3]", molora::shape_error);
  RowMatrix<double> bad = RowMatrix<double>::Ones(2, 4);
  bad(1, 3) = INFINITY;
  CHECK_THROWS_WITH_AS(l.set_A(bad), "molora numeric error: lora_A.weight: expected finite values, got inf at [1, 3]",
                       molora::numeric_error);
  CHECK(l.A().isZero(0));
  RowMatrix<double> w = RowMatrix<double>::Ones(3, 5);
  CHECK_THROWS_WITH_AS(l.merge(w), "molora shape error: base weight: expected [3, 4], got [3, 5]", molora::shape_error);
  // safe merge: a merge that would overflow to inf is rejected and the weight is untouched
  l.set_A(RowMatrix<double>::Constant(2, 4, 1e300));
  l.set_B(RowMatrix<double>::Constant(3, 2, 1e300));
  RowMatrix<double> w2 = RowMatrix<double>::Ones(3, 4);
  CHECK_THROWS_AS(l.merge(w2), molora::numeric_error);
  CHECK(w2 == RowMatrix<double>::Ones(3, 4));
}

TEST_CASE_TEMPLATE("LoRA mutable_A/mutable_B write into the adapter, keeping its shape", Scalar, float, double) {
  const double tol = std::is_same_v<Scalar, float> ? 1e-5 : 1e-12;
  const Index in = 7, out = 5, r = 3;
  auto l = random_lora<Scalar>(in, out, r, 6.0, false, 31);
  const RowMatrix<Scalar> x = ref::random_x<Scalar>(4, in, 32);
  const RowMatrix<Scalar> before = l.delta(x);
  auto A = l.mutable_A();
  CHECK((A.rows() == r && A.cols() == in));
  CHECK(A.data() == l.A().data());
  A *= Scalar(2);  // delta is linear in A: it doubles
  const RowMatrix<Scalar> doubled = l.delta(x);
  CHECK(((doubled - 2 * before).cwiseAbs().maxCoeff() <= tol * (1 + before.cwiseAbs().maxCoeff())));
  CHECK(ref::rel_err(doubled, ref_delta(l, x)) < tol);
  // B through its own view, element (o, j) of the [out, r] matrix.
  auto B = l.mutable_B();
  CHECK((B.rows() == out && B.cols() == r));
  B.setZero();
  B(4, 1) = Scalar(1);
  CHECK(l.B()(4, 1) == Scalar(1));
  CHECK(l.B().sum() == Scalar(1));
  CHECK(ref::rel_err(l.delta(x), ref_delta(l, x)) < tol);
  CHECK(l.delta(x).eval().leftCols(4).isZero(0));
}

}  // namespace test_lora
