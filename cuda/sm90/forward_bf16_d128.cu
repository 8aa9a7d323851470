// Explicit instantiation of the sm90a forward for bf16, head dim 128.
#include "launch.cuh"

namespace gna {
namespace sm90 {
GNA_SM90_FORWARD(cutlass::bfloat16_t, 128)
}  // namespace sm90
}  // namespace gna
