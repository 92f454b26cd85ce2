// AdamW as torch.optim.AdamW computes it (decoupled weight decay, bias-corrected moments),
// stepping a ParameterList (parameter.hpp). For each parameter p with gradient g, at step t:
//
//     p   <- p * (1 - lr * weight_decay)
//     m   <- beta1 * m + (1 - beta1) * g
//     v   <- beta2 * v + (1 - beta2) * g^2
//     p   <- p - (lr / (1 - beta1^t)) * m / (sqrt(v) / sqrt(1 - beta2^t) + eps)
//
// Defaults are torch's (lr 1e-3, betas 0.9/0.999, eps 1e-8, weight_decay 1e-2). Moments are
// kept in the parameter's scalar type, as torch does.
#pragma once

#include <cmath>
#include <cstdint>
#include <vector>

#include "errors.hpp"
#include "parameter.hpp"
#include "types.hpp"

namespace molora {

struct AdamWOptions {
  double lr = 1e-3;
  double beta1 = 0.9;
  double beta2 = 0.999;
  double eps = 1e-8;
  double weight_decay = 1e-2;

  void validate() const {
    if (!(lr >= 0) || !std::isfinite(lr)) throw config_error(detail::mismatch("lr", "a finite value >= 0", lr));
    if (!(beta1 >= 0 && beta1 < 1)) throw config_error(detail::mismatch("beta1", "a value in [0, 1)", beta1));
    if (!(beta2 >= 0 && beta2 < 1)) throw config_error(detail::mismatch("beta2", "a value in [0, 1)", beta2));
    if (!(eps >= 0) || !std::isfinite(eps)) throw config_error(detail::mismatch("eps", "a finite value >= 0", eps));
    if (!(weight_decay >= 0) || !std::isfinite(weight_decay))
      throw config_error(detail::mismatch("weight_decay", "a finite value >= 0", weight_decay));
  }
};

template <class Scalar>
class AdamW {
public:
  // Throws config_error for options out of their domain.
  explicit AdamW(ParameterList<Scalar> params, const AdamWOptions& options = {})
      : params_(std::move(params)), options_((options.validate(), options)) {
    for (const auto& p : params_) {
      m_.push_back(Vector<Scalar>::Zero(p.size()));
      v_.push_back(Vector<Scalar>::Zero(p.size()));
    }
  }

  // One update of every parameter from its current gradient. Changing options().lr between
  // steps gives a learning-rate schedule.
  void step() {
    ++t_;
    const double lr = options_.lr, b1 = options_.beta1, b2 = options_.beta2;
    const auto decay = static_cast<Scalar>(1.0 - lr * options_.weight_decay);
    const auto step_size = static_cast<Scalar>(lr / (1.0 - std::pow(b1, static_cast<double>(t_))));
    const auto bc2_sqrt = static_cast<Scalar>(std::sqrt(1.0 - std::pow(b2, static_cast<double>(t_))));
    const auto sb1 = static_cast<Scalar>(b1), sb2 = static_cast<Scalar>(b2), eps = static_cast<Scalar>(options_.eps);
    for (std::size_t i = 0; i < params_.size(); ++i) {
      auto p = params_[i].value.array();
      const auto g = params_[i].grad.array();
      auto m = m_[i].array();
      auto v = v_[i].array();
      p *= decay;
      m = sb1 * m + (Scalar(1) - sb1) * g;
      v = sb2 * v + (Scalar(1) - sb2) * g.square();
      p -= step_size * m / (v.sqrt() / bc2_sqrt + eps);
    }
  }

  void zero_grad() { molora::zero_grad(params_); }

  std::int64_t steps() const { return t_; }
  AdamWOptions& options() { return options_; }
  const AdamWOptions& options() const { return options_; }
  const ParameterList<Scalar>& parameters() const { return params_; }
  // First and second moments of parameter i (for checkpointing or inspection).
  const Vector<Scalar>& exp_avg(std::size_t i) const { return m_[i]; }
  const Vector<Scalar>& exp_avg_sq(std::size_t i) const { return v_[i]; }

private:
  ParameterList<Scalar> params_;
  AdamWOptions options_;
  std::vector<Vector<Scalar>> m_, v_;
  std::int64_t t_ = 0;
};

}  // namespace molora
