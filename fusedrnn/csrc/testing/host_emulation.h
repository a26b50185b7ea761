// Runs the CUDA kernels of fusedrnn/csrc/cuda on the CPU, for tests on machines without a GPU (test support only:
// no build of the package compiles it).
//
// Include it (only it) in a C++ translation unit compiled with a host compiler, next to
// ../cuda/binding.cpp: the result is the `fusedrnn._cuda` extension working on CPU tensors, with
// plan/launch logic, kernels and binding exactly as on the GPU. What it models:
//   - a block = one OS thread running its kThreads CUDA threads as fibers (ucontext) that switch only at
//     barriers: __syncthreads, warp shuffles and the grid barrier; shared memory = a thread_local array;
//   - a launch runs all its blocks concurrently (so a cooperative kernel's grid barrier can complete);
//   - a small device (kSms multiprocessors, kSmemBytes of shared memory per block), so both schemes
//     run on small shapes; FUSEDRNN_EMU_REVERSE=1 resumes fibers in reverse order at every
//     barrier, exposing a read of shared or global data that a missing barrier leaves unordered.
// A barrier no fiber can pass (divergent __syncthreads, a shuffle with lanes missing) aborts with a
// message instead of hanging. Not modelled: the GPU memory model, timing, occupancy limits.
#pragma once

#include <cuda_bf16.h>
#include <cuda_fp16.h>
#include <cuda_runtime.h>
#include <ucontext.h>

#include <barrier>
#include <cmath>
#include <cstdio>
#include <cstdlib>
#include <cstring>
#include <functional>
#include <map>
#include <memory>
#include <thread>
#include <type_traits>
#include <utility>
#include <vector>

