// LSTM cell rows for the layer driver (recurrence.h). Gate rows i, f, g, o; per unit j:
//   forward:  i, f, o = s(gx + b_ih + gh + b_hh);  g = tanh(gx + b_ih + gh + b_hh);  c' = f c + i g;  h' = o tanh(c')
//             ws row = [i, f, g, o, c'] each H wide.
//   backward: with tc = tanh(c'), dh = dL/dh' (+ dy), dc = dL/dc' + dh o (1 - tc^2):
//             di = dc g i(1-i), df = dc c f(1-f), dg = dc i (1-g^2), do = dh tc o(1-o);  dL/dc = dc f.
//             h_{t-1} gets dG W_hh only (no direct term); with proj, dh arrives through W_hr.
//             The bounded factors (gates, their derivatives) multiply first and the unbounded state c_{t-1}
//             last, as in reference.py: a saturated gate's exact 0 then cancels a huge state (0 * 1e30 = 0)
//             instead of (dc * 1e30 * 1e30) overflowing to inf and inf * 0 = NaN.
#include "activation.h"
#include "recurrence.h"

namespace fusedrnn {

struct LstmCell {
  static constexpr int64_t G = 4, WS = 5;
  static constexpr bool kSplitHidden = false;

  template <class T>
  FUSEDRNN_TARGETS static void forward_row(const ForwardRow<T>& r, int64_t n) {
    const int64_t H = r.H, L = r.ldg;
    const T *__restrict gx = r.gx, *__restrict gh = r.gh, *__restrict bx = r.bias_x, *__restrict b = r.bias;
    const T* __restrict c_prev = r.c_prev;
    T *__restrict ws = r.ws, *__restrict h = r.h;
#pragma omp simd
    for (int64_t j = 0; j < n; ++j) {
      const T i = sigmoid(gx[j] + bx[j] + gh[j] + b[j]);
      const T f = sigmoid(gx[H + j] + bx[H + j] + gh[L + j] + b[H + j]);
      const T g = tanh_(gx[2 * H + j] + bx[2 * H + j] + gh[2 * L + j] + b[2 * H + j]);
      const T o = sigmoid(gx[3 * H + j] + bx[3 * H + j] + gh[3 * L + j] + b[3 * H + j]);
      const T c = f * c_prev[j] + i * g;
      ws[j] = i;
      ws[H + j] = f;
      ws[2 * H + j] = g;
      ws[3 * H + j] = o;
      ws[4 * H + j] = c;
      h[j] = o * tanh_(c);
    }
  }

  template <class T>
  FUSEDRNN_TARGETS static void backward_row(const BackwardRow<T>& r, int64_t n) {
    const int64_t H = r.H;
    const T *__restrict ws = r.ws, *__restrict c_prev = r.c_prev, *__restrict dy = r.dy;
    T *__restrict dh = r.dh, *__restrict dc = r.dc, *__restrict dg = r.dgx, *__restrict ht = r.htilde;
#pragma omp simd
    for (int64_t j = 0; j < n; ++j) {
      const T i = ws[j], f = ws[H + j], g = ws[2 * H + j], o = ws[3 * H + j], tc = tanh_(ws[4 * H + j]);
      const T d = dh[j] + dy[j];
      const T dct = dc[j] + d * (o * (T(1) - tc * tc));
      dg[j] = dct * (i * (T(1) - i) * g);
      dg[H + j] = dct * (f * (T(1) - f)) * c_prev[j];
      dg[2 * H + j] = dct * (i * (T(1) - g * g));
      dg[3 * H + j] = d * (o * (T(1) - o) * tc);
      dc[j] = dct * f;
      dh[j] = T(0);
    }
    if (ht)
      for (int64_t j = 0; j < n; ++j) ht[j] = ws[3 * H + j] * tanh_(ws[4 * H + j]);
  }
};

ForwardOut lstm_forward(const Layer& l) { return forward_any<LstmCell>(l); }

BackwardOut lstm_backward(const Layer& l, const at::Tensor& y, const at::Tensor& ws, const at::Tensor& dy,
                          const at::Tensor& dh_n, const at::Tensor& dc_n) {
  return backward_any<LstmCell>(l, y, ws, dy, dh_n, dc_n);
}

}  // namespace fusedrnn
