"""The report's command line: `python -m experiments.report --experiment=NAME ...`
from the repository root (see experiments/report/__init__.py)."""

import os
import sys

from absl import app, flags

from experiments import registry
from experiments.report import aggregate, default_command
from experiments.report.runs import DEFAULT_RUNS
from moejax.errors import ConfigError

flags.DEFINE_string("experiment", None, "The experiment to aggregate (python run.py --list "
                    "names them).")
flags.DEFINE_enum("scale", "tiny", list(registry.SCALES), "The scale its runs were made at.")
flags.DEFINE_string("runs", DEFAULT_RUNS, "Root of the experiment runs (run.py --workdir).")
flags.DEFINE_string("out", None, "Output folder (default results/<experiment>/<scale>).")
flags.DEFINE_string("command", None, "The command that produced the runs, quoted in the "
                    "table (default: python run.py --experiment=NAME --scale=SCALE).")
flags.mark_flag_as_required("experiment")
FLAGS = flags.FLAGS


def main(argv):
  if len(argv) > 1:
    raise app.UsageError(f"Unexpected arguments: {argv[1:]}")
  try:
    experiment = registry.get(FLAGS.experiment)
    where = os.path.join(FLAGS.runs, experiment.name, FLAGS.scale)
    if not os.path.isdir(where):
      command = default_command(experiment.name, FLAGS.scale, FLAGS.runs)
      raise ConfigError(f"There are no runs in {where}; run `{command}` first, or point "
                        f"--runs at the root that holds them.")
    aggregate(experiment, FLAGS.scale, FLAGS.runs,
              FLAGS.out or os.path.join("results", experiment.name, FLAGS.scale),
              command=FLAGS.command)
  except ConfigError as e:
    print(f"config error: {e}", file=sys.stderr, flush=True)
    sys.exit(2)


if __name__ == "__main__":
  app.run(main)
