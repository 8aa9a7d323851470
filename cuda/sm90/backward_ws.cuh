// sm90a GNA dQ kernel, warp-specialised like forward_ws.cuh: one CTA per Q tile (head,
// batch, dilation group), one KV tile of its box per step. A producer warpgroup loads Q, dO
// and the Q rows (with lse and delta) once, then K, V and their rows through the ring of
// kv_ring.cuh (TMA boxes for tiles inside the frame). The consumer warpgroups (one per 64 Q
// rows: two for 128-token tiles, one CTA per SM; one for smaller tiles, two CTAs per SM)
// take every step: S = Q·K^T, dP = dO·V^T, P = exp2(S·c − lse), dS = P ∘ (dP − delta),
// dQ += dS·K, with S and dP of step it issued while dQ of step it-1 still runs.
//
// (A warp-specialised dK/dV kernel built the same way, one CTA per KV tile with two
// consumers on alternate Q steps, measured 0.8x of backward.cuh's with TMA: see NOTES.md.)
#pragma once

#include <cutlass/arch/reg_reconfig.h>

#include "backward.cuh"
#include "kv_ring.cuh"

namespace gna {
namespace sm90 {

using namespace cute;

// QRow with the backward's per-row values: lse·log2(e) (+inf on padding rows, so that P = 0
// there) and delta = rowsum(dO·O).
__device__ __forceinline__ QRow q_row_with_stats(Group const& G, Problem const& p,
                                                 const int qt[kMaxRank], int r, bool window,
                                                 const float* lb, const float* db) {
  QRow row = G.q_row(p, qt, r, window);
  row.lse2 = row.tok >= 0 ? lb[(int64_t)row.tok * p.heads] * sm80::kLog2e : INFINITY;
  row.delta = row.tok >= 0 ? db[(int64_t)row.tok * p.heads] : 0.f;
  return row;
}

// The dQ kernel's P = exp2(S·scale2 − lse2) on the thread's part of S (rows: Q rows, whose
// lse2 the thread holds; columns: KV rows), 0 where the mask hides the key unless `full`.
template <int kRows, class RS, class CS, class Mask>
__device__ __forceinline__ void dq_probs(RS& rs, CS const& cSrc, const float (&lse2_of)[kRows],
                                         float scale2, bool full, Mask const& mask) {
  if (full) {
    CUTE_UNROLL
    for (int mi = 0; mi < kRows; ++mi) {
      CUTE_UNROLL
      for (int ni = 0; ni < size<1>(rs); ++ni)
        rs(mi, ni) = sm80::fast_exp2(rs(mi, ni) * scale2 - lse2_of[mi]);
    }
  } else {
    mask.template for_each<kRows, decltype(size<1>(rs))::value>(
        cSrc, [&](int mi, int ni, bool vis) {
          const float pr = sm80::fast_exp2(rs(mi, ni) * scale2 - lse2_of[mi]);
          rs(mi, ni) = vis ? pr : 0.f;
        });
  }
}

// dS = P ∘ (dP − delta), in place of dP (delta per Q row).
template <int kRows, class RD, class RS>
__device__ __forceinline__ void dq_grad_scores(RD& rdp, RS const& rs,
                                               const float (&delta_of)[kRows]) {
  CUTE_UNROLL
  for (int mi = 0; mi < kRows; ++mi) {
    CUTE_UNROLL
    for (int ni = 0; ni < size<1>(rdp); ++ni)
      rdp(mi, ni) = rs(mi, ni) * (rdp(mi, ni) - delta_of[mi]);
  }
}

template <class T_, int kD_, int kConsumers_, int kStages_>
struct WsDqTraits {
  using T = T_;
  static constexpr int kD = kD_;
  static constexpr int kConsumers = kConsumers_;
  static_assert(kConsumers == 1 || kConsumers == 2, "one or two consumer warpgroups");
  static constexpr int kBlockM = 64 * kConsumers;  // the Q tile's rows
  static constexpr int kBlockN = 64;               // one KV tile per step
  static constexpr int kStages = kStages_;
  static constexpr int kThreads = 128 * (1 + kConsumers);
  static constexpr int kCtasPerSm = 3 - kConsumers;
  // Two consumers need more than the 168 of an even split (with 168, ptxas serialises the
  // wgmmas); with fewer than 72, the producer spills its row arithmetic (ptxas -v).
  static constexpr int kProducerRegs = 72;
  static constexpr int kConsumerRegs = kConsumers == 2 ? 216 : 184;
  static_assert(kCtasPerSm * 128 * (kProducerRegs + kConsumers * kConsumerRegs) <= 65536,
                "registers");
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
__global__ void __launch_bounds__(Tr::kThreads, Tr::kCtasPerSm)
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
    allow_next_grid();
  }
  __syncthreads();  // the last CTA-wide barrier
  wait_prior_grid();  // the dK/dV kernel (above: no global memory touched)

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
    ring.setup(p, maps, tid);
    ring.produce(p, G, box, fulls, maps, kb, vb, hkv, b, tid, /*base=*/0, steps, [] {});
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
    dq_probs(rs, cSrc, lse2_of, scale2, ring.is_full(it), ring.mask(it, sm.qrows));
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
