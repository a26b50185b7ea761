// The recurrence of a stack of layers (one layer-direction: L = 1), forward and backward, for any cell
// (lstm_cell.cu, gru_cell.cu, rnn_cell.cu supply the per-unit math). The contracts and the math are in
// fusedrnn/reference.py; the argument structs and their shapes are in api.h.
//
// Work split: the grid is L groups of L.per_layer blocks, group l runs layer l. Block k of a group owns
// hidden units j in [k*U, k*U + U) ("unit phase": gates, cell update) and output features p in
// [k*Up, k*Up + Up) ("out phase": the projection h = cell_out W_hr^T with proj_size, the dL/dh bookkeeping in the
// backward). Without proj_size P == H and Up == U, so both phases of a block cover the same indices and
// need only a block barrier between them; with it they need a grid barrier.
// Wavefront: super-step S runs layer l's forward step s = S - l and its backward step s = S - (L-1-l);
// a layer outside its range idles through the barriers. A step reads what the step before it and the layer
// next to it wrote one super-step earlier, from the slot of a (2, ...) buffer the writers are not writing.
//
// Forward, layer step s (t = s, or T-1-s when reverse), h_prev = h[s % 2], h_next = h[(s+1) % 2]:
//   units: gx = layer 0 ? gx[t] : x_in[(s+1) % 2] W_ih[rows of own units]^T + b_ih  (the layer below's step s)
//          gh = h_prev W_hh[rows of own units]^T + b_hh; cell(gx, gh) -> c, saved[t], cell_out
//          without proj: h_next = valid ? cell_out : h_prev (own units), y[t] = h_next, x_out = h_next * mask[t]
//   outs (proj only): h_next = valid ? cell_out W_hr[own rows]^T : h_prev, y[t] = h_next, x_out as above
// Backward, layer step s walks the forward's steps in reverse; dgh_step[s % 2] holds step s's hidden-side
// gate grads (float32, zero at padded steps), dgx_step[s % 2] the input-side ones where they differ:
//   outs:  dh += dgh_step[(s-1) % 2] W_hh[:, own p]  (s > 0);  s == T: dh is dh0, stop
//          dy_t = dy[t] + mask[t] * dgx_up[s % 2] W_ih_up[:, own p]  (the layer above's same step)
//          dh_t = dh + (valid ? dy_t : 0);  dh_step = dh_t;  dhy[t] = valid ? dh_t : 0 (proj)
//          dh = valid ? 0 : dh_t   (a padded step passes dh through unchanged)
//   units: d_cell_out = proj ? dh_step W_hr[:, own j] : dh_step[own j];  cell backward -> dgx[t], dgh[t],
//          dgh_step[s % 2], dgx_step[s % 2], dc;  gru: dh += valid ? dh_t * z : 0 (the direct path)
// Schemes: persistent = one cooperative launch, weight slices staged in shared memory once, a grid
// barrier between dependent phases; per_step = one launch per super-step and phase, weights read from
// global memory (chosen when the slices do not fit on chip with every block resident).
#pragma once

#include <cooperative_groups.h>

#include <algorithm>

#include "api.h"
#include "common.cuh"

