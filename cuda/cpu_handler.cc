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

// All listed buffers must have the dtype of the first.
std::string same_dtype(std::initializer_list<ffi::DataType> dtypes) {
  for (ffi::DataType d : dtypes)
    if (d != *dtypes.begin()) return "GNA custom call: q, k, v and outputs must share a dtype";
  return "";
}

ffi::Error CpuForward(ffi::AnyBuffer q, ffi::AnyBuffer k, ffi::AnyBuffer v,
                      ffi::Result<ffi::AnyBuffer> out, ffi::Result<ffi::Buffer<ffi::F32>> lse,
                      FfiAttrs attrs) {
  Problem p;
  cpu::Elem elem = cpu::Elem::kFloat32;
  for (const std::string& err :
       {MakeProblem(attrs, q.dimensions(), k.dimensions(), &p),
        CheckDims("v", v.dimensions(), k.dimensions()),
        CheckDims("out", out->dimensions(), q.dimensions()),
        CheckLseDims("lse", lse->dimensions(), q.dimensions()),
        same_dtype({q.element_type(), k.element_type(), v.element_type(),
                    out->element_type()}),
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
  for (const std::string& err :
       {MakeProblem(attrs, q.dimensions(), k.dimensions(), &p),
        CheckDims("v", v.dimensions(), k.dimensions()),
        CheckDims("out", out.dimensions(), q.dimensions()),
        CheckDims("dout", dout.dimensions(), q.dimensions()),
        CheckLseDims("lse", lse.dimensions(), q.dimensions()),
        dlse ? CheckLseDims("dlse", dlse->dimensions(), q.dimensions()) : std::string(),
        CheckDims("dq", dq->dimensions(), q.dimensions()),
        CheckDims("dk", dk->dimensions(), k.dimensions()),
        CheckDims("dv", dv->dimensions(), k.dimensions()),
        same_dtype({q.element_type(), k.element_type(), v.element_type(), out.element_type(),
                    dout.element_type(), dq->element_type(), dk->element_type(),
                    dv->element_type()}),
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