namespace emu {

constexpr int kSms = 4;                // multiprocessors of the emulated device
constexpr int kSmemBytes = 48 * 1024;  // shared memory per block
constexpr size_t kStackBytes = 64 * 1024;

inline void fail(const char* what) {
  std::fprintf(stderr, "fusedrnn host emulation: %s\n", what);
  std::abort();
}

enum class Wait { none, block, grid, warp_in, warp_out };

struct Fiber {
  ucontext_t ctx;
  std::unique_ptr<char[]> stack;  // uninitialised: zeroing 64 KiB per fiber per launch dominated run time
  uint3 tid;
  Wait wait = Wait::none;
  bool done = false;
};

// One block: its fibers, barrier bookkeeping, and the warp exchange slots of __shfl_xor_sync.
struct Block {
  std::vector<Fiber> fibers;
  ucontext_t scheduler;
  int current = 0;
  std::function<void()> body;
  std::barrier<>* grid = nullptr;
  float slots[32 * 32];
};

inline thread_local Block* block = nullptr;
inline thread_local uint3 block_idx;
inline thread_local dim3 block_dim, grid_dim;

inline Fiber& self() { return block->fibers[block->current]; }

inline void yield(Wait w) {
  Fiber& f = self();
  f.wait = w;
  swapcontext(&f.ctx, &block->scheduler);
}

inline void fiber_main() {
  block->body();
  self().done = true;
  swapcontext(&self().ctx, &block->scheduler);
}

inline bool reverse_order() {
  static const bool r = [] {
    const char* v = std::getenv("FUSEDRNN_EMU_REVERSE");
    return v && std::strcmp(v, "1") == 0;
  }();
  return r;
}

// Release the fibers waiting on a barrier once every live fiber it needs has arrived.
inline bool release_barriers(Block& b) {
  const int n = static_cast<int>(b.fibers.size());
  int live = 0, at_block = 0, at_grid = 0;
  for (const Fiber& f : b.fibers) {
    live += !f.done;
    at_block += f.wait == Wait::block;
    at_grid += f.wait == Wait::grid;
  }
  bool released = false;
  if ((at_block || at_grid) && at_block + at_grid == live) {
    if (at_block && at_grid) fail("__syncthreads and the grid barrier reached by different threads of a block");
    if (at_grid) b.grid->arrive_and_wait();
    for (Fiber& f : b.fibers) f.wait = Wait::none;
    released = true;
  }
  for (int w = 0; w * 32 < n; ++w) {
    for (Wait kind : {Wait::warp_in, Wait::warp_out}) {
      int arrived = 0;
      for (int l = 0; l < 32; ++l) arrived += b.fibers[w * 32 + l].wait == kind;
      if (arrived == 32) {
        for (int l = 0; l < 32; ++l) b.fibers[w * 32 + l].wait = Wait::none;
        released = true;
      }
    }
  }
  return released;
}

inline void run_block(uint3 idx, dim3 bdim, dim3 gdim, std::barrier<>* grid, const std::function<void()>& body) {
  auto b = std::make_unique<Block>();
  block = b.get();
  block_idx = idx, block_dim = bdim, grid_dim = gdim;
  b->grid = grid;
  b->body = body;
  const int n = static_cast<int>(bdim.x);
  b->fibers.resize(n);
  for (int i = 0; i < n; ++i) {
    Fiber& f = b->fibers[i];
    f.stack.reset(new char[kStackBytes]);
    f.tid = uint3{static_cast<unsigned>(i), 0, 0};
    getcontext(&f.ctx);
    f.ctx.uc_stack.ss_sp = f.stack.get();
    f.ctx.uc_stack.ss_size = kStackBytes;
    f.ctx.uc_link = nullptr;
    makecontext(&f.ctx, fiber_main, 0);
  }
  for (;;) {
    bool ran = false, all_done = true;
    for (int k = 0; k < n; ++k) {
      const int i = reverse_order() ? n - 1 - k : k;
      Fiber& f = b->fibers[i];
      if (f.done) continue;
      all_done = false;
      if (f.wait != Wait::none) continue;
      b->current = i;
      swapcontext(&b->scheduler, &f.ctx);
      ran = true;
    }
    if (all_done) break;
    if (!release_barriers(*b) && !ran) fail("deadlock: a barrier that some threads of the block never reach");
  }
  block = nullptr;
}

// Run `body` as a grid of blocks, all blocks concurrently.
inline void launch(dim3 grid, dim3 threads, const std::function<void()>& body) {
  const int blocks = static_cast<int>(grid.x);
  std::barrier<> grid_barrier(blocks);
  std::vector<std::thread> pool;
  for (int k = 0; k < blocks; ++k)
    pool.emplace_back(run_block, uint3{static_cast<unsigned>(k), 0, 0}, threads, grid, &grid_barrier, body);
  for (std::thread& t : pool) t.join();
}

inline float shfl_xor(float v, int lane_mask) {
  const int lane = self().tid.x & 31, warp_base = (self().tid.x & ~31u);
  float* slots = block->slots + (warp_base / 32) * 32;
  slots[lane] = v;
  yield(Wait::warp_in);
  const float got = slots[lane ^ lane_mask];
  yield(Wait::warp_out);
  return got;
}

// Kernels by address: cudaLaunchKernel gets `const void*` and a parameter array.
using Invoker = std::function<void(void**)>;
inline std::map<const void*, Invoker>& kernels() {
  static std::map<const void*, Invoker> table;
  return table;
}

template <class... Params, size_t... I>
void invoke_kernel(void (*kernel)(Params...), void** p, std::index_sequence<I...>) {
  kernel(*static_cast<std::remove_cv_t<Params>*>(p[I])...);
}

template <class... Params>
void register_kernel(void (*kernel)(Params...)) {
  kernels()[reinterpret_cast<const void*>(kernel)] = [kernel](void** p) {
    invoke_kernel(kernel, p, std::index_sequence_for<Params...>{});
  };
}

inline cudaError_t run(const void* func, dim3 grid, dim3 threads, void** args, size_t smem) {
  auto it = kernels().find(func);
  if (it == kernels().end()) fail("launch of an unregistered kernel");
  if (smem > static_cast<size_t>(kSmemBytes)) return cudaErrorInvalidValue;
  const Invoker invoke = it->second;
  launch(grid, threads, [&] { invoke(args); });
  return cudaSuccess;
}

}  // namespace emu

// ---- the CUDA built-ins the kernels use ----------------------------------------------------------------
#define threadIdx (::emu::self().tid)
#define blockIdx (::emu::block_idx)
#define blockDim (::emu::block_dim)
#define gridDim (::emu::grid_dim)
#undef __global__
#undef __device__
#undef __host__
#undef __launch_bounds__
#undef __grid_constant__
#undef __shared__
#define __global__
#define __device__
#define __host__
#define __launch_bounds__(...)
#define __grid_constant__
#define __shared__ thread_local  // one OS thread per block: thread_local is per block
inline void __syncthreads() { emu::yield(emu::Wait::block); }
inline float __shfl_xor_sync(unsigned, float v, int lane_mask) { return emu::shfl_xor(v, lane_mask); }

// cooperative_groups, as far as the kernels use it; the real header needs nvcc.
#define _COOPERATIVE_GROUPS_H_
namespace cooperative_groups {
struct grid_group {
  void sync() const { emu::yield(emu::Wait::grid); }
};
inline grid_group this_grid() { return {}; }
}  // namespace cooperative_groups

