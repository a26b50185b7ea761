// The cache sizes the scheduling heuristics (split.h) budget against, asked of the machine once per process
// (cache.cpp): /sys/devices/system/cpu/cpu0/cache (size and which CPUs share each level), else sysconf for L2, else
// the sizes of the 2-core EPYC the heuristics were measured on (1 MiB L2 per core, 32 MiB L3 for 2 cores).
// Declared here and read in its own unit, so the drivers' units do not parse the reading code (<fstream>).
#pragma once

#include <cstdint>

namespace fusedrnn::cpu {

struct CacheSizes {
  int64_t l2;           // bytes of one core's L2
  int64_t l3_per_core;  // bytes of L3 over the cores that share it
};

const CacheSizes& cache_sizes();

}  // namespace fusedrnn::cpu
