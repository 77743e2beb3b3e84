"""Helpers the experiment files share: arms from presets, seeds x arms, last logged values."""

# Five seeds at tiny scale: the paired differences' spread does not shrink much
# with more steps, while the interval narrows with seeds (docs/design.md).
SEEDS = {"tiny": (0, 1, 2, 3, 4), "small": (0, 1, 2), "paper": (0,)}


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


def last(records: list[dict], key: str, default=None):
  """The last value of `key` in a run's metrics.jsonl records (moejax.metrics.read_metrics)."""
  values = [r[key] for r in records if key in r]
  return values[-1] if values else default
