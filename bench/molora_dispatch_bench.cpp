// molora_dispatch_bench: time a mixed-adapter batch on your own shapes, no code to write.
// For each cell of a sweep (every combination of the list-valued flags) it builds N
// adapters over one in -> out base layer (MoLoRA adapters with E experts, top-k, rank r; plain
// LoRAs when E = 1), picks each token's adapter (Identical: all one adapter; Distinct: token
// t uses adapter t mod N; Uniform; Skewed: Zipf with exponent --zipf), picks experts (the
// routers' own gating, or synthetic uniform / Zipf expert load), and times, in turns in one
// loop, the base layer alone and each strategy (--strategy): base + the AdapterSet's one-pass
// forward ("set"), base + the adapter-only loop ("loop", each adapter's own add_delta on its
// gathered tokens, as vLLM's CPU path does), a loop of whole layers per adapter ("whole"),
// merged weights per adapter ("merged", plain LoRAs only), one adapter's own forward over
// the batch ("single", Identical only) and one read of the routed adapters' bytes ("read").
// Each is timed warm and, after a write that evicts the caches, cold. Prints a table;
// --json / --csv write every cell. Run with --help for the flags. Exit status: 0 ok, 2 bad
// flags.
#include <algorithm>
#include <chrono>
#include <cmath>
#include <cstdint>
#include <cstdio>
#include <cstdlib>
#include <functional>
#include <limits>
#include <fstream>
#include <map>
#include <memory>
#include <random>
#include <sstream>
#include <stdexcept>
#include <string>
#include <vector>

#include <unistd.h>

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
    "  --adapters LIST     adapters in the set; T = as many as tokens (default 16)\n"
    "  --popularity LIST   identical | distinct | uniform | skewed (default uniform)\n"
    "  --zipf S            Zipf exponent of skewed popularity (default 1.0)\n"
    "  --router R          own | uniform | zipf: how experts are picked (default own)\n"
    "  --router-zipf S     Zipf exponent of --router zipf (default 1.0)\n"
    "  --strategy LIST     what is timed beside the base layer, in turns in one loop (default all):\n"
    "                        set     base + the AdapterSet's one-pass forward\n"
    "                        loop    base + each adapter's own add_delta on its gathered tokens\n"
    "                        whole   per adapter: its tokens gathered, base + its add_delta, scattered\n"
    "                        merged  per adapter: its tokens through W0 + s B A (E = 1 only, else n/a;\n"
    "                                n/a too when the merged weights exceed --merged-max-gb)\n"
    "                        single  base + adapter 0's own forward over all tokens (identical only)\n"
    "                        read    one read of the routed adapters' bytes (routers, used experts)\n"
    "                        all = set,loop,whole,merged,single,read; both = set,loop\n"
    "  --cache LIST        warm | cold: cold evicts the caches before each timed call by writing\n"
    "                      2x the L3 (size read from the machine) (default warm,cold)\n"
    "  --merged-max-gb G   memory allowed for merged weights (default 5)\n"
    "  --threads N         OpenMP threads (builds with MOLORA_OPENMP; default 1)\n"
    "  --min-time SEC      timing per cell, at least 3 rounds (default 0.3)\n"
    "  --seed N            random seed (default 1)\n"
    "  --json FILE         write every cell as JSON (- = stdout; n/a = null)\n"
    "  --csv FILE          write every cell as CSV (- = stdout; n/a = empty)\n"
    "  --quiet             no table, no progress\n"
    "  --help              this text\n";

enum Strategy { kSet, kLoop, kWhole, kMerged, kSingle, kRead, kStrategies };
const char* const kStrategyNames[kStrategies] = {"set", "loop", "whole", "merged", "single", "read"};

struct BadFlag : std::runtime_error {
  using std::runtime_error::runtime_error;
};

