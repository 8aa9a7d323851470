// One GNA problem as every native implementation sees it: the FFI handlers unpack their
// attributes into this struct once; the CPU handler and the CUDA kernels only read it.
#pragma once

#include <cstdint>

#include "gna_geometry.h"

namespace gna {

struct Problem {
  int rank;              // spatial axes in use, 1..3; unused axes: unframed_axis(1, 1, 1, 1, false)
  int64_t batch;         // all leading (batch and vmapped) dimensions flattened
  int64_t heads;         // H (query heads)
  int64_t kv_heads;      // H_kv, H % H_kv == 0
  int64_t head_dim;      // D
  Axis axes[kMaxRank];   // global axes with the Q and K/V frames (gna_geometry.h)
  int64_t q_tile[kMaxRank];   // tile shape over group indices; 1 on unused axes
  int64_t kv_tile[kMaxRank];
  float scale;
  bool deterministic;

  // Spatial tokens per batch element of the Q buffer (q, out, lse, dout, dq).
  int64_t q_tokens() const {
    int64_t n = 1;
    for (int a = 0; a < kMaxRank; ++a) n *= axes[a].q_length;
    return n;
  }

  // Spatial tokens per batch element of the K/V buffers (k, v, dk, dv).
  int64_t kv_tokens() const {
    int64_t n = 1;
    for (int a = 0; a < kMaxRank; ++a) n *= axes[a].kv_length;
    return n;
  }
};

}  // namespace gna
