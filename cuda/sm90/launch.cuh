// Host-side launch of the sm90a forward, one explicit instantiation per (dtype, head dim) in
// the forward_*.cu files so that the build parallelises over them; the backward's declaration.
#pragma once

#include <cuda_runtime.h>

#include <string>
#include <type_traits>

#include "../gna_problem.h"
#include "../sm80/launch.cuh"
#include "forward.cuh"
#include "forward_ws.cuh"

namespace gna {
namespace sm90 {

constexpr int kKvTokens = sm80::kKvTokens;      // same tile limits as the sm80 kernels,
constexpr int kMaxQTokens = sm80::kMaxQTokens;  // so both run every tile-menu entry

template <class T, int kD, int kBlockM, int kTilesPerStep, int kStages>
std::string run_forward(const Problem& p, const void* q, const void* k, const void* v,
                        void* out, float* lse, cudaStream_t stream) {
  using Tr = FwdTraits<T, kD, kBlockM, kKvTokens, kTilesPerStep, kStages>;
  auto kernel = fwd_kernel<Tr>;
  const int smem = (int)sizeof(FwdSmem<Tr>);
  cudaError_t err =
      cudaFuncSetAttribute(kernel, cudaFuncAttributeMaxDynamicSharedMemorySize, smem);
  if (err != cudaSuccess) return sm80::cuda_error("cudaFuncSetAttribute(sm90 forward)", err);
  const dim3 grid((unsigned)sm80::grid_tiles(p, p.q_tile, /*kv_side=*/false),
                  (unsigned)p.heads, (unsigned)p.batch);
  kernel<<<grid, Tr::kThreads, smem, stream>>>(p, static_cast<const T*>(q),
                                               static_cast<const T*>(k),
                                               static_cast<const T*>(v), static_cast<T*>(out),
                                               lse);
  return sm80::cuda_error("sm90 forward kernel launch", cudaGetLastError());
}

// Whether the warp-specialised forward loads whole KV tiles as TMA boxes (tensor_maps.h);
// 0 gathers every tile's rows (builds for comparisons set it).
#ifndef GNA_SM90_FWD_TMA
#define GNA_SM90_FWD_TMA 1
#endif

// The warp-specialised forward (forward_ws.cuh) for Q tiles of more than 64 tokens.
template <class T, int kD, int kStages, bool kPingPong>
std::string run_ws_forward(const Problem& p, const void* q, const void* k, const void* v,
                           void* out, float* lse, cudaStream_t stream) {
  using Tr = WsFwdTraits<T, kD, kStages, kPingPong>;
  static_assert(Tr::kTileRows == kKvTokens && Tr::kBlockM == kMaxQTokens, "tile limits");
  static_assert(sizeof(WsFwdSmem<Tr>) <= 227 * 1024, "shared memory per block");
  auto kernel = ws_fwd_kernel<Tr>;
  const int smem = (int)sizeof(WsFwdSmem<Tr>);
  cudaError_t err =
      cudaFuncSetAttribute(kernel, cudaFuncAttributeMaxDynamicSharedMemorySize, smem);
  if (err != cudaSuccess) return sm80::cuda_error("cudaFuncSetAttribute(sm90 ws forward)", err);
  KvTensorMaps maps;
  maps.on = 0;
  if (GNA_SM90_FWD_TMA)
    encode_kv_maps(p, k, v,
                   std::is_same_v<T, cutlass::bfloat16_t> ? CU_TENSOR_MAP_DATA_TYPE_BFLOAT16
                                                          : CU_TENSOR_MAP_DATA_TYPE_FLOAT16,
                   (int)sizeof(T), Tr::kTileRows, &maps);
  const dim3 grid((unsigned)sm80::grid_tiles(p, p.q_tile, /*kv_side=*/false),
                  (unsigned)p.heads, (unsigned)p.batch);
  kernel<<<grid, Tr::kThreads, smem, stream>>>(p, static_cast<const T*>(q),
                                               static_cast<const T*>(k),
                                               static_cast<const T*>(v), static_cast<T*>(out),
                                               lse, maps);
  return sm80::cuda_error("sm90 ws forward kernel launch", cudaGetLastError());
}

// Which forward runs the Q tiles of more than 64 tokens: 1 = warp-specialised, 2 = the same
// with the consumers' ping-pong (0.97-0.98x of 1 on H200, same run), 0 = forward.cuh (builds
// for comparisons set it).
#ifndef GNA_SM90_FWD_WS
#define GNA_SM90_FWD_WS 1
#endif

// KV tiles of the box per GEMM step of the 128-row variant: 2 gives Q·K^T an N of 128.
#ifndef GNA_SM90_FWD_TILES_PER_STEP
#define GNA_SM90_FWD_TILES_PER_STEP 2
#endif

// Q tiles of up to 64 tokens: forward.cuh with one warpgroup and one KV tile per step (96 KB
// of shared memory at D = 128, two CTAs per SM). Larger Q tiles: the warp-specialised forward
// (Q and two steps of K and V are 160 KB at D = 128; four steps at D = 64), or forward.cuh's
// 128-row variant in comparison builds.
template <class T, int kD>
std::string launch_forward(const Problem& p, const void* q, const void* k, const void* v,
                           void* out, float* lse, cudaStream_t stream) {
  constexpr int kPerStep = GNA_SM90_FWD_TILES_PER_STEP;
  const int64_t q_tokens = p.q_tile[0] * p.q_tile[1] * p.q_tile[2];
  if (q_tokens <= 64) return run_forward<T, kD, 64, 1, 3>(p, q, k, v, out, lse, stream);
  constexpr int kWsStages = kD == 128 ? 2 : 4;
  if constexpr (GNA_SM90_FWD_WS > 0)
    return run_ws_forward<T, kD, kWsStages, GNA_SM90_FWD_WS == 2>(p, q, k, v, out, lse, stream);
  else
    return run_forward<T, kD, 128, kPerStep, kPerStep == 1 ? 4 : 3>(p, q, k, v, out, lse,
                                                                     stream);
}

// The sm90a backward (backward_impl.cuh; instantiated in the backward_*.cu files).
template <class T, int kD>
std::string launch_backward(const Problem& p, const void* q, const void* k, const void* v,
                            const void* out, const void* dout, const float* lse, void* dq,
                            void* dk, void* dv, float* delta, cudaStream_t stream);

#define GNA_SM90_FORWARD(T, D)                                                             \
  template std::string launch_forward<T, D>(const Problem&, const void*, const void*,    \
                                            const void*, void*, float*, cudaStream_t);

}  // namespace sm90
}  // namespace gna
