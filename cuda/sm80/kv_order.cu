// The order in which a dK/dV grid's CTAs take their KV tiles (see kv_tile_order in
// launch.cuh).
#include <algorithm>
#include <cstdlib>
#include <map>
#include <mutex>
#include <string>
#include <vector>

#include "../gna_kernels.h"
#include "common.cuh"
#include "launch.cuh"

namespace gna {

std::vector<int> kv_tiles_longest_first(const Problem& p) {
  const int n = (int)sm80::grid_tiles(p, p.kv_tile, /*kv_side=*/true);
  std::vector<int> steps(n), order(n);
  for (int t = 0; t < n; ++t) {
    sm80::Group G;
    int kt[kMaxRank];
    // A CTA's dK/dV loop runs over the Q tiles of this box (times a constant: heads per KV
    // head, chunks per tile); a tile past the end of a shorter dilation group has none.
    steps[t] = G.init(p, t, /*kv_side=*/true, kt) ? sm80::TileBox::seeing(G, p, kt).total : 0;
    order[t] = t;
  }
  // Stable: tiles of equal work keep the grid's walk order (tile_walk_strides), and its L2
  // reuse.
  std::stable_sort(order.begin(), order.end(),
                   [&](int x, int y) { return steps[x] > steps[y]; });
  return order;
}

namespace sm80 {
namespace {

// Grids of more waves than this keep their own order: their last wave is a small part of
// them, and the walk order's L2 reuse matters more.
constexpr int64_t kMaxOrderedWaves = 8;

// Everything that Group::init and TileBox::seeing read, with the device.
std::vector<int64_t> geometry_key(const Problem& p, int dev) {
  std::vector<int64_t> key{dev, p.rank};
  for (int a = 0; a < kMaxRank; ++a) {
    const Axis& ax = p.axes[a];
    key.insert(key.end(), {ax.length, ax.kernel, ax.stride, ax.dilation, (int64_t)ax.causal,
                           ax.q_offset, ax.q_length, ax.kv_offset, ax.kv_length, p.q_tile[a],
                           p.kv_tile[a]});
  }
  return key;
}

}  // namespace

std::string kv_tile_order(const Problem& p, int ctas_per_sm, cudaStream_t stream,
                          const int** order) {
  *order = nullptr;
  const char* env = std::getenv("JAX_GNA_KV_ORDER");
  const std::string mode = env != nullptr ? env : "";
  if (mode == "0") return {};
  const int64_t tiles = grid_tiles(p, p.kv_tile, /*kv_side=*/true);
  if (mode != "all" && tiles * p.kv_heads * p.batch > kMaxOrderedWaves * ctas_per_sm * sm_count())
    return {};
  int dev = 0;
  if (cudaError_t e = cudaGetDevice(&dev); e != cudaSuccess) return cuda_error("cudaGetDevice", e);
  // One device array per (device, geometry), kept for the process: a few bytes per tile, and
  // the host's weighing of every tile costs more than a call's launches.
  static std::mutex mutex;
  static std::map<std::vector<int64_t>, const int*> kept;
  const std::vector<int64_t> key = geometry_key(p, dev);
  std::lock_guard<std::mutex> lock(mutex);
  if (auto it = kept.find(key); it != kept.end()) {
    *order = it->second;
    return {};
  }
  const std::vector<int> host = kv_tiles_longest_first(p);
  int* device = nullptr;
  bool natural = true;
  for (int i = 0; i < (int)host.size(); ++i) natural = natural && host[i] == i;
  if (!natural) {
    const size_t bytes = host.size() * sizeof(int);
    // Where the device has no room for the array (XLA may hold most of it), the grid keeps
    // its own order: the order only schedules, and is not worth failing a call for.
    if (cudaMalloc(&device, bytes) != cudaSuccess) {
      (void)cudaGetLastError();  // clears the (non-sticky) allocation error
      device = nullptr;
    } else {
      // Waited for before the array is kept: a caller on another stream may find it in
      // `kept` and launch at once. (Once per geometry; the FFI target is not captured into
      // graphs.)
      cudaError_t e =
          cudaMemcpyAsync(device, host.data(), bytes, cudaMemcpyHostToDevice, stream);
      if (e == cudaSuccess) e = cudaStreamSynchronize(stream);
      if (e != cudaSuccess) {
        cudaFree(device);
        return cuda_error("copying the KV tile order", e);
      }
    }
  }
  kept[key] = device;
  *order = device;
  return {};
}

}  // namespace sm80
}  // namespace gna
