#!/usr/bin/env bash
# Runs every experiment at tiny scale on one CPU machine, then aggregates them:
# the commands behind results/*/ (see README "Results").
#
#   bash scripts/run_all_tiny.sh [RUNS_ROOT] [PARALLEL] [EXPERIMENTS]
#
# EXPERIMENTS is a comma-separated list (default: all). The queue comes from
# `python -m experiments.queue`: training rows table by table, then the timing
# rows, which run alone. Training rows run PARALLEL at a time (default 2: on a
# 2-core machine two single-row processes finish a sweep sooner than one). Each
# line is the same `run.py --experiment=NAME --sweep_index=I` a job array would
# run; rerunning the script skips completed rows and resumes interrupted ones,
# so the suite can be run in pieces. A table is aggregated into results/NAME
# after the queue.
set -uo pipefail
cd "$(dirname "$0")/.."
ROOT=${1:-runs/experiments}
PARALLEL=${2:-2}
PY=${PYTHON:-python3}
WHICH=()
if [ -n "${3:-}" ]; then WHICH=(--experiments="$3"); fi
mkdir -p "$ROOT"
$PY -m experiments.queue --scale=tiny --rows=train "${WHICH[@]}" | xargs -P "$PARALLEL" -L 1 sh -c \
  "$PY run.py --experiment=\$0 --sweep_index=\$1 --scale=tiny --workdir=$ROOT \
     > $ROOT/log_\$0_\$1.txt 2>&1; echo \"\$0 \$1 exit \$?\""
$PY -m experiments.queue --scale=tiny --rows=measure "${WHICH[@]}" | while read -r name i; do
  $PY run.py --experiment="$name" --sweep_index="$i" --scale=tiny --workdir="$ROOT" \
    > "$ROOT/log_${name}_${i}.txt" 2>&1; echo "$name $i exit $?"
done
for name in $($PY -m experiments.queue --scale=tiny "${WHICH[@]}" | cut -d' ' -f1 | uniq); do
  $PY -m experiments.report --experiment="$name" --scale=tiny --runs="$ROOT" --out="results/$name"
done
