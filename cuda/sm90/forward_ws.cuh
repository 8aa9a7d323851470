// sm90a GNA forward, warp-specialised: a CTA computes Q tiles (of one dilation group, head
// and batch) one after another, walking for each the box of KV tiles it sees in steps of
// one or two 64-token tiles (full steps skip the mask), with the work split by role.
//
// - Warpgroup 0, the producer, keeps few registers (setmaxnreg.dec) and does all data
//   movement: Q (double-buffered across tiles; a TMA box where the tile lies inside the Q
//   frame and the K/V ring has its own warp, else gathered by cp.async) and its row table,
//   then K, V and the row tables of every step into the ring of kv_ring.cuh (TMA boxes for
//   tiles inside the frame, row gathers for the others; one mbarrier per buffer announces
//   them). Where two Q tiles see the same KV box, a cluster of two CTAs computes them and
//   each CTA loads half of every step for both (TMA multicast, kCluster).
// - Warpgroups 1.., the consumers (one per 64 Q rows of the tile), take the registers the
//   producer gave up (setmaxnreg.inc) and only run GEMMs and the softmax. Per step `it` a
//   consumer issues S(it) = Q·K(it)^T and O += P(it-1)·V(it-1) back to back, then runs the
//   softmax of S(it), written to run while the tensor cores still compute P·V (ptxas moves
//   the wait for P·V above it unless GNA_SM90_FWD_SPLIT_SOFTMAX; the overlap measured no
//   faster: cuda/sm90/NOTES.md). It frees K(it) as soon as S(it) has retired (the ring
//   keeps the step's rows for the mask; 1.00-1.08x) and V(it-1) once P·V has retired. With
//   kPingPong, two consumers take turns to issue (named barriers), so that one's softmax runs
//   under the other's GEMMs (measured no faster than letting them issue when ready, before
//   and after the producer's bookkeeping was trimmed, and with the split softmax: off by
//   default).
#pragma once

#include <cutlass/arch/reg_reconfig.h>

#include "fwd_trace.cuh"
#include "kv_ring.cuh"
#include "tile_pairs.h"

// The softmax moves its exp2 base only when a row outgrows it by 2^8 (sm80::softmax_step's
// kLazyRescale); 0 rescales the output at every step, for A/B runs.
#ifndef GNA_SM90_FWD_LAZY_RESCALE
#define GNA_SM90_FWD_LAZY_RESCALE 1
#endif
// 1: the softmax is compiled once per full flag, which keeps the wait for P·V behind it in
// the SASS (intra-warpgroup overlap); measured 0.94-1.0x on the block-sparse problems alone.
#ifndef GNA_SM90_FWD_SPLIT_SOFTMAX
#define GNA_SM90_FWD_SPLIT_SOFTMAX 0
#endif

