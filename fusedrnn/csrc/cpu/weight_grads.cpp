// The epilogue's reductions (weight_grads.h): sums over rows of a^T b, float32 in the row blocks of blocks.h
// summed in float64 (fusedrnn/epilogue.py's rule and reason).
#include <ATen/ATen.h>
#include <ATen/Parallel.h>

#include <algorithm>

#include "api.h"
#include "blocks.h"
#include "weight_grads.h"

namespace fusedrnn::cpu {
namespace {

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

}  // namespace

at::Tensor sum_of_outer(std::initializer_list<std::pair<at::Tensor, at::Tensor>> parts) {
  int64_t rows = 0;
  for (const auto& part : parts) rows += part.first.size(0);
  const at::Tensor &a0 = parts.begin()->first, &b0 = parts.begin()->second;
  if (rows == 0) return at::zeros({a0.size(1), b0.size(1)}, a0.options());  // an empty batch
  const bool blocked = a0.scalar_type() == at::kFloat;
  at::Tensor block = at::empty({a0.size(1), b0.size(1)}, a0.options());
  BlockSum sum;
  int64_t k = 0, row = 0;  // the current block k covers rows rk of the concatenation
  Range rk = blocked ? row_block(rows, 0) : Range{0, rows};
  for (const auto& [a, b] : parts)
    for (int64_t r = 0; r < a.size(0);) {
      const int64_t n = std::min(a.size(0) - r, rk.end - row);
      const at::Tensor a_rows = a.narrow(0, r, n).t(), b_rows = b.narrow(0, r, n);
      if (row == rk.begin) at::mm_out(block, a_rows, b_rows);
      else block.addmm_(a_rows, b_rows);
      r += n;
      row += n;
      if (row == rk.end && row < rows) {
        sum.add(block);
        rk = row_block(rows, ++k);
      }
    }
  return sum.finish(block);
}

at::Tensor sum_of_outer(const at::Tensor& a, const at::Tensor& b) { return sum_of_outer({{a, b}}); }

}  // namespace fusedrnn::cpu
