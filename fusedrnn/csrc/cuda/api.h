// Torch-free interface between the pybind11 binding (binding.cpp) and the CUDA kernels (*.cu): what the binding sees
// of the kernels, so it parses none of them.
//
// One call runs the sequential part of a STACK of L layers (L = 1: one layer in one direction, the contract
// of fusedrnn/reference.py; L > 1: its stack contract, unidirectional layers with dropout masks between
// them) as a wavefront: layer l runs its step s at super-step s + l in the forward, and at super-step
// s + (L - 1 - l) in the backward, so a stack costs T + L - 1 grid barriers instead of L * T. The layers
// above the first project their input on chip (the layer below's output, read from its float32 state
// buffer); everything that is not sequential runs as GEMMs outside: layer 0's input projection gx = x W_ih^T + b_ih
// before the forward (the binding), and after the backward, from the gate gradients the kernels write, dx, dW_ih,
// dW_hh, dW_hr and the biases' gradients (fusedrnn/epilogue.py, called by fusedrnn/cuda.py). Shapes below use
// T steps, B batch rows, H hidden units, P = proj_size or H, G gates and S = saved rows per unit (kCells).
// "elem" tensors have the layer's dtype (float32, float16 or bfloat16); state buffers are float32. Slot k of a (2, ...) buffer holds the
// value of the steps s with s % 2 == k as noted per field.
#pragma once

#include <cuda_runtime_api.h>

#include <cstdint>

