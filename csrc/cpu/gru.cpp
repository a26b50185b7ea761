// GRU cell rows for the layer driver (recurrence.h). Gate rows r, z, n; per unit j, with
// a = x W_ih^T + b_ih (gx + b_ih) and bh = h W_hh^T + b_hh (gh + b_hh):
//   forward:  r = s(a_r + bh_r);  z = s(a_z + bh_z);  n = tanh(a_n + r bh_n);  h' = n + z (h - n)
//             ws row = [r, z, n, bh_n], each H wide.
//   backward: dn = dh (1-z)(1-n^2), dz = dh (h - n) z(1-z), dr = dn bh_n r(1-r);
//             input side (dr, dz, dn), hidden side (dr, dz, dn r); direct dL/dh_{t-1} = dh z.
//             Bounded factors first, unbounded h_{t-1} - n and bh_n last (why: lstm.cpp, reference.py).
#include "activation.h"
#include "recurrence.h"

namespace fusedrnn {

struct GruCell {
  static constexpr int64_t G = 3, WS = 4;
  static constexpr bool kSplitHidden = true;

  template <class T>
  FUSEDRNN_TARGETS static void forward_row(const ForwardRow<T>& r, int64_t n) {
    const int64_t H = r.H, L = r.ldg;
    const T *__restrict gx = r.gx, *__restrict gh = r.gh, *__restrict bx = r.bias_x, *__restrict b = r.bias;
    const T* __restrict h_prev = r.h_prev;
    T *__restrict ws = r.ws, *__restrict h = r.h;
#pragma omp simd
    for (int64_t j = 0; j < n; ++j) {
      const T rr = sigmoid(gx[j] + bx[j] + gh[j] + b[j]);
      const T z = sigmoid(gx[H + j] + bx[H + j] + gh[L + j] + b[H + j]);
      const T bn = gh[2 * L + j] + b[2 * H + j];
      const T nn = tanh_(gx[2 * H + j] + bx[2 * H + j] + rr * bn);
      ws[j] = rr;
      ws[H + j] = z;
      ws[2 * H + j] = nn;
      ws[3 * H + j] = bn;
      h[j] = nn + z * (h_prev[j] - nn);
    }
  }

  template <class T>
  FUSEDRNN_TARGETS static void backward_row(const BackwardRow<T>& r, int64_t n) {
    const int64_t H = r.H;
    const T *__restrict ws = r.ws, *__restrict h_prev = r.h_prev, *__restrict dy = r.dy;
    T *__restrict dh = r.dh, *__restrict dgx = r.dgx, *__restrict dgh = r.dgh;
#pragma omp simd
    for (int64_t j = 0; j < n; ++j) {
      const T rr = ws[j], z = ws[H + j], nn = ws[2 * H + j], bn = ws[3 * H + j];
      const T d = dh[j] + dy[j];
      const T dn = d * ((T(1) - z) * (T(1) - nn * nn));
      const T dz = d * (z * (T(1) - z)) * (h_prev[j] - nn);
      const T dr = dn * (rr * (T(1) - rr)) * bn;
      dgx[j] = dgh[j] = dr;
      dgx[H + j] = dgh[H + j] = dz;
      dgx[2 * H + j] = dn;
      dgh[2 * H + j] = dn * rr;
      dh[j] = d * z;
    }
  }
};

ForwardOut gru_forward(const Layer& l) { return forward_any<GruCell>(l); }

BackwardOut gru_backward(const Layer& l, const at::Tensor& y, const at::Tensor& ws, const at::Tensor& dy,
                         const at::Tensor& dh_n, const at::Tensor& dc_n) {
  return backward_any<GruCell>(l, y, ws, dy, dh_n, dc_n);
}

}  // namespace fusedrnn
