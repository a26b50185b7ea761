// The cell table both compiled backends share (cpu/ and cuda/): gates G and saved rows per hidden unit of each cell,
// the facts fusedrnn/cells.py registers. Both bindings return it (cell_constants()), and tests pin it to cells.py
// (tests/test_cpp.py, tests/test_cuda_emulation.py, .ci/cuda_build.sh). Saved rows: lstm i, f, g, o, c_t; gru r, z,
// n and h W_hn^T + b_hn; rnn none (the activation's derivative follows from y). Torch- and CUDA-free: the host
// compiler and nvcc both parse it.
#pragma once

#include <map>
#include <string>
#include <utility>

namespace fusedrnn {

struct CellConstants {
  const char* name;
  int gates, saved_rows;
};
inline constexpr CellConstants kLstm{"lstm", 4, 5}, kGru{"gru", 3, 4};
inline constexpr CellConstants kRnnTanh{"rnn_tanh", 1, 0}, kRnnRelu{"rnn_relu", 1, 0};
inline constexpr CellConstants kCells[] = {kLstm, kGru, kRnnTanh, kRnnRelu};

// {name: (gates, saved rows)}: what the bindings' cell_constants() returns (a dict of tuples in Python).
inline std::map<std::string, std::pair<int, int>> cell_table() {
  std::map<std::string, std::pair<int, int>> table;
  for (const CellConstants& c : kCells) table[c.name] = {c.gates, c.saved_rows};
  return table;
}

}  // namespace fusedrnn
