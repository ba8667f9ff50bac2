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
#   EXTRA="--train-subset 500 --test-subset 100 --batch-size 32" BUDGET=3 RUNS_DIR=/tmp/b2 OUT=/tmp/b2.json benchmarks/b2_seeds.sh  # smoke test
set -euo pipefail
cd "$(dirname "$0")/.."
PY=${PYTHON:-.venv/bin/python}
BUDGET=${BUDGET:-1200}
SEEDS=${SEEDS:-0 1 2}
DIR=${RUNS_DIR:-benchmarks/results/b2_quality_seeds}
OUT=${OUT:-benchmarks/results/b2_quality_seeds.json}
export VISREP_CACHE=${VISREP_CACHE:-$PWD/.cache/visrep}
TMP=$(mktemp -d); trap 'rm -rf "$TMP"' EXIT  # each run's own summary; the one to keep is written at the end
run() {  # run name, seed, core
  "$PY" benchmarks/b2_quality.py --only "$1" --seeds "$2" --threads 1 --cpu-core "$3" --budget-s "$BUDGET" \
    --runs-dir "$DIR" --out "$TMP/$1_$2.json" ${EXTRA:-}
}
both() {  # (run, seed) on core 0 and (run, seed) on core 1, at the same time; a failure stops the script after both end
  local failed=0
  run "$1" "$2" 0 & a=$!
  run "$3" "$4" 1 & b=$!
  wait $a || failed=1; wait $b || failed=1
  return $failed
}
pair() { both "$1" "$3" "$2" "$3"; }  # two runs, one seed
for s in $SEEDS; do pair visrep_simclr lightly_simclr "$s"; done
for s in ${AB_SEEDS:-$SEEDS}; do pair visrep_simclr_lightlyviews lightly_simclr_visrepviews "$s"; done
set -- $SEEDS  # random init: evaluation only, two at a time
while [ $# -gt 0 ]; do
  if [ $# -gt 1 ]; then both random_init "$1" random_init "$2"; shift 2; else run random_init "$1" 0; shift; fi
done
"$PY" benchmarks/b2_quality.py --only random_init --seeds "$(echo $SEEDS | tr ' ' ',')" --runs-dir "$DIR" --out "$OUT" >/dev/null
echo "wrote $OUT"
