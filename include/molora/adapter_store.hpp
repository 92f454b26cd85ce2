// A resident-memory budget for set adapters (docs/design-notes.md, "Adapter sets"). An
// AdapterStore knows how to load every registered adapter (a loader per id: from its file, or
// any function) and keeps at most budget_bytes of them loaded, evicting the least recently
// used; an evicted adapter is loaded again by its loader on its next get(). A host that
// serves more tenants than fit in memory asks the store for the adapters of the batch's
// tenants and builds the batch's AdapterSet from them (an AdapterSet holds only pointers).
//
// The budget counts the weights the store itself keeps (SetAdapter::weight_bytes()). An
// adapter that a caller still holds (an AdapterSet of a running forward) stays alive after
// its eviction until that caller lets go, so the process may briefly hold more than the
// budget; it never loads a second copy while the store holds one.
//
// Threads: every member function takes one mutex, so any thread may call any of them at any
// time. get() loads under that mutex: a load (a file read and, for a converted dtype, a copy)
// blocks other calls for its duration. The returned adapters are immutable and safe to share.
#pragma once

#include <cstddef>
#include <cstdint>
#include <functional>
#include <list>
#include <mutex>
#include <string>
#include <unordered_map>
#include <utility>
#include <vector>

#include "adapter_set.hpp"
#include "errors.hpp"

namespace molora {

template <class Scalar>
class AdapterStore {
public:
  using AdapterPtr = typename SetAdapter<Scalar>::Ptr;
  using Loader = std::function<AdapterPtr()>;

  // A store that keeps at most budget_bytes of adapter weights resident. Throws config_error
  // for a budget of 0.
  explicit AdapterStore(std::size_t budget_bytes) : budget_(budget_bytes) {
    if (budget_ == 0) throw config_error(detail::mismatch("adapter store budget_bytes", "a value >= 1", 0));
  }

  // Registers id, loaded by load() when first needed (nothing is loaded here). Throws
  // config_error on an empty id, an id already registered, or an empty loader.
  void add(const std::string& id, Loader load) {
    if (id.empty()) throw config_error(detail::mismatch("adapter store id", "a non-empty id", "\"\""));
    if (!load) throw config_error(detail::mismatch(detail::cat("adapter store loader of \"", id, "\""), "a function", "none"));
    const std::lock_guard<std::mutex> lock(mutex_);
    if (!entries_.emplace(id, Entry{std::move(load), nullptr, 0, lru_.end()}).second)
      throw config_error(detail::mismatch("adapter store id", "an id not yet registered", detail::cat("\"", id, "\" again")));
  }

  // Forgets id (and lets go of its adapter if resident); false if it was not registered.
  bool remove(const std::string& id) {
    const std::lock_guard<std::mutex> lock(mutex_);
    const auto it = entries_.find(id);
    if (it == entries_.end()) return false;
    if (it->second.adapter) release(it->second);
    entries_.erase(it);
    return true;
  }

  // The adapter of id, loaded if it is not resident; it becomes the most recently used, and
  // the least recently used others are evicted until the resident bytes fit the budget.
  // Throws config_error naming the id if it is not registered, if its loader returns null,
  // or if the adapter alone exceeds the budget (it is then not kept); whatever the loader
  // throws (e.g. format_error for a bad file) passes through. On a throw, nothing resident
  // changes.
  AdapterPtr get(const std::string& id) {
    const std::lock_guard<std::mutex> lock(mutex_);
    Entry& e = entry(id);
    if (e.adapter) {
      lru_.splice(lru_.begin(), lru_, e.position);  // most recently used first
      return e.adapter;
    }
    AdapterPtr a = e.load();
    if (!a) throw config_error(detail::mismatch(detail::cat("adapter store loader of \"", id, "\""), "an adapter", "null"));
    const std::size_t bytes = a->weight_bytes();
    if (bytes > budget_)
      throw config_error(detail::mismatch(detail::cat("adapter \"", id, "\" weight bytes"),
                                          detail::cat("at most the store's budget ", budget_), bytes));
    while (resident_bytes_ + bytes > budget_) {
      release(entries_.find(lru_.back())->second);
      ++evictions_;
    }
    lru_.push_front(id);
    e.adapter = std::move(a);
    e.bytes = bytes;
    e.position = lru_.begin();
    resident_bytes_ += bytes;
    ++loads_;
    return e.adapter;
  }

  // Whether id is registered and resident (does not change the order).
  bool resident(const std::string& id) const {
    const std::lock_guard<std::mutex> lock(mutex_);
    const auto it = entries_.find(id);
    return it != entries_.end() && it->second.adapter != nullptr;
  }
  // The resident ids, most recently used first.
  std::vector<std::string> resident_ids() const {
    const std::lock_guard<std::mutex> lock(mutex_);
    return std::vector<std::string>(lru_.begin(), lru_.end());
  }
  std::size_t resident_bytes() const {
    const std::lock_guard<std::mutex> lock(mutex_);
    return resident_bytes_;
  }
  std::size_t budget_bytes() const { return budget_; }
  // Loads and evictions since construction.
  std::uint64_t loads() const {
    const std::lock_guard<std::mutex> lock(mutex_);
    return loads_;
  }
  std::uint64_t evictions() const {
    const std::lock_guard<std::mutex> lock(mutex_);
    return evictions_;
  }

private:
  struct Entry {
    Loader load;
    AdapterPtr adapter;  // null when not resident
    std::size_t bytes;
    std::list<std::string>::iterator position;  // in lru_, when resident
  };

  Entry& entry(const std::string& id) {
    const auto it = entries_.find(id);
    if (it == entries_.end())
      throw config_error(detail::mismatch("adapter store id", "a registered id", detail::cat("\"", id, "\"")));
    return it->second;
  }
  // Lets go of a resident entry's adapter (caller holds the mutex).
  void release(Entry& e) {
    lru_.erase(e.position);
    e.position = lru_.end();
    e.adapter.reset();
    resident_bytes_ -= e.bytes;
    e.bytes = 0;
  }

  const std::size_t budget_;
  mutable std::mutex mutex_;
  std::unordered_map<std::string, Entry> entries_;
  std::list<std::string> lru_;  // resident ids, most recently used first
  std::size_t resident_bytes_ = 0;
  std::uint64_t loads_ = 0, evictions_ = 0;
};

}  // namespace molora
