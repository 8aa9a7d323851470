// Placeholder until the sm80 kernels land: every entry point reports that the configuration
// is not implemented, so the FFI path raises a clear error instead of returning garbage.
#include "../gna_kernels.h"

namespace gna {

std::string sm80_supports(const Problem&, DType) {
  return "the sm80 GNA kernels are not implemented yet";
}

std::string sm80_forward(const Problem& p, DType d, const void*, const void*, const void*,
                         void*, float*, cudaStream_t) {
  return sm80_supports(p, d);
}

size_t sm80_backward_workspace(const Problem&) { return 0; }

std::string sm80_backward(const Problem& p, DType d, const void*, const void*, const void*,
                          const void*, const void*, const float*, void*, void*, void*, void*,
                          cudaStream_t) {
  return sm80_supports(p, d);
}

}  // namespace gna
