// The K/V ring of the warp-specialised kernels that walk the box of KV tiles a Q tile sees
// (forward_ws.cuh, and the dQ kernel of backward_ws.cuh): shared-memory buffers for kStages
// steps of kPerStep 64-token KV tiles, the row tables of the steps, the mbarriers, the
// producer's loop that fills them and the consumers' side of the handshake.
//
// The producer loads tiles that lie inside the frame as TMA boxes (tensor_maps.h) and
// gathers the others' rows with cp.async; a buffer's mbarrier completes when its TMA bytes
// and gathers have landed and the producer's row tables are written. Consumers wait for K
// and V of a step separately and release each once read (one arrival per warp).
#pragma once

#include <cute/arch/cluster_sm90.hpp>

#include "pipeline.cuh"
#include "tensor_maps.h"
#include "wgmma.cuh"

namespace gna {
namespace sm90 {

using namespace cute;

// kCluster = 2: the ring of each CTA of a cluster of two that compute Q tiles with the same
// KV boxes (tile_pairs.h). Each CTA loads half of every step's TMA boxes and multicasts them
// to both rings, so a buffer is free only once the consumers of both CTAs have released it:
// they arrive on the empty barriers of both.
template <class T, int kD, int kPerStep, int kStages, int kConsumerWarps, int kCluster = 1>
struct KvRing {
  static_assert(kCluster == 1 || kCluster == 2, "clusters of one or two CTAs");
  using Barrier = cutlass::arch::ClusterBarrier;
  static constexpr int kTileRows = 64;  // K/V rows of one KV tile of the box
  static constexpr int kRows = kTileRows * kPerStep;
  // Row tables of step j live in slot j % kRowSlots. The producer writes step j+1's once K of
  // step j-kStages is released, and a consumer may release K(j) before it reads step j's
  // rows (the forward frees K as soon as S has retired), but only after it has read step
  // j-1's: two more slots than buffers.
  static constexpr int kRowSlots = kStages + 2;
  using SmemK = SmemKMajor<T, kRows, kD>;
  // A buffer seen MN-major as [D, rows] (operand B of P·V, and of dS·K): atoms tiled along
  // the rows first, which maps every element where SmemK does, so V is written (and a TMA
  // box lands) exactly like K.
  using SmemT = decltype(tile_to_shape(GMMA::Layout_MN_SW128_Atom<T>{},
                                       Shape<Int<kD>, Int<kRows>>{}, Step<_2, _1>{}));

  alignas(1024) T k[kStages][kRows * kD];
  alignas(1024) T v[kStages][kRows * kD];
  KRow krows[kRowSlots][kRows];  // tokens of the gathered tiles
  alignas(16) int origins[kRowSlots][kPerStep][4];  // first row's group indices, or kNoTile
  int full[kRowSlots];           // the step needs no element mask
  TileBits tile_bits;            // the mask words' constants of the problem's KV tile
  uint64_t k_full[kStages], v_full[kStages];    // producer → consumers
  uint64_t k_empty[kStages], v_empty[kStages];  // consumers → producer

  // By one thread, before the CTA barrier that precedes the roles; `producers` threads run
  // produce (128, or one warp with kBoxesOnly).
  __device__ __forceinline__ void init(int producers = 128) {
    for (int s = 0; s < kStages; ++s) {
      Barrier::init(&k_full[s], 2 * producers);  // two arrivals per producer thread
      Barrier::init(&v_full[s], 2 * producers);
      Barrier::init(&k_empty[s], kConsumerWarps * kCluster);
      Barrier::init(&v_empty[s], kConsumerWarps * kCluster);
    }
  }

  // Buffer s seen K-major as [rows, D] (sK, sV) or MN-major as [D, rows] (sKt, sVt).
  __device__ __forceinline__ auto sK(int s) { return make_tensor(make_smem_ptr(k[s]), SmemK{}); }
  __device__ __forceinline__ auto sV(int s) { return make_tensor(make_smem_ptr(v[s]), SmemK{}); }
  __device__ __forceinline__ auto sKt(int s) { return make_tensor(make_smem_ptr(k[s]), SmemT{}); }
  __device__ __forceinline__ auto sVt(int s) { return make_tensor(make_smem_ptr(v[s]), SmemT{}); }

