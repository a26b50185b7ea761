// pybind11 binding of the CUDA backend (module fusedrnn._cuda): the backend contracts of
// fusedrnn/reference.py, in C++ so a call costs one Python crossing.
//
//   forward(mode, x, h0, c0, w_ih, w_hh, b_ih, b_hh, w_hr, lengths, reverse, save, scheme, poison)
//       -> [y, h_n, c_n | None, ws]  (ws empty without save: the kernels then write none)
//   backward(mode, x, h0, c0, w_ih, w_hh, b_ih, b_hh, w_hr, lengths, reverse, y, ws, dy, dh_n, dc_n,
//            need_dx, scheme, poison) -> [dx, dh0, dc0, dw_ih, dw_hh, db_ih, db_hh, dw_hr] (None where absent)
//   stack_forward(mode, x, h0, c0, w_ih[], w_hh[], b_ih[], b_hh[], w_hr[], masks[], lengths, reverse, save,
//                 scheme, poison) -> [ys, h_n, c_n | None, ws]
//   stack_backward(mode, x, h0, c0, w_ih[], ..., masks[], lengths, reverse, ys, ws, dys, dh_n, dc_n, need_dx,
//                  scheme, poison) -> (dx | None, dh0, dc0 | None, dw_ih[], dw_hh[], db_ih[], db_hh[], dw_hr[])
//   fits_on_chip(mode, x, H, P, layers, proj, backward) -> whether such a stack would run persistent
//   last_scheme() -> "persistent" | "per_step" | "gemm": what the last call ran
//   max_layers: the deepest stack per call
//
// Shapes as in reference.py: x (T, B, I), h0 (B, P), c0 (B, H), w_ih (G*H, I), w_hh (G*H, P),
// w_hr (P, H), lengths (B,) int64, y (T, B, P), ws (T, B, WS*H) with the reference's layout
// (lstm: i, f, g, o, c; gru: r, z, n, gh_n; rnn: none); a stack's h0, c0, ys, ws, dys... gain a leading L
// and its lists hold one tensor per layer (empty where absent). A layer call is the stack of one layer.
// Everything that is not sequential is an ATen GEMM here: layer 0's gx = x W_ih^T + b_ih before the
// recurrence kernel; dx, dW_ih, dW_hh, dW_hr and the bias grads after it. scheme: "auto" | "persistent" |
// "per_step" | "gemm" (see launchers.h; gemm: one layer per call, its per-step GEMMs issued from here).
// poison fills every buffer the kernels write with NaN first, so tests catch elements a kernel never wrote.
// Only device-generic ATen/c10 headers: this file also compiles against a CPU-only torch.
#include <c10/core/DeviceGuard.h>
#include <c10/core/impl/DeviceGuardImplInterface.h>
#include <torch/extension.h>

#include <algorithm>
#include <cmath>
#include <optional>
#include <utility>
#include <string>
#include <vector>

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
  if (name == "gemm") return Scheme::gemm;
  TORCH_CHECK_VALUE(false, "fusedrnn cuda: scheme must be auto, persistent, per_step or gemm, got '", name, "'");
}

std::string last_scheme_name = "none";

// The current stream of x's device (nullptr for a CPU tensor: the kernels' host emulation in the tests).
cudaStream_t stream_of(const Tensor& x) {
  if (!x.is_cuda()) return nullptr;
  const c10::impl::DeviceGuardImplInterface* impl = c10::impl::getDeviceGuardImpl(x.device().type());
  return static_cast<cudaStream_t>(impl->getStream(x.device()).native_handle());
}

void check(cudaError_t err, Scheme used, const char* what) {
  if (err != cudaSuccess) {
    // A refused launch (configuration, resources) also sits in the runtime's last-error slot: clear it, or the
    // next unrelated torch op that checks cudaGetLastError would raise it as its own.
    cudaGetLastError();
    TORCH_CHECK(false, "fusedrnn cuda: ", what, " kernel failed: ", cudaGetErrorString(err));
  }
  last_scheme_name = used == Scheme::persistent ? "persistent" : used == Scheme::gemm ? "gemm" : "per_step";
}

