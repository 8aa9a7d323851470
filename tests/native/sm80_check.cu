// Standalone check of the sm80 GNA kernels against a float64 CPU reference.
//
//   sm80_check check [n_configs] [seed]   random sweep: out, lse, dq, dk, dv + determinism;
//                                         every third config also runs a framed sub-problem
//   sm80_check sanitize                   small 2-D, 3-D, framed 2-D and paired-tile cases
//                                         (compute-sanitizer)
//   sm80_check time                       the six DESIGN.md §4 problems, bf16, D = 128
//                                         (sm80 forward and backward, and the sm90a ones
//                                         in builds with -DGNA_CHECK_SM90)
//   sm80_check host                       what issuing a launch costs the host, part by
//                                         part (builds with -DGNA_CHECK_SM90)
//
// GNA_CHECK_KERNELS=sm90 makes check and sanitize run the sm90a forward and backward (see
// forward() and backward()).
//
// The reference is written from the semantics (DESIGN.md §2) using gna_geometry.h's
// window_bounds; inputs are fresh seeded random values, outputs are poisoned (all-ones bytes,
// NaN in bf16/f16) before every run so that an unwritten element fails.
//
// Framed runs (notes/FRAMES.md): the Q buffer is a random slab of the global problem, the K/V
// buffers cover its windows plus random halos whose rows outside the global axis hold NaN and
// huge values. The float64 reference runs the global problem with dO zero outside the slab,
// so its dK/dV are exactly the slab's contributions: every framed output (out, lse, dq, dk,
// dv) is compared with the matching slice, and dK/dV rows outside the axis must be exactly 0.
#include <cuda_bf16.h>
#include <cuda_fp16.h>
#include <cuda_runtime.h>

#include <algorithm>
#include <chrono>
#include <cmath>
#include <cstdio>
#include <cstdlib>
#include <cstring>
#include <random>
#include <string>
#include <vector>

#include "gna_kernels.h"
#ifdef GNA_CHECK_SM90
#include "sm90/tensor_maps.h"
#endif

using gna::Axis;
using gna::DType;
using gna::Problem;

#define CK(x)                                                                        \
  do {                                                                               \
    cudaError_t e_ = (x);                                                            \
    if (e_ != cudaSuccess) {                                                         \
      std::fprintf(stderr, "%s:%d %s: %s\n", __FILE__, __LINE__, #x,                 \
                   cudaGetErrorString(e_));                                          \
      std::exit(2);                                                                  \
    }                                                                                \
  } while (0)

static void ok_or_die(const std::string& s, const char* what) {
  if (!s.empty()) {
    std::fprintf(stderr, "%s: %s\n", what, s.c_str());
    std::exit(2);
  }
}

// The kernels the checks run: the sm80 ones, or with GNA_CHECK_KERNELS=sm90 (in builds with
// -DGNA_CHECK_SM90) the sm90a ones wherever they cover the problem, as the FFI handler picks
// them on Hopper.
static bool g_sm90 = false;

static bool use_sm90(const Problem& p, DType t) {
#ifdef GNA_CHECK_SM90
  return g_sm90 && gna::sm90_supports(p, t).empty();
#else
  (void)p, (void)t;
  return false;
#endif
}

// Workspace bytes of the backward of `p` (at least 16: Buf wants a non-empty buffer); both
// kernel families need the same.
static size_t workspace_bytes(const Problem& p) {
  return std::max<size_t>(gna::backward_workspace(p), 16);
}

static std::string forward(const Problem& p, DType t, const void* q, const void* k,
                           const void* v, void* out, float* lse) {
#ifdef GNA_CHECK_SM90
  if (use_sm90(p, t)) return gna::sm90_forward(p, t, q, k, v, out, lse, 0);
#endif
  return gna::sm80_forward(p, t, q, k, v, out, lse, 0);
}

static std::string backward(const Problem& p, DType t, const void* q, const void* k,
                            const void* v, const void* out, const void* dout, const void* lse,
                            void* dq, void* dk, void* dv, void* ws) {
  const float* l = static_cast<const float*>(lse);
#ifdef GNA_CHECK_SM90
  if (use_sm90(p, t)) return gna::sm90_backward(p, t, q, k, v, out, dout, l, dq, dk, dv, ws, 0);
#endif
  return gna::sm80_backward(p, t, q, k, v, out, dout, l, dq, dk, dv, ws, 0);
}

// ------------------------------------------------------------------ host half conversions
static uint16_t to_half(float x, DType t) {
  if (t == DType::kBFloat16) {
    __nv_bfloat16 h = __float2bfloat16(x);
    uint16_t u;
    std::memcpy(&u, &h, 2);
    return u;
  }
  __half h = __float2half(x);
  uint16_t u;
  std::memcpy(&u, &h, 2);
  return u;
}
static double from_half(uint16_t u, DType t) {
  if (t == DType::kBFloat16) {
    __nv_bfloat16 h;
    std::memcpy(&h, &u, 2);
    return (double)__bfloat162float(h);
  }
  __half h;
  std::memcpy(&h, &u, 2);
  return (double)__half2float(h);
}

// ------------------------------------------------------------------ problem construction
static std::vector<int64_t> fit_tile(std::vector<int64_t> tile, const Problem& p) {
  // Port of jax_gna.geometry.fit_tile (only used to pick test tiles).
  const int n = p.rank;
  std::vector<int64_t> longest(n);
  for (int a = 0; a < n; ++a) longest[a] = gna::group_length(p.axes[a].length, p.axes[a].dilation, 0);
  for (int a = 0; a < n; ++a) {
    while (tile[a] > 1 && tile[a] / 2 >= longest[a]) {
      tile[a] /= 2;
      int best = -1;
      double best_r = -1;
      for (int b = 0; b < n; ++b) {
        if (b == a || tile[b] * 2 > longest[b]) continue;
        const double r = (double)longest[b] / tile[b];
        if (r > best_r) best_r = r, best = b;
      }
      if (best >= 0) tile[best] *= 2;
    }
  }
  return tile;
}

static void default_tiles(Problem& p) {
  static const std::vector<int64_t> q_menu[3] = {{128}, {8, 16}, {2, 8, 8}};
  static const std::vector<int64_t> kv_menu[3] = {{64}, {8, 8}, {2, 4, 8}};
  auto q = fit_tile(q_menu[p.rank - 1], p);
  auto kv = fit_tile(kv_menu[p.rank - 1], p);
  for (int a = 0; a < 3; ++a) {
    p.q_tile[a] = a < p.rank ? q[a] : 1;
    p.kv_tile[a] = a < p.rank ? kv[a] : 1;
  }
}

