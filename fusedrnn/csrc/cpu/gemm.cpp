// Register-blocked product of a row block of A with one packed panel (see gemm.h):
//   C[m, 0:width] (+)= sum_k A[m, k] * panel[k, 0:NR]
// MR rows of A at a time keep MR x 2 vector accumulators in registers (16 of AVX-512's 32 for MR = 8);
// each k loads two panel vectors and broadcasts MR scalars of A: compute-bound, no packing of A needed.
// Packing W^T (the forward's panels) transposes L x L blocks in registers.
#include "gemm.h"

#include <algorithm>
#include <cstring>
#include <utility>

namespace fusedrnn::cpu {

// Stage S of an in-register L x L transpose (row i in v[i]): rows i and i + S, for i & S == 0, swap their
// off-diagonal S x S blocks. Stages S = 1, 2, ..., L / 2 transpose the whole block.
template <class V, int L, int S, size_t... J>
FUSEDRNN_INLINE void swap_blocks(V& a, V& b, std::index_sequence<J...>) {
  const V upper = __builtin_shufflevector(a, b, ((J & S) == 0 ? int(J) : int(L + J - S))...);
  const V lower = __builtin_shufflevector(a, b, ((J & S) == 0 ? int(J + S) : int(L + J))...);
  a = upper;
  b = lower;
}

template <class V, int L, int S = 1>
FUSEDRNN_INLINE void transpose(V (&v)[L]) {
#pragma GCC unroll 16
  for (int i = 0; i < L; ++i)
    if ((i & S) == 0) swap_blocks<V, L, S>(v[i], v[i + S], std::make_index_sequence<L>{});
  if constexpr (2 * S < L) transpose<V, L, 2 * S>(v);
}

template <class T>
FUSEDRNN_TARGETS void pack_panel(const T* w, int64_t ld, bool transposed, int64_t K, int64_t n0, int64_t width,
                                 T* panel) {
  using V = typename Vec<T>::type;
  constexpr int64_t NR = kPanel<T>;
  constexpr int L = kLanes<T>;
  if (!transposed) {  // rows of W: one contiguous copy per k (faster: bench/results/cpp_notes.md)
    for (int64_t k = 0; k < K; ++k) {
      T* dst = panel + k * NR;
      std::memcpy(dst, w + k * ld + n0, width * sizeof(T));
      std::fill(dst + width, dst + NR, T(0));
    }
    return;
  }
  // A whole panel L values of k at a time: each half's L rows of W as vectors, transposed in registers, stored as
  // L rows of the panel (2.2x faster than element by element: bench/results/cpp_notes.md).
  int64_t k0 = 0;
  if (width == NR)
    for (; k0 + L <= K; k0 += L)
      for (int64_t half = 0; half < 2; ++half) {
        V rows[L];
        for (int i = 0; i < L; ++i) std::memcpy(&rows[i], w + (n0 + half * L + i) * ld + k0, sizeof(V));
        transpose(rows);
        for (int i = 0; i < L; ++i) std::memcpy(panel + (k0 + i) * NR + half * L, &rows[i], sizeof(V));
      }
  for (int64_t k = k0; k < K; ++k) {
    T* dst = panel + k * NR;
    for (int64_t n = 0; n < NR; ++n) dst[n] = n < width ? w[(n0 + n) * ld + k] : T(0);
  }
}

template <int MR, class T>
FUSEDRNN_INLINE void gemm_tile(int64_t K, const T* a, int64_t lda, const T* panel, T* c, int64_t ldc,
                               int64_t width, bool accumulate) {
  using V = typename Vec<T>::type;
  constexpr int64_t L = kLanes<T>;
  V acc[MR][2];
#pragma GCC unroll 8
  for (int r = 0; r < MR; ++r) acc[r][0] = acc[r][1] = V{};
  for (int64_t k = 0; k < K; ++k) {
    V b0, b1;
    std::memcpy(&b0, panel + k * 2 * L, sizeof(V));
    std::memcpy(&b1, panel + k * 2 * L + L, sizeof(V));
#pragma GCC unroll 8
    for (int r = 0; r < MR; ++r) {
      const T x = a[r * lda + k];
      acc[r][0] += x * b0;
      acc[r][1] += x * b1;
    }
  }
  for (int r = 0; r < MR; ++r) {
    T* row = c + r * ldc;
    if (width == 2 * L) {  // a whole panel: vector stores (the loop below becomes a memmove call per row)
      if (accumulate) {
        V c0, c1;
        std::memcpy(&c0, row, sizeof(V));
        std::memcpy(&c1, row + L, sizeof(V));
        acc[r][0] = c0 + acc[r][0];
        acc[r][1] = c1 + acc[r][1];
      }
      std::memcpy(row, &acc[r][0], sizeof(V));
      std::memcpy(row + L, &acc[r][1], sizeof(V));
      continue;
    }
    T out[2 * L];
    std::memcpy(out, &acc[r][0], sizeof(V));
    std::memcpy(out + L, &acc[r][1], sizeof(V));
    for (int64_t n = 0; n < width; ++n) row[n] = accumulate ? row[n] + out[n] : out[n];
  }
}

template <class T>
FUSEDRNN_TARGETS void gemm_panel(int64_t M, int64_t K, const T* a, int64_t lda, const T* panel, T* c,
                                 int64_t ldc, int64_t width, bool accumulate) {
  int64_t m = 0;
  for (; m + kTileRows <= M; m += kTileRows)
    gemm_tile<kTileRows>(K, a + m * lda, lda, panel, c + m * ldc, ldc, width, accumulate);
  for (; m + 4 <= M; m += 4) gemm_tile<4>(K, a + m * lda, lda, panel, c + m * ldc, ldc, width, accumulate);
  for (; m < M; ++m) gemm_tile<1>(K, a + m * lda, lda, panel, c + m * ldc, ldc, width, accumulate);
}

template void pack_panel<float>(const float*, int64_t, bool, int64_t, int64_t, int64_t, float*);
template void pack_panel<double>(const double*, int64_t, bool, int64_t, int64_t, int64_t, double*);
template void gemm_panel<float>(int64_t, int64_t, const float*, int64_t, const float*, float*, int64_t, int64_t,
                                bool);
template void gemm_panel<double>(int64_t, int64_t, const double*, int64_t, const double*, double*, int64_t,
                                 int64_t, bool);

}  // namespace fusedrnn::cpu
