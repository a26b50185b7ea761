// The layer driver every cell shares: one call runs one layer in one direction over the whole sequence,
// forward or BPTT, with no Python and no ATen dispatch per step (contract: fusedrnn/reference.py).
//
// Forward:  gx = x W_ih^T, either for all T steps as one GEMM (ATen/MKL) first or step by step inside the
//           loop (project_per_step); per step gates = h_{t-1} W_hh^T (gemm.h, packed weights) and ONE fused
//           pass of the cell's nonlinearities and state update (Cell::forward_row) writing h_t into y[t] and
//           the activations into ws[t]; with proj_size, y[t] = (o * tanh(c_t)) W_hr^T.
// Backward: per step in reverse time ONE fused pass for the gate gradients (Cell::backward_row) and
//           dh_{t-1} = dG_t W_hh + direct term; then dx (the packed-panel kernel), dW_ih, dW_hh, dW_hr and
//           the bias gradients (ATen/MKL) as GEMMs over all T*B rows (float32 weight gradients in blocks of
//           <= 2048 rows summed in float64, as reference.py).
// Temporaries (input projection, packed weights, gate gradients) live in per-thread scratch buffers
// (scratch.h); without save (no backward to follow) only two steps of ws are kept.
//
// Threading: one OpenMP team lives for the whole sequence, split one of two ways (Split):
// - by units: worker k owns a slice of the hidden units (and of the P output columns): it packs only its own
//   weight panels (they stay in its core's L2 cache for all T steps), computes only its gates and states, and
//   the team meets at one barrier per step (two with proj_size), where h_t (or dG_t) becomes visible to
//   everyone's next product;
// - by batch rows, when a step's panels all fit in one core's L2 (small H) and the batch is large enough:
//   worker k runs the whole sequence for its own rows, with no barrier per step and no state crossing cores.
// The split changes no bit of any result: either way every element is computed by the same instructions in the
// same order.
//
// Variable lengths: row b only has steps t < lengths[b]; elsewhere the state is held (h_t = h_{t-1},
// c_t = c_{t-1}: copied, never computed, so NaN in padding cannot leak), and backward gives zero gate
// gradients there and passes dh, dc through unchanged, exactly as reference.py.
#pragma once

#include <ATen/ATen.h>
#include <ATen/Parallel.h>
#include <omp.h>

#include <algorithm>
#include <initializer_list>
#include <optional>
#include <tuple>
#include <utility>

#include "common.h"
#include "gemm.h"
#include "scratch.h"

