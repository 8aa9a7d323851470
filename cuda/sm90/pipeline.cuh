// What the warp-specialised sm90a kernels (forward_ws.cuh, kv_ring.cuh, backward_ws.cuh,
// backward_fused_ws.cuh) share: named barriers and the producer's way of announcing a buffer
// on an mbarrier.
#pragma once

#include <cutlass/arch/barrier.h>

#include <cstdint>

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

// Programmatic dependent launch (sm_90; launch.cuh sets the launch attribute): a grid may
// start while the grid before it in the stream still runs, and must not touch global memory
// that grid reads or writes until `wait_prior_grid` returns (it has completed, its writes are
// visible). `allow_next_grid` lets the next grid start as soon as every CTA of this one has
// signalled it or exited; both are no-ops where the launch did not ask for them.
__device__ __forceinline__ void wait_prior_grid() {
  asm volatile("griddepcontrol.wait;" ::: "memory");
}
__device__ __forceinline__ void allow_next_grid() {
  asm volatile("griddepcontrol.launch_dependents;" ::: "memory");
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