namespace fusedrnn::cuda {

struct Layout {
  int U, Up;      // hidden units and output features per block
  int per_layer;  // blocks per layer
};

__host__ __device__ __forceinline__ int imin(int a, int b) { return a < b ? a : b; }
__host__ __device__ __forceinline__ int imax(int a, int b) { return a > b ? a : b; }
__device__ __forceinline__ int own_layer(const Layout& L) { return blockIdx.x / L.per_layer; }
__device__ __forceinline__ int own_block(const Layout& L) { return blockIdx.x % L.per_layer; }
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
// Slot k of a (2, B, width) buffer.
__device__ __forceinline__ size_t slot(const Shape& sh, int k, int width) {
  return static_cast<size_t>(k & 1) * sh.B * width;
}

// Gate-sum rows of shared memory per batch row: the unit phase's (the input side's too above layer 0) and
// the out phase's (the layer above's input gradient too, below the top). Host and device agree through it.
__host__ __device__ inline int forward_acc_rows(int G, const Layout& L, int layers) {
  return imax((layers > 1 ? 2 : 1) * G * L.U, L.Up);
}
__host__ __device__ inline int backward_acc_rows(const Layout& L, int layers) {
  return imax((layers > 1 ? 2 : 1) * L.Up, L.U);
}

template <bool kGrid>
__device__ __forceinline__ void grid_barrier() {
  if constexpr (kGrid) cooperative_groups::this_grid().sync();
}

// The slices a block owns. Units: rows g*H + j of a (G*H, K) matrix; outs: rows p of a (P, K) matrix.
template <class T>
__device__ GlobalRows<T> unit_rows(const void* w, int K, const Shape& sh, const Layout& L) {
  const int start = own_block(L) * L.U;
  return GlobalRows<T>{static_cast<const T*>(w), K, L.U, imin(L.U, sh.H - start), start, sh.H};
}
template <class T>
__device__ GlobalRows<T> out_rows(const void* w, int K, const Shape& sh, const Layout& L) {
  const int start = own_block(L) * L.Up;
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

// One phase over all batch tiles: products(b0, nb) fills the tile's gate sums (block_matvec calls; returns
// whether it ran any), then fn per (b, u).
template <class Products, class Fn>
__device__ void phase(int B, int U, int n, Products products, Fn fn) {
  if (n <= 0) return;  // a block past the end of H or P (uniform across the block)
  for (int b0 = 0; b0 < B; b0 += kBatchTile) {
    const int nb = imin(kBatchTile, B - b0);
    if (products(b0, nb)) __syncthreads();
    for_tile(b0, nb, U, n, fn);
    __syncthreads();
  }
}

// Runs super-steps [s_begin, s_end) as step(rows_a, rows_b, rows_c, S, acc). Persistent (kOnChip): the
// block's three weight slices (R_a, R_b, R_c rows) are staged into shared memory after acc's acc_rows x
// kBatchTile floats, once, and a grid barrier closes every super-step. Per step: read from global memory.
template <class T, bool kOnChip, class Step>
__device__ void run_steps(const GlobalRows<T>& a, int R_a, const GlobalRows<T>& b, int R_b, const GlobalRows<T>& c,
                          int R_c, int acc_rows, int s_begin, int s_end, Step step) {
  extern __shared__ float4 smem4[];  // float4: 16-byte alignment for what follows
  float* acc = reinterpret_cast<float*>(smem4);
  if constexpr (kOnChip) {
    T* w = reinterpret_cast<T*>(acc + kBatchTile * acc_rows);
    const SharedRows<T> a_s = stage_rows(a, R_a, w);
    const SharedRows<T> b_s = stage_rows(b, R_b, w + static_cast<size_t>(R_a) * a.K);
    const SharedRows<T> c_s = stage_rows(c, R_c, w + static_cast<size_t>(R_a) * a.K + static_cast<size_t>(R_b) * b.K);
    __syncthreads();
    for (int s = s_begin; s < s_end; ++s) {
      step(a_s, b_s, c_s, s, acc);
      grid_barrier<true>();
    }
  } else {
    for (int s = s_begin; s < s_end; ++s) step(a, b, c, s, acc);
  }
}

// ---- forward ------------------------------------------------------------------------------------------
// Publish unit/feature p of h_t for batch row b: hold h_prev at a padded step, write the float32 state, y[t]
// and (with a dropout mask) the masked copy the layer above reads. Shared by every scheme.
template <class T>
__device__ __forceinline__ void emit_state(const ForwardArgs& a, int s, int t, int b, int p, float h_new) {
  const Shape& sh = a.shape;
  const int P = sh.P;
  const size_t i = static_cast<size_t>(b) * P + p;
  const float h = is_valid(sh, t, b) ? h_new : a.h[slot(sh, s, P) + i];
  a.h[slot(sh, s + 1, P) + i] = h;
  static_cast<T*>(a.y)[at(sh, t, b, P) + p] = from_float<T>(h);
  if (a.mask) a.x_out[slot(sh, s + 1, P) + i] = h * to_float(static_cast<const T*>(a.mask)[at(sh, t, b, P) + p]);
}

// Unit j of batch row b at forward step s (time t), given its gate pre-activations: the cell, its state c
// and the activations backward needs (saved). Returns cell_out (h_t before any projection). Shared by every scheme.
template <class Cell, class T>
__device__ __forceinline__ float unit_forward(const ForwardArgs& a, int s, int t, int b, int j, const float* gxv,
                                              const float* ghv) {
  const Shape& sh = a.shape;
  const int H = sh.H;
  float act[Cell::kSaved > 0 ? Cell::kSaved : 1];
  const float hp = Cell::kNeedsHPrev ? a.h[slot(sh, s, sh.P) + static_cast<size_t>(b) * sh.P + j] : 0.f;
  float c = Cell::kHasC ? a.c[static_cast<size_t>(b) * H + j] : 0.f;
  const float cell_out = Cell::forward(gxv, ghv, hp, c, is_valid(sh, t, b), act);
  if (Cell::kHasC) a.c[static_cast<size_t>(b) * H + j] = c;
  if (a.saved) {  // nullptr for inference: no backward follows
    T* saved = static_cast<T*>(a.saved);
#pragma unroll
    for (int w = 0; w < Cell::kSaved; ++w) saved[at(sh, t, b, Cell::kSaved * H) + w * H + j] = from_float<T>(act[w]);
  }
  return cell_out;
}

template <class Cell, class T, bool kGrid, class HhRows, class IhRows, class HrRows>
__device__ void forward_step(const ForwardArgs& a, const Layout& L, const HhRows& hh, const IhRows& ih,
                             const HrRows& hr, int s, bool active, bool proj, int phases, float* acc) {
  constexpr int G = Cell::G;
  const Shape& sh = a.shape;
  const int t = time_of(sh, s), H = sh.H, P = sh.P, GH = G * H;
  const float* h_prev = a.h + slot(sh, s, P);
  const T* gx = static_cast<const T*>(a.gx);
  const T* b_ih = static_cast<const T*>(a.b_ih);
  const T* b_hh = static_cast<const T*>(a.b_hh);
  const int j0 = own_block(L) * L.U, R = G * L.U;
  if (active && (phases & kUnits)) {
    const float* x_in = a.x_in ? a.x_in + slot(sh, s + 1, P) : nullptr;  // the layer below's step s
    float* acc_x = acc + kBatchTile * R;
    phase(
        sh.B, L.U, imin(L.U, H - j0),
        [&](int b0, int nb) {
          block_matvec<T>(hh, R, P, h_prev + static_cast<size_t>(b0) * P, P, nb, acc);
          if (x_in) block_matvec<T>(ih, R, P, x_in + static_cast<size_t>(b0) * P, P, nb, acc_x);
          return true;
        },
        [&](int bl, int b, int u) {
          const int j = j0 + u;
          float gxv[G], ghv[G];
#pragma unroll
          for (int g = 0; g < G; ++g) {
            gxv[g] = x_in ? acc_x[bl * R + g * L.U + u] + (b_ih ? to_float(b_ih[g * H + j]) : 0.f)
                          : to_float(gx[at(sh, t, b, GH) + g * H + j]);
            ghv[g] = acc[bl * R + g * L.U + u] + (b_hh ? to_float(b_hh[g * H + j]) : 0.f);
          }
          const float cell_out = unit_forward<Cell, T>(a, s, t, b, j, gxv, ghv);
          if (proj)
            a.cell_out[static_cast<size_t>(b) * H + j] = cell_out;
          else
            emit_state<T>(a, s, t, b, j, cell_out);
        });
  }
  if (!proj) return;
  grid_barrier<kGrid>();
  if (active && (phases & kOuts)) {
    const int p0 = own_block(L) * L.Up;
    phase(
        sh.B, L.Up, imin(L.Up, P - p0),
        [&](int b0, int nb) {
          block_matvec<T>(hr, L.Up, H, a.cell_out + static_cast<size_t>(b0) * H, H, nb, acc);
          return true;
        },
        [&](int bl, int b, int u) { emit_state<T>(a, s, t, b, p0 + u, acc[bl * L.Up + u]); });
  }
}

template <class Cell, class T, bool kOnChip>
__global__ void __launch_bounds__(kThreads, 1)
    forward_kernel(const __grid_constant__ StackForwardArgs args, Layout L, int s_begin, int s_end, int phases) {
  const int layer = own_layer(L);
  const ForwardArgs& a = args.layer[layer];
  const Shape& sh = a.shape;
  const int R = Cell::G * L.U;
  const bool proj = a.w_hr != nullptr;  // the same in every layer
  run_steps<T, kOnChip>(unit_rows<T>(a.w_hh, sh.P, sh, L), R, unit_rows<T>(a.w_ih, sh.P, sh, L), a.x_in ? R : 0,
                        out_rows<T>(a.w_hr, sh.H, sh, L), proj ? L.Up : 0, forward_acc_rows(Cell::G, L, args.L),
                        s_begin, s_end, [&](const auto& hh, const auto& ih, const auto& hr, int S, float* acc) {
                          const int s = S - layer;
                          forward_step<Cell, T, kOnChip>(a, L, hh, ih, hr, s, s >= 0 && s < sh.T, proj, phases, acc);
                        });
}

// ---- backward -----------------------------------------------------------------------------------------
// Output feature p of batch row b at the backward step of forward time t: dL/dh_t from the carried dh and
// the step's gradient from outside (dy_t); a padded step passes dh through unchanged. Returns dL/dh_t.
template <class T>
__device__ __forceinline__ float out_backward(const BackwardArgs& a, int t, int b, int p, float dh, float dy_t) {
  const Shape& sh = a.shape;
  const size_t i = static_cast<size_t>(b) * sh.P + p;
  const bool valid = is_valid(sh, t, b);
  const float dh_t = dh + (valid ? dy_t : 0.f);
  if (a.dh_step) a.dh_step[i] = dh_t;
  if (a.dhy) static_cast<T*>(a.dhy)[at(sh, t, b, sh.P) + p] = from_float<T>(valid ? dh_t : 0.f);
  a.dh[i] = valid ? 0.f : dh_t;
  return dh_t;
}

// Unit j of batch row b at the backward step of forward time t, given d_cell_out = dL/dcell_out: the cell's
// backward, the carried dc, the gate gradients (dgx[t], dgh[t], and the float32 per-step copies where the scheme
// keeps them: dgh_step, dgx_step, each (B, G*H) or nullptr) and gru's direct path into dh. Shared by every scheme.
template <class Cell, class T>
__device__ __forceinline__ void unit_backward(const BackwardArgs& a, int t, int b, int j, float d_cell_out,
                                              float* dgh_step, float* dgx_step) {
  constexpr int G = Cell::G, S = Cell::kSaved;
  const Shape& sh = a.shape;
  const int H = sh.H, P = sh.P, GH = G * H, tp = prev_time(sh, t);
  const T* saved = static_cast<const T*>(a.saved);
  const T* y = static_cast<const T*>(a.y);
  const bool valid = is_valid(sh, t, b);
  float act[S > 0 ? S : 1], dgxv[G], dghv[G];
#pragma unroll
  for (int w = 0; w < S; ++w) act[w] = to_float(saved[at(sh, t, b, S * H) + w * H + j]);
  float c_prev = 0.f, h_prev = 0.f, h = 0.f, dc = 0.f;
  if (Cell::kHasC) {
    const T* c0 = static_cast<const T*>(a.c0);
    c_prev =
        to_float(tp < 0 ? c0[static_cast<size_t>(b) * H + j] : saved[at(sh, tp, b, S * H) + Cell::kCSlot * H + j]);
    dc = a.dc[static_cast<size_t>(b) * H + j];
  }
  if (Cell::kNeedsHPrev) {
    const T* h0 = static_cast<const T*>(a.h0);
    h_prev = to_float(tp < 0 ? h0[static_cast<size_t>(b) * P + j] : y[at(sh, tp, b, P) + j]);
  }
  if (Cell::kNeedsH) h = to_float(y[at(sh, t, b, P) + j]);
  const float direct = Cell::backward(d_cell_out, dc, act, c_prev, h_prev, h, valid, dgxv, dghv);
  if (Cell::kHasC) a.dc[static_cast<size_t>(b) * H + j] = dc;
  T* dgx = static_cast<T*>(a.dgx);
  T* dgh = static_cast<T*>(a.dgh);
#pragma unroll
  for (int g = 0; g < G; ++g) {  // select, never multiply: NaN/Inf of padding stays out
    const float dx = valid ? dgxv[g] : 0.f, dhh = valid ? dghv[g] : 0.f;
    const size_t k = static_cast<size_t>(b) * GH + g * H + j;
    dgx[at(sh, t, b, GH) + g * H + j] = from_float<T>(dx);
    if (dgh) dgh[at(sh, t, b, GH) + g * H + j] = from_float<T>(dhh);
    if (dgh_step) dgh_step[k] = dhh;
    if (dgx_step) dgx_step[k] = dx;
  }
  if (Cell::kDirect && valid) a.dh[static_cast<size_t>(b) * P + j] += direct;
}

template <class Cell, class T, bool kGrid, class HhRows, class IhRows, class HrRows>
__device__ void backward_step(const BackwardArgs& a, const Layout& L, const HhRows& hhT, const IhRows& ihT_up,
                              const HrRows& hrT, int s, bool active, bool proj, int phases, float* acc) {
  constexpr int G = Cell::G;
  const Shape& sh = a.shape;
  const int H = sh.H, P = sh.P, GH = G * H;
  const bool last = s == sh.T;
  const int t = last ? -1 : time_of(sh, sh.T - 1 - s);  // backward step s undoes forward step T-1-s
  const int p0 = own_block(L) * L.Up, j0 = own_block(L) * L.U;
  if (active && (phases & kOuts)) {
    const float* dgh_prev = a.dgh_step + slot(sh, s + 1, GH);
    const float* dgx_up = a.dgx_up && !last ? a.dgx_up + slot(sh, s, GH) : nullptr;  // the layer above's step s
    float* acc_up = acc + kBatchTile * L.Up;
    const T* dy = static_cast<const T*>(a.dy);
    const T* mask = static_cast<const T*>(a.mask);
    phase(
        sh.B, L.Up, imin(L.Up, P - p0),
        [&](int b0, int nb) {
          if (s > 0) block_matvec<T>(hhT, L.Up, GH, dgh_prev + static_cast<size_t>(b0) * GH, GH, nb, acc);
          if (dgx_up) block_matvec<T>(ihT_up, L.Up, GH, dgx_up + static_cast<size_t>(b0) * GH, GH, nb, acc_up);
          return s > 0 || dgx_up;
        },
        [&](int bl, int b, int u) {
          const size_t i = static_cast<size_t>(b) * P + p0 + u;
          const float dh = a.dh[i] + (s > 0 ? acc[bl * L.Up + u] : 0.f);
          if (last) {
            a.dh[i] = dh;
            return;
          }
          float dy_t = to_float(dy[at(sh, t, b, P) + p0 + u]);
          if (dgx_up) dy_t += (mask ? to_float(mask[at(sh, t, b, P) + p0 + u]) : 1.f) * acc_up[bl * L.Up + u];
          out_backward<T>(a, t, b, p0 + u, dh, dy_t);
        });
  }
  if (proj)
    grid_barrier<kGrid>();
  else
    __syncthreads();
  if (!active || last || !(phases & kUnits)) return;
  float* dgh_step = a.dgh_step + slot(sh, s, GH);
  float* dgx_step = a.dgx_step ? a.dgx_step + slot(sh, s, GH) : nullptr;
  phase(
      sh.B, L.U, imin(L.U, H - j0),
      [&](int b0, int nb) {
        if (proj) block_matvec<T>(hrT, L.U, P, a.dh_step + static_cast<size_t>(b0) * P, P, nb, acc);
        return proj;
      },
      [&](int bl, int b, int u) {
        const int j = j0 + u;
        const float d_cell_out = proj ? acc[bl * L.U + u] : a.dh_step[static_cast<size_t>(b) * P + j];
        unit_backward<Cell, T>(a, t, b, j, d_cell_out, dgh_step, dgx_step);
      });
}

template <class Cell, class T, bool kOnChip>
__global__ void __launch_bounds__(kThreads, 1)
    backward_kernel(const __grid_constant__ StackBackwardArgs args, Layout L, int s_begin, int s_end, int phases) {
  const int layer = own_layer(L), delay = args.L - 1 - layer;  // the top layer starts the backward
  const BackwardArgs& a = args.layer[layer];
  const Shape& sh = a.shape;
  const int GH = Cell::G * sh.H;
  const bool proj = a.w_hrT != nullptr;
  run_steps<T, kOnChip>(out_rows<T>(a.w_hhT, GH, sh, L), L.Up, out_rows<T>(a.w_ihT_up, GH, sh, L),
                        a.w_ihT_up ? L.Up : 0, unit_rows<T>(a.w_hrT, sh.P, sh, L), proj ? L.U : 0,
                        backward_acc_rows(L, args.L), s_begin, s_end,
                        [&](const auto& hhT, const auto& ihT_up, const auto& hrT, int S, float* acc) {
                          const int s = S - delay;
                          backward_step<Cell, T, kOnChip>(a, L, hhT, ihT_up, hrT, s, s >= 0 && s <= sh.T, proj,
                                                          phases, acc);
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

// A layout of U units and Up outputs per block, with as many blocks per layer as that takes.
inline Layout layout_of(const Shape& sh, int U, int Up) {
  return Layout{U, Up, imax(ceil_div(sh.H, U), ceil_div(sh.P, Up))};
}

// Per-step layout: 8 units per block (32 LSTM gate rows) and as many blocks as that takes.
inline Layout per_step_layout(const Shape& sh) { return layout_of(sh, 8, ceil_div(sh.P, ceil_div(sh.H, 8))); }

// Persistent layout: spread each layer's units and outputs over an equal share of the multiprocessors.
inline Layout persistent_layout(const Shape& sh, int blocks) {
  return layout_of(sh, ceil_div(sh.H, blocks), ceil_div(sh.P, blocks));
}

// Decide the scheme for `layers` layers. `acc_rows(L)` and `weights(L)` size the kernel's shared memory.
template <class T, class Kernel, class AccRows, class Weights>
cudaError_t make_plan(Kernel persistent_kernel, const Shape& sh, int layers, Scheme scheme, AccRows acc_rows,
                      Weights weights, Plan* plan) {
  int device = 0, sms = 0, optin = 0, coop = 0;
  cudaError_t err = cudaGetDevice(&device);
  if (!err) err = cudaDeviceGetAttribute(&sms, cudaDevAttrMultiProcessorCount, device);
  if (!err) err = cudaDeviceGetAttribute(&optin, cudaDevAttrMaxSharedMemoryPerBlockOptin, device);
  if (!err) err = cudaDeviceGetAttribute(&coop, cudaDevAttrCooperativeLaunch, device);
  if (err) return err;
  if (scheme != Scheme::per_step && coop && sms >= layers) {
    const Layout L = persistent_layout(sh, sms / layers);
    const size_t smem = smem_bytes<T>(acc_rows(L), weights(L));
    int per_sm = 0;
    if (smem <= static_cast<size_t>(optin)) {
      const void* kernel = reinterpret_cast<const void*>(persistent_kernel);
      err = cudaFuncSetAttribute(kernel, cudaFuncAttributeMaxDynamicSharedMemorySize, static_cast<int>(smem));
      if (!err) err = cudaOccupancyMaxActiveBlocksPerMultiprocessor(&per_sm, kernel, kThreads, smem);
      if (err) return err;
    }
    if (per_sm * sms >= layers * L.per_layer) {
      *plan = Plan{L, layers * L.per_layer, smem, true};
      return cudaSuccess;
    }
  }
  if (scheme == Scheme::persistent) return cudaErrorCooperativeLaunchTooLarge;
  const Layout L = per_step_layout(sh);
  *plan = Plan{L, layers * L.per_layer, smem_bytes<T>(acc_rows(L), 0), false};
  return cudaSuccess;
}

template <class Kernel, class Args>
cudaError_t launch(Kernel kernel, const Plan& p, const Args& args, int s_begin, int s_end, int phases,
                   cudaStream_t stream) {
  Args a = args;
  Layout L = p.L;
  void* params[] = {&a, &L, &s_begin, &s_end, &phases};
  const void* fn = reinterpret_cast<const void*>(kernel);
  return p.persistent ? cudaLaunchCooperativeKernel(fn, p.blocks, kThreads, params, p.smem, stream)
                      : cudaLaunchKernel(fn, p.blocks, kThreads, params, p.smem, stream);
}

// The plans of a stack's forward and backward (`layers` layers of shape sh; proj: with W_hr).
template <class Cell, class T>
cudaError_t forward_plan(const Shape& sh, int layers, bool proj, Scheme scheme, Plan* plan) {
  return make_plan<T>(
      forward_kernel<Cell, T, true>, sh, layers, scheme,
      [&](const Layout& L) { return forward_acc_rows(Cell::G, L, layers); },
      [&](const Layout& L) {
        const size_t rows = static_cast<size_t>(Cell::G) * L.U * (layers > 1 ? 2 : 1);  // W_hh (and W_ih) slices
        return rows * sh.P + (proj ? static_cast<size_t>(L.Up) * sh.H : 0);
      },
      plan);
}

template <class Cell, class T>
cudaError_t backward_plan(const Shape& sh, int layers, bool proj, Scheme scheme, Plan* plan) {
  return make_plan<T>(
      backward_kernel<Cell, T, true>, sh, layers, scheme,
      [&](const Layout& L) { return backward_acc_rows(L, layers); },
      [&](const Layout& L) {
        const size_t rows = static_cast<size_t>(L.Up) * (layers > 1 ? 2 : 1);  // W_hh^T (and W_ih_up^T) slices
        return rows * Cell::G * sh.H + (proj ? static_cast<size_t>(L.U) * sh.P : 0);
      },
      plan);
}

template <class Cell, class T>
cudaError_t launch_forward(const StackForwardArgs& a, Scheme scheme, cudaStream_t stream, Scheme* used) {
  const Shape& sh = a.layer[0].shape;
  if (sh.T == 0 || sh.B == 0) return cudaSuccess;
  const bool proj = a.layer[0].w_hr != nullptr;
  const int steps = sh.T + a.L - 1;  // super-steps of the wavefront
  Plan p;
  cudaError_t err = forward_plan<Cell, T>(sh, a.L, proj, scheme, &p);
  if (err) return err;
  *used = p.persistent ? Scheme::persistent : Scheme::per_step;
  if (p.persistent) return launch(forward_kernel<Cell, T, true>, p, a, 0, steps, kBoth, stream);
  for (int s = 0; s < steps && !err; ++s) {
    err = launch(forward_kernel<Cell, T, false>, p, a, s, s + 1, kUnits, stream);
    if (proj && !err) err = launch(forward_kernel<Cell, T, false>, p, a, s, s + 1, kOuts, stream);
  }
  return err;
}

template <class Cell, class T>
cudaError_t launch_backward(const StackBackwardArgs& a, Scheme scheme, cudaStream_t stream, Scheme* used) {
  const Shape& sh = a.layer[0].shape;
  if (sh.T == 0 || sh.B == 0) return cudaSuccess;
  const bool proj = a.layer[0].w_hrT != nullptr;
  const int steps = sh.T + a.L;  // T + 1 backward steps per layer (the last finishes dh0), in a wavefront
  Plan p;
  cudaError_t err = backward_plan<Cell, T>(sh, a.L, proj, scheme, &p);
  if (err) return err;
  *used = p.persistent ? Scheme::persistent : Scheme::per_step;
  if (p.persistent) return launch(backward_kernel<Cell, T, true>, p, a, 0, steps, kBoth, stream);
  for (int s = 0; s < steps && !err; ++s) {
    err = launch(backward_kernel<Cell, T, false>, p, a, s, s + 1, kOuts, stream);
    if (s + 1 < steps && !err) err = launch(backward_kernel<Cell, T, false>, p, a, s, s + 1, kUnits, stream);
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
cudaError_t run_forward(Dtype dtype, const StackForwardArgs& a, Scheme scheme, cudaStream_t stream, Scheme* used) {
  return by_dtype(dtype, [&](auto tag) {
    return launch_forward<Cell, decltype(tag)>(a, scheme, stream, used);
  });
}

template <class Cell>
cudaError_t run_backward(Dtype dtype, const StackBackwardArgs& a, Scheme scheme, cudaStream_t stream, Scheme* used) {
  return by_dtype(dtype, [&](auto tag) {
    return launch_backward<Cell, decltype(tag)>(a, scheme, stream, used);
  });
}

// Whether `layers` layers of this shape run persistent (weight slices on chip, every block resident).
template <class Cell>
cudaError_t fits_on_chip(Dtype dtype, const Shape& sh, int layers, bool proj, bool backward, bool* fits) {
  Plan p{};
  const cudaError_t err = by_dtype(dtype, [&](auto tag) {
    using T = decltype(tag);
    return backward ? backward_plan<Cell, T>(sh, layers, proj, Scheme::automatic, &p)
                    : forward_plan<Cell, T>(sh, layers, proj, Scheme::automatic, &p);
  });
  *fits = p.persistent;
  return err;
}

}  // namespace fusedrnn::cuda
