// sm90a GNA backward: the sm80 backward's decomposition (delta pre-kernel, a dK/dV kernel per
// KV tile, a dQ kernel per Q tile; no atomics, so bitwise deterministic) with Hopper
// warpgroup MMAs, for `deterministic` problems (the default backward is the five-GEMM
// backward_fused_ws.cuh). This file holds the dK/dV kernel (the dQ kernel is
// backward_ws.cuh's) and the scores' math both dK/dV kernels share. A CTA owns M rows (64
// per warpgroup: the KV tile's) whose gradients it accumulates in registers, and walks steps
// of N = 64-row chunks of the Q tiles that see it (the geometry's q_range box, times the
// query heads of its GQA group):
//   S^T = K·Q^T, dP^T = V·dO^T, P^T = exp2(S^T·c − lse), dS^T = P^T ∘ (dP^T − delta),
//   dV += P^T·dO, dK += dS^T·Q.
// S^T and dP^T run with both operands in shared memory; the gradient GEMMs take P^T or dS^T
// from registers (the accumulators converted in place) and the chunk seen MN-major.
//
// Per step `it`, after one CTA barrier: issue S(it) and dP(it); while they run, load the
// Q/dO chunk of step it+1 (two buffers; TMA boxes for a chunk inside the frame, else
// cp.async gathers); wait for S, compute P and issue dV's GEMM; wait for dP (dV's GEMM may
// still run), compute dS and issue dK's; build the row table of step it+2 while they run.
// They retire at the top of step it+1, before the barrier that frees their buffers.
#pragma once

#include "../sm80/backward.cuh"  // store_rows
#include "../sm80/launch.cuh"     // kKvTokens
#include "pipeline.cuh"
#include "tensor_maps.h"
#include "wgmma.cuh"