static Problem make_problem(int rank, std::vector<Axis> axes, int64_t b, int64_t h, int64_t hkv,
                            int64_t d) {
  Problem p{};
  p.rank = rank;
  p.batch = b;
  p.heads = h;
  p.kv_heads = hkv;
  p.head_dim = d;
  for (int a = 0; a < 3; ++a) {
    const Axis x = a < rank ? axes[a] : Axis{1, 1, 1, 1, false};
    p.axes[a] = gna::unframed_axis(x.length, x.kernel, x.stride, x.dilation, x.causal);
  }
  p.scale = 1.f / std::sqrt((float)d);
  p.deterministic = true;
  default_tiles(p);
  return p;
}

static Problem random_problem(std::mt19937& g) {
  auto U = [&](int lo, int hi) { return std::uniform_int_distribution<int>(lo, hi)(g); };
  const int rank = U(1, 3);
  const int lmax[3] = {300, 26, 10};
  const int lmin[3] = {8, 4, 3};
  std::vector<Axis> axes;
  for (int a = 0; a < rank; ++a) {
    const int L = U(lmin[rank - 1], lmax[rank - 1]);
    int d = U(0, 2) == 0 ? U(1, 3) : 1;
    while (d > 1 && 2 * d > L) --d;
    const int kmax = L / d;
    int k = U(0, 5) == 0 ? kmax : U(2, std::max(2, std::min(kmax, rank == 1 ? 40 : 9)));
    k = std::min(k, kmax);
    const int s = U(0, 2) == 0 ? 1 : U(1, k);
    const bool causal = U(0, 3) == 0;
    axes.push_back(gna::unframed_axis(L, k, s, d, causal));
  }
  const int dims[3] = {32, 64, 128};
  const int hs[3] = {1, 2, 4};
  const int64_t H = hs[U(0, 2)];
  int64_t Hkv = H;
  if (U(0, 1)) Hkv = std::max<int64_t>(1, H / hs[U(0, 2)]);  // GQA / MQA
  Problem p = make_problem(rank, axes, U(1, 2), H, Hkv, dims[U(0, 2)]);
  p.scale *= std::uniform_real_distribution<float>(0.5f, 1.5f)(g);
  if (U(0, 7) == 0) p.scale = -p.scale;  // the forwards' softmax has a path for scale <= 0
  if (U(0, 2) == 0) {  // odd, random tile boxes (padding rows, the 64-row variants)
    for (int tries = 0; tries < 100; ++tries) {
      int64_t q = 1, kv = 1;
      for (int a = 0; a < rank; ++a) {
        p.q_tile[a] = U(1, rank == 1 ? 128 : (rank == 2 ? 16 : 8));
        p.kv_tile[a] = U(1, rank == 1 ? 64 : 8);
        q *= p.q_tile[a];
        kv *= p.kv_tile[a];
      }
      if (q <= 128 && kv <= 64) break;
      default_tiles(p);
    }
  }
  return p;
}

static std::string describe(const Problem& p, DType t) {
  char buf[512];
  std::string axes;
  for (int a = 0; a < p.rank; ++a) {
    const Axis& x = p.axes[a];
    std::snprintf(buf, sizeof buf, "%s[L%ld k%ld s%ld d%ld%s q%ld kv%ld]", a ? " " : "",
                  (long)x.length, (long)x.kernel, (long)x.stride, (long)x.dilation,
                  x.causal ? " c" : "", (long)p.q_tile[a], (long)p.kv_tile[a]);
    axes += buf;
  }
  std::snprintf(buf, sizeof buf, "%s B%ld H%ld/%ld D%ld%s %s",
                t == DType::kBFloat16 ? "bf16" : "f16", (long)p.batch, (long)p.heads,
                (long)p.kv_heads, (long)p.head_dim, p.deterministic ? " det" : "",
                axes.c_str());
  return buf;
}

// ------------------------------------------------------------------ float64 reference
// Keys (token indices) visible from query token `i`, straight from DESIGN.md §2.
static std::vector<int64_t> neighbourhood(const Problem& p, int64_t i) {
  int64_t coord[3], rem = i;
  for (int a = 2; a >= 0; --a) coord[a] = rem % p.axes[a].length, rem /= p.axes[a].length;
  std::vector<int64_t> lo(3), hi(3);
  for (int a = 0; a < 3; ++a) {
    const Axis& x = p.axes[a];
    const int64_t g = coord[a] % x.dilation, ii = coord[a] / x.dilation;
    const int64_t Lg = gna::group_length(x.length, x.dilation, g);
    int64_t s, e;
    gna::window_bounds(ii, Lg, x.kernel, x.stride, x.causal, &s, &e);
    lo[a] = s * x.dilation + g;  // first token on this axis
    hi[a] = e;                   // group-index end
  }
  std::vector<int64_t> keys;
  for (int64_t j0 = lo[0]; j0 / p.axes[0].dilation < hi[0] && j0 < p.axes[0].length; j0 += p.axes[0].dilation)
    for (int64_t j1 = lo[1]; j1 / p.axes[1].dilation < hi[1] && j1 < p.axes[1].length; j1 += p.axes[1].dilation)
      for (int64_t j2 = lo[2]; j2 / p.axes[2].dilation < hi[2] && j2 < p.axes[2].length; j2 += p.axes[2].dilation)
        keys.push_back((j0 * p.axes[1].length + j1) * p.axes[2].length + j2);
  return keys;
}

struct Ref {
  std::vector<double> out, lse, dq, dk, dv;
};

// The global (unframed) problem `p`.
static Ref reference(const Problem& p, const std::vector<double>& q, const std::vector<double>& k,
                     const std::vector<double>& v, const std::vector<double>& dout) {
  const int64_t N = p.q_tokens(), H = p.heads, Hk = p.kv_heads, D = p.head_dim, B = p.batch;
  const int64_t G = H / Hk;
  Ref r;
  r.out.assign(B * N * H * D, 0);
  r.lse.assign(B * N * H, 0);
  r.dq.assign(B * N * H * D, 0);
  r.dk.assign(B * N * Hk * D, 0);
  r.dv.assign(B * N * Hk * D, 0);
  std::vector<std::vector<int64_t>> nb(N);
#pragma omp parallel for schedule(dynamic)
  for (int64_t i = 0; i < N; ++i) nb[i] = neighbourhood(p, i);
  // dK/dV are reduced per (b, kv head) in a fixed order: parallelise over (b, kv head).
#pragma omp parallel for schedule(dynamic)
  for (int64_t bh = 0; bh < B * Hk; ++bh) {
    const int64_t b = bh / Hk, hk = bh % Hk;
    std::vector<double> s, pr, dp;
    for (int64_t h = hk * G; h < (hk + 1) * G; ++h) {
      for (int64_t i = 0; i < N; ++i) {
        const auto& keys = nb[i];
        const double* qi = &q[((b * N + i) * H + h) * D];
        const double* gi = &dout[((b * N + i) * H + h) * D];
        s.resize(keys.size());
        pr.resize(keys.size());
        dp.resize(keys.size());
        double mx = -INFINITY;
        for (size_t n = 0; n < keys.size(); ++n) {
          const double* kj = &k[((b * N + keys[n]) * Hk + hk) * D];
          double acc = 0;
          for (int64_t d = 0; d < D; ++d) acc += qi[d] * kj[d];
          s[n] = acc * p.scale;
          mx = std::max(mx, s[n]);
        }
        double sum = 0;
        for (size_t n = 0; n < keys.size(); ++n) sum += (pr[n] = std::exp(s[n] - mx));
        double* oi = &r.out[((b * N + i) * H + h) * D];
        for (size_t n = 0; n < keys.size(); ++n) {
          pr[n] /= sum;
          const double* vj = &v[((b * N + keys[n]) * Hk + hk) * D];
          for (int64_t d = 0; d < D; ++d) oi[d] += pr[n] * vj[d];
        }
        r.lse[(b * N + i) * H + h] = mx + std::log(sum);
        double delta = 0;
        for (int64_t d = 0; d < D; ++d) delta += gi[d] * oi[d];
        double* dqi = &r.dq[((b * N + i) * H + h) * D];
        for (size_t n = 0; n < keys.size(); ++n) {
          const int64_t kv = ((b * N + keys[n]) * Hk + hk) * D;
          double acc = 0;
          for (int64_t d = 0; d < D; ++d) acc += gi[d] * v[kv + d];
          const double ds = pr[n] * (acc - delta) * p.scale;
          for (int64_t d = 0; d < D; ++d) {
            dqi[d] += ds * k[kv + d];
            r.dk[kv + d] += ds * qi[d];
            r.dv[kv + d] += pr[n] * gi[d];
          }
        }
      }
    }
  }
  return r;
}

