// Tenants and run-time management of adapter sets (docs/design-notes.md, "Adapter sets").
// A model has many adapted projections (every layer's q/k/v/o/gate/up/down...); a tenant is
// one customer's adapters for all of them, added, swapped and dropped together. A
// TenantSnapshot is an immutable picture: for each projection p an AdapterSet whose adapter
// i is tenant i's adapter for p (null: base only there). A TenantRegistry holds the current
// snapshot; changes build a new snapshot (adapters are shared, never copied) and swap it in
// with one atomic store.
//
// The rule: a forward of the whole model takes registry.current() once, maps its requests'
// tenant ids to slots with that snapshot (slots are only meaningful within it), and runs
// every projection with that snapshot's sets. A swap never changes a snapshot that a forward
// holds; the old snapshot, its adapters and whatever keeps their weights alive (a mapped
// file) are freed when the last forward holding it lets go. A forward therefore sees each
// tenant entirely before or entirely after a change, never half of one.
#pragma once

#include <atomic>
#include <memory>
#include <mutex>
#include <string>
#include <unordered_map>
#include <utility>
#include <vector>

#include "adapter_set.hpp"
#include "errors.hpp"
#include "types.hpp"

// C++20's std::atomic<std::shared_ptr> where the library has it (the free atomic_load /
// atomic_store on a shared_ptr are deprecated there); C++17 uses those.
#if defined(__cpp_lib_atomic_shared_ptr) && __cpp_lib_atomic_shared_ptr >= 201711L
#define MOLORA_DETAIL_ATOMIC_SHARED_PTR 1
#else
#define MOLORA_DETAIL_ATOMIC_SHARED_PTR 0
#endif

namespace molora {

// One tenant: an id, and one adapter per projection of the model (null = base only there).
template <class Scalar>
struct Tenant {
  std::string id;
  std::vector<typename SetAdapter<Scalar>::Ptr> adapters;  // [num_projections]
};

// The shape of one adapted projection of the host model.
struct ProjectionShape {
  Index in_features = 0, out_features = 0;
};

template <class Scalar>
class TenantSnapshot {
public:
  using Ptr = std::shared_ptr<const TenantSnapshot>;

  // Throws config_error on a duplicate or empty tenant id, shape_error on a tenant whose
  // adapter count is not the number of projections or whose adapter does not fit its
  // projection (the message names tenant, projection and shapes).
  TenantSnapshot(std::vector<ProjectionShape> projections, std::vector<Tenant<Scalar>> tenants)
      : shapes_(std::move(projections)), tenants_(std::move(tenants)) {
    const Index P = static_cast<Index>(shapes_.size());
    for (std::size_t i = 0; i < tenants_.size(); ++i) {
      const Tenant<Scalar>& t = tenants_[i];
      if (t.id.empty()) throw config_error(detail::mismatch(detail::cat("tenant ", i, " id"), "a non-empty id", "\"\""));
      if (!slots_.emplace(t.id, static_cast<std::int32_t>(i)).second)
        throw config_error(detail::mismatch("tenant id", "ids distinct within a snapshot", detail::cat("\"", t.id, "\" twice")));
      if (static_cast<Index>(t.adapters.size()) != P)
        throw shape_error(detail::mismatch(detail::cat("tenant \"", t.id, "\" adapters (one per projection)"), P,
                                           t.adapters.size()));
    }
    sets_.reserve(shapes_.size());
    for (Index p = 0; p < P; ++p) {
      std::vector<typename SetAdapter<Scalar>::Ptr> column;
      column.reserve(tenants_.size());
      for (const Tenant<Scalar>& t : tenants_) {
        const auto& a = t.adapters[static_cast<std::size_t>(p)];
        const ProjectionShape& s = shapes_[static_cast<std::size_t>(p)];
        if (a && (a->in_features() != s.in_features || a->out_features() != s.out_features))
          throw shape_error(detail::mismatch(detail::cat("tenant \"", t.id, "\" adapter for projection ", p, " shape (in, out)"),
                                             detail::cat(s.in_features, " -> ", s.out_features),
                                             detail::cat(a->in_features(), " -> ", a->out_features())));
        column.push_back(a);
      }
      sets_.emplace_back(s_in(p), s_out(p), std::move(column));
    }
  }

