"""moejax entry point: flags -> config -> train_and_evaluate.

  python run.py                                         # tiny dense LM, embedded corpus, CPU
  python run.py --config=configs/dense.py:tiny --config.train.steps=200 --workdir=runs/x
  python run.py --config=configs/dense.py:small --dry_run   # budget only, no training
  python run.py --list                                  # the experiments (experiments/)
  python run.py --experiment=omnimoe --scale=tiny       # a whole sweep, row by row
  python run.py --experiment=omnimoe --sweep_index=3    # one row (job arrays, TPU slices)

A workdir that holds a checkpoint is resumed. A config that cannot work stops
before anything is built, with one sentence saying what to change (exit 2).
"""

import os
import re
import sys

from absl import app, flags, logging
from ml_collections import config_flags

_HERE = os.path.dirname(os.path.abspath(__file__))



def _unknown_field_message(exc: BaseException, argv=None) -> str:
  text = str(exc).replace("\\n", " ").replace("\\'", "'")
  field = (re.search(r"\w+", text) or re.search(".*", text)).group(0)
  suggestion = re.search(r'Did you mean "(\w+)"', text)
  hint = field
  for arg in argv or sys.argv:  # name the argument, e.g. --config.moe.dispatch=x
    if arg.startswith("--config.") and field in arg.partition("=")[0].split(".")[1:]:
      hint = arg
      break
  if suggestion:
    hint += f"; did you mean {suggestion.group(1)}?"
  return (f"a --config.* override names a field that does not exist ({hint}); "
          "the groups are the top-level fields of config.json, e.g. model, train, data, "
          "moe, atomic (OmniMoE/PEER), mohge, loop, l3 (moejax/config/base.py and each "
          "paper's config.py list the fields).")


try:
  # ml_collections resolves --config.x.y overrides here, so a misspelt field
  # fails at definition time: report it as one sentence.
  config_flags.DEFINE_config_file(
      "config", os.path.join(_HERE, "configs", "dense.py:tiny"),
      "Config file and preset, e.g. configs/dense.py:tiny. Override any field with "
      "--config.<group>.<field>=value.", lock_config=True)
except (AttributeError, KeyError) as _e:
  print(f"config error: {_unknown_field_message(_e)}", file=sys.stderr)
  sys.exit(2)
flags.DEFINE_string("workdir", None, "Where outputs and checkpoints go (default runs/<config name> followed by the "
                    "--config.* overrides, e.g. runs/dense_tiny,train.steps=50).")
flags.DEFINE_string("profile_steps", None, "A:B writes a jax.profiler trace of steps A to "
                    "B-1 under <workdir>/profile (same as --config.debug.profile_steps).")
flags.DEFINE_bool("dry_run", False, "Validate the config and print its budget, then exit.")
flags.DEFINE_string("experiment", None, "Run this experiment's sweep (see --list) instead "
                    "of one --config; runs go to <workdir>/<experiment>/<scale>/<row>.")
flags.DEFINE_enum("scale", "tiny", ["tiny", "small", "paper"],
                  "Experiment size: tiny (CPU), small (one GPU), paper (--dry_run budgets).")
flags.DEFINE_integer("sweep_index", None, "Run only this row of the experiment's sweep.")
flags.DEFINE_multi_string("set", [], "With --experiment: group.field=value applied to every "
                          "row, e.g. --set=data.data_dir=/mnt/gcs/data --set=mesh.data=-1.")
flags.DEFINE_bool("list", False, "List the experiments and their rows, then exit.")
flags.DEFINE_enum("jax_distributed", "auto", ["auto", "on", "off"],
                  "Initialize jax.distributed: auto detects multi-process launches.")
flags.DEFINE_string("coordinator_address", "", "host:port of process 0 (multi-process).")
flags.DEFINE_integer("num_processes", 0, "Number of processes (multi-process).")
flags.DEFINE_integer("process_id", -1, "This process's index (multi-process).")
FLAGS = flags.FLAGS


def _config_error_in(exc: BaseException | None):
  """The ConfigError that caused `exc`, if any (config files raise it on load)."""
  from moejax.errors import ConfigError
  while exc is not None:
    if isinstance(exc, ConfigError):
      return exc
    exc = exc.__cause__ or exc.__context__
  return None


def _config_path_from_anywhere(argv):
  """--config=configs/x.py:preset works from any directory: a relative path that
  does not exist here is taken relative to the repository."""
  out = []
  for arg in argv:
    if arg.startswith("--config="):
      path, sep, preset = arg[len("--config="):].partition(":")
      if path and not os.path.isabs(path) and not os.path.exists(path):
        candidate = os.path.join(_HERE, path)
        if os.path.exists(candidate):
          arg = f"--config={candidate}{sep}{preset}"
    out.append(arg)
  return out


def _one_line(text: str) -> str:
  return " ".join(str(text).split())


def _config_load_message(argv, exc: OSError) -> str:
  """The sentence for a --config file that is missing or failed to load."""
  spec = next((a.split("=", 1)[1] for a in argv if a.startswith("--config=")), "")
  path = spec.partition(":")[0]
  if os.path.exists(path) or os.path.exists(os.path.join(_HERE, path)):
    cause = _config_error_in(exc) or exc.__cause__ or exc
    return (f"--config={spec} failed to load: {type(cause).__name__}: "
            f"{_one_line(cause)[:300]}.")
  return (f"--config={spec}: no such config file, here or under {_HERE} (the presets "
          "are configs/*.py, e.g. --config=configs/dense.py:tiny).")


