// Building blocks shared by the sm80 GNA kernels: CuTe tensor-core traits, register GEMMs fed
// by ldmatrix, gathered cp.async tile loads, and the per-CTA dilation-group geometry.
//
// Every tile is a box of group indices (see DESIGN.md §2/§3); its rows are gathered straight
// from the heads-last [B, *spatial, H, D] layout by computing each row's token index, so
// dilation needs no permutation pass. All window arithmetic comes from gna_geometry.h.
#pragma once

#include <cuda_runtime.h>

#include <climits>
#include <cstdint>

#include <cute/tensor.hpp>
#include <cutlass/numeric_types.h>

#include "../gna_geometry.h"
#include "../gna_problem.h"

namespace gna {
namespace sm80 {

using namespace cute;

constexpr float kLog2e = 1.4426950408889634f;
constexpr float kLn2 = 0.6931471805599453f;

template <class T>
struct MmaAtomFor;
template <>
struct MmaAtomFor<cutlass::bfloat16_t> {
  using type = SM80_16x8x16_F32BF16BF16F32_TN;
};
template <>
struct MmaAtomFor<cutlass::half_t> {
  using type = SM80_16x8x16_F32F16F16F32_TN;
};

// Compile-time shapes of one kernel: element type, head dim and the MMA's warp count (each
// warp owns 16 consecutive rows of every accumulator).
template <class T_, int kD_, int kWarps_>
struct Traits {
  using T = T_;
  static constexpr int kD = kD_;
  static constexpr int kWarps = kWarps_;
  static constexpr int kThreads = kWarps * 32;
  static constexpr int kRowsMma = 16 * kWarps;
  using TiledMma = TiledMMA<MMA_Atom<typename MmaAtomFor<T>::type>,
                            Layout<Shape<Int<kWarps>, _1, _1>>,
                            Tile<Int<kRowsMma>, _16, _16>>;
  // 16-byte chunks XOR-swizzled by row so that ldmatrix (8 rows x 16 B) hits 8 distinct
  // bank groups; rows of 32 elements (64 B) need one swizzle bit less.
  static constexpr int kAtomCols = kD == 32 ? 32 : 64;
  using SmemAtom = decltype(composition(
      Swizzle<(kD == 32 ? 2 : 3), 3, 3>{},
      Layout<Shape<_8, Int<kAtomCols>>, Stride<Int<kAtomCols>, _1>>{}));
  // [rows, D] tile, and the same storage seen as [D, rows] (operand B of a GEMM over rows).
  template <int kRows>
  using Smem = decltype(tile_to_shape(SmemAtom{}, Shape<Int<kRows>, Int<kD>>{}));
  template <int kRows>
  using SmemT = decltype(composition(Smem<kRows>{},
                                     make_layout(Shape<Int<kD>, Int<kRows>>{}, GenRowMajor{})));
  using LdsmN = Copy_Atom<SM75_U32x4_LDSM_N, T>;
  using LdsmT = Copy_Atom<SM75_U16x8_LDSM_T, T>;
};

// ---------------------------------------------------------------- register-level helpers

// Accumulator layout ((2 cols, 2 rows), M tiles, N tiles) viewed as (rows, cols).
template <class L>
__device__ __forceinline__ auto rowcol(L const& l) {
  return make_layout(make_layout(get<0, 1>(l), get<1>(l)), make_layout(get<0, 0>(l), get<2>(l)));
}

// Accumulator layout of an m16n8 tile pair viewed as the A operand of an m16n8k16 MMA: two
// neighbouring 8-column accumulator tiles hold exactly the 16 k-values the A fragment needs.
template <class L>
__device__ __forceinline__ auto acc_as_a(L const& l) {
  auto n = logical_divide(get<2>(l), Layout<_2>{});
  return make_layout(make_layout(get<0, 0>(l), get<0, 1>(l), get<0>(n)), get<1>(l), get<1>(n));
}

// Converts a float accumulator into a T fragment laid out as operand A.
template <class T, class Acc>
__device__ __forceinline__ auto to_operand_a(Acc const& acc) {
  Tensor r = make_tensor<T>(acc.layout());
  CUTE_UNROLL
  for (int i = 0; i < size(acc); ++i) r(i) = static_cast<T>(acc(i));
  return make_tensor(r.data(), acc_as_a(r.layout()));
}

// acc[M, N] += A[M, K] · B[N, K]^T with both operands in shared memory, fed by ldmatrix and
// double-buffered in registers over K.
template <class AtomA, class AtomB, class Mma, class Acc, class SA, class SB>
__device__ __forceinline__ void gemm_ss(Mma const& mma, Acc& acc, SA const& sA, SB const& sB,
                                        int tid) {
  auto thr = mma.get_thread_slice(tid);
  Tensor rA = thr.partition_fragment_A(sA);
  Tensor rB = thr.partition_fragment_B(sB);
  auto cpA = make_tiled_copy_A(AtomA{}, mma);
  auto cpB = make_tiled_copy_B(AtomB{}, mma);
  auto tA = cpA.get_thread_slice(tid);
  auto tB = cpB.get_thread_slice(tid);
  Tensor sAp = tA.partition_S(sA);
  Tensor rAv = tA.retile_D(rA);
  Tensor sBp = tB.partition_S(sB);
  Tensor rBv = tB.retile_D(rB);
  constexpr int kK = decltype(size<2>(rA))::value;
  copy(cpA, sAp(_, _, 0), rAv(_, _, 0));
  copy(cpB, sBp(_, _, 0), rBv(_, _, 0));
  CUTE_UNROLL
  for (int kk = 0; kk < kK; ++kk) {
    if (kk + 1 < kK) {
      copy(cpA, sAp(_, _, kk + 1), rAv(_, _, kk + 1));
      copy(cpB, sBp(_, _, kk + 1), rBv(_, _, kk + 1));
    }
    cute::gemm(mma, rA(_, _, kk), rB(_, _, kk), acc);
  }
}

// acc[M, N] += A[M, K] · B[N, K]^T with A already in registers (operand-A layout).
template <class AtomB, class Mma, class Acc, class RA, class SB>
__device__ __forceinline__ void gemm_rs(Mma const& mma, Acc& acc, RA const& rA, SB const& sB,
                                        int tid) {
  auto thr = mma.get_thread_slice(tid);
  Tensor rB = thr.partition_fragment_B(sB);
  auto cpB = make_tiled_copy_B(AtomB{}, mma);
  auto tB = cpB.get_thread_slice(tid);
  Tensor sBp = tB.partition_S(sB);
  Tensor rBv = tB.retile_D(rB);
  constexpr int kK = decltype(size<2>(rA))::value;
  copy(cpB, sBp(_, _, 0), rBv(_, _, 0));
  CUTE_UNROLL
  for (int kk = 0; kk < kK; ++kk) {
    if (kk + 1 < kK) copy(cpB, sBp(_, _, kk + 1), rBv(_, _, kk + 1));
    cute::gemm(mma, rA(_, _, kk), rB(_, _, kk), acc);
  }
}

// 2^x on the MUFU unit, subnormal results flushed to zero. exp2f adds a fix-up for results
// below 2^-126 (three more instructions per call); softmax weights that small are zero to
// every consumer here (bf16/f16 outputs, float32 sums of terms up to 2^kRescaleSlack).
__device__ __forceinline__ float fast_exp2(float x) {
  float y;
  asm("ex2.approx.ftz.f32 %0, %1;" : "=f"(y) : "f"(x));
  return y;
}

// Butterfly over the 4 lanes (a quad) that share an accumulator row.
__device__ __forceinline__ float quad_max(float x) {
  x = fmaxf(x, __shfl_xor_sync(0xffffffffu, x, 1));
  return fmaxf(x, __shfl_xor_sync(0xffffffffu, x, 2));
}
__device__ __forceinline__ float quad_sum(float x) {
  x += __shfl_xor_sync(0xffffffffu, x, 1);
  return x + __shfl_xor_sync(0xffffffffu, x, 2);
}

// ---------------------------------------------------------------- geometry of one CTA

// Tokens per batch element of the Q buffer and of the K/V buffers (Problem's own helpers are
// host-only).
__device__ __forceinline__ int64_t q_tokens_of(Problem const& p) {
  int64_t n = 1;
  for (int a = 0; a < kMaxRank; ++a) n *= p.axes[a].q_length;
  return n;
}
__device__ __forceinline__ int64_t kv_tokens_of(Problem const& p) {
  int64_t n = 1;
  for (int a = 0; a < kMaxRank; ++a) n *= p.axes[a].kv_length;
  return n;
}

// Query side of a tile row: its token (-1 for padding) and its window [start, end) per axis
// in K/V-frame group indices, cut at the end of the K/V frame. Padding rows see the whole
// frame (they are never written back).
struct QRow {
  int start[kMaxRank];
  int end[kMaxRank];
  int tok;
  float lse2;   // backward: lse · log2(e), +inf on padding rows so that P = 0 there
  float delta;  // backward: rowsum(dO · O)
};

// Key side of a tile row: its K/V-frame group index per axis and token (-1 for padding: past
// the frame, or outside the global axis, so that such rows are zero-filled and never seen).
struct KRow {
  int jj[kMaxRank];
  int tok;
};

__device__ __forceinline__ bool visible(QRow const& q, KRow const& k) {
  bool ok = k.tok >= 0;
  CUTE_UNROLL
  for (int a = 0; a < kMaxRank; ++a) ok = ok && k.jj[a] >= q.start[a] && k.jj[a] < q.end[a];
  return ok;
}

// The element masks of a score tile. A mask calls fn(mi, ni, visible) for each (row, column)
// element of the thread's part of the tile (`cSrc` maps them to tile rows, Q side, and
// columns, K/V side); the softmax and the dQ kernels take either kind.

// By row tables: each row's QRow and each column's KRow (a column's KRow is the same for all
// of the thread's rows, so each is loaded once: columns outside, rows inside).
struct RowsMask {
  const QRow* qrows;
  const KRow* krows;

