// The backward's epilogue: everything that is not sequential, as GEMMs over all T*B rows, after the BPTT loop
// (backward.h) produced the gate gradients dG (fusedrnn/epilogue.py is the same for the other backends):
//   dx = dG_x W_ih       dW_ih = sum over rows of dG_x^T x      dW_hh = sum of dG_h^T h_{t-1}
//   db_ih = sum of dG_x  db_hh = sum of dG_h                    dW_hr = sum of dh_t^T cell_out (lstm with proj)
// float32 sums run as GEMMs over the row blocks of blocks.h, accumulated in float64 (epilogue.py says why).
#pragma once

#include <ATen/ATen.h>
#include <ATen/Parallel.h>
#include <omp.h>

#include <algorithm>
#include <initializer_list>
#include <utility>

#include "api.h"
#include "common.h"
#include "gemm.h"
#include "layer.h"
#include "scratch.h"

namespace fusedrnn::cpu {

// Sum over the parts' rows of a^T b: each part is (a (R_p, M), b (R_p, N)) -> (M, N) in a's dtype. float32: GEMMs
// over the row blocks of the parts read as one concatenation (blocks.h), accumulated in float64; float64: one block.
at::Tensor sum_of_outer(std::initializer_list<std::pair<at::Tensor, at::Tensor>> parts);

// dx = dG W_ih (rows = T*B): the product the BPTT loop already runs per step (dG_t W_hh), so the same packed-panel
// kernel, here over all rows at once (a little faster than MKL here: bench/results/cpp_notes.md). The team packs
// W_ih's panels together, then each worker takes a share of the rows for every panel (a GH x NR panel stays
// in its L2 while the rows stream past). dg: (rows, G*H), w_ih: (G*H, I) -> (rows, I).
template <class T>
at::Tensor input_grad(const at::Tensor& dg, const at::Tensor& w_ih) {
  constexpr int64_t NR = kPanel<T>;
  const int64_t rows = dg.size(0), GH = dg.size(1), I = w_ih.size(1), panels = ceil_div(I, NR);
  at::Tensor dx = at::empty({rows, I}, dg.options());
  at::Tensor w_ih_panels = scratch(Slot::kPack, {panels * GH * NR}, dg.options());
  const T *dg_p = dg.data_ptr<T>(), *w = w_ih.data_ptr<T>();
  T *dx_p = dx.data_ptr<T>(), *w_ih_packed = w_ih_panels.data_ptr<T>();
  const int64_t tiles = ceil_div(rows, 8);
#pragma omp parallel num_threads(std::max<int64_t>(1, std::min<int64_t>(at::get_num_threads(), tiles)))
  {
    const int64_t me = omp_get_thread_num(), team = omp_get_num_threads();
    const Range own = share(panels, me, team), mine = share(tiles, me, team);
    for (int64_t q = own.begin; q < own.end; ++q)
      pack_panel(w, I, false, GH, q * NR, std::min(NR, I - q * NR), w_ih_packed + q * GH * NR);
#pragma omp barrier
    const int64_t m0 = mine.begin * 8, m1 = std::min(mine.end * 8, rows);
    for (int64_t q = 0; q < panels && m1 > m0; ++q)
      gemm_panel(m1 - m0, GH, dg_p + m0 * GH, GH, w_ih_packed + q * GH * NR, dx_p + m0 * I + q * NR, I,
                 std::min(NR, I - q * NR), false);
  }
  return dx;
}

// The epilogue of backward_layer; dx too unless the BPTT loop already made it (dx_in defined). dgx, dgh: (T, B, G*H)
// gate gradients; dhy: (T, B, P) dL/dh_t and cell_out: (T, B, H) with proj, else undefined; dh0, dc0: the loop's.
// The step before t used h_{t-1} = y[t -/+ 1], or h0 at the first step, so dW_hh sums two parts (no shifted copy of
// y), in time order as epilogue.py's previous() lays them out (the same row blocks).
template <class Cell, class T>
BackwardOut weight_grads(const Layer& l, const at::Tensor& y, const at::Tensor& dx_in, const at::Tensor& dgx,
                         const at::Tensor& dgh, const at::Tensor& dhy, const at::Tensor& cell_out,
                         const at::Tensor& dh0, const at::Tensor& dc0) {
  const int64_t steps = l.x.size(0), B = l.x.size(1), GH = dgx.size(2), P = y.size(2);
  const at::Tensor dgx_flat = dgx.view({-1, GH});
  at::Tensor dx = dx_in;
  if (!dx.defined() && l.need_dx) dx = input_grad<T>(dgx_flat, l.w_ih).view_as(l.x);
  const at::Tensor dw_ih = sum_of_outer({{dgx_flat, l.x.reshape({-1, l.x.size(2)})}});
  const int64_t first = l.reverse ? steps - 1 : 0;
  const int64_t later = (steps - 1) * B;  // rows of the steps after the first
  const at::Tensor rest = (l.reverse ? dgh.narrow(0, 0, steps - 1) : dgh.narrow(0, 1, steps - 1)).reshape({later, GH});
  const at::Tensor before = (l.reverse ? y.narrow(0, 1, steps - 1) : y.narrow(0, 0, steps - 1)).reshape({later, P});
  const at::Tensor dw_hh = l.reverse ? sum_of_outer({{rest, before}, {dgh[first], l.h0}})
                                     : sum_of_outer({{dgh[first], l.h0}, {rest, before}});
  at::Tensor db_ih, db_hh;  // each bias may be absent on its own (the contract's rule)
  if (l.b_ih.defined()) db_ih = dgx_flat.sum(0);
  if (l.b_hh.defined())
    db_hh = Cell::kSplitHidden || !db_ih.defined() ? dgh.view({-1, GH}).sum(0) : db_ih.clone();
  at::Tensor dw_hr = dhy.defined() ? sum_of_outer({{dhy.view({-1, P}), cell_out.view({-1, cell_out.size(2)})}})
                                   : at::Tensor();
  return {maybe(dx), dh0, maybe(dc0), {dw_ih, dw_hh, maybe(db_ih), maybe(db_hh), maybe(dw_hr)}};
}

}  // namespace fusedrnn::cpu
