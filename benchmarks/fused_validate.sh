#!/usr/bin/env bash
# One device call: build the harness (and the JAX extension in parallel), sweep + sanitize
# the sm90a kernels, time the non-deterministic (fused) backward against the deterministic
# one, GPU tests, and a source-level profile of the fused kernel.
set -uo pipefail
OUT=${OUT:-/tmp/out}; mkdir -p "$OUT"
export CUTLASS_INCLUDE=$PWD/.cutlass/include
B=$PWD/.device/h
t0=$(date +%s)
el() { echo "[$(( $(date +%s) - t0 )) s]"; }
bash benchmarks/device_run.sh build > "$OUT/jax_build.out" 2>&1 &
BUILD_DIR=$B bash tests/native/run_sm80_check.sh none > "$OUT/build.log" 2>&1 || { tail -30 "$OUT/build.log"; exit 1; }
echo "harness built $(el)"
export GNA_CHECK_KERNELS=sm90
timeout 200 "$B/sm80_check" check ${N:-300} ${SEED:-4242} > "$OUT/sweep.log" 2>&1
echo "sweep rc=$?: $(grep -E configs "$OUT/sweep.log" | tr '\n' ' ')"
grep -iE "fail" "$OUT/sweep.log" | head -8
for tool in memcheck racecheck; do
  timeout 150 compute-sanitizer --tool $tool --error-exitcode 3 "$B/sm80_check" sanitize > "$OUT/$tool.log" 2>&1
  echo "$tool rc=$?: $(grep -E "ERROR SUMMARY|RACECHECK SUMMARY" "$OUT/$tool.log")"
done
echo "$(el)"
for round in 1 2; do
  echo "--- non-deterministic (fused), round $round"
  GNA_TIME_KERNELS=sm90bwd timeout 60 "$B/sm80_check" time 2>&1 | sed -n '/^problem/,$p' | awk '{print $1,$2,$3,$(NF-1),$NF}'
  echo "--- deterministic, round $round"
  GNA_DETERMINISTIC=1 GNA_TIME_KERNELS=sm90bwd timeout 60 "$B/sm80_check" time 2>&1 | sed -n '/^problem/,$p' | awk '{print $1,$2,$3,$(NF-1),$NF}'
done
echo "$(el)"
wait; tail -3 "$OUT/jax_build.out"
[[ -n "${TESTS:-1}" ]] && bash benchmarks/device_run.sh test 2>&1 | tail -4
echo "$(el)"
if (( $(date +%s) - t0 < 440 )); then
  GNA_TIME_KERNELS=sm90bwd GNA_TIME_ONLY="FLUX-4K GNA" timeout 130 ncu --clock-control none --kernel-name-base demangled \
    -k "regex:fused_bwd_kernel" -c 1 --section WarpStateStats --section SourceCounters --section SchedulerStats \
    -o "$OUT/fused" "$B/sm80_check" time > "$OUT/ncu.log" 2>&1
  echo "ncu rc=$?"
  ncu --import "$OUT/fused.ncu-rep" --page source --csv --print-source sass > "$OUT/fused_sass.csv" 2>/dev/null
  ncu --import "$OUT/fused.ncu-rep" --page details > "$OUT/fused_details.txt" 2>/dev/null
  grep -E "Issued Warp|Eligible Warps|Warp Cycles Per Issued" "$OUT/fused_details.txt" | head
  rm -f "$OUT/fused.ncu-rep"
fi
echo "$(el)"
