// sm90a GNA dK/dV kernel, warp-specialised: the decomposition of backward.cuh's dkdv_kernel
// (one CTA per 64-token KV tile, steps of 64 rows of the Q tiles that see it, times the query
// heads of its GQA group) with the work split by role, as in forward_ws.cuh.
//
// - Warpgroup 0, the producer, keeps few registers and does all data movement: K, V and the
//   KV rows once; then per step the Q rows (tokens, and windows for partial steps) with their
//   lse and delta, and Q and dO into a ring of kStages buffers: as TMA boxes where the Q tile
//   lies inside the frame (tensor_maps.h: a 64-row chunk of a Q tile is a box), else as
//   cp.async row gathers. One mbarrier per buffer announces all of it.
// - Warpgroups 1 and 2, the consumers, take alternate steps, so the two interleave their
//   GEMMs and softmax as two CTAs per SM would, but share the K/V tile and the producer and
//   get more registers. Each accumulates dK and dV of the whole KV tile for its steps:
//     S^T = K·Q^T, dP^T = V·dO^T, P^T = exp2(S^T·c − lse), dS^T = P^T ∘ (dP^T − delta),
//     dV += P^T·dO, dK += dS^T·Q,
//   then the other consumer's GEMMs fill the tensor cores while it waits. At the end the consumers add their partial dK and dV through shared memory (a
//   fixed order: the result stays bitwise deterministic) and each writes one of them.
#pragma once

#include <cutlass/arch/reg_reconfig.h>

#include "backward.cuh"
#include "kv_ring.cuh"

