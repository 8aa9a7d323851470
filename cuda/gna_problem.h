// One GNA problem as every native implementation sees it: the FFI handlers unpack their
// attributes into this struct once; the CPU handler and the CUDA kernels only read it.
#pragma once

#include <cstdint>

#include "gna_geometry.h"

namespace gna {

struct Problem {
  int rank;              // spatial axes in use, 1..3; axes[rank..] are {1, 1, 1, 1, false}
  int64_t batch;         // all leading (batch and vmapped) dimensions flattened
  int64_t heads;         // H (query heads)
  int64_t kv_heads;      // H_kv, H % H_kv == 0
  int64_t head_dim;      // D
  Axis axes[kMaxRank];
  int64_t q_tile[kMaxRank];   // tile shape over group indices; 1 on unused axes
  int64_t kv_tile[kMaxRank];
  float scale;
  bool deterministic;

  int64_t tokens() const {
    int64_t n = 1;
    for (int a = 0; a < kMaxRank; ++a) n *= axes[a].length;
    return n;
  }
};

}  // namespace gna
