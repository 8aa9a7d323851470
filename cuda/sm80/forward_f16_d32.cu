// Explicit instantiation of the sm80 forward for f16, head dim 32 (one per file: the build
// parallelises over them).
#include "forward_impl.cuh"

namespace gna {
namespace sm80 {
GNA_SM80_FORWARD(cutlass::half_t, 32)
}  // namespace sm80
}  // namespace gna