namespace gna {
namespace sm90 {

using namespace cute;

template <class T_, int kD_, int kStages_>
struct WsDkdvTraits {
  using T = T_;
  static constexpr int kD = kD_;
  static constexpr int kBlockM = 64;  // the KV tile's rows
  static constexpr int kBlockN = 64;  // Q rows per step
  static constexpr int kStages = kStages_;
  static constexpr int kConsumers = 2;
  static constexpr int kThreads = 128 * (1 + kConsumers);
#ifndef PREGS
#define PREGS 56
#define CREGS 224
#endif
  static constexpr int kProducerRegs = PREGS;
  static constexpr int kConsumerRegs = CREGS;
  static_assert(128 * (kProducerRegs + kConsumers * kConsumerRegs) <= 65536, "registers");
  // One warpgroup's GEMMs, as in backward.cuh.
  using Base = BwdTraits<T, kD, kBlockM, kBlockN>;
  using MmaS = typename Base::MmaS;
  using MmaG = typename Base::MmaG;
  using SmemM = typename Base::SmemM;
  using SmemN = typename Base::SmemN;
  using SmemNt = typename Base::SmemNt;
};

template <class Tr>
struct WsDkdvSmem {
  using T = typename Tr::T;
  alignas(1024) T k[Tr::kBlockM * Tr::kD];
  alignas(1024) T v[Tr::kBlockM * Tr::kD];
  // The Q/dO ring; after the last step the consumers exchange dK (in q) and dV (in dout)
  // there as float.
  alignas(1024) T q[Tr::kStages][Tr::kBlockN * Tr::kD];
  alignas(1024) T dout[Tr::kStages][Tr::kBlockN * Tr::kD];
  static_assert(sizeof(T) * Tr::kStages * Tr::kBlockN >= sizeof(float) * Tr::kBlockM,
                "room for the dK/dV exchange");
  // Rows of step j (written one step ahead, see forward_ws.cuh) in slot j % kRowSlots: the
  // Q rows (tokens; windows only on partial steps), lse (+inf on padding rows, so that P = 0
  // there) and delta, whether the step is mask-free and whether TMA loads it.
  static constexpr int kRowSlots = Tr::kStages + 1;
  QRow qrows[kRowSlots][Tr::kBlockN];
  float qlse[kRowSlots][Tr::kBlockN];
  float qdelta[kRowSlots][Tr::kBlockN];
  int full[kRowSlots];
  int tma[kRowSlots];
  KRow krows[Tr::kBlockM];
  Group group;  // the CTA's geometry, kept out of the producer's few registers
  TileBox box;
  FullTiles fulls;
  sm80::RowTable<sm80::kMaxQTokens> qtable;
  uint64_t kv_full;
  uint64_t n_full[Tr::kStages];   // producer → consumer of the step
  uint64_t n_empty[Tr::kStages];  // consumer → producer
};

template <class Tr>
__global__ void __launch_bounds__(Tr::kThreads, 1)
    ws_dkdv_kernel(const Problem p, const typename Tr::T* __restrict__ q,
                   const typename Tr::T* __restrict__ k, const typename Tr::T* __restrict__ v,
                   const typename Tr::T* __restrict__ dout, const float* __restrict__ lse,
                   const float* __restrict__ delta, typename Tr::T* __restrict__ dk,
                   typename Tr::T* __restrict__ dv, const __grid_constant__ QTensorMaps maps) {
  using T = typename Tr::T;
  using Barrier = cutlass::arch::ClusterBarrier;
  constexpr int kD = Tr::kD;
  constexpr int kBlockM = Tr::kBlockM;
  constexpr int kBlockN = Tr::kBlockN;
  constexpr int kStages = Tr::kStages;
  constexpr int kRowSlots = WsDkdvSmem<Tr>::kRowSlots;
  static_assert(kBlockM == sm80::kKvTokens, "one KV tile per CTA");
  extern __shared__ __align__(1024) char smem_raw[];
  auto& sm = *reinterpret_cast<WsDkdvSmem<Tr>*>(smem_raw);
  const int tid = threadIdx.x;
  const int hkv = blockIdx.y;
  const int64_t b = blockIdx.z;

  int kt[kMaxRank];
  {
    Group g0;
    if (!g0.init(p, blockIdx.x, /*kv_side=*/true, kt)) return;
    if (tid == 0) {
      sm.group = g0;
      sm.box = TileBox::seeing(g0, p, kt);
      sm.fulls = FullTiles::seeing(g0, p, kt, kBlockM);
      Barrier::init(&sm.kv_full, 2 * 128);
      for (int s = 0; s < kStages; ++s) {
        Barrier::init(&sm.n_full[s], 2 * 128);
        Barrier::init(&sm.n_empty[s], 4);  // one arrival per warp of the step's consumer
      }
      cutlass::arch::fence_barrier_init();
    }
    __syncthreads();  // the last CTA-wide barrier
  }
  const Group& G = sm.group;
  const int group_heads = (int)(p.heads / p.kv_heads);
  const int n_chunks = (Group::qprod(p) + kBlockN - 1) / kBlockN;
  const int steps = group_heads * sm.box.total * n_chunks;
  const int64_t n_q_tok = sm80::q_tokens_of(p);
  const int64_t n_kv_tok = sm80::kv_tokens_of(p);
  const int64_t kv_stride = p.kv_heads * kD;
  const int64_t kv_off = (b * n_kv_tok * p.kv_heads + hkv) * kD;

  Tensor sK = make_tensor(make_smem_ptr(sm.k), typename Tr::SmemM{});
  Tensor sV = make_tensor(make_smem_ptr(sm.v), typename Tr::SmemM{});
  auto sQ = [&](int s) { return make_tensor(make_smem_ptr(sm.q[s]), typename Tr::SmemN{}); };
  auto sdO = [&](int s) { return make_tensor(make_smem_ptr(sm.dout[s]), typename Tr::SmemN{}); };

  if (tid < 128) {
    // ------------------------------------------------------------------------- producer
    cutlass::arch::warpgroup_reg_dealloc<Tr::kProducerRegs>();
    const int64_t q_stride = p.heads * kD;
    if (tid == 0 && maps.on) {
      prefetch_tma_descriptor(&maps.q);
      prefetch_tma_descriptor(&maps.dout);
    }
    {
      int jj[kMaxRank];
      for (int r = tid; r < kBlockM; r += 128) sm.krows[r] = G.k_row(p, kt, r);
      auto k_tok = [&](int r) { return G.kv_token(p, kt, r, jj); };
      sm80::gather_rows<kBlockM, kD, 128>([&](int r, int c) { return &sK(r, c); },
                                          k + kv_off, kv_stride, k_tok, tid);
      sm80::gather_rows<kBlockM, kD, 128>([&](int r, int c) { return &sV(r, c); },
                                          v + kv_off, kv_stride, k_tok, tid);
    }
    sm.qtable.build(G, p, /*kv_side=*/false, tid, 128);
    producer_commit(&sm.kv_full);
    named_sync(kProducerBarrier, 128);  // the row table

    // Step j: query head, Q tile of the box and chunk of its rows (chunks fastest).
    auto step_head = [&](int j) { return hkv * group_heads + j / (n_chunks * sm.box.total); };
    auto step_tile = [&](int j, int qt[kMaxRank]) { sm.box.at((j / n_chunks) % sm.box.total, qt); };
    auto fill_rows = [&](int j) {
      const int chunk = j % n_chunks;
      const int slot = j % kRowSlots;
      int qt[kMaxRank];
      step_tile(j, qt);
      const bool full = sm.fulls.contains(qt);
      const bool inside = G.tile_inside(p, qt, /*kv_side=*/false);
      // A full tile inside the frame needs only its tokens (the mask is never evaluated).
      const bool fast = full && inside;
      const int base = G.tile_base(p, qt, /*kv_side=*/false);
      const int64_t stats = b * n_q_tok * p.heads + step_head(j);
      for (int r = tid; r < kBlockN; r += 128) {
        QRow row;
        if (fast) {
          const int off = sm.qtable.offset[chunk * kBlockN + r];
          row.tok = off < 0 ? -1 : base + off;
          sm.qrows[slot][r].tok = row.tok;
        } else {
          row = G.q_row(p, qt, chunk * kBlockN + r, /*window=*/!full);
          sm.qrows[slot][r] = row;
        }
        if (row.tok >= 0) {
          const int64_t at = stats + (int64_t)row.tok * p.heads;
          SM80_CP_ASYNC_CACHEALWAYS<float>::copy(lse[at], sm.qlse[slot][r]);
          SM80_CP_ASYNC_CACHEALWAYS<float>::copy(delta[at], sm.qdelta[slot][r]);
        } else {
          sm.qlse[slot][r] = INFINITY;
          sm.qdelta[slot][r] = 0.f;
        }
      }
      if (tid == 127) {
        sm.full[slot] = full;
        sm.tma[slot] = maps.on && inside;
      }
    };

    if (steps > 0) fill_rows(0);
    for (int j = 0; j < steps; ++j) {
      const int s = j % kStages;
      if (j >= kStages) Barrier::wait(&sm.n_empty[s], ((j / kStages) + 1) & 1);
      // The rows of step j are written (gathers read other threads' rows); this also orders
      // the gathers of step j-1 before step j+1 rewrites slot (j+1) % kRowSlots.
      named_sync(kProducerBarrier, 128);
      const int slot = j % kRowSlots;
      Tensor q_s = sQ(s);
      Tensor do_s = sdO(s);
      if (sm.tma[slot]) {
        if (tid == 0) {
          cutlass::arch::ClusterTransactionBarrier::expect_transaction(
              &sm.n_full[s], 2 * kBlockN * kD * (int)sizeof(T));
          int qt[kMaxRank];
          step_tile(j, qt);
          tma_load_q_chunk<kD>(
              maps, &sm.n_full[s], G, p, qt, j % n_chunks, step_head(j), b,
              [&](int c) { return &q_s(0, c); }, [&](int c) { return &do_s(0, c); });
        }
      } else {
        const QRow* rows = sm.qrows[slot];
        auto tok = [&](int r) { return rows[r].tok; };
        const int64_t q_off = (b * n_q_tok * p.heads + step_head(j)) * kD;
        sm80::gather_rows<kBlockN, kD, 128>([&](int r, int c) { return &q_s(r, c); },
                                            q + q_off, q_stride, tok, tid);
        sm80::gather_rows<kBlockN, kD, 128>([&](int r, int c) { return &do_s(r, c); },
                                            dout + q_off, q_stride, tok, tid);
      }
      producer_commit(&sm.n_full[s]);
      // The consumer released the rows of step j+1-kRowSlots (<= j-kStages) with that
      // step's buffer, which the wait above saw.
      if (j + 1 < steps) fill_rows(j + 1);
    }
    sm80::cp_async_wait<0>();
    return;
  }

  // --------------------------------------------------------------------------- consumers
  cutlass::arch::warpgroup_reg_alloc<Tr::kConsumerRegs>();
  const int wg = tid / 128 - 1;
  const int t = tid % 128;
  const bool warp_leader = t % 32 == 0;
  typename Tr::MmaS mma_s;
  typename Tr::MmaG mma_g;
  auto thr_s = mma_s.get_thread_slice(t);
  auto thr_g = mma_g.get_thread_slice(t);
  Tensor tSrK = thr_s.partition_fragment_A(sK);
  Tensor tSrV = thr_s.partition_fragment_A(sV);
  Tensor acc_dk = partition_fragment_C(mma_g, Shape<Int<kBlockM>, Int<kD>>{});
  Tensor acc_dv = partition_fragment_C(mma_g, Shape<Int<kBlockM>, Int<kD>>{});
  clear(acc_dk);
  clear(acc_dv);
  Tensor acc_s = partition_fragment_C(mma_s, Shape<Int<kBlockM>, Int<kBlockN>>{});
  Tensor acc_dp = partition_fragment_C(mma_s, Shape<Int<kBlockM>, Int<kBlockN>>{});
  Tensor rP = make_tensor<T>(acc_s.layout());
  Tensor rdS = make_tensor<T>(acc_dp.layout());
  Tensor tOrP = make_tensor(rP.data(), gmma_acc_as_a(rP.layout()));
  Tensor tOrdS = make_tensor(rdS.data(), gmma_acc_as_a(rdS.layout()));
  Tensor rs = make_tensor(acc_s.data(), gmma_rowcol(acc_s.layout()));
  Tensor rdp = make_tensor(acc_dp.data(), gmma_rowcol(acc_dp.layout()));
  Tensor cS = thr_s.partition_C(make_identity_tensor(Shape<Int<kBlockM>, Int<kBlockN>>{}));
  Tensor cSrc = make_tensor(cS.data(), gmma_rowcol(cS.layout()));
  const float scale2 = p.scale * sm80::kLog2e;
  auto sQt = [&](int s) { return make_tensor(make_smem_ptr(sm.q[s]), typename Tr::SmemNt{}); };
  auto sdOt = [&](int s) {
    return make_tensor(make_smem_ptr(sm.dout[s]), typename Tr::SmemNt{});
  };
  auto release = [&](int it) {
    __syncwarp();
    if (warp_leader) Barrier::arrive(&sm.n_empty[it % kStages]);
  };

  Barrier::wait(&sm.kv_full, 0);
  for (int it = wg; it < steps; it += Tr::kConsumers) {
    const int s = it % kStages;
    Barrier::wait(&sm.n_full[s], (it / kStages) & 1);
    cutlass::arch::fence_view_async_shared();  // cp.async wrote some of it (generic proxy)
    wgmma_issue(mma_s, tSrK, thr_s.partition_fragment_B(sQ(s)), acc_s, false);
    wgmma_issue(mma_s, tSrV, thr_s.partition_fragment_B(sdO(s)), acc_dp, false);
    warpgroup_wait<0>();
    warpgroup_fence_operand(acc_s);
    warpgroup_fence_operand(acc_dp);
    const int slot = it % kRowSlots;
    const QRow* qrows = sm.qrows[slot];
    const float* qlse = sm.qlse[slot];
    const float* qdelta = sm.qdelta[slot];
    const bool full = sm.full[slot] != 0;
    // P^T and dS^T in float, then both converted: fewer registers live at once than with dV
    // in flight while dS is computed (which makes ptxas serialise the wgmmas).
    CUTE_UNROLL
    for (int mi = 0; mi < size<0>(rs); ++mi) {
      if (full) {
        CUTE_UNROLL
        for (int ni = 0; ni < size<1>(rs); ++ni) {
          const float lse2 = qlse[get<1>(cSrc(mi, ni))] * sm80::kLog2e;
          rs(mi, ni) = sm80::fast_exp2(rs(mi, ni) * scale2 - lse2);
        }
      } else {
        const KRow kr = sm.krows[get<0>(cSrc(mi, 0))];
        CUTE_UNROLL
        for (int ni = 0; ni < size<1>(rs); ++ni) {
          const int col = get<1>(cSrc(mi, ni));
          const float pr = sm80::fast_exp2(rs(mi, ni) * scale2 - qlse[col] * sm80::kLog2e);
          rs(mi, ni) = sm80::visible(qrows[col], kr) ? pr : 0.f;
        }
      }
    }
    CUTE_UNROLL
    for (int mi = 0; mi < size<0>(rdp); ++mi) {
      CUTE_UNROLL
      for (int ni = 0; ni < size<1>(rdp); ++ni) {
        const float dl = qdelta[get<1>(cSrc(mi, ni))];
        rdp(mi, ni) = rs(mi, ni) * (rdp(mi, ni) - dl);
      }
    }
    CUTE_UNROLL
    for (int i = 0; i < size(acc_s); ++i) rP(i) = static_cast<T>(acc_s(i));
    CUTE_UNROLL
    for (int i = 0; i < size(acc_dp); ++i) rdS(i) = static_cast<T>(acc_dp(i));
    wgmma_issue(mma_g, tOrP, thr_g.partition_fragment_B(sdOt(s)), acc_dv, true);
    wgmma_issue(mma_g, tOrdS, thr_g.partition_fragment_B(sQt(s)), acc_dk, true);
    // The other consumer's GEMMs keep the tensor cores busy meanwhile.
    warpgroup_wait<0>();
    release(it);
  }
  warpgroup_wait<0>();
  warpgroup_fence_operand(acc_dk);
  warpgroup_fence_operand(acc_dv);

  // Both consumers are past their last step, so every buffer of the ring has been read:
  // consumer 1 hands over its dK, consumer 0 its dV; each adds the other's and writes one.
  constexpr int kConsumerThreads = 128 * Tr::kConsumers;
  named_sync(kConsumersBarrier, kConsumerThreads);
  float* xdk = reinterpret_cast<float*>(&sm.q[0][0]);
  float* xdv = reinterpret_cast<float*>(&sm.dout[0][0]);
  // Both accumulators have the same fragment layout in both consumers.
  auto hand_over = [&](auto const& acc, float* x) {
    CUTE_UNROLL
    for (int i = 0; i < size(acc); ++i) x[i * 128 + t] = acc(i);
  };
  if (wg == 0) {
    hand_over(acc_dv, xdv);
    if (G.kv_pad) {
      // Rows outside the global axis were read as -1 (zero-filled, never seen, so their
      // accumulators are exactly 0); they are still part of dK/dV and are written as 0.
      int jj[kMaxRank];
      for (int r = t; r < kBlockM; r += 128) sm.krows[r].tok = G.kv_store_token(p, kt, r, jj);
    }
  } else {
    hand_over(acc_dk, xdk);
  }
  named_sync(kConsumersBarrier, kConsumerThreads);
  Tensor cO = thr_g.partition_C(make_identity_tensor(Shape<Int<kBlockM>, Int<kD>>{}));
  Tensor cOrc = make_tensor(cO.data(), gmma_rowcol(cO.layout()));
  auto finish = [&](auto& acc, const float* x, T* out, float scale) {
    CUTE_UNROLL
    for (int i = 0; i < size(acc); ++i) acc(i) += x[i * 128 + t];
    sm80::store_rows(make_tensor(acc.data(), gmma_rowcol(acc.layout())), cOrc, out + kv_off,
                     kv_stride, scale, [&](int r) { return sm.krows[r].tok; });
  };
  if (wg == 0)
    finish(acc_dk, xdk, dk, p.scale);
  else
    finish(acc_dv, xdv, dv, 1.f);
}

// The dQ kernel, warp-specialised like forward_ws.cuh: one CTA per 128-token Q tile (head,
// batch, dilation group), one KV tile of its box per step. The producer loads Q, dO and the Q
// rows (with lse and delta) once, then K, V and their rows through the ring of kv_ring.cuh.
// Both consumers (64 Q rows each) take every step: S = Q·K^T, dP = dO·V^T, P = exp2(S·c −
// lse), dS = P ∘ (dP − delta), dQ += dS·K, with S and dP of step it issued while dQ of step
// it-1 still runs.
template <class T_, int kD_, int kStages_>
struct WsDqTraits {
  using T = T_;
  static constexpr int kD = kD_;
  static constexpr int kConsumers = 2;
  static constexpr int kBlockM = 64 * kConsumers;  // the Q tile's rows
  static constexpr int kBlockN = 64;               // one KV tile per step
  static constexpr int kStages = kStages_;
  static constexpr int kThreads = 128 * (1 + kConsumers);
#ifndef DQ_PREGS
#define DQ_PREGS 72
#define DQ_CREGS 216
#endif
  static constexpr int kProducerRegs = DQ_PREGS;
  static constexpr int kConsumerRegs = DQ_CREGS;
  static_assert(128 * (kProducerRegs + kConsumers * kConsumerRegs) <= 65536, "registers");
  using MmaS = MmaSS<T, kConsumers, kBlockN, kD>;  // S = Q·K^T, dP = dO·V^T
  using MmaG = MmaRS<T, kConsumers, kD, kBlockN>;  // dQ += dS·K
  using SmemQ = SmemKMajor<T, kBlockM, kD>;
  using Ring = KvRing<T, kD, /*kPerStep=*/1, kStages, 4 * kConsumers>;
};

template <class Tr>
struct WsDqSmem {
  using T = typename Tr::T;
  alignas(1024) T q[Tr::kBlockM * Tr::kD];
  alignas(1024) T dout[Tr::kBlockM * Tr::kD];
  typename Tr::Ring ring;
  QRow qrows[Tr::kBlockM];  // with lse2 and delta
  uint64_t q_full;
};

template <class Tr>
__global__ void __launch_bounds__(Tr::kThreads, 1)
    ws_dq_kernel(const Problem p, const typename Tr::T* __restrict__ q,
                 const typename Tr::T* __restrict__ k, const typename Tr::T* __restrict__ v,
                 const typename Tr::T* __restrict__ dout, const float* __restrict__ lse,
                 const float* __restrict__ delta, typename Tr::T* __restrict__ dq,
                 const __grid_constant__ KvTensorMaps maps) {
  using T = typename Tr::T;
  using Barrier = cutlass::arch::ClusterBarrier;
  constexpr int kD = Tr::kD;
  constexpr int kBlockM = Tr::kBlockM;
  constexpr int kBlockN = Tr::kBlockN;
  constexpr int kStages = Tr::kStages;
  extern __shared__ __align__(1024) char smem_raw[];
  auto& sm = *reinterpret_cast<WsDqSmem<Tr>*>(smem_raw);
  auto& ring = sm.ring;
  const int tid = threadIdx.x;
  const int h = blockIdx.y;
  const int64_t b = blockIdx.z;

  Group G;
  int qt[kMaxRank];
  if (!G.init(p, blockIdx.x, /*kv_side=*/false, qt)) return;
  const TileBox box = TileBox::seen_by(G, p, qt);
  const int steps = box.total;
  const int64_t n_q_tok = sm80::q_tokens_of(p);
  const int64_t q_stride = p.heads * kD;
  const int64_t q_off = (b * n_q_tok * p.heads + h) * kD;
  if (tid == 0) {
    Barrier::init(&sm.q_full, 2 * 128);
    ring.init();
    cutlass::arch::fence_barrier_init();
  }
  __syncthreads();  // the last CTA-wide barrier

  Tensor sQ = make_tensor(make_smem_ptr(sm.q), typename Tr::SmemQ{});
  Tensor sdO = make_tensor(make_smem_ptr(sm.dout), typename Tr::SmemQ{});

  if (tid < 128) {
    // ------------------------------------------------------------------------- producer
    cutlass::arch::warpgroup_reg_dealloc<Tr::kProducerRegs>();
    const int hkv = h / (int)(p.heads / p.kv_heads);
    const int64_t n_kv_tok = sm80::kv_tokens_of(p);
    const T* kb = k + (b * n_kv_tok * p.kv_heads + hkv) * kD;
    const T* vb = v + (b * n_kv_tok * p.kv_heads + hkv) * kD;
    const FullTiles fulls = FullTiles::of(G, p, qt, kBlockN);
    const int64_t stats = b * n_q_tok * p.heads + h;
    for (int r = tid; r < kBlockM; r += 128)
      sm.qrows[r] = q_row_with_stats(G, p, qt, r, true, lse + stats, delta + stats);
    int ii[kMaxRank];
    auto q_tok = [&](int r) { return G.q_token(p, qt, r, ii); };
    sm80::gather_rows<kBlockM, kD, 128>([&](int r, int c) { return &sQ(r, c); }, q + q_off,
                                        q_stride, q_tok, tid);
    sm80::gather_rows<kBlockM, kD, 128>([&](int r, int c) { return &sdO(r, c); },
                                        dout + q_off, q_stride, q_tok, tid);
    producer_commit(&sm.q_full);
    ring.produce(p, G, box, fulls, maps, kb, vb, hkv, b, tid, steps);
    sm80::cp_async_wait<0>();
    return;
  }

  // --------------------------------------------------------------------------- consumers
  cutlass::arch::warpgroup_reg_alloc<Tr::kConsumerRegs>();
  const int ctid = tid - 128;
  typename Tr::MmaS mma_s;
  typename Tr::MmaG mma_g;
  auto thr_s = mma_s.get_thread_slice(ctid);
  auto thr_g = mma_g.get_thread_slice(ctid);
  Tensor tSrQ = thr_s.partition_fragment_A(sQ);
  Tensor tSrdO = thr_s.partition_fragment_A(sdO);
  Tensor acc_dq = partition_fragment_C(mma_g, Shape<Int<kBlockM>, Int<kD>>{});
  clear(acc_dq);
  Tensor acc_s = partition_fragment_C(mma_s, Shape<Int<kBlockM>, Int<kBlockN>>{});
  Tensor acc_dp = partition_fragment_C(mma_s, Shape<Int<kBlockM>, Int<kBlockN>>{});
  Tensor rdS = make_tensor<T>(acc_dp.layout());  // dS(it-1), read by the dQ GEMM in flight
  Tensor tOrdS = make_tensor(rdS.data(), gmma_acc_as_a(rdS.layout()));
  Tensor rs = make_tensor(acc_s.data(), gmma_rowcol(acc_s.layout()));
  Tensor rdp = make_tensor(acc_dp.data(), gmma_rowcol(acc_dp.layout()));
  Tensor cS = thr_s.partition_C(make_identity_tensor(Shape<Int<kBlockM>, Int<kBlockN>>{}));
  Tensor cSrc = make_tensor(cS.data(), gmma_rowcol(cS.layout()));
  constexpr int kRowsPerThread = decltype(size<0>(rs))::value;
  const float scale2 = p.scale * sm80::kLog2e;

  Barrier::wait(&sm.q_full, 0);
  cutlass::arch::fence_view_async_shared();
  float lse2_of[kRowsPerThread];  // this thread's rows never change
  float delta_of[kRowsPerThread];
  CUTE_UNROLL
  for (int mi = 0; mi < kRowsPerThread; ++mi) {
    lse2_of[mi] = sm.qrows[get<0>(cSrc(mi, 0))].lse2;
    delta_of[mi] = sm.qrows[get<0>(cSrc(mi, 0))].delta;
  }
  // The loop body has no conditional MMA (see forward_ws.cuh); at it = 0 the first wait
  // simply has no dQ to retire.
  for (int it = 0; it < steps; ++it) {
    const int s = it % kStages;
    ring.wait_k(it);
    wgmma_issue(mma_s, tSrQ, thr_s.partition_fragment_B(ring.sK(s)), acc_s, false);
    ring.wait_v(it);
    wgmma_issue(mma_s, tSrdO, thr_s.partition_fragment_B(ring.sV(s)), acc_dp, false);
    warpgroup_wait<1>();  // dQ(it-1) and S(it)
    warpgroup_fence_operand(acc_s);
    if (it > 0) ring.release_k(it - 1);  // K(it-1) and its rows
    dq_probs(rs, cSrc, lse2_of, scale2, ring.is_full(it), sm.qrows, ring.rows(it));
    warpgroup_wait<0>();  // dP(it)
    warpgroup_fence_operand(acc_dp);
    ring.release_v(it);
    dq_grad_scores(rdp, rs, delta_of);
    CUTE_UNROLL
    for (int i = 0; i < size(acc_dp); ++i) rdS(i) = static_cast<T>(acc_dp(i));
    wgmma_issue(mma_g, tOrdS, thr_g.partition_fragment_B(ring.sKt(s)), acc_dq, true);
  }
  warpgroup_wait<0>();
  warpgroup_fence_operand(acc_dq);

  Tensor cO = thr_g.partition_C(make_identity_tensor(Shape<Int<kBlockM>, Int<kD>>{}));
  sm80::store_rows(make_tensor(acc_dq.data(), gmma_rowcol(acc_dq.layout())),
                   make_tensor(cO.data(), gmma_rowcol(cO.layout())), dq + q_off, q_stride,
                   p.scale, [&](int r) { return sm.qrows[r].tok; });
}

}  // namespace sm90
}  // namespace gna
