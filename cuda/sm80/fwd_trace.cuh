// A diagnostic build of the sm80 forward (-DGNA_SM80_FWD_TRACE=1, never the default): each
// CTA's thread 0 records %globaltimer at entry, at the start of the step loop, after the
// first step, after the last step and at exit, with its SM, so that the harness can split a
// launch's time into per-CTA phases (sm80_check time calls gna_sm80_fwd_trace_report).
#pragma once

#if GNA_SM80_FWD_TRACE
#include <cuda_runtime.h>

#include <algorithm>
#include <cstdio>
#include <vector>

namespace gna {
namespace sm80 {

constexpr int kTraceCtas = 8192;
constexpr int kTraceMarks = 5;  // entry, loop start, first step done, loop end, exit

struct FwdTrace {
  unsigned long long t[kTraceMarks];
  unsigned sm;
  unsigned steps;
  unsigned ctas;  // of the launch
};

// One copy per translation unit; the report reads that of the TU that defines it.
static __device__ FwdTrace g_fwd_trace[kTraceCtas];

__device__ __forceinline__ unsigned long long global_ns() {
  unsigned long long t;
  asm volatile("mov.u64 %0, %%globaltimer;" : "=l"(t));
  return t;
}

__device__ __forceinline__ void trace_mark(int mark, int steps = 0) {
  if (threadIdx.x != 0) return;
  const unsigned cta = blockIdx.x + gridDim.x * (blockIdx.y + gridDim.y * blockIdx.z);
  if (cta >= (unsigned)kTraceCtas) return;
  g_fwd_trace[cta].t[mark] = global_ns();
  if (mark == 0) {
    unsigned sm;
    asm volatile("mov.u32 %0, %%smid;" : "=r"(sm));
    g_fwd_trace[cta].sm = sm;
    g_fwd_trace[cta].ctas = gridDim.x * gridDim.y * gridDim.z;
  }
  if (mark == 1) g_fwd_trace[cta].steps = (unsigned)steps;
}

// Summarises the last launch's trace (µs): mean phases per CTA, the gap between consecutive
// CTAs on one SM, and the launch's first entry to its last exit.
static void report_fwd_trace() {
  std::vector<FwdTrace> tr(kTraceCtas);
  if (cudaMemcpyFromSymbol(tr.data(), g_fwd_trace, kTraceCtas * sizeof(FwdTrace)) !=
      cudaSuccess) {
    std::printf("trace: copy failed\n");
    return;
  }
  const int ctas = (int)std::min<unsigned>(tr[0].ctas, kTraceCtas);
  tr.resize(ctas);
  unsigned long long t0 = ~0ull, t_end = 0;
  double phase[kTraceMarks - 1] = {0, 0, 0, 0}, steps = 0;
  for (const auto& c : tr) {
    t0 = std::min(t0, c.t[0]);
    t_end = std::max(t_end, c.t[kTraceMarks - 1]);
    for (int m = 0; m + 1 < kTraceMarks; ++m) phase[m] += (double)(c.t[m + 1] - c.t[m]);
    steps += c.steps;
  }
  // Per SM, its CTAs in start order: the idle time between one's exit and the next's entry.
  std::vector<int> idx(ctas);
  for (int i = 0; i < ctas; ++i) idx[i] = i;
  std::sort(idx.begin(), idx.end(), [&](int a, int b) {
    return tr[a].sm != tr[b].sm ? tr[a].sm < tr[b].sm : tr[a].t[0] < tr[b].t[0];
  });
  double gap = 0, first_start = 0;
  int gaps = 0, sms = 0;
  for (int i = 0; i < ctas; ++i) {
    const FwdTrace& c = tr[idx[i]];
    if (i == 0 || tr[idx[i - 1]].sm != c.sm) {
      first_start += (double)(c.t[0] - t0);
      ++sms;
    } else {
      gap += (double)c.t[0] - (double)tr[idx[i - 1]].t[kTraceMarks - 1];
      ++gaps;
    }
  }
  const double n = ctas, us = 1e-3;
  std::printf(
      "trace: %d CTAs on %d SMs, launch %.1f us; per CTA: prologue %.2f, first step %.2f, "
      "other steps %.2f (%.3f per step), epilogue %.2f; SM first start %.2f after the launch's, "
      "gap between CTAs on an SM %.2f\n",
      ctas, sms, (double)(t_end - t0) * us, phase[0] / n * us, phase[1] / n * us,
      phase[2] / n * us, phase[2] * us / std::max(1.0, steps - n), phase[3] / n * us,
      first_start / std::max(1, sms) * us, gaps ? gap / gaps * us : 0.0);
}

}  // namespace sm80
}  // namespace gna

#define GNA_FWD_TRACE_MARK(...) ::gna::sm80::trace_mark(__VA_ARGS__)
#else
#define GNA_FWD_TRACE_MARK(...) ((void)0)
#endif
