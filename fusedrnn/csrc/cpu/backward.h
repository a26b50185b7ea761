// The backward layer driver (BPTT): one call undoes one layer's forward over the whole sequence.
//
//   per step in reverse time: with proj, dL/dh_t = dh + dy_t goes through W_hr into the cell (dcell_out);
//   ONE fused pass of the cell's gate gradients (Cell::backward_row) -> dG_t (input side dgx, hidden side dgh);
//   dh_{t-1} = dG_t W_hh + the cell's direct term (gemm.h, packed panels); dx_t = dG_t W_ih inside the loop where
//   split.h's project_per_step says so;
//   then the epilogue (weight_grads.h): dx, dW_ih, dW_hh, dW_hr and the biases' gradients over all T*B rows.
// Variable lengths: at a step row b does not have, the gate gradients are zero and dh, dc pass through unchanged,
// exactly as fusedrnn/reference.py. Threading: one OpenMP team for the whole sequence, split as split.h says.
#pragma once

#include <ATen/ATen.h>
#include <omp.h>

#include <algorithm>

#include "api.h"
#include "cell_rows.h"
#include "common.h"
#include "gemm.h"
#include "layer.h"
#include "scratch.h"
#include "split.h"
#include "weight_grads.h"

namespace fusedrnn::cpu {

template <class Cell, class T>
BackwardOut backward_layer(const Layer& l, const Cotangents& cot) {
  const at::Tensor &y = cot.y, &saved = cot.saved, &dy = cot.dy;
  constexpr int64_t NR = kPanel<T>, G = Cell::G, S = Cell::kSaved;
  const int64_t steps = l.x.size(0), B = l.x.size(1), I = l.x.size(2);
  const int64_t GH = l.w_hh.size(0), H = GH / G, P = l.h0.size(1), in_panels = ceil_div(I, NR);
  const bool proj = l.w_hr.defined();
  const auto options = l.x.options();
  const int64_t Ppad = ceil_div(P, NR) * NR, Ipad = in_panels * NR;
  const Split<T> split(B, H, P, l.need_dx ? I : 0,
                       GH * (Ppad + (l.need_dx ? Ipad : 0)) + (proj ? ceil_div(H, NR) * NR * P : 0));
  const bool per_step =
      l.need_dx && (split.by_rows || project_per_step<T>(B, I, P, ceil_div(split.unit_panels, split.team) * NR * G));
  at::Tensor dx = per_step ? at::empty({steps, B, I}, options) : at::Tensor();  // else after the loop, if needed
  at::Tensor w_ih_panels = per_step ? scratch(Slot::kPackInput, {in_panels * GH * NR}, options) : at::Tensor();
  at::Tensor dgx = scratch(Slot::kSequence, {steps, B, GH}, options);
  at::Tensor dgh = Cell::kSplitHidden ? scratch(Slot::kHiddenGateGrads, {steps, B, GH}, options) : dgx;
  at::Tensor dh = cot.dh_n.clone(at::MemoryFormat::Contiguous);  // carried dL/dh, ends as dh0
  at::Tensor dc = G == 4 ? cot.dc_n.clone(at::MemoryFormat::Contiguous) : at::Tensor();
  at::Tensor dhy = proj ? scratch(Slot::kGradOut, {steps, B, P}, options) : at::Tensor();  // dL/dh_t, for dW_hr
  at::Tensor cell_out = proj ? scratch(Slot::kCellOut, {steps, B, H}, options) : at::Tensor();
  at::Tensor d_cell_out = proj ? scratch(Slot::kState, {B, H}, options) : at::Tensor();  // dL/d(o * tanh c_t)
  at::Tensor zeros = at::zeros({H}, options);
  at::Tensor w_hh_panels = scratch(Slot::kPack, {split.col_panels * GH * NR}, options);
  at::Tensor w_hr_panels = proj ? scratch(Slot::kPackProj, {split.unit_panels * P * NR}, options) : at::Tensor();

  const T *w_hh = l.w_hh.data_ptr<T>(), *w_hr = ptr_or_null<T>(l.w_hr), *h0 = l.h0.data_ptr<T>();
  const T *c0 = ptr_or_null<T>(l.c0), *y_p = y.data_ptr<T>(), *saved_p = saved.data_ptr<T>(), *dy_p = dy.data_ptr<T>();
  const T* zero = zeros.data_ptr<T>();
  const int64_t* lengths = ptr_or_null<int64_t>(l.lengths);
  T *dgx_p = dgx.data_ptr<T>(), *dgh_p = dgh.data_ptr<T>(), *dh_p = dh.data_ptr<T>(), *dc_p = ptr_or_null<T>(dc);
  T *dhy_p = ptr_or_null<T>(dhy), *cell_out_p = ptr_or_null<T>(cell_out), *d_cell_out_p = ptr_or_null<T>(d_cell_out);
  T *w_hh_packed = w_hh_panels.data_ptr<T>(), *w_hr_packed = ptr_or_null<T>(w_hr_panels);
  T *dx_p = ptr_or_null<T>(dx), *w_ih_packed = ptr_or_null<T>(w_ih_panels);
  const T* w_ih = l.w_ih.data_ptr<T>();
  const TimeOrder order{steps, l.reverse};

#pragma omp parallel num_threads(split.team)
  {
    const Work w = split.work(omp_get_thread_num(), omp_get_num_threads(), B);
    const Range iq = per_step ? w.ins : Range{0, 0}, pack_iq = per_step ? w.pack_ins : Range{0, 0};
    const int64_t j0 = w.units.begin * NR, j1 = std::min(w.units.end * NR, H);
    const int64_t p0 = w.cols.begin * NR, p1 = std::min(w.cols.end * NR, P);
    const int64_t r0 = w.rows.begin, rows = w.rows.end - w.rows.begin;
    for (int64_t q = w.pack_cols.begin; q < w.pack_cols.end; ++q)
      pack_panel(w_hh, P, false, GH, q * NR, std::min(NR, P - q * NR), w_hh_packed + q * GH * NR);
    for (int64_t q = pack_iq.begin; q < pack_iq.end; ++q)
      pack_panel(w_ih, I, false, GH, q * NR, std::min(NR, I - q * NR), w_ih_packed + q * GH * NR);
    for (int64_t q = w.pack_units.begin; q < w.pack_units.end && proj; ++q)
      pack_panel(w_hr, H, false, P, q * NR, std::min(NR, H - q * NR), w_hr_packed + q * P * NR);
    if (split.by_rows) {
#pragma omp barrier
    }

    for (int64_t s = steps - 1; s >= 0; --s) {
      const int64_t t = order.at(s), prev = order.at(s - 1);
      const T* h_prev = s == 0 ? h0 : y_p + prev * B * P;
      if (proj) {  // dL/dh_t over own output columns, then through W_hr into the cell's output
        for (int64_t b = w.rows.begin; b < w.rows.end; ++b) {
          const bool valid = has_step(lengths, b, t);
          T *d = dh_p + b * P, *out = dhy_p + (t * B + b) * P;
          const T* g = dy_p + (t * B + b) * P;
          for (int64_t p = p0; p < p1; ++p) {
            const T total = d[p] + (valid ? g[p] : T(0));
            out[p] = valid ? total : T(0);
            d[p] = valid ? T(0) : total;
          }
        }
        if (!split.by_rows) {
#pragma omp barrier
        }
        for (int64_t q = w.units.begin; q < w.units.end; ++q)
          gemm_panel(rows, P, dhy_p + (t * B + r0) * P, P, w_hr_packed + q * P * NR, d_cell_out_p + r0 * H + q * NR, H,
                     std::min(NR, H - q * NR), false);
      }
      for (int64_t b = w.rows.begin; b < w.rows.end && j1 > j0; ++b) {
        const int64_t row_off = (t * B + b) * GH + j0;
        if (!has_step(lengths, b, t)) {  // no step: zero gate gradients, dh and dc pass through
          for (int64_t k = 0; k < G; ++k) {
            std::fill(dgx_p + row_off + k * H, dgx_p + row_off + k * H + (j1 - j0), T(0));
            std::fill(dgh_p + row_off + k * H, dgh_p + row_off + k * H + (j1 - j0), T(0));
          }
          if (proj) std::fill(cell_out_p + (t * B + b) * H + j0, cell_out_p + (t * B + b) * H + j1, T(0));
          continue;
        }
        const T* c_prev = G != 4 ? nullptr : (s == 0 ? c0 + b * H : saved_p + (prev * B + b) * S * H + 4 * H);
        BackwardRow<T> row{saved_p + (t * B + b) * S * H + j0,
                           h_prev + b * P + j0,
                           c_prev ? c_prev + j0 : nullptr,
                           y_p + (t * B + b) * P + j0,
                           proj ? zero : dy_p + (t * B + b) * P + j0,
                           proj ? d_cell_out_p + b * H + j0 : dh_p + b * P + j0,
                           dc_p ? dc_p + b * H + j0 : nullptr,
                           dgx_p + row_off,
                           dgh_p + row_off,
                           proj ? cell_out_p + (t * B + b) * H + j0 : nullptr,
                           H};
        Cell::backward_row(row, j1 - j0);
      }
      if (!split.by_rows) {
#pragma omp barrier
      }
      for (int64_t q = w.cols.begin; q < w.cols.end; ++q)
        gemm_panel(rows, GH, dgh_p + (t * B + r0) * GH, GH, w_hh_packed + q * GH * NR, dh_p + r0 * P + q * NR, P,
                   std::min(NR, P - q * NR), true);
      for (int64_t q = iq.begin; q < iq.end; ++q)
        gemm_panel(rows, GH, dgx_p + (t * B + r0) * GH, GH, w_ih_packed + q * GH * NR,
                   dx_p + (t * B + r0) * I + q * NR, I, std::min(NR, I - q * NR), false);
    }
  }
  return weight_grads<Cell, T>(l, y, dx, dgx, dgh, dhy, cell_out, dh, dc);
}

}  // namespace fusedrnn::cpu
