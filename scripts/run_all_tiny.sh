#!/usr/bin/env bash
# Runs every experiment at tiny scale on one CPU machine, then aggregates them:
# the exact commands behind results/*/ (see README "Results").
#
#   bash scripts/run_all_tiny.sh [RUNS_ROOT] [PARALLEL]
#
# The results under results/ came from this script with its last queue lines
# (loopmoe 6-7 and all_variants 2-5: the loopmoe_nogate, switch and mixtral arms)
# cut for time, and the timing rows run beside two training rows and the tests.
# Training rows run PARALLEL at a time (default 2: on a 2-core machine two
# single-row processes finish a sweep sooner than one). Rows are queued so that
# a baseline shared by several tables (dense, deepseek, omnimoe, peer, L3) has
# finished before the tables that reuse it reach it. The timing rows (OmniMoE vs
# PEER latency, dispatch backends) run last and alone. Each line of the queue is
# the same `run.py --experiment=NAME --sweep_index=I` a job array would run;
# rerunning the script skips completed rows and resumes interrupted ones.
set -uo pipefail
cd "$(dirname "$0")/.."
ROOT=${1:-runs/experiments}
PARALLEL=${2:-2}
PY=${PYTHON:-python3}
queue() {
  # Every table's main arms first, both seeds; then the controls and the extra
  # MoE flavours of all_variants (on a shared 2-core machine these can be cut).
  for i in 0 1 2 3 4 5 6 7; do echo "omnimoe $i"; done
  for i in 2 3 4 5 6 7; do echo "l3 $i"; done
  for i in 2 3 4 5; do echo "mohge $i"; done
  for i in 0 1 2 3 4 5; do echo "loopmoe $i"; done
  for i in 0 1; do echo "mohge $i"; echo "l3 $i"; done
  for i in 0 1 6 7 8 9 10 11 14 15 12 13; do echo "all_variants $i"; done
  for i in 6 7; do echo "mohge $i"; done
  for i in 6 7; do echo "loopmoe $i"; done
  for i in 2 3 4 5; do echo "all_variants $i"; done
}
mkdir -p "$ROOT"
queue | xargs -P "$PARALLEL" -L 1 sh -c \
  "$PY run.py --experiment=\$0 --sweep_index=\$1 --scale=tiny --workdir=$ROOT \
     > $ROOT/log_\$0_\$1.txt 2>&1; echo \"\$0 \$1 exit \$?\""
for i in 8 9; do $PY run.py --experiment=omnimoe --sweep_index=$i --scale=tiny --workdir="$ROOT"; done
$PY run.py --experiment=dispatch --scale=tiny --workdir="$ROOT"
for name in omnimoe mohge loopmoe l3 all_variants dispatch; do
  $PY -m experiments.report --experiment=$name --scale=tiny --runs="$ROOT" --out=results/$name
done