const void* ptr_or_null(const OptTensor& t) { return t && t->defined() ? t->data_ptr() : nullptr; }
bool present(const OptTensor& t) { return t && t->defined(); }

using Tensors = std::vector<Tensor>;

// The kernels read lengths, weights and masks through raw pointers typed by x's dtype, on x's device: refuse
// anything else with the argument's name (the modules never pass it; a direct call or swapped parameters might).
void check_inputs(const Tensor& x, const OptTensor& lengths, const Tensors& w_ih, const Tensors& w_hh,
                  const Tensors& b_ih, const Tensors& b_hh, const Tensors& w_hr, const Tensors& masks) {
  if (present(lengths)) {
    const Tensor& n = *lengths;
    TORCH_CHECK(n.scalar_type() == at::kLong, "fusedrnn cuda: lengths must be int64, got ", n.scalar_type());
    TORCH_CHECK(n.device() == x.device(), "fusedrnn cuda: lengths is on ", n.device(), ", the input on ", x.device(),
                "; lengths must be on the input's device");
    TORCH_CHECK(n.dim() == 1 && n.size(0) == x.size(1), "fusedrnn cuda: lengths must have shape (B,) = (", x.size(1),
                ",), got ", n.sizes());
    TORCH_CHECK(n.is_contiguous(), "fusedrnn cuda: lengths must be contiguous");
  }
  const std::pair<const char*, const Tensors*> named[] = {{"w_ih", &w_ih}, {"w_hh", &w_hh}, {"b_ih", &b_ih},
                                                          {"b_hh", &b_hh}, {"w_hr", &w_hr}, {"masks", &masks}};
  for (const auto& [name, ts] : named) {
    for (size_t l = 0; l < ts->size(); ++l) {
      const Tensor& t = (*ts)[l];
      TORCH_CHECK(t.scalar_type() == x.scalar_type(), "fusedrnn cuda: ", name, "[", l, "] is ", t.scalar_type(),
                  ", the input ", x.scalar_type(), "; weights and masks must have the input's dtype");
      TORCH_CHECK(t.device() == x.device(), "fusedrnn cuda: ", name, "[", l, "] is on ", t.device(), ", the input on ",
                  x.device(), "; weights and masks must be on the input's device");
    }
  }
}

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

cudaError_t run_forward(Kind kind, Dtype dtype, const StackForwardArgs& a, Scheme scheme, cudaStream_t s,
                        Scheme* used) {
  switch (kind) {
    case Kind::lstm:
      return lstm_forward(dtype, a, scheme, s, used);
    case Kind::gru:
      return gru_forward(dtype, a, scheme, s, used);
    default:
      return rnn_forward(kind == Kind::rnn_relu, dtype, a, scheme, s, used);
  }
}

cudaError_t run_backward(Kind kind, Dtype dtype, const StackBackwardArgs& a, Scheme scheme, cudaStream_t s,
                         Scheme* used) {
  switch (kind) {
    case Kind::lstm:
      return lstm_backward(dtype, a, scheme, s, used);
    case Kind::gru:
      return gru_backward(dtype, a, scheme, s, used);
    default:
      return rnn_backward(kind == Kind::rnn_relu, dtype, a, scheme, s, used);
  }
}


cudaError_t gemm_step_forward(Kind kind, Dtype dtype, const ForwardArgs& a, const GemmStep& g, cudaStream_t s) {
  switch (kind) {
    case Kind::lstm:
      return lstm_gemm_forward(dtype, a, g, s);
    case Kind::gru:
      return gru_gemm_forward(dtype, a, g, s);
    default:
      return rnn_gemm_forward(kind == Kind::rnn_relu, dtype, a, g, s);
  }
}

cudaError_t gemm_step_backward(Kind kind, Dtype dtype, const BackwardArgs& a, const GemmStep& g, cudaStream_t s) {
  switch (kind) {
    case Kind::lstm:
      return lstm_gemm_backward(dtype, a, g, s);
    case Kind::gru:
      return gru_gemm_backward(dtype, a, g, s);
    default:
      return rnn_gemm_backward(kind == Kind::rnn_relu, dtype, a, g, s);
  }
}

