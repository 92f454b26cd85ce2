// Plain loop-by-loop references in double for the tests: written for clarity, not speed,
// and independent of the library's code paths (no Eigen products).
#pragma once

#include <algorithm>
#include <cmath>
#include <cstdint>
#include <numeric>
#include <random>
#include <vector>

#include <molora/molora.hpp>

namespace ref {

using Mat = std::vector<std::vector<double>>;  // [rows][cols]

// The base product over strided buffers, y[t, o] = sum_i weight(o, i) x[t, i] (+ bias[o]),
// into ref[t * ldy + o]; the rest of ref (padding) is left as it is. tol gets the error
// bound of a float kernel with machine epsilon eps: 8 eps sqrt(in + 1) sum |terms|.
template <class WeightAt, class Scalar>
void strided_base_product(WeightAt weight, const Scalar* x, long ldx, const Scalar* bias, long T, long in, long out,
                          long ldy, double eps, std::vector<double>& ref, std::vector<double>& tol) {
  const auto at = [](long i) { return static_cast<std::size_t>(i); };
  for (long t = 0; t < T; ++t)
    for (long o = 0; o < out; ++o) {
      double s = 0, mag = 0;
      for (long i = 0; i < in; ++i) {
        const double p = double(weight(o, i)) * double(x[at(t * ldx + i)]);
        s += p;
        mag += std::abs(p);
      }
      if (bias) {
        s += double(bias[at(o)]);
        mag += std::abs(double(bias[at(o)]));
      }
      ref[at(t * ldy + o)] = s;
      tol[at(t * ldy + o)] = 8 * eps * std::sqrt(double(in) + 1) * mag;
    }
}

inline Mat zeros(long rows, long cols) { return Mat(static_cast<size_t>(rows), std::vector<double>(static_cast<size_t>(cols), 0.0)); }

template <class M>
Mat from_eigen(const M& m) {
  Mat out = zeros(m.rows(), m.cols());
  for (long i = 0; i < m.rows(); ++i)
    for (long j = 0; j < m.cols(); ++j) out[size_t(i)][size_t(j)] = static_cast<double>(m(i, j));
  return out;
}

// Everything a MoLoRA layer holds, in double, in PyTorch layouts.
struct Layer {
  long in = 0, out = 0, E = 0, k = 0, r = 0;
  double scaling = 0;
  bool normalize = true;
  Mat W0;                 // [out][in]
  std::vector<double> b0; // [out] or empty
  Mat Wr;                 // [E][in]
  std::vector<double> br; // [E]
  std::vector<Mat> A;     // E x [r][in]
  std::vector<Mat> B;     // E x [out][r]
};

template <class Scalar>
Layer from_layer(const molora::MoLoRALinear<Scalar>& l) {
  Layer L;
  const auto& c = l.config();
  L.in = c.in_features; L.out = c.out_features; L.E = c.num_experts; L.k = c.top_k; L.r = c.rank;
  L.scaling = c.scaling();
  L.normalize = c.normalize_top_k;
  L.W0 = from_eigen(l.base_weight());
  if (l.has_base_bias()) for (long o = 0; o < L.out; ++o) L.b0.push_back(double(l.base_bias()(o)));
  L.Wr = from_eigen(l.adapter().router().weight());
  for (long e = 0; e < L.E; ++e) L.br.push_back(double(l.adapter().router().bias()(e)));
  for (long e = 0; e < L.E; ++e) {
    L.A.push_back(from_eigen(l.adapter().expert_A(e)));
    L.B.push_back(from_eigen(l.adapter().expert_B(e)));
  }
  return L;
}

inline std::vector<double> logits(const Layer& L, const std::vector<double>& x) {
  std::vector<double> z(size_t(L.E), 0.0);
  for (long e = 0; e < L.E; ++e) {
    double s = L.br.empty() ? 0.0 : L.br[size_t(e)];
    for (long i = 0; i < L.in; ++i) s += L.Wr[size_t(e)][size_t(i)] * x[size_t(i)];
    z[size_t(e)] = s;
  }
  return z;
}

inline std::vector<double> softmax(const std::vector<double>& z) {
  double m = z[0];
  for (double v : z) m = std::max(m, v);
  std::vector<double> p(z.size());
  double sum = 0;
  for (size_t i = 0; i < z.size(); ++i) sum += (p[i] = std::exp(z[i] - m));
  for (double& v : p) v /= sum;
  return p;
}

// Top-k by sorting indices: larger first, ties to the lower index (stable sort).
inline std::vector<int> top_k(const std::vector<double>& z, long k) {
  std::vector<int> idx(z.size());
  std::iota(idx.begin(), idx.end(), 0);
  std::stable_sort(idx.begin(), idx.end(), [&](int a, int b) { return z[size_t(a)] > z[size_t(b)]; });
  idx.resize(size_t(k));
  return idx;
}

// Gate weights for the selected experts.
inline std::vector<double> gate_weights(const std::vector<double>& z, const std::vector<int>& sel, bool normalize) {
  std::vector<double> p = softmax(z), w;
  double sum = 0;
  for (int e : sel) sum += p[size_t(e)];
  for (int e : sel) w.push_back(normalize ? p[size_t(e)] / sum : p[size_t(e)]);
  return w;
}

// delta for one token given experts and weights.
inline std::vector<double> delta(const Layer& L, const std::vector<double>& x, const std::vector<int>& sel,
                                 const std::vector<double>& w) {
  std::vector<double> y(size_t(L.out), 0.0);
  for (size_t s = 0; s < sel.size(); ++s) {
    const size_t e = size_t(sel[s]);
    std::vector<double> h(size_t(L.r), 0.0);
    for (long j = 0; j < L.r; ++j)
      for (long i = 0; i < L.in; ++i) h[size_t(j)] += L.A[e][size_t(j)][size_t(i)] * x[size_t(i)];
    for (long o = 0; o < L.out; ++o) {
      double acc = 0;
      for (long j = 0; j < L.r; ++j) acc += L.B[e][size_t(o)][size_t(j)] * h[size_t(j)];
      y[size_t(o)] += w[s] * L.scaling * acc;
    }
  }
  return y;
}

inline std::vector<double> base(const Layer& L, const std::vector<double>& x) {
  std::vector<double> y(size_t(L.out), 0.0);
  for (long o = 0; o < L.out; ++o) {
    double acc = L.b0.empty() ? 0.0 : L.b0[size_t(o)];
    for (long i = 0; i < L.in; ++i) acc += L.W0[size_t(o)][size_t(i)] * x[size_t(i)];
    y[size_t(o)] = acc;
  }
  return y;
}

// Full forward with top-k gating; ids/weights receive the routing (row per token).
inline Mat forward(const Layer& L, const Mat& X, std::vector<std::vector<int>>* ids = nullptr,
                   Mat* weights = nullptr) {
  Mat Y;
  for (const auto& x : X) {
    const auto z = logits(L, x);
    const auto sel = top_k(z, L.k);
    const auto w = gate_weights(z, sel, L.normalize);
    auto y = base(L, x);
    const auto d = delta(L, x, sel, w);
    for (long o = 0; o < L.out; ++o) y[size_t(o)] += d[size_t(o)];
    Y.push_back(y);
    if (ids) ids->push_back(sel);
    if (weights) weights->push_back(w);
  }
  return Y;
}

// max |a - b| / max(1, max |b|)
template <class M>
double rel_err(const M& got, const Mat& want) {
  double scale = 1.0, diff = 0.0;
  for (size_t i = 0; i < want.size(); ++i)
    for (size_t j = 0; j < want[i].size(); ++j) {
      scale = std::max(scale, std::abs(want[i][j]));
      diff = std::max(diff, std::abs(double(got(long(i), long(j))) - want[i][j]));
    }
  return diff / scale;
}

// A layer with random weights (B non-zero) and a random base bias.
template <class Scalar>
molora::MoLoRALinear<Scalar> random_layer(const molora::MoLoRAConfig& c, std::uint64_t seed, bool base_bias = true) {
  molora::MoLoRALinear<Scalar> l(c);
  std::mt19937_64 g(seed);
  std::uniform_real_distribution<double> u(-1.0, 1.0);
  auto rnd = [&](long r, long cc) {
    molora::RowMatrix<double> m(r, cc);
    for (long i = 0; i < r; ++i) for (long j = 0; j < cc; ++j) m(i, j) = u(g);
    return m;
  };
  l.set_base_weight(rnd(c.out_features, c.in_features));
  if (base_bias) l.set_base_bias(rnd(1, c.out_features));
  l.adapter().router().set_weight(rnd(c.num_experts, c.in_features));
  if (c.router_bias) l.adapter().router().set_bias(rnd(1, c.num_experts));
  for (long e = 0; e < c.num_experts; ++e) {
    l.adapter().set_expert_A(e, rnd(c.rank, c.in_features));
    l.adapter().set_expert_B(e, rnd(c.out_features, c.rank));
  }
  return l;
}

template <class Scalar>
molora::RowMatrix<Scalar> random_x(long T, long in, std::uint64_t seed) {
  std::mt19937_64 g(seed);
  std::uniform_real_distribution<double> u(-1.0, 1.0);
  molora::RowMatrix<Scalar> x(T, in);
  for (long i = 0; i < T; ++i) for (long j = 0; j < in; ++j) x(i, j) = Scalar(u(g));
  return x;
}

}  // namespace ref
