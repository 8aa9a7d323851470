// Host-side launch of the sm90a backward (the sm80 delta pass, then the dK/dV and dQ kernels)
// for one (dtype, head dim), instantiated in the backward_*.cu files.
#pragma once

#include "backward.cuh"
#include "launch.cuh"

namespace gna {
namespace sm90 {

template <class Tr, class Kernel, class... Args>
std::string run_bwd_kernel(Kernel kernel, int smem, const char* what, dim3 grid,
                           cudaStream_t stream, Args... args) {
  cudaError_t err =
      cudaFuncSetAttribute(kernel, cudaFuncAttributeMaxDynamicSharedMemorySize, smem);
  if (err != cudaSuccess) return sm80::cuda_error(what, err);
  kernel<<<grid, Tr::kThreads, smem, stream>>>(args...);
  return sm80::cuda_error(what, cudaGetLastError());
}

// dK/dV: one warpgroup per 64-token KV tile, 64 query rows per step; 96 KB of shared memory
// at D = 128, two CTAs per SM. dQ: one warpgroup per 64 rows of the Q tile, one KV tile per
// step; 128 KB for the 128-row Q tile (one CTA per SM), 96 KB for the 64-row one.
template <class T, int kD>
std::string launch_backward(const Problem& p, const void* q_, const void* k_, const void* v_,
                            const void* out, const void* dout_, const float* lse, void* dq,
                            void* dk, void* dv, float* delta, cudaStream_t stream) {
  const T* q = static_cast<const T*>(q_);
  const T* k = static_cast<const T*>(k_);
  const T* v = static_cast<const T*>(v_);
  const T* dout = static_cast<const T*>(dout_);
  std::string e = sm80::launch_delta<T, kD>(p, out, dout_, delta, stream);
  if (!e.empty()) return e;
  {
    using Tr = BwdTraits<T, kD, kKvTokens, 64>;
    const dim3 grid((unsigned)sm80::grid_tiles(p, p.kv_tile, /*kv_side=*/true),
                    (unsigned)p.kv_heads, (unsigned)p.batch);
    e = run_bwd_kernel<Tr>(dkdv_kernel<Tr>, (int)sizeof(BwdSmem<Tr, KRow, QRow>),
                           "sm90 dkdv kernel", grid, stream, p, q, k, v, dout, lse,
                           (const float*)delta, static_cast<T*>(dk), static_cast<T*>(dv));
    if (!e.empty()) return e;
  }
  const dim3 grid((unsigned)sm80::grid_tiles(p, p.q_tile, /*kv_side=*/false),
                  (unsigned)p.heads, (unsigned)p.batch);
  auto run_dq = [&](auto traits) {
    using Tr = decltype(traits);
    return run_bwd_kernel<Tr>(dq_kernel<Tr>, (int)sizeof(BwdSmem<Tr, QRow, KRow>),
                              "sm90 dq kernel", grid, stream, p, q, k, v, dout, lse,
                              (const float*)delta, static_cast<T*>(dq));
  };
  if (p.q_tile[0] * p.q_tile[1] * p.q_tile[2] <= 64)
    return run_dq(BwdTraits<T, kD, 64, kKvTokens>{});
  return run_dq(BwdTraits<T, kD, 128, kKvTokens>{});
}

#define GNA_SM90_BACKWARD(T, D)                                                             \
  template std::string launch_backward<T, D>(const Problem&, const void*, const void*,    \
                                             const void*, const void*, const void*,       \
                                             const float*, void*, void*, void*, float*,   \
                                             cudaStream_t);

}  // namespace sm90
}  // namespace gna
