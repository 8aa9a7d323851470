// sm80 GNA forward: one CTA per (Q tile of one dilation group, head, batch), or `parts` CTAs
// that split its rows. It walks the box of KV tiles that the geometry says the Q tile sees;
// full tiles run without mask code, partial tiles mask element-wise. Online softmax in fp32
// (exp2), P stays in registers as the A operand of the PV GEMM, and so does Q: each warp loads
// its 16 rows once. A step is one or two KV tiles; K and V have kStages step buffers (the last
// one holds Q until the first step has read it), so that the next kStages-1 steps stream in
// (cp.async) during this step's GEMMs and softmax.
#pragma once

#include "common.cuh"
#include "fwd_trace.cuh"

// Minimum resident CTAs per SM the forward is compiled for (register cap); 1 lets the
// compiler use up to 255 registers per thread.
#ifndef GNA_SM80_FWD_MIN_BLOCKS
#define GNA_SM80_FWD_MIN_BLOCKS 1
#endif

// K/V step buffers of the 128-row forward where the card's shared memory per block allows (2
// or 3).
#ifndef GNA_SM80_FWD_STAGES
#define GNA_SM80_FWD_STAGES 3
#endif

// KV tiles per step of the 128-row forward (1 or 2): with 2, each step's S GEMM is 128
// columns wide, so that the output rescale, the row max's shuffles and the CTA barrier are
// paid once per two tiles.
#ifndef GNA_SM80_FWD_STEP_TILES
#define GNA_SM80_FWD_STEP_TILES 2
#endif