  template <int kRows, int kCols, class CS, class Fn>
  __device__ __forceinline__ void for_each(CS const& cSrc, Fn&& fn) const {
    QRow qr[kRows];
    CUTE_UNROLL
    for (int mi = 0; mi < kRows; ++mi) qr[mi] = qrows[get<0>(cSrc(mi, 0))];
    CUTE_UNROLL
    for (int ni = 0; ni < kCols; ++ni) {
      const KRow kr = krows[get<1>(cSrc(0, ni))];
      CUTE_UNROLL
      for (int mi = 0; mi < kRows; ++mi) fn(mi, ni, visible(qr[mi], kr));
    }
  }
};

// By words: kTiles KV tiles of 64 columns each, tile t's first row at group indices
// origins[t] (kNoTile: no tile). The four threads of a quad hold the same rows, so each builds
// one (row, tile) word and the quad shares them by shuffles; a thread then tests one bit per
// element. This relies on the accumulator layouts of mma.sync and wgmma: a thread's columns
// are its first column c0 (< 8) plus offsets d that put column c0 + d in tile d / 64.
template <int kTiles>
struct BitsMask {
  const QRow* qrows;
  const int (*origins)[4];
  const TileBits* bits;

  template <int kRows, int kCols, class CS, class Fn>
  __device__ __forceinline__ void for_each(CS const& cSrc, Fn&& fn) const {
    constexpr int kWords = kRows * kTiles;
    static_assert(kWords <= 4, "one word per quad lane");
    const int c0 = get<1>(cSrc(0, 0));
    const int lane = threadIdx.x % 32;
    const int mine = lane % 4 % kWords;
    int row = get<0>(cSrc(0, 0));
    CUTE_UNROLL
    for (int mi = 1; mi < kRows; ++mi)
      if (mine / kTiles == mi) row = get<0>(cSrc(mi, 0));
    const uint64_t word = bits->word(qrows[row].start, qrows[row].end, origins[mine % kTiles]);
    const uint32_t lo = (uint32_t)word, hi = (uint32_t)(word >> 32);
    // Each word as two 32-bit halves shifted right by c0: bit d of the pair is column c0 + d.
    // (With 64-bit words in the element tests ptxas serialised the dQ kernel's wgmmas, C7515.)
    uint32_t w[kRows][kTiles][2];
    CUTE_UNROLL
    for (int i = 0; i < kWords; ++i) {
      const int src = (lane & ~3) | i;
      const uint32_t l = __shfl_sync(0xffffffffu, lo, src), h = __shfl_sync(0xffffffffu, hi, src);
      w[i / kTiles][i % kTiles][0] = __funnelshift_r(l, h, c0);
      w[i / kTiles][i % kTiles][1] = h >> c0;
    }
    CUTE_UNROLL
    for (int ni = 0; ni < kCols; ++ni) {
      const int d = get<1>(cSrc(0, ni)) - c0;  // a compile-time offset
      CUTE_UNROLL
      for (int mi = 0; mi < kRows; ++mi)
        fn(mi, ni, (w[mi][d / 64][d % 64 / 32] >> (d % 32) & 1) != 0);
    }
  }
};

// One dilation group of the problem, as a CTA sees it. Tiles are boxes of frame-local group
// indices: Q-side rows live in the Q buffer (global group index = local + qoff), K/V-side
// rows in the K/V buffer (global = local + kvoff). Windows are computed in global group
// indices (clamped to Lg) once per Q row and stored shifted into K/V-frame indices, so that
// the element test compares local indices only. Only per-CTA values are members; anything
// that is a plain field of the Problem (a kernel parameter) is read from there, which keeps
// register pressure down in the backward kernels.
struct Group {
  int g[kMaxRank];       // this CTA's group offset per axis
  int Lg[kMaxRank];      // global group lengths
  int qlen[kMaxRank];    // Q frame group lengths
  int kvlen[kMaxRank];   // K/V frame group lengths
  int qoff[kMaxRank];    // Q frame offsets (group indices)
  int kvoff[kMaxRank];   // K/V frame offsets (group indices, may be negative)
  bool kv_pad;           // the K/V frame reaches outside the global axis on some axis

