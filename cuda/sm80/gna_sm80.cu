// Host entry points of the sm80 GNA kernels (see gna_kernels.h): validation of what the
// compiled kernels cover, dtype/head-dim dispatch, and the backward's workspace.
#include <cutlass/numeric_types.h>

#include <cstdlib>
#include <map>
#include <mutex>
#include <sstream>
#include <utility>

#include "../gna_kernels.h"
#include "launch.cuh"

namespace gna {
namespace sm80 {

int64_t grid_tiles(const Problem& p, const int64_t* tile, bool kv_side) {
  int64_t n = 1;
  for (int a = 0; a < kMaxRank; ++a) {
    const Axis& ax = p.axes[a];
    const int64_t len = kv_side ? ax.kv_length : ax.q_length;
    n *= ax.dilation * ceil_div(group_length(len, ax.dilation, 0), tile[a]);
  }
  return n;
}

std::string cuda_error(const char* what, cudaError_t err) {
  if (err == cudaSuccess) return {};
  return std::string(what) + " failed: " + cudaGetErrorString(err);
}

// The device's value of `attr`, lowered to JAX_GNA_SM80_SMEM_LIMIT where that is set.
static int smem_attribute(cudaDeviceAttr attr) {
  int dev = 0, bytes = 0;
  if (cudaGetDevice(&dev) != cudaSuccess ||
      cudaDeviceGetAttribute(&bytes, attr, dev) != cudaSuccess)
    return 0;
  if (const char* cap = std::getenv("JAX_GNA_SM80_SMEM_LIMIT")) {
    const int limit = std::atoi(cap);
    if (limit > 0 && limit < bytes) bytes = limit;
  }
  return bytes;
}

int max_smem_per_block() { return smem_attribute(cudaDevAttrMaxSharedMemoryPerBlockOptin); }

int max_smem_per_sm() { return smem_attribute(cudaDevAttrMaxSharedMemoryPerMultiprocessor); }

int sm_count() {
  int dev = 0, sms = 0;
  if (cudaGetDevice(&dev) != cudaSuccess ||
      cudaDeviceGetAttribute(&sms, cudaDevAttrMultiProcessorCount, dev) != cudaSuccess)
    return 132;  // an H100 SXM's
  return sms;
}

namespace {

// Values kept per (kernel, device) for the two functions below.
struct KernelFacts {
  std::mutex mutex;
  std::map<std::pair<const void*, int>, int> values;
};

}  // namespace

cudaError_t opt_in_smem(const void* kernel, int bytes) {
  static KernelFacts set;  // the largest limit set
  int dev = 0;
  if (cudaError_t e = cudaGetDevice(&dev); e != cudaSuccess) return e;
  std::lock_guard<std::mutex> lock(set.mutex);
  auto it = set.values.find({kernel, dev});
  if (it != set.values.end() && it->second >= bytes) return cudaSuccess;
  const cudaError_t e =
      cudaFuncSetAttribute(kernel, cudaFuncAttributeMaxDynamicSharedMemorySize, bytes);
  if (e == cudaSuccess) set.values[{kernel, dev}] = bytes;
  return e;
}

cudaError_t max_active_clusters(int* clusters, const void* kernel,
                                const cudaLaunchConfig_t& config) {
  static KernelFacts found;
  int dev = 0;
  if (cudaError_t e = cudaGetDevice(&dev); e != cudaSuccess) return e;
  std::lock_guard<std::mutex> lock(found.mutex);
  auto it = found.values.find({kernel, dev});
  if (it != found.values.end()) {
    *clusters = it->second;
    return cudaSuccess;
  }
  const cudaError_t e = cudaOccupancyMaxActiveClusters(clusters, kernel, &config);
  if (e == cudaSuccess) found.values[{kernel, dev}] = *clusters;
  return e;
}

}  // namespace sm80

namespace {

// Bytes of the workspace's delta part (float32 [batch, Q tokens, heads]), rounded so that the
// accumulator after it is aligned for 16-byte accesses and whole L2 sectors.
size_t delta_part(const Problem& p) {
  const size_t bytes = static_cast<size_t>(p.batch * p.q_tokens() * p.heads) * sizeof(float);
  return (bytes + 255) / 256 * 256;
}

}  // namespace

size_t backward_workspace(const Problem& p) {
  if (p.deterministic) return delta_part(p);
  return delta_part(p) + (size_t)(p.batch * p.q_tokens() * p.heads * p.head_dim) * sizeof(float);
}

float* backward_dq_acc(const Problem& p, void* workspace) {
  if (p.deterministic) return nullptr;
  return reinterpret_cast<float*>(static_cast<char*>(workspace) + delta_part(p));
}

std::string sm80_supports(const Problem& p, DType dtype) {
  std::ostringstream why;
  if (dtype != DType::kFloat16 && dtype != DType::kBFloat16) {
    why << "the sm80 kernels take float16 or bfloat16 inputs";
  } else if (p.head_dim != 32 && p.head_dim != 64 && p.head_dim != 128) {
    why << "the sm80 kernels support head_dim 32, 64 or 128, got " << p.head_dim;
  } else if (p.rank < 1 || p.rank > kMaxRank) {
    why << "the sm80 kernels support 1 to 3 spatial axes, got " << p.rank;
  } else if (p.kv_heads < 1 || p.heads % p.kv_heads != 0) {
    why << "heads (" << p.heads << ") must be a multiple of kv_heads (" << p.kv_heads << ")";
  } else if (p.heads > 65535 || p.batch > 65535 || p.batch < 1) {
    why << "the sm80 kernels need 1 <= batch <= 65535 and heads <= 65535 (grid limits)";
  } else if (p.q_tokens() >= (int64_t{1} << 31) || p.kv_tokens() >= (int64_t{1} << 31) ||
             p.axes[0].length >= (int64_t{1} << 31) || p.axes[1].length >= (int64_t{1} << 31) ||
             p.axes[2].length >= (int64_t{1} << 31)) {
    why << "the sm80 kernels need fewer than 2^31 tokens per batch element";
  } else {
    int64_t q = 1, kv = 1;
    for (int a = 0; a < kMaxRank; ++a) {
      if (p.q_tile[a] < 1 || p.kv_tile[a] < 1) {
        why << "tile shapes must be positive on every axis";
        return why.str();
      }
      q *= p.q_tile[a];
      kv *= p.kv_tile[a];
    }
    if (q > sm80::kMaxQTokens) {
      why << "the sm80 kernels take Q tiles of at most " << sm80::kMaxQTokens
          << " tokens, got " << q;
    } else if (kv > sm80::kKvTokens) {
      why << "the sm80 kernels take KV tiles of at most " << sm80::kKvTokens << " tokens, got "
          << kv;
    } else if (sm80::grid_tiles(p, p.q_tile, false) >= (int64_t{1} << 31) ||
               sm80::grid_tiles(p, p.kv_tile, true) >= (int64_t{1} << 31)) {
      why << "too many tiles for one grid";
    }
  }
  return why.str();
}

namespace {

template <class T>
std::string forward_for(const Problem& p, const void* q, const void* k, const void* v,
                        void* out, float* lse, cudaStream_t s) {
  switch (p.head_dim) {
    case 32: return sm80::launch_forward<T, 32>(p, q, k, v, out, lse, s);
    case 64: return sm80::launch_forward<T, 64>(p, q, k, v, out, lse, s);
    default: return sm80::launch_forward<T, 128>(p, q, k, v, out, lse, s);
  }
}

template <class T>
std::string backward_for(const Problem& p, const void* q, const void* k, const void* v,
                         const void* out, const void* dout, const float* lse, void* dq,
                         void* dk, void* dv, float* delta, float* dq_acc, cudaStream_t s) {
  auto run = [&](auto launch) {
    return launch(p, q, k, v, out, dout, lse, dq, dk, dv, delta, dq_acc, s);
  };
  switch (p.head_dim) {
    case 32: return run(sm80::launch_backward<T, 32>);
    case 64: return run(sm80::launch_backward<T, 64>);
    default: return run(sm80::launch_backward<T, 128>);
  }
}

}  // namespace

std::string sm80_forward(const Problem& p, DType dtype, const void* q, const void* k,
                         const void* v, void* out, float* lse, cudaStream_t stream) {
  std::string why = sm80_supports(p, dtype);
  if (!why.empty()) return why;
  if (dtype == DType::kBFloat16)
    return forward_for<cutlass::bfloat16_t>(p, q, k, v, out, lse, stream);
  return forward_for<cutlass::half_t>(p, q, k, v, out, lse, stream);
}

std::string sm80_backward(const Problem& p, DType dtype, const void* q, const void* k,
                          const void* v, const void* out, const void* dout, const float* lse,
                          void* dq, void* dk, void* dv, void* workspace, cudaStream_t stream) {
  std::string why = sm80_supports(p, dtype);
  if (!why.empty()) return why;
  float* delta = static_cast<float*>(workspace);
  float* dq_acc = backward_dq_acc(p, workspace);
  if (dtype == DType::kBFloat16)
    return backward_for<cutlass::bfloat16_t>(p, q, k, v, out, dout, lse, dq, dk, dv, delta,
                                             dq_acc, stream);
  return backward_for<cutlass::half_t>(p, q, k, v, out, dout, lse, dq, dk, dv, delta, dq_acc,
                                       stream);
}

}  // namespace gna
