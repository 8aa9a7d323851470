// Host-side launch of the backward kernels (delta, dK/dV with or without dQ, dQ, the dQ
// conversion) for one (dtype, head dim).
#pragma once

#include <algorithm>

#include "../backward_tiles.h"
#include "backward.cuh"
#include "launch.cuh"

namespace gna {
namespace sm80 {

// Q/dO buffers of the dK/dV kernel where shared memory allows (2 or 3, see run_dkdv).
#ifndef GNA_SM80_DKDV_STAGES
#define GNA_SM80_DKDV_STAGES 3
#endif

// Query rows per dK/dV step: fewer for D = 128 so that dK, dV, S^T and dP^T fit registers.
template <int kD>
constexpr int dkdv_chunk() {
  return kD == 128 ? 32 : 64;
}

// dK/dV with CTAs of kRows KV rows and kStages Q/dO buffers. Three buffers where the CTAs
// the registers allow per SM (two of 64 rows, one of 128) still fit its shared memory
// (H100/H200; not A100 at 64 rows, where that would cost the second CTA), else two; 128-row
// CTAs that do not fit with two fall back to 64 rows (sm_86/89). With `dq_acc` (float32,
// zeroed, dq's shape) it also adds every step's dQ into it.
template <class T, int kD, int kRows, int kStages = GNA_SM80_DKDV_STAGES>
std::string run_dkdv(const Problem& p, const T* q, const T* k, const T* v, const T* dout,
                     const float* lse, const float* delta, T* dk, T* dv, float* dq_acc,
                     cudaStream_t stream) {
  static_assert(kRows == 64 || kRows == 128, "64- or 128-row dK/dV CTAs");
  constexpr int kChunk = dkdv_chunk<kD>();
  using Tr = Traits<T, kD, kRows / 16>;
  const bool with_dq = dq_acc != nullptr;
  const int smem = with_dq ? (int)sizeof(DkdvSmem<Tr, kRows, kChunk, kStages, true>)
                           : (int)sizeof(DkdvSmem<Tr, kRows, kChunk, kStages, false>);
  constexpr int kCtasPerSm = kRows == 64 ? 2 : 1;
  constexpr int kReservedPerBlock = 1024;  // shared memory the driver keeps per block
  if (smem > max_smem_per_block() || kCtasPerSm * (smem + kReservedPerBlock) > max_smem_per_sm()) {
    if constexpr (kStages > 2)
      return run_dkdv<T, kD, kRows, 2>(p, q, k, v, dout, lse, delta, dk, dv, dq_acc, stream);
    else if constexpr (kRows == 128)
      return run_dkdv<T, kD, 64>(p, q, k, v, dout, lse, delta, dk, dv, dq_acc, stream);
  }
  auto kernel = with_dq ? dkdv_kernel<Tr, kRows, kChunk, kStages, true>
                        : dkdv_kernel<Tr, kRows, kChunk, kStages, false>;
  cudaError_t err = opt_in_smem(reinterpret_cast<const void*>(kernel), smem);
  if (err != cudaSuccess) return cuda_error("cudaFuncSetAttribute(dkdv)", err);
  const Problem pk = kRows == 128 ? with_doubled_kv_tile(p) : p;
  const dim3 grid((unsigned)grid_tiles(pk, pk.kv_tile, /*kv_side=*/true), (unsigned)p.kv_heads,
                  (unsigned)p.batch);
  const int* kv_order = nullptr;
  if (std::string e = kv_tile_order(pk, kCtasPerSm, stream, &kv_order); !e.empty()) return e;
  kernel<<<grid, Tr::kThreads, smem, stream>>>(pk, q, k, v, dout, lse, delta, dk, dv, dq_acc,
                                               kv_order);
  return cuda_error("dkdv kernel launch", cudaGetLastError());
}

// dq = T(dq_acc · scale) over the whole [B, N, H, D] accumulator; with `dependent`, as a
// programmatic dependent of the kernel before it (compute capability 9.0 on).
template <class T>
std::string launch_dq_from_acc(const Problem& p, const float* dq_acc, void* dq,
                               cudaStream_t stream, bool dependent = false) {
  const int64_t n8 = p.batch * p.q_tokens() * p.heads * p.head_dim / 8;
  cudaLaunchConfig_t config = {};
  config.gridDim = dim3((unsigned)std::min<int64_t>((n8 + 255) / 256, 8 * (int64_t)sm_count()));
  config.blockDim = dim3(256);
  config.stream = stream;
  cudaLaunchAttribute pdl = dependent_launch_attribute();
  config.attrs = &pdl;
  config.numAttrs = dependent ? 1 : 0;
  const cudaError_t err = cudaLaunchKernelEx(&config, dq_from_acc_kernel<T>,
                                             reinterpret_cast<const float4*>(dq_acc),
                                             static_cast<uint4*>(dq), n8, p.scale);
  if (err != cudaSuccess) return cuda_error("dq conversion kernel", err);
  return cuda_error("dq conversion kernel", cudaGetLastError());
}

// dQ with CTAs of kBlockM rows, `parts` of them per Q tile; kStages K/V buffers.
template <class T, int kD, int kBlockM, int kStages>
std::string run_dq(const Problem& p, const T* q, const T* k, const T* v, const T* dout,
                   const float* lse, const float* delta, T* dq, int parts,
                   cudaStream_t stream) {
  using Tr = Traits<T, kD, kBlockM / 16>;
  using Smem = DqSmem<Tr, kBlockM, kKvTokens, kStages>;
  const int smem_max = max_smem_per_block();
  if constexpr (kStages == 2) {
    if ((int)sizeof(Smem) > smem_max)
      return run_dq<T, kD, kBlockM, 1>(p, q, k, v, dout, lse, delta, dq, parts, stream);
  }
  if constexpr (kBlockM == 128) {
    if ((int)sizeof(Smem) > smem_max)  // two 64-row CTAs per Q tile
      return run_dq<T, kD, 64, kStages>(p, q, k, v, dout, lse, delta, dq, 2 * parts, stream);
  }
  auto kernel = dq_kernel<Tr, kBlockM, kKvTokens, kStages>;
  const int smem = (int)sizeof(Smem);
  cudaError_t err = opt_in_smem(reinterpret_cast<const void*>(kernel), smem);
  if (err != cudaSuccess) return cuda_error("cudaFuncSetAttribute(dq)", err);
  const dim3 grid((unsigned)(grid_tiles(p, p.q_tile, /*kv_side=*/false) * parts),
                  (unsigned)p.heads, (unsigned)p.batch);
  kernel<<<grid, Tr::kThreads, smem, stream>>>(p, q, k, v, dout, lse, delta, dq, parts);
  return cuda_error("dq kernel launch", cudaGetLastError());
}

template <class T, int kD>
std::string launch_delta(const Problem& p, const void* out, const void* dout, float* delta,
                         float* dq_acc, cudaStream_t stream) {
  const int64_t rows = p.batch * p.q_tokens() * p.heads;
  const int64_t threads = rows * (kD / 8);
  delta_kernel<T, kD><<<(unsigned)((threads + 255) / 256), 256, 0, stream>>>(
      rows, static_cast<const T*>(out), static_cast<const T*>(dout), delta, dq_acc);
  return cuda_error("delta kernel launch", cudaGetLastError());
}

// After the delta pass: with `dq_acc` (not p.deterministic) dK/dV and dQ in one kernel,
// then the conversion of the accumulator; else dK/dV, then the dQ kernel.
template <class T, int kD>
std::string launch_backward(const Problem& p, const void* q_, const void* k_, const void* v_,
                            const void* out_, const void* dout_, const float* lse, void* dq_,
                            void* dk_, void* dv_, float* delta, float* dq_acc,
                            cudaStream_t stream) {
  const T* q = static_cast<const T*>(q_);
  const T* k = static_cast<const T*>(k_);
  const T* v = static_cast<const T*>(v_);
  const T* dout = static_cast<const T*>(dout_);

  std::string e = launch_delta<T, kD>(p, out_, dout_, delta, dq_acc, stream);
  if (!e.empty()) return e;
  T* dk = static_cast<T*>(dk_);
  T* dv = static_cast<T*>(dv_);
  e = dkdv_rows_128(p) ? run_dkdv<T, kD, 128>(p, q, k, v, dout, lse, delta, dk, dv, dq_acc, stream)
                       : run_dkdv<T, kD, 64>(p, q, k, v, dout, lse, delta, dk, dv, dq_acc, stream);
  if (!e.empty()) return e;
  if (dq_acc != nullptr) return launch_dq_from_acc<T>(p, dq_acc, dq_, stream);

  const int64_t q_tokens = p.q_tile[0] * p.q_tile[1] * p.q_tile[2];
  if (q_tokens <= 64)
    return run_dq<T, kD, 64, 2>(p, q, k, v, dout, lse, delta, static_cast<T*>(dq_), 1, stream);
  return run_dq<T, kD, 128, 2>(p, q, k, v, dout, lse, delta, static_cast<T*>(dq_), 1, stream);
}

#define GNA_SM80_BACKWARD(T, D)                                                             \
  template std::string launch_delta<T, D>(const Problem&, const void*, const void*, float*,  \
                                          float*, cudaStream_t);                            \
  template std::string launch_backward<T, D>(const Problem&, const void*, const void*,    \
                                             const void*, const void*, const void*,       \
                                             const float*, void*, void*, void*, float*,   \
                                             float*, cudaStream_t);

}  // namespace sm80
}  // namespace gna
