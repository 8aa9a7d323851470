// Explicit instantiation of the sm80 backward for f16, head dim 32 (one per file: the build
// parallelises over them).
#include "backward_impl.cuh"

namespace gna {
namespace sm80 {
GNA_SM80_BACKWARD(cutlass::half_t, 32)
}  // namespace sm80
}  // namespace gna
