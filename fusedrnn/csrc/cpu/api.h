// What the binding (binding.cpp) sees of the CPU backend: the cell table, the tensors of one call and the cells'
// entry points. The drivers behind them (forward.h, backward.h) are parsed only by the cell files.
//
// One call runs one layer in one direction over the whole sequence (contract: fusedrnn/reference.py):
//   x: (T, B, I)  h0: (B, P)  c0: (B, H) lstm only  w_ih: (G*H, I)  w_hh: (G*H, P)  b_ih, b_hh: (G*H,) or absent
//   w_hr: (P, H) lstm with proj_size, else absent  lengths: (B,) int64 or absent  (P = proj_size or H)
// forward -> (y: (T, B, P), h_n: (B, P), c_n: (B, H) lstm only, saved: (T, B, saved_rows*H), or (0,) without save)
// backward -> (dx: (T, B, I) unless need_dx is false, dh0, dc0, and the weights' gradients, each its tensor's shape)
#pragma once

#include <ATen/ATen.h>

#include <optional>
#include <tuple>

namespace fusedrnn::cpu {

// Gates G and saved rows per unit of each cell, the facts fusedrnn/cells.py registers (tests/test_cpp.py pins the
// two tables to each other through the binding's cell_constants()). saved rows: lstm i, f, g, o, c_t; gru r, z, n,
// h W_hn^T + b_hn; rnn none (the activation's derivative follows from y).
struct CellConstants {
  const char* name;
  int64_t gates, saved_rows;
};
inline constexpr CellConstants kLstm{"lstm", 4, 5}, kGru{"gru", 3, 4};
inline constexpr CellConstants kRnnTanh{"rnn_tanh", 1, 0}, kRnnRelu{"rnn_relu", 1, 0};
inline constexpr CellConstants kCells[] = {kLstm, kGru, kRnnTanh, kRnnRelu};

// The tensors of one call, as in the contract (contiguous); absent ones are undefined.
struct Layer {
  at::Tensor x, h0, c0, w_ih, w_hh, b_ih, b_hh, w_hr, lengths;
  bool reverse;
  bool save = true;     // forward: keep `saved` for a backward; without it saved is (0) and only two steps are kept
  bool need_dx = true;  // backward: x needs a gradient (else dx is neither computed nor returned)
};

// The backward's cotangents and the forward's results it reads: y (T, B, P), saved (T, B, saved_rows*H),
// dy (T, B, P), dh_n (B, P), dc_n (B, H) lstm only (else undefined).
struct Cotangents {
  at::Tensor y, saved, dy, dh_n, dc_n;
};

using Opt = std::optional<at::Tensor>;
using ForwardOut = std::tuple<at::Tensor, at::Tensor, Opt, at::Tensor>;  // y, h_n, c_n, saved
using WeightGrads = std::tuple<at::Tensor, at::Tensor, Opt, Opt, Opt>;  // dw_ih, dw_hh, db_ih, db_hh, dw_hr
using BackwardOut = std::tuple<Opt, at::Tensor, Opt, WeightGrads>;       // dx, dh0, dc0, weight gradients

// The epilogue's float32-blocked sum over rows of a^T b (weight_grads.cpp): a (R, M), b (R, N) -> (M, N). Bound for
// tests/test_cpp.py, which pins it to fusedrnn/epilogue.py's sum_of_outer.
at::Tensor sum_of_outer(const at::Tensor& a, const at::Tensor& b);

// The cells (lstm.cpp, gru.cpp, rnn.cpp).
ForwardOut lstm_forward(const Layer& l);
BackwardOut lstm_backward(const Layer& l, const Cotangents& c);
ForwardOut gru_forward(const Layer& l);
BackwardOut gru_backward(const Layer& l, const Cotangents& c);
ForwardOut rnn_forward(const Layer& l, bool relu);
BackwardOut rnn_backward(const Layer& l, const Cotangents& c, bool relu);

}  // namespace fusedrnn::cpu
