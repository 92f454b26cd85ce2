// What molora accepts from a file it did not write: the size limits every reader checks
// before allocating anything that depends on the file (Limits), how a safetensors file is
// brought into memory (Load), and opening a path that must be a regular file without ever
// blocking on a FIFO or reading a device. docs/security.md says why each limit exists and
// how a host raises it; a limit that is hit is a format_error naming the file, the limit and
// the value found.
#pragma once

#include <cerrno>
#include <cstdint>
#include <cstring>
#include <limits>
#include <string>
#include <vector>

#include <fcntl.h>
#include <sys/stat.h>
#include <unistd.h>

#include "../errors.hpp"
#include "../types.hpp"

namespace molora::io {

// Bounds on what a file may make molora do. The defaults admit any real adapter checkpoint
// (a few thousand tensors, names under 200 bytes, tens of experts); a host that loads larger
// files (e.g. a whole sharded model's index) raises the field it needs.
struct Limits {
  std::uint64_t max_header_bytes = 100'000'000;  // safetensors JSON header (the format's own cap)
  std::uint64_t max_tensors = 1u << 20;           // tensors in one safetensors header
  std::uint64_t max_name_bytes = 1024;            // one tensor name / checkpoint key
  std::uint64_t max_rank = 16;                    // dimensions of one tensor
  std::uint64_t max_config_bytes = 16u << 20;     // a JSON config file
  std::uint64_t max_read_bytes = 1ull << 32;      // a safetensors file read with Load::read
  Index max_experts = 4096;                       // num_experts a checkpoint config may ask for
};

// How SafetensorsReader brings a file into memory.
//  map:  mmap it (no copy). If another process truncates the file while it is mapped, touching
//        the lost pages raises SIGBUS, which no exception can turn into an error.
//  read: read it whole into memory (at most Limits::max_read_bytes); later changes to the
//        file cannot affect the reader. For files from places the host does not control.
enum class Load { map, read };

namespace internal {

// "a directory", "a FIFO", ... for messages.
inline const char* file_type_name(mode_t mode) {
  if (S_ISDIR(mode)) return "a directory";
  if (S_ISFIFO(mode)) return "a FIFO";
  if (S_ISCHR(mode)) return "a character device";
  if (S_ISBLK(mode)) return "a block device";
  if (S_ISSOCK(mode)) return "a socket";
  return "not a regular file";
}

// An open, read-only descriptor of a regular file, closed on destruction. The open never
// blocks (O_NONBLOCK: a FIFO without a writer would otherwise wait forever) and the type is
// checked on the descriptor itself, so a path swapped between a stat and the open cannot
// slip a device in.
class RegularFile {
public:
  explicit RegularFile(const std::string& path) : path_(path) {
    fd_ = ::open(path.c_str(), O_RDONLY | O_CLOEXEC | O_NONBLOCK | O_NOCTTY);
    if (fd_ < 0) throw format_error(molora::detail::cat(path, ": cannot open: ", std::strerror(errno)));
    struct stat st {};
    if (::fstat(fd_, &st) != 0) {
      const int err = errno;
      ::close(fd_);
      throw format_error(molora::detail::cat(path, ": cannot stat: ", std::strerror(err)));
    }
    if (!S_ISREG(st.st_mode)) {
      ::close(fd_);
      throw format_error(molora::detail::cat(path, ": not a regular file: expected a regular file, got ",
                                             file_type_name(st.st_mode)));
    }
    size_ = static_cast<std::uint64_t>(st.st_size);
  }
  ~RegularFile() { ::close(fd_); }
  RegularFile(const RegularFile&) = delete;
  RegularFile& operator=(const RegularFile&) = delete;

  int fd() const { return fd_; }
  std::uint64_t size() const { return size_; }

  // Reads the whole file (size() bytes as of the open) into `out`, after checking size() <=
  // max_bytes; `what` names the limit in the message. A file that shrinks meanwhile is an error.
  template <class Bytes>
  void read_all(Bytes& out, std::uint64_t max_bytes, const char* what) const {
    if (size_ > max_bytes)
      throw format_error(molora::detail::cat(path_, ": file size: expected at most ", max_bytes, " bytes (", what,
                                             "), got ", size_));
    out.resize(static_cast<std::size_t>(size_));
    std::size_t done = 0;
    while (done < out.size()) {
      const ssize_t n = ::read(fd_, &out[done], out.size() - done);
      if (n < 0 && errno == EINTR) continue;
      if (n < 0) throw format_error(molora::detail::cat(path_, ": read failed: ", std::strerror(errno)));
      if (n == 0)
        throw format_error(molora::detail::cat(path_, ": file shrank while reading: expected ", size_, " bytes, got ", done));
      done += static_cast<std::size_t>(n);
    }
  }

private:
  std::string path_;
  int fd_ = -1;
  std::uint64_t size_ = 0;
};

}  // namespace internal
}  // namespace molora::io
