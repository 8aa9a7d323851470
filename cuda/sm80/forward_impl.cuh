// Host-side launch of the forward kernel for one (dtype, head dim).
#pragma once

#include "forward.cuh"
#include "launch.cuh"

namespace gna {
namespace sm80 {

// The forward with CTAs of kBlockM rows, `parts` of them per Q tile; a 128-row CTA whose
// shared memory the card cannot give (sm_86/89 at D = 128: ~104 KB against 99 KB) becomes
// two 64-row CTAs.
template <class T, int kD, int kBlockM>
std::string run_forward(const Problem& p, const void* q, const void* k, const void* v,
                        void* out, float* lse, int parts, cudaStream_t stream) {
  using Tr = Traits<T, kD, kBlockM / 16>;
  const int smem = (int)sizeof(FwdSmem<Tr, kBlockM, kKvTokens>);
  if constexpr (kBlockM == 128) {
    if (smem > max_smem_per_block())
      return run_forward<T, kD, 64>(p, q, k, v, out, lse, 2 * parts, stream);
  }
  auto kernel = fwd_kernel<Tr, kBlockM, kKvTokens>;
  cudaError_t err =
      cudaFuncSetAttribute(kernel, cudaFuncAttributeMaxDynamicSharedMemorySize, smem);
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
  if (q_tokens <= 64) return run_forward<T, kD, 64>(p, q, k, v, out, lse, 1, stream);
  return run_forward<T, kD, 128>(p, q, k, v, out, lse, 1, stream);
}

#define GNA_SM80_FORWARD(T, D)                                                             \
  template std::string launch_forward<T, D>(const Problem&, const void*, const void*,    \
                                            const void*, void*, float*, cudaStream_t);

}  // namespace sm80
}  // namespace gna