namespace gna {
namespace sm90 {

using namespace cute;

template <class T_, int kD_, int kBlockM_, int kBlockN_>
struct DkdvTraits {
  using T = T_;
  static constexpr int kD = kD_;
  static constexpr int kBlockM = kBlockM_;  // rows whose gradient the CTA accumulates
  static constexpr int kBlockN = kBlockN_;  // rows of the other side per step
  static constexpr int kWarpGroups = kBlockM / 64;
  static constexpr int kThreads = 128 * kWarpGroups;
  static constexpr int kBuffers = 2;   // N-side buffers: step it computed, it+1 loading
  static constexpr int kRowSlots = 3;  // row tables: it read, it+1 gathered, it+2 built
  using MmaS = MmaSS<T, kWarpGroups, kBlockN, kD>;  // [M, N] = A[M, D] · B[N, D]^T (S, dP)
  using MmaG = MmaRS<T, kWarpGroups, kD, kBlockN>;  // [M, D] += X[M, N] · Y[N, D] (gradients)
  // K-major [rows, D] tiles; the N-side tile is also seen as [D, rows] (MN-major), operand B
  // of the gradient GEMMs.
  using SmemM = SmemKMajor<T, kBlockM, kD>;
  using SmemN = SmemKMajor<T, kBlockN, kD>;
  using SmemNt = decltype(composition(
      SmemN{}, make_layout(Shape<Int<kD>, Int<kBlockN>>{}, GenRowMajor{})));
};

// Shared memory of the dK/dV kernel: the M side's two tiles (K and V), loaded once; the N
// side's two tiles per buffer (Q and dO); the row tables.
template <class Tr>
struct DkdvSmem {
  using T = typename Tr::T;
  // 128-byte swizzle atoms repeat every 1024 bytes; descriptors assume that alignment.
  alignas(1024) T m0[Tr::kBlockM * Tr::kD];
  alignas(1024) T m1[Tr::kBlockM * Tr::kD];
  alignas(1024) T n0[Tr::kBuffers][Tr::kBlockN * Tr::kD];
  alignas(1024) T n1[Tr::kBuffers][Tr::kBlockN * Tr::kD];
  KRow mrows[Tr::kBlockM];
  QRow nrows[Tr::kRowSlots][Tr::kBlockN];
  // lse (+inf on padding rows) and delta of the N-side rows, loaded with cp.async so that
  // building a row table never waits on global memory.
  float nlse[Tr::kRowSlots][Tr::kBlockN];
  float ndelta[Tr::kRowSlots][Tr::kBlockN];
  // Whether the step needs no element mask: words, not bytes (with byte flags racecheck
  // reported hazards between one slot's write and a neighbour's read).
  int full[Tr::kRowSlots];
  int tma[Tr::kRowSlots];   // the step's Q/dO chunk is loaded as TMA boxes
  sm80::BoxStep step[Tr::kRowSlots];  // step j's in slot j % kRowSlots
  uint64_t n_bar[Tr::kBuffers];  // the TMA bytes of a buffer (one phase per step)
  Group group;  // the CTA's geometry and box, kept out of registers (D = 128 spills)
  TileBox box;
  FullTiles fulls;
  sm80::RowTable<sm80::kMaxQTokens> ntable;  // rows of an N-side tile
};

// TMA coordinates of chunk `chunk` (rows chunk·N ..) of Q tile `qt` of query head `head`
// in the Q-side tensor maps (QTensorMaps), after the column: {head, x2, x1, b·L0 + x0}.
__device__ __forceinline__ void q_chunk_at(QTensorMaps const& maps, Group const& G,
                                           Problem const& p, const int qt[kMaxRank], int chunk,
                                           int head, int64_t b, int (&at)[4]) {
  q_box_at(G, p, qt, maps.axis, chunk * maps.step, head, b, at);
}

// Loads the Q and dO chunk at TMA coordinates `at` (q_chunk_at) as TMA boxes, completing on
// `bar`; `q_dst(c)` and `do_dst(c)` are the shared-memory addresses of column c of the
// chunk's first row. By one thread.
template <int kD, class QDst, class DoDst>
__device__ __forceinline__ void tma_load_q_chunk(QTensorMaps const& maps, uint64_t* bar,
                                                 const int (&at)[4], QDst const& q_dst,
                                                 DoDst const& do_dst) {
  for (int c = 0; c < kD; c += 64) {
    SM90_TMA_LOAD_5D::copy(&maps.q, bar, kEvictNormal, q_dst(c), c, at[0], at[1], at[2], at[3]);
    SM90_TMA_LOAD_5D::copy(&maps.dout, bar, kEvictNormal, do_dst(c), c, at[0], at[1], at[2],
                           at[3]);
  }
}

// The KV tile's rows (`krows`) and its K and V (cp.async gathers into `sK`, `sV`; the
// caller commits), by `kThreads` threads.
template <int kRows, int kD, int kThreads, class T, class SK>
__device__ __forceinline__ void load_kv_tile(Group const& G, Problem const& p,
                                             const int kt[kMaxRank], KRow* krows, SK& sK,
                                             SK& sV, const T* k, const T* v, int64_t kv_stride,
                                             int tid) {
  int jj[kMaxRank];
  for (int r = tid; r < kRows; r += kThreads) krows[r] = G.k_row(p, kt, r);
  auto k_tok = [&](int r) { return G.kv_token(p, kt, r, jj); };
  sm80::gather_rows<kRows, kD, kThreads>([&](int r, int c) { return &sK(r, c); }, k, kv_stride,
                                         k_tok, tid);
  sm80::gather_rows<kRows, kD, kThreads>([&](int r, int c) { return &sV(r, c); }, v, kv_stride,
                                         k_tok, tid);
}

// dK (times `scale`) and dV of the thread's accumulators (gradient MMA `thr_g`, [rows, D])
// to the tokens in `krows` (-1: not stored).
template <int kRows, int kD, class ThrG, class Acc, class T>
__device__ __forceinline__ void store_dkdv(ThrG const& thr_g, Acc& acc_dk, Acc& acc_dv,
                                           const KRow* krows, T* dk, T* dv, int64_t kv_stride,
                                           float scale) {
  Tensor cO = thr_g.partition_C(make_identity_tensor(Shape<Int<kRows>, Int<kD>>{}));
  Tensor cOrc = make_tensor(cO.data(), gmma_rowcol(cO.layout()));
  auto out_tok = [&](int r) { return krows[r].tok; };
  sm80::store_rows(make_tensor(acc_dk.data(), gmma_rowcol(acc_dk.layout())), cOrc, dk,
                   kv_stride, scale, out_tok);
  sm80::store_rows(make_tensor(acc_dv.data(), gmma_rowcol(acc_dv.layout())), cOrc, dv,
                   kv_stride, 1.f, out_tok);
}

// The scores' math of the dK/dV kernels (this file's and backward_fused_ws.cuh's), on a
// thread's S^T and dP^T accumulators viewed as (rows, columns) = (KV rows, the step's query
// rows); `cSrc` holds their coordinates.

// lse·log2e of the thread's columns (`qlse`: the step's query rows).
template <int kCols, class CS>
__device__ __forceinline__ void load_lse2_t(float (&lse2)[kCols], CS const& cSrc,
                                            const float* qlse) {
  CUTE_UNROLL
  for (int ni = 0; ni < kCols; ++ni) lse2[ni] = qlse[get<1>(cSrc(0, ni))] * sm80::kLog2e;
}

// P^T = exp2(S^T·scale·log2e − lse·log2e) in place; where the step is not `full`, zero
// where the query row (`qrows`) does not see the KV row (`krows`, the CTA's).
template <int kCols, class RS, class CS>
__device__ __forceinline__ void probs_t(RS& rs, CS const& cSrc, const float (&lse2)[kCols],
                                        float scale2, bool full, const QRow* qrows,
                                        const KRow* krows) {
  constexpr int kRows = decltype(size<0>(rs))::value;
  if (full) {
    CUTE_UNROLL
    for (int mi = 0; mi < kRows; ++mi) {
      CUTE_UNROLL
      for (int ni = 0; ni < kCols; ++ni)
        rs(mi, ni) = sm80::fast_exp2(rs(mi, ni) * scale2 - lse2[ni]);
    }
    return;
  }
  // The thread's KRows are loaded once, each column's QRow once.
  KRow kr[kRows];
  CUTE_UNROLL
  for (int mi = 0; mi < kRows; ++mi) kr[mi] = krows[get<0>(cSrc(mi, 0))];
  CUTE_UNROLL
  for (int ni = 0; ni < kCols; ++ni) {
    const QRow qr = qrows[get<1>(cSrc(0, ni))];
    CUTE_UNROLL
    for (int mi = 0; mi < kRows; ++mi) {
      const float pr = sm80::fast_exp2(rs(mi, ni) * scale2 - lse2[ni]);
      rs(mi, ni) = sm80::visible(qr, kr[mi]) ? pr : 0.f;
    }
  }
}

// dS^T = P^T ∘ (dP^T − delta) in place (`qdelta`: the step's query rows).
template <class RD, class RS, class CS>
__device__ __forceinline__ void grad_scores_t(RD& rdp, RS const& rs, CS const& cSrc,
                                              const float* qdelta) {
  CUTE_UNROLL
  for (int mi = 0; mi < size<0>(rdp); ++mi) {
    CUTE_UNROLL
    for (int ni = 0; ni < size<1>(rdp); ++ni)
      rdp(mi, ni) = rs(mi, ni) * (rdp(mi, ni) - qdelta[get<1>(cSrc(mi, ni))]);
  }
}

template <class Tr>
__global__ void __launch_bounds__(Tr::kThreads, Tr::kWarpGroups == 1 ? 2 : 1)
    dkdv_kernel(const Problem p, const typename Tr::T* __restrict__ q,
                const typename Tr::T* __restrict__ k, const typename Tr::T* __restrict__ v,
                const typename Tr::T* __restrict__ dout, const float* __restrict__ lse,
                const float* __restrict__ delta, typename Tr::T* __restrict__ dk,
                typename Tr::T* __restrict__ dv, const int* __restrict__ kv_order,
                const __grid_constant__ QTensorMaps maps) {
  using T = typename Tr::T;
  using Barrier = cutlass::arch::ClusterBarrier;
  constexpr int kD = Tr::kD;
  constexpr int kBlockM = Tr::kBlockM;
  constexpr int kBlockN = Tr::kBlockN;
  constexpr int kThreads = Tr::kThreads;
  constexpr int kSlots = Tr::kRowSlots;
  static_assert(kBlockM == sm80::kKvTokens, "one KV tile per CTA");
  using Smem = DkdvSmem<Tr>;
  extern __shared__ __align__(1024) char smem_raw[];
  auto& sm = *reinterpret_cast<Smem*>(smem_raw);
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
      sm.fulls = FullTiles::seeing(g0, p, kt, kBlockM);
      sm.step[0] = sm80::BoxStep::first(sm.box, hkv * (int)(p.heads / p.kv_heads));
      for (int s = 0; s < Tr::kBuffers; ++s) Barrier::init(&sm.n_bar[s], 1);
      cutlass::arch::fence_barrier_init();
      if (maps.on) {
        prefetch_tma_descriptor(&maps.q);
        prefetch_tma_descriptor(&maps.dout);
      }
      allow_next_grid();
    }
    __syncthreads();
  }
  wait_prior_grid();  // the delta pass (above: no global memory touched)
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

