// The native CPU implementation of GNA (no XLA, no Python): tiled forward and backward with
// float32 accumulation, driven by the tile geometry of gna_geometry.h.
//
// Buffers are contiguous and heads-last, as in gna_kernels.h: [batch, *spatial, heads, D]
// (q/out/dout/dq), [batch, *spatial, kv_heads, D] (k/v/dk/dv), [batch, *spatial, heads]
// float32 (lse/dlse). Every function returns "" on success, else a message for the user.
#pragma once

#include <cstdint>
#include <string>

#include "gna_problem.h"

namespace gna::cpu {

enum class Elem : int { kFloat32 = 0, kBFloat16 = 1, kFloat16 = 2 };

// out = softmax(scale * q k^T masked) v and lse = its natural log-sum-exp, per query.
std::string forward(const Problem& p, Elem elem, const void* q, const void* k, const void* v,
                    void* out, float* lse);

// Gradients of (out, lse) w.r.t. (q, k, v). `dlse` may be null (zero cotangent). The result
// does not depend on the thread count: every output row is written by exactly one task.
std::string backward(const Problem& p, Elem elem, const void* q, const void* k, const void* v,
                     const void* out, const float* lse, const void* dout, const float* dlse,
                     void* dq, void* dk, void* dv);

// Scalar conversions, exposed for tests of the handler's dtype handling.
float bf16_to_float(uint16_t bits);
uint16_t float_to_bf16(float x);
float f16_to_float(uint16_t bits);
uint16_t float_to_f16(float x);

}  // namespace gna::cpu
