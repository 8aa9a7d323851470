// Explicit instantiation of the sm80 forward for bf16, head dim 64 (one per file: the build
// parallelises over them).
#include "forward_impl.cuh"

namespace gna {
namespace sm80 {
GNA_SM80_FORWARD(cutlass::bfloat16_t, 64)
}  // namespace sm80
}  // namespace gna
