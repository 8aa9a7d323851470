// sm90a GNA forward, warp-specialised: the geometry of forward.cuh (one CTA per 128-token Q
// tile of one dilation group, head and batch, walking the box of KV tiles the Q tile sees in
// steps of two 64-token tiles; full steps skip the mask), with the work split by role.
//
// - Warpgroup 0, the producer, keeps few registers (setmaxnreg.dec) and does all data
//   movement: the row tables (tokens and mask coordinates) of Q and of every step, Q by
//   cp.async, and K and V into a ring of kStages shared-memory buffers: tiles that lie inside
//   the frame as TMA boxes (tensor_maps.h), the others by cp.async row gathers. A buffer is
//   announced by an mbarrier that completes when its TMA bytes and gathers have landed and
//   the producer's row tables are written (a plain arrive, which releases them).
// - Warpgroups 1.., the consumers, take the registers the producer gave up (setmaxnreg.inc)
//   and only run GEMMs and the softmax on 64 Q rows each. Per step `it` a consumer issues
//   S(it) = Q·K(it)^T and O += P(it-1)·V(it-1) back to back, then runs the softmax of S(it)
//   while the tensor cores still compute P·V; it frees K(it) after the softmax (the mask has
//   read the step's rows) and V(it-1) once P·V has retired. With kPingPong, the consumers
//   take turns to issue (named barriers), so that one's softmax runs under the other's GEMMs
//   (measured slightly slower than letting them issue when ready: off by default).
#pragma once

#include <cutlass/arch/reg_reconfig.h>

#include "tensor_maps.h"
#include "wgmma.cuh"

