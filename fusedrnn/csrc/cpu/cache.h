// The cache sizes the scheduling heuristics (split.h) budget against, asked of the machine once per process:
// /sys/devices/system/cpu/cpu0/cache (size and which CPUs share each level), else sysconf for L2, else the sizes
// of the 2-core EPYC the heuristics were measured on (1 MiB L2 per core, 32 MiB L3 for 2 cores).
#pragma once

#include <unistd.h>

#include <cstdint>
#include <fstream>
#include <string>

namespace fusedrnn::cpu {

struct CacheSizes {
  int64_t l2;           // bytes of one core's L2
  int64_t l3_per_core;  // bytes of L3 over the cores that share it
};

// "1024K", "32M", "65536" -> bytes; 0 if unreadable.
inline int64_t parse_cache_size(const std::string& text) {
  size_t used = 0;
  int64_t value = 0;
  try {
    value = std::stoll(text, &used);
  } catch (...) {
    return 0;
  }
  const char unit = used < text.size() ? text[used] : ' ';
  return unit == 'K' ? value << 10 : unit == 'M' ? value << 20 : unit == 'G' ? value << 30 : value;
}

// "0-1", "0,2,4-7" -> the number of CPUs listed (at least 1).
inline int64_t count_cpus(const std::string& list) {
  int64_t count = 0;
  size_t at = 0;
  while (at < list.size()) {
    const size_t comma = list.find(',', at), end = comma == std::string::npos ? list.size() : comma;
    const std::string part = list.substr(at, end - at);
    const size_t dash = part.find('-');
    try {
      count += dash == std::string::npos ? 1 : std::stoll(part.substr(dash + 1)) - std::stoll(part.substr(0, dash)) + 1;
    } catch (...) {
      return 1;
    }
    at = end + 1;
  }
  return count > 0 ? count : 1;
}

inline std::string read_line(const std::string& path) {
  std::ifstream file(path);
  std::string line;
  std::getline(file, line);
  return line;
}

inline CacheSizes read_cache_sizes() {
  CacheSizes sizes{0, 0};
  for (int index = 0; index < 8; ++index) {
    const std::string dir = "/sys/devices/system/cpu/cpu0/cache/index" + std::to_string(index) + "/";
    const std::string level = read_line(dir + "level"), type = read_line(dir + "type");
    if (level.empty()) break;
    if (type == "Instruction") continue;
    const int64_t bytes = parse_cache_size(read_line(dir + "size"));
    if (level == "2") sizes.l2 = bytes;
    if (level == "3") sizes.l3_per_core = bytes / count_cpus(read_line(dir + "shared_cpu_list"));
  }
#ifdef _SC_LEVEL2_CACHE_SIZE
  if (sizes.l2 <= 0) sizes.l2 = sysconf(_SC_LEVEL2_CACHE_SIZE);
#endif
  if (sizes.l2 <= 0) sizes.l2 = int64_t(1) << 20;
  if (sizes.l3_per_core <= 0) sizes.l3_per_core = int64_t(16) << 20;
  return sizes;
}

inline const CacheSizes& cache_sizes() {
  static const CacheSizes sizes = read_cache_sizes();
  return sizes;
}

}  // namespace fusedrnn::cpu
