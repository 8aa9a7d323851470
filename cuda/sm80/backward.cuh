// sm80 GNA backward:
//   1. delta_kernel: delta = rowsum(dO · O) in float32 (workspace [B, N, H]).
//   2. dkdv_kernel: one CTA per (KV tile of one dilation group, kv head, batch); loops over
//      the query heads of its GQA group and the box of Q tiles that see the KV tile (the
//      geometry's q_range), in chunks of kChunk query rows. It works in the transposed frame
//      (KV rows are the MMA's M side): S^T = K Q^T, P^T = exp2(S^T·c − lse), dP^T = V dO^T,
//      dS^T = P^T ∘ (dP^T − delta), dV += P^T dO, dK += dS^T Q — so P^T and dS^T stay in
//      registers as the A operands and no reduction across warps is needed.
//      With kDq (the default, non-deterministic backward) it also stores dS^T in shared
//      memory and adds the chunk's dQ = dS K into a float32 accumulator with atomics: five
//      GEMMs per (query, key) pair, then dq_from_acc_kernel converts the accumulator.
//   3. Deterministic (p.deterministic): dq_kernel instead, like the forward, one CTA per Q tile
//      over its KV box: S = Q K^T, dP = dO V^T, dQ += dS K. It recomputes S and dP (7 GEMMs
//      instead of 5) in exchange for bitwise-reproducible gradients with no atomics.
#pragma once

#include "../grid_dependency.cuh"  // allow_next_grid, wait_prior_grid (PDL)
#include "common.cuh"
#include "launch.cuh"  // kMaxQTokens

