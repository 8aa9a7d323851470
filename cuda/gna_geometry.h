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

// One spatial axis of a validated problem. Unused axes (rank < 3) are {1, 1, 1, 1, false}.
struct Axis {
  int64_t length;
  int64_t kernel;
  int64_t stride;
  int64_t dilation;
  bool causal;
};

GNA_HD int64_t ceil_div(int64_t a, int64_t b) { return (a + b - 1) / b; }
GNA_HD int64_t min64(int64_t a, int64_t b) { return a < b ? a : b; }
GNA_HD int64_t max64(int64_t a, int64_t b) { return a > b ? a : b; }

// Tokens in dilation group `g` of an axis.
GNA_HD int64_t group_length(int64_t length, int64_t dilation, int64_t g) {
  return (length - g + dilation - 1) / dilation;
}

// Window [start, end) in group indices of the query at group index `ii` (see DESIGN.md §2).
GNA_HD void window_bounds(int64_t ii, int64_t group_len, int64_t kernel, int64_t stride,
                          bool causal, int64_t* start, int64_t* end) {
  const int64_t base = (ii / stride) * stride;
  if (causal) {
    const int64_t lead = min64(base + stride - 1, group_len - 1);
    *start = max64(lead - kernel + 1, 0);
    *end = ii + 1;
  } else {
    const int64_t lead = min64(base + stride / 2, group_len - 1);
    *start = max64(0, min64(lead - kernel / 2, group_len - kernel));
    *end = *start + kernel;
  }
}

// Whether group index `ii` sees group index `jj` (both inside a group of `group_len`).
GNA_HD bool in_window(int64_t ii, int64_t jj, int64_t group_len, int64_t kernel,
                      int64_t stride, bool causal) {
  int64_t start, end;
  window_bounds(ii, group_len, kernel, stride, causal, &start, &end);
  return jj >= start && jj < end;
}

// Tiling of one dilation-group axis: `length` group indices cut into Q tiles of `q_tile`
// and KV tiles of `kv_tile`.
struct AxisTiling {
  int64_t length;
  int64_t kernel;
  int64_t stride;
  bool causal;
  int64_t q_tile;
  int64_t kv_tile;

  GNA_HD int64_t n_q() const { return ceil_div(length, q_tile); }
  GNA_HD int64_t n_kv() const { return ceil_div(length, kv_tile); }

  // KV tiles [lo, hi) seen by Q tile `qt`. Window bounds are non-decreasing in the query
  // index, so the first query's start and the last valid query's end bound the range.
  GNA_HD void kv_range(int64_t qt, int64_t* lo, int64_t* hi) const {
    const int64_t first = qt * q_tile;
    const int64_t last = min64(first + q_tile, length) - 1;
    int64_t s0, e0, s1, e1;
    window_bounds(first, length, kernel, stride, causal, &s0, &e0);
    window_bounds(last, length, kernel, stride, causal, &s1, &e1);
    *lo = s0 / kv_tile;
    *hi = ceil_div(e1, kv_tile);
  }

  // True iff every valid query of Q tile `qt` sees every key of KV tile `kt` and the KV
  // tile holds no padding: such a pair runs without an element mask.
  GNA_HD bool full(int64_t qt, int64_t kt) const {
    const int64_t first = qt * q_tile;
    const int64_t last = min64(first + q_tile, length) - 1;
    const int64_t key_first = kt * kv_tile;
    const int64_t key_end = key_first + kv_tile;
    if (key_end > length) return false;
    int64_t s0, e0, s1, e1;
    window_bounds(first, length, kernel, stride, causal, &s0, &e0);
    window_bounds(last, length, kernel, stride, causal, &s1, &e1);
    return s1 <= key_first && e0 >= key_end;
  }

  // Q tiles [lo, hi) that see KV tile `kt` (the backward's loop). kv_range's bounds are
  // non-decreasing in qt, so two binary searches find the ends.
  GNA_HD void q_range(int64_t kt, int64_t* lo, int64_t* hi) const {
    const int64_t n = n_q();
    int64_t a = 0, b = n;  // first qt with kv_hi(qt) > kt
    while (a < b) {
      const int64_t m = (a + b) / 2;
      int64_t l, h;
      kv_range(m, &l, &h);
      if (h > kt) b = m; else a = m + 1;
    }
    int64_t c = a, d = n;  // first qt with kv_lo(qt) > kt
    while (c < d) {
      const int64_t m = (c + d) / 2;
      int64_t l, h;
      kv_range(m, &l, &h);
      if (l > kt) d = m; else c = m + 1;
    }
    *lo = a;
    *hi = a < c ? c : a;
  }
};

}  // namespace gna
