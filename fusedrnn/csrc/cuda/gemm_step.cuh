// The gemm scheme: the recurrent products run as ATen GEMMs in the binding (cuBLAS on torch's current stream,
// so tensor cores and torch's TF32 / reduced-precision settings), everything else in one fused pointwise kernel
// per step and phase, one thread per (batch row, unit). Past the latency-bound regime (large B, or H = 1024)
// the per-step product B x P x G*H is throughput-bound, and FP32 FMA loops cannot keep up with tensor cores.
//
// Forward step s (t = time_of(s)), the binding's part in [brackets]:
//   [gh = h_{t-1} W_hh^T]  kUnits: gates from gx[t] + gh + b_hh, the cell -> c, saved[t]; h_t (emit) or,
//   with proj, cell_out  [hr = cell_out W_hr^T]  kOuts: h_t = hr (emit: hold at padded steps, y[t], the float32 state).
// Backward step s undoes forward step t = time_of(T-1-s); t_next is the step undone just before:
//   [dh_rec = dG_{t_next} W_hh]  kOuts: dh_t = dh + dh_rec + dy[t], dhy[t], carry  [d_cell_out = dhy[t] W_hr]
//   kUnits: the cell's backward -> dgx[t], dgh[t], dc, gru's direct path. Without proj (P == H) both phases
//   run in one launch (kBoth), each thread doing its (b, j)'s outs then its units: no barrier needed.
//   After the last step the binding adds dG_{t_0} W_hh into dh: dh0.
// The per-unit bodies are recurrence.cuh's (emit_state, unit_forward, out_backward, unit_backward), shared with
// the persistent and per-step schemes.
#pragma once

#include "recurrence.cuh"

namespace fusedrnn::cuda {

constexpr int kMaxPointwiseBlocks = 4096;  // grid-stride beyond: 1M threads already fill any GPU

template <class Cell, class T>
__global__ void __launch_bounds__(kThreads) gemm_forward_kernel(const __grid_constant__ ForwardArgs a, GemmStep g) {
  constexpr int G = Cell::G;
  const Shape& sh = a.shape;
  const int t = time_of(sh, g.s), H = sh.H, P = sh.P, GH = G * H;
  const bool units = g.phases & kUnits;
  const int n = units ? H : P;
  const T* prod = static_cast<const T*>(g.prod);
  const T* gx = static_cast<const T*>(a.gx);
  const T* b_hh = static_cast<const T*>(a.b_hh);
  const int total = sh.B * n;
  for (int idx = blockIdx.x * blockDim.x + threadIdx.x; idx < total; idx += gridDim.x * blockDim.x) {
    const int b = idx / n, u = idx - b * n;
    if (!units) {
      emit_state<T>(a, g.s, t, b, u, to_float(prod[static_cast<size_t>(b) * P + u]));
      continue;
    }
    float gxv[G], ghv[G];
#pragma unroll
    for (int k = 0; k < G; ++k) {
      gxv[k] = to_float(gx[at(sh, t, b, GH) + k * H + u]);
      ghv[k] = to_float(prod[static_cast<size_t>(b) * GH + k * H + u]) + (b_hh ? to_float(b_hh[k * H + u]) : 0.f);
    }
    const float cell_out = unit_forward<Cell, T>(a, g.s, t, b, u, gxv, ghv);
    if (g.cell_out)
      static_cast<T*>(g.cell_out)[static_cast<size_t>(b) * H + u] = from_float<T>(cell_out);
    else
      emit_state<T>(a, g.s, t, b, u, cell_out);
  }
}

template <class Cell, class T>
__global__ void __launch_bounds__(kThreads) gemm_backward_kernel(const __grid_constant__ BackwardArgs a, GemmStep g) {
  const Shape& sh = a.shape;
  const int t = time_of(sh, sh.T - 1 - g.s), P = sh.P;
  const bool outs = g.phases & kOuts, units = g.phases & kUnits;
  const int n = outs ? P : sh.H;  // kBoth only without proj: P == H
  const T* prod = static_cast<const T*>(g.prod);
  const T* dy = static_cast<const T*>(a.dy);
  const int total = sh.B * n;
  for (int idx = blockIdx.x * blockDim.x + threadIdx.x; idx < total; idx += gridDim.x * blockDim.x) {
    const int b = idx / n, u = idx - b * n;
    float d_cell_out = 0.f;
    if (outs) {
      const size_t i = static_cast<size_t>(b) * P + u;
      const float dh = a.dh[i] + (prod ? to_float(prod[i]) : 0.f);
      d_cell_out = out_backward<T>(a, t, b, u, dh, to_float(dy[at(sh, t, b, P) + u]));
    } else {
      d_cell_out = to_float(prod[static_cast<size_t>(b) * sh.H + u]);
    }
    if (units) unit_backward<Cell, T>(a, t, b, u, d_cell_out, nullptr, nullptr);
  }
}

// One pointwise launch over the batch rows times the phase's units (kUnits) or outputs (kOuts).
template <class Kernel, class Args>
cudaError_t launch_gemm_step(Kernel kernel, const Args& args, const GemmStep& step, int width, cudaStream_t stream) {
  const Shape& sh = args.shape;
  if (sh.T == 0 || sh.B == 0) return cudaSuccess;
  const int blocks = imin(ceil_div(sh.B * width, kThreads), kMaxPointwiseBlocks);
  Args a = args;
  GemmStep g = step;
  void* params[] = {&a, &g};
  return cudaLaunchKernel(reinterpret_cast<const void*>(kernel), blocks, kThreads, params, 0, stream);
}

template <class Cell>
cudaError_t run_gemm_forward(Dtype dtype, const ForwardArgs& a, const GemmStep& step, cudaStream_t stream) {
  return by_dtype(dtype, [&](auto tag) {
    using T = decltype(tag);
    return launch_gemm_step(gemm_forward_kernel<Cell, T>, a, step, step.phases & kUnits ? a.shape.H : a.shape.P,
                            stream);
  });
}

template <class Cell>
cudaError_t run_gemm_backward(Dtype dtype, const BackwardArgs& a, const GemmStep& step, cudaStream_t stream) {
  return by_dtype(dtype, [&](auto tag) {
    using T = decltype(tag);
    return launch_gemm_step(gemm_backward_kernel<Cell, T>, a, step, step.phases & kOuts ? a.shape.P : a.shape.H,
                            stream);
  });
}

}  // namespace fusedrnn::cuda
