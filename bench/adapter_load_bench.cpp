// adapter_load_bench: load time and resident memory of many set adapters (docs/benchmarks.md,
// "Loading 100 adapters"). Writes --count adapters (MoLoRA: E experts, top-k, rank r; plain
// LoRAs: rank r) over one in -> out projection to one file each in a temporary directory with
// molora's own writer (save_set_adapters), once as F32 (used in place from the mapping) and
// once as BF16 (converted to float copies at load). Then, for each kind and dtype, a child
// process (so that every case starts from the same heap) loads all of them with
// load_set_adapter, builds one AdapterSet of all, and runs one forward in which token t uses
// adapter t (every adapter touched once). It reports the load time per adapter and in total,
// and VmRSS / RssAnon / RssFile from /proc/self/status before the load, after it and after
// the forward. "cold" first drops the files' pages from the page cache
// (posix_fadvise DONTNEED on each file, after fsync), so the load reads them from the disk;
// "warm" loads them as the writer left them (in the page cache). Last, an AdapterStore
// (adapter_store.hpp) with room for a quarter of the adapters cycles twice through all of
// them (every get a reload: LRU's worst case), with the same resident-memory readings.
// Not a test: no assertion.
#include <fcntl.h>
#include <sys/wait.h>
#include <unistd.h>

#include <algorithm>
#include <chrono>
#include <cmath>
#include <cstdio>
#include <cstdlib>
#include <fstream>
#include <map>
#include <memory>
#include <sstream>
#include <stdexcept>
#include <string>
#include <vector>

#include <molora/adapter_set.hpp>
#include <molora/adapter_store.hpp>
#include <molora/io/adapter_set.hpp>
#include <molora/molora.hpp>

