// Explicit instantiation of the sm80 forward for bf16, head dim 128 (one per file: the build
// parallelises over them).
#include "forward_impl.cuh"

namespace gna {
namespace sm80 {
GNA_SM80_FORWARD(cutlass::bfloat16_t, 128)
}  // namespace sm80
}  // namespace gna

#if GNA_SM80_FWD_TRACE
// The trace of this file's kernels (fwd_trace.cuh), for the harness.
extern "C" void gna_sm80_fwd_trace_report() { gna::sm80::report_fwd_trace(); }
#endif
