// The XLA FFI contract of the GNA custom calls, shared by every platform's handler.
//
// Targets (one pair per platform, same buffers and attributes):
//   forward:  (q, k, v) -> (out, lse)
//   backward: (q, k, v, out, lse, dout[, dlse]) -> (dq, dk, dv, workspace)
// q/out/dout/dq: [*lead, *spatial, H, D]; k/v/dk/dv: [*lead, *spatial, H_kv, D];
// lse/dlse: [*lead, *spatial, H] float32. All leading dimensions (batch and any vmapped axes)
// are flattened into Problem::batch. `dlse`, the cotangent of lse, is optional. `workspace`
// is a uint8 scratch result of BackwardWorkspaceBytes() bytes (XLA allocates it with the
// outputs; the Python side drops it).
//
// Attributes (jax_gna/native.py passes them with exactly these numpy types):
//   length, q_offset, kv_offset, kernel, stride, dilation, causal, q_tile, kv_tile: int64
//     arrays, one entry per spatial axis (their common length is the spatial rank);
//   scale: float32; deterministic: bool.
// Frames (notes/FRAMES.md): `length` is the global axis length; q's spatial dims are the Q
// frame's lengths, starting at global `q_offset`; k's (and v's) are the K/V frame's, starting
// at `kv_offset` (may be negative). Unframed: length = the spatial dims, offsets 0.
#pragma once

#include <cstdint>
#include <initializer_list>
#include <string>

#include "gna_problem.h"
#include "xla/ffi/api/ffi.h"

namespace gna {

namespace ffi = ::xla::ffi;

// Every attribute of both targets, decoded by XLA in one go (`Binding::Attrs<FfiAttrs>()`).
struct FfiAttrs {
  ffi::Span<const int64_t> length;
  ffi::Span<const int64_t> q_offset;
  ffi::Span<const int64_t> kv_offset;
  ffi::Span<const int64_t> kernel;
  ffi::Span<const int64_t> stride;
  ffi::Span<const int64_t> dilation;
  ffi::Span<const int64_t> causal;
  ffi::Span<const int64_t> q_tile;
  ffi::Span<const int64_t> kv_tile;
  float scale;
  bool deterministic;
};

}  // namespace gna

XLA_FFI_REGISTER_STRUCT_ATTR_DECODING(
    ::gna::FfiAttrs,
    ::xla::ffi::StructMember<::xla::ffi::Span<const int64_t>>("length"),
    ::xla::ffi::StructMember<::xla::ffi::Span<const int64_t>>("q_offset"),
    ::xla::ffi::StructMember<::xla::ffi::Span<const int64_t>>("kv_offset"),
    ::xla::ffi::StructMember<::xla::ffi::Span<const int64_t>>("kernel"),
    ::xla::ffi::StructMember<::xla::ffi::Span<const int64_t>>("stride"),
    ::xla::ffi::StructMember<::xla::ffi::Span<const int64_t>>("dilation"),
    ::xla::ffi::StructMember<::xla::ffi::Span<const int64_t>>("causal"),
    ::xla::ffi::StructMember<::xla::ffi::Span<const int64_t>>("q_tile"),
    ::xla::ffi::StructMember<::xla::ffi::Span<const int64_t>>("kv_tile"),
    ::xla::ffi::StructMember<float>("scale"),
    ::xla::ffi::StructMember<bool>("deterministic"));

