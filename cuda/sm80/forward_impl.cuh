// Host-side launch of the forward kernel for one (dtype, head dim).
#pragma once

#include "forward.cuh"
#include "launch.cuh"

namespace gna {
namespace sm80 {

// The forward with CTAs of kBlockM rows, `parts` of them per Q tile, kStages K/V step buffers
// and kStepTiles KV tiles per step. 128-row CTAs take two tiles per step in three buffers
// (~205 KB at D = 128); 64-row CTAs one tile in two buffers, so that two CTAs fit an SM.
// Where the card cannot give the shared memory, the fallbacks are two buffers (A100), then
// one tile per step (sm_86/89 at D = 128), then two 64-row CTAs per 128-token Q tile.
template <class T, int kD, int kBlockM, int kStages, int kStepTiles>
std::string run_forward(const Problem& p, const void* q, const void* k, const void* v,
                        void* out, float* lse, int parts, cudaStream_t stream) {
  using Tr = Traits<T, kD, kBlockM / 16>;
  const int smem = (int)sizeof(FwdSmem<Tr, kBlockM, kKvTokens, kStages, kStepTiles>);
  if (smem > max_smem_per_block()) {
    if constexpr (kStages > 2)
      return run_forward<T, kD, kBlockM, 2, kStepTiles>(p, q, k, v, out, lse, parts, stream);
    if constexpr (kStepTiles > 1)
      return run_forward<T, kD, kBlockM, 2, 1>(p, q, k, v, out, lse, parts, stream);
    if constexpr (kBlockM == 128)
      return run_forward<T, kD, 64, 2, 1>(p, q, k, v, out, lse, 2 * parts, stream);
  }
  auto kernel = fwd_kernel<Tr, kBlockM, kKvTokens, kStages, kStepTiles>;
  cudaError_t err = opt_in_smem(reinterpret_cast<const void*>(kernel), smem);
  if (err != cudaSuccess) return cuda_error("cudaFuncSetAttribute(forward)", err);
  const dim3 grid((unsigned)(grid_tiles(p, p.q_tile, /*kv_side=*/false) * parts),
                  (unsigned)p.heads, (unsigned)p.batch);
  kernel<<<grid, Tr::kThreads, smem, stream>>>(p, static_cast<const T*>(q),
                                               static_cast<const T*>(k),
                                               static_cast<const T*>(v), static_cast<T*>(out),
                                               lse, parts);
  return cuda_error("forward kernel launch", cudaGetLastError());
}

template <class T, int kD>
std::string launch_forward(const Problem& p, const void* q, const void* k, const void* v,
                           void* out, float* lse, cudaStream_t stream) {
  const int64_t q_tokens = p.q_tile[0] * p.q_tile[1] * p.q_tile[2];
  if (q_tokens <= 64) return run_forward<T, kD, 64, 2, 1>(p, q, k, v, out, lse, 1, stream);
  return run_forward<T, kD, 128, GNA_SM80_FWD_STAGES, GNA_SM80_FWD_STEP_TILES>(p, q, k, v, out,
                                                                             lse, 1, stream);
}

#define GNA_SM80_FORWARD(T, D)                                                             \
  template std::string launch_forward<T, D>(const Problem&, const void*, const void*,    \
                                            const void*, void*, float*, cudaStream_t);

}  // namespace sm80
}  // namespace gna
