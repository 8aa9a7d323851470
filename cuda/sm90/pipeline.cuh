// What the warp-specialised sm90a kernels (forward_ws.cuh, kv_ring.cuh, backward_ws.cuh,
// backward_fused_ws.cuh) share: named barriers, the producer's way of announcing a buffer
// on an mbarrier, and programmatic dependent launch.
#pragma once

#include <cutlass/arch/barrier.h>

#include <cstdint>

#include "../grid_dependency.cuh"  // wait_prior_grid, allow_next_grid (PDL)

namespace gna {
namespace sm90 {

// Named barriers (0 is __syncthreads): the producer warpgroup's own, then one per consumer
// warpgroup (the forward's ping-pong turns).
constexpr int kProducerBarrier = 1;
constexpr int kTurnBarrier = 2;
// The fused backward's (backward_fused_ws.cuh): both consumers' dS^T are stored, then one
// per consumer (its dQ columns are staged).
constexpr int kDsBarrier = 4;
constexpr int kDqBarrier = 5;
// The forward's two K/V ring warps pass the ring to each other between Q tiles: one barrier
// per receiving warp (6 and 7).
constexpr int kRingTurnBarrier = 6;

// L2 cache policy of the TMA loads (the "evict normal" createpolicy value).
constexpr uint64_t kEvictNormal = 0x1000000000000000ull;

__device__ __forceinline__ void named_sync(int id, int threads) {
  asm volatile("bar.sync %0, %1;" ::"r"(id), "r"(threads) : "memory");
}
__device__ __forceinline__ void named_arrive(int id, int threads) {
  asm volatile("bar.arrive %0, %1;" ::"r"(id), "r"(threads) : "memory");
}

// The producer thread's cp.async copies issued so far complete the barrier's phase together
// with the plain arrive (which releases the thread's earlier shared-memory writes); the
// barrier counts two arrivals per producer thread.
__device__ __forceinline__ void producer_commit(uint64_t* bar) {
  cutlass::arch::cpasync_barrier_arrive_noinc(bar);
  cutlass::arch::ClusterBarrier::arrive(bar);
}

}  // namespace sm90
}  // namespace gna
