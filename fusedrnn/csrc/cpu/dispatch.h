// The dtype dispatch of a cell's entry points (lstm.cpp, gru.cpp, rnn.cpp): float32 and float64 run natively,
// fusedrnn/cpp.py runs bfloat16 in float32 and rounds the results; small forward calls take the direct driver.
#pragma once

#include <ATen/ATen.h>

#include "api.h"
#include "backward.h"
#include "forward.h"

namespace fusedrnn::cpu {

template <class Cell, class T>
ForwardOut forward_either(const Layer& l) {
  const int64_t steps = l.x.size(0), B = l.x.size(1), H = l.w_hh.size(0) / Cell::G, K = l.x.size(2) + l.h0.size(1);
  const bool direct = direct_pays<T>(steps, B, Cell::G, H, K);
  return direct ? forward_direct<Cell, T>(l) : forward_layer<Cell, T>(l);
}

template <class Cell>
ForwardOut forward_any(const Layer& l) {
  if (l.x.scalar_type() == at::kDouble) return forward_either<Cell, double>(l);
  TORCH_CHECK(l.x.scalar_type() == at::kFloat, "fusedrnn._cpp: float32 or float64 expected, got ", l.x.scalar_type());
  return forward_either<Cell, float>(l);
}

template <class Cell>
BackwardOut backward_any(const Layer& l, const Cotangents& cot) {
  if (l.x.scalar_type() == at::kDouble) return backward_layer<Cell, double>(l, cot);
  TORCH_CHECK(l.x.scalar_type() == at::kFloat, "fusedrnn._cpp: float32 or float64 expected, got ", l.x.scalar_type());
  return backward_layer<Cell, float>(l, cot);
}

}  // namespace fusedrnn::cpu
