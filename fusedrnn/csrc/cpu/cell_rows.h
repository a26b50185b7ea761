// The interface between the layer drivers (forward.h, backward.h) and a cell (lstm.cpp, gru.cpp, rnn.cpp): one
// (t, b) row of the cell's elementwise pass, forward or backward, over units [j0, j0 + n) of a step that b has.
// A cell is a struct with
//   static constexpr int64_t G (gates), kSaved (saved rows per unit); static constexpr bool kSplitHidden (the
//   hidden side's gate gradients differ from the input side's: gru);
//   template <class T> static void forward_row(const ForwardRow<T>&, int64_t n);
//   template <class T> static void backward_row(const BackwardRow<T>&, int64_t n);
// Pointers are offset to unit j0; "gate k of unit j" is at [k * H + j] unless a stride says otherwise.
#pragma once

#include <cstdint>

namespace fusedrnn::cpu {

template <class T>
struct ForwardRow {
  const T* gx;      // x_t W_ih^T: gate k of unit j at gx[k * H + j]
  const T* gh;      // h_{t-1} W_hh^T: gh[k * ldg + j]
  const T* bias_x;  // b_ih (zeros when absent): bias_x[k * H + j]; added here, not by the GEMM (a T*B x G*H copy)
  const T* bias;    // b_hh (zeros when absent): bias[k * H + j]
  const T* h_prev;  // h_{t-1}: (P) with P == H where a cell reads it (gru)
  const T* c_prev;  // lstm: c_{t-1} (H)
  T* saved;         // out: the activations saved for backward, saved[k * H + j] for k < kSaved
  T* h;             // out: h_t (lstm with proj: cell_out = o * tanh(c_t), projected afterwards)
  int64_t H, ldg;
};

template <class T>
struct BackwardRow {
  const T* saved;   // this step's saved activations (as ForwardRow wrote them)
  const T* h_prev;  // h_{t-1}
  const T* c_prev;  // lstm: c_{t-1}
  const T* h;       // h_t (rnn: the activation's derivative follows from it)
  const T* dy;      // dL/dy_t (zeros with proj, whose dy is already in dh)
  T* dh;            // in: dL/dh_t before dy; out: the part of dL/dh_{t-1} that does not go through W_hh
  T* dc;            // lstm: in dL/dc_t, out dL/dc_{t-1}
  T* dgx;           // out: dL/d(input-side pre-activation), (G*H) row
  T* dgh;           // out: dL/d(hidden-side pre-activation); the same row as dgx except for gru
  T* cell_out;      // lstm with proj: out o * tanh(c_t), for dW_hr; else null
  int64_t H;
};

}  // namespace fusedrnn::cpu
