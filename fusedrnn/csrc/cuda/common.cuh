// Device building blocks shared by every cell: dtype conversion, activations, and the block-wide
// "rows times batch vectors" product that is the only matrix work inside the recurrence.
//
//   block_matvec:  acc[b][r] = sum_k vec[b][k] * row_r[k]     for b < nb, r < R   (float32 accumulation)
//
// Rows come from a RowSource: a slice of a weight matrix in global memory (GlobalRows) or its copy in
// shared memory (SharedRows). Torch-free on purpose: CI compiles it with a bare nvcc.
#pragma once

#include <cuda_bf16.h>
#include <cuda_fp16.h>
#include <cuda_runtime.h>

#include <cstddef>

namespace fusedrnn::cuda {

constexpr int kThreads = 256;  // threads per block, 8 warps
constexpr int kBatchTile = 32;  // batch rows whose gate sums sit in shared memory at once
constexpr int kGroupB = 4;     // batch rows per warp item of block_matvec
constexpr int kGroupR = 8;     // weight rows per warp item; kGroupB * kGroupR must be 32 (one per lane)
static_assert(kGroupB * kGroupR == 32, "the transposing warp reduction leaves one sum per lane");

__device__ __forceinline__ float to_float(float v) { return v; }
__device__ __forceinline__ float to_float(__half v) { return __half2float(v); }
__device__ __forceinline__ float to_float(__nv_bfloat16 v) { return __bfloat162float(v); }

template <class T>
__device__ __forceinline__ T from_float(float v);
template <>
__device__ __forceinline__ float from_float<float>(float v) { return v; }
template <>
__device__ __forceinline__ __half from_float<__half>(float v) { return __float2half_rn(v); }
template <>
__device__ __forceinline__ __nv_bfloat16 from_float<__nv_bfloat16>(float v) { return __float2bfloat16_rn(v); }

__device__ __forceinline__ float sigmoid(float x) { return 1.f / (1.f + expf(-x)); }

// Rows of one block's slice of a row-major weight matrix (K columns). The slice has `gates` groups of
// `per_gate` rows; group g starts at matrix row g * gate_stride + start and only its first `valid` rows
// exist (the last block's slice may be cut short by H or P). Missing rows read as zeros.
template <class T>
struct GlobalRows {
  const T* w;
  int K, per_gate, valid, start, gate_stride;

  __device__ const T* row(int r) const {
    const int g = r / per_gate, u = r - g * per_gate;
    return u < valid ? w + (static_cast<size_t>(g) * gate_stride + start + u) * K : nullptr;
  }
};

// The same slice copied into shared memory, R x K, missing rows stored as zeros.
template <class T>
struct SharedRows {
  const T* w;
  int K;

  __device__ const T* row(int r) const { return w + static_cast<size_t>(r) * K; }
};

// Copy a slice of R rows into shared memory `dst`; the block must __syncthreads() before reading it.
template <class T>
__device__ SharedRows<T> stage_rows(const GlobalRows<T>& src, int R, T* dst) {
  for (int idx = threadIdx.x; idx < R * src.K; idx += blockDim.x) {
    const int r = idx / src.K, k = idx - r * src.K;
    const T* row = src.row(r);
    dst[idx] = row ? row[k] : from_float<T>(0.f);
  }
  return SharedRows<T>{dst, src.K};
}

// Sum each of the 32 values in v across the warp; afterwards lane l holds, in v[0], the sum of v[l].
// 31 shuffles instead of 32 x 5 for separate reductions: each round a lane keeps half of its values,
// sends the other half to its partner, and adds what it receives. kHalf is a template argument so every
// index into v is a compile-time constant (v stays in registers).
template <int kHalf = 16>
__device__ __forceinline__ void transpose_reduce(float (&v)[32], int lane) {
  const bool upper = lane & kHalf;
#pragma unroll
  for (int i = 0; i < kHalf; ++i) {
    const float send = upper ? v[i] : v[i + kHalf];
    const float keep = upper ? v[i + kHalf] : v[i];
    v[i] = keep + __shfl_xor_sync(0xffffffffu, send, kHalf);
  }
  if constexpr (kHalf > 1) transpose_reduce<kHalf / 2>(v, lane);
}

// acc[b * R + r] = sum_k vec[b * vec_stride + k] * rows.row(r)[k] for b < nb, r < R. All threads of the
// block call it; the caller synchronises before reading acc. vec: float32, nb rows of K, read through the
// caches (it was written by other blocks before the last grid barrier, never during this phase).
// Each warp item covers kGroupB batch rows x kGroupR weight rows: one weight load feeds kGroupB FMAs.
template <class T, class Rows>
__device__ void block_matvec(const Rows& rows, int R, int K, const float* vec, int vec_stride, int nb,
                             float* acc) {
  const int lane = threadIdx.x & 31, warp = threadIdx.x >> 5, warps = blockDim.x >> 5;
  const int b_groups = (nb + kGroupB - 1) / kGroupB, r_groups = (R + kGroupR - 1) / kGroupR;
  for (int item = warp; item < b_groups * r_groups; item += warps) {
    const int b_first = (item / r_groups) * kGroupB, r_first = (item % r_groups) * kGroupR;
    const T* w[kGroupR];
    const float* x[kGroupB];
#pragma unroll
    for (int c = 0; c < kGroupR; ++c) w[c] = r_first + c < R ? rows.row(r_first + c) : nullptr;
#pragma unroll
    for (int i = 0; i < kGroupB; ++i)
      x[i] = b_first + i < nb ? vec + static_cast<size_t>(b_first + i) * vec_stride : nullptr;
    float v[32] = {};
    for (int k = lane; k < K; k += 32) {
      float xk[kGroupB], wk[kGroupR];
#pragma unroll
      for (int i = 0; i < kGroupB; ++i) xk[i] = x[i] ? x[i][k] : 0.f;
#pragma unroll
      for (int c = 0; c < kGroupR; ++c) wk[c] = w[c] ? to_float(w[c][k]) : 0.f;
#pragma unroll
      for (int i = 0; i < kGroupB; ++i)
#pragma unroll
        for (int c = 0; c < kGroupR; ++c) v[i * kGroupR + c] = fmaf(xk[i], wk[c], v[i * kGroupR + c]);
    }
    transpose_reduce(v, lane);
    const int b = b_first + lane / kGroupR, r = r_first + lane % kGroupR;
    if (b < nb && r < R) acc[b * R + r] = v[0];
  }
}

}  // namespace fusedrnn::cuda
