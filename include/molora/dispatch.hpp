// DispatchPlan: the (token, slot) pairs of a Routing grouped by expert with a counting sort,
// O(T*k + E) (as ggml's mul_mat_id groups rows per expert). Within an expert the tokens stay
// in ascending order. Built into vectors that keep their capacity, so a warm rebuild of the
// same or a smaller size does not allocate.
#pragma once

#include <cstdint>
#include <vector>

#include "gating.hpp"
#include "types.hpp"

namespace molora {

template <class Scalar>
struct DispatchPlan {
  std::vector<Index> offsets;         // [E + 1]: expert e's pairs are [offsets[e], offsets[e+1])
  std::vector<std::int32_t> tokens;   // [T*k] token of each pair
  std::vector<std::int32_t> slots;    // [T*k] slot (column of the Routing) of each pair
  std::vector<Scalar> gates;          // [T*k] gate weight of each pair
  std::vector<std::int32_t> active;   // experts with at least one pair, ascending

  Index num_experts() const { return static_cast<Index>(offsets.size()) - 1; }
  Index begin(Index e) const { return offsets[static_cast<std::size_t>(e)]; }
  Index count(Index e) const { return offsets[static_cast<std::size_t>(e) + 1] - offsets[static_cast<std::size_t>(e)]; }
  Index max_count() const {
    Index m = 0;
    for (std::int32_t e : active) m = count(e) > m ? count(e) : m;
    return m;
  }

  // Requires: num_experts >= 1, weights the shape of ids, every id in [0, num_experts) (a
  // validated Routing passes). Throws config_error / shape_error / numeric_error otherwise;
  // the plan is then unspecified.
  void build(const Routing<Scalar>& r, Index num_experts) {
    const Index T = r.num_tokens(), k = r.top_k();
    if (num_experts < 1) throw config_error(detail::mismatch("num_experts", "a value >= 1", num_experts));
    if (r.weights.rows() != T || r.weights.cols() != k)
      throw shape_error(detail::mismatch("routing.weights", detail::shape_str(T, k),
                                         detail::shape_str(r.weights.rows(), r.weights.cols())));
    offsets.assign(static_cast<std::size_t>(num_experts) + 1, 0);
    for (Index t = 0; t < T; ++t)
      for (Index s = 0; s < k; ++s) {
        const std::int32_t id = r.ids(t, s);
        if (id < 0 || id >= num_experts)
          throw numeric_error(detail::cat("routing.ids of token ", t, " slot ", s, ": expected an expert id in [0, ",
                                          num_experts, "), got ", id));
        ++offsets[static_cast<std::size_t>(id) + 1];
      }
    active.clear();
    for (Index e = 0; e < num_experts; ++e) {
      if (offsets[static_cast<std::size_t>(e) + 1] > 0) active.push_back(static_cast<std::int32_t>(e));
      offsets[static_cast<std::size_t>(e) + 1] += offsets[static_cast<std::size_t>(e)];
    }
    const std::size_t pairs = static_cast<std::size_t>(T * k);
    tokens.resize(pairs);
    slots.resize(pairs);
    gates.resize(pairs);
    // Second pass places each pair at its expert's cursor; offsets[e] serves as the cursor
    // and is restored afterwards by shifting.
    for (Index t = 0; t < T; ++t)
      for (Index s = 0; s < k; ++s) {
        const auto e = static_cast<std::size_t>(r.ids(t, s));
        const auto at = static_cast<std::size_t>(offsets[e]++);
        tokens[at] = static_cast<std::int32_t>(t);
        slots[at] = static_cast<std::int32_t>(s);
        gates[at] = r.weights(t, s);
      }
    for (Index e = num_experts; e > 0; --e) offsets[static_cast<std::size_t>(e)] = offsets[static_cast<std::size_t>(e) - 1];
    offsets[0] = 0;
  }
};

}  // namespace molora
