// The Python extension `_jax_gna_native` (a top-level module, see CMakeLists.txt): FFI
// handler capsules for jax_gna/native.py, build facts, and the C++ tile geometry for
// tests/test_native_geometry.py.
//
// No CUDA headers here: the CUDA handlers are plain symbols declared in handlers.h.
#include <nanobind/nanobind.h>
#include <nanobind/stl/optional.h>
#include <nanobind/stl/pair.h>
#include <nanobind/stl/string.h>
#include <nanobind/stl/vector.h>

#include <cstdint>
#include <optional>
#include <string>
#include <utility>
#include <vector>

#include "backward_tiles.h"
#include "cpu_attention.h"
#include "gna_ffi.h"
#include "gna_geometry.h"
#include "handlers.h"

namespace nb = nanobind;

namespace {

nb::capsule handler_capsule(XLA_FFI_Error* (*fn)(XLA_FFI_CallFrame*)) {
  return nb::capsule(reinterpret_cast<void*>(fn));
}

// {target name: capsule} for one platform ("cpu" or "cuda"); empty if not built.
nb::dict handlers(const std::string& platform) {
  nb::dict out;
  if (platform == "cpu") {
    out["jax_gna_cpu_forward"] = handler_capsule(JaxGnaCpuForward);
    out["jax_gna_cpu_backward"] = handler_capsule(JaxGnaCpuBackward);
  } else if (platform == "cuda") {
#ifdef JAX_GNA_HAS_CUDA
    out["jax_gna_cuda_forward"] = handler_capsule(JaxGnaCudaForward);
    out["jax_gna_cuda_backward"] = handler_capsule(JaxGnaCudaBackward);
#endif
  } else {
    throw nb::value_error("platform must be 'cpu' or 'cuda'");
  }
  return out;
}

using I64s = std::vector<int64_t>;

#ifdef JAX_GNA_HAS_CUDA
// The Problem the FFI handlers would build for these (local) shapes and attributes.
// `length`, `q_offset`, `kv_offset` describe a frame (default: q's spatial dims, zeros).
gna::Problem make_problem(const I64s& q_shape, const I64s& k_shape, const I64s& kernel,
                          const I64s& stride, const I64s& dilation, const I64s& causal,
                          const I64s& q_tile, const I64s& kv_tile,
                          const std::optional<I64s>& length, const std::optional<I64s>& q_offset,
                          const std::optional<I64s>& kv_offset, bool deterministic) {
  using Span = gna::ffi::Span<const int64_t>;
  auto span = [](const I64s& v) { return Span(v.data(), v.size()); };
  const size_t rank = kernel.size();
  if (q_shape.size() < rank + 2) throw nb::value_error("q_shape is shorter than rank + 2");
  const I64s zeros(rank, 0);
  const I64s q_spatial(q_shape.end() - rank - 2, q_shape.end() - 2);
  const gna::FfiAttrs attrs{span(length ? *length : q_spatial),
                            span(q_offset ? *q_offset : zeros),
                            span(kv_offset ? *kv_offset : zeros),
                            span(kernel), span(stride), span(dilation), span(causal),
                            span(q_tile), span(kv_tile), 1.0f, deterministic};
  gna::Problem p;
  const std::string err = gna::MakeProblem(attrs, span(q_shape), span(k_shape), &p);
  if (!err.empty()) throw nb::value_error(err.c_str());
  return p;
}
#endif

// Bytes of the backward target's workspace result for these (local) shapes and attributes.
size_t backward_workspace_bytes(const std::string& platform, const I64s& q_shape,
                                const I64s& k_shape, const I64s& kernel, const I64s& stride,
                                const I64s& dilation, const I64s& causal, const I64s& q_tile,
                                const I64s& kv_tile, const std::optional<I64s>& length,
                                const std::optional<I64s>& q_offset,
                                const std::optional<I64s>& kv_offset, bool deterministic) {
  if (platform == "cpu") return 0;
  if (platform != "cuda") throw nb::value_error("platform must be 'cpu' or 'cuda'");
#ifdef JAX_GNA_HAS_CUDA
  return gna::cuda_backward_workspace(make_problem(q_shape, k_shape, kernel, stride, dilation,
                                                   causal, q_tile, kv_tile, length, q_offset,
                                                   kv_offset, deterministic));
#else
  (void)q_shape, (void)k_shape, (void)kernel, (void)stride, (void)dilation, (void)causal;
  (void)q_tile, (void)kv_tile, (void)length, (void)q_offset, (void)kv_offset;
  (void)deterministic;
  throw nb::value_error("this build has no CUDA handlers");
#endif
}

// The order in which the CUDA dK/dV kernels take the KV tiles of `kv_tile` on grids of a few
// waves (gna::cuda_kv_tiles_longest_first), for tests: host code, no GPU needed.
std::vector<int> kv_tile_order(const I64s& q_shape, const I64s& k_shape, const I64s& kernel,
                               const I64s& stride, const I64s& dilation, const I64s& causal,
                               const I64s& q_tile, const I64s& kv_tile) {
#ifdef JAX_GNA_HAS_CUDA
  return gna::cuda_kv_tiles_longest_first(make_problem(q_shape, k_shape, kernel, stride,
                                                       dilation, causal, q_tile, kv_tile,
                                                       std::nullopt, std::nullopt,
                                                       std::nullopt, false));
#else
  (void)q_shape, (void)k_shape, (void)kernel, (void)stride, (void)dilation, (void)causal;
  (void)q_tile, (void)kv_tile;
  throw nb::value_error("this build has no CUDA handlers");
#endif
}

// The backward's dK/dV CTA boxes for tests (backward_tiles.h; host code, no GPU needed):
// {the KV tile doubled (with_doubled_kv_tile), the sm80 family's KV rows per CTA (128 where
// dkdv_rows_128, else 64)}.
std::pair<I64s, int> backward_ctas(const I64s& q_shape, const I64s& k_shape, const I64s& kernel,
                                   const I64s& stride, const I64s& dilation, const I64s& causal,
                                   const I64s& q_tile, const I64s& kv_tile) {
#ifdef JAX_GNA_HAS_CUDA
  const gna::Problem p = make_problem(q_shape, k_shape, kernel, stride, dilation, causal, q_tile,
                                      kv_tile, std::nullopt, std::nullopt, std::nullopt, false);
  const gna::Problem d = gna::with_doubled_kv_tile(p);
  return {I64s(d.kv_tile, d.kv_tile + d.rank), gna::dkdv_rows_128(p) ? 128 : 64};
#else
  (void)q_shape, (void)k_shape, (void)kernel, (void)stride, (void)dilation, (void)causal;
  (void)q_tile, (void)kv_tile;
  throw nb::value_error("this build has no CUDA handlers");
#endif
}

// A group axis of `length` with a frame (q_len / kv_len default to the whole axis), checked
// with gna::frame_error; raises ValueError naming the broken rule.
gna::AxisTiling checked_tiling(int64_t length, int64_t kernel, int64_t stride, bool causal,
                               int64_t q_tile, int64_t kv_tile, int64_t q_offset,
                               std::optional<int64_t> q_len, int64_t kv_offset,
                               std::optional<int64_t> kv_len) {
  if (length < 1 || kernel < 1 || kernel > length || stride < 1 || stride > kernel ||
      q_tile < 1 || kv_tile < 1)
    throw nb::value_error("axis_tiling needs 1 <= stride <= kernel <= length and tiles >= 1");
  const gna::Axis axis{length,   kernel, stride, 1, causal, q_offset, q_len.value_or(length),
                       kv_offset, kv_len.value_or(length)};
  if (const char* why = gna::frame_error(axis)) throw nb::value_error(why);
  return gna::group_tiling(axis, 0, q_tile, kv_tile);
}

// Per-axis tile geometry as computed by gna_geometry.h (mirrors geometry.axis_tiling).
nb::dict axis_tiling(int64_t length, int64_t kernel, int64_t stride, bool causal,
                     int64_t q_tile, int64_t kv_tile, int64_t q_offset,
                     std::optional<int64_t> q_len, int64_t kv_offset,
                     std::optional<int64_t> kv_len) {
  const gna::AxisTiling t = checked_tiling(length, kernel, stride, causal, q_tile, kv_tile,
                                           q_offset, q_len, kv_offset, kv_len);
  const int64_t n_q = t.n_q(), n_kv = t.n_kv();
  std::vector<int64_t> kv_lo(n_q), kv_hi(n_q), q_lo(n_kv), q_hi(n_kv);
  std::vector<std::vector<bool>> full(n_q, std::vector<bool>(n_kv));
  for (int64_t qt = 0; qt < n_q; ++qt) {
    t.kv_range(qt, &kv_lo[qt], &kv_hi[qt]);
    for (int64_t kt = 0; kt < n_kv; ++kt) full[qt][kt] = t.full(qt, kt);
  }
  std::vector<int64_t> full_q_lo(n_kv), full_q_hi(n_kv);
  for (int64_t kt = 0; kt < n_kv; ++kt) {
    t.q_range(kt, &q_lo[kt], &q_hi[kt]);
    t.full_q_range(kt, &full_q_lo[kt], &full_q_hi[kt]);
  }
  nb::dict out;
  out["kv_lo"] = kv_lo;
  out["kv_hi"] = kv_hi;
  out["q_lo"] = q_lo;
  out["q_hi"] = q_hi;
  out["full"] = full;
  out["full_q_lo"] = full_q_lo;
  out["full_q_hi"] = full_q_hi;
  return out;
}

// Window [start, end) of every Q-frame query of a group axis (global index t + q_offset) in
// local K/V-frame indices (global - kv_offset), as the native implementations use them
// (mirrors geometry.window_bounds).
nb::tuple windows(int64_t group_len, int64_t kernel, int64_t stride, bool causal,
                  int64_t q_offset, std::optional<int64_t> q_len, int64_t kv_offset,
                  std::optional<int64_t> kv_len) {
  if (group_len < 1 || kernel < 1 || kernel > group_len || stride < 1 || stride > kernel)
    throw nb::value_error("windows needs 1 <= stride <= kernel <= group_len");
  const gna::AxisTiling t = checked_tiling(group_len, kernel, stride, causal, 1, 1, q_offset,
                                           q_len, kv_offset, kv_len);
  std::vector<int64_t> start(t.q_len), end(t.q_len);
  for (int64_t ii = 0; ii < t.q_len; ++ii) {
    gna::window_bounds(ii + t.q_offset, group_len, kernel, stride, causal, &start[ii],
                       &end[ii]);
    start[ii] -= t.kv_offset;
    end[ii] -= t.kv_offset;
  }
  return nb::make_tuple(start, end);
}

// gna_geometry.h's TileBits::word: the rows of a KV tile of shape `kv_tile` (product at most
// 64; first row at group indices `origin`, kNoTile for none) with every index in
// [start, end) per axis, as an integer whose bit r is tile row r. Arrays have one entry per
// axis; the axes past them are unused, as in a Problem (extent 1, window [0, 1)).
uint64_t tile_mask_word(const I64s& kv_tile, const I64s& start, const I64s& end,
                        const I64s& origin) {
  const size_t rank = kv_tile.size();
  if (rank < 1 || rank > gna::kMaxRank || start.size() != rank || end.size() != rank ||
      origin.size() != rank)
    throw nb::value_error("kv_tile, start, end and origin need one entry per axis (1 to 3)");
  int64_t tile[gna::kMaxRank] = {1, 1, 1};
  int s[gna::kMaxRank] = {0, 0, 0}, e[gna::kMaxRank] = {1, 1, 1}, o[gna::kMaxRank] = {0, 0, 0};
  int64_t rows = 1;
  for (size_t a = 0; a < rank; ++a) {
    if (kv_tile[a] < 1) throw nb::value_error("kv_tile entries must be positive");
    rows *= kv_tile[a];
    tile[a] = kv_tile[a];
    s[a] = static_cast<int>(start[a]);
    e[a] = static_cast<int>(end[a]);
    o[a] = static_cast<int>(origin[a]);
  }
  if (rows > 64) throw nb::value_error("a KV tile of a mask word has at most 64 rows");
  return gna::TileBits::of(tile).word(s, e, o);
}

// gna_geometry.h's tile_walk_strides: the stride of each axis' tile coordinate in the flat
// index by which the kernels' grids walk `n` tiles per axis (group axes of `length`, windows
// of `kernel`). Arrays have one entry per axis; the axes past them are unused (1 tile).
I64s tile_walk_strides(const I64s& n, const I64s& kernel, const I64s& length) {
  const size_t rank = n.size();
  if (rank < 1 || rank > gna::kMaxRank || kernel.size() != rank || length.size() != rank)
    throw nb::value_error("n, kernel and length need one entry per axis (1 to 3)");
  int64_t nn[gna::kMaxRank] = {1, 1, 1}, k[gna::kMaxRank] = {1, 1, 1},
          len[gna::kMaxRank] = {1, 1, 1}, stride[gna::kMaxRank];
  for (size_t a = 0; a < rank; ++a) {
    if (n[a] < 1 || kernel[a] < 1 || kernel[a] > length[a])
      throw nb::value_error("tile_walk_strides needs n >= 1 and 1 <= kernel <= length");
    nn[a] = n[a];
    k[a] = kernel[a];
    len[a] = length[a];
  }
  gna::tile_walk_strides<int64_t>(nn, k, len, stride);
  return I64s(stride, stride + rank);
}

}  // namespace

