// safetensors reader/writer: F16/BF16 conversions against hand-computed bit patterns, write +
// read round trips for every dtype and Scalar, and one hand-built file per malformed case,
// each checked to throw molora::format_error naming the tensor or field.
#include <doctest/doctest.h>

#include <molora/io/safetensors.hpp>

#include <cmath>
#include <cstring>
#include <filesystem>
#include <limits>
#include <random>
#include <string>
#include <vector>

#include "test_util.hpp"

namespace test_safetensors {

namespace fs = std::filesystem;
using namespace molora::io;
using molora::RowMatrix;
using molora::Vector;
using test_util::error_of;
using test_util::read_bytes;
using test_util::TempDir;
using test_util::write_bytes;

namespace {

// 8-byte length + header text (as given, no padding) + data.
std::vector<std::uint8_t> st_file(const std::string& header, const std::vector<std::uint8_t>& data = {}) {
  std::vector<std::uint8_t> out(8);
  const std::uint64_t n = header.size();
  for (int i = 0; i < 8; ++i) out[static_cast<std::size_t>(i)] = static_cast<std::uint8_t>(n >> (8 * i));
  out.insert(out.end(), header.begin(), header.end());
  out.insert(out.end(), data.begin(), data.end());
  return out;
}

std::vector<std::uint8_t> zeros(std::size_t n) { return std::vector<std::uint8_t>(n, 0); }

// Opens `bytes` as a file and returns the format_error message ("" and a failed check if none).
std::string open_error(const TempDir& dir, const std::vector<std::uint8_t>& bytes) {
  const std::string p = dir.file("bad.safetensors");
  write_bytes(p, bytes);
  return error_of([&] {
    SafetensorsReader r(p);
    (void)r;
  });
}

bool contains(const std::string& s, const std::string& part) { return s.find(part) != std::string::npos; }

std::uint32_t fbits(float f) { return internal::float_bits(f); }

}  // namespace

// ---- conversions -------------------------------------------------------------------------------

TEST_CASE("safetensors: F16 -> float on hand-computed bit patterns") {
  CHECK(internal::half_to_float(0x3c00) == 1.0f);
  CHECK(internal::half_to_float(0xc100) == -2.5f);
  CHECK(internal::half_to_float(0x7bff) == 65504.0f);
  CHECK(internal::half_to_float(0x0400) == std::ldexp(1.0f, -14));         // smallest normal
  CHECK(internal::half_to_float(0x0001) == std::ldexp(1.0f, -24));         // smallest subnormal
  CHECK(internal::half_to_float(0x03ff) == std::ldexp(1023.0f, -24));      // largest subnormal
  CHECK(internal::half_to_float(0x8001) == -std::ldexp(1.0f, -24));
  CHECK(fbits(internal::half_to_float(0x8000)) == 0x80000000u);            // -0
  CHECK(internal::half_to_float(0x7c00) == std::numeric_limits<float>::infinity());
  CHECK(internal::half_to_float(0xfc00) == -std::numeric_limits<float>::infinity());
  CHECK(std::isnan(internal::half_to_float(0x7e00)));
  CHECK(std::isnan(internal::half_to_float(0x7c01)));  // signalling pattern stays NaN
  CHECK(internal::half_to_float(0x3555) == 0.333251953125f);
}

TEST_CASE("safetensors: float -> F16 rounds to nearest even") {
  CHECK(internal::float_to_half(1.0f) == 0x3c00);
  CHECK(internal::float_to_half(-2.5f) == 0xc100);
  CHECK(internal::float_to_half(65504.0f) == 0x7bff);
  CHECK(internal::float_to_half(65519.0f) == 0x7bff);     // below the midpoint to 65536
  CHECK(internal::float_to_half(65520.0f) == 0x7c00);     // midpoint, odd mantissa -> up to inf
  CHECK(internal::float_to_half(1e9f) == 0x7c00);
  CHECK(internal::float_to_half(-1e9f) == 0xfc00);
  CHECK(internal::float_to_half(std::ldexp(1.0f, -14)) == 0x0400);
  CHECK(internal::float_to_half(std::ldexp(1.0f, -24)) == 0x0001);
  CHECK(internal::float_to_half(std::ldexp(1.0f, -25)) == 0x0000);      // tie -> even (0)
  CHECK(internal::float_to_half(std::ldexp(3.0f, -25)) == 0x0002);      // 1.5 units -> 2 (even)
  CHECK(internal::float_to_half(std::ldexp(5.0f, -25)) == 0x0002);      // 2.5 units -> 2 (even)
  CHECK(internal::float_to_half(std::ldexp(1.0f, -26)) == 0x0000);
  CHECK(internal::float_to_half(std::ldexp(1023.5f, -24)) == 0x0400);   // rounds up into normals
  CHECK(internal::float_to_half(1.0f + std::ldexp(1.0f, -11)) == 0x3c00);        // tie -> even
  CHECK(internal::float_to_half(1.0f + std::ldexp(3.0f, -11)) == 0x3c02);        // tie -> even (up)
  CHECK(internal::float_to_half(1.0f + std::ldexp(1.0f, -11) + std::ldexp(1.0f, -20)) == 0x3c01);
  CHECK(internal::float_to_half(-0.0f) == 0x8000);
  CHECK(internal::float_to_half(std::numeric_limits<float>::infinity()) == 0x7c00);
  CHECK(internal::float_to_half(-std::numeric_limits<float>::infinity()) == 0xfc00);
  const std::uint16_t nan = internal::float_to_half(std::numeric_limits<float>::quiet_NaN());
  CHECK((nan & 0x7c00) == 0x7c00);
  CHECK((nan & 0x03ff) != 0);
  CHECK(internal::float_to_half(std::numeric_limits<float>::denorm_min()) == 0x0000);

  // Every half survives half -> float -> half unchanged (NaNs stay NaN).
  int bad = 0;
  for (std::uint32_t h = 0; h <= 0xffff; ++h) {
    const auto h16 = static_cast<std::uint16_t>(h);
    const float f = internal::half_to_float(h16);
    const std::uint16_t back = internal::float_to_half(f);
    const bool is_nan = (h16 & 0x7c00) == 0x7c00 && (h16 & 0x3ff);
    if (is_nan ? !std::isnan(internal::half_to_float(back)) : back != h16) ++bad;
  }
  CHECK(bad == 0);
}

TEST_CASE("safetensors: BF16 conversion and round-to-nearest-even") {
  CHECK(internal::bf16_to_float(0x3f80) == 1.0f);
  CHECK(internal::bf16_to_float(0xc020) == -2.5f);
  CHECK(internal::bf16_to_float(0x7f80) == std::numeric_limits<float>::infinity());
  CHECK(std::isnan(internal::bf16_to_float(0x7fc0)));
  CHECK(internal::bf16_to_float(0x0001) == internal::bits_float(0x00010000u));  // subnormal
  CHECK(internal::float_to_bf16(1.0f) == 0x3f80);
  CHECK(internal::float_to_bf16(-2.5f) == 0xc020);
  CHECK(internal::float_to_bf16(internal::bits_float(0x3f808000u)) == 0x3f80);  // tie, even stays
  CHECK(internal::float_to_bf16(internal::bits_float(0x3f818000u)) == 0x3f82);  // tie, odd rounds up
  CHECK(internal::float_to_bf16(internal::bits_float(0x3f808001u)) == 0x3f81);  // above tie
  CHECK(internal::float_to_bf16(internal::bits_float(0x3f807fffu)) == 0x3f80);  // below tie
  CHECK(internal::float_to_bf16(std::numeric_limits<float>::max()) == 0x7f80);  // rounds to inf
  CHECK(internal::float_to_bf16(std::numeric_limits<float>::infinity()) == 0x7f80);
  CHECK(internal::float_to_bf16(-std::numeric_limits<float>::infinity()) == 0xff80);
  const std::uint16_t nan = internal::float_to_bf16(internal::bits_float(0x7f800001u));  // payload only in low bits
  CHECK(std::isnan(internal::bf16_to_float(nan)));

  // double -> BF16 is rounded once: 1 + 2^-8 + 2^-40 is just above the tie, so it rounds up,
  // where double -> float -> BF16 would land exactly on the tie and round down to 1.0.
  CHECK(internal::double_to_bf16(1.0 + std::ldexp(1.0, -8) + std::ldexp(1.0, -40)) == 0x3f81);
  CHECK(internal::double_to_bf16(1.0 + std::ldexp(1.0, -8)) == 0x3f80);
  CHECK(internal::double_to_half(1.0 + std::ldexp(1.0, -11) + std::ldexp(1.0, -40)) == 0x3c01);
  CHECK(internal::double_to_half(1e300) == 0x7c00);
  CHECK(internal::double_to_bf16(-1e300) == 0xff80);
}

// ---- round trips -------------------------------------------------------------------------------

TEST_CASE("safetensors: write then read every dtype into float and double") {
  TempDir dir;
  RowMatrix<float> mf(3, 5);  // [3, 5]
  RowMatrix<double> md(2, 7);  // [2, 7]
  std::mt19937 rng(7);
  std::normal_distribution<double> nd(0.0, 3.0);
  for (molora::Index i = 0; i < mf.size(); ++i) mf.data()[i] = static_cast<float>(nd(rng));
  for (molora::Index i = 0; i < md.size(); ++i) md.data()[i] = nd(rng);
  mf(0, 0) = std::numeric_limits<float>::infinity();  // non-finite values are stored as they are
  mf(0, 1) = std::numeric_limits<float>::quiet_NaN();
  Vector<float> bias(4);
  bias << 1.0f, -2.5f, 65504.0f, 0.125f;

  const std::string p = dir.file("all.safetensors");
  save_safetensors(p,
                   {make_tensor("f32", mf), make_tensor("f64", md), make_tensor("f16", mf, Dtype::F16),
                    make_tensor("bf16", mf, Dtype::BF16), make_tensor("d_as_f32", md, Dtype::F32),
                    make_tensor("d_as_bf16", md, Dtype::BF16), make_tensor("d_as_f16", md, Dtype::F16),
                    make_tensor("bias", bias), make_tensor("bias_f16", bias, Dtype::F16)},
                   {{"format", "pt"}, {"producer", "molora test"}});

  SafetensorsReader r(p);
  CHECK(r.names() == std::vector<std::string>{"bf16", "bias", "bias_f16", "d_as_bf16", "d_as_f16", "d_as_f32", "f16", "f32", "f64"});
  CHECK(r.metadata().at("format") == "pt");
  CHECK(r.metadata().at("producer") == "molora test");
  CHECK(r.info("f16").dtype == Dtype::F16);
  CHECK(r.info("f16").shape == std::vector<std::uint64_t>{3, 5});
  CHECK(r.info("f16").nbytes() == 30);

  // F32 and F64 are exact, bit for bit (NaN compared by bits).
  const RowMatrix<float> f32 = r.matrix<float>("f32");
  CHECK(std::memcmp(f32.data(), mf.data(), sizeof(float) * static_cast<std::size_t>(mf.size())) == 0);
  const RowMatrix<double> f64 = r.matrix<double>("f64");
  CHECK(std::memcmp(f64.data(), md.data(), sizeof(double) * static_cast<std::size_t>(md.size())) == 0);
  CHECK(r.matrix<double>("f32").cast<float>().rightCols(3) == mf.rightCols(3));

  // F16/BF16 hold exactly the converted bits.
  const std::uint8_t* raw16 = r.bytes("f16");
  const std::uint8_t* rawb = r.bytes("bf16");
  for (molora::Index i = 0; i < mf.size(); ++i) {
    std::uint16_t h, b;
    std::memcpy(&h, raw16 + 2 * i, 2);
    std::memcpy(&b, rawb + 2 * i, 2);
    CHECK(h == internal::float_to_half(mf.data()[i]));
    CHECK(b == internal::float_to_bf16(mf.data()[i]));
  }
  const RowMatrix<float> f16 = r.matrix<float>("f16");
  CHECK(std::isinf(f16(0, 0)));
  CHECK(std::isnan(f16(0, 1)));
  CHECK(f16.rightCols(3).isApprox(mf.rightCols(3), 1e-3f));
  CHECK(r.matrix<double>("bf16").rightCols(3).cast<float>().isApprox(mf.rightCols(3), 1e-2f));
  for (molora::Index i = 0; i < md.size(); ++i) {
    std::uint16_t b;
    std::memcpy(&b, r.bytes("d_as_bf16") + 2 * i, 2);
    CHECK(b == internal::double_to_bf16(md.data()[i]));
  }
  CHECK(r.matrix<double>("d_as_f32").isApprox(md, 1e-6));
  CHECK(r.matrix<double>("d_as_f16").isApprox(md, 1e-3));

  // 1-D tensors: [n] read as [1, n] or as a vector; F16 holds these values exactly.
  CHECK(r.matrix<float>("bias").rows() == 1);
  CHECK(r.vector<float>("bias") == bias);
  CHECK(r.vector<double>("bias_f16") == bias.cast<double>());
  r.expect_shape("bias", 4);
  r.expect_shape("f32", 3, 5);

  // Zero-copy views point into the mapping.
  const auto v = r.view<float>("f32");
  CHECK(reinterpret_cast<const std::uint8_t*>(v.data()) == r.bytes("f32"));
  CHECK(v.rows() == 3);
  CHECK(v.cols() == 5);
  const auto vd = r.view<double>("f64");
  CHECK(vd(1, 6) == md(1, 6));
}

TEST_CASE("safetensors: the writer's layout matches the reference (sorted, contiguous, padded)") {
  TempDir dir;
  RowMatrix<float> a = RowMatrix<float>::Constant(1, 3, 1.0f);  // [1, 3]
  RowMatrix<double> b = RowMatrix<double>::Constant(2, 1, 2.0);  // [2, 1]
  const std::string p = dir.file("layout.safetensors");
  save_safetensors(p, {make_tensor("zeta", a), make_tensor("alpha", b)});
  const auto bytes = read_bytes(p);
  std::uint64_t n = 0;
  for (int i = 7; i >= 0; --i) n = (n << 8) | bytes[static_cast<std::size_t>(i)];
  CHECK((8 + n) % 8 == 0);
  const std::string header(bytes.begin() + 8, bytes.begin() + 8 + static_cast<std::ptrdiff_t>(n));
  CHECK(header.find_last_not_of(' ') + 1 >= header.size() - 7);
  CHECK(bytes.size() == 8 + n + 16 + 12);
  SafetensorsReader r(p);
  CHECK(r.info("alpha").begin == 0);
  CHECK(r.info("alpha").end == 16);
  CHECK(r.info("zeta").begin == 16);
  CHECK(r.info("zeta").end == 28);
  CHECK(r.metadata().empty());
  CHECK(header.find("__metadata__") == std::string::npos);
}

TEST_CASE("safetensors: re-saving what was read reproduces the file bit for bit") {
  TempDir dir;
  RowMatrix<float> a(2, 2);
  a << 1.5f, -0.0f, std::numeric_limits<float>::quiet_NaN(), 3e-42f;  // includes -0, NaN, subnormal
  RowMatrix<double> c(1, 3);
  c << 1e-310, -7.25, 1e300;
  std::vector<std::uint16_t> h = {0x0001, 0x7bff, 0xfc00, 0x7e01};
  const std::string p1 = dir.file("one.safetensors");
  save_safetensors(p1,
                   {make_tensor("a", a), make_tensor("b", a, Dtype::BF16), make_tensor("c", c),
                    make_tensor_raw("h", Dtype::F16, {2, 2}, h.data()), make_tensor_raw("i", Dtype::I32, {1}, "\x01\x02\x03\x04"),
                    make_tensor_raw("empty", Dtype::F32, {0, 3}, nullptr)},
                   {{"k", "v"}});
  SafetensorsReader r(p1);
  std::vector<TensorToWrite> again;
  for (const auto& name : r.names()) {
    const auto& t = r.info(name);
    again.push_back(make_tensor_raw(name, t.dtype, t.shape, r.bytes(name)));
  }
  const std::string p2 = dir.file("two.safetensors");
  save_safetensors(p2, again, r.metadata());
  CHECK(read_bytes(p1) == read_bytes(p2));
  const RowMatrix<float> hm = r.matrix<float>("h");
  CHECK(hm(0, 0) == std::ldexp(1.0f, -24));
  CHECK(hm(0, 1) == 65504.0f);
  CHECK(hm(1, 0) == -std::numeric_limits<float>::infinity());
  CHECK(std::isnan(hm(1, 1)));
  CHECK(r.matrix<float>("empty").rows() == 0);
  CHECK(r.matrix<float>("empty").cols() == 3);
  CHECK(r.matrix<double>("c") == c);
}

TEST_CASE("safetensors: in-memory reader, unaligned data, scalars, gaps and any order") {
  // Header of 13 bytes puts the data at offset 21: not 4-byte aligned in the buffer.
  const std::string header = R"({"s":{"dtype":"F32","shape":[],"data_offsets":[8,12]},"t":{"dtype":"F32","shape":[1],"data_offsets":[0,4]}})";
  std::vector<std::uint8_t> data(12);
  const float one = 1.0f, two = 2.0f;
  std::memcpy(data.data(), &one, 4);
  std::memcpy(data.data() + 8, &two, 4);  // bytes 4..8 are a gap
  auto bytes = st_file(header, data);
  SafetensorsReader r(bytes.data(), bytes.size());
  CHECK(r.source() == "<memory>");
  CHECK(r.matrix<float>("s")(0, 0) == 2.0f);
  CHECK(r.vector<double>("t")(0) == 1.0);
  CHECK(r.size() == 2);

  // Pad the header so the data section starts at 1 mod 4 in the (aligned) buffer copy.
  std::string h2 = header;
  while ((8 + h2.size()) % 4 != 1) h2 += ' ';
  auto b2 = st_file(h2, data);
  SafetensorsReader rr(b2.data(), b2.size(), "unaligned");
  const std::string msg = error_of([&] { (void)rr.view<float>("t"); });
  CHECK(contains(msg, "unaligned: tensor 't'"));
  CHECK(contains(msg, "aligned"));
  CHECK(rr.matrix<float>("t")(0, 0) == 1.0f);  // the copying path works on unaligned data
  const std::string missing = error_of([&] { (void)rr.matrix<float>("u"); });
  CHECK(contains(missing, "'u'"));
}

TEST_CASE("safetensors: accessor errors name the tensor and say expected vs actual") {
  TempDir dir;
  const std::string p = dir.file("acc.safetensors");
  std::vector<std::int32_t> ints = {1, 2, 3, 4, 5, 6, 7, 8};
  RowMatrix<float> m = RowMatrix<float>::Ones(2, 3);
  save_safetensors(p, {make_tensor("w", m), make_tensor_raw("ids", Dtype::I32, {2, 4}, ints.data()),
                       make_tensor_raw("cube", Dtype::F32, {2, 2, 2}, std::vector<float>(8, 1.0f).data())});
  SafetensorsReader r(p);
  CHECK(r.has("w"));
  CHECK_FALSE(r.has("nope"));

  std::string msg = error_of([&] { (void)r.matrix<float>("nope"); });
  CHECK(contains(msg, "'nope'"));
  CHECK(contains(msg, p));
  msg = error_of([&] { (void)r.info("nope"); });
  CHECK(contains(msg, "no such tensor"));
  msg = error_of([&] { SafetensorsReader d(dir.path.string()); });
  CHECK(contains(msg, "not a regular file"));
  msg = error_of([&] { SafetensorsReader d(dir.file("absent.safetensors")); });
  CHECK(contains(msg, "absent.safetensors: cannot open"));

  msg = error_of([&] { r.expect_shape("w", 3, 2); });
  CHECK(contains(msg, "'w'"));
  CHECK(contains(msg, "expected [3, 2], got [2, 3]"));
  msg = error_of([&] { r.expect_shape("w", 6); });
  CHECK(contains(msg, "expected [6], got [2, 3]"));

  msg = error_of([&] { (void)r.matrix<float>("ids"); });
  CHECK(contains(msg, "'ids'"));
  CHECK(contains(msg, "got I32"));
  msg = error_of([&] { (void)r.matrix<double>("cube"); });
  CHECK(contains(msg, "rank"));
  msg = error_of([&] { (void)r.vector<float>("w"); });
  CHECK(contains(msg, "got [2, 3]"));
  msg = error_of([&] { (void)r.view<double>("w"); });
  CHECK(contains(msg, "expected F64, got F32"));
}

TEST_CASE("safetensors: writer rejects bad input and never leaves a partial file") {
  TempDir dir;
  RowMatrix<float> m = RowMatrix<float>::Ones(1, 2);
  const std::string p = dir.file("w.safetensors");
  std::string msg = error_of([&] { save_safetensors(p, {make_tensor("x", m), make_tensor("x", m)}); });
  CHECK(contains(msg, "'x'"));
  CHECK(contains(msg, "duplicate"));
  msg = error_of([&] { save_safetensors(p, {make_tensor("__metadata__", m)}); });
  CHECK(contains(msg, "reserved"));
  TensorToWrite bad = make_tensor("y", m);
  bad.shape = {3};
  msg = error_of([&] { save_safetensors(p, {bad}); });
  CHECK(contains(msg, "'y'"));
  CHECK(contains(msg, "expected 12, got 8"));
  msg = error_of([&] { save_safetensors(p, {make_tensor("\xff\xfe", m)}); });
  CHECK(contains(msg, "UTF-8"));
  msg = error_of([&] { (void)make_tensor("i", m, Dtype::I32); });
  CHECK(contains(msg, "'i'"));
  CHECK_FALSE(fs::exists(p));

  // A target that cannot be replaced (a non-empty directory): the error names it, no temp remains.
  fs::create_directories(dir.path / "busy" / "inner");
  msg = error_of([&] { save_safetensors((dir.path / "busy").string(), {make_tensor("x", m)}); });
  CHECK(contains(msg, "busy"));
  msg = error_of([&] { save_safetensors((dir.path / "no_such_dir" / "f").string(), {make_tensor("x", m)}); });
  CHECK(contains(msg, "no_such_dir"));
  int entries = 0;
  for (const auto& e : fs::directory_iterator(dir.path)) entries += e.path().filename() != "busy";
  CHECK(entries == 0);

  // Overwriting an existing file replaces it whole.
  save_safetensors(p, {make_tensor("x", m)});
  save_safetensors(p, {make_tensor("z", m, Dtype::F64)});
  SafetensorsReader r(p);
  CHECK(r.names() == std::vector<std::string>{"z"});
}

// ---- malformed files ---------------------------------------------------------------------------

TEST_CASE("safetensors: malformed files are format_errors that say what is wrong") {
  TempDir dir;
  const std::string entry_f32_2 = R"({"dtype":"F32","shape":[2],"data_offsets":[0,8]})";
  std::string msg;

  SUBCASE("empty file") {
    msg = open_error(dir, {});
    CHECK(contains(msg, "at least 8 bytes, got 0"));
    CHECK(contains(msg, "bad.safetensors"));
  }
  SUBCASE("shorter than 8 bytes") {
    msg = open_error(dir, {1, 0, 0});
    CHECK(contains(msg, "at least 8 bytes, got 3"));
  }
  SUBCASE("header length past the end of the file") {
    auto b = st_file(R"({"a":)" + entry_f32_2 + "}", zeros(8));
    b.resize(20);
    msg = open_error(dir, b);
    CHECK(contains(msg, "header length"));
    CHECK(contains(msg, "at most 12"));
  }
  SUBCASE("header length over 100 MB") {
    auto b = st_file("{}");
    const std::uint64_t n = 100000001;
    for (int i = 0; i < 8; ++i) b[static_cast<std::size_t>(i)] = static_cast<std::uint8_t>(n >> (8 * i));
    msg = open_error(dir, b);
    CHECK(contains(msg, "at most 100000000"));
    std::vector<std::uint8_t> huge(16, 0xff);
    msg = open_error(dir, huge);
    CHECK(contains(msg, "header length"));
  }
  SUBCASE("truncated data section") {
    msg = open_error(dir, st_file(R"({"a":)" + entry_f32_2 + "}", zeros(4)));
    CHECK(contains(msg, "'a'"));
    CHECK(contains(msg, "data_offsets end: expected at most the data size 4, got 8"));
  }
  SUBCASE("invalid JSON") {
    msg = open_error(dir, st_file(R"({"a": {"dtype": )"));
    CHECK(contains(msg, "not valid JSON"));
    msg = open_error(dir, st_file("{\"\xff\": 1}"));  // not UTF-8
    CHECK(contains(msg, "not valid JSON"));
  }
  SUBCASE("deeply nested header") {
    msg = open_error(dir, st_file(R"({"t":{"extra":)" + std::string(100, '[') + std::string(100, ']') + "}}"));
    CHECK(contains(msg, "nesting depth"));
    msg = open_error(dir, st_file(R"({"__metadata__":{"a":)" + std::string(100, '[') + std::string(100, ']') + "}}"));
    CHECK(contains(msg, "__metadata__ entry 'a': expected a string, got array"));
  }
  SUBCASE("top level not an object") {
    msg = open_error(dir, st_file("[1, 2]"));
    CHECK(contains(msg, "expected a JSON object, got array"));
  }
  SUBCASE("entry not an object") {
    msg = open_error(dir, st_file(R"({"a": 3})"));
    CHECK(contains(msg, "'a'"));
  }
  SUBCASE("missing dtype / shape / data_offsets") {
    msg = open_error(dir, st_file(R"({"a":{"shape":[2],"data_offsets":[0,8]}})", zeros(8)));
    CHECK(contains(msg, "'a'"));
    CHECK(contains(msg, "dtype"));
    msg = open_error(dir, st_file(R"({"b":{"dtype":"F32","data_offsets":[0,8]}})", zeros(8)));
    CHECK(contains(msg, "'b'"));
    CHECK(contains(msg, "shape"));
    msg = open_error(dir, st_file(R"({"c":{"dtype":"F32","shape":[2]}})", zeros(8)));
    CHECK(contains(msg, "'c'"));
    CHECK(contains(msg, "data_offsets"));
  }
  SUBCASE("wrong field types") {
    msg = open_error(dir, st_file(R"({"a":{"dtype":5,"shape":[2],"data_offsets":[0,8]}})", zeros(8)));
    CHECK(contains(msg, "dtype: expected a string"));
    msg = open_error(dir, st_file(R"({"a":{"dtype":"F32","shape":[-2],"data_offsets":[0,8]}})", zeros(8)));
    CHECK(contains(msg, "non-negative integer, got -2"));
    msg = open_error(dir, st_file(R"({"a":{"dtype":"F32","shape":[2.0],"data_offsets":[0,8]}})", zeros(8)));
    CHECK(contains(msg, "non-negative integer"));
    msg = open_error(dir, st_file(R"({"a":{"dtype":"F32","shape":[2],"data_offsets":[0]}})", zeros(8)));
    CHECK(contains(msg, "[begin, end]"));
    msg = open_error(dir, st_file(R"({"a":{"dtype":"F32","shape":2,"data_offsets":[0,8]}})", zeros(8)));
    CHECK(contains(msg, "shape: expected an array"));
  }
  SUBCASE("offsets out of range") {
    msg = open_error(dir, st_file(R"({"a":{"dtype":"F32","shape":[2],"data_offsets":[8,16]}})", zeros(8)));
    CHECK(contains(msg, "'a'"));
    CHECK(contains(msg, "expected at most the data size 8, got 16"));
    msg = open_error(dir, st_file(R"({"a":{"dtype":"F32","shape":[2],"data_offsets":[0,18446744073709551615]}})", zeros(8)));
    CHECK(contains(msg, "data size"));
  }
  SUBCASE("begin > end") {
    msg = open_error(dir, st_file(R"({"a":{"dtype":"F32","shape":[0],"data_offsets":[8,0]}})", zeros(8)));
    CHECK(contains(msg, "'a'"));
    CHECK(contains(msg, "expected begin <= end, got [8, 0]"));
  }
  SUBCASE("overlapping ranges") {
    msg = open_error(dir, st_file(R"({"a":{"dtype":"F32","shape":[2],"data_offsets":[0,8]},)"
                                  R"("b":{"dtype":"F32","shape":[2],"data_offsets":[4,12]}})",
                                  zeros(12)));
    CHECK(contains(msg, "'b'"));
    CHECK(contains(msg, "overlap tensor 'a'"));
    // the same range twice
    msg = open_error(dir, st_file(R"({"a":{"dtype":"F32","shape":[2],"data_offsets":[0,8]},)"
                                  R"("b":{"dtype":"I32","shape":[2],"data_offsets":[0,8]}})",
                                  zeros(8)));
    CHECK(contains(msg, "overlap"));
  }
  SUBCASE("unknown dtype") {
    msg = open_error(dir, st_file(R"({"a":{"dtype":"F8_E4M3","shape":[2],"data_offsets":[0,2]}})", zeros(2)));
    CHECK(contains(msg, "'a'"));
    CHECK(contains(msg, "got 'F8_E4M3'"));
  }
  SUBCASE("shape x dtype disagrees with the byte range") {
    msg = open_error(dir, st_file(R"({"a":{"dtype":"F16","shape":[2,3],"data_offsets":[0,8]}})", zeros(8)));
    CHECK(contains(msg, "'a'"));
    CHECK(contains(msg, "expected 12 bytes, got 8 bytes"));
  }
  SUBCASE("overflow in the shape product") {
    msg = open_error(dir, st_file(R"({"a":{"dtype":"F32","shape":[4611686018427387904,8],"data_offsets":[0,0]}})"));
    CHECK(contains(msg, "'a'"));
    CHECK(contains(msg, "overflows"));
    // product fits 64 bits, product x dtype size does not
    msg = open_error(dir, st_file(R"({"a":{"dtype":"F64","shape":[4611686018427387904],"data_offsets":[0,0]}})"));
    CHECK(contains(msg, "overflows"));
  }
  SUBCASE("duplicate tensor name") {
    msg = open_error(dir, st_file(R"({"a":{"dtype":"U8","shape":[1],"data_offsets":[0,1]},)"
                                  R"("a":{"dtype":"U8","shape":[1],"data_offsets":[1,2]}})",
                                  zeros(2)));
    CHECK(contains(msg, "'a'"));
    CHECK(contains(msg, "duplicate tensor name"));
    msg = open_error(dir, st_file(R"({"a":{"dtype":"U8","dtype":"F32","shape":[1],"data_offsets":[0,1]}})", zeros(1)));
    CHECK(contains(msg, "'a'"));
    CHECK(contains(msg, "duplicate key 'dtype'"));
  }
  SUBCASE("bad __metadata__") {
    msg = open_error(dir, st_file(R"({"__metadata__":{"format":1}})"));
    CHECK(contains(msg, "__metadata__ entry 'format': expected a string, got number"));
    msg = open_error(dir, st_file(R"({"__metadata__":["pt"]})"));
    CHECK(contains(msg, "__metadata__"));
  }
}

TEST_CASE("safetensors: accepted edge cases (empty header object, zero dims, any order, gaps)") {
  TempDir dir;
  const std::string p = dir.file("ok.safetensors");
  write_bytes(p, st_file("{}"));
  CHECK(SafetensorsReader(p).size() == 0);
  write_bytes(p, st_file(R"({"z":{"dtype":"F32","shape":[0,18446744073709551615],"data_offsets":[4,4]},)"
                       R"("b":{"dtype":"BF16","shape":[1],"data_offsets":[6,8]},)"
                       R"("a":{"dtype":"BOOL","shape":[2],"data_offsets":[0,2]}})",
                       {1, 0, 9, 9, 9, 9, 0x80, 0x3f}));
  SafetensorsReader r(p);
  CHECK(r.names() == std::vector<std::string>{"a", "b", "z"});
  CHECK(r.info("z").numel == 0);
  CHECK(r.matrix<float>("b")(0, 0) == 1.0f);
  const std::string msg = error_of([&] { (void)r.matrix<float>("z"); });
  CHECK(contains(msg, "does not fit"));  // 2^64-1 columns cannot be an Eigen index
}

TEST_CASE("safetensors: the fuzz seed corpus only ever raises format_error") {
  const fs::path corpus = fs::path(MOLORA_TEST_DATA_DIR) / ".." / "fuzz" / "corpus" / "fuzz_safetensors";
  REQUIRE(fs::is_directory(corpus));
  int valid = 0, files = 0;
  for (const auto& e : fs::directory_iterator(corpus)) {
    ++files;
    const auto bytes = read_bytes(e.path().string());
    try {
      SafetensorsReader r(bytes.data(), bytes.size(), e.path().filename().string());
      for (const auto& name : r.names()) {
        try {
          (void)r.matrix<float>(name);
        } catch (const molora::format_error&) {
        }
      }
      ++valid;
    } catch (const molora::format_error&) {
    }
  }
  CHECK(files >= 5);
  CHECK(valid >= 3);  // valid_f32, valid_mixed, valid_3d
}

}  // namespace test_safetensors
