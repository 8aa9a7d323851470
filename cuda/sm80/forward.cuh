// sm80 GNA forward: one CTA per (Q tile of one dilation group, head, batch), or `parts` CTAs
// that split its rows. It walks the box of KV tiles that the geometry says the Q tile sees;
// full tiles run without mask code, partial tiles mask element-wise. Online softmax in fp32
// (exp2), P stays in registers as the A operand of the PV GEMM. K and V have kStages buffers
// (3 where the card's shared memory allows, else 2): the next kStages-1 tiles stream in
// (cp.async) during this tile's GEMMs and softmax.
#pragma once

#include "common.cuh"

// Minimum resident CTAs per SM the forward is compiled for (register cap); 1 lets the
// compiler use up to 255 registers per thread.
#ifndef GNA_SM80_FWD_MIN_BLOCKS
#define GNA_SM80_FWD_MIN_BLOCKS 1
#endif

// K/V buffers of the 128-row forward where the card's shared memory per block allows (2 or 3).
#ifndef GNA_SM80_FWD_STAGES
#define GNA_SM80_FWD_STAGES 3
#endif

namespace gna {
namespace sm80 {

template <class Tr, int kBlockM, int kBlockN, int kStages>
struct FwdSmem {
  static_assert(kStages == 2 || kStages == 3, "two or three K/V buffers");
  static constexpr int kRowSlots = kStages + 1;
  using T = typename Tr::T;
  alignas(128) T q[kBlockM * Tr::kD];
  alignas(128) T k[kStages][kBlockN * Tr::kD];  // tile it in buffer it % kStages
  alignas(128) T v[kStages][kBlockN * Tr::kD];
  QRow qrows[kBlockM];
  // Rows of tile it in slot it % kRowSlots: the gathers read each row's token there (no
  // integer divisions per chunk), the mask its group indices. Slot it+kStages is built
  // during tile it.
  KRow krows[kRowSlots][kBlockN];
  bool full[kRowSlots];  // tile needs no element mask (computed once, by thread 0, with its rows)
  FullTiles fulls;  // KV tiles this Q tile sees in full (thread 0's)
};

template <class Tr, int kBlockM, int kBlockN, int kStages>
__global__ void __launch_bounds__(Tr::kThreads, GNA_SM80_FWD_MIN_BLOCKS)
    fwd_kernel(const Problem p, const typename Tr::T* __restrict__ q,
               const typename Tr::T* __restrict__ k, const typename Tr::T* __restrict__ v,
               typename Tr::T* __restrict__ out, float* __restrict__ lse, int parts) {
  using T = typename Tr::T;
  constexpr int kD = Tr::kD;
  constexpr int kThreads = Tr::kThreads;
  static_assert(kBlockM == Tr::kRowsMma, "one 16-row MMA slab per warp");
  extern __shared__ __align__(128) char smem_raw[];
  using Smem = FwdSmem<Tr, kBlockM, kBlockN, kStages>;
  constexpr int kRowSlots = Smem::kRowSlots;
  auto& sm = *reinterpret_cast<Smem*>(smem_raw);
  const int tid = threadIdx.x;
  const int h = blockIdx.y;
  const int64_t b = blockIdx.z;

  // `parts` CTAs share a Q tile, each taking kBlockM of its rows (and walking the whole box):
  // how 128-token Q tiles run where a 128-row CTA's shared memory does not fit (sm_86/89).
  Group G;
  int qt[kMaxRank];
  if (!G.init(p, blockIdx.x / parts, /*kv_side=*/false, qt)) return;
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
  using SKV = typename Tr::template Smem<kBlockN>;
  using SKVt = typename Tr::template SmemT<kBlockN>;
  Tensor sQ = make_tensor(make_smem_ptr(sm.q), SQ{});
  auto sK = [&](int buf) { return make_tensor(make_smem_ptr(sm.k[buf]), SKV{}); };
  auto sVt = [&](int buf) { return make_tensor(make_smem_ptr(sm.v[buf]), SKVt{}); };

  // KV box seen by this Q tile, per axis.
  const TileBox box = TileBox::seen_by(G, p, qt);
  if (tid == 0) sm.fulls = FullTiles::of(G, p, qt, kBlockN);

  for (int r = tid; r < kBlockM; r += kThreads) sm.qrows[r] = G.q_row(p, qt, rb + r);
  int ii[kMaxRank];
  load_rows<kBlockM, kD, kThreads>(sm.q, SQ{}, qb, q_stride,
                                   [&](int r) { return G.q_token(p, qt, rb + r, ii); },
                                   tid);

  int walk[kMaxRank];  // the tile of the next fill_krows (called for j = 0, 1, ... in turn)
  box.at(0, walk);
  auto fill_krows = [&](int j) {
    int kj[kMaxRank];
    for (int a = 0; a < kMaxRank; ++a) kj[a] = walk[a];
    box.next(walk);
    for (int r = tid; r < kBlockN; r += kThreads) sm.krows[j % kRowSlots][r] = G.k_row(p, kj, r);
    if (tid == 0) sm.full[j % kRowSlots] = sm.fulls.contains(kj);
  };
  // K and V of tile j into buffer j % kStages (its rows are visible: built before a barrier).
  auto stage = [&](int j) {
    const KRow* kr = sm.krows[j % kRowSlots];
    auto tok = [&](int r) { return kr[r].tok; };
    load_rows<kBlockN, kD, kThreads>(sm.k[j % kStages], SKV{}, kb, kv_stride, tok, tid);
    load_rows<kBlockN, kD, kThreads>(sm.v[j % kStages], SKV{}, vb, kv_stride, tok, tid);
  };
  // One cp.async group per tile (the first with Q), committed even when empty, so that
  // "all but the newest kStages-2 groups" always means "up to tile it".
  for (int j = 0; j < kStages && j < box.total; ++j) fill_krows(j);
  __syncthreads();
  for (int j = 0; j < kStages - 1; ++j) {
    if (j < box.total) stage(j);
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
  Tensor cS = thr.partition_C(make_identity_tensor(Shape<Int<kBlockM>, Int<kBlockN>>{}));
  Tensor cSrc = make_tensor(cS.data(), rowcol(cS.layout()));
  const float scale2 = p.scale * kLog2e;

  for (int it = 0; it < box.total; ++it) {
    // Tile it has landed and rows(it+kStages-1) are visible; every warp is done with tile
    // it-1, so its buffer takes tile it+kStages-1, and its row slot the rows of tile
    // it+kStages.
    cp_async_wait<kStages - 2>();
    __syncthreads();
    if (it + kStages - 1 < box.total) stage(it + kStages - 1);
    cp_async_commit();
    if (it + kStages < box.total) fill_krows(it + kStages);
    const bool full = sm.full[it % kRowSlots];
    const KRow* krows = sm.krows[it % kRowSlots];

    Tensor acc_s = partition_fragment_C(mma, Shape<Int<kBlockM>, Int<kBlockN>>{});
    clear(acc_s);
    gemm_ss<typename Tr::LdsmN, typename Tr::LdsmN>(mma, acc_s, sQ, sK(it % kStages), tid);
    Tensor rs = make_tensor(acc_s.data(), rowcol(acc_s.layout()));
    online_softmax</*kFoldScale=*/false, /*kChains=*/4>(
        rs, ro, cSrc, row_max, row_sum, full, RowsMask{sm.qrows, krows}, scale2);
    Tensor rP = to_operand_a<T>(acc_s);
    gemm_rs<typename Tr::LdsmT>(mma, acc_o, rP, sVt(it % kStages), tid);
  }

  // Epilogue: normalise, write O (input dtype) and lse (natural log) for valid rows only.
  cp_async_wait<0>();
  __syncthreads();
  Tensor cO = thr.partition_C(make_identity_tensor(Shape<Int<kBlockM>, Int<kD>>{}));
  Tensor cOrc = make_tensor(cO.data(), rowcol(cO.layout()));
  T* ob = out + (b * n_q_tok * p.heads + h) * kD;
  float* lb = lse + b * n_q_tok * p.heads + h;
  store_out_lse(ro, cOrc, row_max, row_sum, sm.qrows, ob, lb, q_stride, p.heads, tid % 32);
}

}  // namespace sm80
}  // namespace gna