namespace fusedrnn::cuda {

// Gates G and saved rows per unit of each cell, the facts fusedrnn/cells.py registers (the binding's
// cell_constants() returns them; tests/test_cuda_emulation.py pins the two tables to each other). saved rows:
// lstm i, f, g, o, c_t; gru r, z, n, gh_n; rnn none (the activation's derivative follows from y).
struct CellConstants {
  const char* name;
  int gates, saved_rows;
};
inline constexpr CellConstants kLstm{"lstm", 4, 5}, kGru{"gru", 3, 4};
inline constexpr CellConstants kRnnTanh{"rnn_tanh", 1, 0}, kRnnRelu{"rnn_relu", 1, 0};
inline constexpr CellConstants kCells[] = {kLstm, kGru, kRnnTanh, kRnnRelu};

enum class Dtype { f32, f16, bf16 };
// How the recurrence runs: one cooperative launch per sequence with the weights held in shared memory,
// or one launch per step (and phase) reading the weights from global memory. auto picks persistent
// whenever the weight slices fit on chip with every block resident at once. gemm (one layer per call, never
// picked by auto here: fusedrnn/planner.py chooses it) is driven by the binding: per step an ATen GEMM for
// the recurrent product (tensor cores through cuBLAS) and a fused pointwise kernel (gemm_step.cuh).
enum class Scheme { automatic, persistent, per_step, gemm };
// The parts of a step: the units' gates and state update, and the outputs' (projection, dL/dh) bookkeeping.
enum Phase : int { kUnits = 1, kOuts = 2, kBoth = 3 };

struct Shape {
  int T, B, H, P;
  bool reverse;             // run t = T-1 .. 0
  const int64_t* lengths;   // (B,) or nullptr: sequence b has steps t < lengths[b]; other steps hold
};

constexpr int kMaxLayers = 8;  // layers of one launch (kernel parameter space); deeper stacks go layer by layer

struct ForwardArgs {  // one layer
  Shape shape;
  const void* gx;     // elem (T, B, G*H): x W_ih^T + b_ih (layer 0), or nullptr: projected on chip from x_in
  const float* x_in;  // (2, B, P) layer l > 0: the layer below's output of step s in slot (s + 1) % 2, masked
  const void* w_ih;   // elem (G*H, P) with x_in
  const void* b_ih;   // elem (G*H,) or nullptr, with x_in
  const void* w_hh;   // elem (G*H, P)
  const void* b_hh;   // elem (G*H,) or nullptr
  const void* w_hr;   // elem (P, H) or nullptr (lstm with proj_size)
  void* y;            // elem (T, B, P) out: state after each step (held value at padded steps)
  void* saved;        // elem (T, B, S*H) out: saved for backward (see the cell files), or nullptr: not saved
  float* h;           // (2, B, P) in/out: h[0] = h0 on entry; the state after step s in slot (s + 1) % 2
  float* c;           // (B, H) in/out, lstm only: c0 on entry, c_n on exit
  float* cell_out;    // (B, H) scratch, proj only: o * tanh(c) before the projection
  const void* mask;   // elem (T, B, P) or nullptr: dropout mask between this layer and the one above
  float* x_out;       // (2, B, P) or nullptr (with mask): the output times mask, the layer above's x_in
};

struct BackwardArgs {  // one layer
  Shape shape;
  const void* w_hhT;     // elem (P, G*H): W_hh transposed
  const void* w_hrT;     // elem (H, P): W_hr transposed, or nullptr
  const void* w_ihT_up;  // elem (P, G*H): the layer above's W_ih transposed, or nullptr (top layer)
  const float* dgx_up;   // (2, B, G*H) with w_ihT_up: the layer above's dgx_step
  const void* mask;      // elem (T, B, P) or nullptr: dropout mask between this layer and the one above
  const void* h0;        // elem (B, P)
  const void* c0;        // elem (B, H), lstm only
  const void* y;         // elem (T, B, P) from the forward
  const void* saved;     // elem (T, B, S*H) from the forward
  const void* dy;        // elem (T, B, P): the gradient from outside the stack
  void* dgx;             // elem (T, B, G*H) out: grads of the input-side pre-activations (masked to 0 at padding)
  void* dgh;             // elem (T, B, G*H) out, gru only (hidden side differs): else nullptr, dgx serves both
  void* dhy;             // elem (T, B, P) out, proj only: dL/dh_t (masked), for dW_hr
  float* dh;             // (B, P) in/out: dh_n on entry, dh0 on exit
  float* dc;             // (B, H) in/out, lstm only: dc_n on entry, dc0 on exit
  float* dgh_step;       // (2, B, G*H) scratch: float32 hidden-side gate grads of backward step s in slot s % 2
  float* dgx_step;       // (2, B, G*H) or nullptr: input-side ones for the layer below, where they differ (gru)
  float* dh_step;        // (B, P) scratch: dL/dh_t of the current step
};

struct StackForwardArgs {
  int L;  // layers, <= kMaxLayers; layer[0] reads gx, the others x_in
  ForwardArgs layer[kMaxLayers];
};

struct StackBackwardArgs {
  int L;
  BackwardArgs layer[kMaxLayers];
};

// One pointwise launch of the gemm scheme (gemm_step.cuh) for one layer, whose ForwardArgs / BackwardArgs it
// takes alongside (their on-chip fields unused: gx is given, x_in, mask, cell_out, dgh_step, dgx_step, dh_step are
// nullptr). `prod` is the product the binding computed for this launch with an ATen GEMM, elem:
//   forward  kUnits: gh = h_{t-1} W_hh^T (B, G*H)        forward  kOuts: hr = cell_out W_hr^T (B, P)
//   backward kOuts or kBoth: dG_{t_next} W_hh (B, P), nullptr at the first backward step
//   backward kUnits: d_cell_out = dL/dh_t W_hr (B, H)
struct GemmStep {
  int s;             // forward step, or backward step (undoing forward step T-1-s)
  int phases;        // forward: kUnits or kOuts; backward: kOuts, kUnits, or kBoth (without proj)
  const void* prod;  // see above
  void* cell_out;    // forward kUnits with proj: elem (B, H) out, o * tanh(c) for the projection GEMM
};

// Each launcher checks every CUDA call and returns the first error (cudaErrorCooperativeLaunchTooLarge
// when a forced persistent scheme does not fit) and sets *used to the scheme it ran. The cell's own file
// defines its pair; `relu` picks the rnn's nonlinearity (else tanh).
cudaError_t lstm_forward(Dtype, const StackForwardArgs&, Scheme, cudaStream_t, Scheme* used);
cudaError_t lstm_backward(Dtype, const StackBackwardArgs&, Scheme, cudaStream_t, Scheme* used);
cudaError_t gru_forward(Dtype, const StackForwardArgs&, Scheme, cudaStream_t, Scheme* used);
cudaError_t gru_backward(Dtype, const StackBackwardArgs&, Scheme, cudaStream_t, Scheme* used);
cudaError_t rnn_forward(bool relu, Dtype, const StackForwardArgs&, Scheme, cudaStream_t, Scheme* used);
cudaError_t rnn_backward(bool relu, Dtype, const StackBackwardArgs&, Scheme, cudaStream_t, Scheme* used);
// The gemm scheme's pointwise launches (gemm_step.cuh), one per step and phase.
cudaError_t lstm_gemm_forward(Dtype, const ForwardArgs&, const GemmStep&, cudaStream_t);
cudaError_t lstm_gemm_backward(Dtype, const BackwardArgs&, const GemmStep&, cudaStream_t);
cudaError_t gru_gemm_forward(Dtype, const ForwardArgs&, const GemmStep&, cudaStream_t);
cudaError_t gru_gemm_backward(Dtype, const BackwardArgs&, const GemmStep&, cudaStream_t);
cudaError_t rnn_gemm_forward(bool relu, Dtype, const ForwardArgs&, const GemmStep&, cudaStream_t);
cudaError_t rnn_gemm_backward(bool relu, Dtype, const BackwardArgs&, const GemmStep&, cudaStream_t);
// Whether a stack of `layers` layers of this shape would run persistent (its forward, or its backward): the
// binding's automatic choice between one wavefront and one layer at a time. rnn has no proj.
cudaError_t lstm_fits_on_chip(Dtype, const Shape&, int layers, bool proj, bool backward, bool* fits);
cudaError_t gru_fits_on_chip(Dtype, const Shape&, int layers, bool proj, bool backward, bool* fits);
cudaError_t rnn_fits_on_chip(bool relu, Dtype, const Shape&, int layers, bool backward, bool* fits);

}  // namespace fusedrnn::cuda
