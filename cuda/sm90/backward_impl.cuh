// Host-side launch of the sm90a backward (the sm80 delta pass, then the dK/dV and dQ kernels)
// for one (dtype, head dim), instantiated in the backward_*.cu files.
#pragma once

#include <type_traits>

#include "../sm80/backward_impl.cuh"  // launch_dq_from_acc
#include "backward.cuh"
#include "backward_fused_ws.cuh"
#include "backward_ws.cuh"
#include "launch.cuh"

namespace gna {
namespace sm90 {

// Whether the backward's kernels after the delta pass launch as programmatic dependents of
// the kernel before them (grid_dependency.cuh): each starts its CTAs, barriers and geometry
// under the previous one's tail, and waits for it before touching global memory.
// JAX_GNA_SM90_BWD_PDL overrides it at run time.
#ifndef GNA_SM90_BWD_PDL
#define GNA_SM90_BWD_PDL 1
#endif

inline bool backward_pdl() { return env_policy("JAX_GNA_SM90_BWD_PDL", GNA_SM90_BWD_PDL) != 0; }

template <class Tr, class... Params, class... Args>
std::string run_bwd_kernel(void (*kernel)(Params...), int smem, const char* what, dim3 grid,
                           cudaStream_t stream, Args... args) {
  cudaError_t err = sm80::opt_in_smem(reinterpret_cast<const void*>(kernel), smem);
  if (err != cudaSuccess) return sm80::cuda_error(what, err);
  cudaLaunchConfig_t config = {};
  config.gridDim = grid;
  config.blockDim = dim3(Tr::kThreads);
  config.dynamicSmemBytes = smem;
  config.stream = stream;
  cudaLaunchAttribute pdl = dependent_launch_attribute();
  config.attrs = &pdl;
  config.numAttrs = backward_pdl() ? 1 : 0;
  err = cudaLaunchKernelEx(&config, kernel, args...);
  if (err != cudaSuccess) return sm80::cuda_error(what, err);
  return sm80::cuda_error(what, cudaGetLastError());
}

// Whether the dK/dV kernels load Q/dO chunks inside the frame as TMA boxes.
#ifndef GNA_SM90_BWD_TMA
#define GNA_SM90_BWD_TMA 1
#endif

// Without determinism (`dq_acc`: float32 scratch of dq's size): the fused kernel
// (backward_fused_ws.cuh) on the doubled KV tiles adds every step's dQ into dq_acc, then a
// conversion writes dq: five GEMMs per (query, key) pair instead of seven.
template <class T, int kD>
std::string launch_fused_backward(const Problem& p, const T* q, const T* k, const T* v,
                                  const T* dout, const float* lse, void* dq, void* dk, void* dv,
                                  const float* delta, float* dq_acc, CUtensorMapDataType dtype,
                                  cudaStream_t stream) {
  using Tr = FusedBwdTraits<T, kD, 2>;
  static_assert(fits_smem_per_sm(sizeof(FusedBwdSmem<Tr>), 1), "shared memory");
  const Problem pd = with_doubled_kv_tile(p);
  QTensorMaps maps;
  encode_q_maps(pd, q, dout, dtype, (int)sizeof(T), Tr::kBlockN, &maps, dq_acc);
  if (!GNA_SM90_BWD_TMA) maps.on = 0;
  const dim3 grid((unsigned)sm80::grid_tiles(pd, pd.kv_tile, /*kv_side=*/true),
                  (unsigned)p.kv_heads, (unsigned)p.batch);
  const int* kv_order = nullptr;
  std::string e = sm80::kv_tile_order(pd, 1, stream, &kv_order);
  if (!e.empty()) return e;
  e = run_bwd_kernel<Tr>(fused_bwd_kernel<Tr>, (int)sizeof(FusedBwdSmem<Tr>),
                         "sm90 fused backward kernel", grid, stream, pd, q, k, v, dout, lse,
                         delta, static_cast<T*>(dk), static_cast<T*>(dv), dq_acc, kv_order,
                         maps);
  if (!e.empty()) return e;
  return sm80::launch_dq_from_acc<T>(p, dq_acc, dq, stream, /*dependent=*/backward_pdl());
}

// After the delta pass:
// - with `dq_acc`, launch_fused_backward;
// - else (deterministic) dK/dV with one warpgroup per 64-token KV tile, 64 query rows per
//   step, Q/dO as TMA boxes where they can be (96 KB of shared memory at D = 128, two CTAs
//   per SM), then dQ (backward_ws.cuh): a 128-token Q tile with two consumer warpgroups and
//   K/V in a ring of 4 steps at D = 128 (about 200 KB) or 6 at D = 64; smaller Q tiles with
//   one consumer and a ring of 2 steps at D = 128 (96 KB, two CTAs per SM) or 4 at D = 64.
template <class T, int kD>
std::string launch_backward(const Problem& p, const void* q_, const void* k_, const void* v_,
                            const void* out, const void* dout_, const float* lse, void* dq,
                            void* dk, void* dv, float* delta, float* dq_acc,
                            cudaStream_t stream) {
  const T* q = static_cast<const T*>(q_);
  const T* k = static_cast<const T*>(k_);
  const T* v = static_cast<const T*>(v_);
  const T* dout = static_cast<const T*>(dout_);
  std::string e = sm80::launch_delta<T, kD>(p, out, dout_, delta, dq_acc, stream);
  if (!e.empty()) return e;
  const CUtensorMapDataType dtype = std::is_same_v<T, cutlass::bfloat16_t>
                                        ? CU_TENSOR_MAP_DATA_TYPE_BFLOAT16
                                        : CU_TENSOR_MAP_DATA_TYPE_FLOAT16;
  if (dq_acc != nullptr)
    return launch_fused_backward<T, kD>(p, q, k, v, dout, lse, dq, dk, dv, delta, dq_acc, dtype,
                                        stream);
  const dim3 kv_grid((unsigned)sm80::grid_tiles(p, p.kv_tile, /*kv_side=*/true),
                     (unsigned)p.kv_heads, (unsigned)p.batch);
  {
    using Tr = DkdvTraits<T, kD, kKvTokens, 64>;
    QTensorMaps maps;
    encode_q_maps(p, q, dout, dtype, (int)sizeof(T), Tr::kBlockN, &maps);
    if (!GNA_SM90_BWD_TMA) maps.on = 0;
    const int* kv_order = nullptr;
    e = sm80::kv_tile_order(p, Tr::kWarpGroups == 1 ? 2 : 1, stream, &kv_order);
    if (e.empty())
      e = run_bwd_kernel<Tr>(dkdv_kernel<Tr>, (int)sizeof(DkdvSmem<Tr>), "sm90 dkdv kernel",
                             kv_grid, stream, p, q, k, v, dout, lse, (const float*)delta,
                             static_cast<T*>(dk), static_cast<T*>(dv), kv_order, maps);
  }
  if (!e.empty()) return e;
  const dim3 grid((unsigned)sm80::grid_tiles(p, p.q_tile, /*kv_side=*/false),
                  (unsigned)p.heads, (unsigned)p.batch);
  auto run_dq = [&](auto traits) {
    using Tr = decltype(traits);
    static_assert(Tr::kBlockM <= kMaxQTokens && Tr::Ring::kTileRows == kKvTokens, "tiles");
    static_assert(fits_smem_per_sm(sizeof(WsDqSmem<Tr>), Tr::kCtasPerSm), "shared memory");
    KvTensorMaps maps;
    encode_kv_maps(p, k, v, dtype, (int)sizeof(T), Tr::Ring::kTileRows, &maps);
    return run_bwd_kernel<Tr>(ws_dq_kernel<Tr>, (int)sizeof(WsDqSmem<Tr>), "sm90 dq kernel",
                              grid, stream, p, q, k, v, dout, lse, (const float*)delta,
                              static_cast<T*>(dq), maps);
  };
  if (p.q_tile[0] * p.q_tile[1] * p.q_tile[2] <= 64)
    return run_dq(WsDqTraits<T, kD, 1, kD == 128 ? 2 : 4>{});
  return run_dq(WsDqTraits<T, kD, 2, kD == 128 ? 4 : 6>{});
}

#define GNA_SM90_BACKWARD(T, D)                                                             \
  template std::string launch_backward<T, D>(const Problem&, const void*, const void*,    \
                                             const void*, const void*, const void*,       \
                                             const float*, void*, void*, void*, float*,   \
                                             float*, cudaStream_t);

}  // namespace sm90
}  // namespace gna
