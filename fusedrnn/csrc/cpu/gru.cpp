// GRU cell rows for the layer drivers (forward.h, backward.h; interface: cell_rows.h). Gate rows r, z, n; per
// unit j, with
// a = x W_ih^T + b_ih (gx + b_ih) and bh = h W_hh^T + b_hh (gh + b_hh):
//   forward:  r = s(a_r + bh_r);  z = s(a_z + bh_z);  n = tanh(a_n + r bh_n);  h' = n + z (h - n)
//             saved row = [r, z, n, bh_n], each H wide.
//   backward: dn = dh (1-z)(1-n^2), dz = dh (h - n) z(1-z), dr = dn bh_n r(1-r);
//             input side (dr, dz, dn), hidden side (dr, dz, dn r); direct dL/dh_{t-1} = dh z.
//             Bounded factors first, unbounded h_{t-1} - n and bh_n last (why: lstm.cpp, reference.py).
#include "activation.h"
#include "dispatch.h"

namespace fusedrnn::cpu {

struct GruCell {
  static constexpr int64_t G = kGru.gates, kSaved = kGru.saved_rows;
  static constexpr bool kSplitHidden = true;

  template <class T>
  FUSEDRNN_TARGETS static void forward_row(const ForwardRow<T>& r, int64_t n) {
    const int64_t H = r.H, L = r.ldg;
    const T *__restrict gx = r.gx, *__restrict gh = r.gh, *__restrict bx = r.bias_x, *__restrict b = r.bias;
    const T* __restrict h_prev = r.h_prev;
    T *__restrict saved = r.saved, *__restrict h = r.h;
#pragma omp simd
    for (int64_t j = 0; j < n; ++j) {
      const T rr = sigmoid(gx[j] + bx[j] + gh[j] + b[j]);
      const T z = sigmoid(gx[H + j] + bx[H + j] + gh[L + j] + b[H + j]);
      const T bn = gh[2 * L + j] + b[2 * H + j];
      const T nn = tanh_(gx[2 * H + j] + bx[2 * H + j] + rr * bn);
      saved[j] = rr;
      saved[H + j] = z;
      saved[2 * H + j] = nn;
      saved[3 * H + j] = bn;
      h[j] = nn + z * (h_prev[j] - nn);
    }
  }

  template <class T>
  FUSEDRNN_TARGETS static void backward_row(const BackwardRow<T>& r, int64_t n) {
    const int64_t H = r.H;
    const T *__restrict saved = r.saved, *__restrict h_prev = r.h_prev, *__restrict dy = r.dy;
    T *__restrict dh = r.dh, *__restrict dgx = r.dgx, *__restrict dgh = r.dgh;
#pragma omp simd
    for (int64_t j = 0; j < n; ++j) {
      const T rr = saved[j], z = saved[H + j], nn = saved[2 * H + j], bn = saved[3 * H + j];
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

BackwardOut gru_backward(const Layer& l, const Cotangents& cot) {
  return backward_any<GruCell>(l, cot);
}

}  // namespace fusedrnn::cpu
