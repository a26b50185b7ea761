// Memory a layer call reuses instead of allocating it fresh each time.
//
// Why: a fresh multi-megabyte tensor is, as often as not, a fresh mmap from glibc (its threshold moves with
// what was freed last), and touching it costs a page fault per 4 KiB plus the kernel's zeroing (measured:
// bench/results/cpp_notes.md, "Memory a call reuses").
//
// - scratch(): per-thread buffers for a call's temporaries (input projection, packed weights, gate
//   gradients), never handed to the caller, so the next call on the same thread takes them over.
// - pooled_empty(): the outputs that outlive the call, y and the saved activations (`saved`, which autograd keeps
//   for backward): allocated from a small process-wide pool that a freed one returns to, for the next call of its
//   size (an inference loop frees each call's y before the next call: without the pool that was ~1,000 page
//   faults per call of the book's model, ~5 % of its time). Ordinary tensors otherwise: resizable, any thread
//   may free them.
// Neither keeps a block above kKeepBytes (a very long sequence does not pin its memory after the call; its
// own compute dwarfs the faults), and the pool holds at most kPoolBytes of free blocks.
#pragma once

#include <ATen/ATen.h>
#include <ATen/EmptyTensor.h>
#include <c10/core/Allocator.h>

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

// The c10::Allocator of pooled_empty's tensors: blocks from BlockPool, given back when the storage frees them (its
// resize_ allocates through it too).
class PoolAllocator final : public c10::Allocator {
 public:
  static PoolAllocator& instance() {
    static PoolAllocator* allocator = new PoolAllocator();  // never destroyed, like the pool
    return *allocator;
  }

  c10::DataPtr allocate(size_t bytes) override {
    if (bytes == 0) return {nullptr, nullptr, &give_back, c10::Device(c10::kCPU)};
    void* data = BlockPool::instance().take(static_cast<int64_t>(bytes));
    return {data, new Block{data, static_cast<int64_t>(bytes)}, &give_back, c10::Device(c10::kCPU)};
  }

  void copy_data(void* dest, const void* src, std::size_t count) const override { default_copy_data(dest, src, count); }

 private:
  struct Block {
    void* data;
    int64_t bytes;
  };

  static void give_back(void* context) {
    if (!context) return;
    const Block* block = static_cast<const Block*>(context);
    BlockPool::instance().give(block->data, block->bytes);
    delete block;
  }
};

// An uninitialised tensor like at::empty(sizes, options), its memory from BlockPool.
inline at::Tensor pooled_empty(at::IntArrayRef sizes, const at::TensorOptions& options) {
  return at::detail::empty_generic(sizes, &PoolAllocator::instance(), c10::DispatchKeySet(c10::DispatchKey::CPU),
                                   options.dtype().toScalarType(), std::nullopt);
}

}  // namespace fusedrnn::cpu
