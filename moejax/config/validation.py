"""Config validation: every check runs before anything is built or trained.

Each failure raises `ConfigError` with one sentence that names the field and
says what to change; run.py prints it and exits with status 2. Checks that need
devices (mesh shape) take the device count as an argument so they can be
tested without devices.
"""

from __future__ import annotations

import math

import ml_collections

from moejax import data as data_lib
from moejax import extensions
from moejax import sharding
from moejax.config.checks import DTYPES, one_of, positive, require
from moejax.data import local_files, tfds_access
from moejax.model import sublayers

def _validate_model(m) -> None:
  require(m.sublayer in sublayers.names(),
          f"Unknown --config.model.sublayer={m.sublayer!r}; choose one of "
          f"{sublayers.names()}.")
  positive("model", m, "d_model", "num_layers", "num_heads", "num_kv_heads", "head_dim",
           "ffn_dim", "max_seq_len", "rope_theta", "norm_eps", "init_std")
  require(m.num_heads % m.num_kv_heads == 0,
          f"--config.model.num_heads={m.num_heads} must be a multiple of "
          f"--config.model.num_kv_heads={m.num_kv_heads} (grouped-query attention).")
  require(m.head_dim % 2 == 0,
          f"--config.model.head_dim={m.head_dim} must be even for rotary embeddings.")
  for field in ("compute_dtype", "param_dtype"):
    require(getattr(m, field) in DTYPES,
            f"--config.model.{field}={getattr(m, field)!r} is not one of {DTYPES}.")


def _validate_train(t) -> None:
  positive("train", t, "steps", "learning_rate", "global_batch", "log_every",
           "eval_every", "grad_clip", "eps")
  require(0 <= t.warmup_steps <= t.steps,
          f"--config.train.warmup_steps={t.warmup_steps} must lie in "
          f"[0, train.steps={t.steps}].")
  require(0.0 <= t.min_lr_ratio <= 1.0,
          f"--config.train.min_lr_ratio={t.min_lr_ratio} must lie in [0, 1].")
  require(t.weight_decay >= 0,
          f"--config.train.weight_decay must be >= 0, got {t.weight_decay}.")
  for field in ("b1", "b2"):
    require(0.0 <= getattr(t, field) < 1.0,
            f"--config.train.{field}={getattr(t, field)} must lie in [0, 1).")
  for field in ("eval_batches", "final_eval_batches"):
    require(getattr(t, field) >= 0,
            f"--config.train.{field} must be >= 0 (0 = the whole split), got "
            f"{getattr(t, field)}.")


def profile_range(text: str) -> tuple[int, int] | None:
  """"A:B" -> (A, B) with 1 <= A < B; "" -> None; anything else a ConfigError."""
  if not str(text).strip():
    return None
  first, sep, last = str(text).partition(":")
  try:
    a, b = int(first), int(last)
  except ValueError:
    a = b = 0
  require(sep and 1 <= a < b,
          f"--profile_steps={text} must be A:B with 1 <= A < B (trace steps A to B-1), "
          "e.g. --profile_steps=10:13.")
  return a, b


def validate_data(d) -> None:
  """The fields of the local files dataset (the others are checked with the data)."""
  if d.name != tfds_access.FILES:
    stray = [f for f in ("files", "eval_files") if str(d[f]).strip()]
    require(not stray,
            f"--config.data.{stray[0] if stray else ''} is set, but data.name is {d.name!r}, "
            "which ignores it; add --config.data.name=files to train on your files.")
    return
  require(str(d.files).strip(),
          "--config.data.name=files needs --config.data.files, a glob of your text "
          "files (e.g. '/data/books/*.txt').")
  require(0.0 < d.eval_fraction < 1.0,
          f"--config.data.eval_fraction={d.eval_fraction} must lie strictly between 0 and "
          "1 (the share of documents held out for validation).")
  one_of("data", d, "txt_documents", local_files.TXT_DOCUMENTS)


def validate(cfg: ml_collections.ConfigDict, *, num_devices: int,
             num_processes: int = 1, check_data: bool = True) -> tuple[int, ...]:
  """Checks `cfg` for `num_devices` devices; returns the resolved mesh shape."""
  require(isinstance(cfg.seed, int) and 0 <= cfg.seed < 2**32,
          f"--config.seed={cfg.seed} must be an integer in [0, 2^32) (it seeds the "
          "initialisation and the data order).")
  _validate_model(cfg.model)
  _validate_train(cfg.train)
  profile_range(cfg.debug.profile_steps)
  require(cfg.debug.peak_tflops >= 0,
          f"--config.debug.peak_tflops={cfg.debug.peak_tflops} must be >= 0 (0 = known or "
          "measured).")
  require(cfg.data.seq_len > 0,
          f"--config.data.seq_len must be positive, got {cfg.data.seq_len}.")
  require(cfg.data.seq_len <= cfg.model.max_seq_len,
          f"--config.data.seq_len={cfg.data.seq_len} is longer than the model "
          f"supports (model.max_seq_len={cfg.model.max_seq_len}); lower seq_len or "
          "raise --config.model.max_seq_len.")
  mesh_shape = sharding.resolve_mesh_shape(cfg.mesh, num_devices)
  axes = dict(zip(sharding.MESH_AXES, mesh_shape))
  batch_ways = math.prod(axes[a] for a in sharding.BATCH_AXES)
  require(cfg.train.global_batch % batch_ways == 0,
          f"--config.train.global_batch={cfg.train.global_batch} is not divisible "
          f"by the data-parallel mesh axes (data x fsdp x expert = {batch_ways}); "
          f"use a multiple of {batch_ways}.")
  require(cfg.train.global_batch % num_processes == 0,
          f"--config.train.global_batch={cfg.train.global_batch} is not divisible "
          f"by the {num_processes} processes; use a multiple of {num_processes}.")
  for ext in extensions.registered():
    if ext.validate is not None:
      ext.validate(cfg, axes)
  require(cfg.checkpoint.keep >= 1,
          f"--config.checkpoint.keep must be at least 1, got {cfg.checkpoint.keep}.")
  require(cfg.checkpoint.every > 0,
          f"--config.checkpoint.every must be positive, got {cfg.checkpoint.every}.")
  validate_data(cfg.data)
  if check_data:
    data_lib.check_ready(cfg.data)
  return mesh_shape
