// pybind11 binding of the CUDA backend (module fusedrnn._cuda): the backend contract of
// fusedrnn/reference.py for one layer in one direction, in C++ so a call costs one Python crossing.
//
//   forward(mode, x, h0, c0, w_ih, w_hh, b_ih, b_hh, w_hr, lengths, reverse, scheme, poison)
//       -> [y, h_n, c_n | None, ws]
//   backward(mode, x, h0, c0, w_ih, w_hh, b_ih, b_hh, w_hr, lengths, reverse, y, ws, dy, dh_n, dc_n,
//            scheme, poison) -> [dx, dh0, dc0, dw_ih, dw_hh, db_ih, db_hh, dw_hr] (None where absent)
//   last_scheme() -> "persistent" | "per_step": what the last call ran
//
// Shapes as in reference.py: x (T, B, I), h0 (B, P), c0 (B, H), w_ih (G*H, I), w_hh (G*H, P),
// w_hr (P, H), lengths (B,) int64, y (T, B, P), ws (T, B, WS*H) with the reference's layout
// (lstm: i, f, g, o, c; gru: r, z, n, gh_n; rnn: none). Everything that is not sequential is an ATen GEMM
// here: gx = x W_ih^T + b_ih before the recurrence kernel; dx, dW_ih, dW_hh, dW_hr and the bias grads
// after it. scheme: "auto" | "persistent" | "per_step" (see launchers.h). poison fills every buffer the
// kernels write with NaN first, so tests catch elements a kernel never wrote.
// Only device-generic ATen/c10 headers: this file also compiles against a CPU-only torch.
#include <c10/core/DeviceGuard.h>
#include <c10/core/impl/DeviceGuardImplInterface.h>
#include <torch/extension.h>

#include <algorithm>
#include <cmath>
#include <optional>
#include <string>

#include "launchers.h"

