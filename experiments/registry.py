"""What an experiment is: a table of arms, a sweep of rows, budgets, and claims.

One file per table in experiments/ defines one `Experiment` named EXPERIMENT:

  sweep(scale) -> [row, ...]   an explicit list of override dicts. Every row has
      "arm"     the table row it belongs to (seeds of one arm are averaged),
      "config"  a config spec, e.g. "configs/omnimoe.py:tiny",
      "seed"    the run's seed,
      and any dotted config overrides, e.g. {"moe.load_balance_coef": 0.0}.
      A row with "task": "measure" is not trained: the experiment's
      `measure(row, cfg, workdir, scale, settings) -> dict` times something
      instead (settings: the launch's --set values, for any config it builds).
  matches   budget quantities that must agree across arms, asserted for every
            scale before a single row trains (moejax/budget.py keys).
  targets   sizes the paper reports, checked at "paper" scale (--dry_run).
  columns   the metrics a table shows, as keys of a row's summary (final.json
            flattened with "/", e.g. "eval/loss", "budget/active_params").
  claims    what the paper says and the direction a small run can check.
  derived(records, config) -> dict   optional extra summary scalars computed from
            a run's metrics.jsonl records and config.json
            (e.g. MoHGE's small-group traffic before and after the group loss).

`run.py --experiment=NAME` runs a sweep (experiments/sweep.py);
`python -m experiments.report` turns its runs into tables, verdicts and plots.
"""

import dataclasses
import importlib
from typing import Callable

from moejax.errors import ConfigError

SCALES = ("tiny", "small", "paper")
# Experiment name -> module in experiments/ (one file per table).
NAMES = ("omnimoe", "mohge", "loopmoe", "l3", "all_variants", "dispatch")


@dataclasses.dataclass(frozen=True)
class Match:
  """`quantities` of every arm in `arms` agree with `reference`'s within `tolerance`."""
  reference: str
  arms: tuple[str, ...]
  quantities: tuple[str, ...]
  tolerance: float = 0.01


@dataclasses.dataclass(frozen=True)
class Target:
  """A size the paper reports (e.g. 1.7B active params), checked at one scale by --dry_run."""
  arm: str
  scale: str
  quantity: str  # a moejax/budget.py key: "params", "active_params", ...
  value: float
  source: str  # where the number comes from (docs/papers/<paper>.md section)
  tolerance: float = 0.05


@dataclasses.dataclass(frozen=True)
class Claim:
  """A paper's claim, checked as `arm.metric <relation> than_arm.metric` (or a value).

  relation: "less" (lower is what the paper claims, e.g. validation loss),
  "greater", or "close" (|difference| <= tolerance: "matches the baseline").
  Verdicts (experiments/report): a difference larger than the noise floor in
  the claimed direction reproduces, in the other direction contradicts, and one
  inside the noise is inconclusive.
  """
  text: str  # the paper's words or number, with its source in docs/papers/
  metric: str
  arm: str
  relation: str  # "less", "greater" or "close"
  than_arm: str | None = None
  than_value: float | None = None
  tolerance: float = 0.0  # for "close", in the metric's units

  def __post_init__(self):
    if self.relation not in ("less", "greater", "close"):
      raise ValueError(f"Claim relation must be less, greater or close, got {self.relation!r}.")
    if (self.than_arm is None) == (self.than_value is None):
      raise ValueError("A Claim compares with exactly one of than_arm or than_value.")


@dataclasses.dataclass(frozen=True)
class Experiment:
  name: str
  title: str
  paper: str  # the docs/papers/ notes and section it reproduces
  sweep: Callable[[str], list]
  columns: tuple[str, ...]
  claims: tuple[Claim, ...] = ()
  matches: tuple[Match, ...] = ()
  targets: tuple[Target, ...] = ()
  scales: tuple[str, ...] = ("tiny", "small", "paper")
  derived: Callable[[list, dict], dict] | None = None
  measure: Callable | None = None
  notes: str = ""  # what the table does not show, read by the aggregator

  def rows(self, scale: str) -> list[dict]:
    """The sweep at `scale`, each row checked for the keys every row needs."""
    if scale not in self.scales:
      raise ConfigError(f"Experiment {self.name!r} has no {scale!r} scale; choose one of "
                        f"{list(self.scales)} with --scale.")
    rows = self.sweep(scale)
    for i, row in enumerate(rows):
      missing = [k for k in ("arm", "config", "seed") if k not in row]
      if missing:
        raise ValueError(f"{self.name} sweep row {i} lacks {missing}.")
    return rows

  @property
  def arms(self) -> tuple[str, ...]:
    """Arm names in table order (first appearance in the tiny sweep, else any)."""
    scale = "tiny" if "tiny" in self.scales else self.scales[0]
    return tuple(dict.fromkeys(r["arm"] for r in self.rows(scale)))


def row_name(row: dict) -> str:
  """Directory name of a row: its arm and seed, e.g. "omnimoe_s1"."""
  return f"{row['arm']}_s{row['seed']}"


# Experiments defined outside this folder (a new paper's package, a test), by name.
_REGISTERED: dict[str, Experiment] = {}


def register(experiment: Experiment) -> Experiment:
  """Adds an experiment defined elsewhere; run.py --experiment and --list then see it
  in any process that imported its module first."""
  if experiment.name in NAMES or experiment.name in _REGISTERED:
    raise ValueError(f"Experiment {experiment.name!r} is registered twice.")
  _REGISTERED[experiment.name] = experiment
  return experiment


def names() -> list[str]:
  return list(NAMES) + list(_REGISTERED)


def get(name: str) -> Experiment:
  """The experiment called `name`, or a ConfigError listing the names."""
  if name in _REGISTERED:
    return _REGISTERED[name]
  if name not in NAMES:
    raise ConfigError(f"Unknown experiment {name!r}; choose one of {names()} "
                      f"(python run.py --list names them).")
  return importlib.import_module(f"experiments.{name}").EXPERIMENT


def all_experiments() -> list[Experiment]:
  return [get(n) for n in names()]
