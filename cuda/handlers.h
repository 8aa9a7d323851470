// The FFI handler symbols the Python extension hands to XLA (see jax_gna/native.py).
// CPU handlers always exist; CUDA handlers only in builds with JAX_GNA_HAS_CUDA.
#pragma once

#include <cstddef>
#include <vector>

#include "xla/ffi/api/c_api.h"

extern "C" {
XLA_FFI_Error* JaxGnaCpuForward(XLA_FFI_CallFrame* call_frame);
XLA_FFI_Error* JaxGnaCpuBackward(XLA_FFI_CallFrame* call_frame);
#ifdef JAX_GNA_HAS_CUDA
XLA_FFI_Error* JaxGnaCudaForward(XLA_FFI_CallFrame* call_frame);
XLA_FFI_Error* JaxGnaCudaBackward(XLA_FFI_CallFrame* call_frame);
#endif
}

namespace gna {

struct Problem;

// Bytes of the backward target's `workspace` result on the CUDA platform (0 on CPU).
size_t cuda_backward_workspace(const Problem& p);

// The order in which the CUDA dK/dV kernels take the KV tiles of `p` on grids of a few waves
// (kv_tiles_longest_first, gna_kernels.h).
std::vector<int> cuda_kv_tiles_longest_first(const Problem& p);

// Comma-separated list of the SASS architectures the sm80-family kernels were compiled for
// (e.g. "80,90"); empty in CPU-only builds.
const char* cuda_sm80_archs();

// Whether the CUDA forward and backward use the sm90a kernels on a device of compute
// capability `cc` (10 * major + minor) for the problems they cover: built with them, cc 9.0,
// and not switched off with JAX_GNA_CUDA_KERNELS=sm80.
bool cuda_sm90_enabled(int cc);

}  // namespace gna
