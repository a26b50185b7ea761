// Python entry points of fusedrnn._cpp (fusedrnn/cpp.py wraps them): forward and backward of one layer in one
// direction, in the argument order of the backend contract (fusedrnn/reference.py), `weights` a
// fusedrnn.cells.LayerWeights (w_ih, w_hh, b_ih, b_hh, w_hr; None where absent); and the constants the tests pin to
// fusedrnn/cells.py and fusedrnn/epilogue.py. Shapes: api.h.
#include <torch/extension.h>

#include <string>
#include <tuple>
#include <vector>

#include "api.h"
#include "blocks.h"
#include "cache.h"

namespace fusedrnn::cpu {
namespace {

using Weights = std::tuple<at::Tensor, at::Tensor, Opt, Opt, Opt>;  // a LayerWeights

Layer layer(const at::Tensor& x, const at::Tensor& h0, const Opt& c0, const Weights& w, const Opt& lengths,
            bool reverse) {
  auto contiguous = [](const Opt& t) { return t ? t->contiguous() : at::Tensor(); };
  TORCH_CHECK(!lengths || lengths->scalar_type() == at::kLong, "fusedrnn._cpp: lengths must be int64");
  const auto& [w_ih, w_hh, b_ih, b_hh, w_hr] = w;
  return {x.contiguous(),    h0.contiguous(),  contiguous(c0),   w_ih.contiguous(),   w_hh.contiguous(),
          contiguous(b_ih), contiguous(b_hh), contiguous(w_hr), contiguous(lengths), reverse};
}

void check_cell(const std::string& cell) {
  TORCH_CHECK_VALUE(cell == "lstm" || cell == "gru" || cell == "rnn_tanh" || cell == "rnn_relu",
                    "fusedrnn._cpp: unknown cell '", cell, "'");
}

ForwardOut forward(const std::string& cell, const at::Tensor& x, const at::Tensor& h0, const Opt& c0,
                   const Weights& weights, const Opt& lengths, bool reverse, bool save) {
  check_cell(cell);
  Layer l = layer(x, h0, c0, weights, lengths, reverse);
  l.save = save;
  if (cell == "lstm") return lstm_forward(l);
  if (cell == "gru") return gru_forward(l);
  return rnn_forward(l, cell == "rnn_relu");
}

BackwardOut backward(const std::string& cell, const at::Tensor& x, const at::Tensor& h0, const Opt& c0,
                     const Weights& weights, const Opt& lengths, bool reverse, const at::Tensor& y,
                     const at::Tensor& saved, const at::Tensor& dy, const at::Tensor& dh_n, const Opt& dc_n,
                     bool need_dx) {
  check_cell(cell);
  Layer l = layer(x, h0, c0, weights, lengths, reverse);
  l.need_dx = need_dx;
  const bool lstm = cell == "lstm";
  const Cotangents cot{y.contiguous(), saved.contiguous(), dy.contiguous(), dh_n,
                       lstm ? (dc_n ? *dc_n : at::zeros_like(l.c0)) : at::Tensor()};
  if (lstm) return lstm_backward(l, cot);
  if (cell == "gru") return gru_backward(l, cot);
  return rnn_backward(l, cot, cell == "rnn_relu");
}

// {cell: (gates, saved rows)} as api.h states them.
py::dict cell_constants() {
  py::dict table;
  for (const CellConstants& c : kCells) table[c.name] = py::make_tuple(c.gates, c.saved_rows);
  return table;
}

// The float32 weight gradients' row blocks [(begin, end), ...] of `rows` rows (blocks.h).
std::vector<std::pair<int64_t, int64_t>> row_blocks(int64_t rows) {
  std::vector<std::pair<int64_t, int64_t>> blocks;
  for (int64_t k = 0; k < block_count(rows); ++k) blocks.emplace_back(row_block(rows, k).begin, row_block(rows, k).end);
  return blocks;
}

}  // namespace
}  // namespace fusedrnn::cpu

PYBIND11_MODULE(TORCH_EXTENSION_NAME, m) {
  using namespace fusedrnn::cpu;
  m.doc() = "fusedrnn CPU kernels: one layer, one direction, whole sequence (see fusedrnn/reference.py)";
  m.def("forward", &forward, "(cell, x, h0, c0, weights, lengths, reverse, save) -> (y, h_n, c_n, saved); saved is "
        "empty without save");
  m.def("backward", &backward, "(cell, x, h0, c0, weights, lengths, reverse, y, saved, dy, dh_n, dc_n, need_dx) -> "
        "(dx or None, dh0, dc0, (dw_ih, dw_hh, db_ih, db_hh, dw_hr))");
  m.def("cell_constants", &cell_constants, "{cell: (gates, saved rows per unit)}");
  m.def("row_blocks", &row_blocks, "the float32 weight gradients' row blocks of `rows` rows: [(begin, end)]");
  m.def("sum_of_outer", &sum_of_outer, "(a (R, M), b (R, N)) -> (M, N): the epilogue's blocked sum of a^T b");
  m.def("cache_sizes", [] { return std::make_pair(cache_sizes().l2, cache_sizes().l3_per_core); },
        "(L2 bytes per core, L3 bytes per core) as the scheduling heuristics read them (cache.h)");
  m.attr("block_rows") = kBlockRows;
}
