// The forward layer drivers: one call runs one layer in one direction over the whole sequence.
//
//   gx = x W_ih^T (+ b_ih, added in the cell rows)      for all T steps as one GEMM first, or per step inside the
//                                                        loop (split.h's project_per_step)
//   per step t: gates = h_{t-1} W_hh^T (gemm.h, packed weight panels), then ONE fused pass of the cell's
//   nonlinearities and state update (Cell::forward_row) writing h_t into y[t] and its activations into saved[t];
//   with proj_size, y[t] = cell_out W_hr^T where cell_out = o * tanh(c_t).
// Two drivers: forward_layer (packed panels, one OpenMP team for the whole sequence, split.h) and forward_direct
// (small calls: ATen GEMMs on the weights as stored, the cell rows on the calling thread or, for large steps, a team
// splitting each step by units).
// Variable lengths: row b only has steps t < lengths[b]; elsewhere the state is held (h_t = h_{t-1},
// c_t = c_{t-1}: copied, never computed, so NaN in padding cannot leak).
// Temporaries live in per-thread scratch buffers (scratch.h); without save (no backward follows) only two steps
// of `saved` are kept.
#pragma once

#include <ATen/ATen.h>
#include <ATen/Parallel.h>
#include <omp.h>

#include <algorithm>

#include "cell_rows.h"
#include "common.h"
#include "gemm.h"
#include "layer.h"
#include "scratch.h"
#include "split.h"

namespace fusedrnn::cpu {

// One step's cell rows as both forward drivers (packed panels, and direct for small calls) run them once the step's
// products are in gx and gates. Row b of each operand starts at its pointer + b * its row stride.
template <class T>
struct StepRows {
  const T* gx;     // x_t W_ih^T without b_ih: (B, G*H)
  const T* gates;  // h_{t-1} W_hh^T: row stride gates_ld, gate k of unit j at [k * ldg + j]
  int64_t gates_ld, ldg;
  const T *bias_x, *bias;  // b_ih, b_hh (zeros where absent): (G*H)
  const T* h_prev;         // (B, P)
  const T* c_prev;         // lstm: c_{t-1}, row stride c_ld; else null
  int64_t c_ld;
  T* saved;  // this step's saved activations: (B, kSaved*H)
  T* h_out;  // h_t, row stride h_ld: y_t, or o * tanh(c_t) (B, H) before W_hr with proj
  int64_t h_ld;
  const int64_t* lengths;
  int64_t t, H, GH, P;
  bool proj;
};

// Rows [b0, b1), units [u0, u1) of one step.
template <class Cell, class T>
void forward_rows(const StepRows<T>& st, int64_t b0, int64_t b1, int64_t u0, int64_t u1) {
  constexpr int64_t S = Cell::kSaved;
  const int64_t H = st.H;
  for (int64_t b = b0; b < b1; ++b) {
    const T* c_prev = st.c_prev ? st.c_prev + b * st.c_ld : nullptr;
    const T* h_prev = st.h_prev + b * st.P;
    T *saved_row = st.saved + b * S * H, *h_out = st.h_out + b * st.h_ld;
    if (!has_step(st.lengths, b, st.t)) {  // held: h_t = h_{t-1}, c_t = c_{t-1}; no activations to save
      for (int64_t k = 0; k < S; ++k) std::fill(saved_row + k * H + u0, saved_row + k * H + u1, T(0));
      if (c_prev) std::copy(c_prev + u0, c_prev + u1, saved_row + 4 * H + u0);
      if (st.proj) std::fill(h_out + u0, h_out + u1, T(0));  // y's row is restored after W_hr (restore_held)
      else std::copy(h_prev + u0, h_prev + u1, h_out + u0);
      continue;
    }
    ForwardRow<T> row{st.gx + b * st.GH + u0, st.gates + b * st.gates_ld + u0, st.bias_x + u0, st.bias + u0,
                      h_prev + u0, c_prev ? c_prev + u0 : nullptr, saved_row + u0, h_out + u0, H, st.ldg};
    Cell::forward_row(row, u1 - u0);
  }
}

// With proj: y_t's columns [p0, p1) of held rows in [b0, b1) go back to h_{t-1}'s after W_hr.
template <class T>
void restore_held(const StepRows<T>& st, T* y_t, int64_t b0, int64_t b1, int64_t p0, int64_t p1) {
  for (int64_t b = b0; b < b1; ++b) {
    const T* h_prev = st.h_prev + b * st.P;
    if (!has_step(st.lengths, b, st.t)) std::copy(h_prev + p0, h_prev + p1, y_t + b * st.P + p0);
  }
}

// What both forward drivers share: y, saved (or, without save, a two-step ring of it: step s's activations go to slot
// s % 2, the LSTM reads c_{t-1} there), the biases (zeros where absent) and, with proj, o * tanh(c_t) of one step.
template <class Cell, class T>
struct ForwardBuffers {
  static constexpr int64_t G = Cell::G, S = Cell::kSaved;
  const Layer& l;
  int64_t steps, B, H, P;
  TimeOrder order;
  at::Tensor y, saved, bias_x, bias, cell_out;

