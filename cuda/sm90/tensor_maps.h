// TMA descriptors (CUtensorMap) of the K and V buffers, so that a KV tile of 64 tokens can be
// loaded as one multi-dimensional box per 64 columns instead of 64 row gathers.
//
// A buffer [B, L0, L1, L2, H_kv, D] is described as the 5-D tensor (innermost first)
// [D, H_kv, L2, L1, B·L0]: the batch folds into the outermost axis (its stride is L0 times
// that axis's), which keeps every rank within TMA's five dimensions. A box is 64 columns of
// one head and the tile's extent per axis, with the dilation as element stride, so it holds
// exactly the tile's tokens in row order (last axis fastest), 128-byte swizzled as the GMMA
// K-major layout expects. Kernels use it only for tiles that lie inside the frame and the
// global axis (Group::tile_inside); the others keep their row gathers.
#pragma once

#include <cuda.h>
#include <cuda_runtime.h>

#include <cstdint>

#include "../gna_problem.h"

namespace gna {
namespace sm90 {

struct KvTensorMaps {
  CUtensorMap k;
  CUtensorMap v;
  int on;  // 0: the problem's tiles are not TMA boxes (or encoding failed); gather every tile
};

namespace detail {

using EncodeTiled = CUresult (*)(CUtensorMap*, CUtensorMapDataType, cuuint32_t, void*,
                                 const cuuint64_t*, const cuuint64_t*, const cuuint32_t*,
                                 const cuuint32_t*, CUtensorMapInterleave, CUtensorMapSwizzle,
                                 CUtensorMapL2promotion, CUtensorMapFloatOOBfill);

// The driver's cuTensorMapEncodeTiled, looked up once through the runtime (no link against
// libcuda); null if the driver does not offer it.
inline EncodeTiled encode_tiled() {
  static const EncodeTiled fn = [] {
    void* f = nullptr;
    cudaDriverEntryPointQueryResult found;
    if (cudaGetDriverEntryPointByVersion("cuTensorMapEncodeTiled", &f, 12000, cudaEnableDefault,
                                         &found) != cudaSuccess ||
        found != cudaDriverEntryPointSuccess)
      return EncodeTiled{nullptr};
    return reinterpret_cast<EncodeTiled>(f);
  }();
  return fn;
}

}  // namespace detail

// Fills `maps` for K and V buffers of `p` (elements of `elem_bytes`, `dtype`), with boxes of
// `tile_rows` tokens; maps->on = 0 where TMA cannot load the problem's KV tiles as boxes.
inline void encode_kv_maps(const Problem& p, const void* k, const void* v,
                           CUtensorMapDataType dtype, int elem_bytes, int tile_rows,
                           KvTensorMaps* maps) {
  maps->on = 0;
  const detail::EncodeTiled encode = detail::encode_tiled();
  if (encode == nullptr) return;
  int64_t rows = 1;
  for (int a = 0; a < kMaxRank; ++a) {
    const Axis& ax = p.axes[a];
    rows *= p.kv_tile[a];
    // TMA: element strides up to 8, boxes up to 256 elements per dimension.
    if (ax.dilation > 8 || p.kv_tile[a] * ax.dilation > 256) return;
  }
  if (rows != tile_rows || p.batch * p.axes[0].kv_length >= (int64_t{1} << 31)) return;
  const uint64_t e = (uint64_t)elem_bytes;
  const cuuint64_t dims[5] = {(cuuint64_t)p.head_dim, (cuuint64_t)p.kv_heads,
                              (cuuint64_t)p.axes[2].kv_length, (cuuint64_t)p.axes[1].kv_length,
                              (cuuint64_t)(p.batch * p.axes[0].kv_length)};
  const cuuint64_t strides[4] = {dims[0] * e, dims[1] * dims[0] * e,
                                 dims[2] * dims[1] * dims[0] * e,
                                 dims[3] * dims[2] * dims[1] * dims[0] * e};
  const cuuint32_t box[5] = {64, 1, (cuuint32_t)(p.kv_tile[2] * p.axes[2].dilation),
                             (cuuint32_t)(p.kv_tile[1] * p.axes[1].dilation),
                             (cuuint32_t)(p.kv_tile[0] * p.axes[0].dilation)};
  const cuuint32_t elem_strides[5] = {1, 1, (cuuint32_t)p.axes[2].dilation,
                                      (cuuint32_t)p.axes[1].dilation,
                                      (cuuint32_t)p.axes[0].dilation};
  for (int i = 0; i < 2; ++i) {
    if (encode(i == 0 ? &maps->k : &maps->v, dtype, 5, const_cast<void*>(i == 0 ? k : v), dims,
               strides, box, elem_strides, CU_TENSOR_MAP_INTERLEAVE_NONE,
               CU_TENSOR_MAP_SWIZZLE_128B, CU_TENSOR_MAP_L2_PROMOTION_L2_256B,
               CU_TENSOR_MAP_FLOAT_OOB_FILL_NONE) != CUDA_SUCCESS)
      return;
  }
  maps->on = 1;
}

}  // namespace sm90
}  // namespace gna
