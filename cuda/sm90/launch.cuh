// Host-side launch of the sm90a forward, one explicit instantiation per (dtype, head dim) in
// the forward_*.cu files so that the build parallelises over them; the backward's declaration.
#pragma once

#include <cuda_runtime.h>

#include <algorithm>
#include <cstdint>
#include <cstdlib>
#include <string>
#include <type_traits>

#include "../gna_problem.h"
#include "../grid_dependency.cuh"  // dependent_launch_attribute
#include "../sm80/launch.cuh"
#include "forward_ws.cuh"

namespace gna {
namespace sm90 {

constexpr int kKvTokens = sm80::kKvTokens;      // same tile limits as the sm80 kernels,
constexpr int kMaxQTokens = sm80::kMaxQTokens;  // so both run every tile-menu entry

// Whether `ctas` CTAs of `bytes` dynamic shared memory each fit on one SM (228 KB per SM on
// Hopper, 1 KB of it reserved per CTA; one CTA may take at most 227 KB).
constexpr bool fits_smem_per_sm(size_t bytes, int ctas) {
  return ctas * (bytes + 1024) <= 228 * 1024;
}

// Whether the warp-specialised forward loads whole KV tiles as TMA boxes (tensor_maps.h);
// 0 gathers every tile's rows (builds for comparisons set it).
#ifndef GNA_SM90_FWD_TMA
#define GNA_SM90_FWD_TMA 1
#endif

// Whether the forward's grid has one CTA per Q tile (0) or as many as the SMs hold at once,
// each computing every gridDim-th tile (1: forward_ws.cuh).
#ifndef GNA_SM90_FWD_PERSISTENT
#define GNA_SM90_FWD_PERSISTENT 1
#endif

// Whether the kernels whose K/V ring runs in its own warp (kKvWarp) load Q tiles that lie
// inside the Q frame as TMA boxes (tensor_maps.h encode_q_tile_map), instead of gathering
// their rows. JAX_GNA_SM90_FWD_Q_TMA overrides it at run time.
#ifndef GNA_SM90_FWD_Q_TMA
#define GNA_SM90_FWD_Q_TMA 1
#endif

// Where every KV tile is a TMA box, which forward kernels run the K/V ring in one producer
// warp (ws_fwd_kernel's kKvWarp): 0 none, 1 the one-consumer kernel (Q tiles of up to 64
// tokens), 2 both. JAX_GNA_SM90_FWD_KV_WARP overrides it at run time, for A/B runs of one
// build.
#ifndef GNA_SM90_FWD_KV_WARP
#define GNA_SM90_FWD_KV_WARP 2
#endif

// Where every KV tile is a TMA box and pairs of Q tiles see the same KV box (tile_pairs.h),
// whether clusters of two CTAs compute the pairs and multicast K and V: 0 never, 1 where the
// boxes hold at least kMulticastMinKvTiles KV tiles, 2 whatever their size (tests).
// JAX_GNA_SM90_FWD_MULTICAST overrides it at run time.
#ifndef GNA_SM90_FWD_MULTICAST
#define GNA_SM90_FWD_MULTICAST 1
#endif
// Boxes of fewer KV tiles run without clusters: the two CTAs of a cluster wait for each other
// at every buffer, which a Q tile of few steps pays for without reading much (1-D 32k GNA,
// 32 KV tiles: 0.95x with clusters; FLUX-4K GNA, 100: 1.02x; H200).
constexpr int64_t kMulticastMinKvTiles = 64;

// Whether the forward launches as a programmatic dependent of the kernel before it in the
// stream (grid_dependency.cuh): its CTAs may then start on the SMs that kernel's CTAs leave, and
// run their set-up (barriers, the first tile's decode and Q row table) under its tail; they
// touch global memory only once it has completed. JAX_GNA_SM90_FWD_PDL overrides it at run
// time.
#ifndef GNA_SM90_FWD_PDL
#define GNA_SM90_FWD_PDL 1
#endif

// The compiled default `compiled` of a policy, unless the environment variable `name` sets
// it (an integer), for A/B runs of one build.
inline int env_policy(const char* name, int compiled) {
  const char* env = std::getenv(name);
  return env != nullptr ? std::atoi(env) : compiled;
}

// One launch of ws_fwd_kernel<Tr, kKvWarp, kCluster> over the `items` Q tiles per (head,
// batch) of `order`: one CTA per tile, or persistent CTAs (as many as the SMs hold at once).
template <class Tr, bool kKvWarp, int kCluster>
std::string launch_ws_forward(const Problem& p, const void* q, const void* k, const void* v,
                              void* out, float* lse, const FwdTensorMaps& maps, int items,
                              TileOrder order, cudaStream_t stream) {
  using T = typename Tr::T;
  // The kernel decodes its work items in 32-bit arithmetic.
  if ((int64_t)items * p.heads * p.batch > INT32_MAX)
    return "sm90 ws forward: more than 2^31 - 1 (Q tile, head, batch) work items";
  auto kernel = ws_fwd_kernel<Tr, kKvWarp, kCluster>;
  const int smem = (int)sizeof(WsFwdSmem<Tr, kCluster>);
  cudaError_t err = sm80::opt_in_smem(reinterpret_cast<const void*>(kernel), smem);
  if (err != cudaSuccess) return sm80::cuda_error("cudaFuncSetAttribute(sm90 ws forward)", err);
  cudaLaunchConfig_t config = {};
  cudaLaunchAttribute attrs[2];
  int n_attrs = 0;
  if (kCluster > 1) {
    attrs[n_attrs].id = cudaLaunchAttributeClusterDimension;
    attrs[n_attrs].val.clusterDim.x = kCluster;
    attrs[n_attrs].val.clusterDim.y = 1;
    attrs[n_attrs].val.clusterDim.z = 1;
    ++n_attrs;
  }
  config.blockDim = dim3(Tr::kThreads);
  config.dynamicSmemBytes = smem;
  config.stream = stream;
  config.attrs = attrs;
  config.numAttrs = n_attrs;
  // CTAs stride over the tiles, so any grid size is correct (grid x is below 2^31; with
  // clusters, even, so that the two CTAs of a cluster take the two tiles of each pair).
  int64_t most = GNA_SM90_FWD_PERSISTENT ? sm80::sm_count() * Tr::kCtasPerSm : INT32_MAX;
  if (GNA_SM90_FWD_PERSISTENT && kCluster > 1) {
    int clusters = 0;
    config.gridDim = dim3((unsigned)(most / kCluster * kCluster));
    err = sm80::max_active_clusters(&clusters, reinterpret_cast<const void*>(kernel), config);
    if (err != cudaSuccess)
      return sm80::cuda_error("cudaOccupancyMaxActiveClusters(sm90 ws forward)", err);
    if (clusters > 0) most = std::min<int64_t>(most, (int64_t)clusters * kCluster);
  }
  // JAX_GNA_SM90_FWD_CTAS=n caps the grid at n CTAs, so that the small problems of the tests
  // and the sanitizers give every CTA several tiles.
  const int cap = env_policy("JAX_GNA_SM90_FWD_CTAS", 0);
  if (cap > 0) most = std::min<int64_t>(most, cap);
  most = std::max<int64_t>(most / kCluster * kCluster, kCluster);
  const int64_t ctas = std::min<int64_t>((int64_t)items * p.heads * p.batch, most);
  config.gridDim = dim3((unsigned)ctas);
  // (After the occupancy query, which takes the cluster attribute alone.)
  if (env_policy("JAX_GNA_SM90_FWD_PDL", GNA_SM90_FWD_PDL)) {
    attrs[n_attrs] = dependent_launch_attribute();
    config.numAttrs = ++n_attrs;
  }
  err = cudaLaunchKernelEx(&config, kernel, p, static_cast<const T*>(q),
                           static_cast<const T*>(k), static_cast<const T*>(v),
                           static_cast<T*>(out), lse, maps, items, order);
  if (err != cudaSuccess) return sm80::cuda_error("sm90 ws forward kernel launch", err);
  return sm80::cuda_error("sm90 ws forward kernel launch", cudaGetLastError());
}

// The warp-specialised forward (forward_ws.cuh) with kConsumers warpgroups of 64 Q rows.
template <class T, int kD, int kConsumers, int kStages, bool kPingPong>
std::string run_ws_forward(const Problem& p, const void* q, const void* k, const void* v,
                           void* out, float* lse, cudaStream_t stream) {
  using Tr = WsFwdTraits<T, kD, kConsumers, kStages, kPingPong>;
  static_assert(Tr::kTileRows == kKvTokens && Tr::kBlockM <= kMaxQTokens, "tile limits");
  static_assert(fits_smem_per_sm(sizeof(WsFwdSmem<Tr>), Tr::kCtasPerSm), "shared memory");
  static_assert(sizeof(WsFwdSmem<Tr, 2>) == sizeof(WsFwdSmem<Tr>), "same layout");
  FwdTensorMaps maps;
  maps.on = 0;
  maps.q_on = 0;
  const CUtensorMapDataType dtype = std::is_same_v<T, cutlass::bfloat16_t>
                                        ? CU_TENSOR_MAP_DATA_TYPE_BFLOAT16
                                        : CU_TENSOR_MAP_DATA_TYPE_FLOAT16;
  if (GNA_SM90_FWD_TMA) {
    encode_kv_maps(p, k, v, dtype, (int)sizeof(T), Tr::kTileRows, &maps);
    if (env_policy("JAX_GNA_SM90_FWD_Q_TMA", GNA_SM90_FWD_Q_TMA))
      maps.q_on = encode_q_tile_map(&maps.q, q, p, dtype, (int)sizeof(T), Tr::kBlockM);
  }
  const int kv_warp_policy = env_policy("JAX_GNA_SM90_FWD_KV_WARP", GNA_SM90_FWD_KV_WARP);
  const int multicast_policy = env_policy("JAX_GNA_SM90_FWD_MULTICAST", GNA_SM90_FWD_MULTICAST);
  bool boxes_only = maps.on != 0;
  for (int a = 0; a < kMaxRank; ++a)
    boxes_only = boxes_only && kv_tiles_inside(p.axes[a], p.kv_tile[a]);
  const bool kv_warp = boxes_only && kv_warp_policy >= kConsumers;
  const int q_tiles = (int)sm80::grid_tiles(p, p.q_tile, /*kv_side=*/false);
  const TileOrder all{TileOrder::kAll, 0, 1};
  if (!kv_warp)
    return launch_ws_forward<Tr, false, 1>(p, q, k, v, out, lse, maps, q_tiles, all, stream);
  const TileOrder pairs =
      multicast_policy ? find_tile_pairs(p, multicast_policy == 1 ? kMulticastMinKvTiles : 0)
                       : all;
  if (pairs.kind != TileOrder::kPairs)
    return launch_ws_forward<Tr, true, 1>(p, q, k, v, out, lse, maps, q_tiles, all, stream);
  std::string error = launch_ws_forward<Tr, true, 2>(p, q, k, v, out, lse, maps,
                                                     pairs.paired(q_tiles), pairs, stream);
  if (!error.empty() || pairs.leftovers(q_tiles) == 0) return error;
  TileOrder leftovers = pairs;
  leftovers.kind = TileOrder::kLeftovers;
  return launch_ws_forward<Tr, true, 1>(p, q, k, v, out, lse, maps, pairs.leftovers(q_tiles),
                                        leftovers, stream);
}

// Whether the consumers of 128-token Q tiles take turns to issue (ping-pong): 0.97-0.98x of
// free issue on H200, same run; builds for comparisons set it.
#ifndef GNA_SM90_FWD_PINGPONG
#define GNA_SM90_FWD_PINGPONG 0
#endif

// Q tiles of up to 64 tokens: one consumer warpgroup, one KV tile per step and two CTAs per
// SM (Q and two steps of K and V are 80 KB at D = 128; four steps at D = 64). Larger Q tiles:
// two consumers, two KV tiles per step (160 KB at D = 128; four steps at D = 64).
template <class T, int kD>
std::string launch_forward(const Problem& p, const void* q, const void* k, const void* v,
                           void* out, float* lse, cudaStream_t stream) {
  constexpr int kStages = kD == 128 ? 2 : 4;
  if (p.q_tile[0] * p.q_tile[1] * p.q_tile[2] <= 64)
    return run_ws_forward<T, kD, 1, kStages, false>(p, q, k, v, out, lse, stream);
  return run_ws_forward<T, kD, 2, kStages, GNA_SM90_FWD_PINGPONG != 0>(p, q, k, v, out, lse,
                                                                       stream);
}

// The sm90a backward (backward_impl.cuh; instantiated in the backward_*.cu files).
template <class T, int kD>
std::string launch_backward(const Problem& p, const void* q, const void* k, const void* v,
                            const void* out, const void* dout, const float* lse, void* dq,
                            void* dk, void* dv, float* delta, float* dq_acc,
                            cudaStream_t stream);

#define GNA_SM90_FORWARD(T, D)                                                             \
  template std::string launch_forward<T, D>(const Problem&, const void*, const void*,    \
                                            const void*, void*, float*, cudaStream_t);

}  // namespace sm90
}  // namespace gna
