#!/usr/bin/env bash
# The prepared GPU check (issue 14): set-up as the README's, then benchmarks/gpu_check.py on the GPU.
# Under 8 minutes on one GPU; writes gpu_check.json to $OUT (or benchmarks/results/). Fails loudly without CUDA.
#   bash benchmarks/gpu_check.sh            # on a GPU machine
#   bash benchmarks/gpu_check.sh --cpu      # the tiny CPU mode
set -euo pipefail
cd "$(dirname "$0")/.."
scripts/setup
export VISREP_CACHE="${VISREP_CACHE:-$PWD/.cache/visrep}"
exec .venv/bin/python benchmarks/gpu_check.py "$@"
