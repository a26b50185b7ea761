// The row blocks of a float32 weight gradient: sum over R = T*B rows of a^T b is ceil(R / kBlockRows) GEMMs over
// EQUAL shares of the rows, block k = [R*k/n, R*(k+1)/n) for n blocks, summed in float64 (weight_grads.h). The same
// rule as fusedrnn/epilogue.py's row_blocks (BLOCK_ROWS); tests/test_cpp.py pins the two through the binding.
#pragma once

#include <cstdint>

#include "common.h"

namespace fusedrnn::cpu {

constexpr int64_t kBlockRows = 2048;  // rows per float32 GEMM, at most

inline int64_t block_count(int64_t rows) { return ceil_div(rows, kBlockRows); }

// Rows of block k of `rows` rows.
inline Range row_block(int64_t rows, int64_t k) { return share(rows, k, block_count(rows)); }

}  // namespace fusedrnn::cpu
