// The buffers of every step (states, outputs, x_hat, the input half of the gates) come from a
// cache that keeps them, once freed, for the next sequence: glibc maps every buffer over 32 MB
// afresh and unmaps it on free, so without it each training step would page-fault and clear all
// of them again (docs/kernels.md has the measurements). Buffers under kMinBytes, and all of them
// with a limit of 0, go to PyTorch's CPU allocator. A buffer is handed out again for a request
// of at least half its size; freed buffers are kept up to `limit` bytes, the oldest released
// first. In-use buffers are reported to PyTorch's memory profiler as its own CPU allocator
// reports them (free cached memory is not, as with CUDA's caching allocator).
#pragma once

#include <ATen/ATen.h>
#include <c10/core/Allocator.h>

#include <atomic>
#include <mutex>
#include <unordered_map>
#include <vector>

namespace seqnorm {

class BufferCache final : public c10::Allocator {
 public:
  static constexpr size_t kMinBytes = size_t(1) << 20;

  static BufferCache& get();  // never destroyed: tensors may be freed after static destructors

  c10::DataPtr allocate(size_t n) override;
  void copy_data(void* dest, const void* src, size_t count) const override {
    default_copy_data(dest, src, count);
  }

  size_t limit() const { return limit_.load(); }
  void set_limit(size_t bytes);
  std::vector<int64_t> info();  // cached (free) bytes, bytes in use, the limit
  void empty();

 private:
  struct Block {
    void* ptr;
    size_t size;
  };
  std::mutex mutex_;
  std::vector<Block> free_;                 // oldest first
  std::unordered_map<void*, size_t> used_;  // in use: sizes
  size_t cached_ = 0;                       // the sum of free_'s sizes
  std::atomic<size_t> limit_{size_t(1) << 30};

  static void release(void* ptr);
  void trim(size_t bytes);  // with mutex_ held
};

// An uninitialized tensor from the cache.
at::Tensor buffer(at::IntArrayRef size, const at::TensorOptions& options);

}  // namespace seqnorm
