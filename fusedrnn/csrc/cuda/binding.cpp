// pybind11 binding of the CUDA backend (module fusedrnn._cuda; fusedrnn/cuda.py wraps it): the sequential part of
// the backend contracts of fusedrnn/reference.py, in C++ so a call costs one Python crossing.
//
//   stack_forward(cell, gx, h0, c0, weights[], masks[], lengths, reverse, save, scheme, poison)
//       -> [ys, h_n, c_n | None, saved]  (saved empty without save: the kernels then write none)
//   stack_backward(cell, h0, c0, weights[], masks[], lengths, reverse, ys, saved, dys, dh_n, dc_n, scheme, poison)
//       -> (dgx, dgh | None, dhy | None, dh0, dc0 | None): the gate gradients fusedrnn/epilogue.py turns into dx and
//          the weights' gradients (fusedrnn/cuda.py calls it), and the initial states' gradients
//   forward / backward: the same for one layer-direction (the stack of one layer, without the leading L)
//   fits_on_chip(cell, x, H, P, layers, proj, backward) -> whether such a stack would run persistent
//   cell_constants() -> {cell: (gates, saved rows per unit)} (api.h's kCells, pinned to fusedrnn/cells.py by tests)
//   last_scheme() -> "persistent" | "per_step" | "gemm": what the last call ran
//   max_layers: the deepest stack per call
//
// Shapes as in reference.py: gx (T, B, G*H) = x W_ih^T + b_ih of layer 0 (epilogue.input_projection), h0 (L, B, P),
// c0 (L, B, H), weights: L LayerWeights (w_ih (G*H, I or P), w_hh (G*H, P), b_ih, b_hh (G*H,) or None, w_hr (P, H)
// or None; every layer with the same ones present), masks: L-1 (T, B, P), lengths (B,) int64, ys (L, T, B, P),
// saved (L, T, B, S*H) in cells.saved_shape's layout (lstm: i, f, g, o, c; gru: r, z, n, gh_n; rnn: none),
// dgx, dgh (L, T, B, G*H) (dgh only for gru, whose hidden side differs), dhy (L, T, B, P) dL/dh_t with proj.
// scheme: "auto" | "persistent" | "per_step" | "gemm" (see api.h; gemm: one layer per call, its per-step GEMMs
// issued from here). poison fills every buffer the kernels write with NaN first, so tests catch elements a kernel
// never wrote. Only device-generic ATen/c10 headers: this file also compiles against a CPU-only torch (and, with
// fusedrnn/csrc/testing/host_emulation.h, runs the kernels on CPU tensors).
#include <c10/core/DeviceGuard.h>
#include <c10/core/impl/DeviceGuardImplInterface.h>
#include <torch/extension.h>

#include <algorithm>
#include <cmath>
#include <iterator>
#include <optional>
#include <string>
#include <tuple>
#include <utility>
#include <vector>

#include "api.h"

