// GRU cell for the fused recurrence (recurrence.cuh, gemm_step.cuh), torch's gate order r, z, n and reset-gate form:
//   r = s(gx_r + gh_r);  z = s(gx_z + gh_z);  n = tanh(gx_n + r * gh_n)   (gh = h W_hh^T + b_hh, so r
//   multiplies the hidden product AND its bias);  h' = (1 - z) * n + z * h = n + z * (h - n)
// Saved for backward, saved[t] = (r, z, n, gh_n). Backward (dh = dL/dh'):
//   dn = dh (1-z)(1-n^2);  dz = dh (h - n) z(1-z);  dr = dn gh_n r(1-r)
//   input side (dr, dz, dn); hidden side (dr, dz, dn * r); direct path dh_prev += dh * z.
#include "gemm_step.cuh"

namespace fusedrnn::cuda {

struct GruCell {
  static constexpr int G = kGru.gates, kSaved = kGru.saved_rows, kCSlot = 0;
  static constexpr bool kHasC = false, kNeedsHPrev = true, kNeedsH = false, kDirect = true;

  __device__ static float forward(const float* gx, const float* gh, float h_prev, float&, bool, float* act) {
    const float r = sigmoid(gx[0] + gh[0]), z = sigmoid(gx[1] + gh[1]);
    const float n = tanhf(fmaf(r, gh[2], gx[2]));
    act[0] = r, act[1] = z, act[2] = n, act[3] = gh[2];
    return fmaf(z, h_prev - n, n);
  }

  __device__ static float backward(float dh, float&, const float* act, float, float h_prev, float, bool,
                                   float* dgx, float* dgh) {
    const float r = act[0], z = act[1], n = act[2], gh_n = act[3];
    const float dn = dh * ((1.f - z) * (1.f - n * n));  // bounded factors first, as in lstm_cell.cu
    dgx[0] = dgh[0] = dn * (r * (1.f - r)) * gh_n;
    dgx[1] = dgh[1] = dh * (z * (1.f - z)) * (h_prev - n);
    dgx[2] = dn;
    dgh[2] = dn * r;
    return dh * z;
  }
};

cudaError_t gru_forward(Dtype dtype, const StackForwardArgs& a, Scheme scheme, cudaStream_t stream, Scheme* used) {
  return run_forward<GruCell>(dtype, a, scheme, stream, used);
}

cudaError_t gru_backward(Dtype dtype, const StackBackwardArgs& a, Scheme scheme, cudaStream_t stream, Scheme* used) {
  return run_backward<GruCell>(dtype, a, scheme, stream, used);
}

cudaError_t gru_gemm_forward(Dtype dtype, const ForwardArgs& a, const GemmStep& step, cudaStream_t stream) {
  return run_gemm_forward<GruCell>(dtype, a, step, stream);
}

cudaError_t gru_gemm_backward(Dtype dtype, const BackwardArgs& a, const GemmStep& step, cudaStream_t stream) {
  return run_gemm_backward<GruCell>(dtype, a, step, stream);
}

cudaError_t gru_fits_on_chip(Dtype dtype, const Shape& sh, int layers, bool proj, bool backward, bool* fits) {
  return fits_on_chip<GruCell>(dtype, sh, layers, proj, backward, fits);
}

}  // namespace fusedrnn::cuda
