"""Helpers the experiment files share: seeds x arms, and reading a run's metrics."""

import json
import os

SEEDS = {"tiny": (0, 1), "small": (0, 1), "paper": (0,)}


def preset_arms(specs: dict, scale: str, paper: dict, extra: dict | None = None) -> dict:
  """arm -> {"config": its preset at this scale, **overrides}.

  specs map arm -> "configs/x.py:name_{size}"; the paper scale starts from the
  small presets. `extra` (arm -> overrides) applies at every scale, then the
  paper scale's own overrides (experiments/paper_sizes.py) on top."""
  size = "small" if scale == "paper" else scale
  out = {a: dict(config=spec.format(size=size), **(extra or {}).get(a, {}))
         for a, spec in specs.items()}
  if scale == "paper":
    for a in out:
      out[a].update(paper[a])
  return out


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
