#!/usr/bin/env bash
# B2 with seeds (issue: "the SimCLR quality gap against lightly"): visrep's and lightly's SimCLR side by side,
# one CPU core and one thread each, started together so both see the same machine, 20 minutes of training each,
# then kNN on CIFAR-10. Then the A/B arms the same way (visrep's loop with lightly's SimCLRTransform, lightly's
# loop with visrep's batched views), then random init. Resumable: every finished (run, seed) is one JSON in
# benchmarks/results/b2_quality_seeds/ and is skipped on a rerun; the summary is benchmarks/results/b2_quality_seeds.json.
#
#   benchmarks/b2_seeds.sh                  # everything (about 2 h 20 min on 2 cores)
#   SEEDS="0" BUDGET=60 benchmarks/b2_seeds.sh   # a quick look
#   AB_SEEDS="0 1" benchmarks/b2_seeds.sh        # the A/B arms on fewer seeds than the main pair
set -euo pipefail
cd "$(dirname "$0")/.."
PY=${PYTHON:-.venv/bin/python}
BUDGET=${BUDGET:-1200}
SEEDS=${SEEDS:-0 1 2}
DIR=${RUNS_DIR:-benchmarks/results/b2_quality_seeds}
OUT=${OUT:-benchmarks/results/b2_quality_seeds.json}
export VISREP_CACHE=${VISREP_CACHE:-$PWD/.cache/visrep}
run() {  # run name, seed, core
  "$PY" benchmarks/b2_quality.py --only "$1" --seeds "$2" --threads 1 --cpu-core "$3" --budget-s "$BUDGET" \
    --runs-dir "$DIR" --out "$(mktemp)" "${@:4}"
}
pair() {  # two run names, seed: one per core, at the same time
  run "$1" "$3" 0 & a=$!
  run "$2" "$3" 1 & b=$!
  wait $a; wait $b
}
for s in $SEEDS; do pair visrep_simclr lightly_simclr "$s"; done
for s in ${AB_SEEDS:-$SEEDS}; do pair visrep_simclr_lightlyviews lightly_simclr_visrepviews "$s"; done
set -- $SEEDS  # random init: evaluation only, two at a time
while [ $# -gt 0 ]; do
  run random_init "$1" 0 & a=$!
  if [ $# -gt 1 ]; then run random_init "$2" 1 & b=$!; wait $b; fi
  wait $a; shift; [ $# -gt 0 ] && shift
done
"$PY" benchmarks/b2_quality.py --only random_init --seeds "${SEEDS// /,}" --runs-dir "$DIR" --out "$OUT" >/dev/null
echo "wrote $OUT"