namespace gna {
namespace sm90 {

using namespace cute;

// A consumer warp's epilogue: its 16 rows of O (rows of a 64xN wgmma accumulator, `ro` and
// `cOrc` as gmma_rowcol views), normalised by the row sums, into the bytes of its rows of Q
// in `q_buf` (a [kBlockM, kD] SmemKMajor tile: 128-byte rows of 8x64 atoms, 16-byte chunks
// XOR-swizzled by row), by stmatrix; then copied out whole rows per instruction
// (sm80::copy_staged_rows), and lse (natural log, -inf for rows that saw no key) stored for
// valid rows. Only this warpgroup's GEMMs read those rows of Q, and they have retired. The
// swizzle puts the 8 rows of every stmatrix matrix, and the 8 chunks of every row read, on
// distinct banks. (Storing O from registers with 4-byte scattered stores took ~1.6 µs per
// Q tile: the sm90a trace build, fwd_trace.cuh.)
// `staged` runs between the two parts (the trace build marks it there).
template <int kBlockM, int kD, int kRows, class T, class RO, class CO, class Staged>
__device__ __forceinline__ void store_out_lse_stmatrix(RO const& ro, CO const& cOrc,
                                                       const float (&row_max)[kRows],
                                                       const float (&row_sum)[kRows],
                                                       const QRow* qrows, T* ob, float* lb,
                                                       int64_t q_stride, int64_t heads,
                                                       T* q_buf, int lane, Staged&& staged) {
  static_assert(kRows == 2 && kD % 16 == 0, "a warp holds rows r and r + 8 of a 16-row slab");
  constexpr int kAtomBytes = 8 * 128;  // 8 rows of 64 elements
  const int row0 = get<0>(cOrc(0, 0)) / 16 * 16;  // the warp's first row
  char* const base = reinterpret_cast<char*>(q_buf) + row0 * 128;
  // Chunk c (8 elements) of the warp's row r: atom column c / 8, row r, swizzled chunk.
  auto chunk = [&](int r, int c) {
    return reinterpret_cast<T*>(base + (c / 8) * (kBlockM / 8) * kAtomBytes + r * 128 +
                                (((c % 8) ^ (r % 8)) << 4));
  };
  float inv[kRows];
  CUTE_UNROLL
  for (int mi = 0; mi < kRows; ++mi) {
    const float sum = sm80::quad_sum(row_sum[mi]);
    inv[mi] = sum > 0.f ? 1.f / sum : 0.f;
    const int tok = qrows[get<0>(cOrc(mi, 0))].tok;
    if (tok >= 0 && lane % 4 == 0) lb[(int64_t)tok * heads] = sm80::lse_of(row_max[mi], sum);
  }
  // stmatrix.x4 k: the 8x8 matrices (rows 0-7, chunk k), (rows 8-15, chunk k), (0-7, k + 1),
  // (8-15, k + 1); lane l gives the address of row l % 8 of matrix l / 8. A thread's two
  // values of a matrix are ro(mi, 2·chunk), ro(mi, 2·chunk + 1).
  const int st_row = (lane / 8 % 2) * 8 + lane % 8, st_chunk = lane / 16;
  CUTE_UNROLL
  for (int k = 0; k < kD / 8; k += 2) {
    uint32_t regs[4];
    CUTE_UNROLL
    for (int u = 0; u < 4; ++u) {
      const int mi = u % 2, ni = 2 * (k + u / 2);
      T pair[2] = {static_cast<T>(ro(mi, ni) * inv[mi]), static_cast<T>(ro(mi, ni + 1) * inv[mi])};
      regs[u] = *reinterpret_cast<uint32_t*>(pair);
    }
    SM90_U32x4_STSM_N::copy(regs[0], regs[1], regs[2], regs[3],
                            *reinterpret_cast<uint128_t*>(chunk(st_row, k + st_chunk)));
  }
  __syncwarp();
  staged();
  sm80::copy_staged_rows<kD>(qrows, row0, ob, q_stride, chunk, lane);
}

// kConsumers warpgroups of 64 Q rows. Two (Q tiles of 128 tokens) take the registers of one
// CTA per SM and walk N = 128 KV rows per step; one (Q tiles of up to 64 tokens) runs two
// CTAs per SM, 64 KV rows per step.
template <class T_, int kD_, int kConsumers_, int kStages_, bool kPingPong_>
struct WsFwdTraits {
  using T = T_;
  static constexpr int kD = kD_;
  static constexpr int kConsumers = kConsumers_;
  static_assert(kConsumers == 1 || kConsumers == 2, "one or two consumer warpgroups");
  static constexpr int kBlockM = 64 * kConsumers;
  static constexpr int kTileRows = 64;  // K/V rows of one KV tile of the box
  static constexpr int kTilesPerStep = kConsumers;
  static constexpr int kBlockN = kTileRows * kTilesPerStep;
  static constexpr int kStages = kStages_;  // K/V buffers in the ring
  static constexpr int kQBuffers = 2;  // the next Q tile loads while this one computes
  static constexpr bool kPingPong = kPingPong_ && kConsumers == 2;
  static constexpr int kThreads = 128 * (1 + kConsumers);
  static constexpr int kCtasPerSm = 3 - kConsumers;
  // A CTA launches with the registers of 65536 / (kCtasPerSm · kThreads) per thread (rounded
  // down to a multiple of 8) and setmaxnreg only moves them between the roles. The producer
  // gets enough for its step loop to run without spills (ptxas -v, cuobjdump: 72 spilled
  // there once the loop over Q tiles held its counters), the consumers the rest.
  static constexpr int kProducerRegs = kConsumers == 2 ? 104 : 80;
  static constexpr int kConsumerRegs = kConsumers == 2 ? 200 : 176;
  static constexpr int kLaunchRegs = 65536 / (kCtasPerSm * kThreads) / 8 * 8;
  static_assert(128 * (kProducerRegs + kConsumers * kConsumerRegs) <= kThreads * kLaunchRegs,
                "registers");
  using MmaS = MmaSS<T, kConsumers, kBlockN, kD>;  // S = Q·K^T
  using MmaO = MmaRS<T, kConsumers, kD, kBlockN>;  // O += P·V
  using SmemQ = SmemKMajor<T, kBlockM, kD>;
  template <int kCluster>
  using RingOf = KvRing<T, kD, kTilesPerStep, kStages, 4 * kConsumers, kCluster>;
};

// What the producer hands the consumers with a Q tile (next to its Q buffer): the tile's ring
// steps and where its output goes; steps < 0 ends the consumers' loop. (Each consumer warp
// deriving this itself cost ~1270 instructions per tile on the path to the tile's first
// GEMM, about half of what a tile costs besides its steps.)
struct FwdTileWork {
  int steps;
  int h;
  int b;
};

template <class Tr, int kCluster = 1>
struct WsFwdSmem {
  using T = typename Tr::T;
  alignas(1024) T q[Tr::kQBuffers][Tr::kBlockM * Tr::kD];
  typename Tr::template RingOf<kCluster> ring;  // K, V and the rows of the steps
  QRow qrows[Tr::kQBuffers][Tr::kBlockM];
  sm80::RowTable<Tr::kBlockM> qtable;  // token offsets of a Q tile's rows (tiles inside)
  FwdTileWork work[Tr::kQBuffers];
  uint64_t q_full[Tr::kQBuffers];  // Q and work landed
  uint64_t rows_full[Tr::kQBuffers];   // qrows written (after step 0's loads: see the producer)
  uint64_t tile_empty[Tr::kQBuffers];  // the consumers have read the buffer's Q, qrows, work
#if GNA_SM90_FWD_TRACE
  unsigned long long tr_k_issued[Tr::kQBuffers];  // when the ring warp issued step 0's K and V
#endif
};

// With kKvWarp (launch.cuh runs it where every KV tile is a TMA box), one producer warp at a
// time fills the K/V ring, so that the others do not repeat its bookkeeping and barrier waits
// of every step on the schedulers the consumer warps use. Warps 0 and 1 take turns, one Q
// tile each: while one issues its tile's steps, the other decodes the next tile (~3 µs of
// dependent integer arithmetic per tile, which a single ring warp did between the last step
// of one tile and the first of the next, with the consumers waiting). Warps 2 and 3 load each
// Q tile and write its rows, running ahead by up to kQBuffers tiles.
//
// A CTA computes the Q tiles c, c + gridDim.x, c + 2·gridDim.x, ... (c = blockIdx.x) of the
// flat index over (Q tile, head, batch), Q tile fastest, where the x-th of the `items` Q tiles
// of a (head, batch) is the tile `order` puts x-th (tile_pairs.h). The launch runs one
// CTA per tile, or as many as fit the SMs at once (persistent, GNA_SM90_FWD_PERSISTENT). Then
// the producer loads the next tile's Q (into the other Q buffer) and first K/V steps while
// the consumers finish the current one, and each CTA pays its set-up once. Only the producer
// decodes the flat index and walks the tile geometry; the consumers take each tile from the
// Q buffers in turn with its FwdTileWork, until one says there is none left.
//
// The grid may start under the tail of the one before it (programmatic dependent launch,
// launch.cuh): the producers wait for that grid before their first global access (after the
// first tile's decode and Q row table); the consumers touch global memory only after a Q the
// producers loaded.
//
// kCluster = 2 (with kKvWarp only): the grid is clusters of two CTAs, with an even grid size
// and items, so that the CTAs of a cluster take the two tiles of a pair (order kPairs) in
// step. Both walk the same KV box, and each loads half of every step for both (kv_ring.cuh).
template <class Tr, bool kKvWarp, int kCluster>
__global__ void __launch_bounds__(Tr::kThreads, Tr::kCtasPerSm)
    ws_fwd_kernel(const Problem p, const typename Tr::T* __restrict__ q,
                  const typename Tr::T* __restrict__ k, const typename Tr::T* __restrict__ v,
                  typename Tr::T* __restrict__ out, float* __restrict__ lse,
                  const __grid_constant__ FwdTensorMaps maps, const int items,
                  const TileOrder order) {
  static_assert(kCluster == 1 || kKvWarp, "clusters multicast TMA boxes only");
  using T = typename Tr::T;
  using Barrier = cutlass::arch::ClusterBarrier;
  constexpr int kD = Tr::kD;
  constexpr int kBlockM = Tr::kBlockM;
  constexpr int kBlockN = Tr::kBlockN;
  constexpr int kStages = Tr::kStages;
  constexpr int kQBuffers = Tr::kQBuffers;
  constexpr int kConsumerThreads = 128 * Tr::kConsumers;
  extern __shared__ __align__(1024) char smem_raw[];
  auto& sm = *reinterpret_cast<WsFwdSmem<Tr, kCluster>*>(smem_raw);
  const int tid = threadIdx.x;
  GNA_FWD90_TRACE(unsigned long long tr_last = trace_now(); const unsigned long long tr_entry = tr_last;
                  const bool tr = tid == 0 || tid == 128; const bool tq = kKvWarp && tid == 64;)
  const int64_t n_q_tok = sm80::q_tokens_of(p);
  const int64_t q_stride = p.heads * kD;
  constexpr int kPerStep = Tr::kTilesPerStep;

  // The CTA's i-th flat index; past the last tile of the grid's work, -1. (Recomputed from
  // i, so that the producer, short of registers, keeps one loop counter live.)
  auto work_item = [&](int i) -> int64_t {
    const int64_t w = blockIdx.x + (int64_t)i * gridDim.x;
    return w < (int64_t)items * p.heads * p.batch ? w : -1;
  };
  // The Q tile, head and batch of flat index `w`: false if the tile lies past the end of its
  // (shorter) dilation group, which the producer then skips.
  // In 32-bit arithmetic (the launch checks that the work items fit): a 64-bit division is a
  // subroutine of ~70 instructions, on the path to the CTA's first loads.
  auto tile_of = [&](int64_t w64, Group& G, int qt[kMaxRank], int& h, int64_t& b) {
    const int w = (int)w64;
    const int hb = w / items;
    h = hb % (int)p.heads;
    b = hb / (int)p.heads;
    // The order's kind as the launch pairs it with the kernel (only gathering kernels run
    // kAll alone): the producer's per-tile path is short of registers.
    const int x = w % items;
    int t = x;
    if constexpr (kCluster == 2)
      t = order.pair_tile(x);
    else if constexpr (kKvWarp)
      t = order.kind == TileOrder::kLeftovers ? order.leftover_tile(x) : x;
    return G.init(p, t, /*kv_side=*/false, qt);
  };

  // The producer threads that load Q and write its rows: warps 2 and 3 with kKvWarp, else all.
  constexpr int kQThreads = kKvWarp ? 64 : 128;
  const int q_tid = tid - (128 - kQThreads);  // in [0, kQThreads) for those threads
  if (tid == 0) {
    for (int i = 0; i < kQBuffers; ++i) {
      Barrier::init(&sm.q_full[i], 2 * kQThreads);
      Barrier::init(&sm.rows_full[i], kQThreads);
      Barrier::init(&sm.tile_empty[i], kConsumerThreads);  // one arrival per consumer thread
    }
    sm.ring.init(kKvWarp ? 32 : 128);
    cutlass::arch::fence_barrier_init();
    allow_next_grid();  // its CTAs take SMs only as this grid's CTAs leave them
  }
  // The last CTA-wide barrier: the roles never meet again. In a cluster, the other CTA's
  // multicasts and arrivals reach this CTA's barriers only once they are initialised.
  if constexpr (kCluster == 1)
    __syncthreads();
  else
    cute::cluster_sync();
  GNA_FWD90_TRACE(const bool tr0 = kKvWarp && tid == 0; if (tr0) trace_since(kTrSuSync, tr_entry);)

  auto sQ = [&](int i) { return make_tensor(make_smem_ptr(sm.q[i]), typename Tr::SmemQ{}); };
  auto& ring = sm.ring;
  // Both roles count the tiles they compute (n) and the ring steps before the current tile
  // (base) alike: tile n uses Q buffer n % kQBuffers, the (n / kQBuffers)-th time.
  int n = 0;
  int base = 0;
  // The consumers read a buffer's work (and Q) only once it is full, and the producer
  // rewrites it only once they have emptied it.
  auto hand_over = [&](int qb_i, FwdTileWork w) {
    if (q_tid == 0) sm.work[qb_i] = w;
    producer_commit(&sm.q_full[qb_i]);
  };

  if (tid < 128) {
    // ------------------------------------------------------------------------- producer
    cutlass::arch::warpgroup_reg_dealloc<Tr::kProducerRegs>();
    ring.setup(p, maps, tid);
    if (kKvWarp && q_tid == 0 && maps.q_on) prefetch_tma_descriptor(&maps.q);
    GNA_FWD90_TRACE(if (tr0) trace_since(kTrSuSetup, tr_entry);)
    for (int i = 0; work_item(i) >= 0; ++i) {
      GNA_FWD90_TRACE(if (tr) tr_last = trace_now();)
      Group G;
      int qt[kMaxRank], h;
      int64_t b;
      if (!tile_of(work_item(i), G, qt, h, b)) continue;
      GNA_FWD90_TRACE(if (tr0 && n == 0) trace_since(kTrSuTile, tr_entry);)
      const TileBox box = TileBox::seen_by(G, p, qt);
      const int steps = (box.total + kPerStep - 1) / kPerStep;
      const int qb_i = n % kQBuffers;
      const int hkv = h / (int)(p.heads / p.kv_heads);
      const int64_t n_kv_tok = sm80::kv_tokens_of(p);
      const T* qb = q + (b * n_q_tok * p.heads + h) * kD;
      const T* kb = k + (b * n_kv_tok * p.kv_heads + hkv) * kD;
      const T* vb = v + (b * n_kv_tok * p.kv_heads + hkv) * kD;
      const FullTiles fulls = FullTiles::of(G, p, qt, Tr::kTileRows);
      // No step needs the mask (a step past the box's last tile does).
      const bool no_mask = box.total % kPerStep == 0 && fulls.covers(box);
      const int warp = tid / 32;
      // kKvWarp: warps 0 and 1 only run the ring, for alternate tiles (see above).
      if (kKvWarp && warp < 2) {
        GNA_FWD90_TRACE(if (tr) trace_phase(kTrDecode, &tr_last);
                        if (tr0 && n == 0) trace_since(kTrSuBox, tr_entry);)
        if (n == 0) wait_prior_grid();  // (the decode above touched no global memory)
        GNA_FWD90_TRACE(if (tr0 && n == 0) trace_since(kTrSuWaited, tr_entry);)
        if (warp == n % 2) {
          // The other ring warp has issued every step of tile n - 1.
          if (n > 0) named_sync(kRingTurnBarrier + warp, 64);
          GNA_FWD90_TRACE(if (tr) trace_phase(kTrQIssue, &tr_last);
                          if (tr && n == 0) trace_since(kTrSuRing, tr_entry);)
          ring.template produce</*kBoxesOnly=*/true>(p, G, box, fulls, maps, kb, vb, hkv, b,
                                                      tid % 32, base, steps, [&] {
            GNA_FWD90_TRACE(if (tid % 32 == 0) sm.tr_k_issued[qb_i] = trace_now();)
          });
          named_arrive(kRingTurnBarrier + 1 - warp, 64);
          GNA_FWD90_TRACE(if (tr) trace_phase(kTrRing, &tr_last);)
        }
        base += steps;
        ++n;
        continue;
      }
      // The Q loaders' work per tile is on the consumers' path between two tiles when they do
      // not run ahead: rows of a tile inside the Q frame take their tokens from the CTA's table
      // (16 rows per thread cost ~800 instructions of divisions by q_token), and tiles without
      // masked steps skip the windows of their rows.
      const bool q_inside = G.tile_inside(p, qt, /*kv_side=*/false);
      // kKvWarp: a tile inside the Q frame loads as TMA boxes where the maps allow (by one
      // thread; the buffer's barrier expects their bytes), so that the first tile's Q does
      // not wait for the row table and a 128-row gather (~2.7 µs); else every Q loader
      // gathers rows.
      const bool q_box = kKvWarp && maps.q_on && q_inside;
      // The buffer's Q, rows and work belong to tile n - kQBuffers until its consumers are
      // done.
      if (n >= kQBuffers) Barrier::wait(&sm.tile_empty[qb_i], ((n / kQBuffers) + 1) & 1);
      Tensor sQn = sQ(qb_i);
      // The first global memory this thread touches (Q, and in the gathering kernels the
      // ring's loads) comes after the grid before this one has completed.
      if (n == 0) wait_prior_grid();
      if (q_box && q_tid == 0) {
        cutlass::arch::ClusterTransactionBarrier::expect_transaction(
            &sm.q_full[qb_i], kBlockM * kD * (int)sizeof(T));
        int at[4];
        q_box_at(G, p, qt, /*axis=*/0, /*offset=*/0, h, b, at);
        CUTE_UNROLL
        for (int c = 0; c < kD; c += 64)
          SM90_TMA_LOAD_5D::copy(&maps.q, &sm.q_full[qb_i], kEvictNormal, &sQn(0, c), c, at[0],
                                 at[1], at[2], at[3]);
      }
      if (n == 0) {
        GNA_FWD90_TRACE(if (tq) trace_since(kTrSuDecode, tr_entry);)
        sm.qtable.build(G, p, /*kv_side=*/false, q_tid, kQThreads);
        named_sync(kProducerBarrier, kQThreads);
        GNA_FWD90_TRACE(if (tq) trace_since(kTrSuTable, tr_entry);)
      }
      const int q_base = G.tile_base(p, qt, /*kv_side=*/false);
      auto table_tok = [&](int r) { return sm.qtable.token(q_base, r); };
      int ii[kMaxRank];
      auto q_tok = [&](int r) { return G.q_token(p, qt, r, ii); };
      GNA_FWD90_TRACE(if (tr) trace_phase(kTrDecode, &tr_last);)
      // Passes of whole swizzle periods (sm80::gather_rows): 64 threads gather D = 128 as two
      // tiles of 64 columns.
      constexpr int kQCols = kD <= kQThreads ? kD : kQThreads;
      if (!q_box) {
        CUTE_UNROLL
        for (int c0 = 0; c0 < kD; c0 += kQCols) {
          auto q_dst = [&](int r, int c) { return &sQn(r, c0 + c); };
          if (q_inside)
            sm80::gather_rows<kBlockM, kQCols, kQThreads>(q_dst, qb + c0, q_stride, table_tok,
                                                           q_tid);
          else
            sm80::gather_rows<kBlockM, kQCols, kQThreads>(q_dst, qb + c0, q_stride, q_tok,
                                                           q_tid);
        }
      }
      hand_over(qb_i, {steps, h, (int)b});
      GNA_FWD90_TRACE(if (tr) trace_phase(kTrQIssue, &tr_last);
                      if (tq && n == 0) trace_since(kTrSuGather, tr_entry);)
      // The Q rows are read only by masked steps (windows) and the epilogue (tokens): built
      // while step 0's K and V load, they stay off the path to the first GEMM.
      QRow* rows = sm.qrows[qb_i];
      auto write_rows = [&] {
        for (int r = q_tid; r < kBlockM; r += kQThreads) {
          if (no_mask && q_inside)
            rows[r].tok = table_tok(r);
          else
            rows[r] = G.q_row(p, qt, r, /*window=*/!no_mask);
        }
        Barrier::arrive(&sm.rows_full[qb_i]);
      };
      if constexpr (kKvWarp)
        write_rows();  // then on to the next tile's Q
      else
        ring.produce(p, G, box, fulls, maps, kb, vb, hkv, b, tid, base, steps, write_rows);
      GNA_FWD90_TRACE(if (tr) trace_phase(kTrRing, &tr_last);)
      base += steps;
      ++n;
    }
    if (kKvWarp && tid < 64) {
      // The ring warp whose turn would be next takes the last turn, so that every arrival on
      // a turn barrier is matched, then (clusters) waits until both CTAs' consumers have
      // released every buffer.
      if (tid / 32 == n % 2) {
        if (n > 0) named_sync(kRingTurnBarrier + n % 2, 64);
        if constexpr (kCluster > 1) ring.drain(base);
      }
      return;
    }
    const int qb_end = n % kQBuffers;
    if (n >= kQBuffers) Barrier::wait(&sm.tile_empty[qb_end], ((n / kQBuffers) + 1) & 1);
    hand_over(qb_end, {-1, 0, 0});
    sm80::cp_async_wait<0>();
    return;
  }

  // --------------------------------------------------------------------------- consumers
  cutlass::arch::warpgroup_reg_alloc<Tr::kConsumerRegs>();
  GNA_FWD90_TRACE(if (tid == 128) trace_since(kTrSuConsumers, tr_entry);)
  const int ctid = tid - 128;
  const int wg = ctid / 128;
  typename Tr::MmaS mma_s;
  typename Tr::MmaO mma_o;
  auto thr_s = mma_s.get_thread_slice(ctid);
  auto thr_o = mma_o.get_thread_slice(ctid);
  Tensor acc_o = partition_fragment_C(mma_o, Shape<Int<kBlockM>, Int<kD>>{});
  Tensor ro = make_tensor(acc_o.data(), gmma_rowcol(acc_o.layout()));
  constexpr int kRowsPerThread = decltype(size<0>(ro))::value;
  float row_max[kRowsPerThread];
  float row_sum[kRowsPerThread];
  float corr[kRowsPerThread];
  Tensor cS = thr_s.partition_C(make_identity_tensor(Shape<Int<kBlockM>, Int<kBlockN>>{}));
  Tensor cSrc = make_tensor(cS.data(), gmma_rowcol(cS.layout()));
  Tensor cO = thr_o.partition_C(make_identity_tensor(Shape<Int<kBlockM>, Int<kD>>{}));
  Tensor cOrc = make_tensor(cO.data(), gmma_rowcol(cO.layout()));
  const float scale2 = p.scale * sm80::kLog2e;
  Tensor acc_s = partition_fragment_C(mma_s, Shape<Int<kBlockM>, Int<kBlockN>>{});
  Tensor rs = make_tensor(acc_s.data(), gmma_rowcol(acc_s.layout()));
  Tensor rP = make_tensor<T>(acc_s.layout());  // P(it-1), read by the P·V in flight
  Tensor tOrP = make_tensor(rP.data(), gmma_acc_as_a(rP.layout()));
  // Turns: consumer 0 issues first; each consumer hands the turn to the other after issuing.
  const int other = Tr::kConsumers - 1 - wg;

  for (;; ++n) {
    const int qb_i = n % kQBuffers;
    const uint32_t q_phase = (n / kQBuffers) & 1;
    Barrier::wait(&sm.q_full[qb_i], q_phase);
    cutlass::arch::fence_view_async_shared();
    const FwdTileWork work = sm.work[qb_i];
    if (work.steps < 0) break;
    GNA_FWD90_TRACE(if (tr) trace_phase(n == 0 ? kTrStartup : kTrQWait, &tr_last);)
    const int steps = work.steps;
    const QRow* rows = sm.qrows[qb_i];
    const int first = base, last = base + steps - 1;  // the tile's ring steps
    GNA_FWD90_TRACE(unsigned long long tr_wanted = 0, tr_landed = 0;)
    clear(acc_o);
    CUTE_UNROLL
    for (int r = 0; r < kRowsPerThread; ++r) {
      row_max[r] = -INFINITY;
      row_sum[r] = 0.f;
    }
    if (Tr::kPingPong && wg == 1 && steps > 0) named_arrive(kTurnBarrier + 0, kConsumerThreads);
    Tensor tSrQ = thr_s.partition_fragment_A(sQ(qb_i));
    // S(it) and the softmax of ring step it; P·V(it-1) is in flight unless `it` is the
    // tile's first. The caller holds the turn only for the issue.
    auto scores = [&](int it) {
      ring.wait_k(it);
      wgmma_issue(mma_s, tSrQ, thr_s.partition_fragment_B(ring.sK(it % kStages)), acc_s,
                  /*accumulate=*/false);
    };
    bool rows_ready = false;
    bool rescale = true;  // whether the last softmax step left factors in corr
    auto softmax = [&](int it) {
      warpgroup_fence_operand(acc_s);
      ring.release_k(it);  // S(it) has retired; the ring keeps the step's rows for the mask
      if (!rows_ready && !ring.is_full(it)) {
        Barrier::wait(&sm.rows_full[qb_i], q_phase);
        rows_ready = true;
      }
#if GNA_SM90_FWD_SPLIT_SOFTMAX
      // One softmax per flag value: ptxas then cannot hoist the wait for P·V(it-1) above the
      // exp2s (it moves it to the top of the block where the masked and full paths meet).
      if (ring.is_full(it))
        rescale = sm80::softmax_step</*kFoldScale=*/true, GNA_SM90_FWD_LAZY_RESCALE != 0>(
            rs, cSrc, row_max, row_sum, corr, true, ring.mask(it, rows), scale2);
      else
        rescale = sm80::softmax_step</*kFoldScale=*/true, GNA_SM90_FWD_LAZY_RESCALE != 0>(
            rs, cSrc, row_max, row_sum, corr, false, ring.mask(it, rows), scale2);
#else
      rescale = sm80::softmax_step</*kFoldScale=*/true, GNA_SM90_FWD_LAZY_RESCALE != 0>(
          rs, cSrc, row_max, row_sum, corr, ring.is_full(it), ring.mask(it, rows), scale2);
#endif
    };
    // O = O · corr + P(it)·V(it), issued without waiting.
    auto accumulate = [&](int it) {
      if (rescale) sm80::rescale_rows(ro, corr);  // uniform over the warp
      ring.wait_v(it);
      wgmma_issue(mma_o, tOrP, thr_o.partition_fragment_B(ring.sVt(it % kStages)), acc_o,
                  /*accumulate=*/true);
    };
    auto to_p = [&] {
      CUTE_UNROLL
      for (int e = 0; e < size(acc_s); ++e) rP(e) = static_cast<T>(acc_s(e));
    };
    auto take_turn = [&] {
      if (Tr::kPingPong) named_sync(kTurnBarrier + wg, kConsumerThreads);
    };
    auto pass_turn = [&](int it) {
      if (Tr::kPingPong && !(wg == 1 && it == last))
        named_arrive(kTurnBarrier + other, kConsumerThreads);
    };

    if (steps > 0) {
      GNA_FWD90_TRACE(if (tr) {
        tr_wanted = tr_last;
        ring.wait_k(first);
        trace_phase(kTrKWait, &tr_last);
        tr_landed = tr_last;
      })
      take_turn();
      scores(first);
      pass_turn(first);
      warpgroup_wait<0>();
      softmax(first);
      to_p();
      GNA_FWD90_TRACE(if (tr) trace_phase(kTrFirstStep, &tr_last);)
    }
    // The loop body has no conditional MMA: ptxas then tracks the two groups in flight
    // instead of serialising them.
    for (int it = first + 1; it <= last; ++it) {
      take_turn();
      scores(it);
      accumulate(it - 1);
      pass_turn(it);
      warpgroup_wait<1>();  // S(it)
      softmax(it);
      warpgroup_wait<0>();  // P·V(it-1): rP and V(it-1) are free
      warpgroup_fence_operand(acc_o);
      ring.release_v(it - 1);
      to_p();
    }
    GNA_FWD90_TRACE(if (tr) trace_phase(kTrSteps, &tr_last);)
    if (steps > 0) {
      accumulate(last);
      warpgroup_wait<0>();
      warpgroup_fence_operand(acc_o);
      ring.release_v(last);
    }
    GNA_FWD90_TRACE(if (tr) trace_phase(kTrLastPv, &tr_last);)

    // Epilogue: normalise, write O (input dtype) and lse (natural log) for valid rows only,
    // staged where the warp's rows of Q were (S(last) has retired).
    Barrier::wait(&sm.rows_full[qb_i], q_phase);
    GNA_FWD90_TRACE(if (tr) trace_phase(kTrEpiRows, &tr_last);)
    const int64_t row0 = (int64_t)work.b * n_q_tok * p.heads + work.h;  // (b, token 0, h)
    T* ob = out + row0 * kD;
    float* lb = lse + row0;
    store_out_lse_stmatrix<kBlockM, kD>(ro, cOrc, row_max, row_sum, rows, ob, lb, q_stride,
                                        p.heads, sm.q[qb_i], ctid % 32, [&] {
      GNA_FWD90_TRACE(if (tr) trace_phase(kTrEpiStsm, &tr_last);)
    });
    GNA_FWD90_TRACE(if (tr) {
      trace_phase(kTrEpilogue, &tr_last);
      trace_count(1, steps, 0);
      // Read only now: the ring warp writes the time after issuing step 0's V, which may
      // come after the consumers have seen K land.
      if (kKvWarp && steps > 0) {
        const unsigned long long issued = sm.tr_k_issued[qb_i];
        trace_add(kTrKLead, (long long)(tr_wanted - issued));
        trace_add(kTrKFlight, (long long)(tr_landed - issued));
      }
    })
    // Every thread has read the buffer's Q, rows and work: each arrives for its own reads.
    Barrier::arrive(&sm.tile_empty[qb_i]);
    base += steps;
  }
  GNA_FWD90_TRACE(if (tr) {
    trace_phase(kTrTail, &tr_last);
    if (tid == 128) trace_span(tr_entry);
    trace_count(0, 0, 1);
  })
}

}  // namespace sm90
}  // namespace gna