// ------------------------------------------------------------------ device buffers
struct Buf {
  void* ptr = nullptr;
  size_t bytes = 0;
  explicit Buf(size_t n) : bytes(n) { CK(cudaMalloc(&ptr, std::max<size_t>(n, 16))); }
  ~Buf() { cudaFree(ptr); }
  Buf(const Buf&) = delete;
  void poison() { CK(cudaMemset(ptr, 0xFF, bytes)); }
};

static std::vector<uint16_t> random_half(size_t n, std::mt19937& g, DType t, float sd = 1.f) {
  std::normal_distribution<float> dist(0.f, sd);
  std::vector<uint16_t> out(n);
  for (auto& x : out) x = to_half(dist(g), t);
  return out;
}

static std::vector<double> widen(const std::vector<uint16_t>& x, DType t) {
  std::vector<double> out(x.size());
  for (size_t i = 0; i < x.size(); ++i) out[i] = from_half(x[i], t);
  return out;
}

// Relative L2 error; +inf if any element is not finite.
static double rel_err(const std::vector<double>& got, const std::vector<double>& ref) {
  double num = 0, den = 0;
  for (size_t i = 0; i < got.size(); ++i) {
    if (!std::isfinite(got[i])) return INFINITY;
    num += (got[i] - ref[i]) * (got[i] - ref[i]);
    den += ref[i] * ref[i];
  }
  return std::sqrt(num / std::max(den, 1e-30));
}

template <class X>
static std::vector<X> download(const Buf& b) {
  std::vector<X> out(b.bytes / sizeof(X));
  CK(cudaMemcpy(out.data(), b.ptr, b.bytes, cudaMemcpyDeviceToHost));
  return out;
}

struct Errors {
  double out, lse, dq, dk, dv;
  bool deterministic;
};

static Errors run_one(const Problem& p, DType t, std::mt19937& g, bool with_ref) {
  ok_or_die(gna::sm80_supports(p, t), "sm80_supports");
  const size_t nq = p.batch * p.q_tokens() * p.heads * p.head_dim;
  const size_t nk = p.batch * p.kv_tokens() * p.kv_heads * p.head_dim;
  const size_t nl = p.batch * p.q_tokens() * p.heads;
  auto hq = random_half(nq, g, t), hk = random_half(nk, g, t), hv = random_half(nk, g, t);
  auto hdo = random_half(nq, g, t);
  Buf q(nq * 2), k(nk * 2), v(nk * 2), out(nq * 2), lse(nl * 4), dout(nq * 2), dq(nq * 2),
      dk(nk * 2), dv(nk * 2), ws(workspace_bytes(p));
  CK(cudaMemcpy(q.ptr, hq.data(), nq * 2, cudaMemcpyHostToDevice));
  CK(cudaMemcpy(k.ptr, hk.data(), nk * 2, cudaMemcpyHostToDevice));
  CK(cudaMemcpy(v.ptr, hv.data(), nk * 2, cudaMemcpyHostToDevice));
  CK(cudaMemcpy(dout.ptr, hdo.data(), nq * 2, cudaMemcpyHostToDevice));
  for (Buf* b : {&out, &lse, &dq, &dk, &dv, &ws}) b->poison();
  ok_or_die(forward(p, t, q.ptr, k.ptr, v.ptr, out.ptr, (float*)lse.ptr), "forward");
  CK(cudaGetLastError());
  CK(cudaDeviceSynchronize());
  ok_or_die(backward(p, t, q.ptr, k.ptr, v.ptr, out.ptr, dout.ptr, lse.ptr, dq.ptr, dk.ptr,
                     dv.ptr, ws.ptr),
            "backward");
  CK(cudaGetLastError());
  CK(cudaDeviceSynchronize());
  auto g_dq = download<uint16_t>(dq), g_dk = download<uint16_t>(dk), g_dv = download<uint16_t>(dv);
  // Determinism: a second backward into poisoned buffers must give identical bits (checked
  // where the problem asks for it).
  for (Buf* b : {&dq, &dk, &dv, &ws}) b->poison();
  ok_or_die(backward(p, t, q.ptr, k.ptr, v.ptr, out.ptr, dout.ptr, lse.ptr, dq.ptr, dk.ptr,
                     dv.ptr, ws.ptr),
            "backward (repeat)");
  CK(cudaDeviceSynchronize());
  Errors e{};
  e.deterministic = download<uint16_t>(dq) == g_dq && download<uint16_t>(dk) == g_dk &&
                    download<uint16_t>(dv) == g_dv;
  if (!with_ref) return e;
  Ref r = reference(p, widen(hq, t), widen(hk, t), widen(hv, t), widen(hdo, t));
  auto g_lse = download<float>(lse);
  e.out = rel_err(widen(download<uint16_t>(out), t), r.out);
  e.lse = rel_err(std::vector<double>(g_lse.begin(), g_lse.end()), r.lse);
  e.dq = rel_err(widen(g_dq, t), r.dq);
  e.dk = rel_err(widen(g_dk, t), r.dk);
  e.dv = rel_err(widen(g_dv, t), r.dv);
  return e;
}

