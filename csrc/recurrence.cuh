// The recurrence of one layer-direction, forward and backward, for any cell (lstm_cell.cu, gru_cell.cu,
// rnn_cell.cu supply the per-unit math). The contract and the math are in fusedrnn/reference.py; the
// argument structs and their shapes are in launchers.h.
//
// Work split: block k owns hidden units j in [k*U, k*U + U) ("unit phase": gates, cell update) and
// output features p in [k*Up, k*Up + Up) ("out phase"): the projection h = r W_hr^T with proj_size, the
// dL/dh bookkeeping in the backward. Without proj_size P == H and Up == U, so both phases of a block
// cover the same indices and need only a block barrier between them; with it they need a grid barrier.
//
// Forward, step s (t = s, or T-1-s when reverse), h_prev = h[s % 2], h_next = h[(s+1) % 2]:
//   units: gh = h_prev W_hh[rows of own units]^T + b_hh; cell(gx[t], gh) -> c, ws[t], r
//          without proj: h_next = valid ? r : h_prev (own units), y[t] = h_next
//   outs (proj only): h_next = valid ? r W_hr[own rows]^T : h_prev, y[t] = h_next
// Backward, step s walks the forward's steps in reverse; dgh_step[s % 2] holds step s's hidden-side
// gate grads (float32, zero at padded steps):
//   outs:  dh += dgh_step[(s-1) % 2] W_hh[:, own p]  (s > 0);  s == T: dh is dh0, stop
//          dh_t = dh + (valid ? dy[t] : 0);  dh_step = dh_t;  dhy[t] = valid ? dh_t : 0 (proj)
//          dh = valid ? 0 : dh_t   (a padded step passes dh through unchanged)
//   units: dr = proj ? dh_step W_hr[:, own j] : dh_step[own j];  cell backward -> dgx[t], dgh[t],
//          dgh_step[s % 2], dc;  gru: dh += valid ? dh_t * z : 0 (the direct path)
// Schemes: persistent = one cooperative launch, weight slices staged in shared memory once, a grid
// barrier between dependent phases; per_step = one launch per step and phase, weights read from global
// memory (chosen when the slices do not fit on chip with every block resident).
#pragma once

#include <cooperative_groups.h>

#include <algorithm>

#include "common.cuh"

