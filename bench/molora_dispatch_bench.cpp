// molora_dispatch_bench: time a mixed-adapter batch on your own shapes, no code to write.
// For each cell of a sweep (every combination of the list-valued flags) it builds N
// adapters over one in -> out base layer (MoLoRA adapters with E experts, top-k, rank r; plain
// LoRAs when E = 1), picks each token's adapter (Identical: all one adapter; Distinct: token
// t uses adapter t mod N; Uniform; Skewed: Zipf with exponent --zipf), picks experts (the
// routers' own gating, or synthetic uniform / Zipf expert load), and times, alternately in
// one loop: the base layer alone, base + the AdapterSet's one-pass forward ("set"), and base
// + the adapter-only loop that each adapter's own add_delta runs over its gathered tokens
// ("loop", as vLLM's CPU path does). Prints a table; --json / --csv write every cell.
// Run with --help for the flags. Exit status: 0 ok, 2 bad flags.
#include <algorithm>
#include <chrono>
#include <cmath>
#include <cstdint>
#include <cstdio>
#include <cstdlib>
#include <fstream>
#include <map>
#include <memory>
#include <random>
#include <sstream>
#include <stdexcept>
#include <string>
#include <vector>

#include <molora/adapter_set.hpp>
#include <molora/molora.hpp>

#if defined(MOLORA_USE_OPENMP)
#include <omp.h>
#endif

