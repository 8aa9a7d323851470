// TMA descriptors (CUtensorMap) of the K and V buffers (and of Q and dO for the dK/dV kernel),
// so that a KV tile of 64 tokens (or 64 rows of a Q tile) can be loaded as one
// multi-dimensional box per 64 columns instead of 64 row gathers.
//
// A buffer [B, L0, L1, L2, H_kv, D] is described as the 5-D tensor (innermost first)
// [D, H_kv, L2, L1, B·L0]: the batch folds into the outermost axis (its stride is L0 times
// that axis's), which keeps every rank within TMA's five dimensions. A box is 128 bytes of
// columns (64 of a 16-bit type, 32 floats) of one head and the tile's extent per axis, with
// the dilation as element stride, so it holds exactly the tile's tokens in row order (last
// axis fastest), 128-byte swizzled as the GMMA K-major layout expects. Kernels use it only
// for tiles that lie inside the frame and the global axis (Group::tile_inside); the others
// keep their row gathers.
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

// The forward's maps: K and V, and Q where its tiles are boxes of exactly the CTA's rows.
struct FwdTensorMaps : KvTensorMaps {
  CUtensorMap q;
  int q_on;  // 0: every Q tile is gathered
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

// Encodes `map` over a [B, L0, L1, L2, H, D] buffer of `p` (the Q side: q_length and heads;
// the K/V side: kv_length and kv_heads) as [D, H, L2, L1, B·L0], with boxes of 128 bytes of
// columns times box[a] tokens per axis a (the dilation as element stride). False where TMA
// cannot.
inline bool encode_token_map(CUtensorMap* map, const void* ptr, const Problem& p, bool kv_side,
                             const int64_t box[kMaxRank], CUtensorMapDataType dtype,
                             int elem_bytes) {
  const detail::EncodeTiled encode = detail::encode_tiled();
  if (encode == nullptr) return false;
  auto length = [&](int a) { return kv_side ? p.axes[a].kv_length : p.axes[a].q_length; };
  for (int a = 0; a < kMaxRank; ++a) {
    // TMA: element strides up to 8, boxes up to 256 elements per dimension.
    const int64_t d = p.axes[a].dilation;
    if (d > 8 || box[a] * d > 256) return false;
  }
  if (p.batch * length(0) >= (int64_t{1} << 31)) return false;
  const uint64_t e = (uint64_t)elem_bytes;
  const cuuint64_t dims[5] = {(cuuint64_t)p.head_dim,
                              (cuuint64_t)(kv_side ? p.kv_heads : p.heads),
                              (cuuint64_t)length(2), (cuuint64_t)length(1),
                              (cuuint64_t)(p.batch * length(0))};
  const cuuint64_t strides[4] = {dims[0] * e, dims[1] * dims[0] * e,
                                 dims[2] * dims[1] * dims[0] * e,
                                 dims[3] * dims[2] * dims[1] * dims[0] * e};
  cuuint32_t box_dims[5] = {(cuuint32_t)(128 / elem_bytes), 1, 1, 1, 1};
  cuuint32_t elem_strides[5] = {1, 1, 1, 1, 1};
  for (int a = 0; a < kMaxRank; ++a) {
    box_dims[4 - a] = (cuuint32_t)(box[a] * p.axes[a].dilation);
    elem_strides[4 - a] = (cuuint32_t)p.axes[a].dilation;
  }
  return encode(map, dtype, 5, const_cast<void*>(ptr), dims, strides, box_dims, elem_strides,
                CU_TENSOR_MAP_INTERLEAVE_NONE, CU_TENSOR_MAP_SWIZZLE_128B,
                CU_TENSOR_MAP_L2_PROMOTION_L2_256B,
                CU_TENSOR_MAP_FLOAT_OOB_FILL_NONE) == CUDA_SUCCESS;
}

// Fills `maps` for K and V buffers of `p` (elements of `elem_bytes`, `dtype`), with boxes of
// `tile_rows` tokens; maps->on = 0 where TMA cannot load the problem's KV tiles as boxes.
inline void encode_kv_maps(const Problem& p, const void* k, const void* v,
                           CUtensorMapDataType dtype, int elem_bytes, int tile_rows,
                           KvTensorMaps* maps) {
  maps->on = p.kv_tile[0] * p.kv_tile[1] * p.kv_tile[2] == tile_rows &&
             encode_token_map(&maps->k, k, p, /*kv_side=*/true, p.kv_tile, dtype, elem_bytes) &&
             encode_token_map(&maps->v, v, p, /*kv_side=*/true, p.kv_tile, dtype, elem_bytes);
}

// Encodes `map` over the Q buffer `q` of `p` with boxes of one Q tile (128 bytes of columns
// times q_tile[a] tokens per axis), where a tile holds exactly `rows` tokens; false where it
// does not or TMA cannot.
inline bool encode_q_tile_map(CUtensorMap* map, const void* q, const Problem& p,
                              CUtensorMapDataType dtype, int elem_bytes, int rows) {
  return p.q_tile[0] * p.q_tile[1] * p.q_tile[2] == rows &&
         encode_token_map(map, q, p, /*kv_side=*/false, p.q_tile, dtype, elem_bytes);
}

#ifdef __CUDACC__
// TMA coordinates, after the column, in a Q-side map (encode_token_map with kv_side false) of
// the box that starts `offset` tokens along `axis` into Q tile `qt` of group `G`, query head
// `head`, batch `b`: {head, x2, x1, b·L0 + x0}. The tile must lie inside the Q frame.
template <class Group>
__device__ __forceinline__ void q_box_at(Group const& G, Problem const& p,
                                         const int qt[kMaxRank], int axis, int offset,
                                         int head, int64_t b, int (&at)[4]) {
  int x[kMaxRank];
  for (int a = 0; a < kMaxRank; ++a) {
    const int along = a == axis ? offset : 0;
    x[a] = G.g[a] + (int)p.axes[a].dilation * (qt[a] * (int)p.q_tile[a] + along);
  }
  at[0] = head;
  at[1] = x[2];
  at[2] = x[1];
  at[3] = (int)b * (int)p.axes[0].q_length + x[0];
}
#endif

// TMA descriptors of the Q and dO buffers for the dK/dV kernel, which reads a Q tile in
// chunks of `chunk_rows` rows: chunk c is the box of the tile's extent on every axis but
// `axis`, where it spans `step` tokens from c · step (row order is last axis fastest, so a
// run of whole rows of the faster axes is a box). For the fused backward, also of its
// float32 dq accumulator (Q's layout), into which a chunk's rows are added as boxes of 32
// columns.
struct QTensorMaps {
  CUtensorMap q;
  CUtensorMap dout;
  CUtensorMap dq;
  int on;  // 0: chunks are not boxes (or encoding failed); gather every chunk
  int axis;
  int step;
};

inline void encode_q_maps(const Problem& p, const void* q, const void* dout,
                          CUtensorMapDataType dtype, int elem_bytes, int chunk_rows,
                          QTensorMaps* maps, const float* dq_acc = nullptr) {
  maps->on = 0;
  maps->axis = 0;
  maps->step = 0;
  // The slowest axis of the tile with an extent over 1 is split; every chunk must be full
  // (a box shorter than the buffer's rows would leave stale rows in shared memory).
  int64_t box[kMaxRank] = {p.q_tile[0], p.q_tile[1], p.q_tile[2]};
  const int64_t rows = box[0] * box[1] * box[2];
  if (rows % chunk_rows != 0) return;
  if (rows > chunk_rows) {
    int a = 0;
    while (box[a] == 1) ++a;
    const int64_t inner = rows / box[a];
    if (chunk_rows % inner != 0 || box[a] % (chunk_rows / inner) != 0) return;
    box[a] = chunk_rows / inner;
    maps->axis = a;
    maps->step = (int)box[a];
  }
  maps->on = encode_token_map(&maps->q, q, p, /*kv_side=*/false, box, dtype, elem_bytes) &&
             encode_token_map(&maps->dout, dout, p, /*kv_side=*/false, box, dtype, elem_bytes) &&
             (dq_acc == nullptr || encode_token_map(&maps->dq, dq_acc, p, /*kv_side=*/false, box,
                                                    CU_TENSOR_MAP_DATA_TYPE_FLOAT32, 4));
}

}  // namespace sm90
}  // namespace gna