namespace gna {

// Appends the forward target's buffers and attributes to a platform binding (which may
// already carry platform context such as the stream). Handler parameters, in order:
// (context..., q, k, v, out, lse, attrs).
template <typename Binding>
auto BindForward(Binding&& b) {
  return std::move(b)
      .template Arg<ffi::AnyBuffer>()                // q
      .template Arg<ffi::AnyBuffer>()                // k
      .template Arg<ffi::AnyBuffer>()                // v
      .template Ret<ffi::AnyBuffer>()                // out
      .template Ret<ffi::Buffer<ffi::F32>>()         // lse
      .template Attrs<FfiAttrs>();
}

// Handler parameters:
// (context..., q, k, v, out, lse, dout, optional dlse, dq, dk, dv, workspace, attrs).
template <typename Binding>
auto BindBackward(Binding&& b) {
  return std::move(b)
      .template Arg<ffi::AnyBuffer>()                // q
      .template Arg<ffi::AnyBuffer>()                // k
      .template Arg<ffi::AnyBuffer>()                // v
      .template Arg<ffi::AnyBuffer>()                // out
      .template Arg<ffi::Buffer<ffi::F32>>()         // lse
      .template Arg<ffi::AnyBuffer>()                // dout
      .template OptionalArg<ffi::Buffer<ffi::F32>>()  // dlse
      .template Ret<ffi::AnyBuffer>()                // dq
      .template Ret<ffi::AnyBuffer>()                // dk
      .template Ret<ffi::AnyBuffer>()                // dv
      .template Ret<ffi::AnyBuffer>()                // workspace
      .template Attrs<FfiAttrs>();
}

namespace detail {

inline std::string dims_str(ffi::Span<const int64_t> d) {
  std::string s = "[";
  for (size_t i = 0; i < d.size(); ++i) s += (i ? ", " : "") + std::to_string(d[i]);
  return s + "]";
}

inline bool same_dims(ffi::Span<const int64_t> a, ffi::Span<const int64_t> b) {
  if (a.size() != b.size()) return false;
  for (size_t i = 0; i < a.size(); ++i)
    if (a[i] != b[i]) return false;
  return true;
}

}  // namespace detail

// Fills `p` from the q/k shapes and the attributes; returns "" or what is wrong. The Python
// layer validates user input first, so an error here means a caller bypassed it.
inline std::string MakeProblem(const FfiAttrs& a, ffi::Span<const int64_t> q_dims,
                               ffi::Span<const int64_t> k_dims, Problem* p) {
  const size_t rank = a.kernel.size();
  if (rank < 1 || rank > static_cast<size_t>(kMaxRank))
    return "GNA custom call: kernel must have 1 to 3 entries, got " + std::to_string(rank);
  for (auto s : {a.length, a.q_offset, a.kv_offset, a.stride, a.dilation, a.causal, a.q_tile,
                 a.kv_tile})
    if (s.size() != rank)
      return "GNA custom call: length, q_offset, kv_offset, kernel, stride, dilation, "
             "causal, q_tile and kv_tile must have one entry per spatial axis";
  if (q_dims.size() < rank + 3)
    return "GNA custom call: q " + detail::dims_str(q_dims) + " must be [batch, " +
           std::to_string(rank) + " spatial axes, heads, head_dim]";
  if (k_dims.size() != q_dims.size())
    return "GNA custom call: k " + detail::dims_str(k_dims) + " and q " +
           detail::dims_str(q_dims) + " must have the same rank";
  const size_t lead = q_dims.size() - rank - 2;
  for (size_t i = 0; i < lead; ++i)
    if (q_dims[i] != k_dims[i])
      return "GNA custom call: q " + detail::dims_str(q_dims) + " and k " +
             detail::dims_str(k_dims) + " differ in a batch dimension";
  p->rank = static_cast<int>(rank);
  p->batch = 1;
  for (size_t i = 0; i < lead; ++i) p->batch *= q_dims[i];
  p->heads = q_dims[lead + rank];
  p->kv_heads = k_dims[lead + rank];
  p->head_dim = q_dims[lead + rank + 1];
  if (k_dims[lead + rank + 1] != p->head_dim)
    return "GNA custom call: q and k head_dim differ";
  if (p->kv_heads < 1 || p->heads % p->kv_heads != 0)
    return "GNA custom call: heads " + std::to_string(p->heads) +
           " must be a multiple of kv heads " + std::to_string(p->kv_heads);
  for (int ax = 0; ax < kMaxRank; ++ax) {
    if (static_cast<size_t>(ax) >= rank) {
      p->axes[ax] = unframed_axis(1, 1, 1, 1, false);
      p->q_tile[ax] = p->kv_tile[ax] = 1;
      continue;
    }
    const Axis axis{a.length[ax],   a.kernel[ax],        a.stride[ax],
                    a.dilation[ax], a.causal[ax] != 0,   a.q_offset[ax],
                    q_dims[lead + ax], a.kv_offset[ax], k_dims[lead + ax]};
    const std::string where = " on spatial axis " + std::to_string(ax);
    if (axis.dilation < 1 || axis.kernel < 1 || axis.kernel * axis.dilation > axis.length)
      return "GNA custom call: need 1 <= kernel and kernel * dilation <= length" + where;
    if (axis.stride < 1 || axis.stride > axis.kernel)
      return "GNA custom call: need 1 <= stride <= kernel" + where;
    if (a.q_tile[ax] < 1 || a.kv_tile[ax] < 1)
      return "GNA custom call: tile sizes must be positive" + where;
    if (const char* why = frame_error(axis))
      return std::string("GNA custom call: ") + why + where + " (length " +
             std::to_string(axis.length) + ", q_offset " + std::to_string(axis.q_offset) +
             ", q_length " + std::to_string(axis.q_length) + ", kv_offset " +
             std::to_string(axis.kv_offset) + ", kv_length " + std::to_string(axis.kv_length) +
             ", dilation " + std::to_string(axis.dilation) + ")";
    p->axes[ax] = axis;
    p->q_tile[ax] = a.q_tile[ax];
    p->kv_tile[ax] = a.kv_tile[ax];
  }
  p->scale = a.scale;
  p->deterministic = a.deterministic;
  return "";
}

// Checks that a buffer has the expected shape; returns "" or a message naming it.
inline std::string CheckDims(const char* name, ffi::Span<const int64_t> got,
                             ffi::Span<const int64_t> want) {
  if (detail::same_dims(got, want)) return "";
  return std::string("GNA custom call: ") + name + " has shape " + detail::dims_str(got) +
         ", expected " + detail::dims_str(want);
}

// The lse shape: q's shape without head_dim.
inline std::string CheckLseDims(const char* name, ffi::Span<const int64_t> got,
                                ffi::Span<const int64_t> q_dims) {
  if (q_dims.size() == 0) return "GNA custom call: q must not be a scalar";
  return CheckDims(name, got, q_dims.first(q_dims.size() - 1));
}

// "" if all listed dtypes equal the first, else the rule.
inline std::string SameDtype(std::initializer_list<ffi::DataType> dtypes) {
  for (ffi::DataType d : dtypes)
    if (d != *dtypes.begin()) return "GNA custom call: q, k, v and outputs must share a dtype";
  return "";
}

// Every platform-independent check of a forward call; fills `p`. Returns "" or the first
// error.
inline std::string CheckForwardCall(const FfiAttrs& a, const ffi::AnyBuffer& q,
                                    const ffi::AnyBuffer& k, const ffi::AnyBuffer& v,
                                    const ffi::AnyBuffer& out,
                                    ffi::Span<const int64_t> lse_dims, Problem* p) {
  for (const std::string& err :
       {MakeProblem(a, q.dimensions(), k.dimensions(), p),
        CheckDims("v", v.dimensions(), k.dimensions()),
        CheckDims("out", out.dimensions(), q.dimensions()),
        CheckLseDims("lse", lse_dims, q.dimensions()),
        SameDtype({q.element_type(), k.element_type(), v.element_type(), out.element_type()})})
    if (!err.empty()) return err;
  return "";
}

// Every platform-independent check of a backward call (`dlse_dims` null when dlse is
// absent); fills `p`. Returns "" or the first error.
inline std::string CheckBackwardCall(const FfiAttrs& a, const ffi::AnyBuffer& q,
                                     const ffi::AnyBuffer& k, const ffi::AnyBuffer& v,
                                     const ffi::AnyBuffer& out,
                                     ffi::Span<const int64_t> lse_dims,
                                     const ffi::AnyBuffer& dout,
                                     const ffi::Span<const int64_t>* dlse_dims,
                                     const ffi::AnyBuffer& dq, const ffi::AnyBuffer& dk,
                                     const ffi::AnyBuffer& dv, Problem* p) {
  for (const std::string& err :
       {CheckForwardCall(a, q, k, v, out, lse_dims, p),
        CheckDims("dout", dout.dimensions(), q.dimensions()),
        dlse_dims ? CheckLseDims("dlse", *dlse_dims, q.dimensions()) : std::string(),
        CheckDims("dq", dq.dimensions(), q.dimensions()),
        CheckDims("dk", dk.dimensions(), k.dimensions()),
        CheckDims("dv", dv.dimensions(), k.dimensions()),
        SameDtype({q.element_type(), dout.element_type(), dq.element_type(),
                   dk.element_type(), dv.element_type()})})
    if (!err.empty()) return err;
  return "";
}

}  // namespace gna
