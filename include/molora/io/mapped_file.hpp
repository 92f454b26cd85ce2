// The bytes a safetensors reader looks at (ByteSource): a file mapped read-only
// (MappedFile, Load::map), a file copied into memory (ReadFile, Load::read, bounded by
// Limits::max_read_bytes) or a copy of a caller's buffer (OwnedBytes, the fuzzers' entry).
// Files are opened through input.hpp's RegularFile, so a FIFO or a device is refused without
// blocking. A mapped file truncated by another process while it is mapped raises SIGBUS on
// access, which no exception can report: see Load.
#pragma once

#include <cerrno>
#include <cstddef>
#include <cstdint>
#include <cstring>
#include <string>
#include <vector>

#include <sys/mman.h>

#include "../errors.hpp"
#include "input.hpp"

namespace molora::io {
namespace internal {

// The bytes a reader looks at: an mmap of a file or an owned copy of a buffer.
class ByteSource {
public:
  virtual ~ByteSource() = default;
  const std::uint8_t* data() const { return data_; }
  std::size_t size() const { return size_; }

protected:
  const std::uint8_t* data_ = nullptr;
  std::size_t size_ = 0;
};

// The file mapped read-only (Load::map). See Load for the SIGBUS caveat.
class MappedFile final : public ByteSource {
public:
  explicit MappedFile(const std::string& path) {
    const RegularFile file(path);
    size_ = static_cast<std::size_t>(file.size());
    if (size_ > 0) {
      void* p = ::mmap(nullptr, size_, PROT_READ, MAP_PRIVATE, file.fd(), 0);
      if (p == MAP_FAILED) throw format_error(molora::detail::cat(path, ": cannot mmap: ", std::strerror(errno)));
      data_ = static_cast<const std::uint8_t*>(p);
    }
  }  // the mapping outlives the descriptor
  ~MappedFile() override {
    if (data_) ::munmap(const_cast<std::uint8_t*>(data_), size_);
  }
  MappedFile(const MappedFile&) = delete;
  MappedFile& operator=(const MappedFile&) = delete;
};

// The file copied into memory (Load::read), at most `max_bytes` long.
class ReadFile final : public ByteSource {
public:
  ReadFile(const std::string& path, std::uint64_t max_bytes) {
    RegularFile(path).read_all(bytes_, max_bytes, "Limits::max_read_bytes");
    data_ = bytes_.data();
    size_ = bytes_.size();
  }

private:
  std::vector<std::uint8_t> bytes_;
};

class OwnedBytes final : public ByteSource {
public:
  OwnedBytes(const void* p, std::size_t n) : bytes_(n) {
    if (n) std::memcpy(bytes_.data(), p, n);  // vector storage is aligned for any scalar
    data_ = bytes_.data();
    size_ = n;
  }

private:
  std::vector<std::uint8_t> bytes_;
};

}  // namespace internal
}  // namespace molora::io
