// GNA semantics and tile geometry for native code: a port of jax_gna/geometry.py.
//
// Host and device code both include this header (the CPU handler, kernel launch parameters
// and the kernels' own loops). tests/test_native_geometry.py checks that it agrees with the
// Python module tile for tile. Keep the two in step: change one, change both.
#pragma once

#include <cstdint>

#if defined(__CUDACC__)
#define GNA_HD __host__ __device__ __forceinline__
#else
#define GNA_HD inline
#endif

namespace gna {

constexpr int kMaxRank = 3;

// One spatial axis of a validated problem. `length` is the global axis; the Q buffer covers
// global positions [q_offset, q_offset + q_length) and the K/V buffers cover
// [kv_offset, kv_offset + kv_length) (a frame, see notes/FRAMES.md): windows are computed in
// global coordinates, buffers are indexed locally. K/V rows outside [0, length) are padding:
// never visible, their dk/dv are 0. Offsets are multiples of `dilation`, so a local index has
// the dilation residue of its global position. Unused axes (rank < 3) are
// unframed_axis(1, 1, 1, 1, false).
struct Axis {
  int64_t length;
  int64_t kernel;
  int64_t stride;
  int64_t dilation;
  bool causal;
  int64_t q_offset;
  int64_t q_length;
  int64_t kv_offset;
  int64_t kv_length;
};

// An axis whose Q and K/V buffers both hold the whole axis (no frame).
GNA_HD Axis unframed_axis(int64_t length, int64_t kernel, int64_t stride, int64_t dilation,
                          bool causal) {
  return Axis{length, kernel, stride, dilation, causal, 0, length, 0, length};
}

// The arithmetic below is written once for an integer type I: int64_t on the host, int in
// the kernels, whose every axis, tile and group index fits 32 bits (sm80_supports checks the
// lengths; a 64-bit division costs the kernels' geometry several times a 32-bit one, at the
// start of every CTA).
//
// The type of the other arguments follows the one deduced from the first (or from the
// result pointers): mixed int/int64_t calls convert instead of failing to deduce.
template <class I>
struct NoDeduceT {
  using type = I;
};
template <class I>
using NoDeduce = typename NoDeduceT<I>::type;

template <class I>
GNA_HD I ceil_div(I a, NoDeduce<I> b) { return (a + b - 1) / b; }
template <class I>
GNA_HD I min_of(I a, I b) { return a < b ? a : b; }
template <class I>
GNA_HD I max_of(I a, I b) { return a > b ? a : b; }

// Tokens in dilation group `g` of an axis.
template <class I>
GNA_HD I group_length(I length, NoDeduce<I> dilation, NoDeduce<I> g) {
  return (length - g + dilation - 1) / dilation;
}

// Window [start, end) in group indices of the query at group index `ii` (see DESIGN.md §2),
// given the first index of its stride group, `base` = ii / stride · stride.
template <class I>
GNA_HD void window_bounds_at(NoDeduce<I> ii, NoDeduce<I> base, NoDeduce<I> group_len,
                             NoDeduce<I> kernel, NoDeduce<I> stride, bool causal, I* start,
                             I* end) {
  if (causal) {
    const I lead = min_of<I>(base + stride - 1, group_len - 1);
    *start = max_of<I>(lead - kernel + 1, 0);
    *end = ii + 1;
  } else {
    const I lead = min_of<I>(base + stride / 2, group_len - 1);
    *start = max_of<I>(0, min_of<I>(lead - kernel / 2, group_len - kernel));
    *end = *start + kernel;
  }
}

// Window [start, end) in group indices of the query at group index `ii` (see DESIGN.md §2).
template <class I>
GNA_HD void window_bounds(NoDeduce<I> ii, NoDeduce<I> group_len, NoDeduce<I> kernel,
                          NoDeduce<I> stride, bool causal, I* start, I* end) {
  window_bounds_at<I>(ii, (ii / stride) * stride, group_len, kernel, stride, causal, start, end);
}

// Whether every KV tile of `kv_tile` group indices, in every dilation group of the axis, lies
// inside the K/V frame and the global axis: the groups have one length, which is a whole
// number of tiles, and the frame does not reach outside the axis (offsets are multiples of
// the dilation).
GNA_HD bool kv_tiles_inside(const Axis& ax, int64_t kv_tile) {
  const int64_t d = ax.dilation;
  return ax.kv_length % d == 0 && ax.length % d == 0 && ax.kv_length / d % kv_tile == 0 &&
         ax.kv_offset >= 0 && ax.kv_offset + ax.kv_length <= ax.length;
}

// Whether group index `ii` sees group index `jj` (both inside a group of `group_len`).
GNA_HD bool in_window(int64_t ii, int64_t jj, int64_t group_len, int64_t kernel,
                      int64_t stride, bool causal) {
  int64_t start, end;
  window_bounds(ii, group_len, kernel, stride, causal, &start, &end);
  return jj >= start && jj < end;
}

// Tiling of one dilation-group axis. `length` is the global group length (windows clamp at
// its borders); the Q frame is local group indices t <-> global t + q_offset, t < q_len, cut
// into Q tiles of `q_tile`; the KV frame is local u <-> global u + kv_offset, u < kv_len, cut
// into KV tiles of `kv_tile`. Offsets are in group units (token offset / dilation); kv_offset
// may be negative. A valid frame (frame_error) keeps every window of every Q-frame query
// inside the KV frame. Unframed: q_offset = kv_offset = 0, q_len = kv_len = length.
template <class I>
struct AxisTilingT {
  I length;
  I kernel;
  I stride;
  bool causal;
  I q_tile;
  I kv_tile;
  I q_offset;
  I q_len;
  I kv_offset;
  I kv_len;