// ------------------------------------------------------------------ framed sub-problems
// A random valid frame of the global problem `p`: per axis, a Q slab [q0, q0 + Lq) and a K/V
// frame covering the slab's windows plus 0-4 extra tokens on each side (possibly outside the
// axis). Offsets are multiples of the dilation.
static Problem random_frame(const Problem& p, std::mt19937& g) {
  auto U = [&](int64_t lo, int64_t hi) {
    return std::uniform_int_distribution<int64_t>(lo, hi)(g);
  };
  Problem f = p;
  for (int a = 0; a < p.rank; ++a) {
    Axis& x = f.axes[a];
    const int64_t L = x.length, d = x.dilation;
    x.q_offset = d * U(0, (L - 1) / d);
    x.q_length = U(0, 1) ? U(1, L - x.q_offset) : L - x.q_offset;
    if (U(0, 3) == 0) x.q_offset = 0, x.q_length = L;  // whole axis, halos only
    int64_t lo = L, hi = 0;  // global tokens the slab's windows need
    for (int64_t r = 0; r < d; ++r) {
      const int64_t n = gna::group_length(x.q_length, d, r);
      if (n == 0) continue;
      const int64_t lg = gna::group_length(L, d, r), first = x.q_offset / d;
      int64_t s0, e0, s1, e1;
      gna::window_bounds(first, lg, x.kernel, x.stride, x.causal, &s0, &e0);
      gna::window_bounds(first + n - 1, lg, x.kernel, x.stride, x.causal, &s1, &e1);
      lo = std::min(lo, s0 * d + r);
      hi = std::max(hi, (e1 - 1) * d + r + 1);
    }
    int64_t k0 = lo - U(0, 4);
    k0 -= ((k0 % d) + d) % d;  // round down to a multiple of d
    x.kv_offset = k0;
    x.kv_length = hi + U(0, 4) - k0;
    if (const char* why = gna::frame_error(x)) {
      std::fprintf(stderr, "random_frame drew an invalid frame: %s\n", why);
      std::exit(2);
    }
  }
  return f;
}

// Global token of local token `t` of a buffer with axis lengths `len` and offsets `off` of the
// global problem `p`; -1 if outside the global axes.
static int64_t global_token(const Problem& p, int64_t t, const int64_t* len, const int64_t* off) {
  int64_t c[3];
  for (int a = 2; a >= 0; --a) c[a] = t % len[a], t /= len[a];
  int64_t out = 0;
  for (int a = 0; a < 3; ++a) {
    const int64_t x = c[a] + off[a];
    if (x < 0 || x >= p.axes[a].length) return -1;
    out = out * p.axes[a].length + x;
  }
  return out;
}

struct FramedErrors {
  double out, lse, dq, dk, dv;
  bool padding_zero;  // dK/dV rows outside the global axes are exactly 0
};

// Runs the framed sub-problem `f` of the global problem `p` and compares it with the float64
// reference of `p` (dO zero outside the Q slab).
static FramedErrors run_framed(const Problem& p, const Problem& f, DType t, std::mt19937& g) {
  ok_or_die(gna::sm80_supports(f, t), "sm80_supports(framed)");
  const int64_t B = p.batch, H = p.heads, Hk = p.kv_heads, D = p.head_dim;
  const int64_t N = p.q_tokens(), Nq = f.q_tokens(), Nk = f.kv_tokens();
  int64_t qlen[3], qoff[3], klen[3], koff[3];
  for (int a = 0; a < 3; ++a) {
    qlen[a] = f.axes[a].q_length, qoff[a] = f.axes[a].q_offset;
    klen[a] = f.axes[a].kv_length, koff[a] = f.axes[a].kv_offset;
  }
  std::vector<int64_t> q_src(Nq), k_src(Nk);
  for (int64_t i = 0; i < Nq; ++i) q_src[i] = global_token(p, i, qlen, qoff);
  for (int64_t i = 0; i < Nk; ++i) k_src[i] = global_token(p, i, klen, koff);
  // Global inputs; dO only on the slab.
  auto hq = random_half(B * N * H * D, g, t), hk = random_half(B * N * Hk * D, g, t),
       hv = random_half(B * N * Hk * D, g, t);
  std::vector<uint16_t> hdo(B * N * H * D, to_half(0.f, t));
  {
    auto slab = random_half(B * Nq * H * D, g, t);
    for (int64_t b = 0; b < B; ++b)
      for (int64_t i = 0; i < Nq; ++i)
        std::copy_n(&slab[((b * Nq + i) * H) * D], H * D, &hdo[((b * N + q_src[i]) * H) * D]);
  }
  Ref r = reference(p, widen(hq, t), widen(hk, t), widen(hv, t), widen(hdo, t));
  // Local buffers: slices of the global ones; K/V rows outside the axes hold garbage.
  std::vector<uint16_t> lq(B * Nq * H * D), ldo(B * Nq * H * D), lk(B * Nk * Hk * D),
      lv(B * Nk * Hk * D);
  auto garbage = random_half(lk.size(), g, t, 1e4f);
  for (size_t i = 0; i < garbage.size(); i += 3) garbage[i] = 0xFFFF;  // NaN
  for (int64_t b = 0; b < B; ++b) {
    for (int64_t i = 0; i < Nq; ++i) {
      std::copy_n(&hq[((b * N + q_src[i]) * H) * D], H * D, &lq[((b * Nq + i) * H) * D]);
      std::copy_n(&hdo[((b * N + q_src[i]) * H) * D], H * D, &ldo[((b * Nq + i) * H) * D]);
    }
    for (int64_t i = 0; i < Nk; ++i) {
      const int64_t dst = ((b * Nk + i) * Hk) * D;
      if (k_src[i] < 0) {
        std::copy_n(&garbage[dst], Hk * D, &lk[dst]);
        std::copy_n(&garbage[dst], Hk * D, &lv[dst]);
      } else {
        std::copy_n(&hk[((b * N + k_src[i]) * Hk) * D], Hk * D, &lk[dst]);
        std::copy_n(&hv[((b * N + k_src[i]) * Hk) * D], Hk * D, &lv[dst]);
      }
    }
  }
  const size_t nq = lq.size(), nk = lk.size(), nl = B * Nq * H;
  Buf q(nq * 2), k(nk * 2), v(nk * 2), out(nq * 2), lse(nl * 4), dout(nq * 2), dq(nq * 2),
      dk(nk * 2), dv(nk * 2), ws(workspace_bytes(f));
  CK(cudaMemcpy(q.ptr, lq.data(), nq * 2, cudaMemcpyHostToDevice));
  CK(cudaMemcpy(k.ptr, lk.data(), nk * 2, cudaMemcpyHostToDevice));
  CK(cudaMemcpy(v.ptr, lv.data(), nk * 2, cudaMemcpyHostToDevice));
  CK(cudaMemcpy(dout.ptr, ldo.data(), nq * 2, cudaMemcpyHostToDevice));
  for (Buf* b : {&out, &lse, &dq, &dk, &dv, &ws}) b->poison();
  ok_or_die(forward(f, t, q.ptr, k.ptr, v.ptr, out.ptr, (float*)lse.ptr),
            "forward(framed)");
  CK(cudaDeviceSynchronize());
  ok_or_die(backward(f, t, q.ptr, k.ptr, v.ptr, out.ptr, dout.ptr, lse.ptr, dq.ptr, dk.ptr,
                     dv.ptr, ws.ptr),
            "backward(framed)");
  CK(cudaDeviceSynchronize());
  // Expected slices of the global reference (dK/dV rows outside the axes: 0).
  std::vector<double> e_out(nq), e_lse(nl), e_dq(nq), e_dk(nk, 0.0), e_dv(nk, 0.0);
  for (int64_t b = 0; b < B; ++b) {
    for (int64_t i = 0; i < Nq; ++i) {
      std::copy_n(&r.out[((b * N + q_src[i]) * H) * D], H * D, &e_out[((b * Nq + i) * H) * D]);
      std::copy_n(&r.dq[((b * N + q_src[i]) * H) * D], H * D, &e_dq[((b * Nq + i) * H) * D]);
      std::copy_n(&r.lse[(b * N + q_src[i]) * H], H, &e_lse[(b * Nq + i) * H]);
    }
    for (int64_t i = 0; i < Nk; ++i) {
      if (k_src[i] < 0) continue;
      std::copy_n(&r.dk[((b * N + k_src[i]) * Hk) * D], Hk * D, &e_dk[((b * Nk + i) * Hk) * D]);
      std::copy_n(&r.dv[((b * N + k_src[i]) * Hk) * D], Hk * D, &e_dv[((b * Nk + i) * Hk) * D]);
    }
  }
  auto g_lse = download<float>(lse);
  auto g_dk = widen(download<uint16_t>(dk), t), g_dv = widen(download<uint16_t>(dv), t);
  FramedErrors e{};
  e.out = rel_err(widen(download<uint16_t>(out), t), e_out);
  e.lse = rel_err(std::vector<double>(g_lse.begin(), g_lse.end()), e_lse);
  e.dq = rel_err(widen(download<uint16_t>(dq), t), e_dq);
  e.dk = rel_err(g_dk, e_dk);
  e.dv = rel_err(g_dv, e_dv);
  e.padding_zero = true;
  for (int64_t b = 0; b < B; ++b)
    for (int64_t i = 0; i < Nk; ++i)
      if (k_src[i] < 0)
        for (int64_t j = 0; j < Hk * D; ++j) {
          const int64_t at = ((b * Nk + i) * Hk) * D + j;
          e.padding_zero = e.padding_zero && g_dk[at] == 0.0 && g_dv[at] == 0.0;
        }
  return e;
}