  // (init, tiling and TileBox::seeing also run on the host: kv_order.cu weighs the tiles.)
  static GNA_HD int qdim(Problem const& p, int a) { return (int)p.q_tile[a]; }
  static GNA_HD int kvdim(Problem const& p, int a) {
    return (int)p.kv_tile[a];
  }
  static __device__ __forceinline__ int qprod(Problem const& p) {
    return (int)(p.q_tile[0] * p.q_tile[1] * p.q_tile[2]);
  }
  static __device__ __forceinline__ int kvprod(Problem const& p) {
    return (int)(p.kv_tile[0] * p.kv_tile[1] * p.kv_tile[2]);
  }

  // In 32-bit arithmetic (gna_geometry.h).
  GNA_HD AxisTilingT<int> tiling(Problem const& p, int a) const {
    const Axis& ax = p.axes[a];
    return AxisTilingT<int>{Lg[a],       (int)ax.kernel, (int)ax.stride, ax.causal,
                            qdim(p, a),  kvdim(p, a),    qoff[a],        qlen[a],
                            kvoff[a],    kvlen[a]};
  }

  // Splits a flat grid index into (dilation group, tile coordinate) for tiles of the Q frame
  // (or the K/V frame if `kv_side`), the tiles in `tile_walk_strides`' order; group 0 is the
  // longest, so its tile count bounds every group's. False if the tile lies past the end of
  // this (shorter) group's frame.
  // `flat` is a grid index (below 2^31), so this runs in 32-bit arithmetic.
  GNA_HD bool init(Problem const& p, int flat, bool kv_side, int tile[kMaxRank]) {
    int n[kMaxRank], len[kMaxRank], kernel[kMaxRank], step[kMaxRank];
    int n_tiles = 1;
    for (int a = 0; a < kMaxRank; ++a) {
      const Axis& ax = p.axes[a];
      const int dim = kv_side ? kvdim(p, a) : qdim(p, a);
      len[a] = group_length<int>((int)(kv_side ? ax.kv_length : ax.q_length),
                                 (int)ax.dilation, 0);
      kernel[a] = (int)ax.kernel;
      n[a] = ceil_div(len[a], dim);
      n_tiles *= n[a];
    }
    tile_walk_strides<int>(n, kernel, len, step);
    const int t = flat % n_tiles;
    int grp = flat / n_tiles;
    bool ok = true;
    kv_pad = false;
    for (int a = kMaxRank - 1; a >= 0; --a) {
      const Axis& ax = p.axes[a];
      const int d = (int)ax.dilation;
      tile[a] = t / step[a] % n[a];
      g[a] = grp % d;
      grp /= d;
      Lg[a] = group_length<int>((int)ax.length, d, g[a]);
      qlen[a] = group_length<int>((int)ax.q_length, d, g[a]);
      kvlen[a] = group_length<int>((int)ax.kv_length, d, g[a]);
      qoff[a] = (int)ax.q_offset / d;
      kvoff[a] = (int)ax.kv_offset / d;
      kv_pad = kv_pad || kvoff[a] < 0 || kvoff[a] + kvlen[a] > Lg[a];
      const int dim = kv_side ? kvdim(p, a) : qdim(p, a);
      ok = ok && tile[a] * dim < (kv_side ? kvlen[a] : qlen[a]);
    }
    return ok;
  }

  // Q buffer token of row `r` of Q tile `coord` (-1 for padding); frame-local group indices
  // per axis go to `ii`.
  __device__ __forceinline__ int q_token(Problem const& p, const int coord[kMaxRank], int r,
                                         int ii[kMaxRank]) const {
    int local[kMaxRank];
    int rem = r;
    for (int a = kMaxRank - 1; a >= 0; --a) {
      local[a] = rem % qdim(p, a);
      rem /= qdim(p, a);
    }
    bool ok = r < qprod(p);
    int tok = 0;
    for (int a = 0; a < kMaxRank; ++a) {
      ii[a] = coord[a] * qdim(p, a) + local[a];
      ok = ok && ii[a] < qlen[a];
      tok = tok * (int)p.axes[a].q_length + ii[a] * (int)p.axes[a].dilation + g[a];
    }
    return ok ? tok : -1;
  }