  GNA_HD I n_q() const { return ceil_div(q_len, q_tile); }
  GNA_HD I n_kv() const { return ceil_div(kv_len, kv_tile); }

  // Global windows of the first and last valid query of Q tile `qt`.
  GNA_HD void tile_windows(I qt, I* s0, I* e0, I* s1, I* e1) const {
    const I first = qt * q_tile;
    const I last = min_of<I>(first + q_tile, q_len) - 1;
    window_bounds(first + q_offset, length, kernel, stride, causal, s0, e0);
    window_bounds(last + q_offset, length, kernel, stride, causal, s1, e1);
  }

  // KV tiles [lo, hi) seen by Q tile `qt`. Window bounds are non-decreasing in the query
  // index, so the first query's start and the last valid query's end bound the range.
  GNA_HD void kv_range(I qt, I* lo, I* hi) const {
    I s0, e0, s1, e1;
    tile_windows(qt, &s0, &e0, &s1, &e1);
    *lo = (s0 - kv_offset) / kv_tile;
    *hi = ceil_div(e1 - kv_offset, kv_tile);
  }

  // KV tiles [lo, hi) whose every key every valid query of Q tile `qt` sees, within the KV
  // frame (no padding): the keys [last query's start, first query's end) cut to whole tiles.
  // Kernels compute this once per Q tile, then test tiles with two comparisons.
  GNA_HD void full_range(I qt, I* lo, I* hi) const {
    I s0, e0, s1, e1;
    tile_windows(qt, &s0, &e0, &s1, &e1);
    *lo = ceil_div(max_of<I>(s1 - kv_offset, 0), kv_tile);
    *hi = max_of<I>(min_of<I>(e0 - kv_offset, kv_len), 0) / kv_tile;
  }

  // True iff every valid query of Q tile `qt` sees every key of KV tile `kt` and the KV
  // tile holds no padding: such a pair runs without an element mask.
  GNA_HD bool full(I qt, I kt) const {
    I lo, hi;
    full_range(qt, &lo, &hi);
    return kt >= lo && kt < hi;
  }

  // Q tiles [lo, hi) that see KV tile `kt` (the backward's loop). kv_range's bounds are
  // non-decreasing in qt, so two binary searches find the ends.
  GNA_HD void q_range(I kt, I* lo, I* hi) const {
    const I n = n_q();
    I a = 0, b = n;  // first qt with kv_hi(qt) > kt
    while (a < b) {
      const I m = (a + b) / 2;
      I l, h;
      kv_range(m, &l, &h);
      if (h > kt) b = m; else a = m + 1;
    }
    I c = a, d = n;  // first qt with kv_lo(qt) > kt
    while (c < d) {
      const I m = (c + d) / 2;
      I l, h;
      kv_range(m, &l, &h);
      if (l > kt) d = m; else c = m + 1;
    }
    *lo = a;
    *hi = a < c ? c : a;
  }

