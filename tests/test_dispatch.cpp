// The kernels' ISA chosen at run time (kernels/dispatched.hpp and the library
// molora::kernels). tests/cmake/isa.cmake builds this file twice:
//  - test_dispatch_native: -march=native with the ISA pinned at compile time (MOLORA_PIN_ISA),
//    writes the results of a fixed layer and of fixed backward-kernel calls, with the name of
//    its ISA, to MOLORA_DISPATCH_OUTPUTS;
//  - test_dispatch: no -march, kernels through the run-time table: the ISA chosen is the best
//    /proc/cpuinfo reports (or MOLORA_ISA), force_isa switches and refuses as it should, and
//    the same results equal the native build's bit for bit when both run the same ISA.
#include <doctest/doctest.h>

#include <algorithm>
#include <cstdint>
#include <cstdlib>
#include <fstream>
#include <set>
#include <sstream>
#include <string>
#include <vector>

#include <molora/molora.hpp>

namespace k = molora::kernels;
using molora::Index;

namespace {

// Values j / 1024 for integers j in [-1000, 1000], drawn by integer arithmetic only: exact in
// float and double and the same bits in both builds, whatever their flags.
struct Draw {
  std::uint64_t s;
  double next() {
    s = s * 6364136223846793005ULL + 1442695040888963407ULL;
    return double(std::int64_t((s >> 33) % 2001) - 1000) / 1024.0;
  }
  template <class Scalar>
  void fill(Scalar* p, Index n) {
    for (Index i = 0; i < n; ++i) p[i] = static_cast<Scalar>(next());
  }
};

template <class Scalar>
void append(std::string& out, const Scalar* p, Index n) {
  out.append(reinterpret_cast<const char*>(p), static_cast<std::size_t>(n) * sizeof(Scalar));
}

// The adapter's delta (fused strategy: router logits by the shrink kernel, then the fused
// kernels) and its gate weights, at odd sizes and token counts across the tile sizes.
template <class Scalar>
void layer_outputs(std::string& out) {
  molora::MoLoRAConfig cfg;
  cfg.in_features = 300;
  cfg.out_features = 131;
  cfg.num_experts = 8;
  cfg.top_k = 2;
  cfg.rank = 16;
  Draw d{7};
  molora::MoLoRAAdapter<Scalar> a(cfg);
  a.set_strategy(molora::Strategy::fused);
  d.fill(a.mutable_stacked_A().data(), a.mutable_stacked_A().size());
  d.fill(a.mutable_stacked_B().data(), a.mutable_stacked_B().size());
  d.fill(a.router().mutable_weight().data(), a.router().mutable_weight().size());
  for (const Index T : {1, 3, 8, 37}) {
    molora::RowMatrix<Scalar> x(T, cfg.in_features), y = molora::RowMatrix<Scalar>::Zero(T, cfg.out_features);
    d.fill(x.data(), x.size());
    typename molora::MoLoRAAdapter<Scalar>::Workspace ws;
    const auto& routing = a.add_delta(x, y, ws);
    append(out, y.data(), y.size());
    append(out, routing.weights.data(), routing.weights.size());
  }
}

// grad_out and grad_in (with dx, a mask and an extra row) on one tile of 5 tokens.
template <class Scalar>
void backward_kernel_outputs(std::string& out) {
  const Index r = 17, width = 300, n = 5;
  Draw d{11};
  std::vector<Scalar> w(static_cast<std::size_t>(r * width)), dw(w.size()), rows(static_cast<std::size_t>(n * width));
  std::vector<Scalar> coef(static_cast<std::size_t>(n * (r + 1))), mask(rows.size()), dx(rows.size()),
      extra_w(static_cast<std::size_t>(width)), extra_dw(extra_w.size()), u(static_cast<std::size_t>(n * r));
  for (auto* v : {&w, &dw, &rows, &coef, &mask, &dx, &extra_w, &extra_dw}) d.fill(v->data(), Index(v->size()));
  std::vector<const Scalar*> xr, cr, mr, er;
  std::vector<Scalar*> dxr;
  for (Index t = 0; t < n; ++t) {
    xr.push_back(rows.data() + t * width);
    cr.push_back(coef.data() + t * (r + 1));
    er.push_back(coef.data() + t * (r + 1) + r);
    mr.push_back(mask.data() + t * width);
    dxr.push_back(dx.data() + t * width);
  }
  std::vector<Scalar> spill(static_cast<std::size_t>(k::grad_out_scratch_size<k::layer_arch, Scalar>(r)));
  k::grad_out(k::layer_arch{}, w.data(), width, dw.data(), width, r, width, xr.data(), coef.data(), r + 1, n,
              u.data(), r, spill.data());
  k::GradInTerm<Scalar> g;
  g.w = w.data();
  g.ldw = width;
  g.dw = dw.data();
  g.lddw = width;
  g.rows = r;
  g.x = xr.data();
  g.coef = cr.data();
  g.dx = dxr.data();
  g.mask = mr.data();
  g.n = n;
  g.extra_w = extra_w.data();
  g.extra_dw = extra_dw.data();
  g.extra_coef = er.data();
  std::vector<Scalar> scratch(static_cast<std::size_t>(k::grad_in_scratch_size(r + 1)));
  k::grad_in(k::layer_arch{}, &g, 1, width, scratch.data());
  for (const auto* v : {&u, &dw, &dx, &extra_dw}) append(out, v->data(), Index(v->size()));
}

std::string all_outputs() {
  std::string out;
  layer_outputs<float>(out);
  layer_outputs<double>(out);
  backward_kernel_outputs<float>(out);
  backward_kernel_outputs<double>(out);
  return out;
}

}  // namespace