  // ---------------------------------------------------------------------------- consumers
  // Waits until K (or V) of step `it` has landed; the fence orders the cp.async writes
  // (generic proxy) before the wgmma reads (async proxy).
  __device__ __forceinline__ void wait_k(int it) {
    Barrier::wait(&k_full[it % kStages], (it / kStages) & 1);
    cutlass::arch::fence_view_async_shared();
  }
  __device__ __forceinline__ void wait_v(int it) {
    Barrier::wait(&v_full[it % kStages], (it / kStages) & 1);
    cutlass::arch::fence_view_async_shared();
  }
  // K(it) and the step's rows (or V(it)) are no longer read by this warp.
  __device__ __forceinline__ void release_k(int it) { release(&k_empty[it % kStages]); }
  __device__ __forceinline__ void release_v(int it) { release(&v_empty[it % kStages]); }
  __device__ __forceinline__ static void release(uint64_t* empty) {
    __syncwarp();
    const int lane = threadIdx.x % 32;
    if constexpr (kCluster == 1) {
      if (lane == 0) Barrier::arrive(empty);
    } else if (lane < kCluster) {
      Barrier::arrive(empty, /*cta_id=*/lane, /*pred=*/1);  // lane r: CTA r's barrier
    }
  }
  __device__ __forceinline__ bool is_full(int it) const { return full[it % kRowSlots] != 0; }
  // The element mask of step `it` for Q rows `qrows` (read only where the step is not full).
  __device__ __forceinline__ sm80::BitsMask<kPerStep> mask(int it, const QRow* qrows) const {
    return {qrows, origins[it % kRowSlots], &tile_bits};
  }

  // ----------------------------------------------------------------------------- producer
  // Once per CTA, before the first produce: read by the consumers once step 0's K has landed.
  __device__ __forceinline__ void setup(Problem const& p, KvTensorMaps const& maps, int tid) {
    if (tid == 0 && maps.on) {
      prefetch_tma_descriptor(&maps.k);
      prefetch_tma_descriptor(&maps.v);
    }
    if (tid == 0) tile_bits = TileBits::of(p.kv_tile);
  }

