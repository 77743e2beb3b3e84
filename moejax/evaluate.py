"""Evaluate a trained run's checkpoint on any split of any dataset.

  python3 -m moejax.evaluate --workdir=runs/dense_tiny          # its validation split
  python3 -m moejax.evaluate --workdir=RUN --split=train --max_batches=20
  python3 -m moejax.evaluate --workdir=RUN --dataset=files --files='/data/notes/*.txt'
  python3 -m moejax.evaluate --workdir=RUN --dataset=lm1b --split=test --step=2000

Restores the latest checkpoint (or --step) with the run's recorded config and
its own tokenizer, on the run's mesh (or --one_device), and scores the split in
evaluation mode: loss (nats per token), perplexity and bits per byte, every
window of the split once (or its first --max_batches batches). Another dataset
is read with the run's tokenizer: its texts are tokenized once into a cache
keyed by that tokenizer, beside the dataset. Writes

  RUN/eval/<dataset>-<split>-step<N>.json

and nothing else in the workdir: final.json, config.json, metrics.jsonl and the
checkpoints stay as training left them.
"""

from __future__ import annotations

import copy
import math
import os
import sys
import time

from absl import app, flags, logging

FLAGS = flags.FLAGS


def eval_data_config(run_data_cfg, *, dataset=None, split=None, files=None,
                     eval_files=None, text_key=None, data_dir=None):
  """The data config to score (its eval_split): the run's own, or another dataset's."""
  cfg = copy.deepcopy(run_data_cfg)
  own = dataset is None or dataset == run_data_cfg.name
  if not own:
    cfg.name = dataset
    if "files" in cfg:  # another files corpus only through --files
      cfg.files, cfg.eval_files = "", ""
  if files is not None:
    cfg.files = files
  if eval_files is not None:
    cfg.eval_files = eval_files
  if text_key is not None:
    cfg.text_key = text_key
  if data_dir is not None:
    cfg.data_dir = data_dir
  cfg.eval_split = split or (run_data_cfg.eval_split if own else "validation")
  return cfg


def output_path(workdir: str, info: dict, split: str, step: int) -> str:
  """RUN/eval/<dataset>-<split>-step<N>.json; a files corpus adds its fingerprint."""
  label = info["name"].replace("/", "_")
  if info["name"] == "files" and info.get("fingerprint"):
    label += f"_{info['fingerprint'][:8]}"
  return os.path.join(workdir, "eval", f"{label}-{split.replace('/', '_')}-step{step}.json")