  Index num_projections() const { return static_cast<Index>(sets_.size()); }
  Index num_tenants() const { return static_cast<Index>(tenants_.size()); }
  const std::vector<ProjectionShape>& projections() const { return shapes_; }
  // The set of projection p: its adapter i is tenant slot i's. Throws shape_error for p
  // outside [0, num_projections()).
  const AdapterSet<Scalar>& projection(Index p) const {
    if (p < 0 || p >= num_projections())
      throw shape_error(detail::mismatch("projection index", detail::cat("[0, ", num_projections(), ")"), p));
    return sets_[static_cast<std::size_t>(p)];
  }
  const Tenant<Scalar>& tenant(std::int32_t slot) const {
    if (slot < 0 || slot >= num_tenants())
      throw shape_error(detail::mismatch("tenant slot", detail::cat("[0, ", num_tenants(), ")"), slot));
    return tenants_[static_cast<std::size_t>(slot)];
  }
  // The slot of a tenant id in this snapshot, or -1 if it has none.
  std::int32_t find(const std::string& id) const {
    const auto it = slots_.find(id);
    return it == slots_.end() ? -1 : it->second;
  }
  // The slot of a tenant id; throws config_error naming the id if this snapshot lacks it (a
  // request for a dropped tenant must not silently get the base model).
  std::int32_t slot(const std::string& id) const {
    const std::int32_t s = find(id);
    if (s < 0) throw config_error(detail::mismatch("tenant id", "a tenant of the current snapshot", detail::cat("\"", id, "\"")));
    return s;
  }

  // A new snapshot with t added (or replacing the tenant of the same id, in its slot).
  Ptr with(Tenant<Scalar> t) const {
    std::vector<Tenant<Scalar>> next = tenants_;
    const std::int32_t s = find(t.id);
    if (s >= 0)
      next[static_cast<std::size_t>(s)] = std::move(t);
    else
      next.push_back(std::move(t));
    return std::make_shared<const TenantSnapshot>(shapes_, std::move(next));
  }
  // A new snapshot without tenant id (slots after it move down by one); this one if absent.
  Ptr without(const std::string& id) const {
    std::vector<Tenant<Scalar>> next;
    next.reserve(tenants_.size());
    for (const Tenant<Scalar>& t : tenants_)
      if (t.id != id) next.push_back(t);
    return std::make_shared<const TenantSnapshot>(shapes_, std::move(next));
  }

private:
  Index s_in(Index p) const { return shapes_[static_cast<std::size_t>(p)].in_features; }
  Index s_out(Index p) const { return shapes_[static_cast<std::size_t>(p)].out_features; }

  std::vector<ProjectionShape> shapes_;
  std::vector<Tenant<Scalar>> tenants_;
  std::unordered_map<std::string, std::int32_t> slots_;
  std::vector<AdapterSet<Scalar>> sets_;  // [num_projections]
};

// The current snapshot, swapped atomically. Readers (forwards, any thread) call current();
// writers (add, drop, set_scale; serialised by a mutex) build the next snapshot from the
// current one and store it. A failed change (bad shapes, duplicate id) throws and leaves the
// current snapshot as it was.
template <class Scalar>
class TenantRegistry {
public:
  using Snapshot = TenantSnapshot<Scalar>;

  explicit TenantRegistry(std::vector<ProjectionShape> projections)
      : current_(std::make_shared<const Snapshot>(std::move(projections), std::vector<Tenant<Scalar>>{})) {}

  // The snapshot to run one forward of the model with (see the rule above).
  typename Snapshot::Ptr current() const {
#if MOLORA_DETAIL_ATOMIC_SHARED_PTR
    return current_.load(std::memory_order_acquire);
#else
    return std::atomic_load_explicit(&current_, std::memory_order_acquire);
#endif
  }
  // Number of swaps so far.
  std::uint64_t version() const { return version_.load(std::memory_order_acquire); }

  // Adds tenant t, or replaces the tenant with its id, for all projections at once.
  void add(Tenant<Scalar> t) {
    const std::lock_guard<std::mutex> lock(write_);
    publish(current()->with(std::move(t)));
  }
  // Drops a tenant from all projections at once; false if it was absent.
  bool drop(const std::string& id) {
    const std::lock_guard<std::mutex> lock(write_);
    const auto cur = current();
    if (cur->find(id) < 0) return false;
    publish(cur->without(id));
    return true;
  }
  // Gives every adapter of a tenant another scale (the weights stay shared). Throws
  // config_error naming the id if it is absent, or on a bad scale.
  void set_scale(const std::string& id, double scale) {
    const std::lock_guard<std::mutex> lock(write_);
    const auto cur = current();
    Tenant<Scalar> t = cur->tenant(cur->slot(id));
    for (auto& a : t.adapters)
      if (a) a = a->with_scale(scale);
    publish(cur->with(std::move(t)));
  }

private:
  void publish(typename Snapshot::Ptr next) {
#if MOLORA_DETAIL_ATOMIC_SHARED_PTR
    current_.store(std::move(next), std::memory_order_release);
#else
    std::atomic_store_explicit(&current_, std::move(next), std::memory_order_release);
#endif
    version_.fetch_add(1, std::memory_order_acq_rel);
  }

#if MOLORA_DETAIL_ATOMIC_SHARED_PTR
  std::atomic<typename Snapshot::Ptr> current_;
#else
  typename Snapshot::Ptr current_;  // accessed only through std::atomic_load / atomic_store
#endif
  std::atomic<std::uint64_t> version_{0};
  std::mutex write_;
};

}  // namespace molora