namespace gna {
namespace sm80 {

// A step is kStepTiles consecutive KV tiles of kBlockN rows (the box's walk order); the rows
// of a missing last tile are padding (token -1: zero-filled and masked).
template <class Tr, int kBlockM, int kBlockN, int kStages, int kStepTiles>
struct FwdSmem {
  static_assert(kStages == 2 || kStages == 3, "two or three K/V buffers");
  static constexpr int kRowSlots = kStages + 1;
  static constexpr int kStepRows = kBlockN * kStepTiles;
  static_assert(kBlockM <= 2 * kStepRows, "Q fits the K and V of one step");
  using T = typename Tr::T;
  // K (kv[s][0]) and V (kv[s][1]) of step it in buffer s = it % kStages. Q lands in the last
  // buffer, which step kStages-1 overwrites once every warp holds its Q rows.
  alignas(128) T kv[kStages][2][kStepRows * Tr::kD];
  QRow qrows[kBlockM];
  // Rows of step it in slot it % kRowSlots: the gathers read each row's token there (no
  // integer divisions per chunk), the mask its group indices. Slot it+kStages is built
  // during step it.
  KRow krows[kRowSlots][kStepRows];
  bool full[kRowSlots];  // step needs no element mask (computed once, by thread 0, with its rows)
  FullTiles fulls;  // KV tiles this Q tile sees in full (thread 0's)
  RowTable<kBlockN> ktable;  // token offsets and local coordinates of a KV tile's rows
};

template <class Tr, int kBlockM, int kBlockN, int kStages, int kStepTiles>
__global__ void __launch_bounds__(Tr::kThreads, GNA_SM80_FWD_MIN_BLOCKS)
    fwd_kernel(const Problem p, const typename Tr::T* __restrict__ q,
               const typename Tr::T* __restrict__ k, const typename Tr::T* __restrict__ v,
               typename Tr::T* __restrict__ out, float* __restrict__ lse, int parts) {
  using T = typename Tr::T;
  constexpr int kD = Tr::kD;
  constexpr int kThreads = Tr::kThreads;
  static_assert(kBlockM == Tr::kRowsMma, "one 16-row MMA slab per warp");
  extern __shared__ __align__(128) char smem_raw[];
  using Smem = FwdSmem<Tr, kBlockM, kBlockN, kStages, kStepTiles>;
  constexpr int kRowSlots = Smem::kRowSlots;
  constexpr int kStepRows = Smem::kStepRows;
  auto& sm = *reinterpret_cast<Smem*>(smem_raw);
  const int tid = threadIdx.x;
  const int h = blockIdx.y;
  const int64_t b = blockIdx.z;

  // `parts` CTAs share a Q tile, each taking kBlockM of its rows (and walking the whole box):
  // how 128-token Q tiles run where a 128-row CTA's shared memory does not fit (sm_86/89).
  Group G;
  int qt[kMaxRank];
  if (!G.init(p, blockIdx.x / parts, /*kv_side=*/false, qt)) return;
  GNA_FWD_TRACE_MARK(0);
  const int rb = (blockIdx.x % parts) * kBlockM;  // the CTA's first row of the Q tile
  const int hkv = h / (int)(p.heads / p.kv_heads);
  const int64_t n_q_tok = q_tokens_of(p);
  const int64_t n_kv_tok = kv_tokens_of(p);
  const int64_t q_stride = p.heads * kD;
  const int64_t kv_stride = p.kv_heads * kD;
  const T* qb = q + (b * n_q_tok * p.heads + h) * kD;
  const T* kb = k + (b * n_kv_tok * p.kv_heads + hkv) * kD;
  const T* vb = v + (b * n_kv_tok * p.kv_heads + hkv) * kD;

  using SQ = typename Tr::template Smem<kBlockM>;
  using SKV = typename Tr::template Smem<kStepRows>;
  using SKVt = typename Tr::template SmemT<kStepRows>;
  Tensor sQ = make_tensor(make_smem_ptr(sm.kv[kStages - 1][0]), SQ{});
  auto sK = [&](int buf) { return make_tensor(make_smem_ptr(sm.kv[buf][0]), SKV{}); };
  auto sVt = [&](int buf) { return make_tensor(make_smem_ptr(sm.kv[buf][1]), SKVt{}); };

  // KV box seen by this Q tile, per axis.
  const TileBox box = TileBox::seen_by(G, p, qt);
  if (tid == 0) sm.fulls = FullTiles::of(G, p, qt, kBlockN);

  for (int r = tid; r < kBlockM; r += kThreads) sm.qrows[r] = G.q_row(p, qt, rb + r);
  sm.ktable.build(G, p, /*kv_side=*/true, tid, kThreads);
  // Row r of KV tile kt: from the table (no divisions) where the tile lies inside the frame.
  auto k_row = [&](const int kt[kMaxRank], int r) {
    return G.tile_inside(p, kt, /*kv_side=*/true)
               ? sm.ktable.k_row(p, kt, G.tile_base(p, kt, /*kv_side=*/true), r)
               : G.k_row(p, kt, r);
  };
  int ii[kMaxRank];
  load_rows<kBlockM, kD, kThreads>(sm.kv[kStages - 1][0], SQ{}, qb, q_stride,
                                   [&](int r) { return G.q_token(p, qt, rb + r, ii); },
                                   tid);

  const int steps = (box.total + kStepTiles - 1) / kStepTiles;
  int walk[kMaxRank];  // the tile after those of the last fill_krows (called for j = 0, 1, ...)
  box.at(0, walk);
  auto fill_krows = [&](int j) {
    KRow* rows = sm.krows[j % kRowSlots];
    bool full = true;
    // Tile t's rows are built by threads [t·kBlockN, (t+1)·kBlockN): a step's rows spread
    // over kStepTiles times the warps (with two tiles, four warps and not two carry them).
    static_assert(kThreads >= kStepRows, "one row per thread");
    for (int t = 0; t < kStepTiles; ++t) {
      // (A loop rather than an if: ptxas then keeps k_row out of line of the step's code and
      // its registers; with an if, the forward spilled ~100 B at 255 registers.)
      const int r0 = tid - t * kBlockN;
      if (j * kStepTiles + t < box.total) {
        for (int r = r0; r >= 0 && r < kBlockN; r += kThreads)
          rows[t * kBlockN + r] = k_row(walk, r);
        if (tid == 0) full = full && sm.fulls.contains(walk);
        box.next(walk);
      } else {
        for (int r = r0; r >= 0 && r < kBlockN; r += kThreads) rows[t * kBlockN + r].tok = -1;
        full = false;
      }
    }
    if (tid == 0) sm.full[j % kRowSlots] = full;
  };
  // K and V of step j into buffer j % kStages (its rows are visible: built before a barrier).
  auto stage = [&](int j) {
    const KRow* kr = sm.krows[j % kRowSlots];
    auto tok = [&](int r) { return kr[r].tok; };
    // K and V of a row from one token read (both buffers share the SKV layout).
    T* const ks = sm.kv[j % kStages][0];
    const T* const bases[2] = {kb, vb};
    const ptrdiff_t offsets[2] = {0, kStepRows * kD};  // kv[s][1] follows kv[s][0]
    gather_rows_from<kStepRows, kD, kThreads, 2>([&](int r, int c) { return ks + SKV{}(r, c); },
                                                 bases, offsets, kv_stride, tok, tid);
  };
  __syncthreads();  // the row table, before fill_krows reads it
  // One cp.async group per step (the first with Q), committed even when empty, so that
  // "all but the newest kStages-2 groups" always means "up to step it".
  for (int j = 0; j < kStages && j < steps; ++j) fill_krows(j);
  __syncthreads();
  for (int j = 0; j < kStages - 1; ++j) {
    if (j < steps) stage(j);
    cp_async_commit();
  }

  typename Tr::TiledMma mma;
  auto thr = mma.get_thread_slice(tid);
  Tensor acc_o = partition_fragment_C(mma, Shape<Int<kBlockM>, Int<kD>>{});
  clear(acc_o);
  Tensor ro = make_tensor(acc_o.data(), rowcol(acc_o.layout()));
  constexpr int kRowsPerThread = decltype(size<0>(ro))::value;
  float row_max[kRowsPerThread];
  float row_sum[kRowsPerThread];
  CUTE_UNROLL
  for (int i = 0; i < kRowsPerThread; ++i) {
    row_max[i] = -INFINITY;
    row_sum[i] = 0.f;
  }
  Tensor cS = thr.partition_C(make_identity_tensor(Shape<Int<kBlockM>, Int<kStepRows>>{}));
  Tensor cSrc = make_tensor(cS.data(), rowcol(cS.layout()));
  const float scale2 = p.scale * kLog2e;
  // The warp's Q rows as the S GEMM's A operand, loaded at the first step (Q lands with it).
  Tensor rQ = thr.partition_fragment_A(sQ);

  GNA_FWD_TRACE_MARK(1, steps);
  for (int it = 0; it < steps; ++it) {
    // Step it has landed and rows(it+kStages-1) are visible; every warp is done with step
    // it-1, so its buffer takes step it+kStages-1, and its row slot the rows of step
    // it+kStages.
    cp_async_wait<kStages - 2>();
    __syncthreads();
    if (it == 0) {
      auto cpQ = make_tiled_copy_A(typename Tr::LdsmN{}, mma);
      auto tQ = cpQ.get_thread_slice(tid);
      copy(cpQ, tQ.partition_S(sQ), tQ.retile_D(rQ));
      __syncthreads();  // Q's buffer takes step kStages-1 next
    }
    if (it + kStages - 1 < steps) stage(it + kStages - 1);
    cp_async_commit();
    if (it + kStages < steps) fill_krows(it + kStages);
    const bool full = sm.full[it % kRowSlots];
    const KRow* krows = sm.krows[it % kRowSlots];

    Tensor acc_s = partition_fragment_C(mma, Shape<Int<kBlockM>, Int<kStepRows>>{});
    clear(acc_s);
    gemm_rs<typename Tr::LdsmN>(mma, acc_s, rQ, sK(it % kStages), tid);
    Tensor rs = make_tensor(acc_s.data(), rowcol(acc_s.layout()));
    online_softmax</*kFoldScale=*/true, /*kChains=*/4>(
        rs, ro, cSrc, row_max, row_sum, full, RowsMask{sm.qrows, krows}, scale2);
    Tensor rP = to_operand_a<T>(acc_s);
    gemm_rs<typename Tr::LdsmT>(mma, acc_o, rP, sVt(it % kStages), tid);
    if (it == 0) GNA_FWD_TRACE_MARK(2);
  }
  GNA_FWD_TRACE_MARK(3);

  // Epilogue: normalise, write O (input dtype) and lse (natural log) for valid rows only.
  cp_async_wait<0>();
  __syncthreads();
  Tensor cO = thr.partition_C(make_identity_tensor(Shape<Int<kBlockM>, Int<kD>>{}));
  Tensor cOrc = make_tensor(cO.data(), rowcol(cO.layout()));
  T* ob = out + (b * n_q_tok * p.heads + h) * kD;
  float* lb = lse + b * n_q_tok * p.heads + h;
  // Every K/V buffer is free now: each warp stages its 16 rows in its own block of them.
  static_assert(sizeof(sm.kv) >= Tr::kWarps * StagedOut<kD>::kStageElems * sizeof(T),
                "the staged rows fit the K/V buffers");
  store_out_lse_staged<kD>(ro, cOrc, row_max, row_sum, sm.qrows, ob, lb, q_stride, p.heads,
                           reinterpret_cast<T*>(&sm.kv) + tid / 32 * StagedOut<kD>::kStageElems,
                           tid % 32);
  GNA_FWD_TRACE_MARK(4);
}

}  // namespace sm80
}  // namespace gna
