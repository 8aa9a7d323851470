// Explicit instantiation of the sm80 backward for bf16, head dim 128 (one per file: the build
// parallelises over them).
#include "backward_impl.cuh"

namespace gna {
namespace sm80 {
GNA_SM80_BACKWARD(cutlass::bfloat16_t, 128)
}  // namespace sm80
}  // namespace gna
