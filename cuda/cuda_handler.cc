// XLA FFI handlers of the `cuda` implementation: unpack the call into a gna::Problem, pick
// the kernel family for the device's compute capability and call it (gna_kernels.h).
// Plain C++ (no device code): the kernels live in cuda/sm80/*.cu and cuda/sm90/*.cu.
#include <cuda_runtime.h>

#include <atomic>
#include <cstdlib>
#include <string>

#include "gna_ffi.h"
#include "gna_kernels.h"
#include "handlers.h"

#ifndef JAX_GNA_SM80_ARCHS
#error "CMake defines JAX_GNA_SM80_ARCHS (e.g. \"80,90\") for builds with CUDA"
#endif

namespace gna {

const char* cuda_sm80_archs() { return JAX_GNA_SM80_ARCHS; }

// sm_90a code runs on compute capability 9.0 only. JAX_GNA_CUDA_KERNELS=sm80 (read once)
// keeps the sm80 kernels, to compare the two families on one card.
bool cuda_sm90_enabled(int cc) {
#ifdef JAX_GNA_HAS_SM90
  static const bool sm80_only = [] {
    const char* env = std::getenv("JAX_GNA_CUDA_KERNELS");
    return env != nullptr && std::string(env) == "sm80";
  }();
  return cc == 90 && !sm80_only;
#else
  (void)cc;
  return false;
#endif
}

namespace {

constexpr int kMaxDevices = 64;

// Compute capability (10 * major + minor) of `device`, cached; 0 and a message on failure.
int compute_capability(int32_t device, std::string* err) {
  static std::atomic<int> cache[kMaxDevices] = {};
  if (device >= 0 && device < kMaxDevices) {
    if (int cc = cache[device].load(std::memory_order_relaxed)) return cc;
  }
  int major = 0, minor = 0;
  cudaError_t e1 = cudaDeviceGetAttribute(&major, cudaDevAttrComputeCapabilityMajor, device);
  cudaError_t e2 = cudaDeviceGetAttribute(&minor, cudaDevAttrComputeCapabilityMinor, device);
  if (e1 != cudaSuccess || e2 != cudaSuccess) {
    *err = std::string("implementation='cuda': cannot query device ") + std::to_string(device) +
           ": " + cudaGetErrorString(e1 != cudaSuccess ? e1 : e2);
    return 0;
  }
  const int cc = 10 * major + minor;
  if (device >= 0 && device < kMaxDevices) cache[device].store(cc, std::memory_order_relaxed);
  return cc;
}

// SASS built for sm_XY runs on devices of the same major version and minor >= Y.
bool sm80_runs_on(int cc) {
  const std::string archs = JAX_GNA_SM80_ARCHS;
  size_t pos = 0;
  while (pos < archs.size()) {
    size_t comma = archs.find(',', pos);
    if (comma == std::string::npos) comma = archs.size();
    const int arch = std::stoi(archs.substr(pos, comma - pos));
    if (arch / 10 == cc / 10 && arch % 10 <= cc % 10) return true;
    pos = comma + 1;
  }
  return false;
}

// The kernel dtype of a buffer, or an error message.
std::string cuda_dtype(ffi::DataType dtype, DType* out) {
  switch (dtype) {
    case ffi::DataType::F16: *out = DType::kFloat16; return "";
    case ffi::DataType::BF16: *out = DType::kBFloat16; return "";
    default: return "implementation='cuda' takes bfloat16 or float16 inputs";
  }
}

// Checks that a kernel family exists for the device and accepts the problem; the device's
// compute capability goes to `cc`.
ffi::Error select_kernels(const Problem& p, DType dtype, int32_t device, int* cc_out) {
  std::string err;
  const int cc = compute_capability(device, &err);
  *cc_out = cc;
  if (cc == 0) return ffi::Error::Internal(err);
  if (!sm80_runs_on(cc))
    return ffi::Error(ffi::ErrorCode::kUnimplemented,
                      "implementation='cuda' has no kernels for compute capability " +
                          std::to_string(cc / 10) + "." + std::to_string(cc % 10) +
                          " in this build (sm80 kernels built for sm_" +
                          std::string(JAX_GNA_SM80_ARCHS) + "); use implementation='xla'");
  err = sm80_supports(p, dtype);
  if (!err.empty())
    return ffi::Error(ffi::ErrorCode::kUnimplemented, "implementation='cuda': " + err);
  return ffi::Error::Success();
}

bool use_sm90(int cc, const Problem& p, DType dtype) {
  return cuda_sm90_enabled(cc) && sm90_supports(p, dtype).empty();
}

ffi::Error CudaForward(cudaStream_t stream, int32_t device, ffi::AnyBuffer q, ffi::AnyBuffer k,
                       ffi::AnyBuffer v, ffi::Result<ffi::AnyBuffer> out,
                       ffi::Result<ffi::Buffer<ffi::F32>> lse, FfiAttrs attrs) {
  Problem p;
  DType dtype = DType::kBFloat16;
  for (const std::string& err :
       {CheckForwardCall(attrs, q, k, v, *out, lse->dimensions(), &p),
        cuda_dtype(q.element_type(), &dtype)})
    if (!err.empty()) return ffi::Error::InvalidArgument(err);
  if (p.batch == 0) return ffi::Error::Success();
  int cc = 0;
  if (ffi::Error e = select_kernels(p, dtype, device, &cc); e.failure()) return e;
  auto forward = use_sm90(cc, p, dtype) ? sm90_forward : sm80_forward;
  std::string err = forward(p, dtype, q.untyped_data(), k.untyped_data(), v.untyped_data(),
                            out->untyped_data(), lse->typed_data(), stream);
  if (!err.empty()) return ffi::Error::Internal("implementation='cuda': " + err);
  return ffi::Error::Success();
}

ffi::Error CudaBackward(cudaStream_t stream, int32_t device, ffi::AnyBuffer q,
                        ffi::AnyBuffer k, ffi::AnyBuffer v,
                        ffi::AnyBuffer out, ffi::Buffer<ffi::F32> lse, ffi::AnyBuffer dout,
                        std::optional<ffi::Buffer<ffi::F32>> dlse,
                        ffi::Result<ffi::AnyBuffer> dq, ffi::Result<ffi::AnyBuffer> dk,
                        ffi::Result<ffi::AnyBuffer> dv,
                        ffi::Result<ffi::AnyBuffer> workspace, FfiAttrs attrs) {
  Problem p;
  DType dtype = DType::kBFloat16;
  const auto dlse_dims = dlse ? dlse->dimensions() : ffi::Span<const int64_t>();
  for (const std::string& err :
       {CheckBackwardCall(attrs, q, k, v, out, lse.dimensions(), dout,
                          dlse ? &dlse_dims : nullptr, *dq, *dk, *dv, &p),
        cuda_dtype(q.element_type(), &dtype)})
    if (!err.empty()) return ffi::Error::InvalidArgument(err);
  // The sm80 interface has no lse cotangent yet; jax_gna/native.py adds that term itself and
  // never passes dlse to this target.
  if (dlse.has_value())
    return ffi::Error(ffi::ErrorCode::kUnimplemented,
                      "implementation='cuda': the backward kernels take no lse cotangent");
  if (p.batch == 0) return ffi::Error::Success();
  int cc = 0;
  if (ffi::Error e = select_kernels(p, dtype, device, &cc); e.failure()) return e;
  // The workspace is an XLA-allocated result (FFI scratch allocation is not available on
  // every runtime); jax_gna/native.py sizes it with cuda_backward_workspace().
  const size_t bytes = backward_workspace(p);
  if (workspace->size_bytes() < bytes)
    return ffi::Error::InvalidArgument(
        "implementation='cuda': backward workspace has " +
        std::to_string(workspace->size_bytes()) + " bytes, needs " + std::to_string(bytes));
  auto backward = use_sm90(cc, p, dtype) ? sm90_backward : sm80_backward;
  std::string err = backward(p, dtype, q.untyped_data(), k.untyped_data(), v.untyped_data(),
                             out.untyped_data(), dout.untyped_data(), lse.typed_data(),
                             dq->untyped_data(), dk->untyped_data(), dv->untyped_data(),
                             workspace->untyped_data(), stream);
  if (!err.empty()) return ffi::Error::Internal("implementation='cuda': " + err);
  return ffi::Error::Success();
}

}  // namespace

// Both kernel families lay out the same workspace, so its size does not depend on the card.
size_t cuda_backward_workspace(const Problem& p) { return backward_workspace(p); }

std::vector<int> cuda_kv_tiles_longest_first(const Problem& p) {
  return kv_tiles_longest_first(p);
}

}  // namespace gna

XLA_FFI_DEFINE_HANDLER_SYMBOL(
    JaxGnaCudaForward, gna::CudaForward,
    gna::BindForward(xla::ffi::Ffi::Bind()
                         .Ctx<xla::ffi::PlatformStream<cudaStream_t>>()
                         .Ctx<xla::ffi::DeviceOrdinal>()));
XLA_FFI_DEFINE_HANDLER_SYMBOL(
    JaxGnaCudaBackward, gna::CudaBackward,
    gna::BindBackward(xla::ffi::Ffi::Bind()
                          .Ctx<xla::ffi::PlatformStream<cudaStream_t>>()
                          .Ctx<xla::ffi::DeviceOrdinal>()));
