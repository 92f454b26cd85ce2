// The fused backward kernels (kernels/backward_kernels.hpp) against loop-by-loop references
// in double: ranks 1, 3, 17 and 64, `in` and `out` odd and not multiples of
// the SIMD width, from below one vector to several chunks, tiles of 1 to 9 tokens gathered
// from scattered rows, strides wider than the rows, gradients that already hold values, and
// every grad_in variant (with and without dx, with and without a mask, with and without an
// extra row, an expert term and a router term sharing dx rows). Run once per ISA, forced
// at run time (tests/cmake/isa.cmake).
#include <doctest/doctest.h>

#include <algorithm>
#include <cmath>
#include <cstdint>
#include <cstdlib>
#include <type_traits>
#include <random>
#include <vector>

#include <molora/kernels/backward_kernels.hpp>

namespace test_backward_kernels {

namespace {

using molora::kernels::Index;

template <class Scalar>
std::vector<Scalar> random_vector(std::mt19937_64& gen, Index n) {
  std::normal_distribution<double> d(0.0, 1.0);
  std::vector<Scalar> v(static_cast<std::size_t>(n));
  for (auto& x : v) x = static_cast<Scalar>(d(gen));
  return v;
}

// Tolerance relative to the sum of |terms| of each output: a few ulps per accumulated term.
template <class Scalar>
double tolerance() {
  return std::is_same_v<Scalar, float> ? 1e-5 : 1e-13;
}

std::size_t at(Index i) { return static_cast<std::size_t>(i); }

// Collects a whole output's comparisons, checked once (per element would be millions).
struct Compare {
  double worst = 0;  // max |got - ref| / (tol * sum |terms|)
  Index changed = 0;  // values outside the outputs that changed
  void near(double got, double ref, double mag, double tol) {
    worst = std::max(worst, std::abs(got - ref) / (tol * (mag + 1e-30)));
  }
  void same(bool equal) { changed += equal ? 0 : 1; }
  void check() const {
    CHECK(worst <= 1.0);
    CHECK(changed == 0);
  }
};

// grad_out against a double reference for one shape; tokens are scattered rows of a
// [T, out] dy buffer with row stride ldy > out.
// With with_db false, dbt is null: u alone (the training forward's shrink).
template <class Scalar, class Arch>
void check_grad_out(Arch arch, Index r, Index out, Index n, bool with_db, std::uint64_t seed) {
  std::mt19937_64 gen(seed);
  const Index T = n + 3, ldy = out + 5, ldb = out + 2, lddb = out + 1, ldh = r + 1, ldu = r + 2;
  const auto dy = random_vector<Scalar>(gen, T * ldy);
  const auto bt = random_vector<Scalar>(gen, r * ldb);
  auto dbt = random_vector<Scalar>(gen, r * lddb);
  const auto dbt0 = dbt;
  const auto hs = random_vector<Scalar>(gen, n * ldh);
  std::vector<Scalar> u(at(n * ldu), Scalar(-7));
  std::vector<Scalar> spill(at(molora::kernels::grad_out_scratch_size<Arch, Scalar>(r)));
  std::vector<const Scalar*> rows(at(n));
  std::vector<Index> tok(at(n));
  for (Index i = 0; i < n; ++i) {
    tok[at(i)] = (i * 5 + 2) % T;  // scattered, distinct while n < T
    rows[at(i)] = dy.data() + tok[at(i)] * ldy;
  }
  molora::kernels::grad_out(arch, bt.data(), ldb, with_db ? dbt.data() : nullptr, lddb, r, out, rows.data(),
                            with_db ? hs.data() : nullptr, ldh, n, u.data(), ldu, spill.data());
  const double tol = tolerance<Scalar>();
  Compare cmp;
  for (Index t = 0; t < n; ++t)
    for (Index j = 0; j < r; ++j) {
      double ref = 0, mag = 0;
      for (Index o = 0; o < out; ++o) {
        const double p = double(bt[at(j * ldb + o)]) * double(rows[at(t)][o]);
        ref += p;
        mag += std::abs(p);
      }
      cmp.near(double(u[at(t * ldu + j)]), ref, mag, tol);
    }
  for (Index j = 0; j < r; ++j)
    for (Index o = 0; o < lddb; ++o) {
      if (o >= out || !with_db) {  // the stride's padding (all of dB^T without it) stays untouched
        cmp.same(dbt[at(j * lddb + o)] == dbt0[at(j * lddb + o)]);
        continue;
      }
      double ref = double(dbt0[at(j * lddb + o)]), mag = std::abs(ref);
      for (Index t = 0; t < n; ++t) {
        const double p = double(hs[at(t * ldh + j)]) * double(rows[at(t)][o]);
        ref += p;
        mag += std::abs(p);
      }
      cmp.near(double(dbt[at(j * lddb + o)]), ref, mag, tol);
    }
  for (Index t = 0; t < n; ++t)
    for (Index j = r; j < ldu; ++j) cmp.same(u[at(t * ldu + j)] == Scalar(-7));
  cmp.check();
}

// One term of a grad_in problem and its own buffers.
template <class Scalar>
struct TermData {
  Index rows = 0, n = 0, ldw = 0, lddw = 0;
  std::vector<Scalar> w, dw, dw0, coef, xbuf, mbuf;
  std::vector<const Scalar*> x, c, m;
  std::vector<Scalar*> dx;
  std::vector<Index> tok;
};

// grad_in against a double reference: an expert term (rank r, n tokens, and with_extra one
// more row given as the term's extra row) and, optionally, a router term (E rows, every
// other token of the tile) sharing the same dx rows.
template <class Scalar, class Arch>
void check_grad_in(Arch arch, Index r, Index in, Index n, bool with_dx, bool with_mask, bool with_router,
                   bool with_extra, std::uint64_t seed) {
  std::mt19937_64 gen(seed);
  const Index T = n + 4, ldx = in + 3, lddx = in + 1, E = 5;
  auto dxbuf = random_vector<Scalar>(gen, T * lddx);
  const auto dxbuf0 = dxbuf;
  std::vector<TermData<Scalar>> terms(with_router ? 2 : 1);
  for (std::size_t i = 0; i < terms.size(); ++i) {
    auto& d = terms[i];
    d.rows = i == 0 ? r + (with_extra ? 1 : 0) : E;
    d.n = i == 0 ? n : (n + 1) / 2;
    d.ldw = in + 2;
    d.lddw = in + 3;
    d.w = random_vector<Scalar>(gen, d.rows * d.ldw);
    d.dw = random_vector<Scalar>(gen, d.rows * d.lddw);
    d.dw0 = d.dw;
    d.coef = random_vector<Scalar>(gen, d.n * (d.rows + 1));
    d.xbuf = random_vector<Scalar>(gen, T * ldx);
    d.mbuf = random_vector<Scalar>(gen, T * in);
    for (Index t = 0; t < d.n; ++t) {
      const Index tk = i == 0 ? (t * 3 + 1) % T : ((2 * t) * 3 + 1) % T;  // router: every other expert token
      d.tok.push_back(tk);
      d.x.push_back(d.xbuf.data() + tk * ldx);
      d.c.push_back(d.coef.data() + t * (d.rows + 1));
      d.m.push_back(d.mbuf.data() + tk * in);
      d.dx.push_back(dxbuf.data() + tk * lddx);
    }
  }
  std::vector<molora::kernels::GradInTerm<Scalar>> g(terms.size());
  std::vector<const Scalar*> extra_coef;
  Index total_rows = 0;
  for (std::size_t i = 0; i < terms.size(); ++i) {
    auto& d = terms[i];
    g[i].w = d.w.data();
    g[i].ldw = d.ldw;
    g[i].dw = d.dw.data();
    g[i].lddw = d.lddw;
    g[i].rows = d.rows;
    if (i == 0 && with_extra) {  // the last row, through the extra-row pointers
      g[i].rows = r;
      g[i].extra_w = d.w.data() + r * d.ldw;
      g[i].extra_dw = d.dw.data() + r * d.lddw;
      for (Index t = 0; t < d.n; ++t) extra_coef.push_back(d.c[at(t)] + r);
      g[i].extra_coef = extra_coef.data();
    }
    g[i].x = d.x.data();
    g[i].coef = d.c.data();
    g[i].dx = with_dx ? d.dx.data() : nullptr;
    g[i].mask = with_mask ? d.m.data() : nullptr;
    g[i].n = d.n;
    total_rows += d.rows;
  }
  std::vector<Scalar> scratch(at(molora::kernels::grad_in_scratch_size(total_rows)));
  molora::kernels::grad_in(arch, g.data(), static_cast<Index>(g.size()), in, scratch.data());

  const double tol = tolerance<Scalar>();
  Compare cmp;
  // dw of every term.
  for (auto& d : terms)
    for (Index j = 0; j < d.rows; ++j)
      for (Index col = 0; col < d.lddw; ++col) {
        const Scalar got = d.dw[at(j * d.lddw + col)];
        if (col >= in) {
          cmp.same(got == d.dw0[at(j * d.lddw + col)]);
          continue;
        }
        double ref = double(d.dw0[at(j * d.lddw + col)]), mag = std::abs(ref);
        for (Index t = 0; t < d.n; ++t) {
          const double p = double(d.c[at(t)][j]) * double(d.x[at(t)][col]);
          ref += p;
          mag += std::abs(p);
        }
        cmp.near(double(got), ref, mag, tol);
      }
  // dx: every row of the buffer, the untouched ones unchanged.
  std::vector<double> ref(at(T * lddx)), mag(at(T * lddx));
  for (Index i = 0; i < T * lddx; ++i) {
    ref[at(i)] = double(dxbuf0[at(i)]);
    mag[at(i)] = std::abs(ref[at(i)]);
  }
  if (with_dx)
    for (auto& d : terms)
      for (Index t = 0; t < d.n; ++t)
        for (Index col = 0; col < in; ++col) {
          double s = 0, sm = 0;
          for (Index j = 0; j < d.rows; ++j) {
            const double p = double(d.c[at(t)][j]) * double(d.w[at(j * d.ldw + col)]);
            s += p;
            sm += std::abs(p);
          }
          const double mk = with_mask ? double(d.m[at(t)][col]) : 1.0;
          ref[at(d.tok[at(t)] * lddx + col)] += mk * s;
          mag[at(d.tok[at(t)] * lddx + col)] += std::abs(mk) * sm;
        }
  for (Index i = 0; i < T * lddx; ++i)
    cmp.near(double(dxbuf[at(i)]), ref[at(i)], mag[at(i)], tol);
  cmp.check();
}

template <class Scalar, class Arch>
void sweep(Arch arch) {
  namespace k = molora::kernels;
  // The widths and chunks of the kernels that run: the run-time table's for layer_arch.
  const auto& table = k::active_kernels<Scalar>();
  const bool running = std::is_same_v<Arch, k::layer_arch>;
  const Index W = running ? table.simd_width : k::simd_width<Arch, Scalar>();
  const Index kco = running ? table.grad_out_chunk : k::grad_out_chunk<Arch, Scalar>();
  const Index kci = running ? table.grad_in_chunk : k::grad_in_chunk<Arch, Scalar>();
  // Sizes below one vector, odd, and past one and two chunks with a scalar tail.
  const Index outs[] = {1, 7, 3 * W + 5, kco + W + 3, 2 * kco + 1};
  const Index ins[] = {1, 9, 2 * W + 3, kci + 3, 3 * kci + W - 1};
  const Index ranks[] = {1, 3, 17, 64};
  std::uint64_t seed = 1;
  for (const Index r : ranks)
    for (Index n = 1; n <= 9; ++n) {
      CAPTURE(r);
      CAPTURE(n);
      for (const Index out : outs) {
        CAPTURE(out);
        check_grad_out<Scalar>(arch, r, out, n, true, ++seed);
        check_grad_out<Scalar>(arch, r, out, n, false, ++seed);
      }
      for (const Index in : ins) {
        CAPTURE(in);
        for (int variant = 0; variant < 8; ++variant) {
          // 0: dA only; 1: + dx; 2: + router; 3: + masks; 4: router, no dx; 5: masked dx, no router;
          // 6: an extra row with dx; 7: an extra row, dx, masks and the router term.
          const bool dx = variant != 0 && variant != 4, mask = variant == 3 || variant == 5 || variant == 7,
                     router = (variant >= 2 && variant <= 4) || variant == 7, extra = variant >= 6;
          CAPTURE(variant);
          check_grad_in<Scalar>(arch, r, in, n, dx, mask, router, extra, ++seed);
        }
      }
    }
}

}  // namespace

// layer_arch: through the run-time table when the test links molora::kernels (ctest runs
// this once per ISA, forced by MOLORA_ISA), else the ISA this file is compiled for.
TEST_CASE("backward kernels: grad_out and grad_in match a double reference (float, the ISA running)") {
  MESSAGE("kernel ISA: " << molora::kernels::active_isa());
  if (const char* isa = std::getenv("MOLORA_ISA"); isa && *isa) CHECK(molora::kernels::active_isa() == isa);
  sweep<float>(molora::kernels::layer_arch{});
}

TEST_CASE("backward kernels: grad_out and grad_in match a double reference (double, the ISA running)") {
  sweep<double>(molora::kernels::layer_arch{});
}

#if !MOLORA_RUNTIME_DISPATCH
// With run-time dispatch the scalar kernels are one of the ISAs above.
TEST_CASE("backward kernels: the scalar fallback matches the same reference") {
  sweep<float>(molora::kernels::scalar_arch{});
  sweep<double>(molora::kernels::scalar_arch{});
}
#endif

TEST_CASE("backward kernels: an empty tile and an empty term change nothing") {
  using Arch = molora::kernels::layer_arch;
  const Index r = 3, in = 19;
  std::vector<float> w(r * in, 1.0f), dw(r * in, 2.0f), dx(in, 3.0f);
  const float* x = w.data();
  const float* coef = w.data();
  float* dxr = dx.data();
  molora::kernels::GradInTerm<float> g;
  g.w = w.data();
  g.ldw = in;
  g.dw = dw.data();
  g.lddw = in;
  g.rows = r;
  g.x = &x;
  g.coef = &coef;
  g.dx = &dxr;
  g.n = 0;
  std::vector<float> scratch(molora::kernels::grad_in_scratch_size(r));
  molora::kernels::grad_in(Arch{}, &g, 1, in, scratch.data());
  CHECK(std::all_of(dw.begin(), dw.end(), [](float v) { return v == 2.0f; }));
  CHECK(std::all_of(dx.begin(), dx.end(), [](float v) { return v == 3.0f; }));
}

}  // namespace test_backward_kernels