namespace {

using molora::Index;
using Mat = molora::RowMatrix<float>;

const char* const kUsage =
    "usage: adapter_load_bench [flags]\n"
    "  --count N      adapters of each kind (default 100)\n"
    "  --in N         input features (default 4096)\n"
    "  --out N        output features (default 4096)\n"
    "  --E N          experts of the MoLoRA adapters (default 8)\n"
    "  --k N          their top-k (default 2)\n"
    "  --r N          rank of both kinds (default 16)\n"
    "  --dir DIR      where to write the files (default: a new directory under /tmp, removed after)\n"
    "  --help         this text\n";

struct Options {
  Index count = 100, in = 4096, out = 4096, E = 8, k = 2, r = 16;
  std::string dir;
};

Index parse_index(const std::string& flag, const char* v) {
  char* end = nullptr;
  const long long x = std::strtoll(v, &end, 10);
  if (*v == '\0' || *end != '\0' || x < 1 || x > (1LL << 30))
    throw std::invalid_argument(flag + ": expected an integer >= 1, got '" + v + "'");
  return static_cast<Index>(x);
}

// VmRSS, RssAnon and RssFile of this process in KiB (/proc/self/status).
struct Rss {
  long vm = 0, anon = 0, file = 0;
};
Rss read_rss() {
  Rss r;
  std::ifstream f("/proc/self/status");
  for (std::string line; std::getline(f, line);) {
    std::istringstream s(line);
    std::string key;
    long kb = 0;
    s >> key >> kb;
    if (key == "VmRSS:") r.vm = kb;
    if (key == "RssAnon:") r.anon = kb;
    if (key == "RssFile:") r.file = kb;
  }
  return r;
}

void fill(float* p, Index n, std::uint64_t seed, float scale) {
  std::uint64_t s = seed * 0x9E3779B97F4A7C15ULL + 1;
  for (Index i = 0; i < n; ++i) {
    s = s * 6364136223846793005ULL + 1442695040888963407ULL;
    p[i] = scale * (static_cast<float>(static_cast<std::uint32_t>(s >> 40)) / 8388608.0f - 1.0f);
  }
}

std::string file_name(const std::string& dir, const char* kind, const char* dtype, Index i) {
  return dir + "/" + kind + "_" + dtype + "_" + std::to_string(i) + ".safetensors";
}

// Writes adapter i of each kind as F32 and as BF16.
void write_files(const Options& o) {
  const float sa = 1.0f / std::sqrt(float(o.in)), sb = 0.02f;
  for (Index i = 0; i < o.count; ++i) {
    const auto seed = static_cast<std::uint64_t>(i) * 7919 + 1;
    molora::MoLoRAConfig c;
    c.in_features = o.in;
    c.out_features = o.out;
    c.num_experts = o.E;
    c.top_k = o.k;
    c.rank = o.r;
    auto m = std::make_shared<molora::MoLoRAAdapter<float>>(c);
    fill(m->router().mutable_weight().data(), o.E * o.in, seed + 2, sa);
    fill(m->mutable_stacked_A().data(), o.E * o.r * o.in, seed, sa);
    fill(m->mutable_stacked_B().data(), o.E * o.r * o.out, seed + 1, sb);
    const auto mv = molora::SetAdapter<float>::share(std::shared_ptr<const molora::MoLoRAAdapter<float>>(m));
    auto l = std::make_shared<molora::LoRA<float>>(o.in, o.out, o.r, 2.0 * double(o.r));
    fill(l->mutable_A().data(), o.r * o.in, seed + 3, sa);
    fill(l->mutable_B().data(), o.r * o.out, seed + 4, sb);
    const auto lv = molora::SetAdapter<float>::share(std::shared_ptr<const molora::LoRA<float>>(l));
    using molora::io::Dtype;
    molora::save_set_adapters<float>(file_name(o.dir, "molora", "f32", i), {{"", mv.get()}}, Dtype::F32);
    molora::save_set_adapters<float>(file_name(o.dir, "molora", "bf16", i), {{"", mv.get()}}, Dtype::BF16);
    molora::save_set_adapters<float>(file_name(o.dir, "lora", "f32", i), {{"", lv.get()}}, Dtype::F32);
    molora::save_set_adapters<float>(file_name(o.dir, "lora", "bf16", i), {{"", lv.get()}}, Dtype::BF16);
  }
}

// Drops a file's pages from the page cache (written back first).
void drop_cached(const std::string& path) {
  const int fd = ::open(path.c_str(), O_RDONLY);
  if (fd < 0) throw std::runtime_error("cannot open " + path);
  ::fdatasync(fd);
  ::posix_fadvise(fd, 0, 0, POSIX_FADV_DONTNEED);
  ::close(fd);
}

long file_bytes(const std::string& path) {
  std::ifstream f(path, std::ios::binary | std::ios::ate);
  return static_cast<long>(f.tellg());
}

using Clock = std::chrono::steady_clock;
double since_ms(Clock::time_point t0) { return std::chrono::duration<double, std::milli>(Clock::now() - t0).count(); }

// One case, in a child process: prints one table row.
void run_case(const Options& o, const char* kind, const char* dtype, bool cold, bool check_values) {
  std::vector<std::string> paths;
  long bytes = 0;
  for (Index i = 0; i < o.count; ++i) {
    paths.push_back(file_name(o.dir, kind, dtype, i));
    bytes += file_bytes(paths.back());
    if (cold) drop_cached(paths.back());
  }
  Mat x(o.count, o.in), y(o.count, o.out);  // token t uses adapter t
  fill(x.data(), x.size(), 11, 1.0f);
  y.setZero();
  std::vector<std::int32_t> ids(static_cast<std::size_t>(o.count));
  for (Index t = 0; t < o.count; ++t) ids[static_cast<std::size_t>(t)] = static_cast<std::int32_t>(t);
  const Rss before = read_rss();

  std::vector<molora::SetAdapter<float>::Ptr> adapters;
  adapters.reserve(static_cast<std::size_t>(o.count));
  bool all_mapped = true;
  const auto t0 = Clock::now();
  for (const std::string& p : paths) {
    const molora::io::SafetensorsReader file(p);
    bool mapped = false;
    adapters.push_back(molora::load_set_adapter<float>(file, "", 1.0, check_values, &mapped));
    all_mapped = all_mapped && mapped;
  }
  const double load_ms = since_ms(t0);
  const Rss loaded = read_rss();

  const molora::AdapterSet<float> set(o.in, o.out, adapters);
  molora::AdapterSetWorkspace<float> ws;
  const auto t1 = Clock::now();
  set.add_delta(x, ids, y, ws);
  const double forward_ms = since_ms(t1);
  const Rss after = read_rss();

  auto mib = [](long kb) { return double(kb) / 1024.0; };
  std::printf("| %s | %s | %s | %s | %s | %.1f | %.3f | %.1f | %.1f | %.1f / %.1f / %.1f | %.1f / %.1f / %.1f | %.1f |\n",
              kind, dtype, all_mapped ? "mapped" : "copied", check_values ? "yes" : "no", cold ? "cold" : "warm",
              double(bytes) / 1048576.0, load_ms / double(o.count), load_ms, mib(before.vm),
              mib(loaded.vm - before.vm), mib(loaded.anon - before.anon), mib(loaded.file - before.file),
              mib(after.vm - before.vm), mib(after.anon - before.anon), mib(after.file - before.file), forward_ms);
  std::fflush(stdout);
}

// The store case, in a child process: an AdapterStore with room for `keep` adapters (F32
// files, mapped), two passes over all of them in order (each get() a reload once the store
// is full, the worst case for LRU), one single-token forward per get. Prints one row.
void run_store_case(const Options& o, const char* kind, Index keep) {
  std::vector<std::string> ids;
  std::size_t one = 0;
  {
    const molora::io::SafetensorsReader first(file_name(o.dir, kind, "f32", 0));
    one = molora::load_set_adapter<float>(first, "")->weight_bytes();
  }
  molora::AdapterStore<float> store(one * static_cast<std::size_t>(keep));
  for (Index i = 0; i < o.count; ++i) {
    ids.push_back(std::string(kind) + std::to_string(i));
    store.add(ids.back(), molora::set_adapter_loader<float>(file_name(o.dir, kind, "f32", i)));
  }
  Mat x(1, o.in), y(1, o.out);
  fill(x.data(), x.size(), 11, 1.0f);
  y.setZero();
  const std::vector<std::int32_t> token{0};
  molora::AdapterSetWorkspace<float> ws;
  const Rss before = read_rss();
  Rss peak = before;
  const auto t0 = Clock::now();
  for (int pass = 0; pass < 2; ++pass)
    for (const std::string& id : ids) {
      const molora::AdapterSet<float> set(o.in, o.out, {store.get(id)});
      set.add_delta(x, token, y, ws);
      const Rss r = read_rss();
      if (r.vm > peak.vm) peak = r;
    }
  const double ms = since_ms(t0);
  const Rss after = read_rss();
  auto mib = [](long kb) { return double(kb) / 1024.0; };
  std::printf("| %s | %ld | %.1f | %.3f | %llu / %llu | %.1f | %.1f / %.1f / %.1f | %.1f / %.1f / %.1f |\n", kind,
              static_cast<long>(keep), double(store.budget_bytes()) / 1048576.0, ms / double(2 * o.count),
              static_cast<unsigned long long>(store.loads()), static_cast<unsigned long long>(store.evictions()),
              double(store.resident_bytes()) / 1048576.0, mib(peak.vm - before.vm), mib(peak.anon - before.anon),
              mib(peak.file - before.file), mib(after.vm - before.vm), mib(after.anon - before.anon),
              mib(after.file - before.file));
  std::fflush(stdout);
}

// Runs f in a child process, so that each case starts from a fresh address space and its
// resident memory is its own; true when the child exited with 0.
template <class F>
bool in_child(F&& f) {
  const pid_t pid = ::fork();
  if (pid < 0) throw std::runtime_error("fork failed");
  if (pid == 0) {
    int rc = 0;
    try {
      f();
    } catch (const std::exception& e) {
      std::fprintf(stderr, "adapter_load_bench: %s\n", e.what());
      rc = 1;
    }
    std::fflush(stdout);
    ::_exit(rc);
  }
  int ws = 0;
  ::waitpid(pid, &ws, 0);
  return WIFEXITED(ws) && WEXITSTATUS(ws) == 0;
}

}  // namespace

