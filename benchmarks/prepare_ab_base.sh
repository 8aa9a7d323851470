#!/usr/bin/env bash
# Puts the kernels and the native harness of git revision REV (default HEAD) into .ab_base/,
# for `device_run.sh ab-rev` to build and time against the working tree in one device call
# (carry ".ab_base" with the tree). Usage, in the repository root:
#   bash benchmarks/prepare_ab_base.sh [REV]
set -euo pipefail
cd "$(dirname "$0")/.."
rev=$(git rev-parse --short "${1:-HEAD}")
rm -rf .ab_base/cuda .ab_base/tests
mkdir -p .ab_base
git archive "$rev" cuda tests/native | tar -x -C .ab_base
echo "$rev" > .ab_base/REV
echo ".ab_base/ holds $rev"
