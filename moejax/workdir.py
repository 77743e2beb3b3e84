"""A run's workdir: its default name, and what the run writes there.

The default is runs/<config name>, followed by the command's --config.*
overrides (runs/dense_tiny,train.learning_rate=0.001): the same command resumes
its own run, and a command with other overrides never resumes it by accident.
"""

from __future__ import annotations

import hashlib
import os
import re

from moejax.errors import ConfigError

# What a run writes in its workdir, and whether each is a file or a directory.
ENTRIES = {"config.json": "file", "metrics.jsonl": "file", "final.json": "file",
           "config_history.jsonl": "file", "final_history.jsonl": "file",
           "checkpoints": "directory", "tensorboard": "directory",
           "profile": "directory", "eval": "directory"}

_MAX_NAME = 120  # longer override lists are named by their digest


def default_workdir(name: str, overrides: dict, root: str = "runs") -> str:
  """root/<name>[,field=value,...] with the overrides sorted; characters other than
  letters, digits and ._=+,- become _ (a path in a value must not nest folders)."""
  parts = [name] + [f"{k}={v}" for k, v in sorted(overrides.items())]
  text = re.sub(r"[^A-Za-z0-9._=+,-]", "_", ",".join(parts))
  if len(text) > _MAX_NAME:
    text = f"{name},{hashlib.sha256(','.join(parts).encode()).hexdigest()[:12]}"
  return os.path.join(root, text)


def check_entries(workdir: str) -> None:
  """Refuses, before anything runs, a workdir where a file the run writes is a
  directory or the reverse (it would fail only when first written, maybe at the end)."""
  for name, kind in ENTRIES.items():
    path = os.path.join(workdir, name)
    if os.path.exists(path) and os.path.isdir(path) != (kind == "directory"):
      found = "directory" if os.path.isdir(path) else "file"
      raise ConfigError(f"{path} is a {found}, but the run writes a {kind} there; move it "
                        "away or pass another --workdir.")
