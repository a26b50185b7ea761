// Shared by the CPU backend's kernels: SIMD vector types, runtime ISA dispatch, work splitting.
//
// Kernels are plain C++ loops and GCC vector extensions; FUSEDRNN_TARGETS compiles each hot function
// for AVX-512, AVX2 and baseline x86-64, and the loader picks the best the CPU has (an ifunc), so one
// build runs everywhere and uses AVX-512 where present.
#pragma once

#include <cstdint>

#if defined(__x86_64__) && defined(__GNUC__) && !defined(__clang__)
#define FUSEDRNN_TARGETS __attribute__((target_clones("arch=x86-64-v4", "arch=x86-64-v3", "default")))
#else
#define FUSEDRNN_TARGETS
#endif
#define FUSEDRNN_INLINE __attribute__((always_inline)) inline

namespace fusedrnn::cpu {

// 64 bytes of T: one AVX-512 register (two AVX2 / four SSE registers where the CPU lacks it).
template <class T>
struct Vec;
template <>
struct Vec<float> {
  typedef float type __attribute__((vector_size(64)));
};
template <>
struct Vec<double> {
  typedef double type __attribute__((vector_size(64)));
};
template <class T>
constexpr int64_t kLanes = 64 / sizeof(T);

// The contiguous share [begin, end) of n items that worker `part` of `parts` owns.
struct Range {
  int64_t begin, end;
};
inline Range share(int64_t n, int64_t part, int64_t parts) { return {n * part / parts, n * (part + 1) / parts}; }

inline int64_t ceil_div(int64_t a, int64_t b) { return (a + b - 1) / b; }

}  // namespace fusedrnn::cpu
