// LSTM cell rows for the layer drivers (forward.h, backward.h; interface: cell_rows.h). Gate rows i, f, g, o;
// per unit j:
//   forward:  i, f, o = s(gx + b_ih + gh + b_hh);  g = tanh(gx + b_ih + gh + b_hh);  c' = f c + i g;  h' = o tanh(c')
//             saved row = [i, f, g, o, c'] each H wide.
//   backward: with tc = tanh(c'), dh = dL/dh' (+ dy), dc = dL/dc' + dh o (1 - tc^2):
//             di = dc g i(1-i), df = dc c f(1-f), dg = dc i (1-g^2), do = dh tc o(1-o);  dL/dc = dc f.
//             h_{t-1} gets dG W_hh only (no direct term); with proj, dh arrives through W_hr.
//             The bounded factors (gates, their derivatives) multiply first and the unbounded state c_{t-1}
//             last, as in reference.py: a saturated gate's exact 0 then cancels a huge state (0 * 1e30 = 0)
//             instead of (dc * 1e30 * 1e30) overflowing to inf and inf * 0 = NaN.
#include "activation.h"
#include "dispatch.h"

namespace fusedrnn::cpu {

struct LstmCell {
  static constexpr int64_t G = kLstm.gates, kSaved = kLstm.saved_rows;
  static constexpr bool kSplitHidden = false;

  template <class T>
  FUSEDRNN_TARGETS static void forward_row(const ForwardRow<T>& r, int64_t n) {
    const int64_t H = r.H, L = r.ldg;
    const T *__restrict gx = r.gx, *__restrict gh = r.gh, *__restrict bx = r.bias_x, *__restrict b = r.bias;
    const T* __restrict c_prev = r.c_prev;
    T *__restrict saved = r.saved, *__restrict h = r.h;
#pragma omp simd
    for (int64_t j = 0; j < n; ++j) {
      const T i = sigmoid(gx[j] + bx[j] + gh[j] + b[j]);
      const T f = sigmoid(gx[H + j] + bx[H + j] + gh[L + j] + b[H + j]);
      const T g = tanh_(gx[2 * H + j] + bx[2 * H + j] + gh[2 * L + j] + b[2 * H + j]);
      const T o = sigmoid(gx[3 * H + j] + bx[3 * H + j] + gh[3 * L + j] + b[3 * H + j]);
      const T c = f * c_prev[j] + i * g;
      saved[j] = i;
      saved[H + j] = f;
      saved[2 * H + j] = g;
      saved[3 * H + j] = o;
      saved[4 * H + j] = c;
      h[j] = o * tanh_(c);
    }
  }

  template <class T>
  FUSEDRNN_TARGETS static void backward_row(const BackwardRow<T>& r, int64_t n) {
    const int64_t H = r.H;
    const T *__restrict saved = r.saved, *__restrict c_prev = r.c_prev, *__restrict dy = r.dy;
    T *__restrict dh = r.dh, *__restrict dc = r.dc, *__restrict dg = r.dgx, *__restrict cell_out = r.cell_out;
#pragma omp simd
    for (int64_t j = 0; j < n; ++j) {
      const T i = saved[j], f = saved[H + j], g = saved[2 * H + j], o = saved[3 * H + j], tc = tanh_(saved[4 * H + j]);
      const T d = dh[j] + dy[j];
      const T dct = dc[j] + d * (o * (T(1) - tc * tc));
      dg[j] = dct * (i * (T(1) - i) * g);
      dg[H + j] = dct * (f * (T(1) - f)) * c_prev[j];
      dg[2 * H + j] = dct * (i * (T(1) - g * g));
      dg[3 * H + j] = d * (o * (T(1) - o) * tc);
      dc[j] = dct * f;
      dh[j] = T(0);
    }
    if (cell_out)
      for (int64_t j = 0; j < n; ++j) cell_out[j] = saved[3 * H + j] * tanh_(saved[4 * H + j]);
  }
};

ForwardOut lstm_forward(const Layer& l) { return forward_any<LstmCell>(l); }

BackwardOut lstm_backward(const Layer& l, const Cotangents& cot) {
  return backward_any<LstmCell>(l, cot);
}

}  // namespace fusedrnn::cpu