static std::string describe_frame(const Problem& f) {
  std::string s = "frame";
  char buf[128];
  for (int a = 0; a < f.rank; ++a) {
    const Axis& x = f.axes[a];
    std::snprintf(buf, sizeof buf, " [q %ld+%ld kv %ld+%ld]", (long)x.q_offset,
                  (long)x.q_length, (long)x.kv_offset, (long)x.kv_length);
    s += buf;
  }
  return s;
}

// Checks one framed run against the tolerances of `t`; prints failures (and `verbose` runs).
static bool framed_ok(const Problem& p, const Problem& f, DType t, std::mt19937& g, int id,
                      bool verbose, double worst[5]) {
  const double tol_f = t == DType::kBFloat16 ? 2e-2 : 5e-3;
  const double tol_b = t == DType::kBFloat16 ? 4e-2 : 1e-2;
  FramedErrors e = run_framed(p, f, t, g);
  const double errs[5] = {e.out, e.lse, e.dq, e.dk, e.dv};
  const bool ok = e.padding_zero && e.out < tol_f && e.lse < tol_f && e.dq < tol_b &&
                  e.dk < tol_b && e.dv < tol_b;
  for (int i = 0; i < 5; ++i) worst[i] = std::max(worst[i], errs[i]);
  if (!ok || verbose)
    std::printf("%s framed %d: %s %s out %.2e lse %.2e dq %.2e dk %.2e dv %.2e pad0 %d\n",
                ok ? "ok  " : "FAIL", id, describe(p, t).c_str(), describe_frame(f).c_str(),
                e.out, e.lse, e.dq, e.dk, e.dv, (int)e.padding_zero);
  return ok;
}

// Fills a large device buffer with hashed pseudo-normal values (timing inputs are too big
// to draw on the host): Irwin-Hall sum of 4 uniforms, centred, unit variance.
__global__ void fill_random(uint16_t* x, size_t n, uint32_t seed, bool bf16) {
  for (size_t i = blockIdx.x * (size_t)blockDim.x + threadIdx.x; i < n;
       i += (size_t)gridDim.x * blockDim.x) {
    uint32_t h = (uint32_t)i * 0x9E3779B9u ^ seed;
    float acc = 0.f;
    for (int r = 0; r < 4; ++r) {
      h ^= h >> 16; h *= 0x7feb352du; h ^= h >> 15; h *= 0x846ca68bu; h ^= h >> 16;
      acc += (h & 0xFFFFFF) * (1.f / 16777216.f);
    }
    const float val = (acc - 2.f) * 1.7320508f;
    if (bf16) {
      __nv_bfloat16 b = __float2bfloat16(val);
      x[i] = *reinterpret_cast<uint16_t*>(&b);
    } else {
      __half hv = __float2half(val);
      x[i] = *reinterpret_cast<uint16_t*>(&hv);
    }
  }
}

// ------------------------------------------------------------------ modes
static int check(int n, unsigned seed) {
  std::mt19937 g(seed);
  int failed = 0, framed = 0, framed_failed = 0;
  double worst[5] = {0, 0, 0, 0, 0}, worst_framed[5] = {0, 0, 0, 0, 0};
  for (int c = 0; c < n; ++c) {
    Problem p = random_problem(g);
    const DType t = c % 2 ? DType::kFloat16 : DType::kBFloat16;
    p.deterministic = c % 4 < 2;  // both dtypes either way
    // bf16 has 8 mantissa bits, f16 11: the backward rounds P and dS to the input type.
    const double tol_f = t == DType::kBFloat16 ? 2e-2 : 5e-3;
    const double tol_b = t == DType::kBFloat16 ? 4e-2 : 1e-2;
    Errors e = run_one(p, t, g, true);
    const double errs[5] = {e.out, e.lse, e.dq, e.dk, e.dv};
    bool ok = (e.deterministic || !p.deterministic) && e.out < tol_f && e.lse < tol_f &&
              e.dq < tol_b && e.dk < tol_b && e.dv < tol_b;
    for (int i = 0; i < 5; ++i) worst[i] = std::max(worst[i], errs[i]);
    if (!ok || c < 3) {
      std::printf("%s config %d: %s out %.2e lse %.2e dq %.2e dk %.2e dv %.2e det %d\n",
                  ok ? "ok  " : "FAIL", c, describe(p, t).c_str(), e.out, e.lse, e.dq, e.dk,
                  e.dv, (int)e.deterministic);
    }
    failed += !ok;
    if (c % 3 == 0) {
      const Problem f = random_frame(p, g);
      ++framed;
      framed_failed += !framed_ok(p, f, t, g, c, c < 3, worst_framed);
    }
  }
  std::printf("check: %d configs, %d failed; worst rel err out %.2e lse %.2e dq %.2e dk %.2e dv %.2e\n",
              n, failed, worst[0], worst[1], worst[2], worst[3], worst[4]);
  std::printf("check: %d framed configs, %d failed; worst rel err out %.2e lse %.2e dq %.2e dk %.2e "
              "dv %.2e\n", framed, framed_failed, worst_framed[0], worst_framed[1],
              worst_framed[2], worst_framed[3], worst_framed[4]);
  return failed || framed_failed ? 1 : 0;
}

