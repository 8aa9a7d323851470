// XLA FFI handlers of the `cpu` implementation: unpack the call into a gna::Problem, check the
// buffers, run gna::cpu::forward / backward.
#include <string>

#include "cpu_attention.h"
#include "gna_ffi.h"
#include "handlers.h"

namespace gna {
namespace {

// The CPU element type of a buffer, or an error message.
std::string cpu_elem(ffi::DataType dtype, cpu::Elem* elem) {
  switch (dtype) {
    case ffi::DataType::F32: *elem = cpu::Elem::kFloat32; return "";
    case ffi::DataType::BF16: *elem = cpu::Elem::kBFloat16; return "";
    case ffi::DataType::F16: *elem = cpu::Elem::kFloat16; return "";
    default:
      return "implementation='cpu' takes float32, bfloat16 or float16 inputs";
  }
}

ffi::Error CpuForward(ffi::AnyBuffer q, ffi::AnyBuffer k, ffi::AnyBuffer v,
                      ffi::Result<ffi::AnyBuffer> out, ffi::Result<ffi::Buffer<ffi::F32>> lse,
                      FfiAttrs attrs) {
  Problem p;
  cpu::Elem elem = cpu::Elem::kFloat32;
  for (const std::string& err :
       {CheckForwardCall(attrs, q, k, v, *out, lse->dimensions(), &p),
        cpu_elem(q.element_type(), &elem)})
    if (!err.empty()) return ffi::Error::InvalidArgument(err);
  std::string err = cpu::forward(p, elem, q.untyped_data(), k.untyped_data(), v.untyped_data(),
                                 out->untyped_data(), lse->typed_data());
  if (!err.empty()) return ffi::Error::Internal(err);
  return ffi::Error::Success();
}

ffi::Error CpuBackward(ffi::AnyBuffer q, ffi::AnyBuffer k, ffi::AnyBuffer v, ffi::AnyBuffer out,
                       ffi::Buffer<ffi::F32> lse, ffi::AnyBuffer dout,
                       std::optional<ffi::Buffer<ffi::F32>> dlse,
                       ffi::Result<ffi::AnyBuffer> dq, ffi::Result<ffi::AnyBuffer> dk,
                       ffi::Result<ffi::AnyBuffer> dv, ffi::Result<ffi::AnyBuffer> workspace,
                       FfiAttrs attrs) {
  (void)workspace;  // the CPU backward keeps its scratch on the heap
  Problem p;
  cpu::Elem elem = cpu::Elem::kFloat32;
  const auto dlse_dims = dlse ? dlse->dimensions() : ffi::Span<const int64_t>();
  for (const std::string& err :
       {CheckBackwardCall(attrs, q, k, v, out, lse.dimensions(), dout,
                          dlse ? &dlse_dims : nullptr, *dq, *dk, *dv, &p),
        cpu_elem(q.element_type(), &elem)})
    if (!err.empty()) return ffi::Error::InvalidArgument(err);
  std::string err = cpu::backward(
      p, elem, q.untyped_data(), k.untyped_data(), v.untyped_data(), out.untyped_data(),
      lse.typed_data(), dout.untyped_data(), dlse ? dlse->typed_data() : nullptr,
      dq->untyped_data(), dk->untyped_data(), dv->untyped_data());
  if (!err.empty()) return ffi::Error::Internal(err);
  return ffi::Error::Success();
}

}  // namespace
}  // namespace gna

XLA_FFI_DEFINE_HANDLER_SYMBOL(JaxGnaCpuForward, gna::CpuForward,
                              gna::BindForward(xla::ffi::Ffi::Bind()));
XLA_FFI_DEFINE_HANDLER_SYMBOL(JaxGnaCpuBackward, gna::CpuBackward,
                              gna::BindBackward(xla::ffi::Ffi::Bind()));
