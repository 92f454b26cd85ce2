// The tile kernels (kernels/lora_kernels.hpp) against a plain double loop: any rank, in/out
// that are not multiples of the SIMD width (including 1), tiles of 0 to 40 tokens gathered
// from scattered rows; for the ISA running (each ISA in turn under ctest, see
// tests/cmake/isa.cmake) and for the scalar kernels.
#include <doctest/doctest.h>

#include <cmath>
#include <cstdlib>
#include <cstdint>
#include <random>
#include <vector>

#include <molora/kernels/dispatch_kernels.hpp>

namespace test_kernels {

namespace k = molora::kernels;
using k::Index;

namespace {

template <class Scalar>
double tolerance() {
  return std::is_same_v<Scalar, float> ? 2e-5 : 1e-12;
}

template <class Scalar>
std::vector<Scalar> random_vec(Index n, std::mt19937_64& gen) {
  std::uniform_real_distribution<double> u(-1, 1);
  std::vector<Scalar> v(static_cast<std::size_t>(n));
  for (auto& e : v) e = static_cast<Scalar>(u(gen));
  return v;
}

// One case: n tokens picked from rows of an x [rows, in] buffer with stride ldx; y rows of a
// [rows, out] buffer with stride ldy; fused and shrink+expand both checked.
// ldb = 0: out + 3; otherwise the stride of B_e^T's rows (>= out).
template <class Arch, class Scalar>
void check_tile(Index r, Index in, Index out, Index n, std::uint64_t seed, Index ldb_set = 0) {
  std::mt19937_64 gen(seed);
  const Index rows = n + 3, ldx = in + 2, ldy = out + 1, lda = in + 1, ldb = ldb_set > 0 ? ldb_set : out + 3;
  const auto a = random_vec<Scalar>(r * lda, gen);
  const auto bt = random_vec<Scalar>(r * ldb, gen);
  const auto x = random_vec<Scalar>(rows * ldx, gen);
  const auto y0 = random_vec<Scalar>(rows * ldy, gen);
  std::vector<Scalar> scale = random_vec<Scalar>(n, gen);
  std::vector<Index> tok(static_cast<std::size_t>(n));
  for (Index i = 0; i < n; ++i) tok[static_cast<std::size_t>(i)] = (i * 7 + 2) % rows;
  // Distinct y rows: the kernels require them.
  for (Index i = 0; i < n; ++i) tok[static_cast<std::size_t>(i)] = (rows - 1 - i + (i % 2 ? 0 : 0)) % rows;

  // Reference in double.
  std::vector<double> ref(y0.begin(), y0.end());
  double scale_out = 1;
  for (Index i = 0; i < n; ++i) {
    const Index t = tok[static_cast<std::size_t>(i)];
    std::vector<double> h(static_cast<std::size_t>(r));
    for (Index j = 0; j < r; ++j) {
      double s = 0;
      for (Index c = 0; c < in; ++c)
        s += double(a[static_cast<std::size_t>(j * lda + c)]) * double(x[static_cast<std::size_t>(t * ldx + c)]);
      h[static_cast<std::size_t>(j)] = s;
    }
    for (Index o = 0; o < out; ++o) {
      double s = 0;
      for (Index j = 0; j < r; ++j) s += h[static_cast<std::size_t>(j)] * double(bt[static_cast<std::size_t>(j * ldb + o)]);
      ref[static_cast<std::size_t>(t * ldy + o)] += double(scale[static_cast<std::size_t>(i)]) * s;
      scale_out = std::max(scale_out, std::abs(double(scale[static_cast<std::size_t>(i)]) * s));
    }
  }
  const double tol = tolerance<Scalar>() * scale_out * std::sqrt(double(in) * double(r));

  std::vector<const Scalar*> xr(static_cast<std::size_t>(n));
  for (Index i = 0; i < n; ++i) xr[static_cast<std::size_t>(i)] = x.data() + tok[static_cast<std::size_t>(i)] * ldx;
  auto rows_of = [&](std::vector<Scalar>& y) {
    std::vector<Scalar*> yr(static_cast<std::size_t>(n));
    for (Index i = 0; i < n; ++i) yr[static_cast<std::size_t>(i)] = y.data() + tok[static_cast<std::size_t>(i)] * ldy;
    return yr;
  };
  auto compare = [&](const std::vector<Scalar>& y, const char* what) {
    double worst = 0;
    for (std::size_t i = 0; i < y.size(); ++i) worst = std::max(worst, std::abs(double(y[i]) - ref[i]));
    INFO(what, " r=", r, " in=", in, " out=", out, " n=", n, " worst=", worst, " tol=", tol);
    CHECK(worst <= tol);
  };

  {  // fused
    std::vector<Scalar> y = y0;
    auto yr = rows_of(y);
    std::vector<Scalar> scratch(static_cast<std::size_t>(k::fused_scratch_size<Arch, Scalar>(r)));
    k::fused(Arch{}, a.data(), lda, bt.data(), ldb, r, in, out, xr.data(), yr.data(), scale.data(), n,
             scratch.data());
    compare(y, "fused");
  }
  {  // fused with the large tile (and a tile of 3), bitwise equal to the default tile
    std::vector<Scalar> y8 = y0, y32 = y0, y3 = y0;
    auto r8 = rows_of(y8), r32 = rows_of(y32), r3 = rows_of(y3);
    std::vector<Scalar> scratch(static_cast<std::size_t>(k::fused_scratch_size<Arch, Scalar>(r)));
    k::fused(Arch{}, a.data(), lda, bt.data(), ldb, r, in, out, xr.data(), r8.data(), scale.data(), n,
             scratch.data(), k::kTile);
    k::fused(Arch{}, a.data(), lda, bt.data(), ldb, r, in, out, xr.data(), r32.data(), scale.data(), n,
             scratch.data(), k::kMaxTile);
    k::fused(Arch{}, a.data(), lda, bt.data(), ldb, r, in, out, xr.data(), r3.data(), scale.data(), n,
             scratch.data(), 3);
    compare(y32, "fused, tile 32");
    CHECK(y32 == y8);
    CHECK(y3 == y8);
  }
  {  // shrink into a strided h, then expand from row pointers
    std::vector<Scalar> y = y0;
    auto yr = rows_of(y);
    const Index ldh = r + 5;
    std::vector<Scalar> h(static_cast<std::size_t>(std::max<Index>(n, 1) * ldh));
    std::vector<Scalar> spill(static_cast<std::size_t>(std::max<Index>(n, 1) * r * k::simd_width<Arch, Scalar>()));
    k::shrink(Arch{}, a.data(), lda, r, in, xr.data(), n, h.data(), ldh, spill.data());
    std::vector<const Scalar*> hr(static_cast<std::size_t>(n));
    for (Index i = 0; i < n; ++i) hr[static_cast<std::size_t>(i)] = h.data() + i * ldh;
    k::expand(Arch{}, bt.data(), ldb, r, out, hr.data(), scale.data(), n, yr.data());
    compare(y, "shrink+expand");
  }
}

template <class Arch, class Scalar>
void suite() {
  std::uint64_t seed = 1;
  // r = 15, 16 and 17 reach each tail of the shrink's row blocks (8 + 4 + 2 + 1, 6 + 6 + 2 + 1,
  // 6 + 6 + 4 + 1; with 16 registers also 3 x 5, 3 x 5 + 1 and 3 x 5 + 2 for four tokens).
  for (Index r : {1, 3, 15, 16, 17, 64, 200})
    for (Index in : {1, 7, 33, 130, 515})
      for (Index out : {1, 5, 31, 131})
        for (Index n : {0, 1, 2, 3, 4, 5, 9, 17, 40}) {
          if (r * in * n > 2'000'000) continue;
          check_tile<Arch, Scalar>(r, in, out, n, seed++);
        }
  // A shrink long enough for many passes over `in` (spill path) at several ranks.
  for (Index r : {1, 16, 200}) check_tile<Arch, Scalar>(r, 4099, 67, 6, seed++);
  // Rank rows 4 KiB apart, where one token keeps blocks of 8 vectors (lora_kernels.hpp's
  // expand), and rows just off it: one-token tiles (n = 1, and the last tile of 9 and 17)
  // against the tile of 32, bit for bit, and the double loop.
  const Index ld4k = 4096 / Index(sizeof(Scalar));
  for (Index n : {1, 2, 9, 17})
    for (Index out : {ld4k - 5, ld4k}) {
      check_tile<Arch, Scalar>(16, 33, out, n, seed++, ld4k);
      check_tile<Arch, Scalar>(16, 33, out, n, seed++, ld4k + 1);
    }
  // The few-token expand over several chunks of columns (2 KiB of each row per chunk), its
  // rank rows in passes: of 16 (r = 40: 16, 16, 8) off 4 KiB strides, of 8 on them; tiles of
  // 1-5 tokens checked bit for bit against tiles of 3 and 32 and against the double loop.
  for (Index n : {1, 2, 3, 4, 5})
    for (Index out : {Index(1300), 2 * ld4k + 7}) {
      check_tile<Arch, Scalar>(40, 33, out, n, seed++);
      check_tile<Arch, Scalar>(40, 33, out, n, seed++, (out + ld4k - 1) / ld4k * ld4k);
    }
}

}  // namespace

// layer_arch: the kernels the layers run, through the run-time table when the test links
// molora::kernels (ctest runs this once per ISA, forced by MOLORA_ISA), else the ISA this
// file is compiled for.
TEST_CASE_TEMPLATE("kernels: fused and shrink+expand match a double loop (the ISA running)", Scalar, float, double) {
  MESSAGE("kernel ISA: ", k::active_isa());
  if (const char* isa = std::getenv("MOLORA_ISA"); isa && *isa) CHECK(k::active_isa() == isa);
  suite<k::layer_arch, Scalar>();
}

#if !MOLORA_RUNTIME_DISPATCH
// With run-time dispatch the scalar kernels are one of the ISAs above.
TEST_CASE_TEMPLATE("kernels: scalar kernels match a double loop", Scalar, float, double) {
  suite<k::scalar_arch, Scalar>();
}
#endif

TEST_CASE("kernels: the chunk of `in` depends only on the rank") {
  const auto& t = k::active_kernels<float>();
  CHECK(t.shrink_chunk(16) % t.simd_width == 0);
  CHECK(t.shrink_chunk(1000) >= 16 * t.simd_width);
}

// The fetch cursors are hints (no bit depends on them), so what can be wrong is their
// arithmetic: a paced span must be fetched whole (every line its bytes touch), in order, a
// little ahead of its stream (by 4/5 of it), and stop at its end.
TEST_CASE("kernels: a paced span is fetched whole, in order, ahead of its stream") {
  // span bytes, stream bytes, bytes consumed per step, offset of the span from a line
  const Index cases[][4] = {{180 * 1024, 64 * 1024, 512, 0}, {64 * 1024, 180 * 1024, 64, 16},
                            {100, 4096, 64, 0},          {100, 4096, 64, 48},
                            {16 * 1024, 16 * 1024, 32, 2}, {7 * 64 + 1, 1000, 24, 63}};
  alignas(64) static unsigned char buffer[256 * 1024];
  const auto base = reinterpret_cast<std::uintptr_t>(buffer);
  for (const auto& c : cases) {
    const Index span_bytes = c[0], stream_bytes = c[1], step = c[2], offset = c[3];
    CAPTURE(span_bytes);
    CAPTURE(stream_bytes);
    CAPTURE(offset);
    k::PacedSpan s = k::paced_span(buffer + offset, span_bytes, stream_bytes);
    const Index lines = (offset + span_bytes + 63) / 64;  // the lines the bytes touch
    CHECK(s.span.p == base);
    Index consumed = 0, done_at = -1;
    std::uintptr_t last = s.span.p;
    while (consumed < stream_bytes) {
      k::fetch_paced(&s, step);
      consumed += step;
      CHECK(s.span.p >= last);
      last = s.span.p;
      const Index fetched = Index(s.span.p - base);  // lines fetched x 64
      const Index owed = consumed * lines * 64 * 5 / (stream_bytes * 4);  // paid for, at 5/4
      CHECK(fetched <= owed + 64);
      if (fetched < lines * 64) CHECK(fetched + 64 > owed);
      if (done_at < 0 && fetched >= lines * 64) done_at = consumed;
    }
    REQUIRE(done_at >= 0);
    CHECK(Index(s.span.p - base) == lines * 64);  // each line once, none past the end
    CHECK(done_at <= stream_bytes * 4 / 5 + step);
    k::fetch_paced(&s, stream_bytes);  // spent: nothing more
    CHECK(Index(s.span.p - base) == lines * 64);
  }
  k::fetch_paced(nullptr, 64);  // no span: nothing
  k::PacedSpan none;
  k::fetch_paced(&none, 1 << 20);
  CHECK(none.span.p == 0);
}

TEST_CASE("kernels: a fetch span starts at the line of its first byte and moves on a line per fetch") {
  alignas(64) static unsigned char buffer[4096];
  const auto base = reinterpret_cast<std::uintptr_t>(buffer);
  k::FetchSpan s = k::fetch_span(buffer + 40, buffer + 240);  // bytes in lines 0-3
  CHECK(s.p == base);
  CHECK(s.end == base + 240);
  k::fetch_lines<3>(s);
  CHECK(s.p == base + 192);
  k::fetch_lines<2>(s);  // line 3 (the last bytes), then past the end
  CHECK(s.p == base + 320);
}

}  // namespace test_kernels
