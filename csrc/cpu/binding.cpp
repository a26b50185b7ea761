// Python entry points of fusedrnn._cpp: forward and backward of one layer in one direction, with the
// argument order of the backend contract (fusedrnn/reference.py); None for absent tensors.
#include <torch/extension.h>

#include "recurrence.h"

namespace fusedrnn {
namespace {

using Opt = std::optional<at::Tensor>;

Layer layer(const at::Tensor& x, const at::Tensor& h0, const Opt& c0, const at::Tensor& w_ih, const at::Tensor& w_hh,
            const Opt& b_ih, const Opt& b_hh, const Opt& w_hr, const Opt& lengths, bool reverse) {
  auto contiguous = [](const Opt& t) { return t ? t->contiguous() : at::Tensor(); };
  TORCH_CHECK(!lengths || lengths->scalar_type() == at::kLong, "fusedrnn._cpp: lengths must be int64");
  return {x.contiguous(),       h0.contiguous(),      contiguous(c0),      w_ih.contiguous(),
          w_hh.contiguous(),    contiguous(b_ih),     contiguous(b_hh),    contiguous(w_hr),
          contiguous(lengths), reverse};
}

ForwardOut forward(const std::string& mode, const at::Tensor& x, const at::Tensor& h0, const Opt& c0,
                   const at::Tensor& w_ih, const at::Tensor& w_hh, const Opt& b_ih, const Opt& b_hh, const Opt& w_hr,
                   const Opt& lengths, bool reverse, bool save) {
  Layer l = layer(x, h0, c0, w_ih, w_hh, b_ih, b_hh, w_hr, lengths, reverse);
  l.save = save;
  if (mode == "lstm") return lstm_forward(l);
  if (mode == "gru") return gru_forward(l);
  TORCH_CHECK(mode == "rnn_tanh" || mode == "rnn_relu", "fusedrnn._cpp: unknown mode ", mode);
  return rnn_forward(l, mode == "rnn_relu");
}

BackwardOut backward(const std::string& mode, const at::Tensor& x, const at::Tensor& h0, const Opt& c0,
                     const at::Tensor& w_ih, const at::Tensor& w_hh, const Opt& b_ih, const Opt& b_hh, const Opt& w_hr,
                     const Opt& lengths, bool reverse, const at::Tensor& y, const at::Tensor& ws, const at::Tensor& dy,
                     const at::Tensor& dh_n, const Opt& dc_n, bool need_dx) {
  Layer l = layer(x, h0, c0, w_ih, w_hh, b_ih, b_hh, w_hr, lengths, reverse);
  l.need_dx = need_dx;
  const at::Tensor y_c = y.contiguous(), ws_c = ws.contiguous(), dy_c = dy.contiguous();
  if (mode == "lstm") return lstm_backward(l, y_c, ws_c, dy_c, dh_n, dc_n ? *dc_n : at::zeros_like(l.c0));
  if (mode == "gru") return gru_backward(l, y_c, ws_c, dy_c, dh_n, at::Tensor());
  TORCH_CHECK(mode == "rnn_tanh" || mode == "rnn_relu", "fusedrnn._cpp: unknown mode ", mode);
  return rnn_backward(l, y_c, ws_c, dy_c, dh_n, mode == "rnn_relu");
}

}  // namespace
}  // namespace fusedrnn

PYBIND11_MODULE(TORCH_EXTENSION_NAME, m) {
  m.doc() = "fusedrnn CPU kernels: one layer, one direction, whole sequence (see fusedrnn/reference.py)";
  m.def("forward", &fusedrnn::forward, "(mode, x, h0, c0, w_ih, w_hh, b_ih, b_hh, w_hr, lengths, reverse, save) -> "
        "(y, h_n, c_n, ws); ws is empty without save");
  m.def("backward", &fusedrnn::backward, "(mode, x, h0, c0, w_ih, w_hh, b_ih, b_hh, w_hr, lengths, reverse, y, ws, "
        "dy, dh_n, dc_n, need_dx) -> (dx or None, dh0, dc0, dw_ih, dw_hh, db_ih, db_hh, dw_hr)");
}
