// Training-time noise: the options (PEFT's LoRA dropout on the adapter's input, MixLoRA's
// multiplicative jitter on the router's input) and their draws. Each row takes one 64-bit
// key from a seeded Generator and each pair of elements a splitmix64 hash of (key, index),
// so masks are reproducible from the tape's seed without a sequential generator step per
// element (docs/design-notes.md, "Training").
#pragma once

#include <cmath>
#include <cstdint>

#include "errors.hpp"
#include "random.hpp"
#include "types.hpp"

namespace molora {

// Options of a training forward; all off by default.
struct TrainingOptions {
  // p of PEFT's lora_dropout: each element of the adapter's input is zeroed with probability
  // p and the kept ones are scaled by 1/(1-p) (inverted dropout, torch.nn.Dropout). The same
  // dropped x feeds every expert of the layer; the router and the base see the clean x.
  double lora_dropout = 0;
  // eps of MixLoRA's / Mixtral's jitter_noise: the router's input is x * U(1-eps, 1+eps),
  // drawn per element. Only the router sees it here (MixLoRA multiplies the whole block input
  // in place, so its experts and base see it too; to reproduce that, jitter x yourself
  // before the layer and multiply dx by the same noise).
  double router_jitter = 0;

  void validate() const {
    if (!(lora_dropout >= 0 && lora_dropout < 1))
      throw config_error(detail::mismatch("lora_dropout", "a value in [0, 1)", lora_dropout));
    if (!(router_jitter >= 0 && router_jitter < 1))
      throw config_error(detail::mismatch("router_jitter", "a value in [0, 1)", router_jitter));
  }
};

namespace detail {

// splitmix64's finaliser: a 64-bit hash of a counter.
constexpr std::uint64_t mix64(std::uint64_t z) noexcept {
  z = (z ^ (z >> 30)) * 0xbf58476d1ce4e5b9ULL;
  z = (z ^ (z >> 27)) * 0x94d049bb133111ebULL;
  return z ^ (z >> 31);
}

// m(i, j) = f(u) for each element, u 32 random bits. One 64-bit key per row comes from gen;
// within the row, element pair q hashes (key, q) and takes the low and the high halves. The
// draws need no sequential generator per element (a Mersenne Twister step per element cost
// more than the whole adapter forward at T = 256).
template <class Scalar, class F>
void draw_rows(RowMatrix<Scalar>& m, Index rows, Index cols, Generator& gen, F f) {
  constexpr std::uint64_t kGolden = 0x9e3779b97f4a7c15ULL;
  m.resize(rows, cols);
  for (Index i = 0; i < rows; ++i) {
    const std::uint64_t key = bits64(gen);
    Scalar* row = m.data() + i * cols;
    const auto hash = [key](Index q) { return mix64(key + static_cast<std::uint64_t>(q + 1) * kGolden); };
    const Index pairs = cols / 2;
    for (Index q = 0; q < pairs; ++q) {
      const std::uint64_t h = hash(q);
      row[2 * q] = f(static_cast<std::uint32_t>(h));
      row[2 * q + 1] = f(static_cast<std::uint32_t>(h >> 32));
    }
    if (cols % 2 != 0) row[cols - 1] = f(static_cast<std::uint32_t>(hash(pairs)));
  }
}

// m = Bernoulli(1-p) / (1-p) per element: 0 or 1/(1-p) (p rounded to a multiple of 2^-32).
template <class Scalar>
void draw_dropout(RowMatrix<Scalar>& m, Index rows, Index cols, double p, Generator& gen) {
  const auto keep = static_cast<Scalar>(1.0 / (1.0 - p));
  const auto drop_below = static_cast<std::uint64_t>(std::llround(p * 0x1.0p32));  // P(u < it) = p
  draw_rows(m, rows, cols, gen, [=](std::uint32_t u) { return u < drop_below ? Scalar(0) : keep; });
}

// m = U(1-eps, 1+eps) per element.
template <class Scalar>
void draw_jitter(RowMatrix<Scalar>& m, Index rows, Index cols, double eps, Generator& gen) {
  draw_rows(m, rows, cols, gen, [=](std::uint32_t u) {
    return static_cast<Scalar>((1.0 - eps) + (2.0 * eps) * (static_cast<double>(u) * 0x1.0p-32));
  });
}

// noise = draw(rows of x), noisy = x * noise, when p > 0; both emptied otherwise (a tape
// without that noise). draw is draw_dropout or draw_jitter.
template <class Scalar, class View, class Draw>
void apply_noise(const View& x, double p, Generator& gen, RowMatrix<Scalar>& noise, RowMatrix<Scalar>& noisy,
                 Draw draw) {
  if (p > 0) {
    draw(noise, x.rows(), x.cols(), p, gen);
    noisy = x.cwiseProduct(noise);  // [T, in]
  } else {
    noise.resize(0, 0);
    noisy.resize(0, 0);
  }
}

}  // namespace detail
}  // namespace molora
