// sm90a GNA backward without determinism, warp-specialised (FlashAttention-3's shape): one
// CTA per doubled KV tile (128 KV rows, the host's with_doubled_kv_tile) computes dK and dV
// and adds every step's dQ into a float32 accumulator with TMA reductions, so that each
// (key, query) pair costs five GEMMs instead of the deterministic path's seven.
//
// - Warpgroup 0, the producer, loads K and V once, then per step (a 64-row chunk of a Q
//   tile that sees the KV tile, for one query head of the GQA group) builds the chunk's
//   rows (tokens, windows, lse, delta) and loads its Q and dO into a ring of kStages
//   buffers (TMA boxes inside the frame, else row gathers; one mbarrier per buffer).
// - Warpgroups 1 and 2, the consumers, own 64 KV rows each. Per step: S^T = K·Q^T and
//   dP^T = V·dO^T; P^T and dV += P^T·dO; dS^T and dK += dS^T·Q; dS^T to shared memory; after
//   a barrier over both consumers, dQ's columns wg·D/2.. = dS·K over all 128 KV rows; then
//   the consumer stages them and one of its threads issues the TMA reductions.
#pragma once

#include <cutlass/arch/reg_reconfig.h>

#include "backward.cuh"

namespace gna {
namespace sm90 {

using namespace cute;

// Adds the [rows, 32] float box at `src` (shared memory) into the tensor of `map` at
// coordinates (c, at...) with a TMA reduction, in the thread's current bulk group.
__device__ __forceinline__ void tma_reduce_add(const CUtensorMap* map, const float* src, int c,
                                               const int (&at)[4]) {
  const uint32_t s = static_cast<uint32_t>(__cvta_generic_to_shared(src));
  asm volatile(
      "cp.reduce.async.bulk.tensor.5d.global.shared::cta.add.tile.bulk_group"
      " [%0, {%2, %3, %4, %5, %6}], [%1];" ::"l"(map),
      "r"(s), "r"(c), "r"(at[0]), "r"(at[1]), "r"(at[2]), "r"(at[3])
      : "memory");
}
__device__ __forceinline__ void bulk_commit() {
  asm volatile("cp.async.bulk.commit_group;" ::: "memory");
}
// The thread's bulk groups have read their shared-memory sources (kRead) or completed.
template <bool kRead>
__device__ __forceinline__ void bulk_wait_all() {
  if constexpr (kRead)
    asm volatile("cp.async.bulk.wait_group.read 0;" ::: "memory");
  else
    asm volatile("cp.async.bulk.wait_group 0;" ::: "memory");
}

// dst[0..1] += {x, y} in global memory (one vector reduction).
__device__ __forceinline__ void red_add_v2(float* dst, float x, float y) {
  asm volatile("red.global.add.v2.f32 [%0], {%1, %2};" ::"l"(dst), "f"(x), "f"(y) : "memory");
}

template <class T_, int kD_, int kStages_>
struct FusedBwdTraits {
  using T = T_;
  static constexpr int kD = kD_;
  static constexpr int kConsumers = 2;
  static constexpr int kBlockM = 64 * kConsumers;  // KV rows of the CTA
  static constexpr int kBlockN = 64;               // Q rows per step
  static constexpr int kStages = kStages_;         // Q/dO buffers in the ring
  static constexpr int kThreads = 128 * (1 + kConsumers);
  // A consumer holds dK and dV (128 registers), S^T and dP^T (64), P^T and dS^T (32) and dQ
  // (32): at 232 ptxas serialises the wgmmas (C7512). The producer's row arithmetic spills
  // at 24 instead, off the consumers' path (a step is five GEMMs long).
  static constexpr int kProducerRegs = 24;
  static constexpr int kConsumerRegs = 240;
  static_assert(128 * (kProducerRegs + kConsumers * kConsumerRegs) <= 65536, "registers");
  // S^T, dP^T and the dK/dV GEMMs are the deterministic dK/dV kernel's (for 128 rows).
  using Dkdv = DkdvTraits<T, kD, kBlockM, kBlockN>;
  // dQ = dS·K, [N, D] = [N, M]·[M, D]: dS^T is stored as a K-major [M, N] tile and read as
  // [N, M] (MN-major A), K as [D, M] (MN-major B); consumer w computes dQ's columns
  // w·kDqCols.. over all M rows, a [64, kDqCols] accumulator next to its dK and dV.
  static constexpr int kDqCols = kD / kConsumers;
  static_assert(kDqCols % 32 == 0, "dQ is reduced in boxes of 32 columns");
  using MmaDq = decltype(make_tiled_mma(
      GMMA::ss_op_selector<T, T, float, Shape<Int<kBlockN>, Int<kDqCols>, Int<kBlockM>>,
                           GMMA::Major::MN, GMMA::Major::MN>()));
  using SmemDs = SmemKMajor<T, kBlockM, kBlockN>;
  using SmemDsT = decltype(composition(
      SmemDs{}, make_layout(Shape<Int<kBlockN>, Int<kBlockM>>{}, GenRowMajor{})));
  using SmemKt = decltype(composition(
      typename Dkdv::SmemM{}, make_layout(Shape<Int<kD>, Int<kBlockM>>{}, GenRowMajor{})));
};

template <class Tr>
struct FusedBwdSmem {
  using T = typename Tr::T;
  using Dkdv = typename Tr::Dkdv;
  alignas(1024) T k[Tr::kBlockM * Tr::kD];
  alignas(1024) T v[Tr::kBlockM * Tr::kD];
  alignas(1024) T q[Tr::kStages][Tr::kBlockN * Tr::kD];
  alignas(1024) T dout[Tr::kStages][Tr::kBlockN * Tr::kD];
  // dS^T of steps it (even / odd): a consumer may store step it+1's while the other still
  // reads step it's in its dQ GEMM.
  alignas(1024) T ds[2][Tr::kBlockM * Tr::kBlockN];
  alignas(1024) float dq[Tr::kConsumers][Tr::kBlockN * Tr::kDqCols];  // staged, swizzled
  KRow krows[Tr::kBlockM];
  // The rows of the step in buffer s (written by the producer before it announces the
  // buffer, read by the consumers until they release it).
  QRow qrows[Tr::kStages][Tr::kBlockN];
  float qlse[Tr::kStages][Tr::kBlockN];
  float qdelta[Tr::kStages][Tr::kBlockN];
  int full[Tr::kStages];
  int tma[Tr::kStages];
  int dq_at[Tr::kStages][4];  // TMA coordinates of the chunk (head first), see q_chunk_at
  Group group;
  TileBox box;
  sm80::RowTable<sm80::kMaxQTokens> ntable;
  uint64_t kv_full;
  uint64_t q_full[Tr::kStages];   // producer → consumers
  uint64_t q_empty[Tr::kStages];  // consumers → producer (one arrival per consumer thread)
};

// Stores the thread's part of dS^T (`rdS`, the S^T accumulator's layout; `cS` its
// coordinates) into `tile`, K-major [rows][kCols], 128-byte swizzled (FusedBwdTraits::SmemDs),
// one 32-bit shared store per pair of neighbouring columns.
//
// Written out rather than through a CuTe tensor of the swizzled layout: that one swizzles the
// full address, so ptxas kept 16 generic 64-bit addresses per thread across the loop
// (spilled, and stored with ST.E). Here the rows are r0 + 8·k, so the swizzle (row % 8 XOR
// the 16-byte chunk) is one per-thread constant; the column pairs sit at c0 + 8·k (c0 < 8).
template <class T, int kCols, class Frag, class Coords>
__device__ __forceinline__ void store_ds_t(T* tile, const Frag& rdS, const Coords& cS) {
  static_assert(kCols * sizeof(T) == 128, "one swizzle atom per row");
  const int r0 = get<0>(cS(0)), c0 = get<1>(cS(0));
  const int sw = (r0 % 8) * 16;
  char* base = reinterpret_cast<char*>(tile) + r0 * 128 + c0 * (int)sizeof(T);
  CUTE_UNROLL
  for (int i = 0; i < size(rdS); i += 2) {
    const int dr = get<0>(cS(i)) - r0, dc = get<1>(cS(i)) - c0;
    T pair[2] = {rdS(i), rdS(i + 1)};
    *reinterpret_cast<uint32_t*>(base + dr * 128 + ((dc * (int)sizeof(T)) ^ sw)) =
        *reinterpret_cast<uint32_t*>(pair);
  }
}

template <class Tr>
__global__ void __launch_bounds__(Tr::kThreads, 1)
    fused_bwd_kernel(const Problem p, const typename Tr::T* __restrict__ q,
                     const typename Tr::T* __restrict__ k, const typename Tr::T* __restrict__ v,
                     const typename Tr::T* __restrict__ dout, const float* __restrict__ lse,
                     const float* __restrict__ delta, typename Tr::T* __restrict__ dk,
                     typename Tr::T* __restrict__ dv, float* __restrict__ dq_acc,
                     const int* __restrict__ kv_order, const __grid_constant__ QTensorMaps maps) {
  using T = typename Tr::T;
  using Dkdv = typename Tr::Dkdv;
  using Barrier = cutlass::arch::ClusterBarrier;
  constexpr int kD = Tr::kD;
  constexpr int kBlockM = Tr::kBlockM;
  constexpr int kBlockN = Tr::kBlockN;
  constexpr int kStages = Tr::kStages;
  constexpr int kDqCols = Tr::kDqCols;
  extern __shared__ __align__(1024) char smem_raw[];
  auto& sm = *reinterpret_cast<FusedBwdSmem<Tr>*>(smem_raw);
  const int tid = threadIdx.x;
  const int hkv = blockIdx.y;
  const int64_t b = blockIdx.z;

  int kt[kMaxRank];
  {
    Group g0;
    if (!g0.init(p, sm80::kv_tile_of_cta(kv_order), /*kv_side=*/true, kt)) return;
    if (tid == 0) {
      sm.group = g0;
      sm.box = TileBox::seeing(g0, p, kt);
      Barrier::init(&sm.kv_full, 2 * 128);
      for (int s = 0; s < kStages; ++s) {
        Barrier::init(&sm.q_full[s], 2 * 128);
        Barrier::init(&sm.q_empty[s], 128 * Tr::kConsumers);
      }
      cutlass::arch::fence_barrier_init();
      allow_next_grid();
    }
    __syncthreads();  // the last CTA-wide barrier: the roles never meet again
  }
  wait_prior_grid();  // the delta pass, which zeroes dq_acc (above: no global memory touched)
  const Group& G = sm.group;
  const TileBox& box = sm.box;
  const int group_heads = (int)(p.heads / p.kv_heads);
  const int64_t n_q_tok = sm80::q_tokens_of(p);
  const int64_t n_kv_tok = sm80::kv_tokens_of(p);
  const int64_t q_stride = p.heads * kD;
  const int64_t kv_stride = p.kv_heads * kD;
  const int64_t kv_off = (b * n_kv_tok * p.kv_heads + hkv) * kD;
  const int n_chunks = (Group::qprod(p) + kBlockN - 1) / kBlockN;
  const int steps = group_heads * box.total * n_chunks;

  Tensor sK = make_tensor(make_smem_ptr(sm.k), typename Dkdv::SmemM{});
  Tensor sV = make_tensor(make_smem_ptr(sm.v), typename Dkdv::SmemM{});
  auto sQ = [&](int s) { return make_tensor(make_smem_ptr(sm.q[s]), typename Dkdv::SmemN{}); };
  auto sdO = [&](int s) {
    return make_tensor(make_smem_ptr(sm.dout[s]), typename Dkdv::SmemN{});
  };

  if (tid < 128) {
    // ------------------------------------------------------------------------- producer
    cutlass::arch::warpgroup_reg_dealloc<Tr::kProducerRegs>();
    if (tid == 0 && maps.on) {
      prefetch_tma_descriptor(&maps.q);
      prefetch_tma_descriptor(&maps.dout);
      prefetch_tma_descriptor(&maps.dq);
    }
    load_kv_tile<kBlockM, kD, 128>(G, p, kt, sm.krows, sK, sV, k + kv_off, v + kv_off,
                                   kv_stride, tid);
    producer_commit(&sm.kv_full);
    sm.ntable.build(G, p, /*kv_side=*/false, tid, 128);
    const FullTiles fulls = FullTiles::seeing(G, p, kt, kBlockM);
    named_sync(kProducerBarrier, 128);  // the row table's offsets
    sm80::BoxStep st = sm80::BoxStep::first(box, hkv * group_heads);
    for (int j = 0; j < steps; ++j) {
      const int s = j % kStages;
      if (j >= kStages) Barrier::wait(&sm.q_empty[s], ((j / kStages) + 1) & 1);
      const int chunk = st.chunk;
      const bool full = fulls.contains(st.qt);
      const bool inside = G.tile_inside(p, st.qt, /*kv_side=*/false);
      const bool by_tma = maps.on && inside;
      // A full tile inside the frame needs only its tokens (the mask is never evaluated).
      const bool fast = full && inside;
      const int base = G.tile_base(p, st.qt, false);
      const int64_t stats = b * n_q_tok * p.heads + st.head;
      for (int r = tid; r < kBlockN; r += 128) {
        QRow row;
        if (fast) {
          row.tok = sm.ntable.token(base, chunk * kBlockN + r);
          sm.qrows[s][r].tok = row.tok;
        } else {
          row = inside ? sm.ntable.q_row(G, p, st.qt, base, chunk * kBlockN + r, !full)
                       : G.q_row(p, st.qt, chunk * kBlockN + r, /*window=*/!full);
          sm.qrows[s][r] = row;
        }
        sm80::stage_row_stats(row.tok, stats, p.heads, lse, delta, sm.qlse[s][r],
                              sm.qdelta[s][r]);
      }
      Tensor q_s = sQ(s);
      Tensor do_s = sdO(s);
      if (tid == 0) {
        sm.full[s] = full;
        sm.tma[s] = by_tma;
        int(&at)[4] = *reinterpret_cast<int(*)[4]>(sm.dq_at[s]);
        q_chunk_at(maps, G, p, st.qt, chunk, st.head, b, at);
        if (by_tma) {
          cutlass::arch::ClusterTransactionBarrier::expect_transaction(
              &sm.q_full[s], 2 * kBlockN * kD * (int)sizeof(T));
          tma_load_q_chunk<kD>(
              maps, &sm.q_full[s], at, [&](int c) { return &q_s(0, c); },
              [&](int c) { return &do_s(0, c); });
        }
      }
      if (!by_tma) {
        named_sync(kProducerBarrier, 128);  // gathers read tokens other threads wrote
        const QRow* rows = sm.qrows[s];
        auto tok = [&](int r) { return rows[r].tok; };
        const int64_t q_off = (b * n_q_tok * p.heads + st.head) * kD;
        sm80::gather_rows<kBlockN, kD, 128>([&](int r, int c) { return &q_s(r, c); },
                                            q + q_off, q_stride, tok, tid);
        sm80::gather_rows<kBlockN, kD, 128>([&](int r, int c) { return &do_s(r, c); },
                                            dout + q_off, q_stride, tok, tid);
      }
      producer_commit(&sm.q_full[s]);
      st = st.next(box, n_chunks);
    }
    sm80::cp_async_wait<0>();
    return;
  }

  // --------------------------------------------------------------------------- consumers
  cutlass::arch::warpgroup_reg_alloc<Tr::kConsumerRegs>();
  const int ctid = tid - 128;
  const int wg = ctid / 128;
  const bool dq_issuer = ctid % 128 == 0;  // issues its warpgroup's TMA reductions
  typename Dkdv::MmaS mma_s;
  typename Dkdv::MmaG mma_g;
  typename Tr::MmaDq mma_dq;
  auto thr_s = mma_s.get_thread_slice(ctid);
  auto thr_g = mma_g.get_thread_slice(ctid);
  auto thr_dq = mma_dq.get_thread_slice(ctid % 128);
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
  Tensor acc_dq = partition_fragment_C(mma_dq, Shape<Int<kBlockN>, Int<kDqCols>>{});
  Tensor cDQ = thr_dq.partition_C(make_identity_tensor(Shape<Int<kBlockN>, Int<kDqCols>>{}));
  Tensor cDQrc = make_tensor(cDQ.data(), gmma_rowcol(cDQ.layout()));
  Tensor tDQrB = thr_dq.partition_fragment_B(
      local_tile(make_tensor(make_smem_ptr(sm.k), typename Tr::SmemKt{}),
                 Shape<Int<kDqCols>, Int<kBlockM>>{}, make_coord(wg, 0)));
  float* dq_stage = sm.dq[wg];

  Barrier::wait(&sm.kv_full, 0);
  cutlass::arch::fence_view_async_shared();  // K and V were gathered (generic proxy)
  for (int it = 0; it < steps; ++it) {
    const int s = it % kStages;
    Barrier::wait(&sm.q_full[s], (it / kStages) & 1);
    cutlass::arch::fence_view_async_shared();  // gathered chunks
    // The step's flag and the lse of the thread's columns, read before the GEMMs are issued
    // so that their latency hides under S^T's.
    const bool full = sm.full[s];
    const QRow* qrows = sm.qrows[s];
    const float* qlse = sm.qlse[s];
    const float* qdelta = sm.qdelta[s];
    constexpr int kCols = decltype(size<1>(rs))::value;
    float lse2[kCols];
    load_lse2_t(lse2, cSrc, qlse);
    wgmma_issue(mma_s, tSrK, thr_s.partition_fragment_B(sQ(s)), acc_s, false);
    wgmma_issue(mma_s, tSrV, thr_s.partition_fragment_B(sdO(s)), acc_dp, false);

    warpgroup_wait<1>();  // S^T
    warpgroup_fence_operand(acc_s);
    probs_t(rs, cSrc, lse2, scale2, full, qrows, sm.krows);
    CUTE_UNROLL
    for (int i = 0; i < size(acc_s); ++i) rP(i) = static_cast<T>(acc_s(i));
    Tensor sdOt = make_tensor(make_smem_ptr(sm.dout[s]), typename Dkdv::SmemNt{});
    wgmma_issue(mma_g, tOrP, thr_g.partition_fragment_B(sdOt), acc_dv, true);

    warpgroup_wait<1>();  // dP^T (dV may still run)
    warpgroup_fence_operand(acc_dp);
    grad_scores_t(rdp, rs, cSrc, qdelta);
    CUTE_UNROLL
    for (int i = 0; i < size(acc_dp); ++i) rdS(i) = static_cast<T>(acc_dp(i));
    Tensor sQt = make_tensor(make_smem_ptr(sm.q[s]), typename Dkdv::SmemNt{});
    wgmma_issue(mma_g, tOrdS, thr_g.partition_fragment_B(sQt), acc_dk, true);

    // dS^T to shared memory, then dQ.
    store_ds_t<T, kBlockN>(sm.ds[it & 1], rdS, cS);
    cutlass::arch::fence_view_async_shared();
    // The previous step's reductions have read the staged dQ, which is rewritten below.
    if (dq_issuer) bulk_wait_all</*kRead=*/true>();
    named_sync(kDsBarrier, 128 * Tr::kConsumers);  // both halves of dS^T are in place
    Tensor tDQrA = thr_dq.partition_fragment_A(
        make_tensor(make_smem_ptr(sm.ds[it & 1]), typename Tr::SmemDsT{}));
    wgmma_issue(mma_dq, tDQrA, tDQrB, acc_dq, false);
    warpgroup_wait<0>();  // dV, dK and dQ
    warpgroup_fence_operand(acc_dq);

    // dQ into dq_acc: a chunk loaded by TMA goes back the same way (staged, one TMA
    // reduction per 32 columns); the rows of a gathered chunk are added from registers.
    Tensor rdq = make_tensor(acc_dq.data(), gmma_rowcol(acc_dq.layout()));
    if (sm.tma[s]) {
      // The staged layout is the dq tensor map's box, [64 rows, 32 floats] per 32 columns
      // with the 128-byte swizzle: 16-byte chunk c of row r at c ^ (r % 8). The thread's rows
      // r0 + 8·mi share one XOR; its columns are c0 + 8·ni' + {0, 1} (c0 < 8).
      const int r0 = get<0>(cDQrc(0, 0)), c0 = get<1>(cDQrc(0, 0));
      const int sw = r0 % 8;
      CUTE_UNROLL
      for (int mi = 0; mi < size<0>(rdq); ++mi) {
        CUTE_UNROLL
        for (int ni = 0; ni < size<1>(rdq); ni += 2) {
          const int dr = get<0>(cDQrc(mi, ni)) - r0, dc = get<1>(cDQrc(mi, ni)) - c0;
          const int at = (dc / 32) * kBlockN * 32 + (r0 + dr) * 32 +
                         (((dc % 32) / 4 + c0 / 4) ^ sw) * 4 + c0 % 4;
          *reinterpret_cast<float2*>(&dq_stage[at]) = make_float2(rdq(mi, ni), rdq(mi, ni + 1));
        }
      }
      cutlass::arch::fence_view_async_shared();  // generic writes before the TMA reads
      named_sync(kDqBarrier + wg, 128);
      if (dq_issuer) {
        const int(&at)[4] = *reinterpret_cast<const int(*)[4]>(sm.dq_at[s]);
        CUTE_UNROLL
        for (int c = 0; c < kDqCols; c += 32)
          tma_reduce_add(&maps.dq, &dq_stage[c * kBlockN], wg * kDqCols + c, at);
        bulk_commit();
      }
    } else {
      const int64_t head_off = (b * n_q_tok * p.heads + sm.dq_at[s][0]) * kD + wg * kDqCols;
      CUTE_UNROLL
      for (int mi = 0; mi < size<0>(rdq); ++mi) {
        const int tok = qrows[get<0>(cDQrc(mi, 0))].tok;
        if (tok < 0) continue;
        float* row = dq_acc + head_off + (int64_t)tok * q_stride;
        CUTE_UNROLL
        for (int ni = 0; ni < size<1>(rdq); ni += 2)
          red_add_v2(row + get<1>(cDQrc(mi, ni)), rdq(mi, ni), rdq(mi, ni + 1));
      }
    }
    // Buffer s, its rows and its coordinates go back to the producer. Every thread arrives:
    // with one arrival per warp after __syncwarp, racecheck reports the producer's next
    // writes of the rows as racing with the other lanes' reads.
    Barrier::arrive(&sm.q_empty[s]);
  }
  if (dq_issuer) bulk_wait_all</*kRead=*/false>();
  warpgroup_fence_operand(acc_dk);
  warpgroup_fence_operand(acc_dv);

  if (G.kv_pad) {
    // Rows outside the global axis were read as -1 (zero-filled, never seen, so their
    // accumulators are exactly 0); they are still part of dK/dV and are written as 0.
    named_sync(kDsBarrier, 128 * Tr::kConsumers);  // every consumer is done with krows
    int jj[kMaxRank];
    for (int r = ctid; r < kBlockM; r += 128 * Tr::kConsumers)
      sm.krows[r].tok = G.kv_store_token(p, kt, r, jj);
    named_sync(kDsBarrier, 128 * Tr::kConsumers);
  }
  store_dkdv<kBlockM, kD>(thr_g, acc_dk, acc_dv, sm.krows, dk + kv_off, dv + kv_off,
                          kv_stride, p.scale);
}

}  // namespace sm90
}  // namespace gna
