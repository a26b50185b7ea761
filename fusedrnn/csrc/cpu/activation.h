// Elementwise nonlinearities the cell kernels inline: sigmoid(x) = 1 / (1 + e^-x) and
// tanh(x) = sign(x) (e^2|x| - 1) / (e^2|x| + 1), both saturating to exactly 0 / +-1 like torch's (a saturated
// gate's derivative s (1 - s) or 1 - g^2 is then exactly 0, which BPTT relies on to cancel huge states: see
// the factor order in lstm.cpp).
//
// float uses a branch-free exp (Cephes polynomial, ~1 ulp, range-reduced by 2^n) that the compiler
// vectorises; std::exp is a library call per element and would cost more than the GEMMs. tanh takes
// e^a - 1 from the same pieces without forming e^a (no cancellation near 0, where 1 - 2 / (1 + e^2x) loses
// all relative precision): <= 1.6 eps relative error on every float (checked exhaustively on [2^-30, 12]).
// NaN propagates (clamps are written so that a NaN compares false and passes through). double keeps the
// libm functions: it is the accuracy reference, not a speed target.
#pragma once

#include <cmath>
#include <cstdint>
#include <cstring>
#include <limits>

#include "common.h"

namespace fusedrnn::cpu {

// e^x = scale * (1 + q) for x in [-87.34, 88.38]: scale = 2^n, q = e^r - 1 with r = x - n ln2, |r| <= ln2 / 2.
FUSEDRNN_INLINE void exp_parts(float x, float& scale, float& q) {
  const float round = 12582912.0f;  // 1.5 * 2^23: adding it rounds to an integer
  float n = (x * 1.44269504088896341f + round) - round;
  float r = x - n * 0.693359375f + n * 2.12194440e-4f;  // x - n ln2, ln2 split hi/lo for exactness
  float p = 1.9875691500e-4f;
  p = p * r + 1.3981999507e-3f;
  p = p * r + 8.3334519073e-3f;
  p = p * r + 4.1665795894e-2f;
  p = p * r + 1.6666665459e-1f;
  p = p * r + 5.0000001201e-1f;
  q = p * r * r + r;
  uint32_t bits = (static_cast<uint32_t>(static_cast<int32_t>(n)) + 127u) << 23;
  std::memcpy(&scale, &bits, sizeof(scale));
}

// e^x; +inf above the range (so 1 / (1 + e^x) is exactly 0, as with libm), e^-87.34 below it (1 + that is 1).
FUSEDRNN_INLINE float exp_fast(float x) {
  const bool overflow = x > 88.3762626647949f;  // e^x of larger x overflows the 2^n scale
  x = overflow ? 88.3762626647949f : x;
  x = x < -87.3365447505531f ? -87.3365447505531f : x;  // below this 2^n would be denormal
  float scale, q;
  exp_parts(x, scale, q);
  return overflow ? std::numeric_limits<float>::infinity() : (q + 1.0f) * scale;
}

FUSEDRNN_INLINE float sigmoid(float x) { return 1.0f / (1.0f + exp_fast(-x)); }

FUSEDRNN_INLINE float tanh_(float x) {
  float a = 2.0f * std::fabs(x);
  a = a > 20.0f ? 20.0f : a;  // tanh(10) rounds to 1
  float scale, q;
  exp_parts(a, scale, q);
  const float em1 = scale * q + (scale - 1.0f);  // e^a - 1
  return std::copysign(em1 / (em1 + 2.0f), x);
}

FUSEDRNN_INLINE double sigmoid(double x) { return 1.0 / (1.0 + std::exp(-x)); }
FUSEDRNN_INLINE double tanh_(double x) { return std::tanh(x); }

}  // namespace fusedrnn::cpu