static int sanitize() {
  std::mt19937 g(7);
  Problem p2 = make_problem(2, {{13, 5, 2, 1, false}, {11, 4, 1, 2, true}}, 1, 2, 1, 64);
  Problem p3 = make_problem(3, {{5, 3, 1, 1, true}, {6, 3, 3, 1, false}, {9, 2, 1, 3, false}}, 1,
                            2, 2, 32);
  // A 3-D case at head dim 64, which the sm90a kernels also cover (GQA, dilation, causal).
  Problem p3b = make_problem(3, {{6, 3, 2, 1, false}, {7, 4, 1, 2, true}, {9, 3, 3, 1, false}},
                             1, 2, 1, 64);
  // Q tiles in pairs that see the same KV boxes, every KV tile a TMA box: the sm90a forward
  // runs them in clusters of two CTAs that multicast K and V (sm90/tile_pairs.h). 2-D: pairs
  // along axis 0 and one leftover tile per line, in a second launch; 1-D: 128-row Q tiles,
  // D = 128, no leftovers.
  Problem pm2 = make_problem(2, {{40, 16, 16, 1, false}, {32, 8, 8, 1, true}}, 1, 2, 1, 64);
  Problem pm1 = make_problem(1, {{1024, 384, 256, 1, false}}, 1, 2, 2, 128);
  setenv("JAX_GNA_SM90_FWD_MULTICAST", "2", /*overwrite=*/0);  // clusters for small boxes too
  int bad = 0;
  Problem p2n = p2, p3bn = p3b;  // the sm90a backward's dq reductions
  p2n.deterministic = p3bn.deterministic = false;
  for (auto* p : {&p2, &p3, &p3b, &p2n, &p3bn, &pm2, &pm1}) {
    Errors e = run_one(*p, DType::kBFloat16, g, true);
    const bool ok = e.out < 2e-2 && e.dq < 4e-2 && e.dk < 4e-2 && e.dv < 4e-2 &&
                    (e.deterministic || !p->deterministic);
    std::printf("sanitize %s: out %.2e dq %.2e dk %.2e dv %.2e %s\n",
                describe(*p, DType::kBFloat16).c_str(), e.out, e.dq, e.dk, e.dv,
                ok ? "ok" : "FAIL");
    bad += !ok;
  }
  // Framed: a slab of p2 with K/V halos reaching outside both axes.
  Problem f2 = p2;
  f2.axes[0].q_offset = 4, f2.axes[0].q_length = 5, f2.axes[0].kv_offset = 0;
  f2.axes[0].kv_length = 13;
  f2.axes[1].q_offset = 0, f2.axes[1].q_length = 11, f2.axes[1].kv_offset = -4;
  f2.axes[1].kv_length = 18;
  double worst[5] = {0, 0, 0, 0, 0};
  bad += !framed_ok(p2, f2, DType::kBFloat16, g, 0, true, worst);
  return bad ? 1 : 0;
}

static double neighbourhood_sum(const Problem& p) {
  // Non-causal problems: every query sees exactly prod(kernel) keys.
  double n = (double)p.q_tokens();
  for (int a = 0; a < p.rank; ++a) n *= (double)p.axes[a].kernel;
  return n;
}

// Defined by a build of the sm80 forward with -DGNA_SM80_FWD_TRACE=1 (cuda/sm80/fwd_trace.cuh):
// prints the phases of its last launch.
extern "C" __attribute__((weak)) void gna_sm80_fwd_trace_report();
// The same for the sm90a forward (-DGNA_SM90_FWD_TRACE=1, cuda/sm90/fwd_trace.cuh).
extern "C" __attribute__((weak)) void gna_sm90_fwd_trace_report();

