#!/usr/bin/env bash
# Builds tests/native/sm80_check.cu with the sm80 kernels (SASS for sm_80 and sm_90: sm_80
# SASS does not run on Hopper) and the sm90a kernels (cuda/sm90, SASS for sm_90a), and runs it.
#   tests/native/run_sm80_check.sh [check [n] [seed] | sanitize | time | all | none]
# `all` sweeps and sanitizes with the sm80 kernels, then with the sm90a kernels
# (GNA_CHECK_KERNELS=sm90), then times both (GNA_SWEEP_KERNELS=sm90: only the sm90a sweep and
# sanitizers); `none` only builds.
# CUTLASS headers: $CUTLASS_INCLUDE, else ./.cutlass (copied there for the GPU machine), else
# the nvidia-cutlass wheel of /work/venv. BUILD_DIR (default /tmp/sm80_check) holds objects.
set -euo pipefail
cd "$(dirname "$0")/../.."
INC=${CUTLASS_INCLUDE:-}
if [[ -z "$INC" ]]; then
  if [[ -d .cutlass/include ]]; then INC=.cutlass/include
  else INC=/work/venv/lib/python3.11/site-packages/cutlass_library/source/include; fi
fi
OUT_DIR=${BUILD_DIR:-/tmp/sm80_check}
mkdir -p "$OUT_DIR"
# SM80_ARCHS (default "80 90"): the SASS the sm80 kernels and the harness are built for; the
# GPU machine, a Hopper, needs only 90.
GENCODE=()
for arch in ${SM80_ARCHS:-80 90}; do GENCODE+=(-gencode "arch=compute_$arch,code=sm_$arch"); done
COMMON=(-O3 -std=c++17 -I cuda -I "$INC" -lineinfo)
FLAGS=("${GENCODE[@]}" "${COMMON[@]}")
# REUSE_SM80=1: keep the sm80 objects and the harness's already in BUILD_DIR (to time kernel
# variants quickly), except the sm80 sources whose name contains $REBUILD (if set).
reused() {
  [[ "${REUSE_SM80:-0}" == 1 && -f "$2" ]] || return 1
  [[ -z "${REBUILD:-}" || "$1" != *"$REBUILD"* ]]
}
pids=()
for src in cuda/sm80/*.cu; do
  obj="$OUT_DIR/$(basename "$src" .cu).o"
  reused "$src" "$obj" && continue
  nvcc "${FLAGS[@]}" ${NVCC_EXTRA:-} -c "$src" -o "$obj" &
  pids+=($!)
done
for src in cuda/sm90/*.cu; do
  obj="$OUT_DIR/sm90_$(basename "$src" .cu).o"
  # REUSE_SM90_BACKWARD=1 / REUSE_SM90_FORWARD=1: the same for the sm90a backward's objects
  # or the others.
  if [[ -f "$obj" ]]; then
    [[ "${REUSE_SM90_BACKWARD:-0}" == 1 && "$src" == */backward_* ]] && continue
    [[ "${REUSE_SM90_FORWARD:-0}" == 1 && "$src" != */backward_* ]] && continue
  fi
  nvcc -gencode arch=compute_90a,code=sm_90a "${COMMON[@]}" --expt-relaxed-constexpr \
    ${NVCC_EXTRA:-} -c "$src" -o "$obj" &
  pids+=($!)
done
if ! reused tests/native/sm80_check.cu "$OUT_DIR/sm80_check.o"; then
  nvcc "${FLAGS[@]}" -DGNA_CHECK_SM90 -Xcompiler -fopenmp -c tests/native/sm80_check.cu \
    -o "$OUT_DIR/sm80_check.o" &
  pids+=($!)
fi
for pid in "${pids[@]}"; do wait "$pid"; done
nvcc "${FLAGS[@]}" -Xcompiler -fopenmp "$OUT_DIR"/*.o -o "$OUT_DIR/sm80_check"
BIN="$OUT_DIR/sm80_check"
mode=${1:-all}
if [[ "$mode" == none ]]; then
  exit 0  # build only
elif [[ "$mode" == all ]]; then
  # Every stage runs even if an earlier one fails; the exit status reports any failure.
  status=0
  for kernels in ${GNA_SWEEP_KERNELS:-sm80 sm90}; do
    GNA_CHECK_KERNELS=$kernels "$BIN" check "${2:-300}" "${3:-1234}" || status=1
    for tool in memcheck racecheck; do
      GNA_CHECK_KERNELS=$kernels compute-sanitizer --tool "$tool" --error-exitcode 3 "$BIN" sanitize \
        || status=1
    done
  done
  "$BIN" time || status=1
  exit $status
else
  shift || true
  "$BIN" "$mode" "$@"
fi
