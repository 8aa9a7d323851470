// Launchers of the sm80 kernels, one explicit instantiation per (dtype, head dim) in the
// forward_*.cu / backward_*.cu files so that the build parallelises over them.
#pragma once

#include <cuda_runtime.h>

#include <string>

#include "../gna_problem.h"

namespace gna {
namespace sm80 {

constexpr int kKvTokens = 64;    // compiled KV tile (rows of K/V per tile)
constexpr int kMaxQTokens = 128; // largest compiled Q tile

// Number of CTAs along grid x for tiles of `tile` over the Q frame (or the K/V frame if
// `kv_side`) of all dilation groups (group 0 is the longest, so its tile count is used for
// every group; shorter groups' extra CTAs exit).
int64_t grid_tiles(const Problem& p, const int64_t* tile, bool kv_side);

std::string cuda_error(const char* what, cudaError_t err);

// The order in which a dK/dV grid over the KV tiles of `p` (kv_side grid_tiles along x)
// takes them, for grids of a few waves at `ctas_per_sm`: `*order` becomes a device array
// whose entry i is the tile (Group::init's flat index) of CTA i, the tiles with the most Q
// tiles to visit first, or null where the grid's own order stays (many waves,
// JAX_GNA_KV_ORDER=0, or no device memory left for the array; JAX_GNA_KV_ORDER=all orders
// grids of any length, to measure the wave limit). Where windows are clamped at an axis's
// ends, tiles near them are seen by up to 1.5x the Q tiles of the others (1-D 32k, window
// 2048, stride 256: 24 against 16); in grid order the last of them start in the last wave
// and the grid waits for them (a list schedule of 77.6 % of the busy time on 132 SMs,
// against 97 % longest first).
// The order is gna::kv_tiles_longest_first's (gna_kernels.h).
std::string kv_tile_order(const Problem& p, int ctas_per_sm, cudaStream_t stream,
                          const int** order);

// Shared memory a block of the current device may opt into (0 if the query fails).
// JAX_GNA_SM80_SMEM_LIMIT (bytes) lowers it, so that the paths of cards with less (sm_86/89:
// 99 KB) can be tested on larger ones.
int max_smem_per_block();
// Shared memory of one SM for all its resident blocks (0 if the query fails), lowered the
// same way.
int max_smem_per_sm();
// Streaming multiprocessors of the current device.
int sm_count();

// What a launch asks the runtime that has the same answer on every launch of a kernel on a
// device, asked once per (kernel, current device) and kept: each of these calls cost the
// host microseconds on every launch, on calls whose kernels run for tens of them.
// - opt_in_smem: cudaFuncSetAttribute(kernel, MaxDynamicSharedMemorySize, bytes), again only
//   where `bytes` exceeds what was set before.
// - max_active_clusters: cudaOccupancyMaxActiveClusters(kernel, config), for kernels whose
//   launch configurations differ only in grid size and stream.
// Failures are returned and not kept.
cudaError_t opt_in_smem(const void* kernel, int bytes);
cudaError_t max_active_clusters(int* clusters, const void* kernel,
                                const cudaLaunchConfig_t& config);

template <class T, int kD>
std::string launch_forward(const Problem& p, const void* q, const void* k, const void* v,
                           void* out, float* lse, cudaStream_t stream);

// delta = rowsum(dO · O) per query row, float32 [B, N, H]: the backward's first pass (the
// sm90a backward runs it too). Where `dq_acc` is not null, it also zeroes that float32
// accumulator (dq's shape).
template <class T, int kD>
std::string launch_delta(const Problem& p, const void* out, const void* dout, float* delta,
                         float* dq_acc, cudaStream_t stream);

// `dq_acc`: null for the deterministic backward, else the float32 dq accumulator.
template <class T, int kD>
std::string launch_backward(const Problem& p, const void* q, const void* k, const void* v,
                            const void* out, const void* dout, const float* lse, void* dq,
                            void* dk, void* dv, float* delta, float* dq_acc,
                            cudaStream_t stream);

}  // namespace sm80
}  // namespace gna
