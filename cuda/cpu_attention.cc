// Native CPU GNA: flash-attention style tiles over dilation groups, float32 accumulation.
//
// Work is split into independent tasks, each writing a disjoint set of output rows, so the
// results are bitwise independent of the thread count:
//   forward   one task per (batch, head, dilation group, Q tile): loop over its KV-tile box;
//   backward  pass 1, one task per (batch, kv head, group, KV tile): dK, dV over the Q tiles
//             that see it (q_range), for every query head of the kv head;
//             pass 2, one task per (batch, head, group, Q tile): dQ over its KV-tile box.
// Tile pairs that are full on every axis skip the element mask.
//
// Frames (gna_geometry.h): Q-side rows (q, out, lse, dout, dq) are indexed in the Q buffer,
// K/V-side rows (k, v, dk, dv) in the K/V buffer; windows are computed in global group
// indices and shifted into K/V-frame indices once per Q row, so the element test compares
// local indices. K/V rows outside the global axis are in no window: they are never used and
// their dk/dv rows are written as 0.
#include "cpu_attention.h"

#include <algorithm>
#include <atomic>
#include <cmath>
#include <cstdlib>
#include <cstring>
#include <limits>
#include <system_error>
#include <thread>
#include <vector>

namespace gna::cpu {

// ---------------------------------------------------------------------------------------
// Element conversions (by hand: no compiler half-float types needed).
// ---------------------------------------------------------------------------------------

float bf16_to_float(uint16_t bits) {
  const uint32_t u = static_cast<uint32_t>(bits) << 16;
  float f;
  std::memcpy(&f, &u, sizeof f);
  return f;
}

uint16_t float_to_bf16(float x) {
  uint32_t u;
  std::memcpy(&u, &x, sizeof u);
  if ((u & 0x7fffffffu) > 0x7f800000u) return static_cast<uint16_t>((u >> 16) | 0x40u);  // NaN
  const uint32_t round_to_even = 0x7fffu + ((u >> 16) & 1u);
  return static_cast<uint16_t>((u + round_to_even) >> 16);
}

float f16_to_float(uint16_t bits) {
  const uint32_t sign = static_cast<uint32_t>(bits & 0x8000u) << 16;
  const uint32_t exponent = (bits >> 10) & 0x1fu;
  const uint32_t mantissa = bits & 0x3ffu;
  uint32_t u;
  if (exponent == 0) {
    // Zero or subnormal: mantissa * 2^-24, exact in float.
    const float magnitude = static_cast<float>(mantissa) * 5.9604644775390625e-8f;
    std::memcpy(&u, &magnitude, sizeof u);
    u |= sign;
  } else if (exponent == 31) {
    u = sign | 0x7f800000u | (mantissa << 13);
  } else {
    u = sign | ((exponent + 112u) << 23) | (mantissa << 13);
  }
  float f;
  std::memcpy(&f, &u, sizeof f);
  return f;
}

uint16_t float_to_f16(float x) {
  uint32_t u;
  std::memcpy(&u, &x, sizeof u);
  const uint16_t sign = static_cast<uint16_t>((u >> 16) & 0x8000u);
  const uint32_t a = u & 0x7fffffffu;
  if (a > 0x7f800000u) return sign | 0x7e00u;    // NaN
  if (a >= 0x477ff000u) return sign | 0x7c00u;   // rounds to +-inf (65520 and above)
  if (a < 0x38800000u) {                         // below 2^-14: half subnormal or zero
    float magnitude;
    std::memcpy(&magnitude, &a, sizeof magnitude);
    // Scaling by 2^24 is exact; nearbyint rounds half to even in the default mode.
    return sign | static_cast<uint16_t>(std::nearbyint(magnitude * 16777216.0f));
  }
  uint32_t r = a - (112u << 23);                 // rebias the exponent (127 -> 15)
  r += 0xfffu + ((r >> 13) & 1u);                // round the 13 dropped bits to even
  return sign | static_cast<uint16_t>(r >> 13);
}

namespace {

constexpr float kNegInf = -std::numeric_limits<float>::infinity();

void load_row(const void* base, Elem elem, int64_t offset, int64_t n, float* dst) {
  switch (elem) {
    case Elem::kFloat32:
      std::memcpy(dst, static_cast<const float*>(base) + offset, n * sizeof(float));
      return;
    case Elem::kBFloat16: {
      const uint16_t* src = static_cast<const uint16_t*>(base) + offset;
      for (int64_t i = 0; i < n; ++i) dst[i] = bf16_to_float(src[i]);
      return;
    }
    case Elem::kFloat16: {
      const uint16_t* src = static_cast<const uint16_t*>(base) + offset;
      for (int64_t i = 0; i < n; ++i) dst[i] = f16_to_float(src[i]);
      return;
    }
  }
}

void store_row(void* base, Elem elem, int64_t offset, int64_t n, const float* src) {
  switch (elem) {
    case Elem::kFloat32:
      std::memcpy(static_cast<float*>(base) + offset, src, n * sizeof(float));
      return;
    case Elem::kBFloat16: {
      uint16_t* dst = static_cast<uint16_t*>(base) + offset;
      for (int64_t i = 0; i < n; ++i) dst[i] = float_to_bf16(src[i]);
      return;
    }
    case Elem::kFloat16: {
      uint16_t* dst = static_cast<uint16_t*>(base) + offset;
      for (int64_t i = 0; i < n; ++i) dst[i] = float_to_f16(src[i]);
      return;
    }
  }
}

// Eight partial sums let the compiler vectorise without reassociating on its own.
float dot(const float* a, const float* b, int64_t n) {
  float part[8] = {0, 0, 0, 0, 0, 0, 0, 0};
  int64_t i = 0;
  for (; i + 8 <= n; i += 8)
    for (int j = 0; j < 8; ++j) part[j] += a[i + j] * b[i + j];
  float total = ((part[0] + part[1]) + (part[2] + part[3])) +
                ((part[4] + part[5]) + (part[6] + part[7]));
  for (; i < n; ++i) total += a[i] * b[i];
  return total;
}

void axpy(float alpha, const float* x, float* y, int64_t n) {
  for (int64_t i = 0; i < n; ++i) y[i] += alpha * x[i];
}

// ---------------------------------------------------------------------------------------
// Geometry of one dilation group and boxes of rows inside it.
// ---------------------------------------------------------------------------------------

// One dilation group (one residue per axis) and its per-axis (framed) tilings.
struct Group {
  int64_t g[kMaxRank];
  AxisTiling tiling[kMaxRank];
};

std::vector<Group> make_groups(const Problem& p) {
  int64_t count = 1;
  for (int a = 0; a < kMaxRank; ++a) count *= p.axes[a].dilation;
  std::vector<Group> groups(count);
  for (int64_t flat = 0; flat < count; ++flat) {
    Group& grp = groups[flat];
    int64_t rest = flat;
    for (int a = kMaxRank - 1; a >= 0; --a) {
      const Axis& ax = p.axes[a];
      grp.g[a] = rest % ax.dilation;
      rest /= ax.dilation;
      grp.tiling[a] = group_tiling(ax, grp.g[a], p.q_tile[a], p.kv_tile[a]);
    }
  }
  return groups;
}

// Rows of a box [lo, hi) of frame-local group indices (row-major over the axes): their flat
// spatial token index in the Q or K/V buffer and their group coordinates.
struct Rows {
  int64_t n = 0;
  std::vector<int64_t> token;
  std::vector<int64_t> ii[kMaxRank];
};

void fill_rows(const Problem& p, const Group& grp, bool kv_side, const int64_t* lo,
               const int64_t* hi, Rows* rows) {
  int64_t n = 1;
  for (int a = 0; a < kMaxRank; ++a) n *= hi[a] - lo[a];
  rows->n = n;
  rows->token.resize(n);
  for (auto& v : rows->ii) v.resize(n);
  int64_t r = 0;
  for (int64_t i0 = lo[0]; i0 < hi[0]; ++i0)
    for (int64_t i1 = lo[1]; i1 < hi[1]; ++i1)
      for (int64_t i2 = lo[2]; i2 < hi[2]; ++i2, ++r) {
        const int64_t idx[kMaxRank] = {i0, i1, i2};
        int64_t token = 0;
        for (int a = 0; a < kMaxRank; ++a) {
          rows->ii[a][r] = idx[a];
          const Axis& ax = p.axes[a];
          token = token * (kv_side ? ax.kv_length : ax.q_length) + grp.g[a] +
                  ax.dilation * idx[a];
        }
        rows->token[r] = token;
      }
}

// Group-index box of tile `t` (one index per axis) of the Q or K/V frame for tiles of shape
// `tile`; false if the tile lies beyond this group's frame (shorter groups have fewer tiles).
bool tile_box(const Group& grp, bool kv_side, const int64_t* t, const int64_t* tile,
              int64_t* lo, int64_t* hi) {
  for (int a = 0; a < kMaxRank; ++a) {
    lo[a] = t[a] * tile[a];
    hi[a] = std::min(lo[a] + tile[a], kv_side ? grp.tiling[a].kv_len : grp.tiling[a].q_len);
    if (lo[a] >= hi[a]) return false;
  }
  return true;
}

// Per query row and axis, the window [start, end) in K/V-frame group indices.
struct Windows {
  std::vector<int64_t> start[kMaxRank];
  std::vector<int64_t> end[kMaxRank];
};

void fill_windows(const Problem& p, const Group& grp, const Rows& q, Windows* w) {
  for (int a = 0; a < kMaxRank; ++a) {
    w->start[a].resize(q.n);
    w->end[a].resize(q.n);
    const AxisTiling& t = grp.tiling[a];
    for (int64_t r = 0; r < q.n; ++r) {
      int64_t start, end;
      window_bounds(q.ii[a][r] + t.q_offset, t.length, t.kernel, t.stride, t.causal, &start,
                    &end);
      w->start[a][r] = start - t.kv_offset;
      w->end[a][r] = end - t.kv_offset;
    }
  }
}

bool sees(const Problem& p, const Windows& w, int64_t r, const Rows& keys, int64_t c) {
  for (int a = 0; a < p.rank; ++a) {
    const int64_t jj = keys.ii[a][c];
    if (jj < w.start[a][r] || jj >= w.end[a][r]) return false;
  }
  return true;
}

// ---------------------------------------------------------------------------------------
// Tasks and threads.
// ---------------------------------------------------------------------------------------

// A task index decoded as (batch, head, group, tile index per axis).
struct Task {
  int64_t b, h, group;
  int64_t tile[kMaxRank];
};

struct TaskSpace {
  int64_t batch, heads, groups;
  int64_t tiles[kMaxRank];  // tiles per axis of the longest group's frame (group 0)