  // K/V buffer token of row `r` of KV tile `coord` as written by dK/dV: every row of the
  // frame, including rows outside the global axis (-1 only past the frame).
  __device__ __forceinline__ int kv_store_token(Problem const& p, const int coord[kMaxRank],
                                                int r, int jj[kMaxRank]) const {
    int local[kMaxRank];
    int rem = r;
    for (int a = kMaxRank - 1; a >= 0; --a) {
      local[a] = rem % kvdim(p, a);
      rem /= kvdim(p, a);
    }
    bool ok = r < kvprod(p);
    int tok = 0;
    for (int a = 0; a < kMaxRank; ++a) {
      jj[a] = coord[a] * kvdim(p, a) + local[a];
      ok = ok && jj[a] < kvlen[a];
      tok = tok * (int)p.axes[a].kv_length + jj[a] * (int)p.axes[a].dilation + g[a];
    }
    return ok ? tok : -1;
  }

  // K/V buffer token of row `r` of KV tile `coord` as read: -1 also for rows outside the
  // global axis (their contents are arbitrary; loading zeros keeps them out of the GEMMs).
  __device__ __forceinline__ int kv_token(Problem const& p, const int coord[kMaxRank], int r,
                                          int jj[kMaxRank]) const {
    int tok = kv_store_token(p, coord, r, jj);
    if (kv_pad) {
      for (int a = 0; a < kMaxRank; ++a)
        tok = (unsigned)(jj[a] + kvoff[a]) < (unsigned)Lg[a] ? tok : -1;
    }
    return tok;
  }

  // Division-free tokens from per-CTA row tables. A tile that lies inside its frame (and,
  // for K/V reads, inside the global axis) holds token tile_base(coord) + row_offset(r) in
  // row r, and group index coord · dim + local(r) per axis; kernels tabulate row_offset and
  // local once per CTA and take q_token / kv_token for the other tiles. This is the same
  // Horner sum as q_token's, split into its tile and row parts.
  __device__ __forceinline__ int row_offset(Problem const& p, int r, bool kv_side,
                                            int local[kMaxRank]) const {
    int rem = r;
    for (int a = kMaxRank - 1; a >= 0; --a) {
      const int dim = kv_side ? kvdim(p, a) : qdim(p, a);
      local[a] = rem % dim;
      rem /= dim;
    }
    int off = 0;
    for (int a = 0; a < kMaxRank; ++a) {
      const Axis& ax = p.axes[a];
      off = off * (int)(kv_side ? ax.kv_length : ax.q_length) + local[a] * (int)ax.dilation;
    }
    return r < (kv_side ? kvprod(p) : qprod(p)) ? off : -1;
  }

  __device__ __forceinline__ int tile_base(Problem const& p, const int coord[kMaxRank],
                                           bool kv_side) const {
    int tok = 0;
    for (int a = 0; a < kMaxRank; ++a) {
      const Axis& ax = p.axes[a];
      const int dim = kv_side ? kvdim(p, a) : qdim(p, a);
      tok = tok * (int)(kv_side ? ax.kv_length : ax.q_length) +
            coord[a] * dim * (int)ax.dilation + g[a];
    }
    return tok;
  }

  __device__ __forceinline__ bool tile_inside(Problem const& p, const int coord[kMaxRank],
                                              bool kv_side) const {
    bool ok = true;
    for (int a = 0; a < kMaxRank; ++a) {
      const int dim = kv_side ? kvdim(p, a) : qdim(p, a);
      const int lo = coord[a] * dim, hi = lo + dim;
      ok = ok && hi <= (kv_side ? kvlen[a] : qlen[a]);
      if (kv_side && kv_pad) ok = ok && lo + kvoff[a] >= 0 && hi + kvoff[a] <= Lg[a];
    }
    return ok;
  }

  // Row `r` of Q tile `coord`. Without `window` (a Q tile that sees the KV tiles in question
  // in full, so the mask is never evaluated) the window is the whole K/V frame, which skips
  // the window arithmetic (divisions).
  __device__ __forceinline__ QRow q_row(Problem const& p, const int coord[kMaxRank], int r,
                                        bool window = true) const {
    int ii[kMaxRank];
    const int tok = q_token(p, coord, r, ii);
    return q_row_at(p, tok, ii, window);
  }

  // The row of token `tok` (-1: padding) at Q-frame group indices `ii`: its windows shifted
  // into K/V-frame indices, or the whole frame without `window` or for padding.
  // kUnitStrideFast skips the division by a stride of 1 (neighbourhood attention), for the
  // backward's producers, which build these rows on the consumers' path. (The branch made
  // ptxas spill more in the sm90a forward's one-consumer kernels, so not everywhere.)
  template <bool kUnitStrideFast = false>
  __device__ __forceinline__ QRow q_row_at(Problem const& p, int tok, const int ii[kMaxRank],
                                           bool window) const {
    QRow row;
    row.tok = tok;
    for (int a = 0; a < kMaxRank; ++a) {
      if (tok >= 0 && window) {
        const int i = ii[a] + qoff[a], stride = (int)p.axes[a].stride;
        const int base = kUnitStrideFast && stride == 1 ? i : i / stride * stride;
        int s, e;
        window_bounds_at<int>(i, base, Lg[a], (int)p.axes[a].kernel, stride, p.axes[a].causal,
                              &s, &e);
        row.start[a] = s - kvoff[a];
        row.end[a] = min(e - kvoff[a], kvlen[a]);
      } else {
        row.start[a] = 0;
        row.end[a] = kvlen[a];
      }
    }
    row.lse2 = 0.f;
    row.delta = 0.f;
    return row;
  }

  __device__ __forceinline__ KRow k_row(Problem const& p, const int coord[kMaxRank],
                                        int r) const {
    KRow row;
    row.tok = kv_token(p, coord, r, row.jj);
    return row;
  }
};

// Group::row_offset and the tile-local coordinates of the rows of a tile (up to kRows),
// tabulated once per CTA for the division-free row tables of tiles inside the frame.
template <int kRows>
struct RowTable {
  int offset[kRows];
  uint8_t local[kRows][kMaxRank];  // tile dims are at most 128

  __device__ __forceinline__ void build(Group const& G, Problem const& p, bool kv_side,
                                        int tid, int threads) {
    for (int r = tid; r < kRows; r += threads) {
      int loc[kMaxRank];
      offset[r] = G.row_offset(p, r, kv_side, loc);
      for (int a = 0; a < kMaxRank; ++a) local[r][a] = (uint8_t)loc[a];
    }
  }