  Tensor sK = make_tensor(make_smem_ptr(sm.m0), typename Tr::SmemM{});
  Tensor sV = make_tensor(make_smem_ptr(sm.m1), typename Tr::SmemM{});
  auto sQ = [&](int s) { return make_tensor(make_smem_ptr(sm.n0[s]), typename Tr::SmemN{}); };
  auto sdO = [&](int s) { return make_tensor(make_smem_ptr(sm.n1[s]), typename Tr::SmemN{}); };
  auto sQt = [&](int s) { return make_tensor(make_smem_ptr(sm.n0[s]), typename Tr::SmemNt{}); };
  auto sdOt = [&](int s) {
    return make_tensor(make_smem_ptr(sm.n1[s]), typename Tr::SmemNt{});
  };

  // Builds the row table of step j if it exists (and thread 0 the walk's step j+1: fill_qrows
  // runs for j = 0, 1, 2, ... in turn); always commits a cp.async group (its lse and delta),
  // so that group counts stay in step with the loop's waits.
  auto fill_qrows = [&](int j) {
    if (j < steps) {
      const int slot = j % kSlots;
      const sm80::BoxStep st = sm.step[slot];
      // Slot (j+1) % kSlots held step j-2, which stage() and fill_qrows() are done with.
      if (tid == 0) sm.step[(j + 1) % kSlots] = st.next(box, n_chunks);
      const int chunk = st.chunk;
      const int* qt = st.qt;
      const bool full = sm.fulls.contains(qt);
      const bool inside = G.tile_inside(p, qt, /*kv_side=*/false);
      // A full tile inside the frame needs only its tokens (the mask is never evaluated).
      const bool fast = full && inside;
      const int base = G.tile_base(p, qt, false);
      const int64_t stats = b * n_q_tok * p.heads + st.head;
      for (int r = tid; r < kBlockN; r += kThreads) {
        QRow row;
        if (fast) {
          row.tok = sm.ntable.token(base, chunk * kBlockN + r);
          sm.nrows[slot][r].tok = row.tok;
        } else {
          row = inside ? sm.ntable.q_row(G, p, qt, base, chunk * kBlockN + r, !full)
                       : G.q_row(p, qt, chunk * kBlockN + r, /*window=*/!full);
          sm.nrows[slot][r] = row;
        }
        sm80::stage_row_stats(row.tok, stats, p.heads, lse, delta, sm.nlse[slot][r],
                              sm.ndelta[slot][r]);
      }
      if (tid == 0) {
        sm.full[slot] = full;
        sm.tma[slot] = maps.on && inside;
      }
    }
    sm80::cp_async_commit();
  };
  // Loads Q/dO of step j if it exists: TMA boxes for a chunk inside the frame (one thread),
  // else row gathers; always commits a cp.async group, and completes one phase of the
  // buffer's barrier (at once for gathers).
  auto stage = [&](int j) {
    if (j < steps) {
      const int buf = j % Tr::kBuffers;
      Tensor q_s = sQ(buf);
      Tensor do_s = sdO(buf);
      const sm80::BoxStep& st = sm.step[j % kSlots];
      if (sm.tma[j % kSlots]) {
        if (tid == 0) {
          cutlass::arch::ClusterTransactionBarrier::arrive_and_expect_tx(
              &sm.n_bar[buf], 2 * kBlockN * kD * (int)sizeof(T));
          int at[4];
          q_chunk_at(maps, G, p, st.qt, st.chunk, st.head, b, at);
          tma_load_q_chunk<kD>(
              maps, &sm.n_bar[buf], at, [&](int c) { return &q_s(0, c); },
              [&](int c) { return &do_s(0, c); });
        }
      } else {
        const QRow* rows = sm.nrows[j % kSlots];
        auto tok = [&](int r) { return rows[r].tok; };
        const int64_t q_off = (b * n_q_tok * p.heads + st.head) * kD;
        sm80::gather_rows<kBlockN, kD, kThreads>([&](int r, int c) { return &q_s(r, c); },
                                                 q + q_off, q_stride, tok, tid);
        sm80::gather_rows<kBlockN, kD, kThreads>([&](int r, int c) { return &do_s(r, c); },
                                                 dout + q_off, q_stride, tok, tid);
        if (tid == 0) Barrier::arrive(&sm.n_bar[buf]);
      }
    }
    sm80::cp_async_commit();
  };

