// Explicit instantiation of the sm90a backward for f16, head dim 64.
#include "backward_impl.cuh"

namespace gna {
namespace sm90 {
GNA_SM90_BACKWARD(cutlass::half_t, 64)
}  // namespace sm90
}  // namespace gna