  explicit ForwardBuffers(const Layer& layer)
      : l(layer), steps(l.x.size(0)), B(l.x.size(1)), H(l.w_hh.size(0) / G), P(l.h0.size(1)),
        order{steps, l.reverse} {
    const auto options = l.x.options();
    const at::Tensor zeros = l.b_ih.defined() && l.b_hh.defined() ? at::Tensor() : at::zeros({G * H}, options);
    bias_x = l.b_ih.defined() ? l.b_ih : zeros;
    bias = l.b_hh.defined() ? l.b_hh : zeros;
    y = pooled_empty({steps, B, P}, options);
    saved = l.save ? pooled_empty({steps, B, S * H}, options) : scratch(Slot::kState, {2, B, S * H}, options);
    if (l.w_hr.defined()) cell_out = scratch(Slot::kCellOut, {B, H}, options);
  }

  T* saved_step(int64_t s) const { return saved.data_ptr<T>() + (l.save ? order.at(s) : s % 2) * B * S * H; }
  const T* h_prev(int64_t s) const { return s == 0 ? l.h0.data_ptr<T>() : y.data_ptr<T>() + order.at(s - 1) * B * P; }
  T* y_step(int64_t s) const { return y.data_ptr<T>() + order.at(s) * B * P; }

  // Step s's rows, given where its products are.
  StepRows<T> step(int64_t s, const T* gx_t, const T* gates, int64_t gates_ld, int64_t ldg) const {
    const bool first = s == 0, proj = cell_out.defined();
    const T* c_prev = G != 4 ? nullptr : first ? l.c0.data_ptr<T>() : saved_step(s - 1) + 4 * H;
    return {gx_t, gates, gates_ld, ldg, bias_x.data_ptr<T>(), bias.data_ptr<T>(), h_prev(s), c_prev,
            first ? H : S * H, saved_step(s), proj ? cell_out.data_ptr<T>() : y_step(s), proj ? H : P,
            ptr_or_null<int64_t>(l.lengths), order.at(s), H, G * H, P, proj};
  }