namespace fusedrnn {

// One (t, b) row of a cell's forward pass (only rows with a step t); pointers offset to unit j0.
template <class T>
struct ForwardRow {
  const T* gx;      // x_t W_ih^T: gate k of unit j at gx[k * H + j]
  const T* gh;      // h_{t-1} W_hh^T: gh[k * ldg + j]
  const T* bias_x;  // b_ih (zeros when absent): bias_x[k * H + j]; added here, not by the GEMM (a T*B x G*H copy)
  const T* bias;    // b_hh (zeros when absent): bias[k * H + j]
  const T* h_prev;  // h_{t-1}
  const T* c_prev;  // lstm: c_{t-1}
  T* ws;            // activations saved for backward: ws[k * H + j]
  T* h;             // out: h_t (lstm with proj: o * tanh(c_t), projected afterwards)
  int64_t H, ldg;
};

// One (t, b) row of a cell's backward pass (only rows with a step t); pointers offset to unit j0.
template <class T>
struct BackwardRow {
  const T* ws;      // this step's activations
  const T* h_prev;  // h_{t-1}
  const T* c_prev;  // lstm: c_{t-1}
  const T* h;       // h_t (rnn: the activation's derivative follows from it)
  const T* dy;      // dL/dy_t (zeros with proj, whose dy is already in dh)
  T* dh;            // in: dL/dh_t before dy; out: the part of dL/dh_{t-1} that does not go through W_hh
  T* dc;            // lstm: in dL/dc_t, out dL/dc_{t-1}
  T* dgx;           // out: dL/d(input-side pre-activation), (G*H) row
  T* dgh;           // out: dL/d(hidden-side pre-activation); the same row as dgx except for gru
  T* htilde;        // lstm with proj: out o * tanh(c_t), for dW_hr; else null
  int64_t H;
};

// The tensors of one call, as in the contract; absent ones are undefined.
struct Layer {
  at::Tensor x, h0, c0, w_ih, w_hh, b_ih, b_hh, w_hr, lengths;
  bool reverse;
  bool save = true;     // forward: keep ws for a backward; without it ws is (0) and only two steps of it are kept
  bool need_dx = true;  // backward: x needs a gradient (else dx is neither computed nor returned)
};

using ForwardOut = std::tuple<at::Tensor, at::Tensor, std::optional<at::Tensor>, at::Tensor>;
using BackwardOut = std::tuple<std::optional<at::Tensor>, at::Tensor, std::optional<at::Tensor>, at::Tensor, at::Tensor,
                               std::optional<at::Tensor>, std::optional<at::Tensor>, std::optional<at::Tensor>>;

inline std::optional<at::Tensor> maybe(const at::Tensor& t) {
  return t.defined() ? std::optional<at::Tensor>(t) : std::nullopt;
}

template <class T>
T* ptr_or_null(const at::Tensor& t) {
  return t.defined() ? t.data_ptr<T>() : nullptr;
}

// Step s of the sequence (0 = first processed) is time index t; the one before it is t -/+ 1.
struct TimeOrder {
  int64_t T;
  bool reverse;
  int64_t at(int64_t s) const { return reverse ? T - 1 - s : s; }
};

// What one worker computes (its units, output columns and input columns as panel ranges, and its batch rows) and
// which panels it packs.
struct Work {
  Range units, cols, ins, rows;
  Range pack_units, pack_cols, pack_ins;
};

// How the team splits a layer's steps.
// By units (the default): worker k owns a share of the unit panels (hidden units, NR at a time), of the output-column
// panels and of the input-column panels (BPTT's dx), for every batch row. It packs only its own panels, which stay in
// its core's L2, and the team meets at a barrier every step to exchange h_t (or dG_t).
// By rows, where all the panels a step reads fit in one core's L2 (small H) and every worker gets kMinRows rows:
// worker k runs the whole sequence for its share of the batch rows. Rows never depend on each other, so there is no
// barrier per step and no state crosses cores; the team packs the panels together once, and each reads all of them.
// Measured against the split by units (LSTM T=35, 2 threads, interleaved in one process): B=128 H=64 2 layers
// training 22.5 -> 18.2 ms, inference 7.3 -> 6.0; B=8 H=64 inference 0.52 -> 0.40; B=32 H=128 training 6.2 -> 5.8;
// equal within noise at B=32 H=128 inference (1.84 / 1.87 ms).
template <class T>
struct Split {
  static constexpr int64_t kMinRows = 4;
  static constexpr int64_t kRowsBytes = int64_t(512) << 10;
  int64_t unit_panels, col_panels, in_panels, team;
  bool by_rows;
  // step_values: how many weight values one step reads when one worker does all of it (the row split's panels).
  Split(int64_t B, int64_t H, int64_t P, int64_t in_columns, int64_t step_values)
      : unit_panels(ceil_div(H, kPanel<T>)), col_panels(ceil_div(P, kPanel<T>)),
        in_panels(ceil_div(in_columns, kPanel<T>)),
        by_rows(rows_pay(B, at::get_num_threads(), step_values * static_cast<int64_t>(sizeof(T)))) {
    const int64_t parts = by_rows ? B / kMinRows : std::max(unit_panels, col_panels);
    team = std::max<int64_t>(1, std::min<int64_t>(at::get_num_threads(), parts));
  }
  // Split by rows, each worker reads every panel for its rows alone: with fewer rows than one full register tile
  // (kTileRows) a panel load feeds fewer FMAs, so the panels must sit closer to the core. Measured (LSTM, B=8, two
  // workers of 4 rows): H=64 (128 KiB) inference 14 % faster by rows, H=128 (512 KiB) 3-6 % slower.
  static bool rows_pay(int64_t B, int64_t threads, int64_t step_bytes) {
    const int64_t rows = B / std::max<int64_t>(threads, 1);
    return threads > 1 && rows >= kMinRows && step_bytes * kTileRows <= kRowsBytes * std::min(rows, kTileRows);
  }
  Work work(int64_t me, int64_t team_size, int64_t B) const {
    const Range u = share(unit_panels, me, team_size), c = share(col_panels, me, team_size);
    const Range i = share(in_panels, me, team_size);
    if (by_rows) return {{0, unit_panels}, {0, col_panels}, {0, in_panels}, share(B, me, team_size), u, c, i};
    return {u, c, i, {0, B}, u, c, i};
  }
};

inline bool has_step(const int64_t* lengths, int64_t b, int64_t t) { return !lengths || lengths[b] > t; }

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
  T* ws;     // this step's activations: (B, WS*H)
  T* h_out;  // h_t, row stride h_ld: y_t, or o * tanh(c_t) (B, H) before W_hr with proj
  int64_t h_ld;
  const int64_t* lengths;
  int64_t t, H, GH, P;
  bool proj;
};