  // Q tiles [lo, hi) that see KV tile `kt` in full (full(qt, kt) holds exactly there): the
  // bounds of full_range are non-decreasing in qt, so two binary searches find the ends.
  GNA_HD void full_q_range(I kt, I* lo, I* hi) const {
    const I n = n_q();
    I a = 0, b = n;  // first qt with full hi > kt
    while (a < b) {
      const I m = (a + b) / 2;
      I l, h;
      full_range(m, &l, &h);
      if (h > kt) b = m; else a = m + 1;
    }
    I c = a, d = n;  // first qt with full lo > kt
    while (c < d) {
      const I m = (c + d) / 2;
      I l, h;
      full_range(m, &l, &h);
      if (l > kt) d = m; else c = m + 1;
    }
    *lo = a;
    *hi = c;
  }
};
using AxisTiling = AxisTilingT<int64_t>;

// The tiling of a group axis of `length` with no frame.
GNA_HD AxisTiling unframed_tiling(int64_t length, int64_t kernel, int64_t stride, bool causal,
                                  int64_t q_tile, int64_t kv_tile) {
  return AxisTiling{length, kernel, stride, causal, q_tile, kv_tile, 0, length, 0, length};
}

// The tiling of dilation group `g` of a (framed) axis.
GNA_HD AxisTiling group_tiling(const Axis& ax, int64_t g, int64_t q_tile, int64_t kv_tile) {
  const int64_t d = ax.dilation;
  return AxisTiling{group_length(ax.length, d, g), ax.kernel, ax.stride, ax.causal,
                    q_tile, kv_tile, ax.q_offset / d, group_length(ax.q_length, d, g),
                    ax.kv_offset / d, group_length(ax.kv_length, d, g)};
}

// The order in which a kernel's grid walks the tiles of one dilation group: the stride of
// axis a's tile coordinate in the walk index, given `n` tiles per axis over group axes of
// `length` with windows of `kernel`. Axes are nested by the share of their length that a
// window covers, the smallest share slowest; ties keep the axis order (axis 0 slowest).
// Why: the CTAs in flight then cover a slab that is thin along the axis whose windows are
// narrowest, so the other side's rows that they read stay in L2 between their visits. For
// the backward of 30x48x80 with windows 18x24x24 (CTAs walk KV tiles and read Q, dO and dQ)
// an LRU model of a 40 MB L2 puts the hit rate at 95 % with axis 2 slowest against 71 % with
// axis 0 slowest (ncu measured 69.5 % for the latter).
template <class I>
GNA_HD void tile_walk_strides(const I n[kMaxRank], const I kernel[kMaxRank],
                              const I length[kMaxRank], I stride[kMaxRank]) {
  for (int a = 0; a < kMaxRank; ++a) {
    stride[a] = 1;
    for (int b = 0; b < kMaxRank; ++b) {
      // b is nested inside a when its share kernel/length is larger (or equal, with b > a).
      const int64_t share_a = (int64_t)kernel[a] * length[b];
      const int64_t share_b = (int64_t)kernel[b] * length[a];
      if (b != a && (share_b > share_a || (share_b == share_a && b > a))) stride[a] *= n[b];
    }
  }
}

// x << n for 0 <= n <= 64, where n = 64 gives 0 (C++ leaves that shift undefined; PTX's
// shl.b64 clamps it).
GNA_HD uint64_t shl64(uint64_t x, int n) {
#if defined(__CUDA_ARCH__)
  uint64_t r;
  asm("shl.b64 %0, %1, %2;" : "=l"(r) : "l"(x), "r"(n));
  return r;
#else
  return n >= 64 ? 0 : x << n;
#endif
}

// Which rows of a KV tile of at most 64 rows one query row sees, as a 64-bit word (bit r:
// tile row r), for the kernels' element masks. Rows run through the tile's box with the last
// axis fastest, so the rows whose coordinate along axis a lies in a range are one run of bits
// repeated once per period of that axis (its extent times the rows of one step along it): a
// word is the AND over the axes of a shifted run times a constant of spaced ones.
struct TileBits {
  uint64_t rep[kMaxRank];  // Σ_k 2^(k · period): one 1 per period of the axis
  int ext[kMaxRank];       // the tile's extent per axis
  int unit[kMaxRank];      // rows per step along the axis (product of the later extents)

