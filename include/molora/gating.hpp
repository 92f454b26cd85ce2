// Gating: router logits -> Routing {expert ids [T, k], gate weights [T, k]}.
// One routine covers every mode as options (the maths is in README.md, "Conventions"):
// softmax; top-k with ties to the lower expert index, or k distinct experts sampled from the
// softmax; weights renormalised over the k (MING-MOE, MixLoRA, Mixtral) or the plain
// masked probabilities (Switch, Zadouri). k == E is the dense soft mixture. Routing supplied
// by the caller is checked by validate_routing.
#pragma once

#include <cmath>
#include <limits>
#include <vector>

#include "config.hpp"
#include "errors.hpp"
#include "random.hpp"
#include "types.hpp"

namespace molora {

// The experts and gate weights of each token: row t holds token t's k experts, in the order
// they were selected (descending probability for top-k, draw order for sampling). Both are
// GrowingMatrix: a routing reused for a smaller batch (a workspace's) keeps its storage.
template <class Scalar>
struct Routing {
  GrowingMatrix<std::int32_t> ids;  // [T, k]
  GrowingMatrix<Scalar> weights;    // [T, k]

  Index num_tokens() const { return ids.rows(); }
  Index top_k() const { return ids.cols(); }
  void resize(Index tokens, Index k) {
    ids.resize(tokens, k);
    weights.resize(tokens, k);
  }
};

struct GatingOptions {
  Index num_experts = 8;
  Index top_k = 2;
  bool normalize_top_k = true;
  Selection selection = Selection::top_k;

