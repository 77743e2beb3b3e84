"""Helpers the experiment files share: seeds x arms, and reading a run's metrics."""

import json
import os

SEEDS = {"tiny": (0, 1), "small": (0, 1), "paper": (0,)}


def rows(scale: str, arms: dict) -> list[dict]:
  """One row per (arm, seed): arms maps name -> dict with "config" and overrides."""
  return [dict(arm=name, seed=seed, **spec) for name, spec in arms.items()
          for seed in SEEDS[scale]]


def metric_rows(workdir: str) -> list[dict]:
  """The records of a run's metrics.jsonl, in order (empty if it has none)."""
  path = os.path.join(workdir, "metrics.jsonl")
  if not os.path.exists(path):
    return []
  with open(path) as f:
    return [json.loads(line) for line in f if line.strip()]


def series(records: list[dict], key: str) -> list[tuple[int, object]]:
  """(step, value) for every record that logged `key`."""
  return [(r["step"], r[key]) for r in records if key in r]


def last(records: list[dict], key: str, default=None):
  values = series(records, key)
  return values[-1][1] if values else default