namespace gna {
namespace sm80 {

// delta[row] = Σ_d dO[row, d] · O[row, d] over rows of [B·N·H, D]; kD/8 lanes per row. Where
// `dq_acc` is not null (the non-deterministic backwards), it also zeroes that float32
// accumulator (the same [B·N·H, D] layout), so that no separate memset runs between this pass
// and the kernel that adds into it. The next grid may start at once (PDL): it waits for this
// one to complete before it reads delta or the accumulator.
template <class T, int kD>
__global__ void __launch_bounds__(256)
    delta_kernel(int64_t rows, const T* __restrict__ o, const T* __restrict__ dout,
                 float* __restrict__ delta, float* __restrict__ dq_acc) {
  allow_next_grid();
  constexpr int kLanes = kD / 8;
  const int64_t row = ((int64_t)blockIdx.x * 256 + threadIdx.x) / kLanes;
  const int c = threadIdx.x % kLanes;
  float acc = 0.f;
  if (row < rows) {
    const uint4 a = *reinterpret_cast<const uint4*>(o + row * kD + c * 8);
    const uint4 g = *reinterpret_cast<const uint4*>(dout + row * kD + c * 8);
    const T* pa = reinterpret_cast<const T*>(&a);
    const T* pg = reinterpret_cast<const T*>(&g);
    CUTE_UNROLL
    for (int i = 0; i < 8; ++i) acc += static_cast<float>(pa[i]) * static_cast<float>(pg[i]);
    if (dq_acc != nullptr) {
      float4* zero = reinterpret_cast<float4*>(dq_acc + row * kD + c * 8);
      zero[0] = make_float4(0.f, 0.f, 0.f, 0.f);
      zero[1] = make_float4(0.f, 0.f, 0.f, 0.f);
    }
  }
  CUTE_UNROLL
  for (int off = kLanes / 2; off > 0; off /= 2) acc += __shfl_xor_sync(0xffffffffu, acc, off);
  if (row < rows && c == 0) delta[row] = acc;
}

// Stores a float accumulator [rows, kD] (rowcol view) scaled by `scale` into gathered rows.
template <class T, class Rc, class Crc, class TokFn>
__device__ __forceinline__ void store_rows(Rc const& racc, Crc const& crc, T* base,
                                           int64_t row_stride, float scale, TokFn const& tok_of) {
  CUTE_UNROLL
  for (int mi = 0; mi < size<0>(racc); ++mi) {
    const int tok = tok_of(get<0>(crc(mi, 0)));
    if (tok < 0) continue;
    T* row = base + (int64_t)tok * row_stride;
    CUTE_UNROLL
    for (int ni = 0; ni < size<1>(racc); ni += 2) {
      const int c = get<1>(crc(mi, ni));
      T pair[2] = {static_cast<T>(racc(mi, ni) * scale), static_cast<T>(racc(mi, ni + 1) * scale)};
      *reinterpret_cast<uint32_t*>(row + c) = *reinterpret_cast<uint32_t*>(pair);
    }
  }
}

// dq = T(acc · scale), 8 elements per thread and iteration (n8 = elements / 8: D is a
// multiple of 8). Converts the float32 accumulator of the non-deterministic backwards.
// Where it is launched as a programmatic dependent of the kernel that fills the accumulator
// (the sm90a backward), it first waits for that kernel to complete.
template <class T>
__global__ void dq_from_acc_kernel(const float4* __restrict__ acc, uint4* __restrict__ dq,
                                   int64_t n8, float scale) {
  wait_prior_grid();
  for (int64_t i = blockIdx.x * (int64_t)blockDim.x + threadIdx.x; i < n8;
       i += (int64_t)gridDim.x * blockDim.x) {
    const float4 a = acc[2 * i], c = acc[2 * i + 1];
    const float x[8] = {a.x, a.y, a.z, a.w, c.x, c.y, c.z, c.w};
    T y[8];
    CUTE_UNROLL
    for (int j = 0; j < 8; ++j) y[j] = static_cast<T>(x[j] * scale);
    dq[i] = *reinterpret_cast<const uint4*>(y);
  }
}

// dQ: K/V and the row table of KV tile `it` in buffer it % kStages. With two, the other
// buffer loads the next tile while this one is computed (the launch picks two where the
// card's shared memory per block allows: not on sm_86/89 at D = 128).
template <class Tr, int kBlockM, int kBlockN, int kStages>
struct DqSmem {
  static_assert(kStages == 1 || kStages == 2, "one or two K/V buffers");
  using T = typename Tr::T;
  alignas(128) T q[kBlockM * Tr::kD];
  alignas(128) T dout[kBlockM * Tr::kD];
  alignas(128) T k[kStages][kBlockN * Tr::kD];
  alignas(128) T v[kStages][kBlockN * Tr::kD];
  QRow qrows[kBlockM];
  KRow krows[kStages][kBlockN];
  FullTiles fulls;  // KV tiles this Q tile sees in full
};

template <class Tr, int kBlockM, int kBlockN, int kStages>
__global__ void __launch_bounds__(Tr::kThreads)
    dq_kernel(const Problem p, const typename Tr::T* __restrict__ q,
              const typename Tr::T* __restrict__ k, const typename Tr::T* __restrict__ v,
              const typename Tr::T* __restrict__ dout, const float* __restrict__ lse,
              const float* __restrict__ delta, typename Tr::T* __restrict__ dq, int parts) {
  using T = typename Tr::T;
  constexpr int kD = Tr::kD;
  constexpr int kThreads = Tr::kThreads;
  static_assert(kBlockM == Tr::kRowsMma, "one 16-row MMA slab per warp");
  extern __shared__ __align__(128) char smem_raw[];
  auto& sm = *reinterpret_cast<DqSmem<Tr, kBlockM, kBlockN, kStages>*>(smem_raw);
  const int tid = threadIdx.x;
  const int h = blockIdx.y;
  const int64_t b = blockIdx.z;

  // `parts` CTAs share a Q tile, each taking kBlockM of its rows (dQ rows are independent):
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
  const int64_t q_off = (b * n_q_tok * p.heads + h) * kD;
  const int64_t kv_off = (b * n_kv_tok * p.kv_heads + hkv) * kD;
  const float* lb = lse + b * n_q_tok * p.heads + h;
  const float* db = delta + b * n_q_tok * p.heads + h;

  using SQ = typename Tr::template Smem<kBlockM>;
  using SKV = typename Tr::template Smem<kBlockN>;
  using SKVt = typename Tr::template SmemT<kBlockN>;
  Tensor sQ = make_tensor(make_smem_ptr(sm.q), SQ{});
  Tensor sdO = make_tensor(make_smem_ptr(sm.dout), SQ{});

  const TileBox box = TileBox::seen_by(G, p, qt);
  if (tid == 0) sm.fulls = FullTiles::of(G, p, qt, kBlockN);  // read after the loop's barrier

  for (int r = tid; r < kBlockM; r += kThreads) {
    QRow row = G.q_row(p, qt, rb + r);
    row.lse2 = row.tok >= 0 ? lb[(int64_t)row.tok * p.heads] * kLog2e : INFINITY;
    row.delta = row.tok >= 0 ? db[(int64_t)row.tok * p.heads] : 0.f;
    sm.qrows[r] = row;
  }
  int ii[kMaxRank];
  auto q_tok = [&](int r) { return G.q_token(p, qt, rb + r, ii); };
  load_rows<kBlockM, kD, kThreads>(sm.q, SQ{}, q + q_off, q_stride, q_tok, tid);
  load_rows<kBlockM, kD, kThreads>(sm.dout, SQ{}, dout + q_off, q_stride, q_tok, tid);
  cp_async_commit();

  typename Tr::TiledMma mma;
  auto thr = mma.get_thread_slice(tid);
  Tensor acc_dq = partition_fragment_C(mma, Shape<Int<kBlockM>, Int<kD>>{});
  clear(acc_dq);
  Tensor cS = thr.partition_C(make_identity_tensor(Shape<Int<kBlockM>, Int<kBlockN>>{}));
  Tensor cSrc = make_tensor(cS.data(), rowcol(cS.layout()));
  const float scale2 = p.scale * kLog2e;

  // Stages KV tile `kj` as step j: its row table, then K and V as one cp.async group, into
  // buffer j % kStages.
  auto stage = [&](int j, const int kj[kMaxRank]) {
    const int s = j % kStages;
    for (int r = tid; r < kBlockN; r += kThreads) sm.krows[s][r] = G.k_row(p, kj, r);
    auto k_tok = [&](int r) { return G.kv_token(p, kj, r, ii); };
    load_rows<kBlockN, kD, kThreads>(sm.k[s], SKV{}, k + kv_off, kv_stride, k_tok, tid);
    load_rows<kBlockN, kD, kThreads>(sm.v[s], SKV{}, v + kv_off, kv_stride, k_tok, tid);
    cp_async_commit();
  };
  int kt[kMaxRank];
  box.at(0, kt);
  if (kStages == 2 && box.total > 0) stage(0, kt);
  for (int it = 0; it < box.total; ++it) {
    int kt_next[kMaxRank];
    for (int a = 0; a < kMaxRank; ++a) kt_next[a] = kt[a];
    box.next(kt_next);
    if (kStages == 1) {
      __syncthreads();  // the previous tile's K, V and rows are no longer read
      stage(it, kt);
    }
    // K/V(it) have landed (the only group in flight). With two buffers every thread is
    // also done with step it-1, whose buffer step it+1 fills while step it computes.
    cp_async_wait<0>();
    __syncthreads();
    if (kStages == 2 && it + 1 < box.total) stage(it + 1, kt_next);
    const int s = it % kStages;
    const bool full = sm.fulls.contains(kt);
    const KRow* krows = sm.krows[s];
    Tensor sK = make_tensor(make_smem_ptr(sm.k[s]), SKV{});
    Tensor sKt = make_tensor(make_smem_ptr(sm.k[s]), SKVt{});
    Tensor sV = make_tensor(make_smem_ptr(sm.v[s]), SKV{});

    Tensor acc_s = partition_fragment_C(mma, Shape<Int<kBlockM>, Int<kBlockN>>{});
    clear(acc_s);
    gemm_ss<typename Tr::LdsmN, typename Tr::LdsmN>(mma, acc_s, sQ, sK, tid);
    Tensor acc_dp = partition_fragment_C(mma, Shape<Int<kBlockM>, Int<kBlockN>>{});
    clear(acc_dp);
    gemm_ss<typename Tr::LdsmN, typename Tr::LdsmN>(mma, acc_dp, sdO, sV, tid);
    Tensor rs = make_tensor(acc_s.data(), rowcol(acc_s.layout()));
    Tensor rdp = make_tensor(acc_dp.data(), rowcol(acc_dp.layout()));
    // P for every element, then the mask under one uniform branch: on a mask-free step the
    // exp2s stay straight-line code (a per-element test of `full` made ptxas emit a block per
    // element, ~5 instructions each, and serialised the MUFUs). Masked elements are set to 0,
    // not multiplied, so an exp2 that overflowed there cannot leak.
    CUTE_UNROLL
    for (int mi = 0; mi < size<0>(rs); ++mi) {
      const float lse2 = sm.qrows[get<0>(cSrc(mi, 0))].lse2;
      CUTE_UNROLL
      for (int ni = 0; ni < size<1>(rs); ++ni)
        rs(mi, ni) = fast_exp2(rs(mi, ni) * scale2 - lse2);
    }
    if (!full) {
      CUTE_UNROLL
      for (int mi = 0; mi < size<0>(rs); ++mi) {
        const QRow qr = sm.qrows[get<0>(cSrc(mi, 0))];
        CUTE_UNROLL
        for (int ni = 0; ni < size<1>(rs); ++ni)
          if (!visible(qr, krows[get<1>(cSrc(mi, ni))])) rs(mi, ni) = 0.f;
      }
    }
    CUTE_UNROLL
    for (int mi = 0; mi < size<0>(rs); ++mi) {
      const float delta = sm.qrows[get<0>(cSrc(mi, 0))].delta;
      CUTE_UNROLL
      for (int ni = 0; ni < size<1>(rs); ++ni)
        rs(mi, ni) *= rdp(mi, ni) - delta;  // dS (without the softmax scale)
    }
    Tensor rdS = to_operand_a<T>(acc_s);
    gemm_rs<typename Tr::LdsmT>(mma, acc_dq, rdS, sKt, tid);
    for (int a = 0; a < kMaxRank; ++a) kt[a] = kt_next[a];
  }

  cp_async_wait<0>();
  __syncthreads();
  Tensor cO = thr.partition_C(make_identity_tensor(Shape<Int<kBlockM>, Int<kD>>{}));
  store_rows(make_tensor(acc_dq.data(), rowcol(acc_dq.layout())),
             make_tensor(cO.data(), rowcol(cO.layout())), dq + q_off, q_stride, p.scale,
             [&](int r) { return sm.qrows[r].tok; });
}

// dK/dV: the Q/dO chunk, row table, lse and delta of step `it` in buffer it % kStages; the
// other buffers load the next kStages-1 steps while this one is computed (lse and delta by
// cp.async, so that building a row table never waits on global memory). With kDq, also the
// step's dS^T, the A operand of its dQ GEMM.
template <class Tr, int kBlockN, int kChunk, int kStages, bool kDq>
struct DkdvSmem {
  static_assert(kStages == 2 || kStages == 3, "two or three Q/dO buffers");
  using T = typename Tr::T;
  alignas(128) T k[kBlockN * Tr::kD];
  alignas(128) T v[kBlockN * Tr::kD];
  alignas(128) T q[kStages][kChunk * Tr::kD];
  alignas(128) T dout[kStages][kChunk * Tr::kD];
  alignas(128) T ds[kDq ? kBlockN * kChunk : 8];
  KRow krows[kBlockN];
  QRow qrows[kStages][kChunk];
  float qlse[kStages][kChunk];    // natural-log lse of the chunk's rows (+inf on padding rows)
  float qdelta[kStages][kChunk];  // delta of the chunk's rows (0 on padding rows)
  int full[kStages];              // the step's Q tile needs no element mask
  int head[kStages];              // the step's query head
  Group group;      // the CTA's geometry, kept here rather than in registers (see the kernel)
  FullTiles fulls;  // the Q tiles that see this KV tile in full
  RowTable<kMaxQTokens> qtable;  // token offsets of a Q tile's rows, for tiles inside the frame
};

// The dQ GEMM of a dK/dV step, dQ[kChunk, kD] += dS[kChunk, kBlockN] · K[kBlockN, kD], on
// the dK/dV kernel's warps: as many along the chunk's rows as it has 16-row slabs, the rest
// along D.
template <class Tr, int kChunk>
struct DqStepMma {
  static constexpr int kWarpsM = kChunk / 16;
  static constexpr int kWarpsN = Tr::kWarps / kWarpsM;
  static_assert(kWarpsM * kWarpsN == Tr::kWarps, "the chunk's slabs divide the warps");
  using TiledMma = TiledMMA<MMA_Atom<typename MmaAtomFor<typename Tr::T>::type>,
                            Layout<Shape<Int<kWarpsM>, Int<kWarpsN>, _1>>,
                            Tile<Int<kChunk>, Int<16 * kWarpsN>, _16>>;
  // dS^T stored [kBlockN, kChunk] with the swizzle of a kChunk-wide tile, and seen as dS.
  using DsTraits = Traits<typename Tr::T, kChunk, Tr::kWarps>;
  using SmemDsT = typename DsTraits::template Smem<Tr::kRowsMma>;
  using SmemDs = typename DsTraits::template SmemT<Tr::kRowsMma>;
};

// Adds a float accumulator [rows, kD] (rowcol view) into gathered float32 rows, two columns
// per atomic where the card has vector atomics (sm_90).
template <class Rc, class Crc, class TokFn>
__device__ __forceinline__ void add_rows(Rc const& racc, Crc const& crc, float* base,
                                         int64_t row_stride, TokFn const& tok_of) {
  CUTE_UNROLL
  for (int mi = 0; mi < size<0>(racc); ++mi) {
    const int tok = tok_of(get<0>(crc(mi, 0)));
    if (tok < 0) continue;
    float* row = base + (int64_t)tok * row_stride;
    CUTE_UNROLL
    for (int ni = 0; ni < size<1>(racc); ni += 2) {
      float* dst = row + get<1>(crc(mi, ni));
#if defined(__CUDA_ARCH__) && __CUDA_ARCH__ >= 900
      atomicAdd(reinterpret_cast<float2*>(dst), make_float2(racc(mi, ni), racc(mi, ni + 1)));
#else
      atomicAdd(dst, racc(mi, ni));
      atomicAdd(dst + 1, racc(mi, ni + 1));
#endif
    }
  }
}

template <class Tr, int kBlockN, int kChunk, int kStages, bool kDq>
__global__ void __launch_bounds__(Tr::kThreads)
    dkdv_kernel(const Problem p, const typename Tr::T* __restrict__ q,
                const typename Tr::T* __restrict__ k, const typename Tr::T* __restrict__ v,
                const typename Tr::T* __restrict__ dout, const float* __restrict__ lse,
                const float* __restrict__ delta, typename Tr::T* __restrict__ dk,
                typename Tr::T* __restrict__ dv, float* __restrict__ dq_acc,
                const int* __restrict__ kv_order) {
  using T = typename Tr::T;
  constexpr int kD = Tr::kD;
  constexpr int kThreads = Tr::kThreads;
  static_assert(kBlockN == Tr::kRowsMma, "one 16-row MMA slab per warp");
  static_assert(kMaxQTokens % kChunk == 0, "a tile's chunks end within sm.qtable");
  extern __shared__ __align__(128) char smem_raw[];
  auto& sm = *reinterpret_cast<DkdvSmem<Tr, kBlockN, kChunk, kStages, kDq>*>(smem_raw);
  const int tid = threadIdx.x;
  const int hkv = blockIdx.y;
  const int64_t b = blockIdx.z;

  // The geometry lives in shared memory: the main loop needs it only in per-row and per-step
  // setup, and as registers it would push the dK/dV accumulators into spills (D = 128).
  int kt[kMaxRank];
  {
    Group g0;
    if (!g0.init(p, kv_tile_of_cta(kv_order), /*kv_side=*/true, kt)) return;
    if (tid == 0) {
      sm.group = g0;
      sm.fulls = FullTiles::seeing(g0, p, kt, kBlockN);
    }
    sm.qtable.build(g0, p, /*kv_side=*/false, tid, kThreads);
    __syncthreads();
  }
  const Group& G = sm.group;
  const int group_heads = (int)(p.heads / p.kv_heads);
  const int64_t n_q_tok = q_tokens_of(p);
  const int64_t n_kv_tok = kv_tokens_of(p);
  const int64_t q_stride = p.heads * kD;
  const int64_t kv_stride = p.kv_heads * kD;
  const int64_t kv_off = (b * n_kv_tok * p.kv_heads + hkv) * kD;

  using SKV = typename Tr::template Smem<kBlockN>;
  using SC = typename Tr::template Smem<kChunk>;
  using SCt = typename Tr::template SmemT<kChunk>;
  Tensor sK = make_tensor(make_smem_ptr(sm.k), SKV{});
  Tensor sV = make_tensor(make_smem_ptr(sm.v), SKV{});

  const TileBox box = TileBox::seeing(G, p, kt);
  const int n_chunks = (Group::qprod(p) + kChunk - 1) / kChunk;

  for (int r = tid; r < kBlockN; r += kThreads) sm.krows[r] = G.k_row(p, kt, r);
  int ii[kMaxRank];
  auto k_tok = [&](int r) { return G.kv_token(p, kt, r, ii); };
  load_rows<kBlockN, kD, kThreads>(sm.k, SKV{}, k + kv_off, kv_stride, k_tok, tid);
  load_rows<kBlockN, kD, kThreads>(sm.v, SKV{}, v + kv_off, kv_stride, k_tok, tid);
  cp_async_commit();

  typename Tr::TiledMma mma;
  auto thr = mma.get_thread_slice(tid);
  Tensor acc_dk = partition_fragment_C(mma, Shape<Int<kBlockN>, Int<kD>>{});
  Tensor acc_dv = partition_fragment_C(mma, Shape<Int<kBlockN>, Int<kD>>{});
  clear(acc_dk);
  clear(acc_dv);
  Tensor cS = thr.partition_C(make_identity_tensor(Shape<Int<kBlockN>, Int<kChunk>>{}));
  Tensor cSrc = make_tensor(cS.data(), rowcol(cS.layout()));
  const float scale2 = p.scale * kLog2e;

  const int steps = group_heads * box.total * n_chunks;
  BoxStep ahead = BoxStep::first(box, hkv * group_heads);  // the next step to stage
  // Stages step j (`sj`) into buffer j % kStages: its row table, lse and delta, Q and dO
  // rows, as one cp.async group. Rows of a Q tile inside the frame take their tokens from
  // sm.qtable: the divisions of Group::q_token, done by every thread for each row it
  // gathers, were most of the kernel's instructions.
  auto stage = [&](int j, BoxStep const& sj) {
    const int sb = j % kStages;
    const int64_t stats = b * n_q_tok * p.heads + sj.head;
    const bool full_tile = sm.fulls.contains(sj.qt);
    const bool inside = G.tile_inside(p, sj.qt, /*kv_side=*/false);
    const int base = G.tile_base(p, sj.qt, /*kv_side=*/false);
    const int row0 = sj.chunk * kChunk;  // below kMaxQTokens: kChunk divides it
    auto q_tok = [&](int r) {
      return inside ? sm.qtable.token(base, row0 + r) : G.q_token(p, sj.qt, row0 + r, ii);
    };
    for (int r = tid; r < kChunk; r += kThreads) {
      int tok;
      if (full_tile && inside) {  // the mask is never evaluated: the token is all it needs
        tok = sm.qrows[sb][r].tok = q_tok(r);
      } else {
        const QRow row = inside ? sm.qtable.q_row(G, p, sj.qt, base, row0 + r, !full_tile)
                                : G.q_row(p, sj.qt, row0 + r, /*window=*/!full_tile);
        sm.qrows[sb][r] = row;
        tok = row.tok;
      }
      stage_row_stats(tok, stats, p.heads, lse, delta, sm.qlse[sb][r], sm.qdelta[sb][r]);
    }
    if (tid == 0) sm.full[sb] = full_tile, sm.head[sb] = sj.head;
    const int64_t q_off = (b * n_q_tok * p.heads + sj.head) * kD;
    load_rows<kChunk, kD, kThreads>(sm.q[sb], SC{}, q + q_off, q_stride, q_tok, tid);
    load_rows<kChunk, kD, kThreads>(sm.dout[sb], SC{}, dout + q_off, q_stride, q_tok, tid);
  };
  // One cp.async group per step (after K and V's), committed even when empty, so that "all
  // but the newest kStages-2 groups" always means "up to this step".
  auto stage_next = [&](int j) {
    if (j < steps) {
      stage(j, ahead);
      ahead = ahead.next(box, n_chunks);
    }
    cp_async_commit();
  };
  for (int j = 0; j < kStages - 1; ++j) stage_next(j);
  for (int step = 0; step < steps; ++step) {
    // Step `step` has landed, and every thread is done with step-1, whose buffer step
    // + kStages-1 fills while this step computes.
    cp_async_wait<kStages - 2>();
    __syncthreads();
    stage_next(step + kStages - 1);
    const int sb = step % kStages;
    const bool full = sm.full[sb] != 0;
    const QRow* qrows = sm.qrows[sb];
    const float* qlse = sm.qlse[sb];
    const float* qdelta = sm.qdelta[sb];
    Tensor sQ = make_tensor(make_smem_ptr(sm.q[sb]), SC{});
    Tensor sQt = make_tensor(make_smem_ptr(sm.q[sb]), SCt{});
    Tensor sdO = make_tensor(make_smem_ptr(sm.dout[sb]), SC{});
    Tensor sdOt = make_tensor(make_smem_ptr(sm.dout[sb]), SCt{});
    Tensor acc_s = partition_fragment_C(mma, Shape<Int<kBlockN>, Int<kChunk>>{});
    clear(acc_s);
    gemm_ss<typename Tr::LdsmN, typename Tr::LdsmN>(mma, acc_s, sK, sQ, tid);
    Tensor rs = make_tensor(acc_s.data(), rowcol(acc_s.layout()));
    // P, then the mask under one uniform branch (as in the dK/dV step).
    CUTE_UNROLL
    for (int mi = 0; mi < size<0>(rs); ++mi) {
      CUTE_UNROLL
      for (int ni = 0; ni < size<1>(rs); ++ni)
        rs(mi, ni) = fast_exp2(rs(mi, ni) * scale2 - qlse[get<1>(cSrc(mi, ni))] * kLog2e);
    }
    if (!full) {
      CUTE_UNROLL
      for (int mi = 0; mi < size<0>(rs); ++mi) {
        const KRow kr = sm.krows[get<0>(cSrc(mi, 0))];
        CUTE_UNROLL
        for (int ni = 0; ni < size<1>(rs); ++ni)
          if (!visible(qrows[get<1>(cSrc(mi, ni))], kr)) rs(mi, ni) = 0.f;
      }
    }
    Tensor rP = to_operand_a<T>(acc_s);
    gemm_rs<typename Tr::LdsmT>(mma, acc_dv, rP, sdOt, tid);

    Tensor acc_dp = partition_fragment_C(mma, Shape<Int<kBlockN>, Int<kChunk>>{});
    clear(acc_dp);
    gemm_ss<typename Tr::LdsmN, typename Tr::LdsmN>(mma, acc_dp, sV, sdO, tid);
    Tensor rdp = make_tensor(acc_dp.data(), rowcol(acc_dp.layout()));
    CUTE_UNROLL
    for (int mi = 0; mi < size<0>(rs); ++mi) {
      CUTE_UNROLL
      for (int ni = 0; ni < size<1>(rs); ++ni) {
        const float dl = qdelta[get<1>(cSrc(mi, ni))];
        rdp(mi, ni) = rs(mi, ni) * (rdp(mi, ni) - dl);
      }
    }
    Tensor rdS = to_operand_a<T>(acc_dp);
    if constexpr (kDq) {
      using Dq = DqStepMma<Tr, kChunk>;
      Tensor sdSt = make_tensor(make_smem_ptr(sm.ds), typename Dq::SmemDsT{});
      copy(make_tensor(rdS.data(), acc_dp.layout()), thr.partition_C(sdSt));
    }
    gemm_rs<typename Tr::LdsmT>(mma, acc_dk, rdS, sQt, tid);
    if constexpr (kDq) {
      // Every warp's dS^T slab is stored; the next write of sm.ds follows the next step's
      // first barrier, after every warp's dQ GEMM has read it.
      __syncthreads();
      using Dq = DqStepMma<Tr, kChunk>;
      typename Dq::TiledMma dq_mma;
      Tensor acc_dq = partition_fragment_C(dq_mma, Shape<Int<kChunk>, Int<kD>>{});
      clear(acc_dq);
      gemm_ss<typename Tr::LdsmT, typename Tr::LdsmT>(
          dq_mma, acc_dq, make_tensor(make_smem_ptr(sm.ds), typename Dq::SmemDs{}),
          make_tensor(make_smem_ptr(sm.k), typename Tr::template SmemT<kBlockN>{}), tid);
      Tensor cQ = dq_mma.get_thread_slice(tid).partition_C(
          make_identity_tensor(Shape<Int<kChunk>, Int<kD>>{}));
      const int64_t q_off = (b * n_q_tok * p.heads + sm.head[sb]) * kD;
      add_rows(make_tensor(acc_dq.data(), rowcol(acc_dq.layout())),
               make_tensor(cQ.data(), rowcol(cQ.layout())), dq_acc + q_off, q_stride,
               [&](int r) { return qrows[r].tok; });
    }
  }

  cp_async_wait<0>();  // a KV tile no query sees still waits for its loads, then writes 0
  __syncthreads();
  if (G.kv_pad) {
    // Rows outside the global axis were read as -1 (zero-filled, never seen, so their
    // accumulators are exactly 0); they are still part of dK/dV and are written as 0.
    for (int r = tid; r < kBlockN; r += kThreads)
      sm.krows[r].tok = G.kv_store_token(p, kt, r, ii);
    __syncthreads();
  }
  Tensor cO = thr.partition_C(make_identity_tensor(Shape<Int<kBlockN>, Int<kD>>{}));
  Tensor cOrc = make_tensor(cO.data(), rowcol(cO.layout()));
  auto out_tok = [&](int r) { return sm.krows[r].tok; };
  store_rows(make_tensor(acc_dk.data(), rowcol(acc_dk.layout())), cOrc, dk + kv_off, kv_stride,
             p.scale, out_tok);
  store_rows(make_tensor(acc_dv.data(), rowcol(acc_dv.layout())), cOrc, dv + kv_off, kv_stride,
             1.f, out_tok);
}

}  // namespace sm80
}  // namespace gna
