// Storage for weights on cache-line boundaries. A std::vector of a large weight lands where
// malloc puts it: for allocations served by mmap, 16 bytes past a page, so every 64-byte
// vector load of a row straddles two cache lines. The base kernels stream such rows and read
// them measurably slower that way (docs/benchmarks.md, "x kept in L1 at 5-8 tokens, and bf16
// at one token"); the layers' own copies of their weights use this allocator instead.
#pragma once

#include <cstddef>
#include <new>
#include <vector>

namespace molora::detail {

inline constexpr std::size_t kWeightAlignment = 64;  // one cache line, one AVX-512 vector

template <class T>
struct cache_aligned_allocator {
  using value_type = T;
  cache_aligned_allocator() noexcept = default;
  template <class U>
  cache_aligned_allocator(const cache_aligned_allocator<U>&) noexcept {}
  T* allocate(std::size_t n) {
    return static_cast<T*>(::operator new(n * sizeof(T), std::align_val_t(kWeightAlignment)));
  }
  void deallocate(T* p, std::size_t) noexcept { ::operator delete(p, std::align_val_t(kWeightAlignment)); }
  template <class U>
  bool operator==(const cache_aligned_allocator<U>&) const noexcept {
    return true;
  }
  template <class U>
  bool operator!=(const cache_aligned_allocator<U>&) const noexcept {
    return false;
  }
};

// A vector whose data() is a multiple of kWeightAlignment.
template <class T>
using aligned_vector = std::vector<T, cache_aligned_allocator<T>>;

}  // namespace molora::detail