// The forward step before forward step t (the one whose state t starts from), as in recurrence.cuh.
int64_t step_before(int64_t t, bool reverse) { return reverse ? t + 1 : t - 1; }

// The gemm scheme's forward of one layer (csrc/gemm_step.cuh): per step the recurrent product as an ATen GEMM
// into a buffer allocated once (cuBLAS on torch's current stream, under torch's TF32 / reduced-precision
// settings, in the layer's dtype as cuDNN does it), then the fused pointwise kernel. h0: elem (B, P);
// w_hh (G*H, P); w_hr (P, H) or undefined; y: elem (T, B, P), the kernels' output, read back as h_{t-1}.
cudaError_t gemm_forward(Kind kind, Dtype dtype, const ForwardArgs& a, const Tensor& h0, const Tensor& w_hh,
                         const Tensor& w_hr, const Tensor& y, cudaStream_t stream) {
  const Shape& sh = a.shape;
  const bool proj = w_hr.defined();
  Tensor gh = at::empty({sh.B, w_hh.size(0)}, y.options());
  Tensor r = proj ? at::empty({sh.B, sh.H}, y.options()) : Tensor();
  Tensor hr = proj ? at::empty({sh.B, sh.P}, y.options()) : Tensor();
  const Tensor w_hhT = w_hh.t(), w_hrT = proj ? w_hr.t() : Tensor();
  cudaError_t err = cudaSuccess;
  for (int s = 0; s < sh.T && !err; ++s) {
    const int64_t t = sh.reverse ? sh.T - 1 - s : s;
    at::mm_out(gh, s == 0 ? h0 : y[step_before(t, sh.reverse)], w_hhT);
    err = gemm_step_forward(kind, dtype, a, GemmStep{s, kUnits, gh.data_ptr(), proj ? r.data_ptr() : nullptr}, stream);
    if (proj && !err) {
      at::mm_out(hr, r, w_hrT);
      err = gemm_step_forward(kind, dtype, a, GemmStep{s, kOuts, hr.data_ptr(), nullptr}, stream);
    }
  }
  return err;
}

// Its backward: per step dh_rec = dG_{t_next} W_hh (ATen GEMM), the pointwise outs and units (one launch without
// proj; with proj the GEMM dr = dhy[t] W_hr between them); then dh0 = dh + dG_{t_0} W_hh. dG: elem (T, B, G*H),
// the hidden-side gate gradients the kernels write (dgh for gru, else dgx); dhy: elem (T, B, P) with proj;
// dh: float32 (B, P), dh_n in, dh0 out.
cudaError_t gemm_backward(Kind kind, Dtype dtype, const BackwardArgs& a, const Tensor& w_hh, const Tensor& w_hr,
                          const Tensor& dG, const Tensor& dhy, Tensor& dh, cudaStream_t stream) {
  const Shape& sh = a.shape;
  if (sh.T == 0) return cudaSuccess;
  const bool proj = w_hr.defined();
  Tensor dh_rec = at::empty({sh.B, sh.P}, dG.options());
  Tensor dr = proj ? at::empty({sh.B, sh.H}, dG.options()) : Tensor();
  cudaError_t err = cudaSuccess;
  for (int s = 0; s < sh.T && !err; ++s) {
    const int64_t t = sh.reverse ? s : sh.T - 1 - s;  // backward step s undoes forward step T-1-s
    if (s > 0) at::mm_out(dh_rec, dG[step_before(t, !sh.reverse)], w_hh);
    const void* rec = s > 0 ? dh_rec.data_ptr() : nullptr;
    if (!proj) {
      err = gemm_step_backward(kind, dtype, a, GemmStep{s, kBoth, rec, nullptr}, stream);
      continue;
    }
    err = gemm_step_backward(kind, dtype, a, GemmStep{s, kOuts, rec, nullptr}, stream);
    if (err) break;
    at::mm_out(dr, dhy[t], w_hr);
    err = gemm_step_backward(kind, dtype, a, GemmStep{s, kUnits, dr.data_ptr(), nullptr}, stream);
  }
  if (!err) dh.add_(at::mm(dG[sh.reverse ? sh.T - 1 : 0], w_hh));
  return err;
}

