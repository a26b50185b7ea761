// Small helpers the layer drivers share: optional tensors, time order, which (t, b) rows have a step.
#pragma once

#include <ATen/ATen.h>

#include <optional>

#include "api.h"

namespace fusedrnn::cpu {

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

// Variable lengths: row b only has steps t < lengths[b] (lengths: (B,) or null: every row has every step).
inline bool has_step(const int64_t* lengths, int64_t b, int64_t t) { return !lengths || lengths[b] > t; }

}  // namespace fusedrnn::cpu
