// LSTM cell for the fused recurrence (recurrence.cuh, gemm_step.cuh), torch's gate order i, f, g, o:
//   i, f, o = s(gx + gh) rows 0, 1, 3;  g = tanh(gx + gh) row 2      (gh = h W_hh^T + b_hh)
//   c' = f * c + i * g;  cell_out = o * tanh(c')  (h' = cell_out, or cell_out W_hr^T with proj_size, done by the
//   recurrence)
// Saved for backward, saved[t] = (i, f, g, o, c_t) with c_t the HELD cell state (c at a padded step), so that
// the next step's c_prev can be read back from it. Backward (dh = dL/dcell_out, dc = dL/dc_t carried):
//   dc_t = dc + dh * o * (1 - tanh(c')^2);  di = dc_t g i(1-i);  df = dc_t c_prev f(1-f)
//   dg = dc_t i (1-g^2);  do = dh tanh(c') o(1-o);  dc_prev = dc_t * f;  input and hidden sides share them.
#include "gemm_step.cuh"

namespace fusedrnn::cuda {

struct LstmCell {
  static constexpr int G = kLstm.gates, kSaved = kLstm.saved_rows, kCSlot = 4;
  static constexpr bool kHasC = true, kNeedsHPrev = false, kNeedsH = false, kDirect = false;

  __device__ static float forward(const float* gx, const float* gh, float, float& c, bool valid, float* act) {
    const float i = sigmoid(gx[0] + gh[0]), f = sigmoid(gx[1] + gh[1]);
    const float g = tanhf(gx[2] + gh[2]), o = sigmoid(gx[3] + gh[3]);
    const float c_new = fmaf(f, c, i * g);
    c = valid ? c_new : c;
    act[0] = i, act[1] = f, act[2] = g, act[3] = o, act[4] = c;
    return o * tanhf(c_new);
  }

  __device__ static float backward(float dh, float& dc, const float* act, float c_prev, float, float, bool valid,
                                   float* dgx, float* dgh) {
    const float i = act[0], f = act[1], g = act[2], o = act[3], tc = tanhf(act[4]);
    // Bounded factors first, unbounded states (c_prev) last: 0 * huge stays 0 where (dc * huge) * 0 could
    // overflow to inf * 0 = NaN (the reference's order).
    const float dc_t = dc + dh * (o * (1.f - tc * tc));
    dgx[0] = dgh[0] = dc_t * (i * (1.f - i) * g);
    dgx[1] = dgh[1] = dc_t * (f * (1.f - f)) * c_prev;
    dgx[2] = dgh[2] = dc_t * (i * (1.f - g * g));
    dgx[3] = dgh[3] = dh * (o * (1.f - o) * tc);
    dc = valid ? dc_t * f : dc;
    return 0.f;
  }
};

cudaError_t lstm_forward(Dtype dtype, const StackForwardArgs& a, Scheme scheme, cudaStream_t stream, Scheme* used) {
  return run_forward<LstmCell>(dtype, a, scheme, stream, used);
}

cudaError_t lstm_backward(Dtype dtype, const StackBackwardArgs& a, Scheme scheme, cudaStream_t stream, Scheme* used) {
  return run_backward<LstmCell>(dtype, a, scheme, stream, used);
}

cudaError_t lstm_gemm_forward(Dtype dtype, const ForwardArgs& a, const GemmStep& step, cudaStream_t stream) {
  return run_gemm_forward<LstmCell>(dtype, a, step, stream);
}

cudaError_t lstm_gemm_backward(Dtype dtype, const BackwardArgs& a, const GemmStep& step, cudaStream_t stream) {
  return run_gemm_backward<LstmCell>(dtype, a, step, stream);
}

cudaError_t lstm_fits_on_chip(Dtype dtype, const Shape& sh, int layers, bool proj, bool backward, bool* fits) {
  return fits_on_chip<LstmCell>(dtype, sh, layers, proj, backward, fits);
}

}  // namespace fusedrnn::cuda
