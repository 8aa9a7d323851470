// sm90a GNA forward: the sm80 forward's geometry (one CTA per Q tile of one dilation group,
// head and batch, walking the box of KV tiles the Q tile sees; full tiles skip the mask) with
// Hopper warpgroup MMAs. It runs the Q tiles of up to 64 tokens (larger ones take the
// warp-specialised forward_ws.cuh unless a build selects this one). Each warpgroup owns 64 Q
// rows; S = Q·K^T runs with both operands in shared memory, O += P·V with P in registers.
//
// The loop walks the box in steps of kTilesPerStep consecutive KV tiles (N = 128 rows for
// the tensor cores while the geometry keeps its 64-token tiles). Per step `it`, after one CTA
// barrier: issue S(it) = Q·K(it)^T; while the tensor cores run it, gather K/V of step
// it+kLookahead (cp.async, token addresses, dilation in place) and build the rows of the step
// after; wait for S(it) (which also retires P·V of step it-1), softmax, issue
// O += P(it)·V(it) and go on without waiting, so that P·V overlaps the next barrier, staging
// and Q·K^T issue.
#pragma once

#include "wgmma.cuh"

namespace gna {
namespace sm90 {

using namespace cute;

template <class T_, int kD_, int kBlockM_, int kTileRows_, int kTilesPerStep_, int kStages_>
struct FwdTraits {
  using T = T_;
  static constexpr int kD = kD_;
  static constexpr int kBlockM = kBlockM_;  // Q rows per CTA, 64 per warpgroup
  static constexpr int kTileRows = kTileRows_;          // K/V rows of one KV tile of the box
  static constexpr int kTilesPerStep = kTilesPerStep_;  // consecutive box tiles per GEMM
  static constexpr int kBlockN = kTileRows * kTilesPerStep;  // K/V rows per step
  static constexpr int kStages = kStages_;  // K/V steps in flight: kStages - 2 load ahead
  // Steps whose K/V load while step it is computed. K needs a buffer for S(it) and one per
  // step ahead; V one more, for the P·V of step it-1 still in flight.
  static constexpr int kLookahead = kStages - 2;
  static_assert(kLookahead >= 1, "at least one step loads ahead");
  static constexpr int kKBuffers = kLookahead + 1;
  static constexpr int kVBuffers = kLookahead + 2;
  static constexpr int kWarpGroups = kBlockM / 64;
  static constexpr int kThreads = 128 * kWarpGroups;
  using MmaS = MmaSS<T, kWarpGroups, kBlockN, kD>;  // S = Q·K^T
  using MmaO = MmaRS<T, kWarpGroups, kD, kBlockN>;  // O += P·V
  // Q and K are K-major [rows, D]; V is stored [rows, D] as well, which is operand B of P·V
  // seen MN-major as [D, rows].
  using SmemQ = SmemKMajor<T, kBlockM, kD>;
  using SmemK = SmemKMajor<T, kBlockN, kD>;
  using SmemVt = decltype(tile_to_shape(GMMA::Layout_MN_SW128_Atom<T>{},
                                        Shape<Int<kD>, Int<kBlockN>>{}));
};

template <class Tr>
struct FwdSmem {
  using T = typename Tr::T;
  // 128-byte swizzle atoms repeat every 1024 bytes; descriptors assume that alignment.
  alignas(1024) T q[Tr::kBlockM * Tr::kD];
  alignas(1024) T k[Tr::kKBuffers][Tr::kBlockN * Tr::kD];
  alignas(1024) T v[Tr::kVBuffers][Tr::kBlockN * Tr::kD];
  QRow qrows[Tr::kBlockM];
  // Rows (tokens, group indices) and full flag of step j: built in iteration
  // j - kLookahead - 1, read by its gather in iteration j - kLookahead and by its mask in
  // iteration j.
  static constexpr int kRowSlots = Tr::kLookahead + 2;
  KRow krows[kRowSlots][Tr::kBlockN];
  // Whether step j is mask-free. One word per slot: with byte flags, compute-sanitizer's
  // racecheck reported hazards in the dK/dV kernel (same layout) between one slot's write
  // and a neighbouring slot's read in the same step, bytes of one 4-byte word; with words
  // both kernels are clean.
  int full[kRowSlots];
  FullTiles fulls;  // KV tiles this Q tile sees in full (used by the last thread only)
};

template <class Tr>
__global__ void __launch_bounds__(Tr::kThreads, 1)
    fwd_kernel(const Problem p, const typename Tr::T* __restrict__ q,
               const typename Tr::T* __restrict__ k, const typename Tr::T* __restrict__ v,
               typename Tr::T* __restrict__ out, float* __restrict__ lse) {
  using T = typename Tr::T;
  constexpr int kD = Tr::kD;
  constexpr int kBlockM = Tr::kBlockM;
  constexpr int kBlockN = Tr::kBlockN;
  constexpr int kThreads = Tr::kThreads;
  extern __shared__ __align__(1024) char smem_raw[];
  auto& sm = *reinterpret_cast<FwdSmem<Tr>*>(smem_raw);
  const int tid = threadIdx.x;
  const int h = blockIdx.y;
  const int64_t b = blockIdx.z;

  Group G;
  int qt[kMaxRank];
  if (!G.init(p, blockIdx.x, /*kv_side=*/false, qt)) return;
  const int hkv = h / (int)(p.heads / p.kv_heads);
  const int64_t n_q_tok = sm80::q_tokens_of(p);
  const int64_t n_kv_tok = sm80::kv_tokens_of(p);
  const int64_t q_stride = p.heads * kD;
  const int64_t kv_stride = p.kv_heads * kD;
  const T* qb = q + (b * n_q_tok * p.heads + h) * kD;
  const T* kb = k + (b * n_kv_tok * p.kv_heads + hkv) * kD;
  const T* vb = v + (b * n_kv_tok * p.kv_heads + hkv) * kD;
  const TileBox box = TileBox::seen_by(G, p, qt);
  if (tid == kThreads - 1) sm.fulls = FullTiles::of(G, p, qt, Tr::kTileRows);

  Tensor sQ = make_tensor(make_smem_ptr(sm.q), typename Tr::SmemQ{});
  auto sK = [&](int s) { return make_tensor(make_smem_ptr(sm.k[s]), typename Tr::SmemK{}); };
  auto sVt = [&](int s) { return make_tensor(make_smem_ptr(sm.v[s]), typename Tr::SmemVt{}); };

  for (int r = tid; r < kBlockM; r += kThreads) sm.qrows[r] = G.q_row(p, qt, r);
  int ii[kMaxRank];
  sm80::gather_rows<kBlockM, kD, kThreads>([&](int r, int c) { return &sQ(r, c); }, qb,
                                           q_stride,
                                           [&](int r) { return G.q_token(p, qt, r, ii); }, tid);
  sm80::cp_async_commit();

  constexpr int kAhead = Tr::kLookahead;
  constexpr int kSlots = FwdSmem<Tr>::kRowSlots;
  // A step is kTilesPerStep consecutive tiles of the box (a wider N for the tensor cores);
  // rows of tiles past the end of the box are padding.
  constexpr int kTileRows = Tr::kTileRows;
  constexpr int kPerStep = Tr::kTilesPerStep;
  const int steps = (box.total + kPerStep - 1) / kPerStep;
  int walk[kMaxRank];  // the first tile of the next fill_krows (called for j = 0, 1, ...)
  box.at(0, walk);
  // Tile u of the step that starts at `walk` (a tile past the end of the box wraps).
  auto tile_of_step = [&](int u, int kj[kMaxRank]) {
    for (int a = 0; a < kMaxRank; ++a) kj[a] = walk[a];
    for (int i = 0; i < u; ++i) box.next(kj);
  };
  auto fill_krows = [&](int j) {
    KRow* rows = sm.krows[j % kSlots];
    for (int r = tid; r < kBlockN; r += kThreads) {
      const int t = j * kPerStep + r / kTileRows;
      int kj[kMaxRank];
      tile_of_step(r / kTileRows, kj);
      rows[r] = G.k_row(p, kj, r % kTileRows);
      if (t >= box.total) rows[r].tok = -1;
    }
    // The last warpgroup computes the flag: warpgroup 0 builds the rows.
    if (tid == kThreads - 1) {
      bool f = true;
      for (int u = 0; u < kPerStep; ++u) {
        int kj[kMaxRank];
        tile_of_step(u, kj);
        f = f && j * kPerStep + u < box.total && sm.fulls.contains(kj);
      }
      sm.full[j % kSlots] = f;
    }
    for (int u = 0; u < kPerStep; ++u) box.next(walk);
  };
  // Gathers K/V of step j if it exists; always commits a group, so that group counts match
  // step indices in cp_async_wait.
  auto stage_kv = [&](int j) {
    if (j < steps) {
      const KRow* kr = sm.krows[j % kSlots];
      auto tok = [&](int r) { return kr[r].tok; };
      Tensor k_s = sK(j % Tr::kKBuffers);
      Tensor vt_s = sVt(j % Tr::kVBuffers);
      sm80::gather_rows<kBlockN, kD, kThreads>([&](int r, int c) { return &k_s(r, c); }, kb,
                                               kv_stride, tok, tid);
      sm80::gather_rows<kBlockN, kD, kThreads>([&](int r, int c) { return &vt_s(c, r); }, vb,
                                               kv_stride, tok, tid);
    }
    sm80::cp_async_commit();
  };
  for (int j = 0; j <= kAhead && j < steps; ++j) fill_krows(j);
  __syncthreads();
  for (int j = 0; j < kAhead; ++j) stage_kv(j);

  typename Tr::MmaS mma_s;
  typename Tr::MmaO mma_o;
  auto thr_s = mma_s.get_thread_slice(tid);
  auto thr_o = mma_o.get_thread_slice(tid);
  Tensor tSrQ = thr_s.partition_fragment_A(sQ);
  Tensor acc_o = partition_fragment_C(mma_o, Shape<Int<kBlockM>, Int<kD>>{});
  clear(acc_o);
  Tensor ro = make_tensor(acc_o.data(), gmma_rowcol(acc_o.layout()));
  constexpr int kRowsPerThread = decltype(size<0>(ro))::value;
  float row_max[kRowsPerThread];
  float row_sum[kRowsPerThread];
  CUTE_UNROLL
  for (int i = 0; i < kRowsPerThread; ++i) {
    row_max[i] = -INFINITY;
    row_sum[i] = 0.f;
  }
  Tensor cS = thr_s.partition_C(make_identity_tensor(Shape<Int<kBlockM>, Int<kBlockN>>{}));
  Tensor cSrc = make_tensor(cS.data(), gmma_rowcol(cS.layout()));
  const float scale2 = p.scale * sm80::kLog2e;

  // Live across iterations: P(it) is read by the P·V still in flight during iteration it+1,
  // and S(it+1) must not take its registers.
  Tensor acc_s = partition_fragment_C(mma_s, Shape<Int<kBlockM>, Int<kBlockN>>{});
  Tensor rP = make_tensor<T>(acc_s.layout());
  Tensor tOrP = make_tensor(rP.data(), gmma_acc_as_a(rP.layout()));
  Tensor rs = make_tensor(acc_s.data(), gmma_rowcol(acc_s.layout()));

  for (int it = 0; it < steps; ++it) {
    // K/V(it) have landed and are visible to the tensor cores (async proxy); every warpgroup
    // has retired P·V(it-2) and S(it-1), so their K/V buffers are free, and step it-1's row
    // slot.
    cp_async_wait<kAhead - 1>();
    cutlass::arch::fence_view_async_shared();
    __syncthreads();
    Tensor tSrK = thr_s.partition_fragment_B(sK(it % Tr::kKBuffers));
    wgmma_issue(mma_s, tSrQ, tSrK, acc_s, /*accumulate=*/false);
    stage_kv(it + kAhead);
    if (it + kAhead + 1 < steps) fill_krows(it + kAhead + 1);
    const bool full = sm.full[it % kSlots];
    const KRow* krows = sm.krows[it % kSlots];
    warpgroup_wait<0>();  // S(it), and P·V(it-1) before it
    warpgroup_fence_operand(acc_s);
    warpgroup_fence_operand(acc_o);

    sm80::online_softmax</*kFoldScale=*/true>(rs, ro, cSrc, row_max, row_sum, full,
                                              sm80::RowsMask{sm.qrows, krows}, scale2);

    CUTE_UNROLL
    for (int i = 0; i < size(acc_s); ++i) rP(i) = static_cast<T>(acc_s(i));
    Tensor tOrV = thr_o.partition_fragment_B(sVt(it % Tr::kVBuffers));
    wgmma_issue(mma_o, tOrP, tOrV, acc_o, /*accumulate=*/true);
  }
  warpgroup_wait<0>();
  warpgroup_fence_operand(acc_o);

  // Epilogue: normalise, write O (input dtype) and lse (natural log) for valid rows only.
  cp_async_wait<0>();
  __syncthreads();  // qrows are visible even if the box was empty
  Tensor cO = thr_o.partition_C(make_identity_tensor(Shape<Int<kBlockM>, Int<kD>>{}));
  Tensor cOrc = make_tensor(cO.data(), gmma_rowcol(cO.layout()));
  T* ob = out + (b * n_q_tok * p.heads + h) * kD;
  float* lb = lse + b * n_q_tok * p.heads + h;
  sm80::store_out_lse(ro, cOrc, row_max, row_sum, sm.qrows, ob, lb, q_stride, p.heads,
                      tid % 32);
}

}  // namespace sm90
}  // namespace gna