const void* ptr_at(const Tensors& ts, size_t i) { return i < ts.size() ? ts[i].data_ptr() : nullptr; }
Tensors contiguous_all(const Tensors& ts) {
  Tensors out;
  for (const Tensor& t : ts) out.push_back(t.contiguous());
  return out;
}
Tensors transposed_all(const Tensors& ts) {
  Tensors out;
  for (const Tensor& t : ts) out.push_back(t.t().contiguous());
  return out;
}
Tensors listed(const OptTensor& t) { return present(t) ? Tensors{*t} : Tensors{}; }

// What layer l of a stack reads: x, or the layer below's output times the dropout mask between them.
Tensor layer_input(const Tensor& x, const Tensor& ys, const Tensors& masks, int64_t l) {
  if (l == 0) return x;
  return masks.empty() ? ys[l - 1] : ys[l - 1] * masks[l - 1];
}

void check_depth(size_t layers, const std::string& scheme) {
  TORCH_CHECK_VALUE(layers >= 1 && layers <= static_cast<size_t>(kMaxLayers),
                    "fusedrnn cuda: a stack launch runs 1 to ", kMaxLayers, " layers, got ", layers,
                    " (fusedrnn/cuda.py runs deeper stacks layer by layer)");
  TORCH_CHECK_VALUE(scheme != "gemm" || layers == 1, "fusedrnn cuda: the gemm scheme runs one layer per call, got ",
                    layers, " (fusedrnn/cuda.py runs its stacks layer by layer)");
}

// The stack contract's forward (reference.py): ys (L, T, B, P), h_n (L, B, P), c_n (L, B, H) | None, ws.
std::vector<Tensor> stack_forward(const std::string& mode, const Tensor& x, const Tensor& h0, const OptTensor& c0,
                                  const Tensors& w_ih, const Tensors& w_hh, const Tensors& b_ih, const Tensors& b_hh,
                                  const Tensors& w_hr, const Tensors& masks, const OptTensor& lengths, bool reverse,
                                  bool save, const std::string& scheme, bool poison) {
  const c10::DeviceGuard guard(x.device());
  const CellInfo cell = cell_info(mode);
  check_depth(w_ih.size(), scheme);
  check_inputs(x, lengths, w_ih, w_hh, b_ih, b_hh, w_hr, masks);
  const int64_t L = static_cast<int64_t>(w_ih.size()), T = x.size(0), B = x.size(1);
  const int64_t H = w_hh[0].size(0) / cell.gates, P = h0.size(2);
  const bool lstm = cell.kind == Kind::lstm, proj = !w_hr.empty(), dropout = !masks.empty();
  const Tensor x_flat = flat(x);
  const Tensor gx =
      (b_ih.empty() ? at::mm(x_flat, w_ih[0].t()) : at::addmm(b_ih[0], x_flat, w_ih[0].t())).view({T, B, -1});
  const Tensor ys = at::empty({L, T, B, P}, x.options());
  const Tensor ws = save ? at::empty({L, T, B, cell.ws_rows * H}, x.options()) : at::empty({0}, x.options());
  const auto f32 = x.options().dtype(at::kFloat);
  const Tensor h = at::empty({L, 2, B, P}, f32);
  const Tensor c = lstm ? float_copy(*c0) : Tensor();
  const Tensor r = proj ? at::empty({L, B, H}, f32) : Tensor();
  const Tensor x_out = dropout ? at::empty({L, 2, B, P}, f32) : Tensor();
  if (poison) poison_all({ys, ws, h, r, x_out});
  h.select(1, 0).copy_(h0);
  const Tensors w_ih_c = contiguous_all(w_ih), w_hh_c = contiguous_all(w_hh), b_ih_c = contiguous_all(b_ih);
  const Tensors b_hh_c = contiguous_all(b_hh), w_hr_c = contiguous_all(w_hr), masks_c = contiguous_all(masks);
  StackForwardArgs args{};
  args.L = static_cast<int>(L);
  for (int64_t l = 0; l < L; ++l) {
    const bool first = l == 0, top = l + 1 == L;
    float* x_in = first ? nullptr : (dropout ? x_out[l - 1] : h[l - 1]).data_ptr<float>();
    args.layer[l] = ForwardArgs{shape_of(x, H, P, lengths, reverse),
                                first ? gx.data_ptr() : nullptr,
                                x_in,
                                first ? nullptr : w_ih_c[l].data_ptr(),
                                first ? nullptr : ptr_at(b_ih_c, l),
                                w_hh_c[l].data_ptr(),
                                ptr_at(b_hh_c, l),
                                ptr_at(w_hr_c, l),
                                ys[l].data_ptr(),
                                save ? ws[l].data_ptr() : nullptr,
                                h[l].data_ptr<float>(),
                                lstm ? c[l].data_ptr<float>() : nullptr,
                                proj ? r[l].data_ptr<float>() : nullptr,
                                dropout && !top ? masks_c[l].data_ptr() : nullptr,
                                dropout && !top ? x_out[l].data_ptr<float>() : nullptr};
  }
  const Scheme requested = scheme_of(scheme);
  Scheme used = requested;
  const cudaError_t err =
      requested == Scheme::gemm
          ? gemm_forward(cell.kind, dtype_of(x), args.layer[0], h0[0], w_hh_c[0], proj ? w_hr_c[0] : Tensor(), ys[0],
                         stream_of(x))
          : run_forward(cell.kind, dtype_of(x), args, requested, stream_of(x), &used);
  check(err, used, "forward");
  return {ys, fresh_like(h0, h.select(1, T % 2)), lstm ? fresh_like(*c0, c) : Tensor(), ws};
}

