// Memory a layer call reuses instead of allocating it fresh each time.
//
// Why: a fresh multi-megabyte tensor is, as often as not, a fresh mmap from glibc (its threshold moves with
// what was freed last), and touching it costs a page fault per 4 KiB plus the kernel's zeroing (measured:
// bench/results/cpp_notes.md, "Memory a call reuses").
//
// - scratch(): per-thread buffers for a call's temporaries (input projection, packed weights, gate
//   gradients), never handed to the caller, so the next call on the same thread takes them over.
// - saved_empty(): the saved activations (`saved`), which outlive the call (autograd keeps them for backward):
//   allocated from a small process-wide pool that a freed one returns to, for the next call of its size.
// Neither keeps a block above kKeepBytes (a very long sequence does not pin its memory after the call; its
// own compute dwarfs the faults), and the pool holds at most kPoolBytes of free blocks.
#pragma once

#include <ATen/ATen.h>

#include <array>
#include <cstdint>
#include <cstdlib>
#include <mutex>
#include <new>
#include <unordered_map>

namespace fusedrnn::cpu {

// One buffer per role. kSequence holds forward's input projection and then backward's gate gradients (the
// projection is dead by then), so training keeps one (T, B, G*H) buffer, not two.
enum class Slot : int {
  kSequence,         // gx (forward), dG (backward): (T, B, G*H)
  kHiddenGateGrads,  // GRU's hidden-side dG: (T, B, G*H)
  kGates,            // h W_hh^T of one step
  kPack,             // packed W_hh (and W_ih for dx after the loop)
  kPackInput,        // packed W_ih for the projection or dx inside the step loop
  kPackProj,         // packed W_hr
  kGradOut,          // dL/dh_t with proj_size
  kCellOut,          // cell_out = o * tanh(c_t) with proj_size
  kState,            // forward without save: a two-step ring of `saved`; backward with proj_size: dL/d(cell_out)
  kCount
};

constexpr int64_t kKeepBytes = int64_t(32) << 20;
constexpr int64_t kPoolBytes = int64_t(64) << 20;

// An uninitialised tensor of `sizes` and `options` that stays valid until the next scratch(slot) call on this
// thread. Each slot is used once per call; two live buffers must use two slots.
inline at::Tensor scratch(Slot slot, at::IntArrayRef sizes, const at::TensorOptions& options) {
  thread_local std::array<at::Tensor, static_cast<int>(Slot::kCount)> kept;
  at::Tensor& buffer = kept[static_cast<int>(slot)];
  int64_t numel = 1;
  for (const int64_t size : sizes) numel *= size;
  if (buffer.defined() && buffer.dtype() == options.dtype() && buffer.numel() >= numel)
    return buffer.narrow(0, 0, numel).view(sizes);
  at::Tensor fresh = at::empty({numel}, options);
  buffer = static_cast<int64_t>(fresh.nbytes()) <= kKeepBytes ? fresh : at::Tensor();
  return fresh.view(sizes);
}

// Free blocks by size, shared by all threads (`saved` may be freed on another thread than it was made on).
class BlockPool {
 public:
  static BlockPool& instance() {
    static BlockPool* pool = new BlockPool();  // never destroyed: `saved` may be freed while the process exits
    return *pool;
  }

  void* take(int64_t bytes) {
    {
      std::lock_guard<std::mutex> lock(mutex_);
      const auto it = free_.find(bytes);
      if (it != free_.end()) {
        void* block = it->second;
        free_.erase(it);
        kept_ -= bytes;
        return block;
      }
    }
    void* block = std::aligned_alloc(64, (bytes + 63) / 64 * 64);  // 64: torch's CPU alignment
    if (!block) throw std::bad_alloc();
    return block;
  }

  void give(void* block, int64_t bytes) {
    {
      std::lock_guard<std::mutex> lock(mutex_);
      if (bytes <= kKeepBytes && kept_ + bytes <= kPoolBytes) {
        free_.emplace(bytes, block);
        kept_ += bytes;
        return;
      }
    }
    std::free(block);
  }

 private:
  std::mutex mutex_;
  std::unordered_multimap<int64_t, void*> free_;
  int64_t kept_ = 0;
};

// An uninitialised tensor like at::empty(sizes, options) whose memory comes from, and returns to, BlockPool.
inline at::Tensor saved_empty(at::IntArrayRef sizes, const at::TensorOptions& options) {
  int64_t numel = 1;
  for (const int64_t size : sizes) numel *= size;
  const int64_t bytes = numel * static_cast<int64_t>(options.dtype().itemsize());
  if (bytes == 0) return at::empty(sizes, options);
  void* block = BlockPool::instance().take(bytes);
  return at::from_blob(block, sizes, [bytes](void* data) { BlockPool::instance().give(data, bytes); }, options);
}

}  // namespace fusedrnn::cpu