  // Fills the ring for the `steps` steps of the box (kPerStep tiles each) from the K and V
  // rows of the CTA's batch and KV head (`kb`, `vb`); run by the 128 producer threads. The
  // ring counts steps over the CTA's Q tiles: this box's steps are base .. base + steps - 1
  // for the buffers, phases and row slots (the consumers pass the same indices).
  // `after_first` runs once step 0's loads are issued (or at once without steps): work the
  // consumers do not need before their first step goes there, off its critical path.
  // kBoxesOnly: every KV tile of the problem is a TMA box (maps.on and kv_tiles_inside on
  // every axis, gna_geometry.h). Nothing is gathered, so the producer may be one warp
  // (tid < 32, init(32)), and a step's slots past the end of the box load the box's first
  // tiles (the walk wraps) as boxes too instead of zeros: the mask gives their columns
  // weight 0, which leaves O exact for finite inputs.
  template <bool kBoxesOnly = false, class AfterFirst>
  __device__ __forceinline__ void produce(Problem const& p, Group const& G, TileBox const& box,
                          FullTiles const& fulls, KvTensorMaps const& maps, const T* kb,
                          const T* vb, int hkv, int64_t b, int tid, int base, int steps,
                          AfterFirst&& after_first) {
    static_assert(kCluster == 1 || kBoxesOnly, "multicast rings load TMA boxes only");
    if (steps == 0) after_first();
    const int64_t kv_stride = p.kv_heads * kD;
    // The producer's own bookkeeping is on the critical path of every step (the consumers
    // wait for K while it runs): the tiles of the box are walked, not decoded (TileBox::at
    // divides), every producer thread keeps the step's tiles and TMA bits in registers, and
    // the producer threads meet only before gathers. (Decoding every tile twice and a barrier
    // per step took ~900 instructions per step in the TMA issuer's warp, which made it the
    // bottleneck of the FLUX-4K GNA forward.)
    int walk[kMaxRank];  // the next tile of the box to plan
    box.at(0, walk);
    // TMA coordinates of KV tile kt along axis a: origin[a] + kt[a] * pitch[a]; the batch
    // is folded into the slowest axis.
    int origin[kMaxRank], pitch[kMaxRank];
    for (int a = 0; a < kMaxRank; ++a) {
      origin[a] = G.g[a];
      pitch[a] = (int)p.axes[a].dilation * (int)p.kv_tile[a];
    }
    origin[0] += (int)b * (int)p.axes[0].kv_length;
    // The planned step (j+1 while step j loads) and the loading step: tile coordinates and
    // the bits of the tiles loaded as TMA boxes.
    int plan_kt[kPerStep][kMaxRank], cur_kt[kPerStep][kMaxRank];
    int plan_tma = 0, cur_tma = 0;
    const int rank = kCluster == 1 ? 0 : (int)cute::block_rank_in_cluster();
    // Plans step j: its tiles, flags and row tables. Step j+1's are written right after K(j)
    // is issued, while the producer waits for V's buffer, so that they are ready when
    // K(j+1)'s buffer frees up (built just before each gather, they cost 1.12x in the
    // FLUX-4K GNA forward).
    auto plan = [&](int j) {  // box step j, ring step base + j
      const int slot = (base + j) % kRowSlots;
      bool all_full = true;
      plan_tma = 0;
      CUTE_UNROLL
      for (int t = 0; t < kPerStep; ++t) {
        const bool in_box = j * kPerStep + t < box.total;
        for (int a = 0; a < kMaxRank; ++a) plan_kt[t][a] = walk[a];
        box.next(walk);
        all_full = all_full && in_box && fulls.contains(plan_kt[t]);
        if (kBoxesOnly || (maps.on && in_box && G.tile_inside(p, plan_kt[t], /*kv_side=*/true)))
          plan_tma |= 1 << t;
      }
      if (tid == (kBoxesOnly ? 31 : 127)) {
        full[slot] = all_full;
        // Only masked steps read their origins.
        CUTE_UNROLL
        for (int t = 0; t < kPerStep; ++t) {
          if (all_full) break;
          const bool in_box = j * kPerStep + t < box.total;
          for (int a = 0; a < kMaxRank; ++a)
            origins[slot][t][a] =
                in_box ? plan_kt[t][a] * (int)p.kv_tile[a] : kNoTile;
        }
      }
      // Only gathers read the rows (the masks come from the origins).
      if (kBoxesOnly || plan_tma == (1 << kPerStep) - 1) return;
      KRow* step_rows = krows[slot];
      for (int r = tid; r < kRows; r += 128) {
        const int t = r / kTileRows;
        int kt[kMaxRank];  // plan_kt[t], selected without indexing registers dynamically
        CUTE_UNROLL
        for (int u = 0; u < kPerStep; ++u)
          for (int a = 0; a < kMaxRank; ++a)
            if (u == t) kt[a] = plan_kt[u][a];
        step_rows[r] = G.k_row(p, kt, r % kTileRows);
        // A tile past the end of the box (the walk wrapped to the first) loads zeros.
        if (j * kPerStep + t >= box.total) step_rows[r].tok = -1;
      }
    };
    for (int j = 0; j < steps; ++j) {
      if (j == 0) plan(0);
      for (int t = 0; t < kPerStep; ++t)
        for (int a = 0; a < kMaxRank; ++a) cur_kt[t][a] = plan_kt[t][a];
      cur_tma = plan_tma;
      const int jr = base + j;  // the ring step
      const int s = jr % kStages;
      const uint32_t free_phase = ((jr / kStages) + 1) & 1;  // the (jr/kStages - 1)-th release
      // Every producer thread waits, so that none rewrites the row slot of ring step jr+1
      // (that of step jr-kStages-1) before every consumer has read it: a consumer reads a
      // step's rows before it releases the next step's K. (The next box's plan(0) writes
      // that slot after the last step's wait here.)
      if (jr >= kStages) Barrier::wait(&k_empty[s], free_phase);
      // Gathers read rows that other producer threads wrote.
      if (!kBoxesOnly && cur_tma != (1 << kPerStep) - 1) named_sync(kProducerBarrier, 128);
      const KRow* step_rows = krows[jr % kRowSlots];
      // Tiles of step j into buffer `dst` ((row, col) -> address): TMA boxes issued by thread
      // 0 (the barrier expects their bytes), row gathers by every producer thread.
      auto load = [&](const CUtensorMap* map, const T* base, uint64_t* bar, auto const& dst) {
        if (tid == 0 && cur_tma != 0) {
          cutlass::arch::ClusterTransactionBarrier::expect_transaction(
              bar, __popc(cur_tma) * kTileRows * kD * (int)sizeof(T));
          CUTE_UNROLL
          for (int t = 0; t < kPerStep; ++t) {
            if (!(cur_tma >> t & 1)) continue;
            int x[kMaxRank];
            for (int a = 0; a < kMaxRank; ++a) x[a] = origin[a] + cur_kt[t][a] * pitch[a];
            CUTE_UNROLL
            for (int c = 0; c < kD; c += 64) {
              if constexpr (kCluster == 1) {
                SM90_TMA_LOAD_5D::copy(map, bar, kEvictNormal, dst(t * kTileRows, c), c, hkv,
                                       x[2], x[1], x[0]);
              } else if ((t * (kD / 64) + c / 64) % kCluster == rank) {
                // This CTA's share of the step's boxes, into both CTAs' buffers (same offsets)
                // with the completion counted on both CTAs' barriers.
                SM90_TMA_LOAD_MULTICAST_5D::copy(map, bar, (1 << kCluster) - 1, kEvictNormal,
                                                 dst(t * kTileRows, c), c, hkv, x[2], x[1],
                                                 x[0]);
              }
            }
          }
        }
        CUTE_UNROLL
        for (int t = 0; t < kPerStep; ++t) {
          if (kBoxesOnly || cur_tma >> t & 1) continue;
          const int r0 = t * kTileRows;
          sm80::gather_rows<kTileRows, kD, 128>([&](int r, int c) { return dst(r0 + r, c); },
                                                base, kv_stride,
                                                [&](int r) { return step_rows[r0 + r].tok; },
                                                tid);
        }
        producer_commit(bar);
      };
      Tensor k_s = sK(s);
      load(&maps.k, kb, &k_full[s], [&](int r, int c) { return &k_s(r, c); });
      if (j + 1 < steps) plan(j + 1);
      if (jr >= kStages) Barrier::wait(&v_empty[s], free_phase);
      Tensor vt_s = sVt(s);
      load(&maps.v, vb, &v_full[s], [&](int r, int c) { return &vt_s(c, r); });
      if (j == 0) after_first();
    }
  }

  // With kCluster = 2, by the producer after its last step (`steps` ring steps in all): waits
  // until the consumers of both CTAs have released every buffer, so that no arrival from
  // the other CTA is still on its way to this one's barriers when it exits. (Every multicast
  // of the other CTA into this one's buffers has landed by then: this CTA's consumers waited
  // for all of them.)
  __device__ __forceinline__ void drain(int steps) {
    for (int jr = steps - kStages > 0 ? steps - kStages : 0; jr < steps; ++jr) {
      Barrier::wait(&k_empty[jr % kStages], (jr / kStages) & 1);
      Barrier::wait(&v_empty[jr % kStages], (jr / kStages) & 1);
    }
  }
};

}  // namespace sm90
}  // namespace gna