struct Options {
  Index in = 4096, out = 4096;
  std::vector<Index> E{8}, k{2}, r{16}, T{1, 16, 64, 256}, adapters{16};
  std::vector<std::string> popularity{"uniform"};
  double zipf = 1.0, router_zipf = 1.0, min_time = 0.3;
  std::string router = "own", strategy = "all", json, csv;
  bool run[kStrategies] = {true, true, true, true, true, true};
  bool warm = true, cold = true;
  double merged_max_gb = 5;
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
      o.adapters.clear();
      for (const auto& v : split(next())) o.adapters.push_back(v == "T" ? 0 : parse_index(flag, v, 1));
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
      o.strategy = next();
      std::fill(std::begin(o.run), std::end(o.run), false);
      for (const auto& v : split(o.strategy)) {
        const std::string w = one_of(flag, v, {"all", "both", "set", "loop", "whole", "merged", "single", "read"});
        for (int st = 0; st < kStrategies; ++st)
          if (w == "all" || w == kStrategyNames[st] || (w == "both" && (st == kSet || st == kLoop))) o.run[st] = true;
      }
    } else if (flag == "--cache") {
      o.warm = o.cold = false;
      for (const auto& v : split(next())) (one_of(flag, v, {"warm", "cold"}) == "warm" ? o.warm : o.cold) = true;
    } else if (flag == "--merged-max-gb") {
      o.merged_max_gb = parse_double(flag, next(), 0);
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

constexpr double kNA = std::numeric_limits<double>::quiet_NaN();  // not timed or does not apply

struct Cell {
  Index in = 0, out = 0, E = 0, k = 0, r = 0, T = 0, N = 0;
  std::string popularity, router, strategy;
  double base_ms = kNA, base_cold_ms = kNA;
  double ms[kStrategies] = {kNA, kNA, kNA, kNA, kNA, kNA};       // warm, base included but for read
  double cold_ms[kStrategies] = {kNA, kNA, kNA, kNA, kNA, kNA};  // after a cache eviction
  double added_cold_ms = kNA;                         // median over rounds of (set - base), both cold
  double set_delta_ms = kNA, set_delta_cold_ms = kNA;  // the set's add_delta alone
  double loop_delta_ms = kNA, loop_delta_cold_ms = kNA;  // the adapter-only loop alone
  double delta_over = kNA, delta_over_cold = kNA;      // set_delta / loop_delta
  double tokens_per_s = kNA, gflops = kNA, adapted_over_base = kNA, adapter_gbps = kNA;
  double over[kStrategies] = {kNA, kNA, kNA, kNA, kNA, kNA};       // set / strategy, warm
  double over_cold[kStrategies] = {kNA, kNA, kNA, kNA, kNA, kNA};  // set / strategy, cold
  double adapted_over_base_cold = kNA, added_over_read = kNA, delta_over_read = kNA;
  Index active_experts = 0, adapters_used = 0;
  Index rounds = 0, delta_pairs = 0, delta_pairs_cold = 0;  // samples behind the medians
  double expert_load = 0, adapter_load = 0, routed_mb = 0;  // load: max over mean
  std::string note;                                         // why a strategy is n/a
};

double median(std::vector<double> v) {
  std::sort(v.begin(), v.end());
  return v.empty() ? kNA : v[v.size() / 2];
}

// Median over rounds of a[i] / b[i] (n/a when either was not timed).
double paired(const std::vector<double>& a, const std::vector<double>& b) {
  if (a.empty() || a.size() != b.size()) return kNA;
  std::vector<double> q(a.size());
  for (std::size_t i = 0; i < a.size(); ++i) q[i] = a[i] / b[i];
  return median(q);
}

// One time per round of each thing timed, warm or cold.
struct Series {
  std::vector<double> base, set_delta, loop_delta;  // set_delta, loop_delta: every pair of every round
  std::vector<double> set_delta_round;               // the median of each round's set parts
  std::vector<double> full[kStrategies];
};

using Clock = std::chrono::steady_clock;
// The adapters' parts' block per round (warm, cold): at least this long, at most this many pairs.
constexpr double kDeltaBlockMs[2] = {20.0, 60.0};
constexpr int kDeltaMaxPairs = 256;
template <class F>
double time_ms(F&& f) {
  const auto t0 = Clock::now();
  f();
  return std::chrono::duration<double, std::milli>(Clock::now() - t0).count();
}

// The L3 size: /sys first (what lscpu reports), else sysconf; 0 if neither knows.
std::size_t l3_bytes(std::string& source) {
  for (int i = 0; i < 16; ++i) {
    const std::string dir = "/sys/devices/system/cpu/cpu0/cache/index" + std::to_string(i) + "/";
    std::ifstream level(dir + "level"), size(dir + "size");
    int lv = 0;
    std::string sz;
    if (!(level >> lv) || !(size >> sz) || lv != 3) continue;
    char* end = nullptr;
    const double v = std::strtod(sz.c_str(), &end);
    const double unit = *end == 'K' ? 1024.0 : *end == 'M' ? 1048576.0 : *end == 'G' ? 1073741824.0 : 1.0;
    if (v > 0) {
      source = dir + "size";
      return static_cast<std::size_t>(v * unit);
    }
  }
#if defined(_SC_LEVEL3_CACHE_SIZE)
  const long v = sysconf(_SC_LEVEL3_CACHE_SIZE);
  if (v > 0) {
    source = "sysconf";
    return static_cast<std::size_t>(v);
  }
#endif
  return 0;
}

// Makes the caches cold as between two layers of a model: writes one word of every line of
// a buffer twice the L3 (a plain loop: memset may use stores that bypass the caches).
class Evictor {
public:
  Evictor() {
    l3_ = l3_bytes(source_);
    if (l3_ == 0) source_ = "unknown, 128 MiB assumed";
    const std::size_t bytes = 2 * (l3_ ? l3_ : (std::size_t(128) << 20));
    buf_.assign(bytes / sizeof(std::uint64_t), 0);
  }
  void operator()() {
    ++v_;
    for (std::size_t i = 0; i < buf_.size(); i += 64 / sizeof(std::uint64_t)) buf_[i] = v_;
    asm volatile("" : : "r"(buf_.data()) : "memory");  // the stores are observable
  }
  std::size_t l3() const { return l3_; }
  std::size_t bytes() const { return buf_.size() * sizeof(std::uint64_t); }
  const std::string& source() const { return source_; }

private:
  std::vector<std::uint64_t> buf_;
  std::uint64_t v_ = 0;
  std::size_t l3_ = 0;
  std::string source_;
};

// One read of every region (the routed adapters' bytes), summed so nothing is skipped.
struct Region {
  const float* p;
  Index n;
};
float read_regions(const std::vector<Region>& regions) {
  float acc[64] = {};
  for (const Region& g : regions) {
    Index i = 0;
    for (; i + 64 <= g.n; i += 64)
      for (int j = 0; j < 64; ++j) acc[j] += g.p[i + j];
    for (; i < g.n; ++i) acc[0] += g.p[i];
  }
  float s = 0;
  for (const float a : acc) s += a;
  return s;
}
volatile float g_sink = 0;

Cell run_cell(const Options& o, Evictor& evict, Index E, Index k, Index r, Index T, Index N, const std::string& pop) {
  if (E == 1) k = 1;
  Cell c;
  c.in = o.in;
  c.out = o.out;
  c.E = E;
  c.k = k;
  c.r = r;
  c.T = T;
  c.N = N;
  c.popularity = pop;
  c.router = o.router;
  c.strategy = o.strategy;
  std::mt19937_64 g(o.seed * 1000003 + static_cast<std::uint64_t>(T * 31 + N));
  // Base layer (its own adapter is unused) and the N adapters.
  molora::MoLoRAConfig bc;
  bc.in_features = o.in;
  bc.out_features = o.out;
  bc.num_experts = 1;
  bc.top_k = 1;
  bc.rank = 1;
  molora::MoLoRALinear<float> base(bc);
  Mat w0(o.out, o.in);  // [out, in]
  fill(w0.data(), w0.size(), o.seed + 7, 1.0f / std::sqrt(float(o.in)));
  base.set_base_weight(w0);
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
  // The per-adapter batches of loop, whole and merged (made outside the timing; their
  // gathers and scatters are timed).
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

  // Loads and the routed adapters' bytes: each used adapter's router, each used expert.
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
  std::vector<Region> routed;
  for (Index a = 0; a < N; ++a)
    if (per_adapter[static_cast<std::size_t>(a)] > 0 && E > 1 && own)
      routed.push_back({set.adapter(a)->views().router_weight, E * o.in});
  for (const auto& kv : per_expert) {
    const auto& v = set.adapter(kv.first.first)->views();
    routed.push_back({v.A[static_cast<std::size_t>(kv.first.second)], r * o.in});
    routed.push_back({v.Bt[static_cast<std::size_t>(kv.first.second)], r * o.out});
  }
  for (const Region& g2 : routed) c.routed_mb += double(g2.n) * sizeof(float) / 1e6;

  // Merged weights W0 + s B A, one per used plain LoRA (E = 1), if they fit the budget.
  const bool any_used = std::any_of(per_adapter.begin(), per_adapter.end(), [](Index n) { return n > 0; });
  Index used = 0;
  for (const Index n : per_adapter) used += n > 0 ? 1 : 0;
  bool do_run[kStrategies];
  std::copy(std::begin(o.run), std::end(o.run), do_run);
  std::vector<Mat> merged_w(static_cast<std::size_t>(N));
  std::vector<std::unique_ptr<molora::MoLoRALinear<float>>> merged(static_cast<std::size_t>(N));
  if (do_run[kMerged] && E > 1) {
    do_run[kMerged] = false;
    c.note += "merged n/a: E > 1; ";
  }
  const double merged_gb = double(used) * double(o.in) * double(o.out) * sizeof(float) / 1e9;
  if (do_run[kMerged] && merged_gb > o.merged_max_gb) {
    do_run[kMerged] = false;
    c.note += "merged n/a: " + std::to_string(merged_gb) + " GB of merged weights > --merged-max-gb; ";
  }
  if (do_run[kMerged])
    for (Index a = 0; a < N; ++a) {
      if (per_adapter[static_cast<std::size_t>(a)] == 0) continue;
      Mat& wa = merged_w[static_cast<std::size_t>(a)];
      wa = w0;
      adapters[static_cast<std::size_t>(a)].lora->merge(wa);  // [out, in]
      merged[static_cast<std::size_t>(a)] = std::make_unique<molora::MoLoRALinear<float>>(bc);
      merged[static_cast<std::size_t>(a)]->wrap_base_weight(molora::MoLoRALinear<float>::BaseWeightMap(wa.data(), o.out, o.in));
    }
  if (do_run[kSingle] && pop != "identical") {
    do_run[kSingle] = false;
    c.note += "single n/a: not identical; ";
  }
  if (!any_used) do_run[kRead] = false;

  std::vector<molora::MoLoRAWorkspace<float>> loop_ws(static_cast<std::size_t>(N));
  molora::MoLoRAWorkspace<float> single_ws;
  Mat xa(T, o.in), ya(T, o.out);

  auto set_delta = [&] {
    if (own)
      set.add_delta(x, ids, y, ws);
    else
      set.add_delta_routed(x, routing, y, ws);
  };
  // One adapter's own delta on its gathered rows xa -> ya (n of them).
  auto adapter_delta = [&](Index a, Index n) {
    const Adapter& ad = adapters[static_cast<std::size_t>(a)];
    if (ad.lora)
      ya.topRows(n) += ad.lora->delta(xa.topRows(n));
    else if (own)
      ad.molora->add_delta(xa.topRows(n), ya.topRows(n), loop_ws[static_cast<std::size_t>(a)]);
    else
      ad.molora->add_delta_routed(xa.topRows(n), loop_routing[static_cast<std::size_t>(a)], ya.topRows(n),
                                  loop_ws[static_cast<std::size_t>(a)]);
  };
  // Per adapter: gather its tokens' x (and y), body(a, n), scatter ya back.
  auto per_adapter_loop = [&](bool gather_y, auto&& body) {
    for (Index a = 0; a < N; ++a) {
      const auto& toks = tokens_of[static_cast<std::size_t>(a)];
      if (toks.empty()) continue;
      const auto n = static_cast<Index>(toks.size());
      for (Index i = 0; i < n; ++i) {
        xa.row(i) = x.row(toks[static_cast<std::size_t>(i)]);
        if (gather_y) ya.row(i) = y.row(toks[static_cast<std::size_t>(i)]);
      }
      body(a, n);
      for (Index i = 0; i < n; ++i) y.row(toks[static_cast<std::size_t>(i)]) = ya.row(i);
    }
  };
  std::function<void()> run[kStrategies];
  run[kSet] = [&] {
    base.forward_base(x, y);
    set_delta();
  };
  run[kLoop] = [&] {
    base.forward_base(x, y);
    per_adapter_loop(true, adapter_delta);
  };
  run[kWhole] = [&] {
    per_adapter_loop(false, [&](Index a, Index n) {
      base.forward_base(xa.topRows(n), ya.topRows(n));
      adapter_delta(a, n);
    });
  };
  run[kMerged] = [&] {
    per_adapter_loop(false, [&](Index a, Index n) {
      merged[static_cast<std::size_t>(a)]->forward_base(xa.topRows(n), ya.topRows(n));
    });
  };
  run[kSingle] = [&] {
    base.forward_base(x, y);
    const Adapter& ad = adapters[0];
    if (ad.lora)
      y += ad.lora->delta(x);
    else if (own)
      ad.molora->add_delta(x, y, single_ws);
    else
      ad.molora->add_delta_routed(x, loop_routing[0], y, single_ws);
  };
  run[kRead] = [&] { g_sink = g_sink + read_regions(routed); };

  // The adapters' part alone (y += delta on whatever y holds): the set's one call, and the
  // adapter-only loop's gathers, add_deltas and scatters.
  auto loop_delta = [&] { per_adapter_loop(true, adapter_delta); };
  const bool deltas = do_run[kSet] && do_run[kLoop];

  // Warm up, then rounds until min_time has passed (at least 3): each round times the base
  // and every strategy warm (in turns, each after one untimed call of itself), then the two
  // adapter-only parts as a block of alternating pairs, then all again, each right after
  // evicting the caches. Ratios are medians of the per-round (per-pair for the adapters'
  // parts) ratios: paired, so a drift of the machine's speed between rounds cancels.
  for (int s = 0; s < kStrategies; ++s)
    if (do_run[s]) run[s]();
  Series warm, cold;
  const auto start = Clock::now();
  for (std::size_t round = 0;; ++round) {
    if (round >= 3 && std::chrono::duration<double>(Clock::now() - start).count() >= o.min_time) break;
    if (round >= 100000) break;
    for (const bool is_cold : {false, true}) {
      if (is_cold ? !o.cold : !o.warm) continue;
      Series& sr = is_cold ? cold : warm;
      auto timed = [&](auto&& f) {
        if (is_cold)
          evict();
        else
          f();  // the cold calls before left the caches cold: one untimed call first
        return time_ms(f);
      };
      // The things timed, in turns; every other round in reverse order, so that none is
      // always timed right after the same neighbour (what one call leaves in the caches).
      std::vector<std::pair<std::vector<double>*, std::function<void()>>> items;
      items.push_back({&sr.base, [&] { base.forward_base(x, y); }});
      for (int s = 0; s < kStrategies; ++s)
        if (do_run[s]) items.push_back({&sr.full[s], run[s]});
      if (round % 2 == 1) std::reverse(items.begin(), items.end());
      for (auto& item : items) item.first->push_back(timed(item.second));
      // The adapters' parts in their own block: pairs (set part, loop part), which one goes
      // first alternating from pair to pair, repeated for at least kDeltaBlockMs (and at
      // least 2 pairs). One pair per round gave the median of some 10-20 ratios of 0.01-0.5 ms
      // calls in a 2-s cell at T <= 16: too few to resolve a few percent.
      if (deltas) {
        const std::size_t first = sr.set_delta.size();
        const auto b0 = Clock::now();
        for (int j = 0; j < kDeltaMaxPairs; ++j) {
          if (j >= 2 && std::chrono::duration<double, std::milli>(Clock::now() - b0).count() >= kDeltaBlockMs[is_cold])
            break;
          const bool set_first = (j + static_cast<int>(round)) % 2 == 0;
          for (const bool is_set : {set_first, !set_first}) {
            if (is_set)
              sr.set_delta.push_back(timed(set_delta));
            else
              sr.loop_delta.push_back(timed(loop_delta));
          }
        }
        sr.set_delta_round.push_back(
            median(std::vector<double>(sr.set_delta.begin() + static_cast<std::ptrdiff_t>(first), sr.set_delta.end())));
      }
    }
    ++c.rounds;
  }
  c.delta_pairs = static_cast<Index>(warm.set_delta.size());
  c.delta_pairs_cold = static_cast<Index>(cold.set_delta.size());
  c.base_ms = median(warm.base);
  c.base_cold_ms = median(cold.base);
  for (int s = 0; s < kStrategies; ++s) {
    c.ms[s] = median(warm.full[s]);
    c.cold_ms[s] = median(cold.full[s]);
  }
  c.set_delta_ms = median(warm.set_delta);
  c.loop_delta_ms = median(warm.loop_delta);
  c.set_delta_cold_ms = median(cold.set_delta);
  c.loop_delta_cold_ms = median(cold.loop_delta);

  c.active_experts = static_cast<Index>(per_expert.size());
  Index max_e = 0, max_a = 0;
  for (const auto& kv : per_expert) max_e = std::max(max_e, kv.second);
  for (const Index n : per_adapter) max_a = std::max(max_a, n);
  c.adapters_used = used;
  c.expert_load = c.active_experts ? double(max_e) / (double(T * k) / double(c.active_experts)) : 0;
  c.adapter_load = used ? double(max_a) / (double(T) / double(used)) : 0;

  // Ratios: all from this one run. The adapted layer is the set, else the loop.
  const int adapted = do_run[kSet] ? kSet : kLoop;
  const double adapted_ms = c.ms[adapted];
  c.tokens_per_s = double(T) / (adapted_ms * 1e-3);
  c.gflops = flops / (adapted_ms * 1e6);
  c.adapted_over_base = paired(warm.full[adapted], warm.base);
  c.adapted_over_base_cold = paired(cold.full[adapted], cold.base);
  for (int s = kLoop; s <= kSingle; ++s) {
    c.over[s] = paired(warm.full[kSet], warm.full[s]);
    c.over_cold[s] = paired(cold.full[kSet], cold.full[s]);
  }
  c.delta_over = paired(warm.set_delta, warm.loop_delta);
  c.delta_over_cold = paired(cold.set_delta, cold.loop_delta);
  std::vector<double> added(cold.base.size());
  for (std::size_t i = 0; i < added.size() && !cold.full[kSet].empty(); ++i) added[i] = cold.full[kSet][i] - cold.base[i];
  c.added_cold_ms = cold.full[kSet].empty() ? kNA : median(added);
  c.added_over_read = paired(added, cold.full[kRead]);
  c.delta_over_read = paired(cold.set_delta_round, cold.full[kRead]);
  c.adapter_gbps = c.routed_mb / c.added_cold_ms;  // MB/ms = GB/s
  return c;
}

// One column of the JSON / CSV: a name and the cell's value as text (empty = n/a).
struct Column {
  std::string name;
  bool text;
  std::function<std::string(const Cell&)> value;
};

std::string num(double v) {
  if (std::isnan(v)) return "";
  char b[64];
  std::snprintf(b, sizeof b, "%.6g", v);
  return b;
}

std::vector<Column> columns() {
  std::vector<Column> cols;
  auto idx = [&](const char* n, Index Cell::*m) { cols.push_back({n, false, [m](const Cell& c) { return std::to_string(c.*m); }}); };
  auto txt = [&](const char* n, std::string Cell::*m) { cols.push_back({n, true, [m](const Cell& c) { return c.*m; }}); };
  auto dbl = [&](std::string n, std::function<double(const Cell&)> f) {
    cols.push_back({std::move(n), false, [f](const Cell& c) { return num(f(c)); }});
  };
  idx("in", &Cell::in);
  idx("out", &Cell::out);
  idx("E", &Cell::E);
  idx("k", &Cell::k);
  idx("r", &Cell::r);
  idx("T", &Cell::T);
  idx("adapters", &Cell::N);
  txt("popularity", &Cell::popularity);
  txt("router", &Cell::router);
  txt("strategy", &Cell::strategy);
  dbl("base_ms", [](const Cell& c) { return c.base_ms; });
  for (int s = 0; s < kStrategies; ++s) dbl(std::string(kStrategyNames[s]) + "_ms", [s](const Cell& c) { return c.ms[s]; });
  dbl("base_cold_ms", [](const Cell& c) { return c.base_cold_ms; });
  for (int s = 0; s < kStrategies; ++s)
    dbl(std::string(kStrategyNames[s]) + "_cold_ms", [s](const Cell& c) { return c.cold_ms[s]; });
  dbl("added_cold_ms", [](const Cell& c) { return c.added_cold_ms; });
  dbl("set_delta_ms", [](const Cell& c) { return c.set_delta_ms; });
  dbl("loop_delta_ms", [](const Cell& c) { return c.loop_delta_ms; });
  dbl("set_delta_cold_ms", [](const Cell& c) { return c.set_delta_cold_ms; });
  dbl("loop_delta_cold_ms", [](const Cell& c) { return c.loop_delta_cold_ms; });
  dbl("tokens_per_s", [](const Cell& c) { return c.tokens_per_s; });
  dbl("gflops", [](const Cell& c) { return c.gflops; });
  dbl("adapted_over_base", [](const Cell& c) { return c.adapted_over_base; });
  dbl("adapted_over_base_cold", [](const Cell& c) { return c.adapted_over_base_cold; });
  for (int s = kLoop; s <= kSingle; ++s) {
    dbl(std::string("set_over_") + kStrategyNames[s], [s](const Cell& c) { return c.over[s]; });
    dbl(std::string("set_over_") + kStrategyNames[s] + "_cold", [s](const Cell& c) { return c.over_cold[s]; });
  }
  dbl("set_delta_over_loop_delta", [](const Cell& c) { return c.delta_over; });
  dbl("set_delta_over_loop_delta_cold", [](const Cell& c) { return c.delta_over_cold; });
  dbl("added_over_read", [](const Cell& c) { return c.added_over_read; });
  dbl("delta_over_read", [](const Cell& c) { return c.delta_over_read; });
  idx("active_experts", &Cell::active_experts);
  dbl("expert_load", [](const Cell& c) { return c.expert_load; });
  idx("adapters_used", &Cell::adapters_used);
  dbl("adapter_load", [](const Cell& c) { return c.adapter_load; });
  dbl("routed_mb", [](const Cell& c) { return c.routed_mb; });
  dbl("adapter_gbps", [](const Cell& c) { return c.adapter_gbps; });
  idx("rounds", &Cell::rounds);
  idx("delta_pairs", &Cell::delta_pairs);
  idx("delta_pairs_cold", &Cell::delta_pairs_cold);
  return cols;
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
  const auto cols = columns();
  std::string s = "[\n";
  for (std::size_t i = 0; i < cells.size(); ++i) {
    s += "  {";
    for (std::size_t j = 0; j < cols.size(); ++j) {
      const std::string v = cols[j].value(cells[i]);
      s += std::string(j ? ", " : "") + "\"" + cols[j].name + "\": " + (cols[j].text ? "\"" + v + "\"" : v.empty() ? "null" : v);
    }
    s += i + 1 < cells.size() ? "},\n" : "}\n";
  }
  return s + "]\n";
}

std::string as_csv(const std::vector<Cell>& cells) {
  const auto cols = columns();
  std::string s;
  for (std::size_t j = 0; j < cols.size(); ++j) s += std::string(j ? "," : "") + cols[j].name;
  s += "\n";
  for (const Cell& c : cells) {
    for (std::size_t j = 0; j < cols.size(); ++j) {
      const std::string v = cols[j].value(c);  // a list (--strategy set,loop) is quoted
      s += (j ? "," : "") + (v.find(',') != std::string::npos ? "\"" + v + "\"" : v);
    }
    s += "\n";
  }
  return s;
}

void print_table(const std::vector<Cell>& cells) {
  auto f = [](double v, int prec) {
    char b[32];
    if (std::isnan(v))
      std::snprintf(b, sizeof b, " %7s", "n/a");
    else
      std::snprintf(b, sizeof b, " %7.*f", prec, v);
    return std::string(b);
  };
  std::printf("%5s %4s %3s %3s %4s %-5s %8s %8s %8s %7s", "T", "N", "E", "k", "r", "pop", "base_ms", "set_ms",
              "tokens/s", "GFLOP/s");
  for (int half = 0; half < 2; ++half)
    std::printf(" %s %7s %7s %7s %7s %7s %7s", half ? "|" : "", "adp/bas", "set/lp", "dS/dL", "set/whl", "set/mrg",
                "set/sgl");
  std::printf(" %7s %7s %7s %5s\n", "add/rd", "dlt/rd", "routMB", "expts");
  for (const Cell& c : cells) {
    std::printf("%5ld %4ld %3ld %3ld %4ld %-5.5s%s%s%s%s", static_cast<long>(c.T), static_cast<long>(c.N),
                static_cast<long>(c.E), static_cast<long>(c.k), static_cast<long>(c.r), c.popularity.c_str(),
                f(c.base_ms, 3).c_str(), f(c.ms[kSet], 3).c_str(), f(c.tokens_per_s, 0).c_str(), f(c.gflops, 2).c_str());
    std::printf(" %s%s%s%s%s%s", f(c.adapted_over_base, 3).c_str(), f(c.over[kLoop], 3).c_str(), f(c.delta_over, 3).c_str(),
                f(c.over[kWhole], 3).c_str(), f(c.over[kMerged], 3).c_str(), f(c.over[kSingle], 3).c_str());
    std::printf(" |%s%s%s%s%s%s", f(c.adapted_over_base_cold, 3).c_str(), f(c.over_cold[kLoop], 3).c_str(),
                f(c.delta_over_cold, 3).c_str(), f(c.over_cold[kWhole], 3).c_str(), f(c.over_cold[kMerged], 3).c_str(),
                f(c.over_cold[kSingle], 3).c_str());
    std::printf("%s%s%s %5ld\n", f(c.added_over_read, 3).c_str(), f(c.delta_over_read, 3).c_str(),
                f(c.routed_mb, 1).c_str(), static_cast<long>(c.active_experts));
  }
  std::printf("left of |: warm; right: cold (caches evicted before each call). set/X: the set's layer time over\n"
              "X's; dS/dL: the set's add_delta alone over the adapter-only loop alone; add/rd: (set - base) over\n"
              "one read of the routed adapters' bytes, all cold; dlt/rd: the set's add_delta alone over that read.\n"
              "Ratios are medians of per-round ratios.\n");
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
    Evictor evict;
    if (!o.quiet)
      std::printf("molora_dispatch_bench: in %ld, out %ld, ISA %s, %d thread(s), %zu cell(s), cold = %zu MiB written "
                  "(2x L3 %zu MiB, from %s)\n",
                  static_cast<long>(o.in), static_cast<long>(o.out), molora::kernels::active_isa().c_str(), o.threads,
                  total, evict.bytes() >> 20, evict.l3() >> 20, evict.source().c_str());
    for (const Index E : o.E)
      for (const Index k : o.k)
        for (const Index r : o.r)
          for (const Index N0 : o.adapters)
            for (const auto& pop : o.popularity)
              for (const Index T : o.T) {
                const Index N = N0 == 0 ? T : N0;
                if (!o.quiet && total > 1)
                  std::fprintf(stderr, "[%zu/%zu] E=%ld k=%ld r=%ld adapters=%ld %s T=%ld\n", cells.size() + 1, total,
                               static_cast<long>(E), static_cast<long>(k), static_cast<long>(r), static_cast<long>(N),
                               pop.c_str(), static_cast<long>(T));
                cells.push_back(run_cell(o, evict, E, k, r, T, N, pop));
              }
    if (!o.quiet) {
      print_table(cells);
      std::string notes;
      for (const Cell& c : cells) {
        const std::string line = "  " + c.note.substr(0, c.note.size() - 2) + "\n";  // without the last "; "
        if (!c.note.empty() && notes.find(line) == std::string::npos) notes += line;
      }
      if (!notes.empty()) std::printf("n/a:\n%s", notes.c_str());
    }
    if (!o.json.empty()) write_to(o.json, as_json(cells));
    if (!o.csv.empty()) write_to(o.csv, as_csv(cells));
  } catch (const std::exception& e) {
    std::fprintf(stderr, "molora_dispatch_bench: %s\n", e.what());
    return 1;
  }
  return 0;
}
