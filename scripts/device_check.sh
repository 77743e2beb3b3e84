#!/usr/bin/env bash
# One prepared check of a GPU or TPU machine (benchmarks/device_check.py says what
# it runs). On the device machine, which reaches no package index:
#
#   bash scripts/device_check.sh                  # about 8 minutes; results in benchmarks/results/
#
# Here, before: the wheels it lacks (ml-collections, tensorflow-datasets and what
# they need, tensorboardX) for Python 3.12, into .whl/ (ignored by git; carry it):
#
#   bash scripts/device_check.sh --fetch_wheels
#
# Here, on CPU (CI runs this): every part at toy sizes, budgets checked on paper:
#
#   bash scripts/device_check.sh --dry_run [--out_dir=DIR]
set -euo pipefail
cd "$(dirname "$0")/.."
PY=${PYTHON:-python3}
# What the device image lacks of moejax's needs (its image has jax, flax, optax,
# orbax, etils, protobuf, pyarrow, ...), at the versions tested here.
WHEELS=(ml-collections==1.1.0 tensorflow-datasets==4.9.10 array-record==0.8.6
        tensorboardX==2.6.5 promise==2.3 simple-parsing==0.1.9 docstring-parser==0.18.0
        dm-tree==0.1.10 toml==0.10.2 termcolor==3.3.0 immutabledict==4.3.1
        tensorflow-metadata==1.21.0 googleapis-common-protos==1.76.0
        importlib-resources==7.1.0)
if [ "${1:-}" = "--fetch_wheels" ]; then
  mkdir -p .whl
  for w in "${WHEELS[@]}"; do
    $PY -m pip download -q --no-deps --only-binary=:all: --python-version 3.12 \
      --implementation cp --platform manylinux_2_28_x86_64 --platform manylinux_2_27_x86_64 \
      --platform manylinux_2_17_x86_64 --platform manylinux2014_x86_64 \
      --platform manylinux1_x86_64 --platform any -d .whl "$w" 2>/dev/null \
      || $PY -m pip wheel -q --no-deps -w .whl "$w"  # pure Python, source only (promise)
  done
  ls .whl
  exit 0
fi
if [ -d .whl ] && ls .whl/*.whl >/dev/null 2>&1 && ! $PY -c "import ml_collections" 2>/dev/null; then
  # The device machine: install what it lacks, without touching its jax.
  $PY -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade \
    --target /tmp/moejax_site .whl/*.whl
  export PYTHONPATH=/tmp/moejax_site${PYTHONPATH:+:$PYTHONPATH}
fi
export PYTHONUNBUFFERED=1
exec $PY -m benchmarks.device_check "$@"
