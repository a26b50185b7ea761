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
  for (const CellConstants& c : kCells)
    if (cell == c.name) return;
  TORCH_CHECK_VALUE(false, "fusedrnn._cpp: unknown cell '", cell, "'");
}

ForwardOut run_forward(const std::string& cell, const Layer& l) {
  if (cell == "lstm") return lstm_forward(l);
  if (cell == "gru") return gru_forward(l);
  return rnn_forward(l, cell == "rnn_relu");
}

// Every entry runs below autograd, as an op's CPU kernel does: the ATen calls inside then make no autograd view
// metadata (~3 us of a small call). Nothing here is differentiated by autograd (ops.py registers the BPTT).
ForwardOut forward(const std::string& cell, const at::Tensor& x, const at::Tensor& h0, const Opt& c0,
                   const Weights& weights, const Opt& lengths, bool reverse, bool save) {
  at::AutoDispatchBelowADInplaceOrView below_autograd;
  check_cell(cell);
  Layer l = layer(x, h0, c0, weights, lengths, reverse);
  l.save = save;
  return run_forward(cell, l);
}

// reference.py's inference contract: a module's whole forward where nothing will differentiate it, in one call.
// x: (T, B, I)  hx: (L*D, B, P)  cx: (L*D, B, H) lstm only  weights: torch.nn's flat list, per layer-direction
// k = layer * D + direction: w_ih, w_hh[, b_ih, b_hh][, w_hr] (None: absent)
// -> y: (T, B, D*P), h_n: (L*D, B, P), c_n: (L*D, B, H) lstm only
std::tuple<at::Tensor, at::Tensor, Opt> inference(const std::string& cell, const at::Tensor& x, const at::Tensor& hx,
                                                  const Opt& cx, const std::vector<Opt>& weights, bool has_biases,
                                                  int64_t num_layers, bool bidirectional, const Opt& lengths) {
  at::AutoDispatchBelowADInplaceOrView below_autograd;
  check_cell(cell);
  const int64_t directions = bidirectional ? 2 : 1, count = num_layers * directions;
  const int64_t per = count > 0 ? static_cast<int64_t>(weights.size()) / count : 0, plain = has_biases ? 4 : 2;
  TORCH_CHECK_VALUE(count > 0 && per * count == static_cast<int64_t>(weights.size()) && (per == plain || per == plain + 1),
                    "fusedrnn._cpp: ", weights.size(), " weights do not make ", count, " layer-directions");
  auto at_index = [](const Opt& t, int64_t k) { return t ? Opt((*t)[k]) : std::nullopt; };
  at::Tensor input = x;
  std::vector<at::Tensor> h_n, c_n;
  for (int64_t index = 0; index < count; index += directions) {
    std::vector<at::Tensor> ys;
    for (int64_t k = index; k < index + directions; ++k) {
      const Opt* w = weights.data() + k * per;
      TORCH_CHECK_VALUE(w[0] && w[1], "fusedrnn._cpp: w_ih and w_hh of layer-direction ", k, " are required");
      const Weights bundle{*w[0], *w[1], has_biases ? w[2] : std::nullopt, has_biases ? w[3] : std::nullopt,
                           per > plain ? w[per - 1] : std::nullopt};
      Layer l = layer(input, hx[k], at_index(cx, k), bundle, lengths, k > index);
      l.save = false;
      auto [y, h, c, saved] = run_forward(cell, l);
      ys.push_back(y);
      h_n.push_back(h.unsqueeze(0));
      if (c) c_n.push_back(c->unsqueeze(0));
    }
    input = directions == 1 ? ys[0] : at::cat(ys, 2);
  }
  return {input, at::cat(h_n), c_n.empty() ? std::nullopt : Opt(at::cat(c_n))};
}

BackwardOut backward(const std::string& cell, const at::Tensor& x, const at::Tensor& h0, const Opt& c0,
                     const Weights& weights, const Opt& lengths, bool reverse, const at::Tensor& y,
                     const at::Tensor& saved, const at::Tensor& dy, const at::Tensor& dh_n, const Opt& dc_n,
                     bool need_dx) {
  at::AutoDispatchBelowADInplaceOrView below_autograd;
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
  m.def("inference", &inference, "(cell, x, hx, cx, weights, has_biases, num_layers, bidirectional, lengths) -> "
        "(y, h_n, c_n): a module's forward with nothing to differentiate; weights: torch.nn's flat list");
  m.def("backward", &backward, "(cell, x, h0, c0, weights, lengths, reverse, y, saved, dy, dh_n, dc_n, need_dx) -> "
        "(dx or None, dh0, dc0, (dw_ih, dw_hh, db_ih, db_hh, dw_hr))");
  m.def("cell_constants", &fusedrnn::cell_table, "{cell: (gates, saved rows per unit)}: csrc/cells.h");
  m.def("row_blocks", &row_blocks, "the float32 weight gradients' row blocks of `rows` rows: [(begin, end)]");
  m.def("sum_of_outer", &sum_of_outer, "(a (R, M), b (R, N)) -> (M, N): the epilogue's blocked sum of a^T b");
  m.def("cache_sizes", [] { return std::make_pair(cache_sizes().l2, cache_sizes().l3_per_core); },
        "(L2 bytes per core, L3 bytes per core) as the scheduling heuristics read them (cache.h)");
  m.attr("block_rows") = kBlockRows;
}