// ---- the CUDA runtime calls the launchers make ---------------------------------------------------------
extern "C" {
cudaError_t CUDARTAPI cudaGetDevice(int* device) {
  *device = 0;
  return cudaSuccess;
}
cudaError_t CUDARTAPI cudaDeviceGetAttribute(int* value, enum cudaDeviceAttr attr, int) {
  switch (attr) {
    case cudaDevAttrMultiProcessorCount:
      *value = emu::kSms;
      return cudaSuccess;
    case cudaDevAttrMaxSharedMemoryPerBlockOptin:
      *value = emu::kSmemBytes;
      return cudaSuccess;
    case cudaDevAttrCooperativeLaunch:
      *value = 1;
      return cudaSuccess;
    default:
      return cudaErrorInvalidValue;
  }
}
cudaError_t CUDARTAPI cudaFuncSetAttribute(const void*, enum cudaFuncAttribute, int) { return cudaSuccess; }
cudaError_t CUDARTAPI cudaOccupancyMaxActiveBlocksPerMultiprocessor(int* blocks, const void*, int, size_t smem) {
  *blocks = smem <= static_cast<size_t>(emu::kSmemBytes) ? 1 : 0;
  return cudaSuccess;
}
cudaError_t CUDARTAPI cudaLaunchKernel(const void* func, dim3 grid, dim3 threads, void** args, size_t smem,
                                       cudaStream_t) {
  return emu::run(func, grid, threads, args, smem);
}
cudaError_t CUDARTAPI cudaLaunchCooperativeKernel(const void* func, dim3 grid, dim3 threads, void** args, size_t smem,
                                                  cudaStream_t) {
  if (grid.x > static_cast<unsigned>(emu::kSms)) return cudaErrorCooperativeLaunchTooLarge;
  return emu::run(func, grid, threads, args, smem);
}
cudaError_t CUDARTAPI cudaGetLastError(void) { return cudaSuccess; }
const char* CUDARTAPI cudaGetErrorString(cudaError_t err) {
  return err == cudaSuccess ? "no error" : "error in the host emulation (see cudaError_t code)";
}
}

// ---- the kernels, registered -------------------------------------------------------------------------
namespace fusedrnn::cuda {
// What the kernels' `extern __shared__ float4 smem4[]` names. Compile with -fno-extern-tls-init: that
// block-scope extern declaration otherwise goes through a TLS init wrapper that g++ leaves null.
thread_local float4 smem4[emu::kSmemBytes / sizeof(float4)];
}  // namespace fusedrnn::cuda

#include "../cuda/gru_cell.cu"
#include "../cuda/lstm_cell.cu"
#include "../cuda/rnn_cell.cu"

namespace emu {
template <class Cell>
void register_cell() {
  using namespace fusedrnn::cuda;
  register_kernel(forward_kernel<Cell, float, true>);
  register_kernel(forward_kernel<Cell, float, false>);
  register_kernel(forward_kernel<Cell, __half, true>);
  register_kernel(forward_kernel<Cell, __half, false>);
  register_kernel(forward_kernel<Cell, __nv_bfloat16, true>);
  register_kernel(forward_kernel<Cell, __nv_bfloat16, false>);
  register_kernel(backward_kernel<Cell, float, true>);
  register_kernel(backward_kernel<Cell, float, false>);
  register_kernel(backward_kernel<Cell, __half, true>);
  register_kernel(backward_kernel<Cell, __half, false>);
  register_kernel(backward_kernel<Cell, __nv_bfloat16, true>);
  register_kernel(backward_kernel<Cell, __nv_bfloat16, false>);
  register_kernel(gemm_forward_kernel<Cell, float>);
  register_kernel(gemm_forward_kernel<Cell, __half>);
  register_kernel(gemm_forward_kernel<Cell, __nv_bfloat16>);
  register_kernel(gemm_backward_kernel<Cell, float>);
  register_kernel(gemm_backward_kernel<Cell, __half>);
  register_kernel(gemm_backward_kernel<Cell, __nv_bfloat16>);
}
inline const bool registered = [] {
  register_cell<fusedrnn::cuda::LstmCell>();
  register_cell<fusedrnn::cuda::GruCell>();
  register_cell<fusedrnn::cuda::RnnCell<false>>();
  register_cell<fusedrnn::cuda::RnnCell<true>>();
  return true;
}();
}  // namespace emu