namespace {

using molora::Index;
using Mat = molora::RowMatrix<float>;

const char* const kUsage =
    "usage: molora_dispatch_bench [flags]   (lists: comma-separated values, swept)\n"
    "  --in N              base input features (default 4096)\n"
    "  --out N             base output features (default 4096)\n"
    "  --E LIST            experts per adapter; 1 = plain LoRA (default 8)\n"
    "  --k LIST            experts per token (default 2; 1 when E = 1)\n"
    "  --r LIST            rank (default 16)\n"
    "  --T LIST            tokens per batch (default 1,16,64,256)\n"
    "  --adapters LIST     adapters in the set (default 16)\n"
    "  --popularity LIST   identical | distinct | uniform | skewed (default uniform)\n"
    "  --zipf S            Zipf exponent of skewed popularity (default 1.0)\n"
    "  --router R          own | uniform | zipf: how experts are picked (default own)\n"
    "  --router-zipf S     Zipf exponent of --router zipf (default 1.0)\n"
    "  --strategy S        both | set | loop (default both)\n"
    "  --threads N         OpenMP threads (builds with MOLORA_OPENMP; default 1)\n"
    "  --min-time SEC      timing per cell (default 0.3)\n"
    "  --seed N            random seed (default 1)\n"
    "  --json FILE         write every cell as JSON (- = stdout)\n"
    "  --csv FILE          write every cell as CSV (- = stdout)\n"
    "  --quiet             no table, no progress\n"
    "  --help              this text\n";

struct BadFlag : std::runtime_error {
  using std::runtime_error::runtime_error;
};

struct Options {
  Index in = 4096, out = 4096;
  std::vector<Index> E{8}, k{2}, r{16}, T{1, 16, 64, 256}, adapters{16};
  std::vector<std::string> popularity{"uniform"};
  double zipf = 1.0, router_zipf = 1.0, min_time = 0.3;
  std::string router = "own", strategy = "both", json, csv;
  int threads = 1;
  std::uint64_t seed = 1;
  bool quiet = false;
};

Index parse_index(const std::string& flag, const std::string& v, Index lo) {
  char* end = nullptr;
  const long long x = std::strtoll(v.c_str(), &end, 10);
  if (v.empty() || *end != '\0' || x < lo || x > (1LL << 40))
    throw BadFlag(flag + ": expected an integer >= " + std::to_string(lo) + ", got '" + v + "'");
  return static_cast<Index>(x);
}
double parse_double(const std::string& flag, const std::string& v, double lo) {
  char* end = nullptr;
  const double x = std::strtod(v.c_str(), &end);
  if (v.empty() || *end != '\0' || !std::isfinite(x) || x < lo)
    throw BadFlag(flag + ": expected a number >= " + std::to_string(lo) + ", got '" + v + "'");
  return x;
}
std::vector<std::string> split(const std::string& v) {
  std::vector<std::string> out;
  std::stringstream ss(v);
  for (std::string item; std::getline(ss, item, ',');) out.push_back(item);
  if (out.empty()) out.push_back("");
  return out;
}
std::vector<Index> parse_list(const std::string& flag, const std::string& v, Index lo) {
  std::vector<Index> out;
  for (const auto& s : split(v)) out.push_back(parse_index(flag, s, lo));
  return out;
}
std::string one_of(const std::string& flag, const std::string& v, const std::vector<std::string>& allowed) {
  for (const auto& a : allowed)
    if (v == a) return v;
  std::string list;
  for (const auto& a : allowed) list += (list.empty() ? "" : " | ") + a;
  throw BadFlag(flag + ": expected " + list + ", got '" + v + "'");
}

Options parse(int argc, char** argv) {
  Options o;
  for (int i = 1; i < argc; ++i) {
    std::string flag = argv[i], value;
    const bool has_inline = flag.rfind("--", 0) == 0 && flag.find('=') != std::string::npos;
    if (has_inline) {
      value = flag.substr(flag.find('=') + 1);
      flag = flag.substr(0, flag.find('='));
    }
    auto next = [&]() -> std::string {
      if (has_inline) return value;
      if (i + 1 >= argc) throw BadFlag(flag + ": expected a value");
      return argv[++i];
    };
    if (flag == "--help" || flag == "-h") {
      std::fputs(kUsage, stdout);
      std::exit(0);
    } else if (flag == "--quiet") {
      o.quiet = true;
    } else if (flag == "--in") {
      o.in = parse_index(flag, next(), 1);
    } else if (flag == "--out") {
      o.out = parse_index(flag, next(), 1);
    } else if (flag == "--E") {
      o.E = parse_list(flag, next(), 1);
    } else if (flag == "--k") {
      o.k = parse_list(flag, next(), 1);
    } else if (flag == "--r") {
      o.r = parse_list(flag, next(), 1);
    } else if (flag == "--T") {
      o.T = parse_list(flag, next(), 1);
    } else if (flag == "--adapters") {
      o.adapters = parse_list(flag, next(), 1);
    } else if (flag == "--popularity") {
      o.popularity.clear();
      for (const auto& p : split(next())) o.popularity.push_back(one_of(flag, p, {"identical", "distinct", "uniform", "skewed"}));
    } else if (flag == "--zipf") {
      o.zipf = parse_double(flag, next(), 0);
    } else if (flag == "--router") {
      o.router = one_of(flag, next(), {"own", "uniform", "zipf"});
    } else if (flag == "--router-zipf") {
      o.router_zipf = parse_double(flag, next(), 0);
    } else if (flag == "--strategy") {
      o.strategy = one_of(flag, next(), {"both", "set", "loop"});
    } else if (flag == "--threads") {
      o.threads = static_cast<int>(parse_index(flag, next(), 1));
    } else if (flag == "--min-time") {
      o.min_time = parse_double(flag, next(), 0);
    } else if (flag == "--seed") {
      o.seed = static_cast<std::uint64_t>(parse_index(flag, next(), 0));
    } else if (flag == "--json") {
      o.json = next();
    } else if (flag == "--csv") {
      o.csv = next();
    } else {
      throw BadFlag("unknown flag '" + flag + "'");
    }
  }
  for (const Index E : o.E)
    for (const Index k : o.k)
      if (E > 1 && k > E) throw BadFlag("--k: expected values <= every --E (" + std::to_string(E) + "), got " + std::to_string(k));
#if !defined(MOLORA_USE_OPENMP)
  if (o.threads != 1) throw BadFlag("--threads: expected 1 (this build has no OpenMP), got " + std::to_string(o.threads));
#endif
  return o;
}

// Draws from [0, n) with P(i) proportional to 1 / (i + 1)^s (s = 0: uniform).
struct Zipf {
  std::vector<double> cdf;
  Zipf(Index n, double s) {
    double acc = 0;
    for (Index i = 0; i < n; ++i) cdf.push_back(acc += 1.0 / std::pow(double(i + 1), s));
    for (double& c : cdf) c /= acc;
  }
  Index draw(std::mt19937_64& g) const {
    const double u = std::uniform_real_distribution<double>(0, 1)(g);
    return std::min<Index>(static_cast<Index>(std::lower_bound(cdf.begin(), cdf.end(), u) - cdf.begin()),
                           static_cast<Index>(cdf.size()) - 1);
  }
};

void fill(float* p, Index n, std::uint64_t seed, float scale) {
  std::uint64_t s = seed * 0x9E3779B97F4A7C15ULL + 1;
  for (Index i = 0; i < n; ++i) {
    s = s * 6364136223846793005ULL + 1442695040888963407ULL;
    p[i] = scale * (static_cast<float>(static_cast<std::uint32_t>(s >> 40)) / 8388608.0f - 1.0f);
  }
}

// One adapter in both forms: the trainable object (for the loop) and the set's view of it.
struct Adapter {
  std::shared_ptr<molora::MoLoRAAdapter<float>> molora;
  std::shared_ptr<molora::LoRA<float>> lora;
  molora::SetAdapter<float>::Ptr view;
};

Adapter make_adapter(Index in, Index out, Index E, Index k, Index r, std::uint64_t seed) {
  Adapter a;
  const float sa = 1.0f / std::sqrt(float(in)), sb = 0.02f;
  if (E == 1) {
    a.lora = std::make_shared<molora::LoRA<float>>(in, out, r, 2.0 * double(r));
    fill(a.lora->mutable_A().data(), r * in, seed, sa);
    fill(a.lora->mutable_B().data(), r * out, seed + 1, sb);
    a.view = molora::SetAdapter<float>::share(std::shared_ptr<const molora::LoRA<float>>(a.lora));
  } else {
    molora::MoLoRAConfig c;
    c.in_features = in;
    c.out_features = out;
    c.num_experts = E;
    c.top_k = k;
    c.rank = r;
    a.molora = std::make_shared<molora::MoLoRAAdapter<float>>(c);
    fill(a.molora->router().mutable_weight().data(), E * in, seed + 2, sa);
    fill(a.molora->mutable_stacked_A().data(), E * r * in, seed, sa);
    fill(a.molora->mutable_stacked_B().data(), E * r * out, seed + 1, sb);
    a.view = molora::SetAdapter<float>::share(std::shared_ptr<const molora::MoLoRAAdapter<float>>(a.molora));
  }
  return a;
}

struct Cell {
  Index in, out, E, k, r, T, N;
  std::string popularity, router, strategy;
  double base_ms = 0, set_ms = 0, loop_ms = 0;
  double tokens_per_s = 0, gflops = 0, adapted_over_base = 0, set_over_loop = 0, adapter_gbps = 0;
  Index active_experts = 0, adapters_used = 0;
  double expert_load = 0, adapter_load = 0, routed_mb = 0;  // load: max over mean
};

double median(std::vector<double> v) {
  std::sort(v.begin(), v.end());
  return v.empty() ? 0 : v[v.size() / 2];
}

using Clock = std::chrono::steady_clock;
template <class F>
double time_ms(F&& f) {
  const auto t0 = Clock::now();
  f();
  return std::chrono::duration<double, std::milli>(Clock::now() - t0).count();
}

Cell run_cell(const Options& o, Index E, Index k, Index r, Index T, Index N, const std::string& pop) {
  if (E == 1) k = 1;
  Cell c{o.in, o.out, E, k, r, T, N, pop, o.router, o.strategy};
  std::mt19937_64 g(o.seed * 1000003 + static_cast<std::uint64_t>(T * 31 + N));
  // Base layer (its own adapter is unused) and the N adapters.
  molora::MoLoRAConfig bc;
  bc.in_features = o.in;
  bc.out_features = o.out;
  bc.num_experts = 1;
  bc.top_k = 1;
  bc.rank = 1;
  molora::MoLoRALinear<float> base(bc);
  {
    Mat w(o.out, o.in);
    fill(w.data(), w.size(), o.seed + 7, 1.0f / std::sqrt(float(o.in)));
    base.set_base_weight(w);
  }
  std::vector<Adapter> adapters;
  std::vector<molora::SetAdapter<float>::Ptr> views;
  for (Index a = 0; a < N; ++a) {
    adapters.push_back(make_adapter(o.in, o.out, E, k, r, o.seed * 7919 + static_cast<std::uint64_t>(a)));
    views.push_back(adapters.back().view);
  }
  const molora::AdapterSet<float> set(o.in, o.out, views);
  Mat x(T, o.in), y(T, o.out);
  fill(x.data(), x.size(), o.seed + 11, 1.0f);

  // Which adapter each token uses.
  std::vector<std::int32_t> ids(static_cast<std::size_t>(T));
  const Zipf pop_zipf(N, pop == "skewed" ? o.zipf : 0.0);
  for (Index t = 0; t < T; ++t)
    ids[static_cast<std::size_t>(t)] = static_cast<std::int32_t>(
        pop == "identical" ? 0 : pop == "distinct" ? t % N : pop_zipf.draw(g));

  // Which experts: the routers' own, or synthetic (k distinct experts, weights 1/k).
  molora::AdapterSetWorkspace<float> ws;
  molora::SetRouting<float> routing;
  const bool own = o.router == "own";
  if (own) {
    routing = set.route_tokens(x, ids, ws);
  } else {
    const Zipf ez(E, o.router == "zipf" ? o.router_zipf : 0.0);
    routing.adapter = ids;
    routing.offsets.assign(1, 0);
    for (Index t = 0; t < T; ++t) {
      std::vector<std::int32_t> chosen;
      while (static_cast<Index>(chosen.size()) < k) {
        const auto e = static_cast<std::int32_t>(ez.draw(g));
        if (std::find(chosen.begin(), chosen.end(), e) == chosen.end()) chosen.push_back(e);
      }
      for (const auto e : chosen) {
        routing.experts.push_back(e);
        routing.weights.push_back(1.0f / float(k));
      }
      routing.offsets.push_back(routing.offsets.back() + k);
    }
  }
  // The loop's per-adapter batches (gathered outside the timing only for the caller routing).
  std::vector<std::vector<Index>> tokens_of(static_cast<std::size_t>(N));
  for (Index t = 0; t < T; ++t) tokens_of[static_cast<std::size_t>(ids[static_cast<std::size_t>(t)])].push_back(t);
  std::vector<molora::Routing<float>> loop_routing(static_cast<std::size_t>(N));
  for (Index a = 0; a < N; ++a) {
    const auto& toks = tokens_of[static_cast<std::size_t>(a)];
    auto& lr = loop_routing[static_cast<std::size_t>(a)];
    lr.resize(static_cast<Index>(toks.size()), k);
    for (std::size_t i = 0; i < toks.size(); ++i)
      for (Index s = 0; s < k; ++s) {
        const auto q = static_cast<std::size_t>(routing.offsets[static_cast<std::size_t>(toks[i])] + s);
        lr.ids(static_cast<Index>(i), s) = routing.experts[q];
        lr.weights(static_cast<Index>(i), s) = routing.weights[q];
      }
  }
  std::vector<molora::MoLoRAWorkspace<float>> loop_ws(static_cast<std::size_t>(N));
  Mat xa(T, o.in), ya(T, o.out);

  auto run_set = [&] {
    base.forward_base(x, y);
    if (own)
      set.add_delta(x, ids, y, ws);
    else
      set.add_delta_routed(x, routing, y, ws);
  };
  auto run_loop = [&] {
    base.forward_base(x, y);
    for (Index a = 0; a < N; ++a) {
      const auto& toks = tokens_of[static_cast<std::size_t>(a)];
      if (toks.empty()) continue;
      const auto n = static_cast<Index>(toks.size());
      for (Index i = 0; i < n; ++i) {
        xa.row(i) = x.row(toks[static_cast<std::size_t>(i)]);
        ya.row(i) = y.row(toks[static_cast<std::size_t>(i)]);
      }
      const Adapter& ad = adapters[static_cast<std::size_t>(a)];
      if (ad.lora)
        ya.topRows(n) += ad.lora->delta(xa.topRows(n));
      else if (own)
        ad.molora->add_delta(xa.topRows(n), ya.topRows(n), loop_ws[static_cast<std::size_t>(a)]);
      else
        ad.molora->add_delta_routed(xa.topRows(n), loop_routing[static_cast<std::size_t>(a)], ya.topRows(n),
                                    loop_ws[static_cast<std::size_t>(a)]);
      for (Index i = 0; i < n; ++i) y.row(toks[static_cast<std::size_t>(i)]) = ya.row(i);
    }
  };
  // Warm up, then alternate until min_time has passed (at least 3 rounds).
  run_set();
  run_loop();
  std::vector<double> tb, ts, tl;
  const auto start = Clock::now();
  const bool do_set = o.strategy != "loop", do_loop = o.strategy != "set";
  while (tb.size() < 3 || std::chrono::duration<double>(Clock::now() - start).count() < o.min_time) {
    tb.push_back(time_ms([&] { base.forward_base(x, y); }));
    if (do_set) ts.push_back(time_ms(run_set));
    if (do_loop) tl.push_back(time_ms(run_loop));
    if (tb.size() >= 100000) break;
  }
  c.base_ms = median(tb);
  c.set_ms = median(ts);
  c.loop_ms = median(tl);
  const double adapted_ms = do_set ? c.set_ms : c.loop_ms;

  // Loads from the routing: pairs per used virtual expert, tokens per used adapter.
  std::map<std::pair<std::int32_t, std::int32_t>, Index> per_expert;
  std::vector<Index> per_adapter(static_cast<std::size_t>(N), 0);
  double flops = 2.0 * double(T) * double(o.in) * double(o.out);  // base
  for (Index t = 0; t < T; ++t) {
    const std::int32_t a = ids[static_cast<std::size_t>(t)];
    ++per_adapter[static_cast<std::size_t>(a)];
    if (E > 1 && own) flops += 2.0 * double(o.in) * double(E);  // router
    for (Index q = routing.offsets[static_cast<std::size_t>(t)]; q < routing.offsets[static_cast<std::size_t>(t) + 1]; ++q) {
      ++per_expert[{a, routing.experts[static_cast<std::size_t>(q)]}];
      flops += 2.0 * double(r) * double(o.in + o.out);
    }
  }
  c.active_experts = static_cast<Index>(per_expert.size());
  Index max_e = 0, max_a = 0;
  for (const auto& kv : per_expert) max_e = std::max(max_e, kv.second);
  for (const Index n : per_adapter) {
    max_a = std::max(max_a, n);
    c.adapters_used += n > 0 ? 1 : 0;
  }
  c.expert_load = c.active_experts ? double(max_e) / (double(T * k) / double(c.active_experts)) : 0;
  c.adapter_load = c.adapters_used ? double(max_a) / (double(T) / double(c.adapters_used)) : 0;
  c.routed_mb = double(c.active_experts) * double(r) * double(o.in + o.out) * sizeof(float) / 1e6;
  c.tokens_per_s = adapted_ms > 0 ? double(T) / (adapted_ms * 1e-3) : 0;
  c.gflops = adapted_ms > 0 ? flops / (adapted_ms * 1e6) : 0;
  c.adapted_over_base = c.base_ms > 0 ? adapted_ms / c.base_ms : 0;
  c.set_over_loop = do_set && do_loop && c.loop_ms > 0 ? c.set_ms / c.loop_ms : 0;
  const double added_ms = adapted_ms - c.base_ms;
  c.adapter_gbps = added_ms > 0 ? c.routed_mb / added_ms : 0;  // MB/ms = GB/s
  return c;
}

const char* const kColumns[] = {"in", "out", "E", "k", "r", "T", "adapters", "popularity", "router", "strategy",
                                "base_ms", "set_ms", "loop_ms", "tokens_per_s", "gflops", "adapted_over_base",
                                "set_over_loop", "active_experts", "expert_load", "adapters_used", "adapter_load",
                                "routed_mb", "adapter_gbps"};

std::vector<std::string> values(const Cell& c) {
  auto num = [](double v) {
    char b[64];
    std::snprintf(b, sizeof b, "%.6g", v);
    return std::string(b);
  };
  return {std::to_string(c.in), std::to_string(c.out), std::to_string(c.E), std::to_string(c.k), std::to_string(c.r),
          std::to_string(c.T), std::to_string(c.N), c.popularity, c.router, c.strategy, num(c.base_ms), num(c.set_ms),
          num(c.loop_ms), num(c.tokens_per_s), num(c.gflops), num(c.adapted_over_base), num(c.set_over_loop),
          std::to_string(c.active_experts), num(c.expert_load), std::to_string(c.adapters_used), num(c.adapter_load),
          num(c.routed_mb), num(c.adapter_gbps)};
}

void write_to(const std::string& path, const std::string& text) {
  if (path == "-") {
    std::fputs(text.c_str(), stdout);
    return;
  }
  std::ofstream f(path);
  f << text;
  if (!f) throw std::runtime_error("cannot write " + path);
}

std::string as_json(const std::vector<Cell>& cells) {
  std::string s = "[\n";
  for (std::size_t i = 0; i < cells.size(); ++i) {
    const auto v = values(cells[i]);
    s += "  {";
    for (std::size_t j = 0; j < v.size(); ++j) {
      const bool text = j >= 7 && j <= 9;
      s += std::string(j ? ", " : "") + "\"" + kColumns[j] + "\": " + (text ? "\"" + v[j] + "\"" : v[j]);
    }
    s += i + 1 < cells.size() ? "},\n" : "}\n";
  }
  return s + "]\n";
}

std::string as_csv(const std::vector<Cell>& cells) {
  std::string s;
  for (std::size_t j = 0; j < std::size(kColumns); ++j) s += std::string(j ? "," : "") + kColumns[j];
  s += "\n";
  for (const Cell& c : cells) {
    const auto v = values(c);
    for (std::size_t j = 0; j < v.size(); ++j) s += (j ? "," : "") + v[j];
    s += "\n";
  }
  return s;
}

void print_table(const std::vector<Cell>& cells) {
  std::printf("%5s %4s %3s %3s %5s %4s %-10s %8s %9s %9s %10s %8s %7s %7s %6s %7s %7s\n", "T", "N", "E", "k", "r",
              "pop", "router", "base_ms", "set_ms", "loop_ms", "tokens/s", "GFLOP/s", "adp/bas", "set/lp",
              "expts", "e_load", "a_load");
  for (const Cell& c : cells)
    std::printf("%5ld %4ld %3ld %3ld %5ld %4.4s %-10s %8.3f %9.3f %9.3f %10.0f %8.2f %7.3f %7.3f %6ld %7.2f %7.2f\n",
                static_cast<long>(c.T), static_cast<long>(c.N), static_cast<long>(c.E), static_cast<long>(c.k),
                static_cast<long>(c.r), c.popularity.c_str(), c.router.c_str(), c.base_ms, c.set_ms, c.loop_ms,
                c.tokens_per_s, c.gflops, c.adapted_over_base, c.set_over_loop, static_cast<long>(c.active_experts),
                c.expert_load, c.adapter_load);
}

}  // namespace

