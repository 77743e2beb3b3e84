"""The rows of every experiment as a work queue: `NAME INDEX` per line.

  python -m experiments.queue --scale=tiny                  # every experiment
  python -m experiments.queue --scale=tiny --experiments=omnimoe,l3 --rows=train

Training rows come first, table by table in the order given (so that a table
finishes before the next starts, and a baseline another table reuses has
trained before that table reaches it), then the timing rows, which should run
alone on the machine. Within a table the rows go seed by seed (every arm's
seed 0, then every arm's seed 1, ...): a suite stopped partway leaves each arm
with the same completed seeds, which is what the paired verdicts need.
scripts/run_all_tiny.sh feeds these lines to
`run.py --experiment=NAME --sweep_index=INDEX`, as a job array would.
"""

import os
import sys

from absl import app, flags

from experiments import registry

flags.DEFINE_enum("scale", "tiny", list(registry.SCALES), "Which scale's rows.")
flags.DEFINE_list("experiments", None, "Experiments to queue (default: all, in registry order).")
flags.DEFINE_enum("rows", "all", ["all", "train", "measure"],
                  "Only the training rows, only the timing (measure) rows, or both.")
FLAGS = flags.FLAGS


def queue(names, scale: str, rows: str = "all") -> list[tuple[str, int]]:
  """(experiment, sweep index) pairs: training rows table by table, seed-major within
  a table, then timing rows (`rows`: "all", "train" or "measure")."""
  train, measure = [], []
  for name in names:
    experiment = registry.get(name)
    if scale not in experiment.scales:
      continue
    indexed = list(enumerate(experiment.rows(scale)))
    indexed.sort(key=lambda pair: (pair[1]["seed"], pair[0]))
    for i, row in indexed:
      (measure if row.get("task") == "measure" else train).append((name, i))
  return {"all": train + measure, "train": train, "measure": measure}[rows]


def main(argv):
  del argv
  try:
    for name, index in queue(FLAGS.experiments or registry.names(), FLAGS.scale, FLAGS.rows):
      print(name, index, flush=True)
  except BrokenPipeError:  # the reader stopped early (e.g. `| head`): not an error
    os.dup2(os.open(os.devnull, os.O_WRONLY), sys.stdout.fileno())


if __name__ == "__main__":
  app.run(main)
