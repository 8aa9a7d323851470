#!/usr/bin/env bash
# One lease of the GPU machine: build, GPU tests, benchmarks, end-to-end stacks.
# Usage (on the device, repo root):
#   bash benchmarks/device_run.sh [build|native|native90|test|cp-test|cp-bench|bench|bench-xla|
#   ab|env-ab|ab-rev|profile|profile-dense|window-sweep|e2e]...
# Needs the nvidia-cutlass wheel in .whl/ (the device has no network). Writes logs to $OUT.
# Build outputs go to .device/ (git-ignored), so a later call on the still-warm machine
# reuses them.
set -uo pipefail
OUT="${OUT:-/tmp/out}"; mkdir -p "$OUT"
export PYTHONUNBUFFERED=1 XLA_PYTHON_CLIENT_PREALLOCATE=false
python3 -m pip install -q --no-index --no-deps --no-compile --target /tmp/site .whl/*.whl || exit 1
# The extension module lands in .device/gna; the Python package is read from this checkout.
GNA="$PWD/.device/gna"
export PYTHONPATH=$GNA:/tmp/site BUILD_DIR="$PWD/.device/sm80_check"
# The harness's sm80 kernels need SASS for sm_90 alone here (every GPU machine is a Hopper).
export SM80_ARCHS="${SM80_ARCHS:-90}"
step() { echo "=== $1 ($(date +%T))"; }
# The harness timings of the build in directory $1 (AB_ONLY narrows the problems).
timed() {
  GNA_TIME_ONLY="${AB_ONLY:-}" timeout 120 "$1/sm80_check" time 2>&1 | sed -n '/^problem/,$p'
}
# The random sweep (300 configs and their framed sub-problems) and compute-sanitizer memcheck
# and racecheck of the harness in directory $1, for each of GNA_SWEEP_KERNELS (default
# "sm90 sm80"); AB_FEW_CTAS=n runs the sm90a ones once more with the forward's grid capped at
# n CTAs (JAX_GNA_SM90_FWD_CTAS), so that every CTA computes several Q tiles. Logs are
# $OUT/ab_*_<kernels>_$2.log. GNA_SWEEP_KERNELS=none skips it (timings alone).
sweep() {
  local sweeps="${GNA_SWEEP_KERNELS:-sm90 sm80}" kernels cap tool log
  [[ $sweeps == none ]] && return
  [[ -n "${AB_FEW_CTAS:-}" && " $sweeps " == *" sm90 "* ]] && sweeps+=" sm90-few"
  for kernels in $sweeps; do
    cap=$([[ $kernels == sm90-few ]] && echo "$AB_FEW_CTAS")
    export JAX_GNA_SM90_FWD_CTAS=$cap GNA_CHECK_KERNELS=${kernels%-few}
    log="$OUT/ab_sweep_${kernels}_$2.log"
    timeout 200 "$1/sm80_check" check 300 "${AB_SEED:-2026}" > "$log" 2>&1
    echo "$2 $kernels sweep rc=$?: $(grep -E "configs" "$log" | tr '\n' ' ')"
    for tool in memcheck racecheck; do
      log="$OUT/ab_${tool}_${kernels}_$2.log"
      timeout 120 compute-sanitizer --tool $tool --error-exitcode 3 "$1/sm80_check" sanitize \
        > "$log" 2>&1
      echo "$2 $kernels $tool rc=$?: $(grep -E "ERROR SUMMARY|RACECHECK SUMMARY" "$log")"
    done
  done
  unset JAX_GNA_SM90_FWD_CTAS GNA_CHECK_KERNELS
}
for what in "$@"; do case "$what" in
build)
  step build
  # Only Hopper runs here: build the sm80 sources for 90-real alone to save device time.
  JAX_GNA_SM80_ARCHS=90-real CMAKE_BUILD_PARALLEL_LEVEL=16 \
    python3 -m pip install -q --no-build-isolation --no-deps --target "$GNA" . \
    > "$OUT/build.log" 2>&1 || { tail -40 "$OUT/build.log"; exit 1; }
  python3 -c "import jax_gna; print(jax_gna.available_implementations())"
  ;;
test)
  step test
  timeout 240 python3 -m pytest -q -p no:cacheprovider tests/test_cuda.py \
    tests/test_merge.py 2>&1 | tee "$OUT/test.log" | tail -15
  ;;
cp-test)
  step cp-test  # framed kernels on one GPU, sharded over two, fake-device CPU checks
  timeout 420 python3 -m pytest -q -p no:cacheprovider tests/test_context_parallel.py \
    2>&1 | tee "$OUT/cp_test.log" | tail -15
  ;;
cp-bench)
  step cp-bench
  timeout 300 python3 benchmarks/context_parallel.py --problem hunyuan-gna hunyuan-na \
    --devices 2 --json "$OUT/cp_bench.json" 2>&1 | tee "$OUT/cp_bench.log" | tail -8
  ;;
bench)
  step bench  # BENCH_MODES narrows the modes (default "fwd fwd+bwd bwd"); BENCH_TAG suffixes
  # the output files (runs under different settings in one call)
  timeout 300 python3 -m jax_gna bench --no-progress \
    --problem flux-4k-gna hunyuan-gna flux-4k-na hunyuan-na 1d-32k-gna 1d-32k-na \
    --impl cuda --baseline cudnn --mode ${BENCH_MODES:-fwd fwd+bwd bwd} --reps 3 --min-time 0.3 \
    --json "$OUT/bench_cuda${BENCH_TAG:-}.json" 2>&1 | tee "$OUT/bench_cuda${BENCH_TAG:-}.log" |
    tail -20
  ;;
bench-xla)
  step bench-xla
  timeout 120 python3 -m jax_gna bench --no-progress \
    --problem xla-16k-na --impl xla cuda --baseline cudnn xla-mask --mode fwd --reps 3 \
    --min-time 0.3 --json "$OUT/bench_xla.json" 2>&1 | tee "$OUT/bench_xla.log" | tail -8
  timeout 100 python3 -m jax_gna bench --no-progress \
    --problem flux-4k-gna --impl xla --baseline none --mode fwd --reps 2 --min-time 0.2 \
    --json "$OUT/bench_xla_flux.json" 2>&1 | tail -5
  ;;
native)
  step native  # kernel sweep, compute-sanitizer memcheck + racecheck, harness timings
  # Sweep + sanitizers with the sm80 kernels, then with the sm90a kernels; times both.
  timeout 540 bash tests/native/run_sm80_check.sh all 300 777 > "$OUT/native.log" 2>&1
  echo "native rc=$?"
  grep -iE "^kernels|fail|error summary|hazard|configs" "$OUT/native.log" | tail -14
  for f in forward backward; do
    echo "HGMMA instructions in the sm90a $f (bf16, D=128):" \
      "$(cuobjdump -sass "$BUILD_DIR/sm90_${f}_bf16_d128.o" | grep -c HGMMA)"
  done
  sed -n '/^problem/,$p' "$OUT/native.log"
  ;;
native90)
  step native90  # the sm90a kernels alone: sweep (300 random configs and their framed
  # sub-problems) and sanitizers, then the backward timed as users get it by default and
  # with GNA_DETERMINISTIC=1, alternating, two rounds
  bash tests/native/run_sm80_check.sh none > "$OUT/native90_build.log" 2>&1 ||
    { tail -30 "$OUT/native90_build.log"; exit 1; }
  GNA_CHECK_KERNELS=sm90 timeout 200 "$BUILD_DIR/sm80_check" check 300 "${SEED:-2026}" \
    > "$OUT/native90_sweep.log" 2>&1
  echo "sweep rc=$?: $(grep -E configs "$OUT/native90_sweep.log" | tr '\n' ' ')"
  grep -iE "fail" "$OUT/native90_sweep.log" | head -8
  for tool in memcheck racecheck; do
    GNA_CHECK_KERNELS=sm90 timeout 150 compute-sanitizer --tool $tool --error-exitcode 3 \
      "$BUILD_DIR/sm80_check" sanitize > "$OUT/native90_$tool.log" 2>&1
    echo "$tool rc=$?: $(grep -E "ERROR SUMMARY|RACECHECK SUMMARY" "$OUT/native90_$tool.log")"
  done
  for round in 1 2; do
    for det in 0 1; do
      echo "--- sm90a backward, GNA_DETERMINISTIC=$det, round $round"
      GNA_DETERMINISTIC=$det GNA_TIME_KERNELS=sm90bwd timeout 60 "$BUILD_DIR/sm80_check" time \
        2>&1 | sed -n '/^problem/,$p' | awk '{print $1, $2, $3, $(NF-1), $NF}'
    done
  done
  ;;
ab)
  step ab  # harness timings of builds with other compile-time choices, e.g. AB="-DX=0 -DX=1"
  # (commas join the flags of one build: AB="-DX=1,-DY=1"). The variants build in parallel
  # from the default build's objects: the sm80 ones are reused except those whose name
  # contains $AB_REBUILD (e.g. backward_bf16_d128; AB_REUSE_SM80=0 rebuilds them all), the
  # sm90a backward's are reused, and AB_REUSE_SM90_FORWARD=1 reuses the other sm90a ones.
  # Each build is timed AB_ROUNDS times (default 1), in turn; AB_DET=1 also times the
  # deterministic backwards once. AB_ONLY and GNA_TIME_KERNELS (e.g. sm90fwd) narrow the
  # problems and kernels timed; AB_SWEEP=1 then sweeps and sanitizes every variant (sweep).
  [[ -x "$BUILD_DIR/sm80_check" ]] || bash tests/native/run_sm80_check.sh none > "$OUT/ab.log" 2>&1
  dirs=("$BUILD_DIR"); names=("default build"); n=0
  for flags in ${AB:-}; do
    n=$((n + 1)); dir="$BUILD_DIR.ab$n"; rm -rf "$dir"; mkdir -p "$dir"
    cp "$BUILD_DIR"/*.o "$dir"/
    BUILD_DIR="$dir" REUSE_SM80="${AB_REUSE_SM80:-1}" REBUILD="${AB_REBUILD:-}" \
      REUSE_SM90_BACKWARD=1 REUSE_SM90_FORWARD="${AB_REUSE_SM90_FORWARD:-0}" \
      NVCC_EXTRA="${flags//,/ }" bash tests/native/run_sm80_check.sh none > "$OUT/ab$n.log" 2>&1 &
    dirs+=("$dir"); names+=("${flags//,/ }")
  done
  wait
  for round in $(seq "${AB_ROUNDS:-1}") det; do
    [[ $round == det && "${AB_DET:-0}" != 1 ]] && break
    for i in "${!dirs[@]}"; do
      [[ -x "${dirs[$i]}/sm80_check" ]] || { echo "--- ${names[$i]}: build failed"; continue; }
      echo "--- ${names[$i]}, round $round"
      GNA_DETERMINISTIC=$([[ $round == det ]] && echo 1 || echo 0) timed "${dirs[$i]}"
    done
  done
  for i in $(seq "$n"); do grep -h " error" "$OUT/ab$i.log" | head -5; done
  # AB_SWEEP=1: each variant is swept and sanitized as ab-rev does the working tree.
  if [[ "${AB_SWEEP:-0}" == 1 ]]; then
    for i in $(seq "$n"); do sweep "${dirs[$i]}" "ab$i"; done
  fi
  ;;
env-ab)
  step env-ab  # one build's harness timed under each of ENV_AB's run-time settings in turn,
  # e.g. ENV_AB="JAX_GNA_X=0 JAX_GNA_X=1" (commas join the variables of one setting), for
  # AB_ROUNDS rounds (GNA_TIME_KERNELS, AB_ONLY and GNA_TIME_REPS narrow and steady them);
  # AB_SWEEP=1 then sweeps and sanitizes under each setting (sweep).
  [[ -x "$BUILD_DIR/sm80_check" ]] || bash tests/native/run_sm80_check.sh none \
    > "$OUT/env_ab_build.log" 2>&1 || { tail -30 "$OUT/env_ab_build.log"; exit 1; }
  for round in $(seq "${AB_ROUNDS:-1}"); do
    for setting in ${ENV_AB:-}; do
      echo "--- ${setting//,/ }, round $round"
      (export ${setting//,/ }; timed "$BUILD_DIR")
    done
  done
  if [[ "${AB_SWEEP:-0}" == 1 ]]; then
    i=0
    for setting in ${ENV_AB:-}; do
      i=$((i + 1)); echo "--- env$i: ${setting//,/ }"
      (export ${setting//,/ }; sweep "$BUILD_DIR" "env$i")
    done
  fi
  ;;
ab-rev)
  step ab-rev  # the working tree's kernels against git revisions', in one call: prepare
  # .ab_base/<rev>/ with benchmarks/prepare_ab_base.sh REV... and carry it. All harnesses
  # build in parallel; each is timed twice, in turn (GNA_TIME_KERNELS and AB_ONLY narrow the
  # kernels and problems timed; AB_DET=1 also times the deterministic backwards); then the
  # working tree's is swept (300 random configs and their framed sub-problems) and sanitized
  # for each of GNA_SWEEP_KERNELS (default "sm90 sm80"; sweep). Timings come first so that a
  # long sweep cannot cost them.
  revs=($(ls .ab_base 2>/dev/null))
  (( ${#revs[@]} )) || { echo "no .ab_base/: run benchmarks/prepare_ab_base.sh REV"; exit 1; }
  export CUTLASS_INCLUDE="${CUTLASS_INCLUDE:-$PWD/.cutlass/include}"  # also for the bases
  bash tests/native/run_sm80_check.sh none > "$OUT/ab_new_build.log" 2>&1 &
  for rev in "${revs[@]}"; do
    BUILD_DIR="$PWD/.device/ab_$rev" bash ".ab_base/$rev/tests/native/run_sm80_check.sh" \
      none > "$OUT/ab_${rev}_build.log" 2>&1 &
  done
  wait
  dirs=("$BUILD_DIR"); names=("working tree")
  for rev in "${revs[@]}"; do dirs+=("$PWD/.device/ab_$rev"); names+=("base $rev"); done
  for i in "${!dirs[@]}"; do
    [[ -x "${dirs[$i]}/sm80_check" ]] ||
      { echo "${names[$i]}: build failed"; grep -h error "$OUT"/ab_*_build.log | head -20; exit 1; }
  done
  for round in 1 2; do
    for i in "${!dirs[@]}"; do
      echo "--- ${names[$i]}, round $round"; timed "${dirs[$i]}"
    done
  done
  if [[ "${AB_DET:-0}" == 1 ]]; then  # the deterministic backwards too, once each
    for i in "${!dirs[@]}"; do
      echo "--- ${names[$i]}, deterministic"; GNA_DETERMINISTIC=1 timed "${dirs[$i]}"
    done
  fi
  sweep "$BUILD_DIR" new
  ;;
profile)
  step profile  # ncu of the kernels matching the regex $NCU_KERNELS (without "regex:", which
  # is added here; e.g. NCU_KERNELS='sm80::fwd_kernel') on one harness problem; NCU_EXTRA
  # adds sections (e.g. "--section SourceCounters": then $OUT/ncu_sass.csv.gz has the stalls
  # per SASS instruction)
  [[ -x "$BUILD_DIR/sm80_check" ]] || bash tests/native/run_sm80_check.sh none > /dev/null 2>&1
  GNA_TIME_ONLY="${NCU_PROBLEM:-FLUX-4K GNA}" timeout 400 ncu --clock-control none \
    --kernel-name-base demangled -k "regex:${NCU_KERNELS:-sm90::(dkdv|ws_dq|fused_bwd)_kernel}" \
    -c "${NCU_COUNT:-2}" --section SpeedOfLight --section Occupancy --section LaunchStats \
    --section SchedulerStats --section WarpStateStats --section MemoryWorkloadAnalysis \
    ${NCU_EXTRA:-} -o "$OUT/ncu" "$BUILD_DIR/sm80_check" time > "$OUT/ncu_run.log" 2>&1
  echo "ncu rc=$?"
  ncu --import "$OUT/ncu.ncu-rep" --page details > "$OUT/ncu.log" 2>&1
  [[ "${NCU_EXTRA:-}" == *SourceCounters* ]] &&
    ncu --import "$OUT/ncu.ncu-rep" --page source --csv --print-source sass 2>/dev/null |
      gzip > "$OUT/ncu_sass.csv.gz"
  rm -f "$OUT/ncu.ncu-rep"
  grep -E "^  [a-z_:]+.*\(|Duration|Throughput|Registers|Achieved Occupancy|Issued Warp|No Eligible|Eligible Warps|Stall|L2 Hit|Mem Busy|Max Bandwidth" "$OUT/ncu.log" | head -80
  ;;
profile-dense)
  step profile-dense  # our sm90a forward against cuDNN's on one dense problem (the window is
  # the whole image, so every step of ours is mask-free): JAX timings of both (and of FLUX-4K
  # GNA), then one ncu launch of each with stalls per SASS instruction ($OUT/ncu_<who>*).
  # PROBE (ncu_probe.py's problem arguments) and PROBE_WHO (contestants) profile others.
  shape="${DENSE_SHAPE:-256 256}"
  [[ -n "${PROBE:-}" ]] || timeout 240 python3 -m jax_gna bench --no-progress \
    --problem flux-4k-gna --shape $shape --window $shape --impl cuda --baseline cudnn \
    --mode fwd --reps 3 --min-time 0.3 --json "" 2>&1 | tee "$OUT/bench_dense.log" | tail -6
  for who in ${PROBE_WHO:-cuda cudnn}; do
    PYTHONPATH="$PWD:$PYTHONPATH" timeout 240 ncu --clock-control none \
      --kernel-name-base demangled \
      -k "regex:ws_fwd_kernel|sdpa|fprop|fmha|flash" --launch-skip 1 -c 1 \
      --section SpeedOfLight --section Occupancy --section LaunchStats \
      --section SchedulerStats --section WarpStateStats --section ComputeWorkloadAnalysis \
      --section InstructionStats --section MemoryWorkloadAnalysis --section SourceCounters \
      -o "$OUT/ncu_$who" python3 benchmarks/ncu_probe.py --contestant $who \
      ${PROBE:---shape $shape --window $shape} > "$OUT/ncu_${who}_run.log" 2>&1
    echo "ncu $who rc=$?"
    ncu --import "$OUT/ncu_$who.ncu-rep" --page details > "$OUT/ncu_$who.log" 2>&1
    ncu --import "$OUT/ncu_$who.ncu-rep" --page source --csv --print-source sass 2>/dev/null |
      gzip > "$OUT/ncu_${who}_sass.csv.gz"
    rm -f "$OUT/ncu_$who.ncu-rep"
    grep -E "^  [a-zA-Z_].*\(|Duration|Registers Per|Threads|Shared Memory Config|Issued Warp|No Eligible|Eligible Warps|Compute \(SM\) Throughput|Executed Ipc A" "$OUT/ncu_$who.log" | head -14
  done
  ;;
window-sweep)
  step window-sweep  # the forward's time per Q tile split into steps and the rest
  PYTHONPATH="$PWD:$PYTHONPATH" timeout 240 python3 benchmarks/window_sweep.py \
    ${SWEEP:---shape 256 256 --stride 16 16 --windows 48 80 144 208} 2>&1 |
    tee "$OUT/window_sweep.log" | tail -8
  ;;
e2e)
  step e2e
  for layout in video flux; do
    timeout 150 python3 examples/video_dit.py --layout $layout \
      --blocks 2 --iters 5 --configs gna --implementation cuda --out "$OUT/e2e_$layout.json" 2>&1 | tail -14
  done
  ;;
esac; done
