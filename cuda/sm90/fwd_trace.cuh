// A diagnostic build of the sm90a forward (-DGNA_SM90_FWD_TRACE=1, never the default): where
// a persistent CTA's time goes between its tiles. Thread 0 of the first consumer warpgroup
// and thread 0 of the producer read %globaltimer at fixed points of every tile and add the
// phases' lengths into per-CTA sums (fire-and-forget atomics, so that no mark waits on
// memory); `sm80_check time` prints them per tile (gna_sm90_fwd_trace_report).
//
// Consumer phases of a tile: waiting for its Q (q_full), waiting for the first step's K,
// the first step (S, its wait and a softmax with no P·V under it), the other steps, the last
// P·V alone, the epilogue. Producer thread 0: decoding the next tile, then where it loads
// Q (the gathering kernels) waiting for a Q buffer and issuing Q, or where it is a ring warp
// taking turns (kKvWarp) waiting for its turn, and issuing the tile's K/V steps (mostly
// waiting for free buffers).
#pragma once

#if GNA_SM90_FWD_TRACE
#include <cuda_runtime.h>

#include <algorithm>
#include <cstdio>
#include <vector>

namespace gna {
namespace sm90 {

constexpr int kTraceCtas = 1024;

enum TracePhase : int {
  kTrQWait, kTrKWait, kTrFirstStep, kTrSteps, kTrLastPv, kTrEpilogue,  // consumer
  kTrDecode, kTrQIssue, kTrRing,                                        // producer
  kTrStartup,  // consumer: CTA entry to its first tile's Q
  kTrTail,     // consumer: last epilogue to exit
  // The first tile's path, per CTA, from entry (kKvWarp kernels): the first Q loader thread
  // has decoded it, has built the Q row table, has issued its Q; ring thread 0 starts filling
  // the ring for it (its first K TMA follows the ring's own set-up).
  kTrSuDecode, kTrSuTable, kTrSuGather, kTrSuRing,
  // Consumer, per tile: the epilogue's wait for the rows and its stmatrix part (kTrEpilogue
  // is then the copy-out); kKvWarp: how long before the consumers wanted the first step's K
  // the ring warp had issued that step's K and V (negative: after), and from then to K's
  // landing.
  kTrEpiRows, kTrEpiStsm, kTrKLead, kTrKFlight,
  // The first tile's path of ring thread 0 (kKvWarp kernels), from entry: past the CTA-wide
  // barrier, past the register release and the ring's set-up, its tile decoded (tile_of),
  // its KV box and full tiles known, past the wait for the prior grid; and the consumers'
  // thread 0 past its register allocation.
  kTrSuSync, kTrSuSetup, kTrSuTile, kTrSuBox, kTrSuWaited, kTrSuConsumers,
  kTrPhases
};

struct FwdTrace {
  unsigned long long sum[kTrPhases];
  unsigned long long tiles, steps, ctas;
  unsigned long long entry, exit;  // the last launch's (consumer thread 0)
};

static __device__ FwdTrace g_fwd_trace90[kTraceCtas];

__device__ __forceinline__ unsigned long long trace_now() {
  unsigned long long t;
  asm volatile("mov.u64 %0, %%globaltimer;" : "=l"(t));
  return t;
}

// Adds now - since to the CTA's sum of `phase`.
__device__ __forceinline__ void trace_since(int phase, unsigned long long since) {
  if (blockIdx.x < (unsigned)kTraceCtas)
    atomicAdd(&g_fwd_trace90[blockIdx.x].sum[phase], trace_now() - since);
}

// Adds a signed amount (ns) to the CTA's sum of `phase` (two's complement wraps back).
__device__ __forceinline__ void trace_add(int phase, long long v) {
  if (blockIdx.x < (unsigned)kTraceCtas)
    atomicAdd(&g_fwd_trace90[blockIdx.x].sum[phase], (unsigned long long)v);
}

// Adds now - *last to the CTA's sum of `phase` and moves *last to now.
__device__ __forceinline__ void trace_phase(int phase, unsigned long long* last) {
  const unsigned long long now = trace_now();
  if (blockIdx.x < (unsigned)kTraceCtas)
    atomicAdd(&g_fwd_trace90[blockIdx.x].sum[phase], now - *last);
  *last = now;
}

// Records the consumers' entry and exit times of this CTA in the last launch.
__device__ __forceinline__ void trace_span(unsigned long long entry) {
  if (blockIdx.x >= (unsigned)kTraceCtas) return;
  g_fwd_trace90[blockIdx.x].entry = entry;
  g_fwd_trace90[blockIdx.x].exit = trace_now();
}

__device__ __forceinline__ void trace_count(unsigned long long tiles, unsigned long long steps,
                                            unsigned long long ctas) {
  if (blockIdx.x >= (unsigned)kTraceCtas) return;
  atomicAdd(&g_fwd_trace90[blockIdx.x].tiles, tiles);
  atomicAdd(&g_fwd_trace90[blockIdx.x].steps, steps);
  atomicAdd(&g_fwd_trace90[blockIdx.x].ctas, ctas);
}

// Prints the phases per tile (µs) summed over every launch since the last report, then
// clears the sums.
static void report_fwd_trace() {
  std::vector<FwdTrace> tr(kTraceCtas);
  if (cudaMemcpyFromSymbol(tr.data(), g_fwd_trace90, kTraceCtas * sizeof(FwdTrace)) !=
      cudaSuccess) {
    std::printf("trace90: copy failed\n");
    return;
  }
  double sum[kTrPhases] = {}, tiles = 0, steps = 0, ctas = 0;
  for (const FwdTrace& c : tr) {
    for (int i = 0; i < kTrPhases; ++i) sum[i] += (double)(long long)c.sum[i];
    tiles += (double)c.tiles;
    steps += (double)c.steps;
    ctas += (double)c.ctas;
  }
  const double per = 1e-3 / (tiles > 0 ? tiles : 1), per_cta = 1e-3 / (ctas > 0 ? ctas : 1);
  std::printf(
      "trace90: %.1f tiles and %.1f steps per CTA; per tile (us): q wait %.2f, first K wait "
      "%.2f, first step %.2f, other steps %.2f (%.3f per step), last P.V %.2f, epilogue %.2f | "
      "producer: decode %.2f, Q issue or turn wait %.2f, ring %.2f | per CTA: start-up %.2f, "
      "tail %.2f; first tile from entry: decoded %.2f, Q table %.2f, Q issued %.2f, ring "
      "starts %.2f\n",
      tiles / (ctas > 0 ? ctas : 1), steps / (ctas > 0 ? ctas : 1), sum[kTrQWait] * per,
      sum[kTrKWait] * per, sum[kTrFirstStep] * per, sum[kTrSteps] * per,
      sum[kTrSteps] * 1e-3 / (steps - tiles > 0 ? steps - tiles : 1),
      sum[kTrLastPv] * per, sum[kTrEpilogue] * per, sum[kTrDecode] * per,
      sum[kTrQIssue] * per, sum[kTrRing] * per, sum[kTrStartup] * per_cta,
      sum[kTrTail] * per_cta, sum[kTrSuDecode] * per_cta, sum[kTrSuTable] * per_cta,
      sum[kTrSuGather] * per_cta, sum[kTrSuRing] * per_cta);
  std::printf("trace90 per tile (us): epilogue = rows wait %.2f + normalise and stmatrix %.2f + "
              "copy-out %.2f; first step's K and V issued %.2f before wanted, K landed %.2f after\n",
              sum[kTrEpiRows] * per, sum[kTrEpiStsm] * per, sum[kTrEpilogue] * per,
              sum[kTrKLead] * per, sum[kTrKFlight] * per);
  std::printf("trace90 first tile, ring thread 0 from entry (us): synced %.2f, set up %.2f, tile "
              "decoded %.2f, box known %.2f, prior grid waited %.2f; consumers allocated %.2f\n",
              sum[kTrSuSync] * per_cta, sum[kTrSuSetup] * per_cta, sum[kTrSuTile] * per_cta,
              sum[kTrSuBox] * per_cta, sum[kTrSuWaited] * per_cta,
              sum[kTrSuConsumers] * per_cta);
  // How the CTAs of the last launch spread: their entries, and their exits after the first
  // entry; and per CTA, the consumers' time per tile over every launch (the phases' sum
  // without start-up and tail, over the CTA's tiles).
  std::vector<double> exits, per_tile;
  unsigned long long first = ~0ull, last_entry = 0;
  for (const FwdTrace& c : tr)
    if (c.ctas > 0 && c.entry > 0) {
      first = std::min(first, c.entry);
      last_entry = std::max(last_entry, c.entry);
    }
  for (const FwdTrace& c : tr) {
    if (c.ctas == 0 || c.tiles == 0) continue;
    if (c.entry > 0) exits.push_back((double)(c.exit - first) * 1e-3);
    double busy = 0;
    for (int i = kTrQWait; i <= kTrEpilogue; ++i) busy += (double)c.sum[i];
    busy += (double)c.sum[kTrEpiRows] + (double)c.sum[kTrEpiStsm];
    per_tile.push_back(busy * 1e-3 / (double)c.tiles);
  }
  std::sort(exits.begin(), exits.end());
  std::sort(per_tile.begin(), per_tile.end());
  if (!exits.empty() && !per_tile.empty())
    std::printf("trace90 spread over %zu CTAs: entries within %.2f us; exits (us after the "
                "first entry) min %.1f, median %.1f, max %.1f; consumer us per tile min "
                "%.3f, median %.3f, max %.3f\n",
                exits.size(), (double)(last_entry - first) * 1e-3, exits.front(),
                exits[exits.size() / 2], exits.back(), per_tile.front(),
                per_tile[per_tile.size() / 2], per_tile.back());
  std::vector<FwdTrace> zero(kTraceCtas);
  cudaMemcpyToSymbol(g_fwd_trace90, zero.data(), kTraceCtas * sizeof(FwdTrace));
}

}  // namespace sm90
}  // namespace gna

#define GNA_FWD90_TRACE(...) __VA_ARGS__
#else
#define GNA_FWD90_TRACE(...)
#endif
