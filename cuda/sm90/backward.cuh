// sm90a GNA backward: the sm80 backward's decomposition (delta pre-kernel, a dK/dV kernel per
// KV tile, a dQ kernel per Q tile; no atomics, so bitwise deterministic) with Hopper
// warpgroup MMAs. This file holds the dK/dV kernel (the dQ kernel is backward_ws.cuh's). A
// CTA owns M rows (64 per warpgroup: the KV tile's) whose gradients it accumulates in
// registers, and walks steps of N = 64-row chunks of the Q tiles that see it (the geometry's
// q_range box, times the query heads of its GQA group):
//   S^T = K·Q^T, dP^T = V·dO^T, P^T = exp2(S^T·c − lse), dS^T = P^T ∘ (dP^T − delta),
//   dV += P^T·dO, dK += dS^T·Q.
// S^T and dP^T run with both operands in shared memory; the gradient GEMMs take P^T or dS^T
// from registers (the accumulators converted in place) and the chunk seen MN-major.
//
// Unless the problem asks for determinism, the kernel also computes each step's dQ
// contribution (dQ += dS·K: a fifth GEMM instead of the dQ kernel's three) and adds it into
// a float32 accumulator with TMA reductions (kFusedDq).
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
  // The fused dQ of the dK/dV kernel (kFusedDq): per step dQ = dS·K, [N, D] = [N, M]·[M, D].
  // dS^T is stored as a K-major [M, N] tile and read as [N, M] (MN-major A), K as [D, M]
  // (MN-major B); warpgroup w computes dQ's columns w·kDqCols.. over all M rows, so that
  // each holds a [64, kDqCols] accumulator next to its dK and dV.
  static constexpr int kDqCols = kD / kWarpGroups;
  using MmaDq = decltype(make_tiled_mma(
      GMMA::ss_op_selector<T, T, float, Shape<Int<kBlockN>, Int<kDqCols>, Int<kBlockM>>,
                           GMMA::Major::MN, GMMA::Major::MN>()));
  using SmemDs = SmemKMajor<T, kBlockM, kBlockN>;
  using SmemDsT = decltype(composition(
      SmemDs{}, make_layout(Shape<Int<kBlockN>, Int<kBlockM>>{}, GenRowMajor{})));
  using SmemMt = decltype(composition(
      SmemM{}, make_layout(Shape<Int<kD>, Int<kBlockM>>{}, GenRowMajor{})));
  static_assert(kDqCols % 32 == 0, "dQ is reduced in boxes of 32 columns");
};

// Shared memory of the dK/dV kernel: the M side's two tiles (K and V), loaded once; the N
// side's two tiles per buffer (Q and dO); the row tables. With the fused dQ also the step's
// dS^T (written from the registers that computed it, read back as the MN-major A operand of
// dQ = dS·K), each warpgroup's dQ columns on their way to the TMA reductions (boxes of 64
// rows by 32 floats, 128-byte swizzled as the dq tensor map expects), and the TMA
// coordinates of each row slot's chunk.
template <class Tr, bool kFusedDq>
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
  alignas(1024) T ds[kFusedDq ? Tr::kBlockM * Tr::kBlockN : 1];
  alignas(1024) float dq[kFusedDq ? Tr::kWarpGroups * Tr::kBlockN * Tr::kDqCols : 1];
  int dq_at[Tr::kRowSlots][4];
};

// Offset of element (r, c) in a warpgroup's staged dQ: boxes of 32 columns, each [rows, 32]
// with its 16-byte chunks swizzled by r % 8 (which also spreads a warp's 8 rows over all
// banks).
__device__ __forceinline__ int dq_stage_offset(int r, int c, int rows) {
  return (c / 32) * rows * 32 + r * 32 + ((((c % 32) / 4) ^ (r % 8)) * 4) + c % 4;
}

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

