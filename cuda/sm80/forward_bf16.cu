// Explicit instantiations of the sm80 forward for bf16 (head dims 32, 64, 128).
#include "forward_impl.cuh"

namespace gna {
namespace sm80 {
#ifndef GNA_SM80_ONLY_D
GNA_SM80_FORWARD(cutlass::bfloat16_t, 32)
GNA_SM80_FORWARD(cutlass::bfloat16_t, 64)
GNA_SM80_FORWARD(cutlass::bfloat16_t, 128)
#else
GNA_SM80_FORWARD(cutlass::bfloat16_t, GNA_SM80_ONLY_D)
#endif
}  // namespace sm80
}  // namespace gna
