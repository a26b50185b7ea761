// The recurrent matrix products, on weights packed once per layer call and kept in the owning core's
// cache for the whole sequence (MKL would re-pack W every step; at B=32 that costs as much as the math).
//
// A panel is NR = 2 * kLanes<T> consecutive output columns of a right-hand operand Bm (K x N), stored
// k-major and zero-padded past the matrix edge:  panel[k * NR + n] = Bm[k, n0 + n].
// Bm is either a weight W as stored (Bm = W, for dh = dG W) or its transpose (Bm = W^T, for h W^T).
#pragma once

#include <cstdint>

#include "common.h"

namespace fusedrnn::cpu {

template <class T>
constexpr int64_t kPanel = 2 * kLanes<T>;

// Rows of A one register tile of gemm_panel covers at most (MR x NR accumulators).
constexpr int64_t kTileRows = 8;

// Fill `panel` (K * NR values) from W (row stride ld): Bm = W^T if transposed (Bm[k, n] = W[n, k]) else W.
template <class T>
void pack_panel(const T* w, int64_t ld, bool transposed, int64_t K, int64_t n0, int64_t width, T* panel);

// C[m, 0:width] (+)= sum_k A[m, k] * panel[k, :] for m < M.  A: (M, K) row stride lda; C: row stride ldc.
template <class T>
void gemm_panel(int64_t M, int64_t K, const T* a, int64_t lda, const T* panel, T* c, int64_t ldc, int64_t width,
                bool accumulate);

}  // namespace fusedrnn::cpu