// The stack contract's BPTT: dx | None, dh0, dc0 | None, and the lists dw_ih, dw_hh, db_ih, db_hh, dw_hr.
std::tuple<Tensor, Tensor, Tensor, Tensors, Tensors, Tensors, Tensors, Tensors> stack_backward(
    const std::string& mode, const Tensor& x, const Tensor& h0, const OptTensor& c0, const Tensors& w_ih,
    const Tensors& w_hh, const Tensors& b_ih, const Tensors& b_hh, const Tensors& w_hr, const Tensors& masks,
    const OptTensor& lengths, bool reverse, const Tensor& ys, const Tensor& ws, const Tensor& dys, const Tensor& dh_n,
    const OptTensor& dc_n, bool need_dx, const std::string& scheme, bool poison) {
  const c10::DeviceGuard guard(x.device());
  const CellInfo cell = cell_info(mode);
  check_depth(w_ih.size(), scheme);
  check_inputs(x, lengths, w_ih, w_hh, b_ih, b_hh, w_hr, masks);
  const int64_t L = static_cast<int64_t>(w_ih.size()), T = x.size(0), B = x.size(1);
  const int64_t H = w_hh[0].size(0) / cell.gates, P = h0.size(2), GH = cell.gates * H;
  const bool lstm = cell.kind == Kind::lstm, gru = cell.kind == Kind::gru, proj = !w_hr.empty();
  const bool dropout = !masks.empty();
  const Tensor dgx = at::empty({L, T, B, GH}, x.options());
  const Tensor dgh = gru ? at::empty_like(dgx) : Tensor();
  const Tensor dhy = proj ? at::empty({L, T, B, P}, x.options()) : Tensor();
  const auto f32 = x.options().dtype(at::kFloat);
  const Tensor dh = float_copy(dh_n);
  const Tensor dc = lstm ? float_copy(*dc_n) : Tensor();
  const Tensor dgh_step = at::empty({L, 2, B, GH}, f32);
  const Tensor dgx_step = gru && L > 1 ? at::empty({L, 2, B, GH}, f32) : Tensor();  // gru: differs from dgh_step
  const Tensor dh_step = at::empty({L, B, P}, f32);
  if (poison) poison_all({dgx, dgh, dhy, dgh_step, dgx_step, dh_step});
  const Tensors w_hhT = transposed_all(w_hh), w_hrT = transposed_all(w_hr);
  const Tensors w_ihT_up = transposed_all(Tensors(w_ih.begin() + 1, w_ih.end()));  // layer 0's is never read
  const Tensors masks_c = contiguous_all(masks);
  const Tensor h0_c = h0.contiguous(), ys_c = ys.contiguous(), ws_c = ws.contiguous(), dys_c = dys.contiguous();
  const Tensor c0_c = lstm ? c0->contiguous() : Tensor();
  StackBackwardArgs args{};
  args.L = static_cast<int>(L);
  for (int64_t l = 0; l < L; ++l) {
    const bool top = l + 1 == L;
    const Tensor& steps_up = top ? Tensor() : (gru ? dgx_step[l + 1] : dgh_step[l + 1]);
    args.layer[l] = BackwardArgs{shape_of(x, H, P, lengths, reverse),
                                 w_hhT[l].data_ptr(),
                                 ptr_at(w_hrT, l),
                                 top ? nullptr : w_ihT_up[l].data_ptr(),
                                 top ? nullptr : steps_up.data_ptr<float>(),
                                 dropout && !top ? masks_c[l].data_ptr() : nullptr,
                                 h0_c[l].data_ptr(),
                                 lstm ? c0_c[l].data_ptr() : nullptr,
                                 ys_c[l].data_ptr(),
                                 ws_c[l].data_ptr(),
                                 dys_c[l].data_ptr(),
                                 dgx[l].data_ptr(),
                                 gru ? dgh[l].data_ptr() : nullptr,
                                 proj ? dhy[l].data_ptr() : nullptr,
                                 dh[l].data_ptr<float>(),
                                 lstm ? dc[l].data_ptr<float>() : nullptr,
                                 dgh_step[l].data_ptr<float>(),
                                 gru && l > 0 ? dgx_step[l].data_ptr<float>() : nullptr,
                                 dh_step[l].data_ptr<float>()};
  }
  const Scheme requested = scheme_of(scheme);
  Scheme used = requested;
  cudaError_t err;
  if (requested == Scheme::gemm) {
    Tensor dh_0 = dh[0];
    err = gemm_backward(cell.kind, dtype_of(x), args.layer[0], w_hh[0], proj ? w_hr[0] : Tensor(),
                        gru ? dgh[0] : dgx[0], proj ? dhy[0] : Tensor(), dh_0, stream_of(x));
  } else {
    err = run_backward(cell.kind, dtype_of(x), args, requested, stream_of(x), &used);
  }
  check(err, used, "backward");
  Tensors dw_ih, dw_hh, db_ih, db_hh, dw_hr;
  for (int64_t l = 0; l < L; ++l) {
    const Tensor gx_l = dgx[l], gh_l = gru ? dgh[l] : gx_l;
    dw_ih.push_back(sum_of_outer(gx_l, layer_input(x, ys_c, masks_c, l)));
    dw_hh.push_back(sum_of_outer(gh_l, previous(ys_c[l], h0_c[l], reverse)));
    if (!b_ih.empty()) db_ih.push_back(flat(gx_l).sum(0));
    if (!b_hh.empty()) db_hh.push_back(flat(gh_l).sum(0));
    if (proj) {
      const Tensor o = ws_c[l].narrow(2, 3 * H, H), c_t = ws_c[l].narrow(2, 4 * H, H);
      dw_hr.push_back(sum_of_outer(dhy[l], o * c_t.tanh()));
    }
  }
  const Tensor dx = need_dx ? at::mm(flat(dgx[0]), w_ih[0]).view_as(x) : Tensor();
  return {dx, fresh_like(h0, dh), lstm ? fresh_like(*c0, dc) : Tensor(), dw_ih, dw_hh, db_ih, db_hh, dw_hr};
}