#if MOLORA_RUNTIME_DISPATCH

namespace {

// Whether the library holds the ISA's object (CMake's MOLORA_KERNEL_ISAS).
bool built(const std::string& isa) {
  const std::string list = std::string(",") + MOLORA_BUILT_ISAS + ",";
  return list.find("," + isa + ",") != std::string::npos;
}

// The ISAs /proc/cpuinfo's flags allow and the library holds, best first (the flags each ISA
// object is built with).
std::vector<std::string> cpuinfo_isas() {
  std::ifstream f("/proc/cpuinfo");
  std::string line;
  std::set<std::string> flags;
  while (std::getline(f, line))
    if (line.rfind("flags", 0) == 0) {
      std::istringstream words(line.substr(line.find(':') + 1));
      for (std::string w; words >> w;) flags.insert(w);
      break;
    }
  auto has = [&](std::initializer_list<const char*> need) {
    for (const char* n : need)
      if (!flags.count(n)) return false;
    return true;
  };
  std::vector<std::string> isas;
  auto add = [&](const char* isa) {
    if (built(isa)) isas.emplace_back(isa);
  };
  if (has({"avx512f", "avx512bw", "avx512dq", "avx512vl", "avx2", "fma"})) add("avx512");
  if (has({"avx2", "fma"})) add("avx2");
  if (has({"sse4_2"})) add("sse4.2");
  isas.emplace_back("scalar");
  return isas;
}

Index float_lanes(const std::string& isa) {
  return isa == "avx512" ? 16 : isa == "avx2" ? 8 : isa == "sse4.2" ? 4 : 1;
}

}  // namespace

TEST_CASE("dispatch: the kernels run MOLORA_ISA if set, else the best ISA the CPU reports") {
  const auto cpu = cpuinfo_isas();
  CHECK(k::available_isas() == cpu);
  const char* env = std::getenv("MOLORA_ISA");
  const std::string want = env && *env ? std::string(env) : cpu.front();
  MESSAGE("CPU's best ISA: " << cpu.front() << ", running: " << k::active_isa());
  CHECK(k::active_isa() == want);
  CHECK(k::active_kernels<float>().simd_width == float_lanes(want));
  CHECK(k::active_kernels<double>().simd_width == std::max<Index>(1, float_lanes(want) / 2));
}

TEST_CASE("dispatch: force_isa switches to each ISA the CPU has and refuses the others") {
  const std::string before = k::active_isa();
  const auto cpu = cpuinfo_isas();
  for (const auto& isa : cpu) {
    k::force_isa(isa);
    CHECK(k::active_isa() == isa);
    CHECK(k::active_kernels<float>().simd_width == float_lanes(isa));
  }
  CHECK_THROWS_WITH_AS(k::force_isa("avx9000"), doctest::Contains("got avx9000"),
                       molora::config_error);
  CHECK_THROWS_AS(k::force_isa(""), molora::config_error);
  for (const std::string isa : {"avx512", "avx2", "sse4.2"})
    if (std::find(cpu.begin(), cpu.end(), isa) == cpu.end()) {
      CAPTURE(isa);
      CHECK_THROWS_WITH_AS(k::force_isa(isa), doctest::Contains(built(isa) ? "this CPU has" : "this build of"),
                           molora::config_error);
    }
  CHECK(k::active_isa() == cpu.back());  // a refused ISA leaves the last one forced
  k::force_isa(before);
  CHECK(k::active_isa() == before);
}

#ifdef MOLORA_DISPATCH_OUTPUTS
TEST_CASE("dispatch: results equal the native build's bit for bit") {
  std::ifstream f(MOLORA_DISPATCH_OUTPUTS, std::ios::binary);
  REQUIRE_MESSAGE(f.good(), "no " MOLORA_DISPATCH_OUTPUTS ": run test_dispatch_native first");
  std::string native_isa;
  std::getline(f, native_isa);
  const std::string want((std::istreambuf_iterator<char>(f)), std::istreambuf_iterator<char>());
  if (native_isa != k::active_isa()) {
    MESSAGE("the native build runs " << native_isa << ", this run " << k::active_isa() << ": not compared");
    return;
  }
  const std::string got = all_outputs();
  REQUIRE(got.size() == want.size());
  std::size_t first = 0;
  while (first < got.size() && got[first] == want[first]) ++first;
  CAPTURE(first);
  CHECK(first == got.size());
}
#else
// A sanitizer build has no native twin (tests/cmake/isa.cmake): the same calls run through the
// table, under the sanitizers, and twice give the same bits.
TEST_CASE("dispatch: the fixed calls repeat bit for bit (no native build to compare with)") {
  const std::string first = all_outputs();
  CHECK(!first.empty());
  CHECK(first == all_outputs());
}
#endif

#else

TEST_CASE("dispatch (native build): the compiled ISA; results written for test_dispatch") {
  const std::string isa = k::isa_name<k::default_arch>();
  MESSAGE("native ISA: " << isa);
  CHECK(k::active_isa() == isa);
  CHECK(k::available_isas() == std::vector<std::string>{isa});
  CHECK_NOTHROW(k::force_isa(isa));
  CHECK_THROWS_AS(k::force_isa(isa == "scalar" ? "avx2" : "scalar"), molora::config_error);
  std::ofstream f(MOLORA_DISPATCH_OUTPUTS, std::ios::binary | std::ios::trunc);
  f << isa << '\n' << all_outputs();
  REQUIRE(f.good());
}

#endif