namespace fusedrnn {
namespace {

using at::Tensor;
using OptTensor = std::optional<Tensor>;

enum class Kind { lstm, gru, rnn_tanh, rnn_relu };

struct CellInfo {
  Kind kind;
  int gates, ws_rows;  // G, and ws rows per hidden unit
};

CellInfo cell_info(const std::string& mode) {
  if (mode == "lstm") return {Kind::lstm, 4, 5};
  if (mode == "gru") return {Kind::gru, 3, 4};
  if (mode == "rnn_tanh") return {Kind::rnn_tanh, 1, 0};
  if (mode == "rnn_relu") return {Kind::rnn_relu, 1, 0};
  TORCH_CHECK_VALUE(false, "fusedrnn cuda: unknown mode '", mode, "'");
}

Dtype dtype_of(const Tensor& x) {
  switch (x.scalar_type()) {
    case at::kFloat:
      return Dtype::f32;
    case at::kHalf:
      return Dtype::f16;
    case at::kBFloat16:
      return Dtype::bf16;
    default:
      TORCH_CHECK_TYPE(false, "fusedrnn cuda: dtype ", x.scalar_type(),
                       " is not supported (float32, float16, bfloat16)");
  }
}

Scheme scheme_of(const std::string& name) {
  if (name == "auto") return Scheme::automatic;
  if (name == "persistent") return Scheme::persistent;
  if (name == "per_step") return Scheme::per_step;
  TORCH_CHECK_VALUE(false, "fusedrnn cuda: scheme must be auto, persistent or per_step, got '", name, "'");
}

std::string last_scheme_name = "none";

// The current stream of x's device (nullptr for a CPU tensor: the kernels' host emulation in the tests).
cudaStream_t stream_of(const Tensor& x) {
  if (!x.is_cuda()) return nullptr;
  const c10::impl::DeviceGuardImplInterface* impl = c10::impl::getDeviceGuardImpl(x.device().type());
  return static_cast<cudaStream_t>(impl->getStream(x.device()).native_handle());
}

void check(cudaError_t err, Scheme used, const char* what) {
  TORCH_CHECK(err == cudaSuccess, "fusedrnn cuda: ", what, " kernel failed: ", cudaGetErrorString(err));
  last_scheme_name = used == Scheme::persistent ? "persistent" : "per_step";
}

const void* ptr_or_null(const OptTensor& t) { return t && t->defined() ? t->data_ptr() : nullptr; }
bool present(const OptTensor& t) { return t && t->defined(); }

Shape shape_of(const Tensor& x, int64_t H, int64_t P, const OptTensor& lengths, bool reverse) {
  return Shape{static_cast<int>(x.size(0)), static_cast<int>(x.size(1)), static_cast<int>(H), static_cast<int>(P),
               reverse, present(lengths) ? lengths->data_ptr<int64_t>() : nullptr};
}

Tensor flat(const Tensor& t) { return t.reshape({-1, t.size(-1)}); }

// sum over all T*B rows of a^T b: a (T, B, M), b (T, B, N) -> (M, N) in a's dtype. In float32, one GEMM over
// T*B rows accumulates rounding ~ sqrt(T*B) eps; GEMMs over row blocks summed in float64 keep it at one
// block's (the reference's _sum_of_outer). Half precision keeps one GEMM: it accumulates in float32
// inside, where rounding each block's result to half would add error.
Tensor sum_of_outer(const Tensor& a, const Tensor& b) {
  constexpr int64_t kBlockRows = 1024;
  const Tensor fa = flat(a), fb = flat(b);
  const int64_t rows = fa.size(0);
  if (rows <= kBlockRows || a.scalar_type() != at::kFloat) return at::mm(fa.t(), fb);
  Tensor total = at::zeros({fa.size(1), fb.size(1)}, a.options().dtype(at::kDouble));
  for (int64_t start = 0; start < rows; start += kBlockRows) {
    const int64_t n = std::min(kBlockRows, rows - start);
    total.add_(at::mm(fa.narrow(0, start, n).t(), fb.narrow(0, start, n)));
  }
  return total.to(a.scalar_type());
}

// A float32 working copy of a state (never aliases the caller's tensor).
Tensor float_copy(const Tensor& t) { return t.to(t.options().dtype(at::kFloat), false, /*copy=*/true).contiguous(); }

// A fresh tensor like `like` holding `value` (cast back from the float32 state).
Tensor fresh_like(const Tensor& like, const Tensor& value) { return at::empty_like(like).copy_(value); }

void poison_all(std::initializer_list<Tensor> ts) {
  for (const Tensor& t : ts)
    if (t.defined()) t.fill_(NAN);
}

// The state each step starts from, in forward time order: y shifted by one step, h0 first.
Tensor previous(const Tensor& y, const Tensor& h0, bool reverse) {
  const int64_t T = y.size(0);
  return reverse ? at::cat({y.narrow(0, 1, T - 1), h0.unsqueeze(0)}, 0)
                 : at::cat({h0.unsqueeze(0), y.narrow(0, 0, T - 1)}, 0);
}

cudaError_t run_forward(Kind kind, Dtype dtype, const ForwardArgs& a, Scheme scheme, cudaStream_t s, Scheme* used) {
  switch (kind) {
    case Kind::lstm:
      return lstm_forward(dtype, a, scheme, s, used);
    case Kind::gru:
      return gru_forward(dtype, a, scheme, s, used);
    default:
      return rnn_forward(kind == Kind::rnn_relu, dtype, a, scheme, s, used);
  }
}

cudaError_t run_backward(Kind kind, Dtype dtype, const BackwardArgs& a, Scheme scheme, cudaStream_t s, Scheme* used) {
  switch (kind) {
    case Kind::lstm:
      return lstm_backward(dtype, a, scheme, s, used);
    case Kind::gru:
      return gru_backward(dtype, a, scheme, s, used);
    default:
      return rnn_backward(kind == Kind::rnn_relu, dtype, a, scheme, s, used);
  }
}

std::vector<Tensor> forward(const std::string& mode, const Tensor& x, const Tensor& h0, const OptTensor& c0,
                            const Tensor& w_ih, const Tensor& w_hh, const OptTensor& b_ih, const OptTensor& b_hh,
                            const OptTensor& w_hr, const OptTensor& lengths, bool reverse, const std::string& scheme,
                            bool poison) {
  const c10::DeviceGuard guard(x.device());
  const CellInfo cell = cell_info(mode);
  const int64_t T = x.size(0), B = x.size(1), H = w_hh.size(0) / cell.gates, P = h0.size(1);
  const bool lstm = cell.kind == Kind::lstm, proj = present(w_hr);
  const Tensor x_flat = flat(x);
  const Tensor gx = (present(b_ih) ? at::addmm(*b_ih, x_flat, w_ih.t()) : at::mm(x_flat, w_ih.t())).view({T, B, -1});
  const Tensor y = at::empty({T, B, P}, x.options());
  const Tensor ws = at::empty({T, B, cell.ws_rows * H}, x.options());
  const auto f32 = x.options().dtype(at::kFloat);
  const Tensor h = at::empty({2, B, P}, f32);
  const Tensor c = lstm ? float_copy(*c0) : Tensor();
  const Tensor r = proj ? at::empty({B, H}, f32) : Tensor();
  if (poison) poison_all({y, ws, h, r});
  h[0].copy_(h0);
  const Tensor w_hh_c = w_hh.contiguous();
  const OptTensor b_hh_c = present(b_hh) ? OptTensor(b_hh->contiguous()) : std::nullopt;
  const OptTensor w_hr_c = proj ? OptTensor(w_hr->contiguous()) : std::nullopt;
  const ForwardArgs args{shape_of(x, H, P, lengths, reverse),
                         gx.data_ptr(),
                         w_hh_c.data_ptr(),
                         ptr_or_null(b_hh_c),
                         ptr_or_null(w_hr_c),
                         y.data_ptr(),
                         ws.data_ptr(),
                         h.data_ptr<float>(),
                         lstm ? c.data_ptr<float>() : nullptr,
                         proj ? r.data_ptr<float>() : nullptr};
  Scheme used = Scheme::automatic;
  const cudaError_t err = run_forward(cell.kind, dtype_of(x), args, scheme_of(scheme), stream_of(x), &used);
  check(err, used, "forward");
  return {y, fresh_like(h0, h[T % 2]), lstm ? fresh_like(*c0, c) : Tensor(), ws};
}

std::vector<Tensor> backward(const std::string& mode, const Tensor& x, const Tensor& h0, const OptTensor& c0,
                             const Tensor& w_ih, const Tensor& w_hh, const OptTensor& b_ih, const OptTensor& b_hh,
                             const OptTensor& w_hr, const OptTensor& lengths, bool reverse, const Tensor& y,
                             const Tensor& ws, const Tensor& dy, const Tensor& dh_n, const OptTensor& dc_n,
                             const std::string& scheme, bool poison) {
  const c10::DeviceGuard guard(x.device());
  const CellInfo cell = cell_info(mode);
  const int64_t T = x.size(0), B = x.size(1), H = w_hh.size(0) / cell.gates, P = h0.size(1);
  const bool lstm = cell.kind == Kind::lstm, gru = cell.kind == Kind::gru, proj = present(w_hr);
  const Tensor dgx = at::empty({T, B, cell.gates * H}, x.options());
  const Tensor dgh = gru ? at::empty_like(dgx) : Tensor();
  const Tensor dhy = proj ? at::empty({T, B, P}, x.options()) : Tensor();
  const auto f32 = x.options().dtype(at::kFloat);
  const Tensor dh = float_copy(dh_n);
  const Tensor dc = lstm ? float_copy(*dc_n) : Tensor();
  const Tensor dgh_step = at::empty({2, B, cell.gates * H}, f32);
  const Tensor dh_step = at::empty({B, P}, f32);
  if (poison) poison_all({dgx, dgh, dhy, dgh_step, dh_step});
  const Tensor w_hhT = w_hh.t().contiguous();
  const Tensor w_hrT = proj ? w_hr->t().contiguous() : Tensor();
  const Tensor h0_c = h0.contiguous(), y_c = y.contiguous(), ws_c = ws.contiguous(), dy_c = dy.contiguous();
  const Tensor c0_c = lstm ? c0->contiguous() : Tensor();
  const BackwardArgs args{shape_of(x, H, P, lengths, reverse),
                          w_hhT.data_ptr(),
                          proj ? w_hrT.data_ptr() : nullptr,
                          h0_c.data_ptr(),
                          lstm ? c0_c.data_ptr() : nullptr,
                          y_c.data_ptr(),
                          ws_c.data_ptr(),
                          dy_c.data_ptr(),
                          dgx.data_ptr(),
                          gru ? dgh.data_ptr() : nullptr,
                          proj ? dhy.data_ptr() : nullptr,
                          dh.data_ptr<float>(),
                          lstm ? dc.data_ptr<float>() : nullptr,
                          dgh_step.data_ptr<float>(),
                          dh_step.data_ptr<float>()};
  Scheme used = Scheme::automatic;
  const cudaError_t err = run_backward(cell.kind, dtype_of(x), args, scheme_of(scheme), stream_of(x), &used);
  check(err, used, "backward");
  const Tensor gx_flat = flat(dgx), gh_flat = gru ? flat(dgh) : gx_flat;
  const Tensor dx = at::mm(gx_flat, w_ih).view_as(x);
  const Tensor dw_ih = sum_of_outer(dgx, x);
  const Tensor dw_hh = sum_of_outer(gru ? dgh : dgx, previous(y_c, h0_c, reverse));
  const Tensor db_ih = present(b_ih) ? gx_flat.sum(0) : Tensor();
  const Tensor db_hh = present(b_hh) ? gh_flat.sum(0) : Tensor();
  Tensor dw_hr;
  if (proj) {
    const Tensor o = ws_c.narrow(2, 3 * H, H), c_t = ws_c.narrow(2, 4 * H, H);
    dw_hr = sum_of_outer(dhy, o * c_t.tanh());
  }
  return {dx, fresh_like(h0, dh), lstm ? fresh_like(*c0, dc) : Tensor(), dw_ih, dw_hh, db_ih, db_hh, dw_hr};
}

}  // namespace
}  // namespace fusedrnn

PYBIND11_MODULE(TORCH_EXTENSION_NAME, m) {
  m.doc() = "fusedrnn CUDA backend: persistent fused LSTM/GRU/RNN recurrences (see fusedrnn/cuda.py)";
  m.def("forward", &fusedrnn::forward, "one layer-direction forward; see csrc/cuda_binding.cpp");
  m.def("backward", &fusedrnn::backward, "its hand-written BPTT");
  m.def("last_scheme", [] { return fusedrnn::last_scheme_name; }, "scheme of the last kernel run");
}