int main(int argc, char** argv) {
  Options o;
  try {
    o = parse(argc, argv);
  } catch (const BadFlag& e) {
    std::fprintf(stderr, "molora_dispatch_bench: %s\n%s", e.what(), kUsage);
    return 2;
  }
#if defined(MOLORA_USE_OPENMP)
  omp_set_num_threads(o.threads);
#endif
  try {
    std::vector<Cell> cells;
    const std::size_t total = o.E.size() * o.k.size() * o.r.size() * o.T.size() * o.adapters.size() * o.popularity.size();
    if (!o.quiet)
      std::printf("molora_dispatch_bench: in %ld, out %ld, ISA %s, %d thread(s), %zu cell(s)\n", static_cast<long>(o.in),
                  static_cast<long>(o.out), molora::kernels::active_isa().c_str(), o.threads, total);
    for (const Index E : o.E)
      for (const Index k : o.k)
        for (const Index r : o.r)
          for (const Index N : o.adapters)
            for (const auto& pop : o.popularity)
              for (const Index T : o.T) {
                if (!o.quiet && total > 1)
                  std::fprintf(stderr, "[%zu/%zu] E=%ld k=%ld r=%ld adapters=%ld %s T=%ld\n", cells.size() + 1, total,
                               static_cast<long>(E), static_cast<long>(k), static_cast<long>(r), static_cast<long>(N),
                               pop.c_str(), static_cast<long>(T));
                cells.push_back(run_cell(o, E, k, r, T, N, pop));
              }
    if (!o.quiet) print_table(cells);
    if (!o.json.empty()) write_to(o.json, as_json(cells));
    if (!o.csv.empty()) write_to(o.csv, as_csv(cells));
  } catch (const std::exception& e) {
    std::fprintf(stderr, "molora_dispatch_bench: %s\n", e.what());
    return 1;
  }
  return 0;
}
