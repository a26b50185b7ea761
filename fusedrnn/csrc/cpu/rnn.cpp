// Elman RNN cell rows for the layer driver (forward.h, backward.h; interface: cell_rows.h), tanh or relu:
//   forward:  h' = act(gx + b_ih + gh + b_hh)      (nothing saved: act' follows from h')
//   backward: dpre = dh (1 - h'^2) for tanh, (h' <= 0 ? 0 : dh) for relu; no direct dL/dh_{t-1} term.
// relu is written so that NaN propagates as in torch: relu(NaN) = NaN, and a NaN h' passes dh on
// (torch's threshold_backward, reference.py's _rnn_gate_grads).
#include "activation.h"
#include "dispatch.h"

namespace fusedrnn::cpu {

template <bool Relu>
struct RnnCell {
  static constexpr int64_t G = kRnnTanh.gates, kSaved = kRnnTanh.saved_rows;  // rnn_relu's are the same (api.h)
  static constexpr bool kSplitHidden = false;

  template <class T>
  FUSEDRNN_TARGETS static void forward_row(const ForwardRow<T>& r, int64_t n) {
    const T *__restrict gx = r.gx, *__restrict gh = r.gh, *__restrict bx = r.bias_x, *__restrict b = r.bias;
    T* __restrict h = r.h;
#pragma omp simd
    for (int64_t j = 0; j < n; ++j) {
      const T pre = gx[j] + bx[j] + gh[j] + b[j];
      h[j] = Relu ? (pre < T(0) ? T(0) : pre) : tanh_(pre);
    }
  }

  template <class T>
  FUSEDRNN_TARGETS static void backward_row(const BackwardRow<T>& r, int64_t n) {
    const T *__restrict h = r.h, *__restrict dy = r.dy;
    T *__restrict dh = r.dh, *__restrict dg = r.dgx;
#pragma omp simd
    for (int64_t j = 0; j < n; ++j) {
      const T d = dh[j] + dy[j];
      dg[j] = Relu ? (h[j] <= T(0) ? T(0) : d) : d * (T(1) - h[j] * h[j]);
      dh[j] = T(0);
    }
  }
};

ForwardOut rnn_forward(const Layer& l, bool relu) {
  return relu ? forward_any<RnnCell<true>>(l) : forward_any<RnnCell<false>>(l);
}

BackwardOut rnn_backward(const Layer& l, const Cotangents& cot, bool relu) {
  return relu ? backward_any<RnnCell<true>>(l, cot) : backward_any<RnnCell<false>>(l, cot);
}

}  // namespace fusedrnn::cpu
