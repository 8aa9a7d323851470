// What the sm90a kernels share: warpgroup-MMA (wgmma) helpers (accumulator views, one
// asynchronous GEMM issue) and the sm80 kernels' tile geometry.
#pragma once

#include <cute/arch/copy_sm90.hpp>
#include <cute/atom/mma_traits_sm90_gmma.hpp>
#include <cutlass/arch/barrier.h>

#include "../sm80/common.cuh"

namespace gna {
namespace sm90 {

using namespace cute;
// The tile geometry is the sm80 kernels' (common.cuh).
using sm80::FullTiles;
using sm80::Group;
using sm80::KRow;
using sm80::QRow;
using sm80::TileBox;

// The two warpgroup MMAs of every sm90a kernel, kWarpGroups warpgroups of 64 rows each:
// [M, N] = A[M, K] · B[N, K]^T with both operands in shared memory (S, dP), and
// [M, N] += X[M, K] · Y[K, N] with X in registers and Y seen MN-major (P·V and the gradients).
template <class T, int kWarpGroups, int kN, int kK>
using MmaSS = decltype(make_tiled_mma(
    GMMA::ss_op_selector<T, T, float, Shape<_64, Int<kN>, Int<kK>>>(),
    Layout<Shape<Int<kWarpGroups>, _1, _1>>{}));
template <class T, int kWarpGroups, int kN, int kK>
using MmaRS = decltype(make_tiled_mma(
    GMMA::rs_op_selector<T, T, float, Shape<_64, Int<kN>, Int<kK>>, GMMA::Major::K,
                         GMMA::Major::MN>(),
    Layout<Shape<Int<kWarpGroups>, _1, _1>>{}));

// A K-major [kRows, kD] tile, 128-byte swizzled as the GMMA descriptors expect it.
template <class T, int kRows, int kD>
using SmemKMajor = decltype(tile_to_shape(GMMA::Layout_K_SW128_Atom<T>{},
                                          Shape<Int<kRows>, Int<kD>>{}));

// Accumulator of a 64xN warpgroup MMA, ((2 cols, 2 rows, N/8), M, N) viewed as (rows, cols).
template <class L>
__device__ __forceinline__ auto gmma_rowcol(L const& l) {
  return make_layout(make_layout(get<0, 1>(l), get<1>(l)),
                     make_layout(get<0, 0>(l), get<0, 2>(l), get<2>(l)));
}

// The same accumulator seen as the register A operand of a k16 warpgroup MMA: every pair of
// 8-column blocks holds the 16 k-values of one k step.
template <class L>
__device__ __forceinline__ auto gmma_acc_as_a(L const& l) {
  auto blocks = logical_divide(get<0, 2>(l), Layout<_2>{});
  return make_layout(make_layout(get<0, 0>(l), get<0, 1>(l), get<0>(blocks)), get<1>(l),
                     make_layout(get<1>(blocks), get<2>(l)));
}

// Issues acc = A·B^T (or acc += A·B^T if `accumulate`) as one wgmma group of the
// warpgroup; the caller waits (warpgroup_wait) before touching acc or a register A again.
template <class Mma, class TA, class TB, class Acc>
__device__ __forceinline__ void wgmma_issue(Mma& mma, TA& a, TB const& b, Acc& acc,
                                            bool accumulate) {
  // A is either shared-memory descriptors or registers (then fenced like the accumulator).
  constexpr bool kRegA = !is_same_v<typename TA::iterator, GMMA::DescriptorIterator>;
  warpgroup_fence_operand(acc);
  if constexpr (kRegA) warpgroup_fence_operand(a);
  warpgroup_arrive();
  mma.accumulate_ = accumulate ? GMMA::ScaleOut::One : GMMA::ScaleOut::Zero;
  CUTE_UNROLL
  for (int kk = 0; kk < size<2>(a); ++kk) {
    cute::gemm(mma, a(_, _, kk), b(_, _, kk), acc);
    mma.accumulate_ = GMMA::ScaleOut::One;
  }
  warpgroup_commit_batch();
  warpgroup_fence_operand(acc);
  if constexpr (kRegA) warpgroup_fence_operand(a);
}

}  // namespace sm90
}  // namespace gna