  static GatingOptions from(const MoLoRAConfig& c) {
    return GatingOptions{c.num_experts, c.top_k, c.normalize_top_k, c.selection};
  }
};

namespace detail {

// Row-wise softmax of one row, max-subtracted. Writes probs[0..E).
template <class Scalar>
void softmax_row(const Scalar* logits, Index num, Scalar* probs) {
  Scalar m = logits[0];
  for (Index e = 1; e < num; ++e) m = logits[e] > m ? logits[e] : m;
  Scalar z = 0;
  for (Index e = 0; e < num; ++e) {
    probs[e] = std::exp(logits[e] - m);
    z += probs[e];
  }
  const Scalar inv = Scalar(1) / z;
  for (Index e = 0; e < num; ++e) probs[e] *= inv;
}

// Selects k experts of one token by top-k (ties to the lower index). ids in descending order.
template <class Scalar>
void top_k_row(const Scalar* logits, Index num, Index k, std::int32_t* ids) {
  for (Index s = 0; s < k; ++s) {
    Index best = -1;
    for (Index e = 0; e < num; ++e) {
      bool taken = false;
      for (Index j = 0; j < s; ++j) taken = taken || ids[j] == e;
      if (taken) continue;
      if (best < 0 || logits[e] > logits[best]) best = e;  // strict: ties keep the lower index
    }
    ids[s] = static_cast<std::int32_t>(best);
  }
}

// Draws k distinct experts of one token from probs without replacement (sequentially, each
// draw proportional to the probability left among the experts not yet drawn).
template <class Scalar, class URBG>
void sample_row(const Scalar* logits, const Scalar* probs, Index num, Index k, std::int32_t* ids, URBG& gen) {
  for (Index s = 0; s < k; ++s) {
    double left = 0;
    for (Index e = 0; e < num; ++e) {
      bool taken = false;
      for (Index j = 0; j < s; ++j) taken = taken || ids[j] == e;
      if (!taken) left += static_cast<double>(probs[e]);
    }
    const double u = uniform01(gen) * left;
    double acc = 0;
    Index chosen = -1, fallback = -1;
    for (Index e = 0; e < num; ++e) {
      bool taken = false;
      for (Index j = 0; j < s; ++j) taken = taken || ids[j] == e;
      if (taken) continue;
      if (fallback < 0 || logits[e] > logits[fallback]) fallback = e;
      acc += static_cast<double>(probs[e]);
      if (chosen < 0 && u < acc && probs[e] > 0) chosen = e;
    }
    // All remaining mass underflowed (or rounding left u at the end): take the likeliest.
    ids[s] = static_cast<std::int32_t>(chosen >= 0 ? chosen : fallback);
  }
}

}  // namespace detail

namespace detail {

// Throws config_error unless opt describes a routing (E >= 1, 1 <= k <= E, a known selection)
// and shape_error unless logits has E columns.
inline void check_gating(const GatingOptions& opt, Index logits_cols) {
  if (opt.num_experts < 1) throw config_error(mismatch("num_experts", "a value >= 1", opt.num_experts));
  if (opt.top_k < 1 || opt.top_k > opt.num_experts)
    throw config_error(mismatch("top_k", cat("a value in [1, num_experts (", opt.num_experts, ")]"), opt.top_k));
  if (opt.selection != Selection::top_k && opt.selection != Selection::sampling)
    throw config_error(mismatch("selection", "top_k or sampling", static_cast<int>(opt.selection)));
  if (logits_cols != opt.num_experts)
    throw shape_error(mismatch("router logits columns (num_experts)", opt.num_experts, logits_cols));
}

}  // namespace detail

namespace detail {

// Gating of one token with finite logits row [E]: its k experts into ids [k] and their
// weights into w [k]; probs [E] is scratch (left holding softmax(row)). route() runs it per
// token; AdapterSet runs it with each token's own adapter's options.
template <class Scalar, class URBG>
void gate_row(const Scalar* row, Index E, const GatingOptions& opt, std::int32_t* ids, Scalar* w, URBG* gen,
              Scalar* probs) {
  const Index k = opt.top_k;
  softmax_row(row, E, probs);
  if (opt.selection == Selection::sampling)
    sample_row(row, probs, E, k, ids, *gen);
  else
    top_k_row(row, E, k, ids);
  if (opt.normalize_top_k) {
    // softmax over the k selected logits == p_i / sum_S p_j, without underflow.
    Scalar m = row[ids[0]];
    for (Index s = 1; s < k; ++s) m = row[ids[s]] > m ? row[ids[s]] : m;
    Scalar z = 0;
    for (Index s = 0; s < k; ++s) {
      w[s] = std::exp(row[ids[s]] - m);
      z += w[s];
    }
    for (Index s = 0; s < k; ++s) w[s] /= z;
  } else {
    for (Index s = 0; s < k; ++s) w[s] = probs[ids[s]];
  }
}

// route() after its checks. Token t's softmax goes to probs + t * ldp: ldp = 0 reuses one
// row of scratch, ldp = E keeps every token's probabilities (the training forward).
template <class Scalar, class URBG>
void route_rows(const ConstRowRef<Scalar>& logits, const GatingOptions& opt, Routing<Scalar>& out, URBG* gen,
                Scalar* probs, Index ldp) {
  const Index T = logits.rows(), E = logits.cols(), k = opt.top_k;
  out.resize(T, k);
  for (Index t = 0; t < T; ++t) {
    const Scalar* row = logits.row(t).data();
    for (Index e = 0; e < E; ++e)
      if (!std::isfinite(static_cast<double>(row[e])))
        throw numeric_error(detail::cat("router logits of token ", t, ": expected finite values, got ", row[e],
                                        " for expert ", e));
    detail::gate_row(row, E, opt, out.ids.row(t).data(), out.weights.row(t).data(), gen, probs + t * ldp);
  }
}

// Throws config_error when sampling has no generator.
template <class URBG>
void check_generator(const GatingOptions& opt, const URBG* gen) {
  if (opt.selection == Selection::sampling && gen == nullptr)
    throw config_error("selection: sampling needs a generator, got none");
}

}  // namespace detail

// Routes every token. Requires logits [T, E] with E == opt.num_experts >= 1 and
// 1 <= top_k <= E (throws config_error / shape_error otherwise). gen is used only for
// Selection::sampling and must then be non-null. probs_scratch must hold E values. Throws
// numeric_error naming the first token whose logits are not finite; out is then unspecified.
template <class Scalar, class URBG = Generator>
void route(const ConstRowRef<Scalar>& logits, const GatingOptions& opt, Routing<Scalar>& out, URBG* gen,
           Scalar* probs_scratch) {
  detail::check_gating(opt, logits.cols());
  detail::check_generator(opt, gen);
  if (probs_scratch == nullptr) throw config_error("probs_scratch: expected room for num_experts values, got null");
  detail::route_rows(logits, opt, out, gen, probs_scratch, 0);
}

// The same, keeping what route_backward needs: probs [T, E] gets softmax(logits) of every
// token (the same values route() uses). Throws as route() does, and shape_error on probs.
template <class Scalar, class URBG = Generator>
void route_keep_probs(const ConstRowRef<Scalar>& logits, const GatingOptions& opt, Routing<Scalar>& out, URBG* gen,
                      RowMatrix<Scalar>& probs) {
  detail::check_gating(opt, logits.cols());
  detail::check_generator(opt, gen);
  if (probs.rows() != logits.rows() || probs.cols() != logits.cols()) probs.resize(logits.rows(), logits.cols());
  detail::route_rows(logits, opt, out, gen, probs.data(), logits.cols());
}

// ---- the gating's backward ------------------------------------------------------------------
//
// Gradients reach the logits through the gate weights only, never through the discrete
// choice of experts (top-k or sampling picks the same experts for a small change of the
// logits, away from ties). With S the k experts of a token, dg its gate gradient per slot:
//   renormalised (normalize_top_k): g = softmax of the logits in S, so
//       dl_j = g_j (dg_j - sum_S g_i dg_i) for j in S, and 0 for every j outside S;
//   masked: g_i = p_i with p the softmax over all E, so
//       dl_j = p_j (dg_j - sum_S p_i dg_i) for every j (dg_j = 0 outside S).
// Sampling only changes how S is chosen, so it shares these formulas; k == E is the first
// with S = all experts.

// True when the logit gradient of a token is zero off its selected experts (the router's
// backward may then touch only their rows of W_r).
inline bool route_backward_selected_only(const GatingOptions& opt) { return opt.normalize_top_k; }

namespace detail {

// route_backward after its checks.
template <class Scalar>
void route_backward_rows(const GatingOptions& opt, const Routing<Scalar>& routing, const Scalar* probs, Index ldp,
                         const Scalar* gate_grad, Index ldg, Scalar* dlogits, Index ldl) {
  const Index T = routing.num_tokens(), k = routing.top_k(), E = opt.num_experts;
  for (Index t = 0; t < T; ++t) {
    const Scalar* g = routing.weights.row(t).data();
    const std::int32_t* ids = routing.ids.row(t).data();
    const Scalar* dg = gate_grad + t * ldg;
    Scalar* dl = dlogits + t * ldl;
    Scalar dot = 0;
    for (Index s = 0; s < k; ++s) dot += g[s] * dg[s];
    if (opt.normalize_top_k) {
      for (Index s = 0; s < k; ++s) dl[ids[s]] += g[s] * (dg[s] - dot);
    } else {
      const Scalar* p = probs + t * ldp;
      for (Index j = 0; j < E; ++j) dl[j] -= p[j] * dot;
      for (Index s = 0; s < k; ++s) dl[ids[s]] += p[ids[s]] * dg[s];
    }
  }
}

}  // namespace detail

// dlogits [T, E] += dL/dlogits given dL/dg per (token, slot) in gate_grad [T, k], for the
// routing route() produced with opt and, for the masked mode, the probabilities
// route_keep_probs() kept (probs [T, E]; unread, and may be empty, when normalize_top_k).
// Throws config_error / shape_error naming the field on options or shapes that do not fit,
// numeric_error on an expert id outside [0, E); dlogits is then unchanged.
template <class Scalar>
void route_backward(const GatingOptions& opt, const Routing<Scalar>& routing, const ConstRowRef<Scalar>& probs,
                    const ConstRowRef<Scalar>& gate_grad, RowRef<Scalar> dlogits) {
  detail::check_gating(opt, opt.num_experts);
  const Index T = routing.num_tokens(), k = routing.top_k(), E = opt.num_experts;
  if (k != opt.top_k) throw shape_error(detail::mismatch("routing columns (top_k)", opt.top_k, k));
  detail::require_shape(routing.weights, T, k, "routing.weights");
  detail::require_shape(gate_grad, T, k, "gate_grad");
  detail::require_shape(dlogits, T, E, "dlogits");
  if (!opt.normalize_top_k) detail::require_shape(probs, T, E, "probs");
  for (Index t = 0; t < T; ++t)
    for (Index s = 0; s < k; ++s)
      if (routing.ids(t, s) < 0 || routing.ids(t, s) >= E)
        throw numeric_error(detail::cat("routing.ids of token ", t, " slot ", s, ": expected an expert id in [0, ", E,
                                        "), got ", routing.ids(t, s)));
  detail::route_backward_rows(opt, routing, probs.data(), probs.outerStride(), gate_grad.data(),
                              gate_grad.outerStride(), dlogits.data(), dlogits.outerStride());
}

// Convenience overload that allocates its scratch.
template <class Scalar, class URBG = Generator>
Routing<Scalar> route(const ConstRowRef<Scalar>& logits, const GatingOptions& opt, URBG* gen = nullptr) {
  detail::check_gating(opt, logits.cols());
  Routing<Scalar> out;
  std::vector<Scalar> scratch(static_cast<std::size_t>(logits.cols()));
  route(logits, opt, out, gen, scratch.data());
  return out;
}

// Row-wise stable softmax of logits [T, E] into probs [T, E], E >= 1. Throws shape_error
// (probs unchanged) otherwise.
template <class Scalar>
void softmax_rows(const ConstRowRef<Scalar>& logits, RowRef<Scalar> probs) {
  if (logits.rows() > 0 && logits.cols() < 1)
    throw shape_error(detail::mismatch("softmax logits columns", "a value >= 1", logits.cols()));
  detail::require_shape(probs, logits.rows(), logits.cols(), "softmax probs");
  for (Index t = 0; t < logits.rows(); ++t) detail::softmax_row(logits.row(t).data(), logits.cols(), probs.row(t).data());
}

// Checks a caller-supplied routing for T tokens and E experts: ids and weights both [T, k]
// with 1 <= k <= E, ids in [0, E), no expert twice in a token, finite weights. Throws
// shape_error or numeric_error naming the token and slot.
template <class Scalar>
void validate_routing(const Routing<Scalar>& r, Index num_tokens, Index num_experts) {
  if (r.ids.rows() != num_tokens)
    throw shape_error(detail::mismatch("routing.ids rows", num_tokens, r.ids.rows()));
  if (r.ids.cols() < 1 || r.ids.cols() > num_experts)
    throw shape_error(detail::mismatch("routing.ids columns (k)", detail::cat("1..", num_experts), r.ids.cols()));
  if (r.weights.rows() != r.ids.rows() || r.weights.cols() != r.ids.cols())
    throw shape_error(detail::mismatch("routing.weights", detail::shape_str(r.ids.rows(), r.ids.cols()),
                                       detail::shape_str(r.weights.rows(), r.weights.cols())));
  const Index k = r.ids.cols();
  for (Index t = 0; t < num_tokens; ++t)
    for (Index s = 0; s < k; ++s) {
      const std::int32_t id = r.ids(t, s);
      if (id < 0 || id >= num_experts)
        throw numeric_error(detail::cat("routing.ids of token ", t, " slot ", s, ": expected an expert id in [0, ",
                                        num_experts, "), got ", id));
      for (Index j = 0; j < s; ++j)
        if (r.ids(t, j) == id)
          throw numeric_error(detail::cat("routing.ids of token ", t, ": expected distinct experts, got expert ", id,
                                          " in slots ", j, " and ", s));
      if (!std::isfinite(static_cast<double>(r.weights(t, s))))
        throw numeric_error(detail::cat("routing.weights of token ", t, " slot ", s, ": expected a finite value, got ",
                                        r.weights(t, s)));
    }
}

}  // namespace molora