int main(int argc, char** argv) {
  Options o;
  try {
    for (int i = 1; i < argc; ++i) {
      const std::string flag = argv[i];
      if (flag == "--help") {
        std::fputs(kUsage, stdout);
        return 0;
      }
      if (i + 1 >= argc) throw std::invalid_argument(flag + ": expected a value");
      const char* v = argv[++i];
      if (flag == "--count") o.count = parse_index(flag, v);
      else if (flag == "--in") o.in = parse_index(flag, v);
      else if (flag == "--out") o.out = parse_index(flag, v);
      else if (flag == "--E") o.E = parse_index(flag, v);
      else if (flag == "--k") o.k = parse_index(flag, v);
      else if (flag == "--r") o.r = parse_index(flag, v);
      else if (flag == "--dir") o.dir = v;
      else throw std::invalid_argument("unknown flag '" + flag + "'");
    }
    if (o.k > o.E) throw std::invalid_argument("--k: expected a value <= --E");
  } catch (const std::exception& e) {
    std::fprintf(stderr, "adapter_load_bench: %s\n%s", e.what(), kUsage);
    return 2;
  }
  const bool own_dir = o.dir.empty();
  if (own_dir) {
    char tmpl[] = "/tmp/molora_load_XXXXXX";
    if (!::mkdtemp(tmpl)) {
      std::perror("adapter_load_bench: mkdtemp");
      return 1;
    }
    o.dir = tmpl;
  }
  int status = 0;
  try {
    const auto t0 = Clock::now();
    write_files(o);
    std::printf("adapter_load_bench: %ld adapters of each kind (MoLoRA E = %ld, k = %ld, r = %ld; LoRA r = %ld) over "
                "%ld x %ld, written to %s in %.1f s\n",
                static_cast<long>(o.count), static_cast<long>(o.E), static_cast<long>(o.k), static_cast<long>(o.r),
                static_cast<long>(o.r), static_cast<long>(o.in), static_cast<long>(o.out), o.dir.c_str(),
                since_ms(t0) / 1e3);
    std::printf("| kind | file dtype | load | check_values | page cache | files MiB | ms / adapter | total ms | "
                "VmRSS before MiB | after load: +VmRSS / +RssAnon / +RssFile MiB | after forward: +VmRSS / +RssAnon / "
                "+RssFile MiB | forward ms |\n|---|---|---|---|---|---|---|---|---|---|---|---|\n");
    std::fflush(stdout);
    struct Case {
      const char* kind;
      const char* dtype;
      bool cold, check;
    };
    std::vector<Case> cases;
    for (const char* kind : {"molora", "lora"}) {
      for (const bool cold : {true, false}) {
        cases.push_back({kind, "f32", cold, true});
        cases.push_back({kind, "bf16", cold, true});
      }
      cases.push_back({kind, "f32", true, false});
    }
    for (const Case& c : cases) {
      if (!in_child([&] { run_case(o, c.kind, c.dtype, c.cold, c.check); })) status = 1;
    }
    std::printf("\nAdapterStore, F32 files (mapped, check_values), two passes over all %ld adapters in order, one "
                "single-token forward per get:\n\n| kind | budget (adapters) | budget MiB | ms / get | loads / "
                "evictions | resident MiB at the end | peak: +VmRSS / +RssAnon / +RssFile MiB | end: +VmRSS / "
                "+RssAnon / +RssFile MiB |\n|---|---|---|---|---|---|---|---|\n",
                static_cast<long>(o.count));
    std::fflush(stdout);
    for (const char* kind : {"molora", "lora"}) {
      if (!in_child([&] { run_store_case(o, kind, std::max<Index>(1, o.count / 4)); })) status = 1;
    }
  } catch (const std::exception& e) {
    std::fprintf(stderr, "adapter_load_bench: %s\n", e.what());
    status = 1;
  }
  if (own_dir) {
    for (Index i = 0; i < o.count; ++i)
      for (const char* kind : {"molora", "lora"})
        for (const char* dtype : {"f32", "bf16"}) std::remove(file_name(o.dir, kind, dtype, i).c_str());
    ::rmdir(o.dir.c_str());
  }
  return status;
}
