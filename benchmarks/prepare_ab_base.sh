#!/usr/bin/env bash
# Puts the kernels and the native harness of each git revision REV (default HEAD) into
# .ab_base/<rev>/, for `device_run.sh ab-rev` to build and time against the working tree in
# one device call (carry ".ab_base" with the tree). Usage, in the repository root:
#   bash benchmarks/prepare_ab_base.sh [REV]...
set -euo pipefail
cd "$(dirname "$0")/.."
rm -rf .ab_base
for want in "${@:-HEAD}"; do
  rev=$(git rev-parse --short "$want")
  mkdir -p ".ab_base/$rev"
  git archive "$rev" cuda tests/native | tar -x -C ".ab_base/$rev"
  echo ".ab_base/$rev holds $want"
done