  int64_t size() const {
    return batch * heads * groups * tiles[0] * tiles[1] * tiles[2];
  }

  Task decode(int64_t i) const {
    Task t;
    for (int a = kMaxRank - 1; a >= 0; --a) {
      t.tile[a] = i % tiles[a];
      i /= tiles[a];
    }
    t.group = i % groups;
    i /= groups;
    t.h = i % heads;
    t.b = i / heads;
    return t;
  }
};

// Tasks over the tiles of the Q frame (kv_side false) or the K/V frame.
TaskSpace task_space(const Problem& p, int64_t heads, int64_t groups, bool kv_side,
                     const int64_t* tile) {
  TaskSpace s{p.batch, heads, groups, {1, 1, 1}};
  for (int a = 0; a < kMaxRank; ++a) {
    const Axis& ax = p.axes[a];
    s.tiles[a] = ceil_div(group_length(kv_side ? ax.kv_length : ax.q_length, ax.dilation, 0),
                          tile[a]);
  }
  return s;
}

int thread_count(int64_t tasks, double flops) {
  if (const char* env = std::getenv("JAX_GNA_CPU_THREADS")) {
    const int n = std::atoi(env);
    if (n >= 1) return static_cast<int>(std::min<int64_t>(n, std::max<int64_t>(tasks, 1)));
  }
  if (flops < 4e6) return 1;  // thread start-up would cost more than the work
  const unsigned hw = std::max(1u, std::thread::hardware_concurrency());
  return static_cast<int>(std::min<int64_t>(hw, std::max<int64_t>(tasks, 1)));
}

// Runs fn(task_index, scratch) for every task index in [0, n) on `threads` threads, each
// with its own default-constructed Scratch.
template <typename Scratch, typename Fn>
void run_tasks(int64_t n, int threads, const Fn& fn) {
  std::atomic<int64_t> next{0};
  auto worker = [&]() {
    Scratch scratch;
    for (int64_t i = next.fetch_add(1); i < n; i = next.fetch_add(1)) fn(i, scratch);
  };
  std::vector<std::thread> pool;
  for (int t = 1; t < threads; ++t) {
    try {
      pool.emplace_back(worker);
    } catch (const std::system_error&) {
      break;  // fewer threads: same result, since tasks own their outputs
    }
  }
  worker();
  for (auto& th : pool) th.join();
}

// Buffers of one task, reused across the tasks a thread runs.
struct Scratch {
  Rows q_rows, k_rows;
  Windows windows;
  std::vector<float> q, k, v, dout, s, dp, acc, m, l, lse, di, dk, dv;
};

struct Tensors {
  const void* q;
  const void* k;
  const void* v;
  const void* out;
  const float* lse;
  const void* dout;
  const float* dlse;
  void* result_q;  // out (forward) or dq
  float* result_lse;
  void* dk;
  void* dv;
};

// Offsets of row `token` of batch `b`, head `h` in a [batch, tokens, heads, D] buffer.
inline int64_t row_offset(int64_t b, int64_t token, int64_t h, int64_t tokens, int64_t heads,
                          int64_t d) {
  return ((b * tokens + token) * heads + h) * d;
}

// Loads `rows` of head `h` of batch `b` from a [batch, n, heads, D] buffer.
void gather(const Problem& p, Elem elem, const void* base, int64_t b, int64_t h, int64_t heads,
            int64_t n, const Rows& rows, std::vector<float>* dst) {
  const int64_t d = p.head_dim;
  dst->resize(rows.n * d);
  for (int64_t r = 0; r < rows.n; ++r)
    load_row(base, elem, row_offset(b, rows.token[r], h, n, heads, d), d, dst->data() + r * d);
}

// s[r, c] = scale * q_r . k_c, with -inf where the query does not see the key (unless the
// tile pair is full).
void scores(const Problem& p, const Scratch& sc, bool full, std::vector<float>* s) {
  const int64_t nq = sc.q_rows.n, nk = sc.k_rows.n, d = p.head_dim;
  s->resize(nq * nk);
  for (int64_t r = 0; r < nq; ++r) {
    float* row = s->data() + r * nk;
    for (int64_t c = 0; c < nk; ++c)
      row[c] = p.scale * dot(sc.q.data() + r * d, sc.k.data() + c * d, d);
    if (!full)
      for (int64_t c = 0; c < nk; ++c)
        if (!sees(p, sc.windows, r, sc.k_rows, c)) row[c] = kNegInf;
  }
}

// Loads the KV tile `kt` of group `grp` for kv head `hk`; false if it is empty.
bool load_kv_tile(const Problem& p, Elem elem, const Tensors& t, const Group& grp, int64_t b,
                  int64_t hk, const int64_t* kt, Scratch* sc) {
  int64_t lo[kMaxRank], hi[kMaxRank];
  if (!tile_box(grp, /*kv_side=*/true, kt, p.kv_tile, lo, hi)) return false;
  fill_rows(p, grp, /*kv_side=*/true, lo, hi, &sc->k_rows);
  const int64_t n = p.kv_tokens();
  gather(p, elem, t.k, b, hk, p.kv_heads, n, sc->k_rows, &sc->k);
  gather(p, elem, t.v, b, hk, p.kv_heads, n, sc->k_rows, &sc->v);
  return true;
}

bool full_pair(const Problem& p, const Group& grp, const int64_t* qt, const int64_t* kt) {
  for (int a = 0; a < p.rank; ++a)
    if (!grp.tiling[a].full(qt[a], kt[a])) return false;
  return true;
}

// Loads Q tile `qt` (rows, windows, q) and, for the backward, dout/lse/di.
bool load_q_tile(const Problem& p, Elem elem, const Tensors& t, const Group& grp, int64_t b,
                 int64_t h, const int64_t* qt, const std::vector<float>* di, Scratch* sc) {
  int64_t lo[kMaxRank], hi[kMaxRank];
  if (!tile_box(grp, /*kv_side=*/false, qt, p.q_tile, lo, hi)) return false;
  fill_rows(p, grp, /*kv_side=*/false, lo, hi, &sc->q_rows);
  fill_windows(p, grp, sc->q_rows, &sc->windows);
  const int64_t n = p.q_tokens();
  gather(p, elem, t.q, b, h, p.heads, n, sc->q_rows, &sc->q);
  if (di != nullptr) {
    gather(p, elem, t.dout, b, h, p.heads, n, sc->q_rows, &sc->dout);
    const int64_t nq = sc->q_rows.n;
    sc->lse.resize(nq);
    sc->di.resize(nq);
    for (int64_t r = 0; r < nq; ++r) {
      const int64_t idx = (b * n + sc->q_rows.token[r]) * p.heads + h;
      sc->lse[r] = t.lse[idx];
      sc->di[r] = (*di)[idx];
    }
  }
  return true;
}

// For the backward of the loaded tile pair: s <- P = exp(s - lse), dp <- P * (dO.v - di).
void probabilities_and_ds(const Problem& p, Scratch* sc) {
  const int64_t nq = sc->q_rows.n, nk = sc->k_rows.n, d = p.head_dim;
  sc->dp.resize(nq * nk);
  for (int64_t r = 0; r < nq; ++r) {
    const float lse = sc->lse[r];
    for (int64_t c = 0; c < nk; ++c) {
      float& s = sc->s[r * nk + c];
      // A row without keys (lse = -inf) cannot occur for valid queries; keep it finite.
      s = (s == kNegInf || lse == kNegInf) ? 0.0f : std::exp(s - lse);
      if (s == 0.0f) {
        sc->dp[r * nk + c] = 0.0f;
        continue;
      }
      const float dp = dot(sc->dout.data() + r * d, sc->v.data() + c * d, d);
      sc->dp[r * nk + c] = s * (dp - sc->di[r]);
    }
  }
}

// Calls fn(kt) for every KV tile index tuple in the box [lo, hi).
template <typename Fn>
void for_box(const int64_t* lo, const int64_t* hi, const Fn& fn) {
  int64_t t[kMaxRank];
  for (t[0] = lo[0]; t[0] < hi[0]; ++t[0])
    for (t[1] = lo[1]; t[1] < hi[1]; ++t[1])
      for (t[2] = lo[2]; t[2] < hi[2]; ++t[2]) fn(static_cast<const int64_t*>(t));
}

void kv_box(const Group& grp, const int64_t* qt, int64_t* lo, int64_t* hi) {
  for (int a = 0; a < kMaxRank; ++a) grp.tiling[a].kv_range(qt[a], &lo[a], &hi[a]);
}

void q_box(const Group& grp, const int64_t* kt, int64_t* lo, int64_t* hi) {
  for (int a = 0; a < kMaxRank; ++a) grp.tiling[a].q_range(kt[a], &lo[a], &hi[a]);
}

double pair_flops(const Problem& p) {
  double per_query = 1;
  for (int a = 0; a < p.rank; ++a) per_query *= static_cast<double>(p.axes[a].kernel);
  return 4.0 * per_query * p.head_dim * p.batch * p.heads * p.q_tokens();
}

// ---------------------------------------------------------------------------------------
// Forward.
// ---------------------------------------------------------------------------------------

void forward_task(const Problem& p, Elem elem, const Tensors& t,
                  const std::vector<Group>& groups, const Task& task, Scratch* sc) {
  const Group& grp = groups[task.group];
  const int64_t b = task.b, h = task.h, hk = h / (p.heads / p.kv_heads), d = p.head_dim;
  if (!load_q_tile(p, elem, t, grp, b, h, task.tile, nullptr, sc)) return;
  const int64_t nq = sc->q_rows.n;
  sc->m.assign(nq, kNegInf);
  sc->l.assign(nq, 0.0f);
  sc->acc.assign(nq * d, 0.0f);
  int64_t lo[kMaxRank], hi[kMaxRank];
  kv_box(grp, task.tile, lo, hi);
  for_box(lo, hi, [&](const int64_t* kt) {
    if (!load_kv_tile(p, elem, t, grp, b, hk, kt, sc)) return;
    const int64_t nk = sc->k_rows.n;
    scores(p, *sc, full_pair(p, grp, task.tile, kt), &sc->s);
    for (int64_t r = 0; r < nq; ++r) {
      float* row = sc->s.data() + r * nk;
      float tile_max = kNegInf;
      for (int64_t c = 0; c < nk; ++c) tile_max = std::max(tile_max, row[c]);
      if (tile_max == kNegInf) continue;  // this row sees no key of this tile
      const float m_new = std::max(sc->m[r], tile_max);
      const float alpha = std::exp(sc->m[r] - m_new);  // 0 on the first visible tile
      float* acc = sc->acc.data() + r * d;
      for (int64_t i = 0; i < d; ++i) acc[i] *= alpha;
      float sum = 0.0f;
      for (int64_t c = 0; c < nk; ++c) {
        if (row[c] == kNegInf) continue;
        const float prob = std::exp(row[c] - m_new);
        sum += prob;
        axpy(prob, sc->v.data() + c * d, acc, d);
      }
      sc->l[r] = sc->l[r] * alpha + sum;
      sc->m[r] = m_new;
    }
  });
  const int64_t n = p.q_tokens();
  for (int64_t r = 0; r < nq; ++r) {
    float* acc = sc->acc.data() + r * d;
    const float l = sc->l[r];
    // Every valid query sees at least one key, so l > 0; the guard keeps NaN out regardless.
    const float inv = l > 0.0f ? 1.0f / l : 0.0f;
    for (int64_t i = 0; i < d; ++i) acc[i] *= inv;
    const int64_t token = sc->q_rows.token[r];
    store_row(t.result_q, elem, row_offset(b, token, h, n, p.heads, d), d, acc);
    t.result_lse[(b * n + token) * p.heads + h] = l > 0.0f ? sc->m[r] + std::log(l) : kNegInf;
  }
}

// ---------------------------------------------------------------------------------------
// Backward.
// ---------------------------------------------------------------------------------------

// di[b, token, h] = dout . out - dlse: the softmax-backward row term.
std::vector<float> row_terms(const Problem& p, Elem elem, const Tensors& t) {
  const int64_t rows = p.batch * p.q_tokens() * p.heads, d = p.head_dim;
  std::vector<float> di(rows);
  struct RowScratch {
    std::vector<float> a, b;
  };
  const int64_t chunk = 256;
  const int64_t tasks = ceil_div(rows, chunk);
  run_tasks<RowScratch>(tasks, thread_count(tasks, 2.0 * rows * d),
                        [&](int64_t task, RowScratch& sc) {
    sc.a.resize(d);
    sc.b.resize(d);
    for (int64_t r = task * chunk; r < std::min(rows, (task + 1) * chunk); ++r) {
      load_row(t.dout, elem, r * d, d, sc.a.data());
      load_row(t.out, elem, r * d, d, sc.b.data());
      di[r] = dot(sc.a.data(), sc.b.data(), d) - (t.dlse ? t.dlse[r] : 0.0f);
    }
  });
  return di;
}

void dkdv_task(const Problem& p, Elem elem, const Tensors& t, const std::vector<Group>& groups,
               const std::vector<float>& di, const Task& task, Scratch* sc) {
  const Group& grp = groups[task.group];
  const int64_t b = task.b, hk = task.h, d = p.head_dim, n = p.kv_tokens();
  if (!load_kv_tile(p, elem, t, grp, b, hk, task.tile, sc)) return;
  const int64_t nk = sc->k_rows.n;
  sc->dk.assign(nk * d, 0.0f);
  sc->dv.assign(nk * d, 0.0f);
  int64_t lo[kMaxRank], hi[kMaxRank];
  q_box(grp, task.tile, lo, hi);
  const int64_t group_heads = p.heads / p.kv_heads;
  for (int64_t h = hk * group_heads; h < (hk + 1) * group_heads; ++h) {
    for_box(lo, hi, [&](const int64_t* qt) {
      if (!load_q_tile(p, elem, t, grp, b, h, qt, &di, sc)) return;
      const int64_t nq = sc->q_rows.n;
      scores(p, *sc, full_pair(p, grp, qt, task.tile), &sc->s);
      probabilities_and_ds(p, sc);
      for (int64_t r = 0; r < nq; ++r)
        for (int64_t c = 0; c < nk; ++c) {
          const float prob = sc->s[r * nk + c];
          if (prob == 0.0f) continue;
          axpy(prob, sc->dout.data() + r * d, sc->dv.data() + c * d, d);
          axpy(p.scale * sc->dp[r * nk + c], sc->q.data() + r * d, sc->dk.data() + c * d, d);
        }
    });
  }
  for (int64_t c = 0; c < nk; ++c) {
    const int64_t off = row_offset(b, sc->k_rows.token[c], hk, n, p.kv_heads, d);
    store_row(t.dk, elem, off, d, sc->dk.data() + c * d);
    store_row(t.dv, elem, off, d, sc->dv.data() + c * d);
  }
}

void dq_task(const Problem& p, Elem elem, const Tensors& t, const std::vector<Group>& groups,
             const std::vector<float>& di, const Task& task, Scratch* sc) {
  const Group& grp = groups[task.group];
  const int64_t b = task.b, h = task.h, hk = h / (p.heads / p.kv_heads), d = p.head_dim;
  if (!load_q_tile(p, elem, t, grp, b, h, task.tile, &di, sc)) return;
  const int64_t nq = sc->q_rows.n, n = p.q_tokens();
  sc->acc.assign(nq * d, 0.0f);
  int64_t lo[kMaxRank], hi[kMaxRank];
  kv_box(grp, task.tile, lo, hi);
  for_box(lo, hi, [&](const int64_t* kt) {
    if (!load_kv_tile(p, elem, t, grp, b, hk, kt, sc)) return;
    const int64_t nk = sc->k_rows.n;
    scores(p, *sc, full_pair(p, grp, task.tile, kt), &sc->s);
    probabilities_and_ds(p, sc);
    for (int64_t r = 0; r < nq; ++r)
      for (int64_t c = 0; c < nk; ++c) {
        const float ds = sc->dp[r * nk + c];
        if (ds != 0.0f) axpy(p.scale * ds, sc->k.data() + c * d, sc->acc.data() + r * d, d);
      }
  });
  for (int64_t r = 0; r < nq; ++r)
    store_row(t.result_q, elem, row_offset(b, sc->q_rows.token[r], h, n, p.heads, d), d,
              sc->acc.data() + r * d);
}

std::string check(const Problem& p) {
  if (p.rank < 1 || p.rank > kMaxRank) return "rank must be 1 to 3";
  if (p.heads < 1 || p.kv_heads < 1 || p.heads % p.kv_heads) return "bad head counts";
  if (p.head_dim < 1) return "head_dim must be positive";
  return "";
}

}  // namespace

std::string forward(const Problem& p, Elem elem, const void* q, const void* k, const void* v,
                    void* out, float* lse) {
  if (std::string err = check(p); !err.empty()) return err;
  if (p.batch == 0) return "";
  const std::vector<Group> groups = make_groups(p);
  const Tensors t{q, k, v, nullptr, nullptr, nullptr, nullptr, out, lse, nullptr, nullptr};
  const TaskSpace space = task_space(p, p.heads, static_cast<int64_t>(groups.size()),
                                      /*kv_side=*/false, p.q_tile);
  run_tasks<Scratch>(space.size(), thread_count(space.size(), pair_flops(p)),
                     [&](int64_t i, Scratch& sc) {
    forward_task(p, elem, t, groups, space.decode(i), &sc);
  });
  return "";
}

std::string backward(const Problem& p, Elem elem, const void* q, const void* k, const void* v,
                     const void* out, const float* lse, const void* dout, const float* dlse,
                     void* dq, void* dk, void* dv) {
  if (std::string err = check(p); !err.empty()) return err;
  if (p.batch == 0) return "";
  const std::vector<Group> groups = make_groups(p);
  const Tensors t{q, k, v, out, lse, dout, dlse, dq, nullptr, dk, dv};
  const std::vector<float> di = row_terms(p, elem, t);
  const int64_t n_groups = static_cast<int64_t>(groups.size());
  const double flops = 2.0 * pair_flops(p);
  const TaskSpace kv_space = task_space(p, p.kv_heads, n_groups, /*kv_side=*/true, p.kv_tile);
  run_tasks<Scratch>(kv_space.size(), thread_count(kv_space.size(), flops),
                     [&](int64_t i, Scratch& sc) {
    dkdv_task(p, elem, t, groups, di, kv_space.decode(i), &sc);
  });
  const TaskSpace q_space = task_space(p, p.heads, n_groups, /*kv_side=*/false, p.q_tile);
  run_tasks<Scratch>(q_space.size(), thread_count(q_space.size(), flops),
                     [&](int64_t i, Scratch& sc) {
    dq_task(p, elem, t, groups, di, q_space.decode(i), &sc);
  });
  return "";
}

}  // namespace gna::cpu