def parse_flags(argv):
  """absl's parser, but every bad flag prints one sentence instead of a traceback."""
  argv = _config_path_from_anywhere(argv)
  positional = [a for a in argv[1:] if not a.startswith("-")]
  if positional:
    print(f"config error: unexpected argument {positional[0]!r}; flags start with --, "
          "e.g. --config=configs/dense.py:tiny (python3 run.py --help lists them).",
          file=sys.stderr, flush=True)
    sys.exit(2)
  try:
    return FLAGS(argv)
  except (AttributeError, KeyError) as e:
    # An override of a field that does not exist, found while parsing an explicit
    # --config= (with the default config it is found at definition, above).
    print(f"config error: {_unknown_field_message(e, argv)}", file=sys.stderr, flush=True)
    sys.exit(2)
  except OSError as e:
    # A --config file that failed to load, met while applying a --config.* override.
    print(f"config error: {_config_load_message(argv, e)}", file=sys.stderr, flush=True)
    sys.exit(2)
  except flags.Error as e:
    cause = _config_error_in(e)
    if cause is not None:
      # ml_collections re-raises the error with the traceback folded into the
      # message; the sentence we wrote is what follows the last "ConfigError: ".
      message = str(cause).rsplit("ConfigError: ", 1)[-1].strip()
    elif "No such file or directory" in str(e) or isinstance(
        e.__cause__ or e.__context__, FileNotFoundError):
      spec = next((a.split("=", 1)[1] for a in argv if a.startswith("--config=")), "")
      message = (f"--config={spec}: no such config file, here or under {_HERE}; the "
                 "presets are configs/*.py (e.g. --config=configs/dense.py:tiny).")
    else:
      message = (f"{_one_line(e)} (python3 run.py --help lists the flags; config fields "
                 "are in moejax/config/base.py).")
    print(f"config error: {message}", file=sys.stderr, flush=True)
    sys.exit(2)


def main(argv):
  if len(argv) > 1:
    raise app.UsageError(f"Unexpected arguments: {argv[1:]}")
  import jax  # after flag parsing, so --jax_* flags and XLA_FLAGS apply
  from moejax import distributed
  from moejax.errors import CheckpointSaveError, ConfigError, NonFiniteLossError

  if not FLAGS["verbosity"].present:
    logging.set_verbosity(logging.WARNING)  # Orbax and TFDS are chatty at INFO
  try:
    cfg = FLAGS.config
    name = cfg.name  # a config file that failed to load fails here, not at parsing
  except OSError as e:
    print(f"config error: {_config_load_message(sys.argv, e)}", file=sys.stderr, flush=True)
    sys.exit(2)
  from moejax.workdir import default_workdir
  workdir = FLAGS.workdir or default_workdir(
      name, config_flags.get_override_values(FLAGS["config"]))
  if FLAGS.profile_steps is not None:
    cfg.debug.profile_steps = FLAGS.profile_steps
  try:
    if (FLAGS.workdir or "").startswith("gs://"):
      raise ConfigError(f"--workdir={FLAGS.workdir} is a bucket URL, but run outputs are "
                        f"written as local files; mount the bucket with gcsfuse (e.g. at "
                        f"/mnt/gcs) and pass --workdir=/mnt/gcs/... instead.")
    if FLAGS.list:
      from experiments import listing
      print(listing.describe(FLAGS.scale))
      return
    distributed.initialize(FLAGS.jax_distributed,
                           coordinator_address=FLAGS.coordinator_address,
                           num_processes=FLAGS.num_processes, process_id=FLAGS.process_id)
    distributed.check_platform()
    if FLAGS.experiment and any(a.startswith("--config") for a in sys.argv[1:]):
      raise ConfigError("--config and --config.* set a single run and are ignored by "
                        "--experiment; change every row with --set=group.field=value.")
    if FLAGS.experiment:
      from experiments.sweep import parse_settings, run_sweep
      records = run_sweep(FLAGS.experiment, FLAGS.scale, FLAGS.workdir or "runs/experiments",
                          sweep_index=FLAGS.sweep_index, dry_run=FLAGS.dry_run,
                          settings=parse_settings(FLAGS.set))
      if any(r.get("status") == "failed" for r in records):
        sys.exit(1)
      return
    if FLAGS.sweep_index is not None or FLAGS.set:
      raise ConfigError("--sweep_index and --set apply to an experiment's rows; add "
                        "--experiment=NAME (python run.py --list names them), or use "
                        "--config.group.field=value for a single run.")
    if FLAGS.dry_run:
      from moejax import dry_run
      dry_run.report(cfg)
      return
    from moejax.train import train_and_evaluate
    train_and_evaluate(cfg, workdir)
  except ConfigError as e:
    print(f"config error: {e}", file=sys.stderr, flush=True)
    sys.exit(2)
  except (NonFiniteLossError, CheckpointSaveError) as e:
    print(f"training stopped: {e}", file=sys.stderr, flush=True)
    sys.exit(3)


if __name__ == "__main__":
  import jax
  jax.config.parse_flags_with_absl()  # --jax_* flags, e.g. --jax_platforms=cpu
  app.run(main, flags_parser=parse_flags)
