// How a layer call's work is scheduled on the CPU: which split of the OpenMP team (Split), and whether the input
// projection (forward) or dx (backward) runs inside the step loop (project_per_step). The budgets are fractions of
// the machine's caches (cache.h); the measurements behind them: bench/results/cpp_notes.md, "Scheduling
// heuristics".
#pragma once

#include <ATen/Parallel.h>

#include <algorithm>
#include <cstdint>

#include "cache.h"
#include "common.h"
#include "gemm.h"

namespace fusedrnn::cpu {

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
// The split changes no bit of any result: either way every element is computed by the same instructions in the
// same order.
template <class T>
struct Split {
  static constexpr int64_t kMinRows = 4;
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
  // (kTileRows) a panel load feeds fewer FMAs, so the panels must sit closer to the core. A step's panels may take
  // half of a core's L2 with full tiles, proportionally less with fewer rows (the other half holds the rows'
  // operands and results).
  static bool rows_pay(int64_t B, int64_t threads, int64_t step_bytes) {
    const int64_t rows = B / std::max<int64_t>(threads, 1), budget = cache_sizes().l2 / 2;
    return threads > 1 && rows >= kMinRows && step_bytes * kTileRows <= budget * std::min(rows, kTileRows);
  }
  Work work(int64_t me, int64_t team_size, int64_t B) const {
    const Range u = share(unit_panels, me, team_size), c = share(col_panels, me, team_size);
    const Range i = share(in_panels, me, team_size);
    if (by_rows) return {{0, unit_panels}, {0, col_panels}, {0, in_panels}, share(B, me, team_size), u, c, i};
    return {u, c, i, {0, B}, u, c, i};
  }
};

// Whether the forward runs its input projection inside the step loop: each worker multiplies x_t by its own units'
// W_ih panels next to the recurrent product, so no (T*B, G*H) projection goes through memory and the cell rows find
// it in cache; BPTT likewise computes dx_t = dG_t W_ih right after dh_{t-1}, while dG_t is hot. The panels are
// re-read every step, which pays while one worker's W_ih and W_hh panels stay in (or near) its L2 and the batch gives
// every read enough work: up to 1.5x a core's L2 from B = 4 rows, up to half its share of L3 from B = 16 (beyond,
// they stream from DRAM); otherwise one GEMM over all T*B rows runs first.
template <class T>
bool project_per_step(int64_t B, int64_t I, int64_t P, int64_t worker_columns) {
  const int64_t bytes = (I + P) * worker_columns * static_cast<int64_t>(sizeof(T));
  const CacheSizes& cache = cache_sizes();
  return bytes <= cache.l2 * 3 / 2 ? B >= 4 : bytes <= cache.l3_per_core / 2 && B >= 16;
}

}  // namespace fusedrnn::cpu