  ForwardOut finish() const {
    const int64_t last = order.at(steps - 1);
    at::Tensor c_n = G == 4 ? saved[l.save ? last : (steps - 1) % 2].narrow(1, 4 * H, H).clone() : at::Tensor();
    return {y, y[last].clone(), maybe(c_n), l.save ? saved : at::empty({0}, y.options())};
  }
};

template <class Cell, class T>
ForwardOut forward_layer(const Layer& l) {
  constexpr int64_t NR = kPanel<T>, G = Cell::G;
  ForwardBuffers<Cell, T> out(l);
  const int64_t steps = out.steps, B = out.B, I = l.x.size(2), H = out.H, P = out.P, GH = G * H;
  const bool proj = l.w_hr.defined();
  const auto options = l.x.options();
  const int64_t Hpad = ceil_div(H, NR) * NR;
  const Split<T> split(B, H, P, 0, G * Hpad * (I + P) + (proj ? ceil_div(P, NR) * NR * H : 0));
  const bool per_step =
      split.by_rows || project_per_step<T>(B, I, P, ceil_div(split.unit_panels, split.team) * NR * G);
  // gx rows have G*H columns: this step's B rows (per_step; each worker fills its own part) or all T*B.
  at::Tensor gx = scratch(Slot::kSequence, {per_step ? B : steps * B, GH}, options);
  if (!per_step) at::mm_out(gx, l.x.reshape({steps * B, I}), l.w_ih.t());
  at::Tensor w_ih_panels =
      per_step ? scratch(Slot::kPackInput, {split.unit_panels * G * I * NR}, options) : at::Tensor();
  at::Tensor gates = scratch(Slot::kGates, {B, G * Hpad}, options);  // gates[b][k * Hpad + j] = (h W_hh^T)[b][k*H+j]
  at::Tensor w_hh_panels = scratch(Slot::kPack, {split.unit_panels * G * P * NR}, options);
  at::Tensor w_hr_panels = proj ? scratch(Slot::kPackProj, {split.col_panels * H * NR}, options) : at::Tensor();

  const T *x_data = l.x.data_ptr<T>(), *w_ih = l.w_ih.data_ptr<T>(), *w_hh = l.w_hh.data_ptr<T>();
  const T* w_hr = ptr_or_null<T>(l.w_hr);
  T *gates_p = gates.data_ptr<T>(), *w_hh_packed = w_hh_panels.data_ptr<T>();
  T* w_hr_packed = ptr_or_null<T>(w_hr_panels);
  T *cell_out = ptr_or_null<T>(out.cell_out), *gx_p = gx.data_ptr<T>(), *w_ih_packed = ptr_or_null<T>(w_ih_panels);

#pragma omp parallel num_threads(split.team)
  {
    const Work w = split.work(omp_get_thread_num(), omp_get_num_threads(), B);
    const int64_t r0 = w.rows.begin, rows = w.rows.end - w.rows.begin;
    for (int64_t q = w.pack_units.begin; q < w.pack_units.end; ++q)
      for (int64_t k = 0; k < G; ++k) {
        const int64_t n0 = k * H + q * NR, width = std::min(NR, H - q * NR);
        pack_panel(w_hh, P, true, P, n0, width, w_hh_packed + (q * G + k) * P * NR);
        if (per_step) pack_panel(w_ih, I, true, I, n0, width, w_ih_packed + (q * G + k) * I * NR);
      }
    for (int64_t q = w.pack_cols.begin; q < w.pack_cols.end && proj; ++q)
      pack_panel(w_hr, H, true, H, q * NR, std::min(NR, P - q * NR), w_hr_packed + q * H * NR);
    if (split.by_rows) {
#pragma omp barrier
    }

    for (int64_t s = 0; s < steps; ++s) {
      const int64_t t = out.order.at(s);
      const T* h_prev = out.h_prev(s);
      T* y_t = out.y_step(s);
      const StepRows<T> st = out.step(s, per_step ? gx_p : gx_p + t * B * GH, gates_p, G * Hpad, Hpad);
      // Panel by panel: a unit block's gates are still in L1 when its cell rows read them.
      for (int64_t q = w.units.begin; q < w.units.end; ++q) {
        const int64_t u0 = q * NR, u1 = std::min(u0 + NR, H);
        for (int64_t k = 0; k < G; ++k) {
          if (per_step)
            gemm_panel(rows, I, x_data + (t * B + r0) * I, I, w_ih_packed + (q * G + k) * I * NR,
                       gx_p + r0 * GH + k * H + u0, GH, u1 - u0, false);
          gemm_panel(rows, P, h_prev + r0 * P, P, w_hh_packed + (q * G + k) * P * NR,
                     gates_p + r0 * G * Hpad + k * Hpad + u0, G * Hpad, NR, false);
        }
        forward_rows<Cell>(st, w.rows.begin, w.rows.end, u0, u1);
      }
      if (proj) {
        if (!split.by_rows) {
#pragma omp barrier
        }
        for (int64_t q = w.cols.begin; q < w.cols.end; ++q) {
          const int64_t p0 = q * NR, width = std::min(NR, P - p0);
          gemm_panel(rows, H, cell_out + r0 * H, H, w_hr_packed + q * H * NR, y_t + r0 * P + p0, P, width, false);
          restore_held(st, y_t, w.rows.begin, w.rows.end, p0, p0 + width);
        }
      }
      if (!split.by_rows) {
#pragma omp barrier
      }
    }
  }
  return out.finish();
}

// Small calls (a decode step, a few steps of a small batch): packing W's panels, and starting a thread team that then
// meets at a barrier every step, cost more here than they save, so this driver multiplies by the weights as stored
// through ATen (MKL, as torch.nn does) and runs only the cell rows itself. Nothing is packed, so nothing is kept
// between calls and no cache of packed weights can go stale.
// Where a step's products are large (kDirectTeamMacs), MKL alone does not use the second core well at these shapes
// (B = 32, 256 x 1024: the same speed on one thread as on two), so the team splits each step by units as the
// packed driver does: worker k multiplies by its units' rows of every gate block of W (which stay in its cache) and
// runs their cell rows; the team meets at a barrier every step. Smaller calls run on the calling thread, the cell
// rows too unless a step has more than kRowUnits units.
constexpr int64_t kRowUnits = int64_t(1) << 14;
constexpr int64_t kDirectTeamMacs = int64_t(1) << 18;

// Whether a call is small enough for forward_direct: at most kDirectRows (t, b) rows in all, or at most two steps
// unless the packed driver's kernel outruns MKL there even over one or two steps (measured:
// bench/results/cpp_notes.md, "Scheduling heuristics"): with a team, where a step's products are large
// (kPackedMacs multiply-adds), each worker's share of the panels fits its L2, and each worker's share of the units
// is narrow (kTeamUnits or fewer: the direct driver's team would then run G narrow MKL products a step).
// x: (steps, B, I); G*H rows of W; K = I + P.
constexpr int64_t kDirectRows = 16;
constexpr int64_t kPackedMacs = int64_t(1) << 23;
constexpr int64_t kTeamUnits = 128;

template <class T>
bool direct_pays(int64_t steps, int64_t B, int64_t G, int64_t H, int64_t K) {
  if (steps * B <= kDirectRows) return true;
  if (steps > 2) return false;
  const int64_t team = at::get_num_threads();
  const bool panels_fit = G * H * K * static_cast<int64_t>(sizeof(T)) <= cache_sizes().l2 * team;
  return team == 1 || B * G * H * K < kPackedMacs || !panels_fit || H > kTeamUnits * team;
}

// How many workers forward_direct splits a call among: none below kDirectTeamMacs multiply-adds a step, and each gets
// at least kTeamUnits units (smaller shares make MKL's per-call cost dominate: measured, cpp_notes.md).
inline int64_t direct_team(int64_t B, int64_t GH, int64_t H, int64_t K) {
  if (B * GH * K < kDirectTeamMacs) return 1;
  return std::max<int64_t>(1, std::min<int64_t>(at::get_num_threads(), H / kTeamUnits));
}

// out[:, k*H + u] = a W[k*H + u]^T for the units u in [u0, u1) of every gate block k: one GEMM over all rows of W
// when the range is every unit. a: (R, K)  w: (G*H, K)  out: (R, G*H)
inline void unit_products(at::Tensor& out, const at::Tensor& a, const at::Tensor& w, int64_t G, int64_t H,
                          int64_t u0, int64_t u1) {
  if (u0 == 0 && u1 == H) {
    at::mm_out(out, a, w.t());
    return;
  }
  for (int64_t k = 0; k < G; ++k) {
    at::Tensor block = out.narrow(1, k * H + u0, u1 - u0);
    at::mm_out(block, a, w.narrow(0, k * H + u0, u1 - u0).t());
  }
}

template <class Cell, class T>
ForwardOut forward_direct(const Layer& l) {
  ForwardBuffers<Cell, T> out(l);
  const int64_t steps = out.steps, B = out.B, I = l.x.size(2), H = out.H, P = out.P, GH = Cell::G * H;
  at::Tensor gx = scratch(Slot::kSequence, {steps * B, GH}, l.x.options());
  at::Tensor gates = scratch(Slot::kGates, {B, GH}, l.x.options());
  const at::Tensor x_rows = l.x.reshape({steps * B, I});
  const T *gx_p = gx.data_ptr<T>(), *gates_p = gates.data_ptr<T>();
  const int64_t team = direct_team(B, GH, H, I + P);
  // Worker `me` of `workers`: its units (and projection columns), its share of every step, a barrier per step.
  auto run = [&](int64_t me, int64_t workers) {
    const Range units = share(H / 16, me, workers), cols = share(P / 16, me, workers);  // 16: whole cache lines
    const int64_t u0 = units.begin * 16, u1 = me + 1 == workers ? H : units.end * 16;
    const int64_t p0 = cols.begin * 16, p1 = me + 1 == workers ? P : cols.end * 16;
    unit_products(gx, x_rows, l.w_ih, Cell::G, H, u0, u1);
    for (int64_t s = 0; s < steps; ++s) {
      const int64_t t = out.order.at(s);
      unit_products(gates, s == 0 ? l.h0 : out.y[out.order.at(s - 1)], l.w_hh, Cell::G, H, u0, u1);
      const StepRows<T> st = out.step(s, gx_p + t * B * GH, gates_p, GH, H);
      if (workers > 1) {
        forward_rows<Cell>(st, 0, B, u0, u1);
      } else {
        at::parallel_for(0, B, std::max<int64_t>(1, kRowUnits / H),
                         [&](int64_t b0, int64_t b1) { forward_rows<Cell>(st, b0, b1, 0, H); });
      }
      if (out.cell_out.defined()) {
#pragma omp barrier
        at::Tensor y_cols = out.y[t].narrow(1, p0, p1 - p0);
        at::mm_out(y_cols, out.cell_out, l.w_hr.narrow(0, p0, p1 - p0).t());
        restore_held(st, out.y_step(s), 0, B, p0, p1);
      }
#pragma omp barrier
    }
  };
  if (team == 1) {
    run(0, 1);
  } else {
#pragma omp parallel num_threads(team)
    {
      at::AutoDispatchBelowADInplaceOrView below_autograd;  // thread-local: the binding's guard is not inherited
      run(omp_get_thread_num(), omp_get_num_threads());
    }
  }
  return out.finish();
}

}  // namespace fusedrnn::cpu