  // Token of row r of a tile that lies inside its frame (Group::tile_inside) and starts at
  // token `base` (Group::tile_base); -1 for a padding row.
  __device__ __forceinline__ int token(int base, int r) const {
    const int off = offset[r];
    return off < 0 ? -1 : base + off;
  }

  // Group::q_row(p, qt, r, window) for a Q tile `qt` that lies inside (Group::tile_inside)
  // and starts at token `base` (Group::tile_base), without the divisions that find the row's
  // token and coordinates. (In the NA backwards, whose Q tiles are mostly partial, those
  // divisions in the producers' rows of every step cost 9-14 %: docs/PERFORMANCE.md.)
  __device__ __forceinline__ QRow q_row(Group const& G, Problem const& p,
                                        const int qt[kMaxRank], int base, int r,
                                        bool window) const {
    int ii[kMaxRank];
    for (int a = 0; a < kMaxRank; ++a) ii[a] = qt[a] * (int)p.q_tile[a] + local[r][a];
    return G.q_row_at</*kUnitStrideFast=*/true>(p, token(base, r), ii, window);
  }

  // Group::k_row(p, kt, r) for a KV tile `kt` that lies inside (Group::tile_inside) and
  // starts at token `base` (Group::tile_base).
  __device__ __forceinline__ KRow k_row(Problem const& p, const int kt[kMaxRank], int base,
                                        int r) const {
    KRow row;
    row.tok = token(base, r);
    for (int a = 0; a < kMaxRank; ++a) row.jj[a] = kt[a] * (int)p.kv_tile[a] + local[r][a];
    return row;
  }
};

// The flat KV tile (Group::init's index, kv_side) of a dK/dV CTA: its grid index, or where the
// launch ordered the tiles (kv_tile_order, launch.cuh), that order's entry.
__device__ __forceinline__ int kv_tile_of_cta(const int* __restrict__ kv_order) {
  return kv_order != nullptr ? kv_order[blockIdx.x] : (int)blockIdx.x;
}

// Box of tiles [lo, lo + cnt) per axis, walked with the last axis fastest.
struct TileBox {
  int lo[kMaxRank];
  int cnt[kMaxRank];
  int total;

  // The KV tiles that Q tile `qt` of group `G` sees.
  static __device__ __forceinline__ TileBox seen_by(Group const& G, Problem const& p,
                                                   const int qt[kMaxRank]) {
    TileBox box;
    box.total = 1;
    for (int a = 0; a < kMaxRank; ++a) {
      int lo, hi;
      G.tiling(p, a).kv_range(qt[a], &lo, &hi);
      box.lo[a] = lo;
      box.cnt[a] = hi - lo;
      box.total *= box.cnt[a];
    }
    return box;
  }

  // The Q tiles that see KV tile `kt` of group `G` (the backward's dK/dV loop).
  static GNA_HD TileBox seeing(Group const& G, Problem const& p, const int kt[kMaxRank]) {
    TileBox box;
    box.total = 1;
    for (int a = 0; a < kMaxRank; ++a) {
      int lo, hi;
      G.tiling(p, a).q_range(kt[a], &lo, &hi);
      box.lo[a] = lo;
      box.cnt[a] = hi - lo;
      box.total *= box.cnt[a];
    }
    return box;
  }

  __device__ __forceinline__ void at(int i, int out[kMaxRank]) const {
    for (int a = kMaxRank - 1; a >= 0; --a) {
      out[a] = lo[a] + i % cnt[a];
      i /= cnt[a];
    }
  }

  // Moves `kt` from tile i of the box to tile i+1 (the order of `at`, without its divisions);
  // from the last tile it wraps to the first. Kernels walk their steps with it: decoding
  // every step with `at` costs ~100 instructions in the warps that run the GEMMs (or in a
  // producer warp that the GEMMs wait for).
  __device__ __forceinline__ void next(int kt[kMaxRank]) const {
    for (int a = kMaxRank - 1; a >= 0; --a) {
      if (++kt[a] < lo[a] + cnt[a]) return;
      kt[a] = lo[a];
    }
  }
};

// A step of the backward's dK/dV loop over the Q tiles that see a KV tile: chunks of a Q
// tile's rows fastest, then the tiles of the box, then the query heads of the KV head.
struct BoxStep {
  int qt[kMaxRank];  // Q tile
  int tile;          // its index in the box
  int chunk;         // rows chunk·N .. of the tile
  int head;          // query head

  static __device__ __forceinline__ BoxStep first(TileBox const& box, int head) {
    BoxStep s;
    box.at(0, s.qt);
    s.tile = s.chunk = 0;
    s.head = head;
    return s;
  }
  // The step after this one (past the last step the walk wraps to the next head).
  __device__ __forceinline__ BoxStep next(TileBox const& box, int n_chunks) const {
    BoxStep n = *this;
    if (++n.chunk < n_chunks) return n;
    n.chunk = 0;
    box.next(n.qt);
    if (++n.tile < box.total) return n;
    n.tile = 0;
    ++n.head;
    return n;
  }
};

// The KV tiles that Q tile `qt` sees in full (AxisTiling::full_range per axis), or the Q
// tiles that see KV tile `kt` in full: computed once per CTA so that the per-tile test is a
// few integer comparisons instead of window arithmetic in divisions.
struct FullTiles {
  int lo[kMaxRank];
  int hi[kMaxRank];
  bool dense;  // KV tiles hold exactly the kernel's KV rows (no padding rows)

  static __device__ __forceinline__ FullTiles of(Group const& G, Problem const& p,
                                                 const int qt[kMaxRank], int kv_rows) {
    FullTiles f;
    f.dense = Group::kvprod(p) == kv_rows;
    for (int a = 0; a < kMaxRank; ++a) {
      int lo, hi;
      G.tiling(p, a).full_range(qt[a], &lo, &hi);
      f.lo[a] = lo;
      f.hi[a] = hi;
    }
    return f;
  }

