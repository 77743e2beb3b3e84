"""Reading an experiment's runs from disk: one Run per row of its sweep, with a summary.

A run's summary is final.json flattened with "/" ({"budget": {"params": ..}}
-> "budget/params"), then the last logged value of every scalar key of
metrics.jsonl that final.json lacks, then experiment.derived(records, config).
"""

import dataclasses
import os

from experiments import registry
from moejax.metrics import read_json, read_metrics

DEFAULT_RUNS = "runs/experiments"


@dataclasses.dataclass
class Run:
  """One row of the sweep as found on disk."""
  row: dict
  name: str
  dir: str  # <runs>/<experiment>/<scale>/<row name>
  source: str  # where the run's files are: `dir`, or the row it reuses
  status: str  # completed, failed, running, preempted, missing, ...
  error: str = ""
  reused_from: str | None = None
  settings: dict | None = None  # the launch's --set values, as row.json recorded them
  summary: dict = dataclasses.field(default_factory=dict)
  records: list = dataclasses.field(default_factory=list)
  config: dict = dataclasses.field(default_factory=dict)
  warnings: list = dataclasses.field(default_factory=list)

  @property
  def arm(self) -> str:
    return self.row["arm"]

  @property
  def seed(self):
    return self.row["seed"]

  @property
  def completed(self) -> bool:
    return self.status == "completed"


def _one_line(text, limit: int = 200, last: bool = False) -> str:
  """The first (or last) non-empty line of `text`, cut at `limit` characters."""
  lines = [l.strip() for l in str(text).splitlines() if l.strip()]
  if not lines:
    return ""
  line = lines[-1] if last else lines[0]
  return line if len(line) <= limit else line[:limit - 3] + "..."


def flatten(tree: dict, prefix: str = "") -> dict:
  """{"budget": {"params": 3}} -> {"budget/params": 3} (empty dicts vanish)."""
  out = {}
  for key, value in tree.items():
    name = f"{prefix}/{key}" if prefix else str(key)
    if isinstance(value, dict):
      out.update(flatten(value, name))
    else:
      out[name] = value
  return out


def is_scalar(value) -> bool:
  """True for a value a summary keeps: not a list, tuple or dict."""
  return not isinstance(value, (list, tuple, dict))


def summarize(workdir: str, derived=None, records: list | None = None,
              config: dict | None = None) -> tuple[dict, list]:
  """A run's summary and warnings: final.json flattened, then the last value of each
  scalar metrics.jsonl key that final.json lacks, then derived(records, config)."""
  summary = flatten(read_json(os.path.join(workdir, "final.json")) or {})
  fixed = set(summary)
  records = read_metrics(workdir) if records is None else records
  if config is None:
    config = read_json(os.path.join(workdir, "config.json")) or {}
  for record in records:  # a later record overwrites an earlier one, never final.json
    for key, value in record.items():
      if is_scalar(value) and key not in fixed:
        summary[key] = value
  warnings = []
  if derived is not None:
    try:
      summary.update(flatten(derived(records, config) or {}))
    except Exception as e:  # pylint: disable=broad-except
      warnings.append(f"derived() failed for {workdir}: {type(e).__name__}: {_one_line(e)}")
  return summary, warnings


def eval_curve(records: list, metric: str = "eval/loss") -> tuple[dict, tuple | None]:
  """step -> `metric` of the periodic evaluations, and (step, value) of the final one
  when it ran on a different number of tokens (train.final_eval_batches, not eval_batches),
  so that the two are not joined into one curve."""
  evals = [r for r in records if metric in r and "step" in r]
  final = None
  if len(evals) >= 2 and evals[-1].get("eval/tokens") != evals[-2].get("eval/tokens"):
    final = (evals[-1]["step"], evals[-1][metric])
    evals = evals[:-1]
  return {r["step"]: r[metric] for r in evals}, final


def _resolve_reused(path: str, runs: str) -> str:
  """The reused row's directory; if the runs root moved, the same row under `runs`."""
  if os.path.isdir(path):
    return path
  moved = os.path.join(runs, *os.path.normpath(path).split(os.sep)[-3:])
  return moved if os.path.isdir(moved) else path


def load_run(experiment: registry.Experiment, scale: str, runs: str, row: dict) -> Run:
  """Finds a row's run and, if it completed, its summary, metrics and config."""
  name = registry.row_name(row)
  rdir = os.path.join(runs, experiment.name, scale, name)
  record = read_json(os.path.join(rdir, "row.json")) or {}
  reused = record.get("reused_from")
  source = _resolve_reused(reused, runs) if reused else rdir
  final = read_json(os.path.join(source, "final.json"))
  run = Run(row=row, name=name, dir=rdir, source=source, status="completed", reused_from=reused,
            settings=record.get("settings"))
  if not (isinstance(final, dict) and final.get("status") == "completed"):
    status = record.get("status") or (final or {}).get("status")
    if status is None:
      status = "missing" if not os.path.isdir(rdir) else "unknown"
    error = _one_line(record.get("error", ""))
    if not error:
      for d in (source, rdir):
        if os.path.exists(os.path.join(d, "error.txt")):
          with open(os.path.join(d, "error.txt")) as f:
            error = _one_line(f.read(), last=True)
          break
    if status == "completed":  # row.json says so, but no completed final.json is there
      status, error = "incomplete", error or f"no completed final.json in {source}"
    run.status, run.error = status, error
    return run
  run.records = read_metrics(source)
  run.config = read_json(os.path.join(source, "config.json")) or {}
  run.summary, run.warnings = summarize(source, experiment.derived, run.records, run.config)
  return run
