// The boxes of the backward's dK/dV CTAs (host code): the KV tile doubled along one axis for
// 128-row CTAs, and where the sm80 family takes them. jax_gna/geometry.py mirrors both
// (backward_kv_tile, backward_kv_rows) to choose the backward's tiles;
// tests/test_native_geometry.py checks that they agree.
#pragma once

#include <cstdint>

#include "gna_geometry.h"
#include "gna_problem.h"

namespace gna {

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
// dK/dV CTAs, whose KV rows share each Q/dO chunk and each dQ reduction (the sm90a fused
// backward's always; the sm80 family's where dkdv_rows_128).
inline Problem with_doubled_kv_tile(const Problem& p) {
  Problem d = p;
  d.kv_tile[doubled_kv_axis(p)] *= 2;
  return d;
}

// The (query, key) pairs that the tiles visit along axis `a`, with KV tiles of `kv_tile`
// there, summed over the axis's dilation groups. The tiles visited from a tile form a box,
// so a pass visits the product over the axes of these counts: two KV tile lengths along one
// axis compare by that axis's count alone. (Counted from the Q side, which a pass over the
// KV tiles visits pair for pair: one kv_range per Q tile, no searches, since the launch
// pays for it on the host every call.)
inline int64_t visited_pairs_along(const Problem& p, int a, int64_t kv_tile) {
  int64_t pairs = 0;
  for (int64_t g = 0; g < p.axes[a].dilation; ++g) {
    const AxisTiling t = group_tiling(p.axes[a], g, p.q_tile[a], kv_tile);
    for (int64_t qt = 0; qt < t.n_q(); ++qt) {
      int64_t lo, hi;
      t.kv_range(qt, &lo, &hi);
      pairs += (hi - lo) * t.q_tile * kv_tile;
    }
  }
  return pairs;
}

// Whether the dK/dV kernel runs 128-row CTAs (eight warps, one per SM) on with_doubled_kv_tile
// rather than 64-row ones (four warps, two per SM). They halve the Q/dO loads, the staging
// and the dQ atomics per pair, but where windows slide a doubled tile is seen by more Q
// tiles. H200, bf16, D = 128: 12 % faster on FLUX-4K and Hunyuan GNA (the same pairs), 8 % on
// 1-D 32k NA (the same pairs); 10 % slower on FLUX-4K NA (12 % more pairs) and 1 % on it with
// 8x8 Q tiles (6 % more). Hence: only where doubling adds at most 3 % of pairs. (The launch
// still falls back to 64 rows where 128-row CTAs do not fit shared memory: sm_86/89.)
inline bool dkdv_rows_128(const Problem& p) {
  const int a = doubled_kv_axis(p);
  return 100 * visited_pairs_along(p, a, 2 * p.kv_tile[a]) <=
         103 * visited_pairs_along(p, a, p.kv_tile[a]);
}

}  // namespace gna