// Whether `layers` layers of x's dtype, H units and P outputs run persistent (forward, or backward).
bool fits_on_chip(const std::string& mode, const Tensor& x, int64_t H, int64_t P, int64_t layers, bool proj,
                  bool backward) {
  const c10::DeviceGuard guard(x.device());
  const CellInfo cell = cell_info(mode);
  const Shape sh{1, 1, static_cast<int>(H), static_cast<int>(P), false, nullptr};
  const Dtype dtype = dtype_of(x);
  const int L = static_cast<int>(layers);
  bool fits = false;
  cudaError_t err;
  switch (cell.kind) {
    case Kind::lstm:
      err = lstm_fits_on_chip(dtype, sh, L, proj, backward, &fits);
      break;
    case Kind::gru:
      err = gru_fits_on_chip(dtype, sh, L, proj, backward, &fits);
      break;
    default:
      err = rnn_fits_on_chip(cell.kind == Kind::rnn_relu, dtype, sh, L, backward, &fits);
  }
  if (err != cudaSuccess) cudaGetLastError();  // as in check(): leave no error behind for the next torch op
  TORCH_CHECK(err == cudaSuccess, "fusedrnn cuda: planning failed: ", cudaGetErrorString(err));
  return fits;
}

// One layer-direction (reference.py's layer contract): the stack of one layer.
std::vector<Tensor> forward(const std::string& mode, const Tensor& x, const Tensor& h0, const OptTensor& c0,
                            const Tensor& w_ih, const Tensor& w_hh, const OptTensor& b_ih, const OptTensor& b_hh,
                            const OptTensor& w_hr, const OptTensor& lengths, bool reverse, bool save,
                            const std::string& scheme, bool poison) {
  const OptTensor c0_1 = present(c0) ? OptTensor(c0->unsqueeze(0)) : std::nullopt;
  const std::vector<Tensor> out = stack_forward(mode, x, h0.unsqueeze(0), c0_1, {w_ih}, {w_hh}, listed(b_ih),
                                                listed(b_hh), listed(w_hr), {}, lengths, reverse, save, scheme, poison);
  return {out[0][0], out[1][0], out[2].defined() ? out[2][0] : Tensor(), save ? out[3][0] : out[3]};
}