namespace fusedrnn {

enum Phase : int { kUnits = 1, kOuts = 2, kBoth = 3 };

struct Layout {
  int U, Up;  // hidden units and output features per block
};

__host__ __device__ __forceinline__ int imin(int a, int b) { return a < b ? a : b; }
__host__ __device__ __forceinline__ int imax(int a, int b) { return a > b ? a : b; }
__device__ __forceinline__ int time_of(const Shape& sh, int s) { return sh.reverse ? sh.T - 1 - s : s; }
__device__ __forceinline__ bool is_valid(const Shape& sh, int t, int b) {
  return sh.lengths == nullptr || t < sh.lengths[b];
}
// The forward step before t (the state step t starts from), or -1 when t is the first.
__device__ __forceinline__ int prev_time(const Shape& sh, int t) {
  const int p = sh.reverse ? t + 1 : t - 1;
  return p >= 0 && p < sh.T ? p : -1;
}
__device__ __forceinline__ size_t at(const Shape& sh, int t, int b, int width) {
  return (static_cast<size_t>(t) * sh.B + b) * width;
}

template <bool kGrid>
__device__ __forceinline__ void grid_barrier() {
  if constexpr (kGrid) cooperative_groups::this_grid().sync();
}

// The slices a block owns. Units: rows g*H + j of a (G*H, K) matrix; outs: rows p of a (P, K) matrix.
template <class T>
__device__ GlobalRows<T> unit_rows(const void* w, int K, const Shape& sh, const Layout& L) {
  const int start = blockIdx.x * L.U;
  return GlobalRows<T>{static_cast<const T*>(w), K, L.U, imin(L.U, sh.H - start), start, sh.H};
}
template <class T>
__device__ GlobalRows<T> out_rows(const void* w, int K, const Shape& sh, const Layout& L) {
  const int start = blockIdx.x * L.Up;
  return GlobalRows<T>{static_cast<const T*>(w), K, L.Up, imin(L.Up, sh.P - start), start, 0};
}

// Runs `fn(bl, b, u)` for every batch row b = b0 + bl of the tile and owned index u < n, each pair on a
// fixed thread, so per-(b, u) state read and written by the same thread needs no barrier.
template <class Fn>
__device__ __forceinline__ void for_tile(int b0, int nb, int U, int n, Fn fn) {
  for (int idx = threadIdx.x; idx < nb * U; idx += blockDim.x) {
    const int bl = idx / U, u = idx - bl * U;
    if (u < n) fn(bl, b0 + bl, u);
  }
}

// One phase over all batch tiles: acc = vec-rows products (skipped when R == 0), then fn per (b, u).
template <class T, class Rows, class Fn>
__device__ void phase(const Rows& rows, int R, int K, const float* vec, int B, int U, int n, float* acc, Fn fn) {
  if (n <= 0) return;  // a block past the end of H or P (uniform across the block)
  for (int b0 = 0; b0 < B; b0 += kBatchTile) {
    const int nb = imin(kBatchTile, B - b0);
    if (R > 0) {
      block_matvec<T>(rows, R, K, vec + static_cast<size_t>(b0) * K, K, nb, acc);
      __syncthreads();
    }
    for_tile(b0, nb, U, n, fn);
    __syncthreads();
  }
}

// Runs steps [s_begin, s_end) as step(rows_a, rows_b, s, acc). Persistent (kOnChip): the block's two
// weight slices (R_a and R_b rows) are staged into shared memory after acc's acc_rows x kBatchTile floats,
// once, and a grid barrier closes every step. Per step: the slices are read from global memory.
template <class T, bool kOnChip, class Step>
__device__ void run_steps(const GlobalRows<T>& a, int R_a, const GlobalRows<T>& b, int R_b, int acc_rows, int s_begin,
                          int s_end, Step step) {
  extern __shared__ float4 smem4[];  // float4: 16-byte alignment for what follows
  float* acc = reinterpret_cast<float*>(smem4);
  if constexpr (kOnChip) {
    T* w = reinterpret_cast<T*>(acc + kBatchTile * acc_rows);
    const SharedRows<T> a_s = stage_rows(a, R_a, w);
    const SharedRows<T> b_s = stage_rows(b, R_b, w + static_cast<size_t>(R_a) * a.K);
    __syncthreads();
    for (int s = s_begin; s < s_end; ++s) {
      step(a_s, b_s, s, acc);
      grid_barrier<true>();
    }
  } else {
    for (int s = s_begin; s < s_end; ++s) step(a, b, s, acc);
  }
}

// ---- forward ------------------------------------------------------------------------------------------
template <class Cell, class T, bool kGrid, class HhRows, class HrRows>
__device__ void forward_step(const ForwardArgs& a, const Layout& L, const HhRows& hh, const HrRows& hr, int s,
                             int phases, float* acc) {
  constexpr int G = Cell::G;
  const Shape& sh = a.shape;
  const int t = time_of(sh, s), H = sh.H, P = sh.P, GH = G * H;
  const float* h_prev = a.h + static_cast<size_t>(s & 1) * sh.B * P;
  float* h_next = a.h + static_cast<size_t>((s + 1) & 1) * sh.B * P;
  const bool proj = a.w_hr != nullptr;
  const T* gx = static_cast<const T*>(a.gx);
  const T* b_hh = static_cast<const T*>(a.b_hh);
  T* ws = static_cast<T*>(a.ws);
  T* y = static_cast<T*>(a.y);
  auto emit = [&](int b, int p, float h_new) {  // hold, then publish h_t
    const float h = is_valid(sh, t, b) ? h_new : h_prev[static_cast<size_t>(b) * P + p];
    h_next[static_cast<size_t>(b) * P + p] = h;
    y[at(sh, t, b, P) + p] = from_float<T>(h);
  };
  const int j0 = blockIdx.x * L.U, R = G * L.U;
  if (phases & kUnits) {
    phase<T>(hh, R, P, h_prev, sh.B, L.U, imin(L.U, H - j0), acc, [&](int bl, int b, int u) {
      const int j = j0 + u;
      float gxv[G], ghv[G], act[Cell::WS > 0 ? Cell::WS : 1];
#pragma unroll
      for (int g = 0; g < G; ++g) {
        gxv[g] = to_float(gx[at(sh, t, b, GH) + g * H + j]);
        ghv[g] = acc[bl * R + g * L.U + u] + (b_hh ? to_float(b_hh[g * H + j]) : 0.f);
      }
      const float hp = Cell::kNeedsHPrev ? h_prev[static_cast<size_t>(b) * P + j] : 0.f;
      float c = Cell::kHasC ? a.c[static_cast<size_t>(b) * H + j] : 0.f;
      const float r = Cell::forward(gxv, ghv, hp, c, is_valid(sh, t, b), act);
      if (Cell::kHasC) a.c[static_cast<size_t>(b) * H + j] = c;
#pragma unroll
      for (int w = 0; w < Cell::WS; ++w) ws[at(sh, t, b, Cell::WS * H) + w * H + j] = from_float<T>(act[w]);
      if (proj)
        a.r[static_cast<size_t>(b) * H + j] = r;
      else
        emit(b, j, r);
    });
  }
  if (!proj) return;
  grid_barrier<kGrid>();
  if (phases & kOuts) {
    const int p0 = blockIdx.x * L.Up;
    phase<T>(hr, L.Up, H, a.r, sh.B, L.Up, imin(L.Up, P - p0), acc,
             [&](int bl, int b, int u) { emit(b, p0 + u, acc[bl * L.Up + u]); });
  }
}

template <class Cell, class T, bool kOnChip>
__global__ void __launch_bounds__(kThreads, 1)
    forward_kernel(ForwardArgs a, Layout L, int s_begin, int s_end, int phases) {
  const Shape& sh = a.shape;
  const int R = Cell::G * L.U;
  run_steps<T, kOnChip>(unit_rows<T>(a.w_hh, sh.P, sh, L), R, out_rows<T>(a.w_hr, sh.H, sh, L), a.w_hr ? L.Up : 0,
                        imax(R, L.Up), s_begin, s_end, [&](const auto& hh, const auto& hr, int s, float* acc) {
                          forward_step<Cell, T, kOnChip>(a, L, hh, hr, s, phases, acc);
                        });
}

// ---- backward -----------------------------------------------------------------------------------------
template <class Cell, class T, bool kGrid, class HhRows, class HrRows>
__device__ void backward_step(const BackwardArgs& a, const Layout& L, const HhRows& hhT, const HrRows& hrT, int s,
                              int phases, float* acc) {
  constexpr int G = Cell::G, WS = Cell::WS;
  const Shape& sh = a.shape;
  const int H = sh.H, P = sh.P, GH = G * H;
  const bool proj = a.w_hrT != nullptr, last = s == sh.T;
  const int t = last ? -1 : time_of(sh, sh.T - 1 - s);  // backward step s undoes forward step T-1-s
  const int p0 = blockIdx.x * L.Up, j0 = blockIdx.x * L.U;
  if (phases & kOuts) {
    const float* dgh_prev = a.dgh_step + static_cast<size_t>((s + 1) & 1) * sh.B * GH;
    const T* dy = static_cast<const T*>(a.dy);
    T* dhy = static_cast<T*>(a.dhy);
    phase<T>(hhT, s > 0 ? L.Up : 0, GH, dgh_prev, sh.B, L.Up, imin(L.Up, P - p0), acc, [&](int bl, int b, int u) {
      const size_t i = static_cast<size_t>(b) * P + p0 + u;
      const float dh = a.dh[i] + (s > 0 ? acc[bl * L.Up + u] : 0.f);
      if (last) {
        a.dh[i] = dh;
        return;
      }
      const bool valid = is_valid(sh, t, b);
      const float dh_t = dh + (valid ? to_float(dy[at(sh, t, b, P) + p0 + u]) : 0.f);
      a.dh_step[i] = dh_t;
      if (dhy) dhy[at(sh, t, b, P) + p0 + u] = from_float<T>(valid ? dh_t : 0.f);
      a.dh[i] = valid ? 0.f : dh_t;
    });
  }
  if (last) return;
  if (proj)
    grid_barrier<kGrid>();
  else
    __syncthreads();
  if (!(phases & kUnits)) return;
  const T* ws = static_cast<const T*>(a.ws);
  const T* y = static_cast<const T*>(a.y);
  const T* c0 = static_cast<const T*>(a.c0);
  const T* h0 = static_cast<const T*>(a.h0);
  T* dgx = static_cast<T*>(a.dgx);
  T* dgh = static_cast<T*>(a.dgh);
  float* dgh_step = a.dgh_step + static_cast<size_t>(s & 1) * sh.B * GH;
  const int tp = prev_time(sh, t);
  phase<T>(hrT, proj ? L.U : 0, P, a.dh_step, sh.B, L.U, imin(L.U, H - j0), acc, [&](int bl, int b, int u) {
    const int j = j0 + u;
    const bool valid = is_valid(sh, t, b);
    const float dr = proj ? acc[bl * L.U + u] : a.dh_step[static_cast<size_t>(b) * P + j];
    float act[WS > 0 ? WS : 1], dgxv[G], dghv[G];
#pragma unroll
    for (int w = 0; w < WS; ++w) act[w] = to_float(ws[at(sh, t, b, WS * H) + w * H + j]);
    float c_prev = 0.f, h_prev = 0.f, h = 0.f, dc = 0.f;
    if (Cell::kHasC) {
      c_prev = to_float(tp < 0 ? c0[static_cast<size_t>(b) * H + j] : ws[at(sh, tp, b, WS * H) + Cell::kCSlot * H + j]);
      dc = a.dc[static_cast<size_t>(b) * H + j];
    }
    if (Cell::kNeedsHPrev) h_prev = to_float(tp < 0 ? h0[static_cast<size_t>(b) * P + j] : y[at(sh, tp, b, P) + j]);
    if (Cell::kNeedsH) h = to_float(y[at(sh, t, b, P) + j]);
    const float direct = Cell::backward(dr, dc, act, c_prev, h_prev, h, valid, dgxv, dghv);
    if (Cell::kHasC) a.dc[static_cast<size_t>(b) * H + j] = dc;
#pragma unroll
    for (int g = 0; g < G; ++g) {  // select, never multiply: NaN/Inf of padding stays out
      const float dx = valid ? dgxv[g] : 0.f, dhh = valid ? dghv[g] : 0.f;
      dgx[at(sh, t, b, GH) + g * H + j] = from_float<T>(dx);
      if (dgh) dgh[at(sh, t, b, GH) + g * H + j] = from_float<T>(dhh);
      dgh_step[static_cast<size_t>(b) * GH + g * H + j] = dhh;
    }
    if (Cell::kDirect && valid) a.dh[static_cast<size_t>(b) * P + j] += direct;
  });
}

template <class Cell, class T, bool kOnChip>
__global__ void __launch_bounds__(kThreads, 1)
    backward_kernel(BackwardArgs a, Layout L, int s_begin, int s_end, int phases) {
  const Shape& sh = a.shape;
  run_steps<T, kOnChip>(out_rows<T>(a.w_hhT, Cell::G * sh.H, sh, L), L.Up, unit_rows<T>(a.w_hrT, sh.P, sh, L),
                        a.w_hrT ? L.U : 0, imax(L.Up, L.U), s_begin, s_end,
                        [&](const auto& hhT, const auto& hrT, int s, float* acc) {
                          backward_step<Cell, T, kOnChip>(a, L, hhT, hrT, s, phases, acc);
                        });
}

// ---- host side ----------------------------------------------------------------------------------------
inline int ceil_div(int a, int b) { return (a + b - 1) / b; }

// Bytes of dynamic shared memory: gate sums for a batch tile, then (persistent) the weight slices.
template <class T>
size_t smem_bytes(int acc_rows, size_t weight_elems) {
  return sizeof(float) * kBatchTile * acc_rows + sizeof(T) * weight_elems;
}

struct Plan {
  Layout L;
  int blocks;
  size_t smem;
  bool persistent;
};

// Per-step layout: 8 units per block (32 LSTM gate rows) and as many blocks as that takes.
inline Layout per_step_layout(const Shape& sh) {
  const int blocks = ceil_div(sh.H, 8);
  return Layout{8, ceil_div(sh.P, blocks)};
}

// Persistent layout: spread units and outputs over at most one block per multiprocessor.
inline Layout persistent_layout(const Shape& sh, int sms) { return Layout{ceil_div(sh.H, sms), ceil_div(sh.P, sms)}; }

inline int blocks_for(const Shape& sh, const Layout& L) { return imax(ceil_div(sh.H, L.U), ceil_div(sh.P, L.Up)); }

// Decide the scheme. `acc_rows(L)` and `weights(L)` size the kernel's shared memory for a layout.
template <class T, class Kernel, class AccRows, class Weights>
cudaError_t make_plan(Kernel persistent_kernel, const Shape& sh, Scheme scheme, AccRows acc_rows, Weights weights,
                      Plan* plan) {
  int device = 0, sms = 0, optin = 0, coop = 0;
  cudaError_t err = cudaGetDevice(&device);
  if (!err) err = cudaDeviceGetAttribute(&sms, cudaDevAttrMultiProcessorCount, device);
  if (!err) err = cudaDeviceGetAttribute(&optin, cudaDevAttrMaxSharedMemoryPerBlockOptin, device);
  if (!err) err = cudaDeviceGetAttribute(&coop, cudaDevAttrCooperativeLaunch, device);
  if (err) return err;
  if (scheme != Scheme::per_step && coop) {
    const Layout L = persistent_layout(sh, sms);
    const size_t smem = smem_bytes<T>(acc_rows(L), weights(L));
    int per_sm = 0;
    if (smem <= static_cast<size_t>(optin)) {
      const void* kernel = reinterpret_cast<const void*>(persistent_kernel);
      err = cudaFuncSetAttribute(kernel, cudaFuncAttributeMaxDynamicSharedMemorySize, static_cast<int>(smem));
      if (!err) err = cudaOccupancyMaxActiveBlocksPerMultiprocessor(&per_sm, kernel, kThreads, smem);
      if (err) return err;
    }
    const int blocks = blocks_for(sh, L);
    if (per_sm * sms >= blocks) {
      *plan = Plan{L, blocks, smem, true};
      return cudaSuccess;
    }
  }
  if (scheme == Scheme::persistent) return cudaErrorCooperativeLaunchTooLarge;
  const Layout L = per_step_layout(sh);
  *plan = Plan{L, blocks_for(sh, L), smem_bytes<T>(acc_rows(L), 0), false};
  return cudaSuccess;
}

template <class Kernel, class Args>
cudaError_t launch_cooperative(Kernel kernel, const Plan& p, const Args& args, int s_end, cudaStream_t stream) {
  Args a = args;
  Layout L = p.L;
  int s_begin = 0, phases = kBoth;
  void* params[] = {&a, &L, &s_begin, &s_end, &phases};
  return cudaLaunchCooperativeKernel(reinterpret_cast<const void*>(kernel), p.blocks, kThreads, params, p.smem,
                                     stream);
}

template <class Kernel, class Args>
cudaError_t launch_step(Kernel kernel, const Plan& p, const Args& args, int s, int phases, cudaStream_t stream) {
  Args a = args;
  Layout L = p.L;
  int s_end = s + 1;
  void* params[] = {&a, &L, &s, &s_end, &phases};
  return cudaLaunchKernel(reinterpret_cast<const void*>(kernel), p.blocks, kThreads, params, p.smem, stream);
}

template <class Cell, class T>
cudaError_t launch_forward(const ForwardArgs& a, Scheme scheme, cudaStream_t stream, Scheme* used) {
  const Shape& sh = a.shape;
  if (sh.T == 0 || sh.B == 0) return cudaSuccess;
  const bool proj = a.w_hr != nullptr;
  Plan p;
  cudaError_t err = make_plan<T>(
      forward_kernel<Cell, T, true>, sh, scheme, [&](const Layout& L) { return imax(Cell::G * L.U, L.Up); },
      [&](const Layout& L) {
        return static_cast<size_t>(Cell::G) * L.U * sh.P + (proj ? static_cast<size_t>(L.Up) * sh.H : 0);
      },
      &p);
  if (err) return err;
  *used = p.persistent ? Scheme::persistent : Scheme::per_step;
  if (p.persistent) return launch_cooperative(forward_kernel<Cell, T, true>, p, a, sh.T, stream);
  for (int s = 0; s < sh.T && !err; ++s) {
    err = launch_step(forward_kernel<Cell, T, false>, p, a, s, kUnits, stream);
    if (proj && !err) err = launch_step(forward_kernel<Cell, T, false>, p, a, s, kOuts, stream);
  }
  return err;
}

template <class Cell, class T>
cudaError_t launch_backward(const BackwardArgs& a, Scheme scheme, cudaStream_t stream, Scheme* used) {
  const Shape& sh = a.shape;
  if (sh.T == 0 || sh.B == 0) return cudaSuccess;
  const bool proj = a.w_hrT != nullptr;
  Plan p;
  cudaError_t err = make_plan<T>(
      backward_kernel<Cell, T, true>, sh, scheme, [&](const Layout& L) { return imax(L.Up, L.U); },
      [&](const Layout& L) {
        return static_cast<size_t>(L.Up) * Cell::G * sh.H + (proj ? static_cast<size_t>(L.U) * sh.P : 0);
      },
      &p);
  if (err) return err;
  *used = p.persistent ? Scheme::persistent : Scheme::per_step;
  if (p.persistent) return launch_cooperative(backward_kernel<Cell, T, true>, p, a, sh.T + 1, stream);
  for (int s = 0; s <= sh.T && !err; ++s) {
    err = launch_step(backward_kernel<Cell, T, false>, p, a, s, kOuts, stream);
    if (s < sh.T && !err) err = launch_step(backward_kernel<Cell, T, false>, p, a, s, kUnits, stream);
  }
  return err;
}

// The dtype switch every cell file's entry points share.
template <class Launch>
cudaError_t by_dtype(Dtype dtype, Launch launch) {
  switch (dtype) {
    case Dtype::f32:
      return launch(float{});
    case Dtype::f16:
      return launch(__half{});
    case Dtype::bf16:
      return launch(__nv_bfloat16{});
  }
  return cudaErrorInvalidValue;
}

template <class Cell>
cudaError_t run_forward(Dtype dtype, const ForwardArgs& a, Scheme scheme, cudaStream_t stream, Scheme* used) {
  return by_dtype(dtype, [&](auto tag) {
    return launch_forward<Cell, decltype(tag)>(a, scheme, stream, used);
  });
}

template <class Cell>
cudaError_t run_backward(Dtype dtype, const BackwardArgs& a, Scheme scheme, cudaStream_t stream, Scheme* used) {
  return by_dtype(dtype, [&](auto tag) {
    return launch_backward<Cell, decltype(tag)>(a, scheme, stream, used);
  });
}

}  // namespace fusedrnn