// TMA coordinates of chunk `chunk` (rows chunk·N ..) of Q tile `qt` of query head `head`
// in the Q-side tensor maps (QTensorMaps), after the column: {head, x2, x1, b·L0 + x0}.
__device__ __forceinline__ void q_chunk_at(QTensorMaps const& maps, Group const& G,
                                           Problem const& p, const int qt[kMaxRank], int chunk,
                                           int head, int64_t b, int (&at)[4]) {
  int x[kMaxRank];
  for (int a = 0; a < kMaxRank; ++a) {
    const int chunk_at = a == maps.axis ? chunk * maps.step : 0;
    x[a] = G.g[a] + (int)p.axes[a].dilation * (qt[a] * (int)p.q_tile[a] + chunk_at);
  }
  at[0] = head;
  at[1] = x[2];
  at[2] = x[1];
  at[3] = (int)b * (int)p.axes[0].q_length + x[0];
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

// kFusedDq: also dQ·(1/scale) += dS·K per step into `dq_acc` (float32, Q's layout, zeroed
// by the caller) by TMA reductions; two warpgroups (Tr::kBlockM = 128: the host doubles the
// KV tile) so that each step's reductions serve 128 KV rows. Else `dq_acc` is unused and the
// dQ kernel runs after this one.
#ifndef GNA_X_DQ
#define GNA_X_DQ 0
#endif
template <class Tr, bool kFusedDq>
__global__ void __launch_bounds__(Tr::kThreads, Tr::kWarpGroups == 1 ? 2 : 1)
    dkdv_kernel(const Problem p, const typename Tr::T* __restrict__ q,
                const typename Tr::T* __restrict__ k, const typename Tr::T* __restrict__ v,
                const typename Tr::T* __restrict__ dout, const float* __restrict__ lse,
                const float* __restrict__ delta, typename Tr::T* __restrict__ dk,
                typename Tr::T* __restrict__ dv, float* __restrict__ dq_acc,
                const __grid_constant__ QTensorMaps maps) {
  using T = typename Tr::T;
  using Barrier = cutlass::arch::ClusterBarrier;
  constexpr int kD = Tr::kD;
  constexpr int kBlockM = Tr::kBlockM;
  constexpr int kBlockN = Tr::kBlockN;
  constexpr int kThreads = Tr::kThreads;
  constexpr int kSlots = Tr::kRowSlots;
  static_assert(kFusedDq ? Tr::kWarpGroups == 2 : kBlockM == sm80::kKvTokens,
                "one KV tile per CTA; the fused dQ splits D over 2 warpgroups");
  using Smem = DkdvSmem<Tr, kFusedDq>;
  extern __shared__ __align__(1024) char smem_raw[];
  auto& sm = *reinterpret_cast<Smem*>(smem_raw);
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
      sm.step[0] = sm80::BoxStep::first(sm.box, hkv * (int)(p.heads / p.kv_heads));
      for (int s = 0; s < Tr::kBuffers; ++s) Barrier::init(&sm.n_bar[s], 1);
      cutlass::arch::fence_barrier_init();
      if (maps.on) {
        prefetch_tma_descriptor(&maps.q);
        prefetch_tma_descriptor(&maps.dout);
      }
    }
    __syncthreads();
  }
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
          const int off = sm.ntable.offset[chunk * kBlockN + r];
          row.tok = off < 0 ? -1 : base + off;
          sm.nrows[slot][r].tok = row.tok;
        } else {
          row = G.q_row(p, qt, chunk * kBlockN + r, /*window=*/!full);
          sm.nrows[slot][r] = row;
        }
        sm80::stage_row_stats(row.tok, stats, p.heads, lse, delta, sm.nlse[slot][r],
                              sm.ndelta[slot][r]);
      }
      if (tid == 0) {
        sm.full[slot] = full;
        sm.tma[slot] = maps.on && inside;
        if (kFusedDq) sm.dq_at[slot][0] = st.head;  // the rest by stage() for TMA chunks
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
          int* at = sm.dq_at[j % kSlots];  // kept for the step's dQ reduction
          q_chunk_at(maps, G, p, st.qt, st.chunk, st.head, b,
                     *reinterpret_cast<int(*)[4]>(at));
          tma_load_q_chunk<kD>(
              maps, &sm.n_bar[buf], *reinterpret_cast<int(*)[4]>(at),
              [&](int c) { return &q_s(0, c); }, [&](int c) { return &do_s(0, c); });
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

  {
    int jj[kMaxRank];
    for (int r = tid; r < kBlockM; r += kThreads) sm.mrows[r] = G.k_row(p, kt, r);
    auto k_tok = [&](int r) { return G.kv_token(p, kt, r, jj); };
    sm80::gather_rows<kBlockM, kD, kThreads>([&](int r, int c) { return &sK(r, c); },
                                             k + kv_off, kv_stride, k_tok, tid);
    sm80::gather_rows<kBlockM, kD, kThreads>([&](int r, int c) { return &sV(r, c); },
                                             v + kv_off, kv_stride, k_tok, tid);
  }
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
  // The fused dQ: warpgroup `wg` computes dQ's columns wg·kDqCols.. of the step's rows;
  // dQ = dS·K with A = dS [N, M] and B = K seen as [D, M] (both MN-major).
  constexpr int kDqCols = Tr::kDqCols;
  const int wg = tid / 128;
  const int ctid = tid % 128;
  const bool dq_issuer = kFusedDq && ctid == 0;  // issues the warpgroup's TMA reductions
  typename Tr::MmaDq mma_dq;
  auto thr_dq = mma_dq.get_thread_slice(ctid);
  Tensor sdsT = make_tensor(make_smem_ptr(sm.ds), typename Tr::SmemDs{});
  Tensor tDQrA = thr_dq.partition_fragment_A(
      make_tensor(make_smem_ptr(sm.ds), typename Tr::SmemDsT{}));
  Tensor tDQrB = thr_dq.partition_fragment_B(
      local_tile(make_tensor(make_smem_ptr(sm.m0), typename Tr::SmemMt{}),
                 Shape<Int<kDqCols>, Int<kBlockM>>{}, make_coord(wg, 0)));
  Tensor acc_dq = partition_fragment_C(mma_dq, Shape<Int<kBlockN>, Int<kDqCols>>{});
  Tensor cDQ = thr_dq.partition_C(make_identity_tensor(Shape<Int<kBlockN>, Int<kDqCols>>{}));
  Tensor cDQrc = make_tensor(cDQ.data(), gmma_rowcol(cDQ.layout()));
  float* dq_stage = &sm.dq[wg * kBlockN * kDqCols];
  // dQ(j) (acc_dq, retired) into dq_acc, this warpgroup's columns: a chunk loaded by TMA
  // goes back the same way, staged here and sent by send_dq(j) after the next CTA barrier
  // (one TMA reduction per 32 columns, issued while the GEMMs of step j+1 run); the rows of
  // a gathered chunk (at the frame's edges) are added from registers here.
  auto stage_dq = [&](int j) {
    warpgroup_fence_operand(acc_dq);
    Tensor rdq = make_tensor(acc_dq.data(), gmma_rowcol(acc_dq.layout()));
    if (sm.tma[j % kSlots]) {
      // The staged layout's swizzle is r % 8 on the thread's rows r0 + 8·mi, and its chunk
      // index is (c % 32) / 4 on the columns c0 + 8·ni' (c0 < 8): per thread, four XORs.
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
    } else {
      const QRow* rows = sm.nrows[j % kSlots];
      const int head = sm.dq_at[j % kSlots][0];
      const int64_t head_off = (b * n_q_tok * p.heads + head) * kD + wg * kDqCols;
      CUTE_UNROLL
      for (int mi = 0; mi < size<0>(rdq); ++mi) {
        const int tok = rows[get<0>(cDQrc(mi, 0))].tok;
        if (tok < 0) continue;
        float* row = dq_acc + head_off + (int64_t)tok * q_stride;
        CUTE_UNROLL
        for (int ni = 0; ni < size<1>(rdq); ni += 2)
          red_add_v2(row + get<1>(cDQrc(mi, ni)), rdq(mi, ni), rdq(mi, ni + 1));
      }
    }
  };
  // By the issuer, after a CTA barrier that follows stage_dq(j); step j's row slot is intact
  // until the next kDsBarrier (fill_qrows of step j+3 comes after it).
  auto send_dq = [&](int j) {
    if (!dq_issuer || !sm.tma[j % kSlots] || GNA_X_DQ != 0) return;
    const int(&at)[4] = *reinterpret_cast<const int(*)[4]>(sm.dq_at[j % kSlots]);
    CUTE_UNROLL
    for (int c = 0; c < kDqCols; c += 32)
      tma_reduce_add(&maps.dq, &dq_stage[c * kBlockN], wg * kDqCols + c, at);
    bulk_commit();
  };

  for (int it = 0; it < steps; ++it) {
    // dV/dK(it-1) (and dQ(it-1)) are retired (their buffers are free); Q/dO(it) and the lse
    // and delta of step it have landed (rows(it+1) may still load).
    warpgroup_wait<0>();
    sm80::cp_async_wait<1>();
    cutlass::arch::fence_view_async_shared();
    __syncthreads();
    const int buf = it % Tr::kBuffers;
    Barrier::wait(&sm.n_bar[buf], (it / Tr::kBuffers) & 1);
    wgmma_issue(mma_s, tSrK, thr_s.partition_fragment_B(sQ(buf)), acc_s, false);
    wgmma_issue(mma_s, tSrV, thr_s.partition_fragment_B(sdO(buf)), acc_dp, false);
    stage(it + 1);
    if constexpr (kFusedDq && GNA_X_DQ < 2) {
      if (it > 0) send_dq(it - 1);
    }
    const bool full = sm.full[it % kSlots];
    const QRow* qrows = sm.nrows[it % kSlots];
    const float* qlse = sm.nlse[it % kSlots];
    const float* qdelta = sm.ndelta[it % kSlots];

    warpgroup_wait<1>();  // S^T
    warpgroup_fence_operand(acc_s);
    if (full) {
      CUTE_UNROLL
      for (int mi = 0; mi < size<0>(rs); ++mi) {
        CUTE_UNROLL
        for (int ni = 0; ni < size<1>(rs); ++ni) {
          const float lse2 = qlse[get<1>(cSrc(mi, ni))] * sm80::kLog2e;
          rs(mi, ni) = sm80::fast_exp2(rs(mi, ni) * scale2 - lse2);
        }
      }
    } else {
      // Rows are KV rows here: the thread's KRows are loaded once, each column's QRow once.
      constexpr int kRows = decltype(size<0>(rs))::value;
      KRow kr[kRows];
      CUTE_UNROLL
      for (int mi = 0; mi < kRows; ++mi) kr[mi] = sm.mrows[get<0>(cSrc(mi, 0))];
      CUTE_UNROLL
      for (int ni = 0; ni < size<1>(rs); ++ni) {
        const int col = get<1>(cSrc(0, ni));
        const QRow qr = qrows[col];
        const float lse2 = qlse[col] * sm80::kLog2e;
        CUTE_UNROLL
        for (int mi = 0; mi < kRows; ++mi) {
          const float pr = sm80::fast_exp2(rs(mi, ni) * scale2 - lse2);
          rs(mi, ni) = sm80::visible(qr, kr[mi]) ? pr : 0.f;
        }
      }
    }
    CUTE_UNROLL
    for (int i = 0; i < size(acc_s); ++i) rP(i) = static_cast<T>(acc_s(i));
    wgmma_issue(mma_g, tOrP, thr_g.partition_fragment_B(sdOt(buf)), acc_dv, true);

    warpgroup_wait<1>();  // dP^T (dV may still run)
    warpgroup_fence_operand(acc_dp);
    CUTE_UNROLL
    for (int mi = 0; mi < size<0>(rdp); ++mi) {
      CUTE_UNROLL
      for (int ni = 0; ni < size<1>(rdp); ++ni) {
        const float dl = qdelta[get<1>(cSrc(mi, ni))];
        rdp(mi, ni) = rs(mi, ni) * (rdp(mi, ni) - dl);
      }
    }
    CUTE_UNROLL
    for (int i = 0; i < size(acc_dp); ++i) rdS(i) = static_cast<T>(acc_dp(i));
    wgmma_issue(mma_g, tOrdS, thr_g.partition_fragment_B(sQt(buf)), acc_dk, true);
    if constexpr (kFusedDq && GNA_X_DQ < 2) {
      // dS^T to shared memory (pairs of neighbouring columns: one 32-bit store each; the
      // swizzle spreads a warp's 8 rows over distinct banks). The buffer is free: every
      // warpgroup's dQ GEMM of the previous step retired before the CTA barrier at the top.
      CUTE_UNROLL
      for (int i = 0; i < size(rdS); i += 2) {
        const int r = get<0>(cS(i)), c = get<1>(cS(i));
        T pair[2] = {rdS(i), rdS(i + 1)};
        *reinterpret_cast<uint32_t*>(&sdsT(r, c)) = *reinterpret_cast<uint32_t*>(pair);
      }
      cutlass::arch::fence_view_async_shared();
      // dQ(it-1)'s reductions have read the staged dQ, which stage_dq(it) rewrites.
      if (dq_issuer) bulk_wait_all</*kRead=*/true>();
      named_sync(kDsBarrier, kThreads);  // every warpgroup's dS^T is in place
      wgmma_issue(mma_dq, tDQrA, tDQrB, acc_dq, false);
    }
    // Here rather than under S^T/dP^T: their accumulators would stay live next to the
    // window arithmetic and spill (D = 128).
    fill_qrows(it + 2);
    if constexpr (kFusedDq && GNA_X_DQ < 2) {
      warpgroup_wait<0>();
      stage_dq(it);
    }
  }
  warpgroup_wait<0>();
  warpgroup_fence_operand(acc_dk);
  warpgroup_fence_operand(acc_dv);
  if constexpr (kFusedDq && GNA_X_DQ < 2) {
    __syncthreads();  // the last step's staged dQ
    if (steps > 0) send_dq(steps - 1);
    if (dq_issuer) bulk_wait_all</*kRead=*/false>();
  }

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
  Tensor cO = thr_g.partition_C(make_identity_tensor(Shape<Int<kBlockM>, Int<kD>>{}));
  Tensor cOrc = make_tensor(cO.data(), gmma_rowcol(cO.layout()));
  auto out_tok = [&](int r) { return sm.mrows[r].tok; };
  sm80::store_rows(make_tensor(acc_dk.data(), gmma_rowcol(acc_dk.layout())), cOrc, dk + kv_off,
                   kv_stride, p.scale, out_tok);
  sm80::store_rows(make_tensor(acc_dv.data(), gmma_rowcol(acc_dv.layout())), cOrc, dv + kv_off,
                   kv_stride, 1.f, out_tok);
}

}  // namespace sm90
}  // namespace gna