static int timing() {
  struct Case {
    std::string name;
    Problem p;
  };
  std::vector<Case> cases = {
      {"FLUX-4K GNA", make_problem(2, {{256, 80, 16, 1, false}, {256, 80, 16, 1, false}}, 1, 24, 24, 128)},
      {"Hunyuan GNA", make_problem(3, {{30, 18, 16, 1, false}, {48, 24, 8, 1, false}, {80, 24, 8, 1, false}}, 1, 24, 24, 128)},
      {"FLUX-4K NA", make_problem(2, {{256, 80, 1, 1, false}, {256, 80, 1, 1, false}}, 1, 24, 24, 128)},
      {"Hunyuan NA", make_problem(3, {{30, 18, 1, 1, false}, {48, 24, 1, 1, false}, {80, 24, 1, 1, false}}, 1, 24, 24, 128)},
      {"1-D 32k GNA s256", make_problem(1, {{32768, 2048, 256, 1, false}}, 1, 1, 1, 128)},
      {"1-D 32k NA", make_problem(1, {{32768, 2048, 1, 1, false}}, 1, 1, 1, 128)},
  };
  // The FLUX-4K problems with 64-token Q tiles (8x8), for the kernels of small Q tiles.
  for (int i : {0, 2}) {
    Case c = cases[i];
    c.name = i == 0 ? "FLUX-4K GNA q64" : "FLUX-4K NA q64";
    c.p.q_tile[1] = 8;
    cases.push_back(c);
  }
  // GNA_TIME_SCAN=1: instead, the 1-D stride-256 problem over windows of 8 to 64 steps and 1
  // or 2 heads (one or two waves of 128-token Q tiles): the kernel time against steps per CTA
  // and CTAs per SM separates the per-step cost from the per-CTA one.
  const char* scan = std::getenv("GNA_TIME_SCAN");
  if (scan != nullptr && std::string(scan) == "1") {
    cases.clear();
    for (int heads : {1, 2})
      for (int window : {1024, 2048, 4096, 8192})
        cases.push_back({"1-D k" + std::to_string(window) + " h" + std::to_string(heads),
                         make_problem(1, {{32768, window, 256, 1, false}}, 1, heads, heads, 128)});
  }
  // GNA_DETERMINISTIC=1 times the deterministic backward (default: the one users get by
  // default, which on Hopper accumulates dq with reductions).
  const char* det = std::getenv("GNA_DETERMINISTIC");
  for (auto& c : cases) c.p.deterministic = det != nullptr && std::string(det) == "1";
  std::mt19937 g(3);
  const DType t = DType::kBFloat16;
  std::printf("%-18s %-26s %9s %9s %9s %9s %9s %9s %9s %9s %9s %9s\n", "problem", "tiles q/kv",
              "fwd ms", "fwd TF/s", "bwd ms", "bwd TF/s", "sm90 fwd", "TF/s", "sm90 bwd", "TF/s",
              "host fwd", "host bwd");
  // GNA_TIME_ONLY=<text>: only the problems whose name contains it (e.g. for a profiler).
  const char* only = std::getenv("GNA_TIME_ONLY");
  // GNA_TIME_KERNELS=<list>: only the kernels named in it (sm80fwd, sm80bwd, sm90fwd,
  // sm90bwd; default all), to save device time when comparing builds; others print 0.
  const char* kernels = std::getenv("GNA_TIME_KERNELS");
  auto timed = [&](const char* name) {
    return kernels == nullptr || std::string(kernels).find(name) != std::string::npos;
  };
  // GNA_TIME_REPS=n: the median of n launches per kernel (default 7 forward, 5 backward); A/B
  // runs of builds whose times differ by a few per cent want more.
  const char* reps_env = std::getenv("GNA_TIME_REPS");
  const int reps = reps_env != nullptr ? std::max(1, std::atoi(reps_env)) : 0;
  const int fwd_reps = reps > 0 ? reps : 7, bwd_reps = reps > 0 ? reps : 5;
  // GNA_TIME_BATCH=n: each sample times n launches back to back (default 1), so that the host
  // time of a launch overlaps the kernel before it, as in a stream of calls.
  const char* batch_env = std::getenv("GNA_TIME_BATCH");
  const int batch = batch_env != nullptr ? std::max(1, std::atoi(batch_env)) : 1;
  for (auto& c : cases) {
    if (only != nullptr && c.name.find(only) == std::string::npos) continue;
    const Problem& p = c.p;
    ok_or_die(gna::sm80_supports(p, t), c.name.c_str());
    const size_t nq = p.batch * p.q_tokens() * p.heads * p.head_dim;
    const size_t nk = p.batch * p.kv_tokens() * p.kv_heads * p.head_dim;
    const size_t nl = p.batch * p.q_tokens() * p.heads;
    Buf q(nq * 2), k(nk * 2), v(nk * 2), out(nq * 2), lse(nl * 4), dout(nq * 2), dq(nq * 2),
        dk(nk * 2), dv(nk * 2), ws(workspace_bytes(p));
    uint32_t seed = (uint32_t)g();
    for (Buf* b : {&q, &k, &v, &dout}) {
      fill_random<<<1024, 256>>>((uint16_t*)b->ptr, b->bytes / 2, seed++, true);
      CK(cudaGetLastError());
    }
    cudaEvent_t e0, e1;
    CK(cudaEventCreate(&e0));
    CK(cudaEventCreate(&e1));
    auto fwd = [&] {
      ok_or_die(gna::sm80_forward(p, t, q.ptr, k.ptr, v.ptr, out.ptr, (float*)lse.ptr, 0), "fwd");
    };
    auto bwd = [&] {
      ok_or_die(gna::sm80_backward(p, t, q.ptr, k.ptr, v.ptr, out.ptr, dout.ptr,
                                   (const float*)lse.ptr, dq.ptr, dk.ptr, dv.ptr, ws.ptr, 0),
                "bwd");
    };
    // The median kernel time per launch (ms); `host_us`, if given, gets the median host time
    // to issue one (µs; the "host" columns), which overlaps the kernels before it where
    // GNA_TIME_BATCH > 1.
    auto time_ms = [&](auto&& fn, int iters, double* host_us = nullptr) {
      fn();
      CK(cudaDeviceSynchronize());
      std::vector<float> ms;
      std::vector<double> host;
      for (int i = 0; i < iters; ++i) {
        CK(cudaEventRecord(e0));
        const auto start = std::chrono::steady_clock::now();
        for (int l = 0; l < batch; ++l) fn();
        host.push_back(std::chrono::duration<double, std::micro>(
                           std::chrono::steady_clock::now() - start).count() / batch);
        CK(cudaEventRecord(e1));
        CK(cudaEventSynchronize(e1));
        float m;
        CK(cudaEventElapsedTime(&m, e0, e1));
        ms.push_back(m / batch);
      }
      CK(cudaGetLastError());
      std::sort(ms.begin(), ms.end());
      std::sort(host.begin(), host.end());
      if (host_us != nullptr) *host_us = host[host.size() / 2];
      return (double)ms[ms.size() / 2];
    };
    const double flops = 4.0 * p.batch * p.heads * p.head_dim * neighbourhood_sum(p);
    fwd();  // out and lse for the backwards, whichever kernels are timed
    const double f = timed("sm80fwd") ? time_ms(fwd, fwd_reps) : 0;
    if (f > 0 && gna_sm80_fwd_trace_report != nullptr) gna_sm80_fwd_trace_report();
    const double bw = timed("sm80bwd") ? time_ms(bwd, bwd_reps) : 0;
    double f90 = 0, b90 = 0, f90_host = 0, b90_host = 0;  // sm90a kernels, where supported
#ifdef GNA_CHECK_SM90
    if (gna::sm90_supports(p, t).empty() && timed("sm90fwd")) {
      f90 = time_ms([&] {
        ok_or_die(gna::sm90_forward(p, t, q.ptr, k.ptr, v.ptr, out.ptr, (float*)lse.ptr, 0),
                  "sm90 fwd");
      }, fwd_reps, &f90_host);
      if (gna_sm90_fwd_trace_report != nullptr) gna_sm90_fwd_trace_report();
    }
    if (gna::sm90_supports(p, t).empty() && timed("sm90bwd")) {
      b90 = time_ms([&] {
        ok_or_die(gna::sm90_backward(p, t, q.ptr, k.ptr, v.ptr, out.ptr, dout.ptr,
                                     (const float*)lse.ptr, dq.ptr, dk.ptr, dv.ptr, ws.ptr, 0),
                  "sm90 bwd");
      }, bwd_reps, &b90_host);
    }
#endif
    char tiles[64];
    std::snprintf(tiles, sizeof tiles, "%ldx%ldx%ld/%ldx%ldx%ld", (long)p.q_tile[0],
                  (long)p.q_tile[1], (long)p.q_tile[2], (long)p.kv_tile[0], (long)p.kv_tile[1],
                  (long)p.kv_tile[2]);
    std::printf("%-18s %-26s %9.3f %9.1f %9.3f %9.1f %9.3f %9.1f %9.3f %9.1f %9.1f %9.1f\n",
                c.name.c_str(), tiles, f, f > 0 ? flops / f * 1e-9 : 0.0, bw,
                bw > 0 ? 2.5 * flops / bw * 1e-9 : 0.0, f90,
                f90 > 0 ? flops / f90 * 1e-9 : 0.0, b90, b90 > 0 ? 2.5 * flops / b90 * 1e-9 : 0.0,
                f90_host, b90_host);
    std::fflush(stdout);
    CK(cudaEventDestroy(e0));
    CK(cudaEventDestroy(e1));
  }
  return 0;
}

