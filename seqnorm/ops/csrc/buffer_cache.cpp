// The buffer cache of the kernels' step buffers (see buffer_cache.h).
#include "buffer_cache.h"

#include <ATen/EmptyTensor.h>
#include <c10/core/CPUAllocator.h>
#include <c10/core/impl/alloc_cpu.h>

namespace seqnorm {

BufferCache& BufferCache::get() {
  static BufferCache* cache = new BufferCache();
  return *cache;
}

c10::DataPtr BufferCache::allocate(size_t n) {
  if (n < kMinBytes || limit() == 0) return c10::GetDefaultCPUAllocator()->allocate(n);
  void* ptr = nullptr;
  size_t size = n;
  {
    std::lock_guard<std::mutex> lock(mutex_);
    auto best = free_.end();
    for (auto it = free_.begin(); it != free_.end(); ++it)
      if (it->size >= n && it->size / 2 <= n && (best == free_.end() || it->size < best->size))
        best = it;
    if (best != free_.end()) {
      ptr = best->ptr;
      size = best->size;
      cached_ -= size;
      free_.erase(best);
    }
  }
  if (!ptr) {
    try {
      ptr = c10::alloc_cpu(n);
    } catch (const c10::Error&) {  // out of memory: give back what is cached, and try again
      empty();
      ptr = c10::alloc_cpu(n);
    }
  }
  {
    std::lock_guard<std::mutex> lock(mutex_);
    used_[ptr] = size;
  }
  c10::profiledCPUMemoryReporter().New(ptr, size);
  return {ptr, ptr, &release, c10::Device(c10::DeviceType::CPU)};
}

void BufferCache::set_limit(size_t bytes) {
  limit_ = bytes;
  std::lock_guard<std::mutex> lock(mutex_);
  trim(bytes);
}

std::vector<int64_t> BufferCache::info() {
  std::lock_guard<std::mutex> lock(mutex_);
  size_t in_use = 0;
  for (const auto& block : used_) in_use += block.second;
  return {int64_t(cached_), int64_t(in_use), int64_t(limit())};
}

void BufferCache::empty() {
  std::lock_guard<std::mutex> lock(mutex_);
  trim(0);
}

void BufferCache::release(void* ptr) {
  c10::profiledCPUMemoryReporter().Delete(ptr);
  BufferCache& cache = get();
  std::lock_guard<std::mutex> lock(cache.mutex_);
  const auto it = cache.used_.find(ptr);
  const size_t size = it->second;
  cache.used_.erase(it);
  cache.free_.push_back({ptr, size});
  cache.cached_ += size;
  cache.trim(cache.limit());
}

void BufferCache::trim(size_t bytes) {
  size_t k = 0;
  for (; k < free_.size() && cached_ > bytes; ++k) {
    c10::free_cpu(free_[k].ptr);
    cached_ -= free_[k].size;
  }
  free_.erase(free_.begin(), free_.begin() + k);
}

at::Tensor buffer(at::IntArrayRef size, const at::TensorOptions& options) {
  return at::detail::empty_generic(size, &BufferCache::get(),
                                   c10::DispatchKeySet(c10::DispatchKey::CPU),
                                   options.dtype().toScalarType(), std::nullopt);
}

}  // namespace seqnorm