std::vector<Tensor> backward(const std::string& mode, const Tensor& x, const Tensor& h0, const OptTensor& c0,
                             const Tensor& w_ih, const Tensor& w_hh, const OptTensor& b_ih, const OptTensor& b_hh,
                             const OptTensor& w_hr, const OptTensor& lengths, bool reverse, const Tensor& y,
                             const Tensor& ws, const Tensor& dy, const Tensor& dh_n, const OptTensor& dc_n,
                             bool need_dx, const std::string& scheme, bool poison) {
  const auto one = [](const OptTensor& t) { return present(t) ? OptTensor(t->unsqueeze(0)) : std::nullopt; };
  const auto [dx, dh0, dc0, dw_ih, dw_hh, db_ih, db_hh, dw_hr] =
      stack_backward(mode, x, h0.unsqueeze(0), one(c0), {w_ih}, {w_hh}, listed(b_ih), listed(b_hh), listed(w_hr), {},
                     lengths, reverse, y.unsqueeze(0), ws.unsqueeze(0), dy.unsqueeze(0), dh_n.unsqueeze(0), one(dc_n),
                     need_dx, scheme, poison);
  const auto first = [](const Tensors& ts) { return ts.empty() ? Tensor() : ts[0]; };
  return {dx, dh0[0], dc0.defined() ? dc0[0] : Tensor(), dw_ih[0], dw_hh[0], first(db_ih), first(db_hh), first(dw_hr)};
}

}  // namespace
}  // namespace fusedrnn

PYBIND11_MODULE(TORCH_EXTENSION_NAME, m) {
  m.doc() = "fusedrnn CUDA backend: persistent fused LSTM/GRU/RNN recurrences (see fusedrnn/cuda.py)";
  m.def("forward", &fusedrnn::forward, "one layer-direction forward; see csrc/cuda_binding.cpp");
  m.def("backward", &fusedrnn::backward, "its hand-written BPTT");
  m.def("stack_forward", &fusedrnn::stack_forward, "a unidirectional stack's forward as one wavefront");
  m.def("stack_backward", &fusedrnn::stack_backward, "its BPTT, one wavefront in reverse");
  m.def("fits_on_chip", &fusedrnn::fits_on_chip, "whether a stack of this shape would run persistent");
  m.def("last_scheme", [] { return fusedrnn::last_scheme_name; }, "scheme of the last kernel run");
  m.attr("max_layers") = fusedrnn::kMaxLayers;
}