def evaluate_run(workdir: str, *, step=None, dataset=None, split=None, files=None,
                 eval_files=None, text_key=None, data_dir=None, max_batches: int = 0,
                 batch_size: int = 0, seq_len: int = 0, one_device: bool = False,
                 say=print) -> dict:
  """Scores one checkpoint; returns (and writes) the record described above."""
  import jax
  import jax.numpy as jnp

  from moejax import data as data_lib
  from moejax import sharding
  from moejax.errors import ConfigError
  from moejax.metrics import write_json
  from moejax.provenance import provenance
  from moejax.saved_run import SavedRun
  from moejax.train import evaluate, make_eval_step

  if max_batches < 0 or batch_size < 0 or seq_len < 0:
    raise ConfigError("--max_batches, --batch_size and --seq_len must be >= 0 (0 = the "
                      "whole split, the run's batch, the run's sequence length).")
  start = time.time()
  run = SavedRun.load(workdir, step=step, one_device=one_device, say=say)
  data_cfg = eval_data_config(run.cfg.data, dataset=dataset, split=split, files=files,
                              eval_files=eval_files, text_key=text_key, data_dir=data_dir)
  seq_len = seq_len or int(run.cfg.data.seq_len)
  if seq_len > run.cfg.model.max_seq_len:
    raise ConfigError(f"--seq_len={seq_len} is longer than the model's context "
                      f"(model.max_seq_len = {run.cfg.model.max_seq_len}).")
  batch = batch_size or int(run.cfg.train.global_batch)
  per_step = sharding.batch_axis_size(run.mesh)
  if batch % per_step:
    raise ConfigError(f"--batch_size={batch} is not divisible by the {per_step} batch "
                      f"shards of the mesh; use a multiple of {per_step} or --one_device.")
  data = data_lib.RunData.for_tokenizer(data_cfg, run.data.tokenizer,
                                        splits=(data_cfg.eval_split,))
  info = data.split_info(data_cfg.eval_split)
  iterator = data.eval_iterator(seq_len=seq_len, global_batch=batch,
                                rows=sharding.process_batch_rows(run.mesh, batch))
  total_batches = math.ceil(iterator.num_sequences / batch)
  batches = min(total_batches, max_batches) if max_batches else total_batches
  say(f"scoring {info['name']}/{data_cfg.eval_split}: {batches} batches of {batch} x "
      f"{seq_len} tokens ({iterator.num_sequences:,} windows in the split)")
  with run.use_mesh():
    bytes_per_token = jax.device_put(jnp.asarray(run.data.tokenizer.bytes_per_token,
                                                 jnp.float32), sharding.replicated(run.mesh))
    metrics = evaluate(make_eval_step(run.spec),
                       dict(params=run.params, model_state=run.model_state), iterator,
                       bytes_per_token, run.mesh, batch, max_batches)
  record = dict(
      workdir=run.workdir, step=run.step, dataset=info, split=data_cfg.eval_split,
      seq_len=seq_len, batch_size=batch, batches=batches, whole_split=batches == total_batches,
      trained_on=run.dataset.get("name"), **metrics,
      **provenance(run.mesh.devices.size), wall_time_s=round(time.time() - start, 2),
      command=" ".join(sys.argv))
  path = output_path(run.workdir, info, data_cfg.eval_split, run.step)
  if jax.process_index() == 0:
    os.makedirs(os.path.dirname(path), exist_ok=True)
    write_json(path, record)
  say(f"step {run.step} on {info['name']}/{data_cfg.eval_split}: loss "
      f"{metrics['eval/loss']:.4f} | bits/byte {metrics['eval/bits_per_byte']:.4f} | "
      f"perplexity {metrics['eval/perplexity']:.2f} | {metrics['eval/tokens']:,.0f} tokens")
  say(f"written: {path}")
  record["path"] = path
  return record


def main(argv):
  if len(argv) > 1:
    raise app.UsageError(f"Unexpected arguments: {argv[1:]}")
  from moejax.errors import ConfigError
  if not FLAGS["verbosity"].present:
    logging.set_verbosity(logging.WARNING)
  try:
    evaluate_run(FLAGS.workdir, step=FLAGS.step, dataset=FLAGS.dataset, split=FLAGS.split,
                 files=FLAGS.files, eval_files=FLAGS.eval_files, text_key=FLAGS.text_key,
                 data_dir=FLAGS.data_dir, max_batches=FLAGS.max_batches,
                 batch_size=FLAGS.batch_size, seq_len=FLAGS.seq_len,
                 one_device=FLAGS.one_device)
  except ConfigError as e:
    print(f"evaluate error: {e}", file=sys.stderr, flush=True)
    sys.exit(2)


def define_flags():
  """The command line; defined only when run as a program, so that importing
  this module next to another command's module does not clash."""
  flags.DEFINE_string("workdir", None, "The training run's directory.", required=True)
  flags.DEFINE_integer("step", None, "Checkpoint step (default: the latest).")
  flags.DEFINE_string("dataset", None, "Dataset to score (default: the run's own): "
                      "stdlib_source, synthetic, files, or a prepared TFDS name.")
  flags.DEFINE_string("split", None, "Split to score (default: the run's evaluation "
                      "split for its own dataset, else 'validation').")
  flags.DEFINE_string("files", None, "With --dataset=files: the globs of the text files "
                      "(see README, 'Your own text files').")
  flags.DEFINE_string("eval_files", None, "With --dataset=files: explicit validation files.")
  flags.DEFINE_string("text_key", None, "The text field of the dataset's examples.")
  flags.DEFINE_string("data_dir", None, "Where the dataset is prepared (default: the run's).")
  flags.DEFINE_integer("max_batches", 0, "Score only the first B batches (0 = the whole split).")
  flags.DEFINE_integer("batch_size", 0, "Sequences per batch (0 = the run's global batch).")
  flags.DEFINE_integer("seq_len", 0, "Tokens per sequence (0 = the run's data.seq_len).")
  flags.DEFINE_bool("one_device", False, "Evaluate on one device instead of the run's mesh.")


if __name__ == "__main__":
  define_flags()
  app.run(main)