// Rows [b0, b1), units [u0, u1) of one step.
template <class Cell, class T>
void forward_rows(const StepRows<T>& st, int64_t b0, int64_t b1, int64_t u0, int64_t u1) {
  constexpr int64_t WS = Cell::WS;
  const int64_t H = st.H;
  for (int64_t b = b0; b < b1; ++b) {
    const T* c_prev = st.c_prev ? st.c_prev + b * st.c_ld : nullptr;
    const T* h_prev = st.h_prev + b * st.P;
    T *ws_row = st.ws + b * WS * H, *h_out = st.h_out + b * st.h_ld;
    if (!has_step(st.lengths, b, st.t)) {  // held: h_t = h_{t-1}, c_t = c_{t-1}; no activations to save
      for (int64_t k = 0; k < WS; ++k) std::fill(ws_row + k * H + u0, ws_row + k * H + u1, T(0));
      if (c_prev) std::copy(c_prev + u0, c_prev + u1, ws_row + 4 * H + u0);
      if (st.proj) std::fill(h_out + u0, h_out + u1, T(0));  // y's row is restored after W_hr (restore_held)
      else std::copy(h_prev + u0, h_prev + u1, h_out + u0);
      continue;
    }
    ForwardRow<T> row{st.gx + b * st.GH + u0, st.gates + b * st.gates_ld + u0, st.bias_x + u0, st.bias + u0,
                      h_prev + u0, c_prev ? c_prev + u0 : nullptr, ws_row + u0, h_out + u0, H, st.ldg};
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

// What both forward drivers share: y, ws (or, without save, a two-step ring of it: step s's activations go to slot
// s % 2, the LSTM reads c_{t-1} there), the biases (zeros where absent) and, with proj, o * tanh(c_t) of one step.
template <class Cell, class T>
struct ForwardBuffers {
  static constexpr int64_t G = Cell::G, WS = Cell::WS;
  const Layer& l;
  int64_t steps, B, H, P;
  TimeOrder order;
  at::Tensor y, ws, bias_x, bias, htilde;

  explicit ForwardBuffers(const Layer& layer)
      : l(layer), steps(l.x.size(0)), B(l.x.size(1)), H(l.w_hh.size(0) / G), P(l.h0.size(1)),
        order{steps, l.reverse} {
    const auto options = l.x.options();
    const at::Tensor zeros = l.b_ih.defined() && l.b_hh.defined() ? at::Tensor() : at::zeros({G * H}, options);
    bias_x = l.b_ih.defined() ? l.b_ih : zeros;
    bias = l.b_hh.defined() ? l.b_hh : zeros;
    y = at::empty({steps, B, P}, options);
    ws = l.save ? saved_empty({steps, B, WS * H}, options) : scratch(Slot::kState, {2, B, WS * H}, options);
    if (l.w_hr.defined()) htilde = scratch(Slot::kProjOut, {B, H}, options);
  }

  T* ws_step(int64_t s) const { return ws.data_ptr<T>() + (l.save ? order.at(s) : s % 2) * B * WS * H; }
  const T* h_prev(int64_t s) const { return s == 0 ? l.h0.data_ptr<T>() : y.data_ptr<T>() + order.at(s - 1) * B * P; }
  T* y_step(int64_t s) const { return y.data_ptr<T>() + order.at(s) * B * P; }

  // Step s's rows, given where its products are.
  StepRows<T> step(int64_t s, const T* gx_t, const T* gates, int64_t gates_ld, int64_t ldg) const {
    const bool first = s == 0, proj = htilde.defined();
    const T* c_prev = G != 4 ? nullptr : first ? l.c0.data_ptr<T>() : ws_step(s - 1) + 4 * H;
    return {gx_t, gates, gates_ld, ldg, bias_x.data_ptr<T>(), bias.data_ptr<T>(), h_prev(s), c_prev,
            first ? H : WS * H, ws_step(s), proj ? htilde.data_ptr<T>() : y_step(s), proj ? H : P,
            ptr_or_null<int64_t>(l.lengths), order.at(s), H, G * H, P, proj};
  }

  ForwardOut finish() const {
    const int64_t last = order.at(steps - 1);
    at::Tensor c_n = G == 4 ? ws[l.save ? last : (steps - 1) % 2].narrow(1, 4 * H, H).clone() : at::Tensor();
    return {y, y[last].clone(), maybe(c_n), l.save ? ws : at::empty({0}, y.options())};
  }
};

// Whether the forward runs its input projection inside the step loop: each worker multiplies x_t by its own units'
// W_ih panels next to the recurrent product, so no (T*B, G*H) projection goes through memory and the cell rows find
// it in cache; BPTT likewise computes dx_t = dG_t W_ih right after dh_{t-1}, while dG_t is hot. The panels are
// re-read every step, which pays while one worker's W_ih and W_hh panels stay in (or near) its L2 and the batch gives
// every read enough work; otherwise one GEMM over all T*B rows runs first. Measured (2-core EPYC, 1 MiB L2 per core,
// LSTM T=35, inference, 2 threads): B=32 I=H=256 7.02 -> 6.38 ms, B=4 1.42 -> 1.09, B=8 1.76 -> 1.68, B=16 I=H=512
// 13.8 -> 12.6; worse at B=1 I=H=256 (0.45 -> 0.60) and B=32 I=H=1024 (109 -> 116: 16 MiB of panels per worker stream
// from DRAM).
template <class T>
bool project_per_step(int64_t B, int64_t I, int64_t P, int64_t worker_columns) {
  const int64_t bytes = (I + P) * worker_columns * static_cast<int64_t>(sizeof(T));
  return bytes <= (int64_t(3) << 19) ? B >= 4 : bytes <= (int64_t(8) << 20) && B >= 16;
}

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
  at::Tensor x_pack = per_step ? scratch(Slot::kPackInput, {split.unit_panels * G * I * NR}, options) : at::Tensor();
  at::Tensor gates = scratch(Slot::kGates, {B, G * Hpad}, options);  // gates[b][k * Hpad + j] = (h W_hh^T)[b][k*H+j]
  at::Tensor w_pack = scratch(Slot::kPack, {split.unit_panels * G * P * NR}, options);
  at::Tensor r_pack = proj ? scratch(Slot::kPackProj, {split.col_panels * H * NR}, options) : at::Tensor();

  const T *x_p = l.x.data_ptr<T>(), *w_ih = l.w_ih.data_ptr<T>(), *w_hh = l.w_hh.data_ptr<T>();
  const T* w_hr = ptr_or_null<T>(l.w_hr);
  T *gates_p = gates.data_ptr<T>(), *wp = w_pack.data_ptr<T>(), *rp = ptr_or_null<T>(r_pack);
  T *ht = ptr_or_null<T>(out.htilde), *gx_p = gx.data_ptr<T>(), *xp = ptr_or_null<T>(x_pack);

#pragma omp parallel num_threads(split.team)
  {
    const Work w = split.work(omp_get_thread_num(), omp_get_num_threads(), B);
    const int64_t r0 = w.rows.begin, rows = w.rows.end - w.rows.begin;
    for (int64_t q = w.pack_units.begin; q < w.pack_units.end; ++q)
      for (int64_t k = 0; k < G; ++k) {
        const int64_t n0 = k * H + q * NR, width = std::min(NR, H - q * NR);
        pack_panel(w_hh, P, true, P, n0, width, wp + (q * G + k) * P * NR);
        if (per_step) pack_panel(w_ih, I, true, I, n0, width, xp + (q * G + k) * I * NR);
      }
    for (int64_t q = w.pack_cols.begin; q < w.pack_cols.end && proj; ++q)
      pack_panel(w_hr, H, true, H, q * NR, std::min(NR, P - q * NR), rp + q * H * NR);
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
            gemm_panel(rows, I, x_p + (t * B + r0) * I, I, xp + (q * G + k) * I * NR, gx_p + r0 * GH + k * H + u0, GH,
                       u1 - u0, false);
          gemm_panel(rows, P, h_prev + r0 * P, P, wp + (q * G + k) * P * NR, gates_p + r0 * G * Hpad + k * Hpad + u0,
                     G * Hpad, NR, false);
        }
        forward_rows<Cell>(st, w.rows.begin, w.rows.end, u0, u1);
      }
      if (proj) {
        if (!split.by_rows) {
#pragma omp barrier
        }
        for (int64_t q = w.cols.begin; q < w.cols.end; ++q) {
          const int64_t p0 = q * NR, width = std::min(NR, P - p0);
          gemm_panel(rows, H, ht + r0 * H, H, rp + q * H * NR, y_t + r0 * P + p0, P, width, false);
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
// through ATen (MKL, as torch.nn does) and runs only the cell rows itself: one pass per step, on the calling thread
// unless a step has more than kRowUnits units to update. Nothing is packed, so nothing is kept between calls and no
// cache of packed weights can go stale.
constexpr int64_t kRowUnits = int64_t(1) << 14;

// Whether a call is small enough for forward_direct: at most two steps, or at most kDirectRows (t, b) rows in all.
// Measured (one thread, interleaved with torch.nn, medians of 60 calls, I = H): at T=1 direct 45-386 us where packed
// took 51-579 (GRU B=1..32, H=64..256); at T=2 B=32 H=256 LSTM 1147 vs 1237, GRU 809 vs 895; at T=8 B=1 equal within
// noise; at T=8 B=8 H=64 packed is ahead (GRU 98 vs 116 us).
constexpr int64_t kDirectRows = 16;

inline bool direct_pays(int64_t steps, int64_t B) { return steps <= 2 || steps * B <= kDirectRows; }

template <class Cell, class T>
ForwardOut forward_direct(const Layer& l) {
  ForwardBuffers<Cell, T> out(l);
  const int64_t steps = out.steps, B = out.B, I = l.x.size(2), GH = Cell::G * out.H;
  at::Tensor gx = scratch(Slot::kSequence, {steps * B, GH}, l.x.options());
  at::mm_out(gx, l.x.reshape({steps * B, I}), l.w_ih.t());
  at::Tensor gates = scratch(Slot::kGates, {B, GH}, l.x.options());
  const T *gx_p = gx.data_ptr<T>(), *gates_p = gates.data_ptr<T>();
  for (int64_t s = 0; s < steps; ++s) {
    const int64_t t = out.order.at(s);
    at::mm_out(gates, s == 0 ? l.h0 : out.y[out.order.at(s - 1)], l.w_hh.t());
    const StepRows<T> st = out.step(s, gx_p + t * B * GH, gates_p, GH, out.H);
    at::parallel_for(0, B, std::max<int64_t>(1, kRowUnits / out.H), [&](int64_t b0, int64_t b1) {
      forward_rows<Cell>(st, b0, b1, 0, out.H);
    });
    if (out.htilde.defined()) {
      at::Tensor y_t = out.y[t];
      at::mm_out(y_t, out.htilde, l.w_hr.t());
      restore_held(st, out.y_step(s), 0, B, 0, out.P);
    }
  }
  return out.finish();
}

// Rows per GEMM of a float32 weight gradient, at most (reference.py's _BLOCK_ROWS).
constexpr int64_t kBlockRows = 2048;

// The float64 sum of float32 block sums (M, N), rounded to float32 once. While it holds one block that block
// stays as it is; a second one is added in float32 only at the end when no third comes: the correctly rounded
// sum of two float32 values is what float64 accumulation gives too, without its two extra passes.
class BlockSum {
 public:
  // Takes the finished block in `block` and leaves a free buffer of its shape there.
  void add(at::Tensor& block) {
    if (!first_.defined()) {
      first_ = block;
      block = at::empty_like(first_);
      return;
    }
    const float *a = first_.data_ptr<float>(), *b = block.data_ptr<float>();
    if (!total_.defined()) {
      total_ = at::empty(first_.sizes(), first_.options().dtype(at::kDouble));
      double* t = total_.data_ptr<double>();
      parallel(first_.numel(), [=](int64_t i) { t[i] = double(a[i]) + double(b[i]); });
    } else {
      double* t = total_.data_ptr<double>();
      parallel(first_.numel(), [=](int64_t i) { t[i] += double(b[i]); });
    }
  }

  // The sum with the last block, `last`, which receives it.
  at::Tensor finish(at::Tensor& last) {
    if (!first_.defined()) return last;
    if (!total_.defined()) return last.add_(first_);
    const double* t = total_.data_ptr<double>();
    float* b = last.data_ptr<float>();
    parallel(last.numel(), [=](int64_t i) { b[i] = float(t[i] + double(b[i])); });
    return last;
  }

 private:
  template <class F>
  static void parallel(int64_t n, const F& f) {
    at::parallel_for(0, n, 1 << 15, [&](int64_t begin, int64_t end) {
      for (int64_t i = begin; i < end; ++i) f(i);
    });
  }

  at::Tensor first_, total_;
};

// Sum over the parts' rows of a^T b: each part is (a (R_p, M), b (R_p, N)) -> (M, N) in a's dtype.
// One float32 GEMM over all rows accumulates rounding error ~ sqrt(R) eps (10x torch.nn's at T*B = 40,000);
// as reference.py's _sum_of_outer, float32 is summed as GEMMs over blocks of at most kBlockRows rows (equal
// shares of the parts read as one concatenation), accumulated in float64 (BlockSum). float64: one block.
inline at::Tensor sum_of_outer(std::initializer_list<std::pair<at::Tensor, at::Tensor>> parts) {
  int64_t rows = 0;
  for (const auto& part : parts) rows += part.first.size(0);
  const at::Tensor &a0 = parts.begin()->first, &b0 = parts.begin()->second;
  if (rows == 0) return at::zeros({a0.size(1), b0.size(1)}, a0.options());  // an empty batch
  const int64_t blocks = a0.scalar_type() == at::kFloat ? ceil_div(rows, kBlockRows) : 1;
  at::Tensor block = at::empty({a0.size(1), b0.size(1)}, a0.options());
  BlockSum sum;
  int64_t k = 0, row = 0;  // the current block k covers rows share(rows, k, blocks) of the concatenation
  for (const auto& [a, b] : parts)
    for (int64_t r = 0; r < a.size(0);) {
      const Range rk = share(rows, k, blocks);
      const int64_t n = std::min(a.size(0) - r, rk.end - row);
      const at::Tensor a_rows = a.narrow(0, r, n).t(), b_rows = b.narrow(0, r, n);
      if (row == rk.begin) at::mm_out(block, a_rows, b_rows);
      else block.addmm_(a_rows, b_rows);
      r += n;
      row += n;
      if (row == rk.end && row < rows) {
        sum.add(block);
        ++k;
      }
    }
  return sum.finish(block);
}

// dx = dG W_ih (rows = T*B): the product the BPTT loop already runs per step (dG_t W_hh), so the same packed-panel
// kernel, here over all rows at once. Against MKL (at::mm) in one whole LSTM layer backward (T=35 B=32 H=256,
// 2 threads, medians of 40 interleaved calls): I=256 13.54 -> 13.41 ms, I=28 8.50 -> 8.31 ms. The team packs
// W_ih's panels together, then each worker takes a share of the rows for every panel (a GH x NR panel stays
// in its L2 while the rows stream past).
template <class T>
at::Tensor input_grad(const at::Tensor& dg, const at::Tensor& w_ih) {
  constexpr int64_t NR = kPanel<T>;
  const int64_t rows = dg.size(0), GH = dg.size(1), I = w_ih.size(1), panels = ceil_div(I, NR);
  at::Tensor dx = at::empty({rows, I}, dg.options());
  at::Tensor pack = scratch(Slot::kPack, {panels * GH * NR}, dg.options());
  const T *dg_p = dg.data_ptr<T>(), *w = w_ih.data_ptr<T>();
  T *dx_p = dx.data_ptr<T>(), *pack_p = pack.data_ptr<T>();
  const int64_t tiles = ceil_div(rows, 8);
#pragma omp parallel num_threads(std::max<int64_t>(1, std::min<int64_t>(at::get_num_threads(), tiles)))
  {
    const int64_t me = omp_get_thread_num(), team = omp_get_num_threads();
    const Range own = share(panels, me, team), mine = share(tiles, me, team);
    for (int64_t q = own.begin; q < own.end; ++q)
      pack_panel(w, I, false, GH, q * NR, std::min(NR, I - q * NR), pack_p + q * GH * NR);
#pragma omp barrier
    const int64_t m0 = mine.begin * 8, m1 = std::min(mine.end * 8, rows);
    for (int64_t q = 0; q < panels && m1 > m0; ++q)
      gemm_panel(m1 - m0, GH, dg_p + m0 * GH, GH, pack_p + q * GH * NR, dx_p + m0 * I + q * NR, I,
                 std::min(NR, I - q * NR), false);
  }
  return dx;
}

// Everything that is not sequential, as GEMMs over all T*B rows (weight gradients: sum_of_outer); dx too unless the
// BPTT loop already made it (dx_in defined). dgx, dgh: (T, B, G*H); the step before t used h_{t-1} = y[t -/+ 1], or
// h0 at the first step, so dW_hh sums two parts (no shifted copy of y).
template <class Cell, class T>
BackwardOut weight_grads(const Layer& l, const at::Tensor& y, const at::Tensor& dx_in, const at::Tensor& dgx,
                         const at::Tensor& dgh, const at::Tensor& dhy, const at::Tensor& htilde,
                         const at::Tensor& dh0, const at::Tensor& dc0) {
  const int64_t steps = l.x.size(0), B = l.x.size(1), GH = dgx.size(2), P = y.size(2);
  const at::Tensor dgx_flat = dgx.view({-1, GH});
  at::Tensor dx = dx_in;
  if (!dx.defined() && l.need_dx) dx = input_grad<T>(dgx_flat, l.w_ih).view_as(l.x);
  const at::Tensor dw_ih = sum_of_outer({{dgx_flat, l.x.reshape({-1, l.x.size(2)})}});
  const int64_t first = l.reverse ? steps - 1 : 0;
  const int64_t later = (steps - 1) * B;  // rows of the steps after the first
  const at::Tensor rest = (l.reverse ? dgh.narrow(0, 0, steps - 1) : dgh.narrow(0, 1, steps - 1)).reshape({later, GH});
  const at::Tensor before = (l.reverse ? y.narrow(0, 1, steps - 1) : y.narrow(0, 0, steps - 1)).reshape({later, P});
  const at::Tensor dw_hh = sum_of_outer({{dgh[first], l.h0}, {rest, before}});
  at::Tensor db_ih, db_hh;  // each bias may be absent on its own (the contract's rule)
  if (l.b_ih.defined()) db_ih = dgx_flat.sum(0);
  if (l.b_hh.defined())
    db_hh = Cell::kSplitHidden || !db_ih.defined() ? dgh.view({-1, GH}).sum(0) : db_ih.clone();
  at::Tensor dw_hr = dhy.defined() ? sum_of_outer({{dhy.view({-1, P}), htilde.view({-1, htilde.size(2)})}})
                                   : at::Tensor();
  return {maybe(dx), dh0, maybe(dc0), dw_ih, dw_hh, maybe(db_ih), maybe(db_hh), maybe(dw_hr)};
}

template <class Cell, class T>
BackwardOut backward_layer(const Layer& l, const at::Tensor& y, const at::Tensor& ws, const at::Tensor& dy,
                           const at::Tensor& dh_n, const at::Tensor& dc_n) {
  constexpr int64_t NR = kPanel<T>, G = Cell::G, WS = Cell::WS;
  const int64_t steps = l.x.size(0), B = l.x.size(1), I = l.x.size(2);
  const int64_t GH = l.w_hh.size(0), H = GH / G, P = l.h0.size(1), in_panels = ceil_div(I, NR);
  const bool proj = l.w_hr.defined();
  const auto options = l.x.options();
  const int64_t Ppad = ceil_div(P, NR) * NR, Ipad = in_panels * NR;
  const Split<T> split(B, H, P, l.need_dx ? I : 0,
                       GH * (Ppad + (l.need_dx ? Ipad : 0)) + (proj ? ceil_div(H, NR) * NR * P : 0));
  const bool per_step =
      l.need_dx && (split.by_rows || project_per_step<T>(B, I, P, ceil_div(split.unit_panels, split.team) * NR * G));
  at::Tensor dx = per_step ? at::empty({steps, B, I}, options) : at::Tensor();  // else after the loop, if needed
  at::Tensor x_pack = per_step ? scratch(Slot::kPackInput, {in_panels * GH * NR}, options) : at::Tensor();
  at::Tensor dgx = scratch(Slot::kSequence, {steps, B, GH}, options);
  at::Tensor dgh = Cell::kSplitHidden ? scratch(Slot::kSequence2, {steps, B, GH}, options) : dgx;
  at::Tensor dh = dh_n.clone(at::MemoryFormat::Contiguous);  // carried dL/dh, ends as dh0
  at::Tensor dc = G == 4 ? dc_n.clone(at::MemoryFormat::Contiguous) : at::Tensor();
  at::Tensor dhy = proj ? scratch(Slot::kGradOut, {steps, B, P}, options) : at::Tensor();  // dL/dh_t, for dW_hr
  at::Tensor htilde = proj ? scratch(Slot::kProjOut, {steps, B, H}, options) : at::Tensor();
  at::Tensor dhh = proj ? scratch(Slot::kState, {B, H}, options) : at::Tensor();  // dL/d(o * tanh c_t)
  at::Tensor zeros = at::zeros({H}, options);
  at::Tensor w_pack = scratch(Slot::kPack, {split.col_panels * GH * NR}, options);
  at::Tensor r_pack = proj ? scratch(Slot::kPackProj, {split.unit_panels * P * NR}, options) : at::Tensor();

  const T *w_hh = l.w_hh.data_ptr<T>(), *w_hr = ptr_or_null<T>(l.w_hr), *h0 = l.h0.data_ptr<T>();
  const T *c0 = ptr_or_null<T>(l.c0), *y_p = y.data_ptr<T>(), *ws_p = ws.data_ptr<T>(), *dy_p = dy.data_ptr<T>();
  const T* zero = zeros.data_ptr<T>();
  const int64_t* lengths = ptr_or_null<int64_t>(l.lengths);
  T *dgx_p = dgx.data_ptr<T>(), *dgh_p = dgh.data_ptr<T>(), *dh_p = dh.data_ptr<T>(), *dc_p = ptr_or_null<T>(dc);
  T *dhy_p = ptr_or_null<T>(dhy), *ht_p = ptr_or_null<T>(htilde), *dhh_p = ptr_or_null<T>(dhh);
  T *wp = w_pack.data_ptr<T>(), *rp = ptr_or_null<T>(r_pack);
  T *dx_p = ptr_or_null<T>(dx), *xp = ptr_or_null<T>(x_pack);
  const T* w_ih = l.w_ih.data_ptr<T>();
  const TimeOrder order{steps, l.reverse};

#pragma omp parallel num_threads(split.team)
  {
    const Work w = split.work(omp_get_thread_num(), omp_get_num_threads(), B);
    const Range iq = per_step ? w.ins : Range{0, 0}, pack_iq = per_step ? w.pack_ins : Range{0, 0};
    const int64_t j0 = w.units.begin * NR, j1 = std::min(w.units.end * NR, H);
    const int64_t p0 = w.cols.begin * NR, p1 = std::min(w.cols.end * NR, P);
    const int64_t r0 = w.rows.begin, rows = w.rows.end - w.rows.begin;
    for (int64_t q = w.pack_cols.begin; q < w.pack_cols.end; ++q)
      pack_panel(w_hh, P, false, GH, q * NR, std::min(NR, P - q * NR), wp + q * GH * NR);
    for (int64_t q = pack_iq.begin; q < pack_iq.end; ++q)
      pack_panel(w_ih, I, false, GH, q * NR, std::min(NR, I - q * NR), xp + q * GH * NR);
    for (int64_t q = w.pack_units.begin; q < w.pack_units.end && proj; ++q)
      pack_panel(w_hr, H, false, P, q * NR, std::min(NR, H - q * NR), rp + q * P * NR);
    if (split.by_rows) {
#pragma omp barrier
    }

    for (int64_t s = steps - 1; s >= 0; --s) {
      const int64_t t = order.at(s), prev = order.at(s - 1);
      const T* h_prev = s == 0 ? h0 : y_p + prev * B * P;
      if (proj) {  // dL/dh_t over own output columns, then through W_hr into the cell's output
        for (int64_t b = w.rows.begin; b < w.rows.end; ++b) {
          const bool valid = has_step(lengths, b, t);
          T *d = dh_p + b * P, *out = dhy_p + (t * B + b) * P;
          const T* g = dy_p + (t * B + b) * P;
          for (int64_t p = p0; p < p1; ++p) {
            const T total = d[p] + (valid ? g[p] : T(0));
            out[p] = valid ? total : T(0);
            d[p] = valid ? T(0) : total;
          }
        }
        if (!split.by_rows) {
#pragma omp barrier
        }
        for (int64_t q = w.units.begin; q < w.units.end; ++q)
          gemm_panel(rows, P, dhy_p + (t * B + r0) * P, P, rp + q * P * NR, dhh_p + r0 * H + q * NR, H,
                     std::min(NR, H - q * NR), false);
      }
      for (int64_t b = w.rows.begin; b < w.rows.end && j1 > j0; ++b) {
        const int64_t row_off = (t * B + b) * GH + j0;
        if (!has_step(lengths, b, t)) {  // no step: zero gate gradients, dh and dc pass through
          for (int64_t k = 0; k < G; ++k) {
            std::fill(dgx_p + row_off + k * H, dgx_p + row_off + k * H + (j1 - j0), T(0));
            std::fill(dgh_p + row_off + k * H, dgh_p + row_off + k * H + (j1 - j0), T(0));
          }
          if (proj) std::fill(ht_p + (t * B + b) * H + j0, ht_p + (t * B + b) * H + j1, T(0));
          continue;
        }
        const T* c_prev = G != 4 ? nullptr : (s == 0 ? c0 + b * H : ws_p + (prev * B + b) * WS * H + 4 * H);
        BackwardRow<T> row{ws_p + (t * B + b) * WS * H + j0,
                           h_prev + b * P + j0,
                           c_prev ? c_prev + j0 : nullptr,
                           y_p + (t * B + b) * P + j0,
                           proj ? zero : dy_p + (t * B + b) * P + j0,
                           proj ? dhh_p + b * H + j0 : dh_p + b * P + j0,
                           dc_p ? dc_p + b * H + j0 : nullptr,
                           dgx_p + row_off,
                           dgh_p + row_off,
                           proj ? ht_p + (t * B + b) * H + j0 : nullptr,
                           H};
        Cell::backward_row(row, j1 - j0);
      }
      if (!split.by_rows) {
#pragma omp barrier
      }
      for (int64_t q = w.cols.begin; q < w.cols.end; ++q)
        gemm_panel(rows, GH, dgh_p + (t * B + r0) * GH, GH, wp + q * GH * NR, dh_p + r0 * P + q * NR, P,
                   std::min(NR, P - q * NR), true);
      for (int64_t q = iq.begin; q < iq.end; ++q)
        gemm_panel(rows, GH, dgx_p + (t * B + r0) * GH, GH, xp + q * GH * NR, dx_p + (t * B + r0) * I + q * NR, I,
                   std::min(NR, I - q * NR), false);
    }
  }
  return weight_grads<Cell, T>(l, y, dx, dgx, dgh, dhy, htilde, dh, dc);
}

}  // namespace fusedrnn

namespace fusedrnn {

// float32 and float64 run natively; fusedrnn/cpp.py runs bfloat16 in float32 and rounds the results.
template <class Cell>
ForwardOut forward_any(const Layer& l) {
  if (l.x.scalar_type() == at::kDouble)
    return direct_pays(l.x.size(0), l.x.size(1)) ? forward_direct<Cell, double>(l) : forward_layer<Cell, double>(l);
  TORCH_CHECK(l.x.scalar_type() == at::kFloat, "fusedrnn._cpp: float32 or float64 expected, got ", l.x.scalar_type());
  if (direct_pays(l.x.size(0), l.x.size(1))) return forward_direct<Cell, float>(l);
  return forward_layer<Cell, float>(l);
}

template <class Cell>
BackwardOut backward_any(const Layer& l, const at::Tensor& y, const at::Tensor& ws, const at::Tensor& dy,
                         const at::Tensor& dh_n, const at::Tensor& dc_n) {
  if (l.x.scalar_type() == at::kDouble) return backward_layer<Cell, double>(l, y, ws, dy, dh_n, dc_n);
  TORCH_CHECK(l.x.scalar_type() == at::kFloat, "fusedrnn._cpp: float32 or float64 expected, got ", l.x.scalar_type());
  return backward_layer<Cell, float>(l, y, ws, dy, dh_n, dc_n);
}

// The cells (lstm.cpp, gru.cpp, rnn.cpp). mode is "lstm" | "gru" | "rnn_tanh" | "rnn_relu".
ForwardOut lstm_forward(const Layer& l);
BackwardOut lstm_backward(const Layer& l, const at::Tensor& y, const at::Tensor& ws, const at::Tensor& dy,
                          const at::Tensor& dh_n, const at::Tensor& dc_n);
ForwardOut gru_forward(const Layer& l);
BackwardOut gru_backward(const Layer& l, const at::Tensor& y, const at::Tensor& ws, const at::Tensor& dy,
                         const at::Tensor& dh_n, const at::Tensor& dc_n);
ForwardOut rnn_forward(const Layer& l, bool relu);
BackwardOut rnn_backward(const Layer& l, const at::Tensor& y, const at::Tensor& ws, const at::Tensor& dy,
                         const at::Tensor& dh_n, bool relu);

}  // namespace fusedrnn
