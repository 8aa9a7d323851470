// Host entry points of the sm90a GNA kernels (see gna_kernels.h): what they cover (the sm80
// kernels' limits, head_dim 64 or 128) and dtype/head-dim dispatch.
#include <cutlass/numeric_types.h>

#include "../gna_kernels.h"
#include "launch.cuh"

namespace gna {

std::string sm90_supports(const Problem& p, DType dtype) {
  std::string why = sm80_supports(p, dtype);  // same tile, rank, head and grid limits
  if (why.empty() && p.head_dim != 64 && p.head_dim != 128)
    why = "the sm90 kernels support head_dim 64 or 128, got " + std::to_string(p.head_dim);
  return why;
}

std::string sm90_forward(const Problem& p, DType dtype, const void* q, const void* k,
                         const void* v, void* out, float* lse, cudaStream_t stream) {
  std::string why = sm90_supports(p, dtype);
  if (!why.empty()) return why;
  using BF16 = cutlass::bfloat16_t;
  using F16 = cutlass::half_t;
  if (p.head_dim == 64) {
    return dtype == DType::kBFloat16
               ? sm90::launch_forward<BF16, 64>(p, q, k, v, out, lse, stream)
               : sm90::launch_forward<F16, 64>(p, q, k, v, out, lse, stream);
  }
  return dtype == DType::kBFloat16
             ? sm90::launch_forward<BF16, 128>(p, q, k, v, out, lse, stream)
             : sm90::launch_forward<F16, 128>(p, q, k, v, out, lse, stream);
}

std::string sm90_backward(const Problem& p, DType dtype, const void* q, const void* k,
                          const void* v, const void* out, const void* dout, const float* lse,
                          void* dq, void* dk, void* dv, void* workspace, cudaStream_t stream) {
  std::string why = sm90_supports(p, dtype);
  if (!why.empty()) return why;
  using BF16 = cutlass::bfloat16_t;
  using F16 = cutlass::half_t;
  float* delta = static_cast<float*>(workspace);
  float* dq_acc = backward_dq_acc(p, workspace);
  auto run = [&](auto launch) {
    return launch(p, q, k, v, out, dout, lse, dq, dk, dv, delta, dq_acc, stream);
  };
  if (p.head_dim == 64) {
    return dtype == DType::kBFloat16 ? run(sm90::launch_backward<BF16, 64>)
                                     : run(sm90::launch_backward<F16, 64>);
  }
  return dtype == DType::kBFloat16 ? run(sm90::launch_backward<BF16, 128>)
                                   : run(sm90::launch_backward<F16, 128>);
}

}  // namespace gna
