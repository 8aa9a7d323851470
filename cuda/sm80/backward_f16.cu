// Explicit instantiations of the sm80 backward for f16 (head dims 32, 64, 128).
#include "backward_impl.cuh"

namespace gna {
namespace sm80 {
#ifndef GNA_SM80_ONLY_D
GNA_SM80_BACKWARD(cutlass::half_t, 32)
GNA_SM80_BACKWARD(cutlass::half_t, 64)
GNA_SM80_BACKWARD(cutlass::half_t, 128)
#else
GNA_SM80_BACKWARD(cutlass::half_t, GNA_SM80_ONLY_D)
#endif
}  // namespace sm80
}  // namespace gna