  // For KV tiles of shape `kv_tile` (group indices per axis, product at most 64).
  static GNA_HD TileBits of(const int64_t kv_tile[kMaxRank]) {
    TileBits b;
    int rows = 1;
    for (int a = kMaxRank - 1; a >= 0; --a) {
      b.ext[a] = (int)kv_tile[a];
      b.unit[a] = rows;
      rows *= b.ext[a];
    }
    // One bit every `period` rows, by doubling the run of ones: at most six shifts where a
    // loop over the rows took up to 64 dependent ones per axis (1.9 µs on the path to every
    // sm90a forward CTA's first K load with 1-D KV tiles; H200).
    for (int a = 0; a < kMaxRank; ++a) {
      const int period = b.ext[a] * b.unit[a];
      uint64_t r = 1;
      for (int span = period; span < rows; span *= 2) r |= shl64(r, span);
      b.rep[a] = r & ~shl64(~uint64_t{0}, rows);
    }
    return b;
  }

  // The rows of the tile whose first row has group indices `origin` with every index inside
  // [start, end) per axis. With a query's window cut at the end of the K/V frame (the
  // kernels' QRow), that is exactly the rows the query sees: rows past the frame are cut,
  // rows outside the global axis lie outside every window, and rows past the tile's product
  // get no bit.
  GNA_HD uint64_t word(const int start[kMaxRank], const int end[kMaxRank],
                       const int origin[kMaxRank]) const {
    uint64_t w = ~uint64_t{0};
    for (int a = 0; a < kMaxRank; ++a) {
      const int lo = min_of(max_of(start[a] - origin[a], 0), ext[a]) * unit[a];
      const int hi = min_of(max_of(end[a] - origin[a], 0), ext[a]) * unit[a];
      w &= (shl64(~uint64_t{0}, lo) & ~shl64(~uint64_t{0}, hi)) * rep[a];
    }
    return w;
  }
};

// A tile origin that no window reaches: TileBits::word gives 0 (a tile slot past the box).
constexpr int kNoTile = 1 << 30;

// Checks the frame of an axis whose length, kernel, stride and dilation are already valid:
// nullptr if it is valid, else the rule it breaks. Window bounds are monotone in the query,
// so per dilation group the first and last Q-frame query bound every window.
inline const char* frame_error(const Axis& ax) {
  const int64_t d = ax.dilation;
  if (ax.q_length < 1 || ax.kv_length < 1)
    return "q_length and kv_length (the Q and K/V buffer axis lengths) must be positive";
  if (ax.q_offset % d != 0 || ax.kv_offset % d != 0)
    return "q_offset and kv_offset must be multiples of dilation";
  if (ax.q_offset < 0 || ax.q_offset + ax.q_length > ax.length)
    return "the Q frame [q_offset, q_offset + q_length) must lie inside [0, length)";
  for (int64_t g = 0; g < d; ++g) {
    const AxisTiling t = group_tiling(ax, g, 1, 1);
    if (t.q_len == 0) continue;
    int64_t s0, e0, s1, e1;
    window_bounds(t.q_offset, t.length, t.kernel, t.stride, t.causal, &s0, &e0);
    window_bounds(t.q_offset + t.q_len - 1, t.length, t.kernel, t.stride, t.causal, &s1, &e1);
    if (s0 < t.kv_offset || e1 > t.kv_offset + t.kv_len)
      return "every window of a Q-frame query must lie inside the K/V frame "
             "[kv_offset, kv_offset + kv_length)";
  }
  return nullptr;
}

}  // namespace gna
