// The order in which the sm90a forward's CTAs take the Q tiles of one (head, batch), and the
// pairs of Q tiles that see the same box of KV tiles: a cluster of two CTAs computes such a
// pair at once and multicasts K and V to both (forward_ws.cuh), which halves their reads
// from L2. (A timing probe that loaded half of every step's K/V ran 1.04-1.06x faster on the
// two-consumer problems and 1.09-1.13x on the one-consumer ones: cuda/sm90/NOTES.md.)
//
// Pairs are the tiles 2j and 2j+1 along one axis (`step` apart in the walk index of
// tile_walk_strides). With an odd count along that axis, the last tile of every line along
// it has no partner: those tiles run in a second launch without a cluster.
#pragma once

#include "../gna_geometry.h"
#include "../gna_problem.h"

namespace gna {
namespace sm90 {

struct TileOrder {
  enum Kind : int { kAll = 0, kPairs = 1, kLeftovers = 2 };
  int kind;
  int step;  // walk-index stride of the pair axis (kPairs, kLeftovers)
  int n;     // Q tiles along the pair axis

  // The walk index of the x-th tile of one (head, batch) in this order. kPairs: tiles 2u and
  // 2u+1 of the order are a pair (x even: the first), x < paired(tiles); kLeftovers: the
  // unpaired last tile of line x along the pair axis, x < leftovers(tiles); kAll: x.
  GNA_HD int pair_tile(int x) const {
    const int u = x >> 1, lo = u % step, line = u / step, m = n / 2;
    return ((line / m) * n + 2 * (line % m) + (x & 1)) * step + lo;
  }
  GNA_HD int leftover_tile(int x) const { return ((x / step) * n + n - 1) * step + x % step; }
  // Tiles of one (head, batch) in the kPairs and kLeftovers orders, of `tiles` in all.
  GNA_HD int paired(int tiles) const { return tiles / n * (n / 2) * 2; }
  GNA_HD int leftovers(int tiles) const { return n % 2 ? tiles / n : 0; }
};

// The pair axis for the Q tiles of `p`: the axis with the most pairs (2j, 2j+1) along it
// whose KV ranges agree for every j; {kAll} if none, or if the first Q tile sees fewer than
// `min_kv_tiles` KV tiles. Only problems without dilation pair (every Q tile is then in
// group 0, and no tile of a CTA's order is skipped). Host code.
inline TileOrder find_tile_pairs(const Problem& p, int64_t min_kv_tiles) {
  TileOrder best{TileOrder::kAll, 0, 1};
  AxisTiling tiling[kMaxRank];
  int64_t n[kMaxRank], kernel[kMaxRank], len[kMaxRank], step[kMaxRank];
  int64_t kv_tiles = 1;  // of the first Q tile
  for (int a = 0; a < kMaxRank; ++a) {
    if (p.axes[a].dilation != 1) return best;
    tiling[a] = group_tiling(p.axes[a], 0, p.q_tile[a], p.kv_tile[a]);
    int64_t lo, hi;
    tiling[a].kv_range(0, &lo, &hi);
    kv_tiles *= hi - lo;
    len[a] = p.axes[a].q_length;
    kernel[a] = p.axes[a].kernel;
    n[a] = tiling[a].n_q();
  }
  if (kv_tiles < min_kv_tiles) return best;
  tile_walk_strides<int64_t>(n, kernel, len, step);
  int64_t best_pairs = 0;
  for (int a = 0; a < kMaxRank; ++a) {
    bool same = n[a] >= 2;
    for (int64_t j = 0; same && 2 * j + 1 < n[a]; ++j) {
      int64_t lo0, hi0, lo1, hi1;
      tiling[a].kv_range(2 * j, &lo0, &hi0);
      tiling[a].kv_range(2 * j + 1, &lo1, &hi1);
      same = lo0 == lo1 && hi0 == hi1;
    }
    // The tiles that find a partner along the axis: all of them where n[a] is even.
    const int64_t pairs = n[a] / 2 * 2 * (n[0] * n[1] * n[2] / n[a]);
    if (same && pairs > best_pairs) {
      best_pairs = pairs;
      best = TileOrder{TileOrder::kPairs, (int)step[a], (int)n[a]};
    }
  }
  return best;
}

}  // namespace sm90
}  // namespace gna