NB_MODULE(_jax_gna_native, m) {
  m.doc() = "jax_gna native part: XLA FFI handlers and the C++ tile geometry.";
  m.def("handlers", &handlers, nb::arg("platform"),
        "{FFI target name: handler capsule} of a platform ('cpu' or 'cuda').");
  m.def("has_cuda", []() {
#ifdef JAX_GNA_HAS_CUDA
    return true;
#else
    return false;
#endif
  }, "Whether this build contains the CUDA handlers and kernels.");
  m.def("cuda_sm80_archs", []() {
#ifdef JAX_GNA_HAS_CUDA
    return std::string(gna::cuda_sm80_archs());
#else
    return std::string();
#endif
  }, "SASS architectures of the sm80 kernel family ('' without CUDA).");
  m.def("cuda_sm90_enabled", [](int cc) {
#ifdef JAX_GNA_HAS_CUDA
    return gna::cuda_sm90_enabled(cc);
#else
    (void)cc;
    return false;
#endif
  }, nb::arg("cc"),
        "Whether the CUDA forward and backward run the sm90a kernels on compute capability `cc` "
        "(10 * major + minor): built with it, cc 90, JAX_GNA_CUDA_KERNELS != 'sm80'.");
  m.def("backward_workspace_bytes", &backward_workspace_bytes, nb::arg("platform"),
        nb::arg("q_shape"), nb::arg("k_shape"), nb::arg("kernel"), nb::arg("stride"),
        nb::arg("dilation"), nb::arg("causal"), nb::arg("q_tile"), nb::arg("kv_tile"),
        nb::arg("length") = nb::none(), nb::arg("q_offset") = nb::none(),
        nb::arg("kv_offset") = nb::none(), nb::arg("deterministic") = false,
        "Bytes of the backward custom call's workspace result (frame: global `length`, "
        "`q_offset`, `kv_offset` per spatial axis; default unframed). Without "
        "`deterministic`, on a device that runs the sm90a kernels, it includes a float32 dq "
        "accumulator.");
  m.def("kv_tile_order", &kv_tile_order, nb::arg("q_shape"), nb::arg("k_shape"),
        nb::arg("kernel"), nb::arg("stride"), nb::arg("dilation"), nb::arg("causal"),
        nb::arg("q_tile"), nb::arg("kv_tile"),
        "The flat KV tiles in the order the CUDA dK/dV kernels take them on grids of a few "
        "waves: those that the most Q tiles see first (CUDA builds only; host code).");
  m.def("backward_ctas", &backward_ctas, nb::arg("q_shape"), nb::arg("k_shape"),
        nb::arg("kernel"), nb::arg("stride"), nb::arg("dilation"), nb::arg("causal"),
        nb::arg("q_tile"), nb::arg("kv_tile"),
        "The CUDA backward's dK/dV CTA boxes: (kv_tile doubled along one axis, the sm80 "
        "family's KV rows per CTA: 128 on the doubled tile or 64 on kv_tile) (CUDA builds "
        "only; host code).");
  m.def("axis_tiling", &axis_tiling, nb::arg("length"), nb::arg("kernel"), nb::arg("stride"),
        nb::arg("causal"), nb::arg("q_tile"), nb::arg("kv_tile"), nb::arg("q_offset") = 0,
        nb::arg("q_len") = nb::none(), nb::arg("kv_offset") = 0,
        nb::arg("kv_len") = nb::none(),
        "gna_geometry.h's AxisTiling (group units, optional frame) as "
        "{kv_lo, kv_hi, q_lo, q_hi, full, full_q_lo, full_q_hi}.");
  m.def("windows", &windows, nb::arg("group_len"), nb::arg("kernel"), nb::arg("stride"),
        nb::arg("causal"), nb::arg("q_offset") = 0, nb::arg("q_len") = nb::none(),
        nb::arg("kv_offset") = 0, nb::arg("kv_len") = nb::none(),
        "gna_geometry.h's window_bounds of every Q-frame query, in K/V-frame indices.");
  m.def("tile_mask_word", &tile_mask_word, nb::arg("kv_tile"), nb::arg("start"),
        nb::arg("end"), nb::arg("origin"),
        "gna_geometry.h's TileBits::word (the kernels' element-mask words) as an int.");
  m.def("tile_walk_strides", &tile_walk_strides, nb::arg("n"), nb::arg("kernel"),
        nb::arg("length"),
        "gna_geometry.h's tile_walk_strides: per axis, the stride of its tile coordinate in "
        "the kernels' flat tile index.");
  m.def("f16_roundtrip", [](float x) { return gna::cpu::f16_to_float(gna::cpu::float_to_f16(x)); },
        nb::arg("x"), "float -> float16 -> float with the CPU handler's conversion.");
  m.def("bf16_roundtrip",
        [](float x) { return gna::cpu::bf16_to_float(gna::cpu::float_to_bf16(x)); },
        nb::arg("x"), "float -> bfloat16 -> float with the CPU handler's conversion.");
}
