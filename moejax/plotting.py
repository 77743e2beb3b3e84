"""Figure helpers shared by the report's generic plots and the papers' own plots.

A plot is a function `fn(runs, arms, path) -> bool` that draws one figure into
`path` from the runs of an experiment and returns True when it wrote the file
(False when no completed run logged the data it needs). A paper's plots reach
the report through its Extension's `plots` mapping (moejax/extensions.py).

`runs` are objects with these attributes (the report's Run is one; any object
with them will do):

  arm        the table row the run belongs to (str)
  seed       the run's seed
  completed  True when the run finished and its data was read
  records    the run's metrics.jsonl records, in order (list of dicts)
  config     the run's config.json (dict)
  summary    the run's summary scalars, keyed like "eval/loss" (dict)

`arms` is the table's order of arms; an arm's colour is its place in it.
"""

import numpy as np


def pyplot():
  """matplotlib.pyplot on the Agg backend (no display needed)."""
  import matplotlib  # pylint: disable=import-outside-toplevel
  matplotlib.use("Agg")
  import matplotlib.pyplot as plt  # pylint: disable=import-outside-toplevel
  return plt


def titled(title: str):
  """Gives a plot function the title the report's Markdown shows for its image."""
  def wrap(fn):
    fn.title = title
    return fn
  return wrap


def arm_colour(arms, arm: str) -> str:
  """The matplotlib colour of `arm`: its place in `arms`, cycling over ten."""
  return f"C{list(arms).index(arm) % 10}"


def series(records: list, key: str) -> dict:
  """step -> value of `key` (the last record wins when a step logged it twice)."""
  return {r["step"]: r[key] for r in records if key in r and "step" in r}


def seed_mean(curves: list[dict]) -> tuple[list, list]:
  """Steps every seed logged, and the mean over seeds there."""
  curves = [c for c in curves if c]
  if not curves:
    return [], []
  steps = sorted(set.intersection(*(set(c) for c in curves)))
  return steps, [float(np.mean([c[t] for c in curves])) for t in steps]


def seed_band(curves: list[dict]) -> tuple[list, list, list]:
  """Steps every seed logged, the mean over seeds there, and the sample std (0 with
  one seed)."""
  curves = [c for c in curves if c]
  if not curves:
    return [], [], []
  steps = sorted(set.intersection(*(set(c) for c in curves)))
  values = [[c[t] for c in curves] for t in steps]
  return (steps, [float(np.mean(v)) for v in values],
          [float(np.std(v, ddof=1)) if len(v) >= 2 else 0.0 for v in values])


def prefixed(records: list, prefix: str) -> list[str]:
  """Keys `prefix` + one more name, e.g. aux/expert_load/layer_01 (not LoopMoE's
  aux/expert_load/layer_01/iter_0, whose pooled load is layer_01 itself)."""
  return sorted({k for r in records for k in r
                 if k.startswith(prefix) and "/" not in k[len(prefix):]})


def first_seed(runs: list):
  """The run of seed 0 if there is one, else the one whose seed sorts first."""
  return min(runs, key=lambda r: (r.seed != 0, str(r.seed)))


def by_arm(runs: list, arms, has) -> dict:
  """arm -> its completed runs for which has(run) holds, arms without any left out."""
  out = {}
  for arm in arms:
    mine = [r for r in runs if r.arm == arm and r.completed and has(r)]
    if mine:
      out[arm] = mine
  return out


def save(plt, fig, path: str) -> None:
  """Writes `fig` to `path` as the report's PNGs are written, and closes it."""
  fig.tight_layout()
  fig.savefig(path, dpi=110)
  plt.close(fig)
