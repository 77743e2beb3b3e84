"""What a resume may change: a checkpoint written by another config or on other data
is refused with one sentence; allowed changes with consequences are announced."""

from __future__ import annotations

import json

from moejax import extensions
from moejax.config.base import base_config
from moejax.data.tfds_access import FILES
from moejax.errors import ConfigError

# Fields that fix the shapes of the saved state or the meaning of the saved data
# position. Resuming with any of them changed is refused; each extension adds its
# whole config group, less its resume_free fields; see resume_fixed_fields().
RESUME_FIXED_FIELDS = (
    "model", "data.name", "data.tokenizer", "data.vocab_size", "data.seq_len",
    "data.train_split", "data.text_key", "train.global_batch", "seed",
)
# What identifies the data itself (recorded by moejax.data.dataset_info): the
# same config can point at different data (another data_dir, another Python's
# standard library, a retrained tokenizer).
RESUME_FIXED_DATA = ("fingerprint", "tokenizer_fingerprint", "train_tokens")


def _lookup(tree: dict, dotted: str):
  node = tree
  for part in dotted.split("."):
    if not isinstance(node, dict) or part not in node:
      return "<missing>"
    node = node[part]
  return node


def differences(saved, current, prefix: str = "") -> list[str]:
  """"field: saved -> current" for every leaf that differs between two config dicts."""
  if isinstance(saved, dict) and isinstance(current, dict):
    out = []
    for key in sorted(set(saved) | set(current)):
      out += differences(saved.get(key, "<missing>"), current.get(key, "<missing>"),
                         f"{prefix}.{key}" if prefix else str(key))
    return out
  return [] if saved == current else [f"{prefix}: {saved!r} -> {current!r}"]


def same_tokenizer(recorded: str, current: dict) -> bool:
  """Whether a recorded tokenizer fingerprint names the tokenizer of `current`
  (a dataset info): its pieces' fingerprint, or the hash of its .model file,
  which checkpoints recorded before the pieces' fingerprint existed."""
  return recorded in (current.get("tokenizer_fingerprint"),
                      current.get("tokenizer_file_fingerprint"))


def check_same_data(saved: dict, current: dict, workdir: str) -> None:
  """Refuses to resume when the data itself changed under the same config."""
  diffs = [f"{k}: {saved.get(k)!r} -> {current.get(k)!r}" for k in RESUME_FIXED_DATA
           if k in saved and saved.get(k) != current.get(k)
           and not (k == "tokenizer_fingerprint" and same_tokenizer(saved[k], current))]
  if diffs and current.get("name") == FILES:
    raise ConfigError(
        f"The checkpoint in {workdir} was trained on other files: the files matched by "
        f"data.files or their split settings changed since ({'; '.join(diffs)}); restore "
        "the original files, or use a new --workdir.")
  if diffs:
    raise ConfigError(
        f"The checkpoint in {workdir} was trained on different data ({'; '.join(diffs)}); "
        "point data.data_dir at the original data, or use a new --workdir.")


def resume_warnings(saved: dict, current: dict) -> list[str]:
  """Allowed changes on resume whose effect a researcher should know about."""
  return [w for ext in extensions.registered() if ext.resume_warnings is not None
          for w in ext.resume_warnings(saved, current)]


def resume_fixed_fields() -> tuple[str, ...]:
  """The generic fields that fix the saved state, and every extension's group as a
  whole (compared field by field, less its resume_free fields)."""
  return RESUME_FIXED_FIELDS + tuple(ext.group for ext in extensions.registered()
                                     if ext.group)


def _free_fields() -> set[str]:
  return {f for ext in extensions.registered() for f in ext.resume_free}


def check_resume_compatible(saved: dict, current: dict, workdir: str) -> None:
  """Refuses to resume a checkpoint written by an incompatible config. A field the
  checkpoint's config lacks (added to moejax since) counts as unchanged while it
  holds its default."""
  defaults = json.loads(base_config().to_json())
  free = _free_fields()
  diffs = []
  for field in resume_fixed_fields():
    if "." in field and field.split(".")[0] not in saved:
      continue  # a config group newer than the checkpoint: it had its defaults
    for line in differences(_lookup(saved, field), _lookup(current, field), field):
      name, rest = line.split(": ", 1)
      if name in free:
        continue
      if rest.startswith("'<missing>' -> ") and _lookup(current, name) == _lookup(defaults, name):
        continue
      diffs.append(line)
  if diffs:
    shown = "; ".join(diffs[:4]) + ("; ..." if len(diffs) > 4 else "")
    raise ConfigError(
        f"The checkpoint in {workdir} was written with a different config "
        f"({shown}); use a new --workdir, or rerun with the original values.")
