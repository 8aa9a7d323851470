// Programmatic dependent launch (PDL, compute capability 9.0 on): a grid launched with the
// ProgrammaticStreamSerialization attribute may start while the grid before it in the stream
// still runs. Until `wait_prior_grid` returns (that grid has completed and its writes are
// visible), it must not touch global memory that grid or any before it reads or writes.
// `allow_next_grid` lets the next grid start once every CTA of this one has called it or
// exited (exit alone does the same, later). Both are no-ops where the launch did not ask for
// PDL, and compile to nothing for earlier architectures, so kernels built for sm_80 and
// sm_90 alike may call them.
#pragma once

#include <cuda_runtime.h>

namespace gna {

// The host side: the attribute that makes a launch a programmatic dependent of the work
// before it in its stream.
inline cudaLaunchAttribute dependent_launch_attribute() {
  cudaLaunchAttribute a = {};
  a.id = cudaLaunchAttributeProgrammaticStreamSerialization;
  a.val.programmaticStreamSerializationAllowed = 1;
  return a;
}

__device__ __forceinline__ void wait_prior_grid() {
#if defined(__CUDA_ARCH__) && __CUDA_ARCH__ >= 900
  asm volatile("griddepcontrol.wait;" ::: "memory");
#endif
}

__device__ __forceinline__ void allow_next_grid() {
#if defined(__CUDA_ARCH__) && __CUDA_ARCH__ >= 900
  asm volatile("griddepcontrol.launch_dependents;" ::: "memory");
#endif
}

}  // namespace gna