  load_kv_tile<kBlockM, kD, kThreads>(G, p, kt, sm.mrows, sK, sV, k + kv_off, v + kv_off,
                                      kv_stride, tid);
  sm.ntable.build(G, p, /*kv_side=*/false, tid, kThreads);
  __syncthreads();
  // cp.async groups, oldest first: rows(0) (with K and V), Q/dO(0), rows(1); then per step
  // it: Q/dO(it+1), rows(it+2). The top of step it waits for all but the newest.
  fill_qrows(0);
  __syncthreads();  // the tokens of step 0
  stage(0);
  fill_qrows(1);

  typename Tr::MmaS mma_s;
  typename Tr::MmaG mma_g;
  auto thr_s = mma_s.get_thread_slice(tid);
  auto thr_g = mma_g.get_thread_slice(tid);
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

  for (int it = 0; it < steps; ++it) {
    // dV/dK(it-1) are retired (their buffer and registers are free); Q/dO(it) and the lse and
    // delta of step it have landed (rows(it+1) may still load).
    warpgroup_wait<0>();
    sm80::cp_async_wait<1>();
    cutlass::arch::fence_view_async_shared();
    __syncthreads();
    const int buf = it % Tr::kBuffers;
    Barrier::wait(&sm.n_bar[buf], (it / Tr::kBuffers) & 1);
    wgmma_issue(mma_s, tSrK, thr_s.partition_fragment_B(sQ(buf)), acc_s, false);
    wgmma_issue(mma_s, tSrV, thr_s.partition_fragment_B(sdO(buf)), acc_dp, false);
    stage(it + 1);
    const bool full = sm.full[it % kSlots];
    const QRow* qrows = sm.nrows[it % kSlots];
    const float* qlse = sm.nlse[it % kSlots];
    const float* qdelta = sm.ndelta[it % kSlots];
    constexpr int kCols = decltype(size<1>(rs))::value;
    float lse2[kCols];
    load_lse2_t(lse2, cSrc, qlse);

    warpgroup_wait<1>();  // S^T
    warpgroup_fence_operand(acc_s);
    probs_t(rs, cSrc, lse2, scale2, full, qrows, sm.mrows);
    CUTE_UNROLL
    for (int i = 0; i < size(acc_s); ++i) rP(i) = static_cast<T>(acc_s(i));
    wgmma_issue(mma_g, tOrP, thr_g.partition_fragment_B(sdOt(buf)), acc_dv, true);

    warpgroup_wait<1>();  // dP^T (dV may still run)
    warpgroup_fence_operand(acc_dp);
    grad_scores_t(rdp, rs, cSrc, qdelta);
    CUTE_UNROLL
    for (int i = 0; i < size(acc_dp); ++i) rdS(i) = static_cast<T>(acc_dp(i));
    wgmma_issue(mma_g, tOrdS, thr_g.partition_fragment_B(sQt(buf)), acc_dk, true);
    // Here rather than under S^T/dP^T: their accumulators would stay live next to the
    // window arithmetic and spill (D = 128).
    fill_qrows(it + 2);
  }
  warpgroup_wait<0>();
  warpgroup_fence_operand(acc_dk);
  warpgroup_fence_operand(acc_dv);

  sm80::cp_async_wait<0>();  // a KV tile no query sees still waits for its loads
  __syncthreads();
  if (G.kv_pad) {
    // Rows outside the global axis were read as -1 (zero-filled, never seen, so their
    // accumulators are exactly 0); they are still part of dK/dV and are written as 0.
    int jj[kMaxRank];
    for (int r = tid; r < kBlockM; r += kThreads)
      sm.mrows[r].tok = G.kv_store_token(p, kt, r, jj);
    __syncthreads();
  }
  store_dkdv<kBlockM, kD>(thr_g, acc_dk, acc_dv, sm.mrows, dk + kv_off, dv + kv_off,
                          kv_stride, p.scale);
}

}  // namespace sm90
}  // namespace gna