namespace gna {
namespace sm90 {

using namespace cute;

template <class T_, int kD_, int kStages_, bool kPingPong_>
struct WsFwdTraits {
  using T = T_;
  static constexpr int kD = kD_;
  static constexpr int kConsumers = 2;  // warpgroups of 64 Q rows
  static constexpr int kBlockM = 64 * kConsumers;
  static constexpr int kTileRows = 64;  // K/V rows of one KV tile of the box
  static constexpr int kTilesPerStep = 2;
  static constexpr int kBlockN = kTileRows * kTilesPerStep;
  static constexpr int kStages = kStages_;  // K/V buffers in the ring
  static constexpr bool kPingPong = kPingPong_;
  static constexpr int kThreads = 128 * (1 + kConsumers);
  // 65536 registers per SM: 128 · kProducerRegs + 128 · kConsumers · kConsumerRegs fits.
  static constexpr int kProducerRegs = 72;  // fewer spill the gathers (ptxas -v)
  static constexpr int kConsumerRegs = 216;
  static_assert(128 * (kProducerRegs + kConsumers * kConsumerRegs) <= 65536, "registers");
  using MmaS = MmaSS<T, kConsumers, kBlockN, kD>;  // S = Q·K^T
  using MmaO = MmaRS<T, kConsumers, kD, kBlockN>;  // O += P·V
  using SmemQ = SmemKMajor<T, kBlockM, kD>;
  using SmemK = SmemKMajor<T, kBlockN, kD>;
  // V is stored [rows, D] exactly like K (atoms tiled along the rows first, so a TMA box of
  // 64 columns lands as one block): operand B of P·V seen MN-major as [D, rows].
  using SmemVt = decltype(tile_to_shape(GMMA::Layout_MN_SW128_Atom<T>{},
                                        Shape<Int<kD>, Int<kBlockN>>{}, Step<_2, _1>{}));
};

template <class Tr>
struct WsFwdSmem {
  using T = typename Tr::T;
  alignas(1024) T q[Tr::kBlockM * Tr::kD];
  alignas(1024) T k[Tr::kStages][Tr::kBlockN * Tr::kD];
  alignas(1024) T v[Tr::kStages][Tr::kBlockN * Tr::kD];
  QRow qrows[Tr::kBlockM];
  // Rows of step j (tokens and mask coordinates), whether it is mask-free (words: see
  // forward.cuh) and which of its tiles TMA loads, in slot j % kRowSlots: one more slot than buffers, so that the producer
  // writes step j+1's while the consumers still read step j+1-kStages's.
  static constexpr int kRowSlots = Tr::kStages + 1;
  KRow krows[kRowSlots][Tr::kBlockN];
  int full[kRowSlots];
  int tma[kRowSlots];  // bit t: tile t of the step is loaded as TMA boxes (else gathered)
  uint64_t q_full;
  uint64_t k_full[Tr::kStages], v_full[Tr::kStages];    // producer → consumers
  uint64_t k_empty[Tr::kStages], v_empty[Tr::kStages];  // consumers → producer
};

// Named barriers (0 is __syncthreads): the producer's own, and one per consumer for the
// ping-pong.
constexpr int kProducerBarrier = 1;
constexpr int kTurnBarrier = 2;

// L2 cache policy of the TMA loads (the "evict normal" createpolicy value).
constexpr uint64_t kEvictNormal = 0x1000000000000000ull;

__device__ __forceinline__ void named_sync(int id, int threads) {
  asm volatile("bar.sync %0, %1;" ::"r"(id), "r"(threads) : "memory");
}
__device__ __forceinline__ void named_arrive(int id, int threads) {
  asm volatile("bar.arrive %0, %1;" ::"r"(id), "r"(threads) : "memory");
}

// The producer thread's cp.async gathers issued so far complete the barrier's phase together
// with the plain arrive (which releases the thread's earlier shared-memory writes); the
// barrier counts two arrivals per producer thread.
__device__ __forceinline__ void producer_commit(uint64_t* bar) {
  cutlass::arch::cpasync_barrier_arrive_noinc(bar);
  cutlass::arch::ClusterBarrier::arrive(bar);
}

template <class Tr>
__global__ void __launch_bounds__(Tr::kThreads, 1)
    ws_fwd_kernel(const Problem p, const typename Tr::T* __restrict__ q,
                  const typename Tr::T* __restrict__ k, const typename Tr::T* __restrict__ v,
                  typename Tr::T* __restrict__ out, float* __restrict__ lse,
                  const __grid_constant__ KvTensorMaps maps) {
  using T = typename Tr::T;
  using Barrier = cutlass::arch::ClusterBarrier;
  constexpr int kD = Tr::kD;
  constexpr int kBlockM = Tr::kBlockM;
  constexpr int kBlockN = Tr::kBlockN;
  constexpr int kStages = Tr::kStages;
  constexpr int kConsumerThreads = 128 * Tr::kConsumers;
  constexpr int kRowSlots = WsFwdSmem<Tr>::kRowSlots;
  extern __shared__ __align__(1024) char smem_raw[];
  auto& sm = *reinterpret_cast<WsFwdSmem<Tr>*>(smem_raw);
  const int tid = threadIdx.x;
  const int h = blockIdx.y;
  const int64_t b = blockIdx.z;

  Group G;
  int qt[kMaxRank];
  if (!G.init(p, blockIdx.x, /*kv_side=*/false, qt)) return;
  const TileBox box = TileBox::seen_by(G, p, qt);
  constexpr int kPerStep = Tr::kTilesPerStep;
  const int steps = (box.total + kPerStep - 1) / kPerStep;
  const int64_t n_q_tok = sm80::q_tokens_of(p);
  const int64_t q_stride = p.heads * kD;

  if (tid == 0) {
    Barrier::init(&sm.q_full, 2 * 128);
    for (int s = 0; s < kStages; ++s) {
      Barrier::init(&sm.k_full[s], 2 * 128);
      Barrier::init(&sm.v_full[s], 2 * 128);
      Barrier::init(&sm.k_empty[s], kConsumerThreads / 32);  // one arrival per warp
      Barrier::init(&sm.v_empty[s], kConsumerThreads / 32);
    }
    cutlass::arch::fence_barrier_init();
  }
  __syncthreads();  // the last CTA-wide barrier: the roles never meet again

  Tensor sQ = make_tensor(make_smem_ptr(sm.q), typename Tr::SmemQ{});
  auto sK = [&](int s) { return make_tensor(make_smem_ptr(sm.k[s]), typename Tr::SmemK{}); };
  auto sVt = [&](int s) { return make_tensor(make_smem_ptr(sm.v[s]), typename Tr::SmemVt{}); };

  if (tid < 128) {
    // ------------------------------------------------------------------------- producer
    cutlass::arch::warpgroup_reg_dealloc<Tr::kProducerRegs>();
    const int hkv = h / (int)(p.heads / p.kv_heads);
    const int64_t n_kv_tok = sm80::kv_tokens_of(p);
    const int64_t kv_stride = p.kv_heads * kD;
    const T* qb = q + (b * n_q_tok * p.heads + h) * kD;
    const T* kb = k + (b * n_kv_tok * p.kv_heads + hkv) * kD;
    const T* vb = v + (b * n_kv_tok * p.kv_heads + hkv) * kD;
    if (tid == 0 && maps.on) {
      prefetch_tma_descriptor(&maps.k);
      prefetch_tma_descriptor(&maps.v);
    }
    const FullTiles fulls = FullTiles::of(G, p, qt, Tr::kTileRows);
    for (int r = tid; r < kBlockM; r += 128) sm.qrows[r] = G.q_row(p, qt, r);
    int ii[kMaxRank];
    sm80::gather_rows<kBlockM, kD, 128>([&](int r, int c) { return &sQ(r, c); }, qb, q_stride,
                                        [&](int r) { return G.q_token(p, qt, r, ii); }, tid);
    producer_commit(&sm.q_full);

    // Row tables of step j, in a ring of kRowSlots: step j+1's are written right after K(j)
    // is issued, while the producer waits for V's buffer, so that they are ready when K(j+1)'s
    // buffer frees up (built just before each gather, they cost 1.12x in FLUX-4K GNA).
    auto fill_rows = [&](int j) {
      // Every producer thread computes the step's flags (the same values); its last writes them.
      bool full = true;
      int tma = 0;
      for (int t = 0; t < kPerStep; ++t) {
        const int tt = j * kPerStep + t;
        int kj[kMaxRank];
        box.at(tt, kj);
        full = full && tt < box.total && fulls.contains(kj);
        if (maps.on && tt < box.total && G.tile_inside(p, kj, /*kv_side=*/true)) tma |= 1 << t;
      }
      if (tid == 127) {
        sm.full[j % kRowSlots] = full;
        sm.tma[j % kRowSlots] = tma;
      }
      // A mask-free step loaded by TMA alone never reads its rows.
      if (full && tma == (1 << kPerStep) - 1) return;
      KRow* rows = sm.krows[j % kRowSlots];
      for (int r = tid; r < kBlockN; r += 128) {
        const int t = j * kPerStep + r / Tr::kTileRows;
        int kj[kMaxRank];
        box.at(t < box.total ? t : 0, kj);
        rows[r] = G.k_row(p, kj, r % Tr::kTileRows);
        if (t >= box.total) rows[r].tok = -1;
      }
    };
    for (int j = 0; j < steps; ++j) {
      if (j == 0) fill_rows(0);
      const int s = j % kStages;
      const uint32_t free_phase = ((j / kStages) + 1) & 1;  // the (j/kStages - 1)-th release
      if (j >= kStages) Barrier::wait(&sm.k_empty[s], free_phase);
      // Every producer thread gathers rows that others wrote. This barrier also orders the
      // gathers of step j-1 before step j+1 rewrites slot (j+1) % kRowSlots (the slot of
      // step j+1-kRowSlots <= j-2).
      named_sync(kProducerBarrier, 128);
      const KRow* rows = sm.krows[j % kRowSlots];
      const int tma = sm.tma[j % kRowSlots];
      // Tiles of step j into buffer `dst` ((row, col) -> address): TMA boxes issued by thread
      // 0 (the barrier expects their bytes), row gathers by every producer thread.
      auto load = [&](const CUtensorMap* map, const T* base, uint64_t* bar, auto const& dst) {
        if (tid == 0 && tma != 0) {
          cutlass::arch::ClusterTransactionBarrier::expect_transaction(
              bar, __popc(tma) * Tr::kTileRows * kD * (int)sizeof(T));
          for (int t = 0; t < kPerStep; ++t) {
            if (!(tma >> t & 1)) continue;
            int kj[kMaxRank], x[kMaxRank];
            box.at(j * kPerStep + t, kj);
            for (int a = 0; a < kMaxRank; ++a)
              x[a] = G.g[a] + (int)p.axes[a].dilation * kj[a] * (int)p.kv_tile[a];
            for (int c = 0; c < kD; c += 64)
              SM90_TMA_LOAD_5D::copy(map, bar, kEvictNormal, dst(t * Tr::kTileRows, c), c, hkv,
                                     x[2], x[1], (int)b * (int)p.axes[0].kv_length + x[0]);
          }
        }
        for (int t = 0; t < kPerStep; ++t) {
          if (tma >> t & 1) continue;
          const int r0 = t * Tr::kTileRows;
          sm80::gather_rows<Tr::kTileRows, kD, 128>(
              [&](int r, int c) { return dst(r0 + r, c); }, base, kv_stride,
              [&](int r) { return rows[r0 + r].tok; }, tid);
        }
        producer_commit(bar);
      };
      Tensor k_s = sK(s);
      load(&maps.k, kb, &sm.k_full[s], [&](int r, int c) { return &k_s(r, c); });
      // The consumers have released the rows of step j+1-kRowSlots (<= j-kStages) with that
      // step's K buffer, which the wait above saw.
      if (j + 1 < steps) fill_rows(j + 1);
      if (j >= kStages) Barrier::wait(&sm.v_empty[s], free_phase);
      Tensor vt_s = sVt(s);
      load(&maps.v, vb, &sm.v_full[s], [&](int r, int c) { return &vt_s(c, r); });
    }
    sm80::cp_async_wait<0>();
    return;
  }

  // --------------------------------------------------------------------------- consumers
  cutlass::arch::warpgroup_reg_alloc<Tr::kConsumerRegs>();
  const int ctid = tid - 128;
  const int wg = ctid / 128;
  const bool warp_leader = ctid % 32 == 0;
  typename Tr::MmaS mma_s;
  typename Tr::MmaO mma_o;
  auto thr_s = mma_s.get_thread_slice(ctid);
  auto thr_o = mma_o.get_thread_slice(ctid);
  Tensor tSrQ = thr_s.partition_fragment_A(sQ);
  Tensor acc_o = partition_fragment_C(mma_o, Shape<Int<kBlockM>, Int<kD>>{});
  clear(acc_o);
  Tensor ro = make_tensor(acc_o.data(), gmma_rowcol(acc_o.layout()));
  constexpr int kRowsPerThread = decltype(size<0>(ro))::value;
  float row_max[kRowsPerThread];
  float row_sum[kRowsPerThread];
  float corr[kRowsPerThread];
  CUTE_UNROLL
  for (int i = 0; i < kRowsPerThread; ++i) {
    row_max[i] = -INFINITY;
    row_sum[i] = 0.f;
  }
  Tensor cS = thr_s.partition_C(make_identity_tensor(Shape<Int<kBlockM>, Int<kBlockN>>{}));
  Tensor cSrc = make_tensor(cS.data(), gmma_rowcol(cS.layout()));
  const float scale2 = p.scale * sm80::kLog2e;
  Tensor acc_s = partition_fragment_C(mma_s, Shape<Int<kBlockM>, Int<kBlockN>>{});
  Tensor rs = make_tensor(acc_s.data(), gmma_rowcol(acc_s.layout()));
  Tensor rP = make_tensor<T>(acc_s.layout());  // P(it-1), read by the P·V in flight
  Tensor tOrP = make_tensor(rP.data(), gmma_acc_as_a(rP.layout()));

  // Turns: consumer 0 issues first; each consumer hands the turn to the other after issuing.
  const int other = Tr::kConsumers - 1 - wg;
  if (Tr::kPingPong && wg == 1 && steps > 0) named_arrive(kTurnBarrier + 0, kConsumerThreads);

  Barrier::wait(&sm.q_full, 0);
  cutlass::arch::fence_view_async_shared();
  // S(it) and the softmax of step it; P·V(it-1) is in flight unless `first`. The caller
  // holds the turn only for the issue.
  auto scores = [&](int it) {
    const int s = it % kStages;
    Barrier::wait(&sm.k_full[s], (it / kStages) & 1);
    cutlass::arch::fence_view_async_shared();  // cp.async wrote K (generic proxy), wgmma reads it
    wgmma_issue(mma_s, tSrQ, thr_s.partition_fragment_B(sK(s)), acc_s, /*accumulate=*/false);
  };
  auto softmax = [&](int it) {
    const int s = it % kStages;
    warpgroup_fence_operand(acc_s);
    const int slot = it % kRowSlots;
    sm80::softmax_step(rs, cSrc, row_max, row_sum, corr, sm.full[slot] != 0, sm.qrows,
                       sm.krows[slot], scale2);
    __syncwarp();
    if (warp_leader) Barrier::arrive(&sm.k_empty[s]);  // K(it) and its rows are read
  };
  // O = O · corr + P(it)·V(it), issued without waiting.
  auto accumulate = [&](int it) {
    const int s = it % kStages;
    sm80::rescale_rows(ro, corr);
    Barrier::wait(&sm.v_full[s], (it / kStages) & 1);
    cutlass::arch::fence_view_async_shared();
    wgmma_issue(mma_o, tOrP, thr_o.partition_fragment_B(sVt(s)), acc_o, /*accumulate=*/true);
  };
  auto to_p = [&] {
    CUTE_UNROLL
    for (int i = 0; i < size(acc_s); ++i) rP(i) = static_cast<T>(acc_s(i));
  };
  auto take_turn = [&] {
    if (Tr::kPingPong) named_sync(kTurnBarrier + wg, kConsumerThreads);
  };
  auto pass_turn = [&](int it) {
    if (Tr::kPingPong && !(wg == 1 && it == steps - 1))
      named_arrive(kTurnBarrier + other, kConsumerThreads);
  };

  if (steps > 0) {
    take_turn();
    scores(0);
    pass_turn(0);
    warpgroup_wait<0>();
    softmax(0);
    to_p();
  }
  // The loop body has no conditional MMA: ptxas then tracks the two groups in flight
  // instead of serialising them.
  for (int it = 1; it < steps; ++it) {
    take_turn();
    scores(it);
    accumulate(it - 1);
    pass_turn(it);
    warpgroup_wait<1>();  // S(it)
    softmax(it);
    warpgroup_wait<0>();  // P·V(it-1): rP and V(it-1) are free
    warpgroup_fence_operand(acc_o);
    if (warp_leader) Barrier::arrive(&sm.v_empty[(it - 1) % kStages]);
    to_p();
  }
  if (steps > 0) {
    accumulate(steps - 1);
    warpgroup_wait<0>();
    warpgroup_fence_operand(acc_o);
  }

  // Epilogue: normalise, write O (input dtype) and lse (natural log) for valid rows only.
  Tensor cO = thr_o.partition_C(make_identity_tensor(Shape<Int<kBlockM>, Int<kD>>{}));
  Tensor cOrc = make_tensor(cO.data(), gmma_rowcol(cO.layout()));
  T* ob = out + (b * n_q_tok * p.heads + h) * kD;
  float* lb = lse + b * n_q_tok * p.heads + h;
  sm80::store_out_lse(ro, cOrc, row_max, row_sum, sm.qrows, ob, lb, q_stride, p.heads,
                      ctid % 32);
}

}  // namespace sm90
}  // namespace gna
