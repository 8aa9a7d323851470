// Explicit instantiation of the sm90a forward for bf16, head dim 128.
#include "launch.cuh"

namespace gna {
namespace sm90 {
GNA_SM90_FORWARD(cutlass::bfloat16_t, 128)
}  // namespace sm90
}  // namespace gna

#if GNA_SM90_FWD_TRACE
// The trace of this file's kernels (fwd_trace.cuh), for the harness.
extern "C" void gna_sm90_fwd_trace_report() { gna::sm90::report_fwd_trace(); }
#endif