namespace fusedrnn::cuda {
namespace {

using at::Tensor;
using OptTensor = std::optional<Tensor>;

enum class Kind { lstm, gru, rnn_tanh, rnn_relu };

struct CellInfo {
  Kind kind;
  int gates, saved_rows;  // G, and saved rows per hidden unit
};

CellInfo cell_info(const std::string& cell) {
  constexpr Kind kinds[] = {Kind::lstm, Kind::gru, Kind::rnn_tanh, Kind::rnn_relu};  // kCells' order
  for (size_t k = 0; k < std::size(kCells); ++k)
    if (cell == kCells[k].name) return {kinds[k], kCells[k].gates, kCells[k].saved_rows};
  TORCH_CHECK_VALUE(false, "fusedrnn cuda: unknown cell '", cell, "'");
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

// A float32 working copy of a state (never aliases the caller's tensor).
Tensor float_copy(const Tensor& t) { return t.to(t.options().dtype(at::kFloat), false, /*copy=*/true).contiguous(); }

// A fresh tensor like `like` holding `value` (cast back from the float32 state).
Tensor fresh_like(const Tensor& like, const Tensor& value) { return at::empty_like(like).copy_(value); }

void poison_all(std::initializer_list<Tensor> ts) {
  for (const Tensor& t : ts)
    if (t.defined()) t.fill_(NAN);
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

// The gemm scheme's forward of one layer (gemm_step.cuh): per step the recurrent product as an ATen GEMM
// into a buffer allocated once (cuBLAS on torch's current stream, under torch's TF32 / reduced-precision
// settings, in the layer's dtype as cuDNN does it), then the fused pointwise kernel. h0: elem (B, P);
// w_hh (G*H, P); w_hr (P, H) or undefined; y: elem (T, B, P), the kernels' output, read back as h_{t-1}.
cudaError_t gemm_forward(Kind kind, Dtype dtype, const ForwardArgs& a, const Tensor& h0, const Tensor& w_hh,
                         const Tensor& w_hr, const Tensor& y, cudaStream_t stream) {
  const Shape& sh = a.shape;
  const bool proj = w_hr.defined();
  Tensor gh = at::empty({sh.B, w_hh.size(0)}, y.options());
  Tensor cell_out = proj ? at::empty({sh.B, sh.H}, y.options()) : Tensor();
  Tensor hr = proj ? at::empty({sh.B, sh.P}, y.options()) : Tensor();
  const Tensor w_hhT = w_hh.t(), w_hrT = proj ? w_hr.t() : Tensor();
  cudaError_t err = cudaSuccess;
  for (int s = 0; s < sh.T && !err; ++s) {
    const int64_t t = sh.reverse ? sh.T - 1 - s : s;
    at::mm_out(gh, s == 0 ? h0 : y[step_before(t, sh.reverse)], w_hhT);
    const GemmStep units{s, kUnits, gh.data_ptr(), proj ? cell_out.data_ptr() : nullptr};
    err = gemm_step_forward(kind, dtype, a, units, stream);
    if (proj && !err) {
      at::mm_out(hr, cell_out, w_hrT);
      err = gemm_step_forward(kind, dtype, a, GemmStep{s, kOuts, hr.data_ptr(), nullptr}, stream);
    }
  }
  return err;
}

// Its backward: per step dh_rec = dG_{t_next} W_hh (ATen GEMM), the pointwise outs and units (one launch without
// proj; with proj the GEMM d_cell_out = dhy[t] W_hr between them); then dh0 = dh + dG_{t_0} W_hh. dG: elem (T, B, G*H),
// the hidden-side gate gradients the kernels write (dgh for gru, else dgx); dhy: elem (T, B, P) with proj;
// dh: float32 (B, P), dh_n in, dh0 out.
cudaError_t gemm_backward(Kind kind, Dtype dtype, const BackwardArgs& a, const Tensor& w_hh, const Tensor& w_hr,
                          const Tensor& dG, const Tensor& dhy, Tensor& dh, cudaStream_t stream) {
  const Shape& sh = a.shape;
  if (sh.T == 0) return cudaSuccess;
  const bool proj = w_hr.defined();
  Tensor dh_rec = at::empty({sh.B, sh.P}, dG.options());
  Tensor d_cell_out = proj ? at::empty({sh.B, sh.H}, dG.options()) : Tensor();
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
    at::mm_out(d_cell_out, dhy[t], w_hr);
    err = gemm_step_backward(kind, dtype, a, GemmStep{s, kUnits, d_cell_out.data_ptr(), nullptr}, stream);
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

using Weights = std::tuple<Tensor, Tensor, OptTensor, OptTensor, OptTensor>;  // a fusedrnn.cells.LayerWeights

// A stack's parameters as one list per parameter, one tensor per layer, contiguous; b_ih, b_hh, w_hr empty where
// absent (every layer has the same ones).
struct StackWeights {
  Tensors w_ih, w_hh, b_ih, b_hh, w_hr;
};

StackWeights unpacked(const std::vector<Weights>& weights) {
  StackWeights out;
  for (const auto& [w_ih, w_hh, b_ih, b_hh, w_hr] : weights) {
    out.w_ih.push_back(w_ih.contiguous());
    out.w_hh.push_back(w_hh.contiguous());
    if (present(b_ih)) out.b_ih.push_back(b_ih->contiguous());
    if (present(b_hh)) out.b_hh.push_back(b_hh->contiguous());
    if (present(w_hr)) out.w_hr.push_back(w_hr->contiguous());
  }
  return out;
}

void check_depth(size_t layers, const std::string& scheme) {
  TORCH_CHECK_VALUE(layers >= 1 && layers <= static_cast<size_t>(kMaxLayers),
                    "fusedrnn cuda: a stack launch runs 1 to ", kMaxLayers, " layers, got ", layers,
                    " (fusedrnn/cuda.py runs deeper stacks layer by layer)");
  TORCH_CHECK_VALUE(scheme != "gemm" || layers == 1, "fusedrnn cuda: the gemm scheme runs one layer per call, got ",
                    layers, " (fusedrnn/cuda.py runs its stacks layer by layer)");
}

// The stack contract's forward (reference.py) from layer 0's input projection gx (T, B, G*H):
// ys (L, T, B, P), h_n (L, B, P), c_n (L, B, H) | None, saved (L, T, B, S*H) or (0,) without save.
std::vector<Tensor> stack_forward(const std::string& cell_name, const Tensor& gx, const Tensor& h0,
                                  const OptTensor& c0, const std::vector<Weights>& weights, const Tensors& masks,
                                  const OptTensor& lengths, bool reverse, bool save, const std::string& scheme,
                                  bool poison) {
  const c10::DeviceGuard guard(gx.device());
  const CellInfo cell = cell_info(cell_name);
  check_depth(weights.size(), scheme);
  const StackWeights w = unpacked(weights);
  check_inputs(gx, lengths, w.w_ih, w.w_hh, w.b_ih, w.b_hh, w.w_hr, masks);
  const int64_t L = static_cast<int64_t>(weights.size()), T = gx.size(0), B = gx.size(1);
  const int64_t H = w.w_hh[0].size(0) / cell.gates, P = h0.size(2);
  const bool lstm = cell.kind == Kind::lstm, proj = !w.w_hr.empty(), dropout = !masks.empty();
  const Tensor gx_c = gx.contiguous();
  const Tensor ys = at::empty({L, T, B, P}, gx.options());
  const Tensor saved = save ? at::empty({L, T, B, cell.saved_rows * H}, gx.options()) : at::empty({0}, gx.options());
  const auto f32 = gx.options().dtype(at::kFloat);
  const Tensor h = at::empty({L, 2, B, P}, f32);
  const Tensor c = lstm ? float_copy(*c0) : Tensor();
  const Tensor cell_out = proj ? at::empty({L, B, H}, f32) : Tensor();
  const Tensor x_out = dropout ? at::empty({L, 2, B, P}, f32) : Tensor();
  if (poison) poison_all({ys, saved, h, cell_out, x_out});
  h.select(1, 0).copy_(h0);
  const Tensors masks_c = contiguous_all(masks);
  StackForwardArgs args{};
  args.L = static_cast<int>(L);
  for (int64_t l = 0; l < L; ++l) {
    const bool first = l == 0, top = l + 1 == L;
    float* x_in = first ? nullptr : (dropout ? x_out[l - 1] : h[l - 1]).data_ptr<float>();
    args.layer[l] = ForwardArgs{shape_of(gx, H, P, lengths, reverse),
                                first ? gx_c.data_ptr() : nullptr,
                                x_in,
                                first ? nullptr : w.w_ih[l].data_ptr(),
                                first ? nullptr : ptr_at(w.b_ih, l),
                                w.w_hh[l].data_ptr(),
                                ptr_at(w.b_hh, l),
                                ptr_at(w.w_hr, l),
                                ys[l].data_ptr(),
                                save ? saved[l].data_ptr() : nullptr,
                                h[l].data_ptr<float>(),
                                lstm ? c[l].data_ptr<float>() : nullptr,
                                proj ? cell_out[l].data_ptr<float>() : nullptr,
                                dropout && !top ? masks_c[l].data_ptr() : nullptr,
                                dropout && !top ? x_out[l].data_ptr<float>() : nullptr};
  }
  const Scheme requested = scheme_of(scheme);
  Scheme used = requested;
  const cudaError_t err =
      requested == Scheme::gemm
          ? gemm_forward(cell.kind, dtype_of(gx), args.layer[0], h0[0], w.w_hh[0], proj ? w.w_hr[0] : Tensor(), ys[0],
                         stream_of(gx))
          : run_forward(cell.kind, dtype_of(gx), args, requested, stream_of(gx), &used);
  check(err, used, "forward");
  return {ys, fresh_like(h0, h.select(1, T % 2)), lstm ? fresh_like(*c0, c) : Tensor(), saved};
}

// The stack contract's BPTT, up to the epilogue: the gate gradients dgx (L, T, B, G*H), dgh (the same, gru only:
// else None, dgx serves both), dhy (L, T, B, P) with proj (else None), and dh0 (L, B, P), dc0 (L, B, H) | None.
std::tuple<Tensor, Tensor, Tensor, Tensor, Tensor> stack_backward(
    const std::string& cell_name, const Tensor& h0, const OptTensor& c0, const std::vector<Weights>& weights,
    const Tensors& masks, const OptTensor& lengths, bool reverse, const Tensor& ys, const Tensor& saved,
    const Tensor& dys, const Tensor& dh_n, const OptTensor& dc_n, const std::string& scheme, bool poison) {
  const c10::DeviceGuard guard(dys.device());
  const CellInfo cell = cell_info(cell_name);
  check_depth(weights.size(), scheme);
  const StackWeights w = unpacked(weights);
  check_inputs(dys[0], lengths, w.w_ih, w.w_hh, w.b_ih, w.b_hh, w.w_hr, masks);
  const int64_t L = static_cast<int64_t>(weights.size()), T = dys.size(1), B = dys.size(2);
  const int64_t H = w.w_hh[0].size(0) / cell.gates, P = h0.size(2), GH = cell.gates * H;
  const bool lstm = cell.kind == Kind::lstm, gru = cell.kind == Kind::gru, proj = !w.w_hr.empty();
  const bool dropout = !masks.empty();
  const Tensor dgx = at::empty({L, T, B, GH}, dys.options());
  const Tensor dgh = gru ? at::empty_like(dgx) : Tensor();
  const Tensor dhy = proj ? at::empty({L, T, B, P}, dys.options()) : Tensor();
  const auto f32 = dys.options().dtype(at::kFloat);
  const Tensor dh = float_copy(dh_n);
  const Tensor dc = lstm ? float_copy(*dc_n) : Tensor();
  const Tensor dgh_step = at::empty({L, 2, B, GH}, f32);
  const Tensor dgx_step = gru && L > 1 ? at::empty({L, 2, B, GH}, f32) : Tensor();  // gru: differs from dgh_step
  const Tensor dh_step = at::empty({L, B, P}, f32);
  if (poison) poison_all({dgx, dgh, dhy, dgh_step, dgx_step, dh_step});
  const Tensors w_hhT = transposed_all(w.w_hh), w_hrT = transposed_all(w.w_hr);
  const Tensors w_ihT_up = transposed_all(Tensors(w.w_ih.begin() + 1, w.w_ih.end()));  // layer 0's is never read
  const Tensors masks_c = contiguous_all(masks);
  const Tensor h0_c = h0.contiguous(), ys_c = ys.contiguous(), saved_c = saved.contiguous();
  const Tensor dys_c = dys.contiguous(), c0_c = lstm ? c0->contiguous() : Tensor();
  StackBackwardArgs args{};
  args.L = static_cast<int>(L);
  for (int64_t l = 0; l < L; ++l) {
    const bool top = l + 1 == L;
    const Tensor& steps_up = top ? Tensor() : (gru ? dgx_step[l + 1] : dgh_step[l + 1]);
    args.layer[l] = BackwardArgs{shape_of(dys[0], H, P, lengths, reverse),
                                 w_hhT[l].data_ptr(),
                                 ptr_at(w_hrT, l),
                                 top ? nullptr : w_ihT_up[l].data_ptr(),
                                 top ? nullptr : steps_up.data_ptr<float>(),
                                 dropout && !top ? masks_c[l].data_ptr() : nullptr,
                                 h0_c[l].data_ptr(),
                                 lstm ? c0_c[l].data_ptr() : nullptr,
                                 ys_c[l].data_ptr(),
                                 saved_c[l].data_ptr(),
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
    err = gemm_backward(cell.kind, dtype_of(dys), args.layer[0], w.w_hh[0], proj ? w.w_hr[0] : Tensor(),
                        gru ? dgh[0] : dgx[0], proj ? dhy[0] : Tensor(), dh_0, stream_of(dys));
  } else {
    err = run_backward(cell.kind, dtype_of(dys), args, requested, stream_of(dys), &used);
  }
  check(err, used, "backward");
  return {dgx, dgh, dhy, fresh_like(h0, dh), lstm ? fresh_like(*c0, dc) : Tensor()};
}

// Whether `layers` layers of x's dtype, H units and P outputs run persistent (forward, or backward).
bool fits_on_chip(const std::string& cell_name, const Tensor& x, int64_t H, int64_t P, int64_t layers, bool proj,
                  bool backward) {
  const c10::DeviceGuard guard(x.device());
  const CellInfo cell = cell_info(cell_name);
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

OptTensor one(const OptTensor& t) { return present(t) ? OptTensor(t->unsqueeze(0)) : std::nullopt; }
Tensor first_of(const Tensor& t) { return t.defined() ? t[0] : Tensor(); }

// One layer-direction (reference.py's layer contract): the stack of one layer. gx (T, B, G*H) as stack_forward's.
std::vector<Tensor> forward(const std::string& cell, const Tensor& gx, const Tensor& h0, const OptTensor& c0,
                            const Weights& weights, const OptTensor& lengths, bool reverse, bool save,
                            const std::string& scheme, bool poison) {
  const std::vector<Tensor> out =
      stack_forward(cell, gx, h0.unsqueeze(0), one(c0), {weights}, {}, lengths, reverse, save, scheme, poison);
  return {out[0][0], out[1][0], first_of(out[2]), save ? out[3][0] : out[3]};
}

// Its BPTT up to the epilogue: (dgx (T, B, G*H), dgh | None, dhy (T, B, P) | None, dh0 (B, P), dc0 (B, H) | None).
std::tuple<Tensor, Tensor, Tensor, Tensor, Tensor> backward(
    const std::string& cell, const Tensor& h0, const OptTensor& c0, const Weights& weights, const OptTensor& lengths,
    bool reverse, const Tensor& y, const Tensor& saved, const Tensor& dy, const Tensor& dh_n, const OptTensor& dc_n,
    const std::string& scheme, bool poison) {
  const auto [dgx, dgh, dhy, dh0, dc0] =
      stack_backward(cell, h0.unsqueeze(0), one(c0), {weights}, {}, lengths, reverse, y.unsqueeze(0),
                     saved.unsqueeze(0), dy.unsqueeze(0), dh_n.unsqueeze(0), one(dc_n), scheme, poison);
  return {dgx[0], first_of(dgh), first_of(dhy), dh0[0], first_of(dc0)};
}

// {cell: (gates, saved rows per unit)} as api.h states them.
py::dict cell_constants() {
  py::dict table;
  for (const CellConstants& c : kCells) table[c.name] = py::make_tuple(c.gates, c.saved_rows);
  return table;
}

}  // namespace
}  // namespace fusedrnn::cuda

PYBIND11_MODULE(TORCH_EXTENSION_NAME, m) {
  using namespace fusedrnn::cuda;
  m.doc() = "fusedrnn CUDA backend: persistent fused LSTM/GRU/RNN recurrences (see fusedrnn/cuda.py)";
  m.def("forward", &forward, "one layer-direction forward; see fusedrnn/csrc/cuda/binding.cpp");
  m.def("backward", &backward, "its hand-written BPTT up to the epilogue: gate gradients and dh0, dc0");
  m.def("stack_forward", &stack_forward, "a unidirectional stack's forward as one wavefront");
  m.def("stack_backward", &stack_backward, "its BPTT, one wavefront in reverse, up to the epilogue");
  m.def("fits_on_chip", &fits_on_chip, "whether a stack of this shape would run persistent");
  m.def("cell_constants", &cell_constants, "{cell: (gates, saved rows per unit)}");
  m.def("last_scheme", [] { return last_scheme_name; }, "scheme of the last kernel run");
  m.attr("max_layers") = kMaxLayers;
}
