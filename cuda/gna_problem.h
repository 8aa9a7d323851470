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

// The axis along which with_doubled_kv_tile doubles the KV tile: the fastest one along which
// the KV tile is at most half the Q tile (the default menus' tiles then become the Q tile's
// shape, e.g. 8x8 -> 8x16), else the one with the most KV tiles.
inline int doubled_kv_axis(const Problem& p) {
  for (int a = p.rank - 1; a >= 0; --a)
    if (2 * p.kv_tile[a] <= p.q_tile[a]) return a;
  int axis = 0;
  int64_t most = 0;
  for (int a = p.rank - 1; a >= 0; --a) {
    const int64_t tiles = ceil_div(ceil_div(p.axes[a].kv_length, p.axes[a].dilation),
                                   p.kv_tile[a]);
    if (tiles > most) most = tiles, axis = a;
  }
  return axis;
}

// `p` with its KV tile doubled along doubled_kv_axis: the tile of the backward's 128-row
// dK/dV CTAs, whose KV rows share each Q/dO chunk and each dQ reduction
// (jax_gna/geometry.py's backward_kv_tile mirrors it).
inline Problem with_doubled_kv_tile(const Problem& p) {
  Problem d = p;
  d.kv_tile[doubled_kv_axis(p)] *= 2;
  return d;
}

}  // namespace gna
