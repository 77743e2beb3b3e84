"""A workdir keeps every config it trained with and every result it reported.

  config.json           the config of the latest start: what the next steps use
  config_history.jsonl  one line per start with a new or changed config:
                        {"from_step": the first step trained with it,
                         "changed": ["field: old -> new", ...], "config": {...}}
  final.json            the latest end of the run (completed, preempted or failed)
  final_history.jsonl   every final.json written, oldest first

A resume may change fields that do not fix the saved state (learning rate,
steps, intervals; moejax/config/resume.py refuses the others). Without the
history, config.json and final.json would be overwritten and no longer say what
the first steps used or what the earlier end reported.
"""

from __future__ import annotations

import json
import os
import time

from moejax.config.base import base_config
from moejax.config.resume import differences
from moejax.metrics import write_json

CONFIG = "config.json"
CONFIG_HISTORY = "config_history.jsonl"
FINAL = "final.json"
FINAL_HISTORY = "final_history.jsonl"


def _append(path: str, record: dict) -> None:
  with open(path, "a") as f:
    f.write(json.dumps(record, sort_keys=True) + "\n")
    f.flush()
    os.fsync(f.fileno())


def read_jsonl(path: str) -> list[dict]:
  if not os.path.exists(path):
    return []
  with open(path) as f:
    return [json.loads(line) for line in f if line.strip()]


def config_changes(saved: dict, current: dict) -> list[str]:
  """"field: old -> new" for each field that differs, less fields the saved config
  lacks (added to moejax since) that hold their default."""
  defaults = json.loads(base_config().to_json())
  out = []
  for line in differences(saved, current):
    name, rest = line.split(": ", 1)
    node = defaults
    for part in name.split("."):
      node = node.get(part, "<no default>") if isinstance(node, dict) else "<no default>"
    if rest.startswith("'<missing>' -> ") and rest[len("'<missing>' -> "):] == repr(node):
      continue
    out.append(line)
  return out


def record_config(workdir: str, config: dict, *, saved_config: dict | None,
                  resume_step: int | None) -> list[str]:
  """Writes config.json and, when the config is new or changed, a line of
  config_history.jsonl; returns the changes against the checkpoint's config."""
  history = os.path.join(workdir, CONFIG_HISTORY)
  changed = [] if saved_config is None else config_changes(saved_config, config)
  now = time.strftime("%Y-%m-%dT%H:%M:%S")
  if saved_config is not None and not os.path.exists(history):
    # A workdir written before the history was kept: its checkpoint's config is
    # the oldest one known; the step it took effect at is not.
    _append(history, dict(from_step=None, changed=[], time=None, config=saved_config))
  if saved_config is None or changed:
    _append(history, dict(from_step=(resume_step or 0) + 1, changed=changed, time=now,
                          config=config))
  write_json(os.path.join(workdir, CONFIG), config)
  return changed


def write_final(workdir: str, final: dict) -> None:
  """final.json, and the same record appended to final_history.jsonl (a final.json
  from before the history was kept goes in first)."""
  history = os.path.join(workdir, FINAL_HISTORY)
  path = os.path.join(workdir, FINAL)
  if not os.path.exists(history) and os.path.exists(path):
    try:
      with open(path) as f:
        _append(history, json.load(f))
    except (OSError, ValueError):
      pass  # an unreadable final.json has nothing to keep
  _append(history, final)
  write_json(path, final)