  // The Q tiles that see KV tile `kt` in full (AxisTiling::full_q_range per axis); KV tile
  // `kt` must hold exactly `kv_rows` rows.
  static __device__ __forceinline__ FullTiles seeing(Group const& G, Problem const& p,
                                                     const int kt[kMaxRank], int kv_rows) {
    FullTiles f;
    f.dense = Group::kvprod(p) == kv_rows;
    for (int a = 0; a < kMaxRank; ++a) {
      int lo, hi;
      G.tiling(p, a).full_q_range(kt[a], &lo, &hi);
      f.lo[a] = lo;
      f.hi[a] = hi;
    }
    return f;
  }

  __device__ __forceinline__ bool contains(const int kt[kMaxRank]) const {
    bool ok = dense;
    for (int a = 0; a < kMaxRank; ++a) ok = ok && kt[a] >= lo[a] && kt[a] < hi[a];
    return ok;
  }

  // Every tile of `box` is full.
  __device__ __forceinline__ bool covers(TileBox const& box) const {
    bool ok = dense;
    for (int a = 0; a < kMaxRank; ++a)
      ok = ok && box.lo[a] >= lo[a] && box.lo[a] + box.cnt[a] <= hi[a];
    return ok;
  }
};

// Gathers a [kRows, kD] tile into shared memory with cp.async (16 B per copy, zero fill for
// padding rows). `dst(r, c)` is the shared-memory address of element (r, c), c a multiple of
// 8 (any layout that keeps 8 consecutive columns contiguous, e.g. a 16-byte swizzle);
// `tok_of(r)` gives row r's token or -1; `row_stride` is the element distance between
// consecutive tokens (heads · D, below 2^32).
//
// Each thread copies one 16-byte column chunk of every (kThreads / (kD / 8))-th row. The
// layouts used here are swizzled within 1024-byte periods and advance by whole periods over
// that many rows, so the thread's destinations are its first one plus a fixed distance: the
// address arithmetic runs once per call, not per copy (it was most of the staging's
// instructions). Each copy is a cp.async with an ignore-src predicate (zeros for padding
// rows) from an address of one wide multiply-add: ~10 SASS instructions per copy, where
// CuTe's ZFILL copy from a selected address took ~18.

// 16 bytes from global `src` into shared `dst` by cp.async (cached in L2 only), or 16 zero
// bytes where `zero` (the source is then not read).
__device__ __forceinline__ void cp_async_16_or_zero(void* dst, const void* src, bool zero) {
  const uint32_t d = static_cast<uint32_t>(__cvta_generic_to_shared(dst));
  asm volatile(
      "{\n .reg .pred z;\n setp.ne.b32 z, %2, 0;\n"
      " cp.async.cg.shared.global [%0], [%1], 16, z;\n}\n" ::"r"(d),
      "l"(src), "r"((int)zero));
}

// gather_rows from kCopies sources at once (the K and V rows of the same tokens): each row's
// token is read and clamped once, and source s's destinations are `dst_offset[s]` elements
// after dst's.
template <int kRows, int kD, int kThreads, int kCopies, class T, class DstFn, class TokFn>
__device__ __forceinline__ void gather_rows_from(DstFn const& dst,
                                                 const T* const (&bases)[kCopies],
                                                 const ptrdiff_t (&dst_offset)[kCopies],
                                                 int64_t row_stride, TokFn const& tok_of,
                                                 int tid) {
  constexpr int kChunks = kD / 8;
  static_assert(kThreads % kChunks == 0, "threads must cover whole rows");
  constexpr int kRowsPerPass = kThreads / kChunks;
  static_assert(kRows % kRowsPerPass == 0 || kRows < kRowsPerPass, "whole passes");
  // The fixed distance between a thread's destinations holds for passes of whole swizzle
  // periods (8 rows of 128-byte swizzled tiles): fewer rows per pass need narrower tiles.
  static_assert(kRowsPerPass % 8 == 0 || kRows <= kRowsPerPass, "passes of whole periods");
  const int c = tid % kChunks;
  const int r0 = tid / kChunks;
  T* const to = dst(r0, c * 8);
  const ptrdiff_t pass = kRows > kRowsPerPass ? dst(r0 + kRowsPerPass, c * 8) - to : 0;
  const char* from_bytes[kCopies];
  CUTE_UNROLL
  for (int s = 0; s < kCopies; ++s) from_bytes[s] = reinterpret_cast<const char*>(bases[s] + c * 8);
  // Byte distance between tokens: heads · D · sizeof(T), far below 2^32.
  const uint32_t stride_bytes = (uint32_t)row_stride * (uint32_t)sizeof(T);
  CUTE_UNROLL
  for (int i = 0; i * kRowsPerPass < kRows; ++i) {
    if (kRows < kRowsPerPass && r0 >= kRows) break;
    const int tok = tok_of(r0 + i * kRowsPerPass);
    // Padding rows point at token 0 (a valid address) and copy zeros.
    const uint64_t off = (uint64_t)(uint32_t)max(tok, 0) * stride_bytes;
    CUTE_UNROLL
    for (int s = 0; s < kCopies; ++s)
      cp_async_16_or_zero(to + i * pass + dst_offset[s], from_bytes[s] + off, tok < 0);
  }
}

template <int kRows, int kD, int kThreads, class T, class DstFn, class TokFn>
__device__ __forceinline__ void gather_rows(DstFn const& dst, const T* base, int64_t row_stride,
                                            TokFn const& tok_of, int tid) {
  const T* const bases[1] = {base};
  const ptrdiff_t offsets[1] = {0};
  gather_rows_from<kRows, kD, kThreads, 1>(dst, bases, offsets, row_stride, tok_of, tid);
}

// gather_rows into a [kRows, kD] tile of `smem` laid out by `sl`.
template <int kRows, int kD, int kThreads, class T, class SLayout, class TokFn>
__device__ __forceinline__ void load_rows(T* smem, SLayout const& sl, const T* base,
                                          int64_t row_stride, TokFn const& tok_of, int tid) {
  gather_rows<kRows, kD, kThreads>([&](int r, int c) { return smem + sl(r, c); }, base,
                                   row_stride, tok_of, tid);
}

// A backward step's per-row statistics into shared memory: lse and delta of the Q row with
// token `tok` (entries `at` of the CTA's batch and head, `heads` apart) by cp.async, or
// lse = +inf (so that P = 0) and delta = 0 on padding rows.
__device__ __forceinline__ void stage_row_stats(int tok, int64_t stats, int64_t heads,
                                                const float* lse, const float* delta,
                                                float& lse_dst, float& delta_dst) {
  if (tok >= 0) {
    const int64_t at = stats + (int64_t)tok * heads;
    SM80_CP_ASYNC_CACHEALWAYS<float>::copy(lse[at], lse_dst);
    SM80_CP_ASYNC_CACHEALWAYS<float>::copy(delta[at], delta_dst);
  } else {
    lse_dst = INFINITY;
    delta_dst = 0.f;
  }
}

// ---------------------------------------------------------------- forward softmax and output

// op(...op(op(at(0), at(1)), at(2))..., at(kN - 1)) for an associative `op`, kept in kChains
// interleaved partial results that are combined pairwise at the end: kN / kChains dependent
// steps plus log2(kChains), instead of kN - 1, so that each instruction waits less for the
// one before it.
template <int kChains, int kN, class At, class Op>
__device__ __forceinline__ float chained_reduce(At const& at, Op const& op) {
  static_assert(kN % kChains == 0 && (kChains & (kChains - 1)) == 0,
                "kChains is a power of two that divides kN");
  float part[kChains];
  CUTE_UNROLL
  for (int c = 0; c < kChains; ++c) part[c] = at(c);
  CUTE_UNROLL
  for (int i = kChains; i < kN; ++i) part[i % kChains] = op(part[i % kChains], at(i));
  CUTE_UNROLL
  for (int w = kChains / 2; w >= 1; w /= 2) {
    CUTE_UNROLL
    for (int c = 0; c < w; ++c) part[c] = op(part[c], part[c + w]);
  }
  return part[0];
}

// One online-softmax step of a forward over a tile of scores, for the rows this thread
// holds. `rs` (scores) is a register tensor seen as (rows, cols), as rowcol() gives it for
// mma.sync and the sm90 kernels' gmma_rowcol for wgmma; `cSrc` maps its elements to (row, col)
// of the tile. Scores go to log2 units, are masked element-wise by `mask` (RowsMask or
// BitsMask) unless `full`, and become exp2(score - running max); the running sums are updated
// and `corr` receives the factor by which the output accumulator must be rescaled before this
// tile's P·V is added to it.
// kFoldScale: see below (on in the sm90a forwards, where it measured 1.02-1.03x, and in the
// sm80 forward with two KV tiles per step, 1.05x; with one tile per step it had been 0.99x).
// kChains: the row max and row sum are kept in that many interleaved partial results
// (chained_reduce). H200, forward: 4 gained 1-3 % in the sm80 kernel (1-D 3.5 %) and cost up
// to 5-8 % in the sm90a one on the NA and 64-token-tile problems (8 no better), which keeps 1.
// kLazyRescale: the running max (the exp2 base) moves only when some row of the warp would
// exceed it by more than kRescaleSlack, so that most steps leave the output accumulator
// alone. Exact: the output and the sums share the base, and the epilogue divides one by the
// other; P is then at most 2^kRescaleSlack, which bf16/f16 and the float32 sums hold as well.
// Returns whether `corr` holds factors to apply (false: all are 1, skip the rescale). The
// decision is uniform over the warp.
constexpr float kRescaleSlack = 8.f;
template <bool kFoldScale, bool kLazyRescale = false, int kChains = 1, int kRows, class RS,
          class CS, class Mask>
__device__ __forceinline__ bool softmax_step(RS& rs, CS const& cSrc, float (&row_max)[kRows],
                                             float (&row_sum)[kRows], float (&corr)[kRows],
                                             bool full, Mask const& mask, float scale2) {
  // With kFoldScale, scores go to log2 units as late as possible: a positive scale keeps
  // their order, so the row max is taken on the raw scores and scaled once, and the exp2's
  // argument is one FFMA per score (`post`). Otherwise every score is multiplied first.
  constexpr int kCols = decltype(size<1>(rs))::value;
  const bool fold = kFoldScale && scale2 > 0.f;
  const float post = fold ? scale2 : 1.f;
  if (!fold) {
    CUTE_UNROLL
    for (int i = 0; i < size(rs); ++i) rs(i) *= scale2;
  }
  // Masked scores to -inf.
  if (!full) {
    mask.template for_each<kRows, decltype(size<1>(rs))::value>(
        cSrc, [&](int mi, int ni, bool vis) { rs(mi, ni) = vis ? rs(mi, ni) : -INFINITY; });
  }
  // Row mi's exp2 and sums, with its new max or (keep) its old base.
  auto finish_row = [&](int mi, float new_max, bool keep) {
    const float mx = keep ? row_max[mi] : new_max;
    // A row with no visible key so far keeps max = -inf; subtract 0 then (exp2(-inf) = 0).
    const float base = mx == -INFINITY ? 0.f : mx;
    corr[mi] = keep ? 1.f : fast_exp2(row_max[mi] - base);
    row_max[mi] = mx;
    CUTE_UNROLL
    for (int ni = 0; ni < kCols; ++ni) rs(mi, ni) = fast_exp2(fmaf(rs(mi, ni), post, -base));
    const float sum = chained_reduce<kChains, kCols>(
        [&](int ni) { return rs(mi, ni); }, [](float a, float b) { return a + b; });
    row_sum[mi] = keep ? row_sum[mi] + sum : row_sum[mi] * corr[mi] + sum;
  };
  float new_max[kRows];
  bool keep = true;
  CUTE_UNROLL
  for (int mi = 0; mi < kRows; ++mi) {
    const float mx = chained_reduce<kChains, kCols>(
        [&](int ni) { return rs(mi, ni); }, [](float a, float b) { return fmaxf(a, b); });
    new_max[mi] = fmaxf(row_max[mi], quad_max(mx) * post);
    // -inf + slack is -inf: a row that saw no key keeps its base only while it still sees none.
    if constexpr (kLazyRescale) keep = keep && new_max[mi] <= row_max[mi] + kRescaleSlack;
    else finish_row(mi, new_max[mi], false);
  }
  if constexpr (kLazyRescale) {
    keep = __all_sync(0xffffffffu, keep);
    CUTE_UNROLL
    for (int mi = 0; mi < kRows; ++mi) finish_row(mi, new_max[mi], keep);
    return !keep;
  }
  return true;
}

// Output accumulator rows (seen as (rows, cols)) times their correction factors.
template <int kRows, class RO>
__device__ __forceinline__ void rescale_rows(RO& ro, const float (&corr)[kRows]) {
  CUTE_UNROLL
  for (int mi = 0; mi < kRows; ++mi) {
    CUTE_UNROLL
    for (int ni = 0; ni < size<1>(ro); ++ni) ro(mi, ni) *= corr[mi];
  }
}

// softmax_step with the output accumulator `ro` rescaled at once.
template <bool kFoldScale, int kChains, int kRows, class RS, class RO, class CS, class Mask>
__device__ __forceinline__ void online_softmax(RS& rs, RO& ro, CS const& cSrc,
                                               float (&row_max)[kRows], float (&row_sum)[kRows],
                                               bool full, Mask const& mask, float scale2) {
  float corr[kRows];
  softmax_step<kFoldScale, /*kLazyRescale=*/false, kChains>(rs, cSrc, row_max, row_sum, corr,
                                                             full, mask, scale2);
  rescale_rows(ro, corr);
}

// Row mi of the thread's part of O, normalised by `inv`, in dtype T at `row` (the address of
// the thread's first column). Consecutive value pairs are adjacent columns: each pair is one
// 32-bit store, with an immediate offset.
template <class T, class RO, class CO>
__device__ __forceinline__ void normalised_row(RO const& ro, CO const& cOrc, int mi, float inv,
                                               T* row) {
  const int c0 = get<1>(cOrc(mi, 0));
  CUTE_UNROLL
  for (int ni = 0; ni < size<1>(ro); ni += 2) {
    const int dc = get<1>(cOrc(mi, ni)) - c0;  // a compile-time offset
    T pair[2] = {static_cast<T>(ro(mi, ni) * inv), static_cast<T>(ro(mi, ni + 1) * inv)};
    *reinterpret_cast<uint32_t*>(row + dc) = *reinterpret_cast<uint32_t*>(pair);
  }
}

// The natural-log LSE of a row from its running max (log2 units) and sum; -inf for a row
// that saw no key.
__device__ __forceinline__ float lse_of(float row_max, float sum) {
  return sum > 0.f ? (row_max + log2f(sum)) * kLn2 : -INFINITY;
}

// The staging block of a warp's 16 rows of O in store_out_lse_staged.
template <int kD>
struct StagedOut {
  static constexpr int kStageRows = 16;
  static constexpr int kStagePitch = kD + 8;
  static constexpr int kStageElems = kStageRows * kStagePitch;
};

// The second half of a staged epilogue: a warp's 16 staged rows of O (`chunk(r, c)` the
// address of 16-byte chunk c of row r, rows `row0`.. of the tile) to their tokens' rows of
// `ob`, 16 bytes per lane, whole rows per instruction; rows of token -1 are padding.
template <int kD, class T, class ChunkAt>
__device__ __forceinline__ void copy_staged_rows(const QRow* qrows, int row0, T* ob,
                                                 int64_t q_stride, ChunkAt const& chunk,
                                                 int lane) {
  constexpr int kSlab = StagedOut<kD>::kStageRows;
  constexpr int kChunks = kD / 8;  // 16-byte chunks per row
  static_assert(32 % kChunks == 0 && kSlab % (32 / kChunks) == 0, "whole rows per pass");
  const int c = lane % kChunks;
  CUTE_UNROLL
  for (int r = lane / kChunks; r < kSlab; r += 32 / kChunks) {
    const int tok = qrows[row0 + r].tok;
    if (tok >= 0)
      *reinterpret_cast<uint4*>(ob + (int64_t)tok * q_stride + c * 8) =
          *reinterpret_cast<const uint4*>(chunk(r, c));
  }
}

// A forward's epilogue for a warp that holds 16 whole rows of O (an mma.sync slab): O
// normalised by the row sums (input dtype) and lse (natural log, -inf for rows that saw no
// key) for valid rows; `ob` and `lb` point at the CTA's batch and head, tokens `heads` lse
// entries apart. The warp writes its rows into its own `stage` block of kStageRows ×
// kStagePitch elements (the pad puts the 8 rows of a store's quads on distinct banks), then
// copies them out 16 bytes per lane, whole rows per instruction (copy_staged_rows): 4-byte
// scattered stores from the registers took ~2.8 µs per 128-row sm80 CTA (fwd_trace.cuh,
// H200). `stage` must be 16-byte aligned and read by no other warp meanwhile.
template <int kD, int kRows, class T, class RO, class CO>
__device__ __forceinline__ void store_out_lse_staged(RO const& ro, CO const& cOrc,
                                                     const float (&row_max)[kRows],
                                                     const float (&row_sum)[kRows],
                                                     const QRow* qrows, T* ob, float* lb,
                                                     int64_t q_stride, int64_t heads, T* stage,
                                                     int lane) {
  constexpr int kPitch = StagedOut<kD>::kStagePitch;
  constexpr int kSlab = StagedOut<kD>::kStageRows;
  const int row0 = get<0>(cOrc(0, 0)) / kSlab * kSlab;  // the warp's first row
  CUTE_UNROLL
  for (int mi = 0; mi < kRows; ++mi) {
    const float sum = quad_sum(row_sum[mi]);
    const float inv = sum > 0.f ? 1.f / sum : 0.f;
    const int r = get<0>(cOrc(mi, 0));
    normalised_row(ro, cOrc, mi, inv, stage + (r - row0) * kPitch + get<1>(cOrc(mi, 0)));
    const int tok = qrows[r].tok;
    if (tok >= 0 && lane % 4 == 0) lb[(int64_t)tok * heads] = lse_of(row_max[mi], sum);
  }
  __syncwarp();
  copy_staged_rows<kD>(qrows, row0, ob, q_stride,
                       [&](int r, int c) { return stage + r * kPitch + c * 8; }, lane);
}

__device__ __forceinline__ void cp_async_commit() { cp_async_fence(); }

}  // namespace sm80
}  // namespace gna
