// The kernels' launch interface, seen by the CUDA FFI handler. Kernels know nothing of
// Python or XLA: they take a `Problem`, raw device pointers and a stream.
//
// Layout of every buffer: heads-last and contiguous, [batch, *spatial, heads, head_dim] for
// q/k/v/out and their gradients, [batch, *spatial, heads] float32 for lse. An empty string
// means success; anything else is an error message for the user.
#pragma once

#include <cuda_runtime.h>

#include <cstddef>
#include <string>
#include <vector>

#include "gna_problem.h"

namespace gna {

enum class DType : int { kFloat16 = 0, kBFloat16 = 1 };

// Empty if the sm80 kernels run `p` with `dtype`, else why not (e.g. an unsupported head dim).
std::string sm80_supports(const Problem& p, DType dtype);

std::string sm80_forward(const Problem& p, DType dtype, const void* q, const void* k,
                         const void* v, void* out, float* lse, cudaStream_t stream);

// Scratch bytes of either family's backward: the float32 rowwise dO·O, then, unless
// `p.deterministic`, a float32 dq accumulator (the five-GEMM kernels add each step's dQ into
// it in no fixed order).
size_t backward_workspace(const Problem& p);

// The KV tiles of `p` (Group::init's flat index over the K/V frame's tiles of every dilation
// group), those that the most Q tiles see first, tiles of equal work in index order: the
// order in which the dK/dV kernels' CTAs take them on grids of a few waves.
std::vector<int> kv_tiles_longest_first(const Problem& p);

// Where the workspace's float32 dq accumulator starts, or null if `p.deterministic`.
float* backward_dq_acc(const Problem& p, void* workspace);

// `workspace` holds backward_workspace(p) bytes.
std::string sm80_backward(const Problem& p, DType dtype, const void* q, const void* k,
                          const void* v, const void* out, const void* dout, const float* lse,
                          void* dq, void* dk, void* dv, void* workspace, cudaStream_t stream);

// The sm90a (Hopper) kernels: empty if they run `p` with `dtype` (head_dim 64 or 128 within
// the sm80 limits), else why not. Built only when the extension has JAX_GNA_HAS_SM90.
std::string sm90_supports(const Problem& p, DType dtype);

std::string sm90_forward(const Problem& p, DType dtype, const void* q, const void* k,
                         const void* v, void* out, float* lse, cudaStream_t stream);

// `workspace` holds backward_workspace(p) bytes.
std::string sm90_backward(const Problem& p, DType dtype, const void* q, const void* k,
                          const void* v, const void* out, const void* dout, const float* lse,
                          void* dq, void* dk, void* dv, void* workspace, cudaStream_t stream);

}  // namespace gna
