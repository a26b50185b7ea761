// Elman RNN cell for the fused recurrence (recurrence.cuh, gemm_step.cuh):
//   h' = tanh|relu(gx + gh), gh = h W_hh^T + b_hh.
// Nothing saved (saved has width 0): the derivative follows from y[t] = h':  tanh' = 1 - h'^2,
// relu' = [h' > 0] except that a NaN h' passes the gradient on. relu(NaN) stays NaN. Both as in torch.
#include "gemm_step.cuh"

namespace fusedrnn::cuda {

template <bool kRelu>
struct RnnCell {
  static constexpr int G = kRnnTanh.gates, kSaved = kRnnTanh.saved_rows, kCSlot = 0;  // = rnn_relu's
  static constexpr bool kHasC = false, kNeedsHPrev = false, kNeedsH = true, kDirect = false;

  __device__ static float forward(const float* gx, const float* gh, float, float&, bool, float*) {
    const float pre = gx[0] + gh[0];
    return kRelu ? (pre < 0.f ? 0.f : pre) : tanhf(pre);
  }

  __device__ static float backward(float dh, float&, const float*, float, float, float h, bool, float* dgx,
                                   float* dgh) {
    dgx[0] = dgh[0] = kRelu ? (h <= 0.f ? 0.f : dh) : dh * (1.f - h * h);  // relu: a NaN h passes dh, as torch
    return 0.f;
  }
};

cudaError_t rnn_forward(bool relu, Dtype dtype, const StackForwardArgs& a, Scheme scheme, cudaStream_t stream,
                        Scheme* used) {
  return relu ? run_forward<RnnCell<true>>(dtype, a, scheme, stream, used)
              : run_forward<RnnCell<false>>(dtype, a, scheme, stream, used);
}

cudaError_t rnn_backward(bool relu, Dtype dtype, const StackBackwardArgs& a, Scheme scheme, cudaStream_t stream,
                         Scheme* used) {
  return relu ? run_backward<RnnCell<true>>(dtype, a, scheme, stream, used)
              : run_backward<RnnCell<false>>(dtype, a, scheme, stream, used);
}

cudaError_t rnn_gemm_forward(bool relu, Dtype dtype, const ForwardArgs& a, const GemmStep& step, cudaStream_t stream) {
  return relu ? run_gemm_forward<RnnCell<true>>(dtype, a, step, stream)
              : run_gemm_forward<RnnCell<false>>(dtype, a, step, stream);
}

cudaError_t rnn_gemm_backward(bool relu, Dtype dtype, const BackwardArgs& a, const GemmStep& step,
                              cudaStream_t stream) {
  return relu ? run_gemm_backward<RnnCell<true>>(dtype, a, step, stream)
              : run_gemm_backward<RnnCell<false>>(dtype, a, step, stream);
}

cudaError_t rnn_fits_on_chip(bool relu, Dtype dtype, const Shape& sh, int layers, bool backward, bool* fits) {
  return relu ? fits_on_chip<RnnCell<true>>(dtype, sh, layers, false, backward, fits)
              : fits_on_chip<RnnCell<false>>(dtype, sh, layers, false, backward, fits);
}

}  // namespace fusedrnn::cuda