__global__ void empty_kernel() {}

// What issuing a launch costs the host, part by part: µs per call (median of 5 rounds of
// `calls` calls, the GPU busy with what they queue) of the runtime and driver calls that the
// launchers make, and of whole sm90a forward and backward calls (sm90_forward and
// sm90_backward: everything the FFI handler runs after unpacking the call).
static int host_costs() {
#ifdef GNA_CHECK_SM90
  auto per_call_us = [](auto&& fn, int calls) {
    fn();
    CK(cudaDeviceSynchronize());
    std::vector<double> us;
    for (int round = 0; round < 5; ++round) {
      const auto start = std::chrono::steady_clock::now();
      for (int i = 0; i < calls; ++i) fn();
      us.push_back(std::chrono::duration<double, std::micro>(
                       std::chrono::steady_clock::now() - start).count() / calls);
      CK(cudaDeviceSynchronize());
    }
    std::sort(us.begin(), us.end());
    return us[2];
  };
  const DType t = DType::kBFloat16;
  const int smem = 64 * 1024;
  auto toy = reinterpret_cast<const void*>(fill_random);
  std::printf("%-58s %9s\n", "host call", "us/call");
  std::printf("%-58s %9.2f\n", "cudaFuncSetAttribute(max dynamic smem), a small kernel",
              per_call_us([&] {
                CK(cudaFuncSetAttribute(toy, cudaFuncAttributeMaxDynamicSharedMemorySize, smem));
              }, 1000));
  {
    cudaLaunchConfig_t config = {};
    cudaLaunchAttribute cluster;
    cluster.id = cudaLaunchAttributeClusterDimension;
    cluster.val.clusterDim.x = 2;
    cluster.val.clusterDim.y = 1;
    cluster.val.clusterDim.z = 1;
    config.gridDim = dim3(132);
    config.blockDim = dim3(384);
    config.dynamicSmemBytes = smem;
    config.attrs = &cluster;
    config.numAttrs = 1;
    std::printf("%-58s %9.2f\n", "cudaOccupancyMaxActiveClusters, 2-CTA clusters", per_call_us([&] {
      int clusters = 0;
      CK(cudaOccupancyMaxActiveClusters(&clusters, toy, &config));
    }, 1000));
  }
  std::printf("%-58s %9.2f\n", "empty kernel launch (<<<1, 32>>>)", per_call_us([&] {
    empty_kernel<<<1, 32>>>();
  }, 1000));
  struct Case {
    const char* name;
    Problem p;
    int calls;
  };
  const Case cases[] = {
      {"1-D 32k GNA s256", make_problem(1, {{32768, 2048, 256, 1, false}}, 1, 1, 1, 128), 200},
      {"1-D 32k NA", make_problem(1, {{32768, 2048, 1, 1, false}}, 1, 1, 1, 128), 200},
      {"FLUX-4K GNA, 1 head (2-CTA clusters)",
       make_problem(2, {{256, 80, 16, 1, false}, {256, 80, 16, 1, false}}, 1, 1, 1, 128), 50},
  };
  for (const Case& c : cases) {
    const Problem& p = c.p;
    ok_or_die(gna::sm90_supports(p, t), c.name);
    const size_t nq = p.batch * p.q_tokens() * p.heads * p.head_dim;
    const size_t nk = p.batch * p.kv_tokens() * p.kv_heads * p.head_dim;
    const size_t nl = p.batch * p.q_tokens() * p.heads;
    Buf q(nq * 2), k(nk * 2), v(nk * 2), out(nq * 2), lse(nl * 4), dout(nq * 2), dq(nq * 2),
        dk(nk * 2), dv(nk * 2), ws(workspace_bytes(p));
    uint32_t seed = 11;
    for (Buf* b : {&q, &k, &v, &dout}) {
      fill_random<<<1024, 256>>>((uint16_t*)b->ptr, b->bytes / 2, seed++, true);
      CK(cudaGetLastError());
    }
    gna::sm90::KvTensorMaps maps;
    std::printf("%-58s %9.2f\n", (std::string(c.name) + ": K and V tensor maps").c_str(),
                per_call_us([&] {
                  gna::sm90::encode_kv_maps(p, k.ptr, v.ptr, CU_TENSOR_MAP_DATA_TYPE_BFLOAT16, 2,
                                            64, &maps);
                }, 1000));
    std::printf("%-58s %9.2f\n", (std::string(c.name) + ": sm90 forward call").c_str(),
                per_call_us([&] {
                  ok_or_die(gna::sm90_forward(p, t, q.ptr, k.ptr, v.ptr, out.ptr,
                                              (float*)lse.ptr, 0), "sm90 fwd");
                }, c.calls));
    std::printf("%-58s %9.2f\n", (std::string(c.name) + ": sm90 backward call").c_str(),
                per_call_us([&] {
                  ok_or_die(gna::sm90_backward(p, t, q.ptr, k.ptr, v.ptr, out.ptr, dout.ptr,
                                               (const float*)lse.ptr, dq.ptr, dk.ptr, dv.ptr,
                                               ws.ptr, 0), "sm90 bwd");
                }, c.calls / 2));
  }
  return 0;
#else
  std::fprintf(stderr, "host needs a build with -DGNA_CHECK_SM90\n");
  return 2;
#endif
}

int main(int argc, char** argv) {
  const std::string mode = argc > 1 ? argv[1] : "check";
  const char* which = std::getenv("GNA_CHECK_KERNELS");
  g_sm90 = which != nullptr && std::string(which) == "sm90";
#ifndef GNA_CHECK_SM90
  if (g_sm90) {
    std::fprintf(stderr, "GNA_CHECK_KERNELS=sm90 needs a build with -DGNA_CHECK_SM90\n");
    return 2;
  }
#endif
  std::printf("kernels: %s\n", g_sm90 ? "sm90a (sm80 where unsupported)" : "sm80");
  if (mode == "check") {
    const int n = argc > 2 ? std::atoi(argv[2]) : 300;
    const unsigned seed = argc > 3 ? (unsigned)std::atoi(argv[3]) : 1234u;
    return check(n, seed);
  }
  if (mode == "sanitize") return sanitize();
  if (mode == "time") return timing();
  if (mode == "host") return host_costs();
  std::fprintf(stderr, "usage: %s check [n] [seed] | sanitize | time | host\n", argv[0]);
  return 2;
}
