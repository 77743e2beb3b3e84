"""Runs an experiment's sweep: every row, or one (`--sweep_index`), never stopping at a failure.

  python run.py --experiment=omnimoe --scale=tiny            # all rows, in order
  python run.py --experiment=omnimoe --scale=tiny --sweep_index=3   # one row (job arrays)
  python run.py --experiment=omnimoe --scale=paper --dry_run  # budgets only

Layout: <root>/<experiment>/<scale>/<arm>_s<seed>/ is an ordinary run workdir
(config.json, metrics.jsonl, final.json, checkpoints/) plus row.json, which says
what the row is and how it ended: "completed", "failed" (with the error; the
traceback is in error.txt), or "preempted". A row whose final.json says
completed is skipped; a row whose config (all but its name) equals a completed,
trained (not measured) row of any experiment under the same root reuses that
run (row.json names it in "reused_from"), so a baseline shared by tables trains
once; an interrupted row resumes from its last checkpoint with the same data
order, so rerunning a sweep after a crash or preemption finishes only what is
left.

Before any row trains, every row's config is built and validated and the
experiment's budget matches are asserted (a bad sweep stops with one sentence).
"""

import dataclasses
import glob
import hashlib
import json
import os
import time
import traceback

import numpy as np
from absl import logging

from experiments import registry, scales
from moejax import budget as budget_lib
from moejax import config as config_lib
from moejax import data as data_lib
from moejax.config.budget_match import relative_difference
from moejax.config.files import load_config
from moejax.errors import ConfigError
from moejax.metrics import read_json, write_json
from moejax.provenance import provenance

def overrides(row: dict) -> dict:
  """The row's config overrides: its dotted keys ("moe.top_k"); the others
  ("arm", "config", "seed", "task", ...) describe the row."""
  return {k: v for k, v in row.items() if "." in k}


def set_dotted(cfg, key: str, value) -> None:
  """cfg.a.b = value for key "a.b"; a field that does not exist is an error."""
  *path, leaf = key.split(".")
  node = cfg
  for part in path:
    if part not in node:
      raise ConfigError(f"Override {key!r} names no config group {part!r}; see "
                        f"moejax/config/base.py for the fields.")
    node = node[part]
  if leaf not in node:
    raise ConfigError(f"Override {key!r} names no field {leaf!r} of {'.'.join(path) or 'config'}; "
                      f"see moejax/config/base.py for the fields.")
  node[leaf] = tuple(value) if isinstance(value, list) else value


def parse_settings(items) -> dict:
  """["data.data_dir=/mnt/gcs/data", "train.steps=50"] -> {key: value} (--set flags);
  values are Python literals where they parse as one, else strings."""
  import ast  # pylint: disable=import-outside-toplevel
  out = {}
  for item in items or ():
    key, sep, text = item.partition("=")
    if not sep or "." not in key:
      raise ConfigError(f"--set takes group.field=value, e.g. --set=data.data_dir=/mnt/data; "
                        f"got {item!r}.")
    try:
      out[key.strip()] = ast.literal_eval(text)
    except (ValueError, SyntaxError):
      out[key.strip()] = text
  return out


def row_config(experiment: registry.Experiment, row: dict, scale: str, settings=None):
  """The row's full config: its preset, the scale's settings, its overrides, then
  `settings` (--set: what every row of this launch shares, e.g. data_dir, mesh)."""
  cfg = load_config(row["config"])
  for key, value in scales.OVERRIDES[scale].items():
    set_dotted(cfg, key, value)
  for key, value in {**overrides(row), **(settings or {})}.items():
    set_dotted(cfg, key, value)
  cfg.seed = int(row["seed"])
  cfg.name = f"{experiment.name}-{registry.row_name(row)}"
  return cfg


def budgets_of(configs: list) -> dict:
  """arm -> moejax.budget.model_budget of its first trained row (seeds share a budget)."""
  budgets = {}
  for row, cfg in configs:
    if row["arm"] not in budgets and row.get("task") != "measure":
      budgets[row["arm"]] = budget_lib.model_budget(cfg, data_lib.vocab_size(cfg.data))
  return budgets


def arm_budgets(experiment: registry.Experiment, scale: str, settings=None) -> dict:
  """The arms' budgets at `scale` (built configs, not validated)."""
  return budgets_of([(row, row_config(experiment, row, scale, settings))
                     for row in experiment.rows(scale)])


def check_matches(experiment: registry.Experiment, scale: str, budgets: dict) -> list[str]:
  """Asserts every Match; returns one report line per (arm, quantity)."""
  lines = []
  for match in experiment.matches:
    ref = budgets[match.reference]
    for arm in match.arms:
      for q in match.quantities:
        diff = relative_difference(budgets[arm][q], ref[q])
        lines.append(f"  {q:<28s}{arm:<20s}{budgets[arm][q]:>16,.4g} vs {match.reference} "
                     f"{ref[q]:,.4g} ({diff:+.2%})")
        if abs(diff) > match.tolerance:
          raise ConfigError(
              f"Experiment {experiment.name!r} at scale {scale!r} claims arm {arm!r} matches "
              f"{match.reference!r} on {q}, but it differs by {diff:+.2%} (tolerance "
              f"{match.tolerance:.1%}); fix the arm's config in experiments/{experiment.name}.py.")
  return lines


def check_targets(experiment: registry.Experiment, scale: str, budgets: dict) -> list[str]:
  """Paper-reported sizes (e.g. total params) the arms must reproduce at this scale."""
  lines = []
  for t in experiment.targets:
    if t.scale != scale:
      continue
    ours = budgets[t.arm][t.quantity]
    diff = relative_difference(ours, t.value)
    lines.append(f"  {t.quantity:<28s}{t.arm:<14s}{ours:>16,.4g} vs paper {t.value:,.4g} "
                 f"({diff:+.2%}; {t.source})")
    if abs(diff) > t.tolerance:
      raise ConfigError(
          f"Experiment {experiment.name!r} arm {t.arm!r} has {t.quantity} {ours:,.0f} at scale "
          f"{scale!r}, {diff:+.1%} from the paper's {t.value:,.0f} ({t.source}; tolerance "
          f"{t.tolerance:.0%}); fix the arm's preset.")
  return lines


@dataclasses.dataclass
class Plan:
  configs: list  # (row, cfg) for every row of the sweep, validated
  budgets: dict  # arm -> model_budget
  report: list  # one line per matched or targeted (arm, quantity)


def prepare(experiment: registry.Experiment, scale: str, num_devices: int,
            settings=None) -> Plan:
  """Every row's config, validated, with budgets matched and paper sizes checked;
  raises ConfigError before anything trains."""
  configs = []
  for row in experiment.rows(scale):
    cfg = row_config(experiment, row, scale, settings)
    config_lib.validate(cfg, num_devices=num_devices, check_data=False)
    configs.append((row, cfg))
  budgets = budgets_of(configs)
  report = (check_matches(experiment, scale, budgets)
            + check_targets(experiment, scale, budgets))
  return Plan(configs, budgets, report)


def row_workdir(root: str, experiment: str, scale: str, row: dict) -> str:
  return os.path.join(root, experiment, scale, registry.row_name(row))


def is_completed(workdir: str) -> bool:
  final = read_json(os.path.join(workdir, "final.json"))
  return bool(final) and final.get("status") == "completed"


def fingerprint(cfg) -> str:
  """A hash of everything that decides a run's outcome (the config but its name)."""
  d = config_lib.to_dict(cfg)
  d.pop("name", None)
  return hashlib.sha256(json.dumps(d, sort_keys=True, default=str).encode()).hexdigest()[:16]


def _added_at_default(saved, current, default) -> bool:
  """saved == current, except fields missing from `saved` (added to the config since
  it was written) whose current value is still their default."""
  if isinstance(current, dict):
    if not isinstance(saved, dict) or set(saved) - set(current):
      return False
    return all(
        (current[k] == (default or {}).get(k)) if k not in saved
        else _added_at_default(saved[k], current[k], (default or {}).get(k))
        for k in current)
  return saved == current


def same_config_as_row(workdir: str, cfg) -> bool:
  """Whether the row in `workdir` ran this config: its config.json equals cfg but
  for fields added to moejax since then and left at their defaults (a new field
  must not invalidate every finished row)."""
  saved = read_json(os.path.join(workdir, "config.json"))
  if not saved:
    return False
  saved, current = dict(saved), config_lib.to_dict(cfg)
  saved.pop("name", None)
  current.pop("name", None)
  return _added_at_default(saved, current, config_lib.to_dict(config_lib.base_config()))


def changed_fields(workdir: str, cfg, shown: int = 4) -> str:
  """The fields where the row's config.json differs from cfg, for the stop message."""
  saved = read_json(os.path.join(workdir, "config.json"))
  if not saved:
    return "its config.json is missing"
  saved, current = dict(saved), config_lib.to_dict(cfg)
  saved.pop("name", None)
  current.pop("name", None)
  diffs = config_lib.differences(saved, current)
  return "; ".join(diffs[:shown]) + (f"; and {len(diffs) - shown} more" if len(diffs) > shown
                                     else "")


def is_trained(workdir: str) -> bool:
  """Completed by training. A measured row's config can equal a training row's
  (the timing tables measure presets that other tables train), but its
  final.json holds only measurements, so it must never stand in for one."""
  final = read_json(os.path.join(workdir, "final.json"))
  return bool(final) and final.get("status") == "completed" and "train_loss" in final


def find_completed(root: str, scale: str, print_: str, exclude: str) -> str | None:
  """A completed training row of any experiment under `root` with this fingerprint."""
  for path in sorted(glob.glob(os.path.join(root, "*", scale, "*", "row.json"))):
    workdir = os.path.dirname(path)
    record = read_json(path) or {}
    if (os.path.abspath(workdir) != os.path.abspath(exclude)
        and record.get("fingerprint") == print_ and not record.get("reused_from")
        and is_trained(workdir)):
      return os.path.abspath(workdir)
  return None


def row_record(experiment: str, row: dict, cfg, settings=None, **fields) -> dict:
  """What row.json says of a row: what it is, the launch's --set values, plus
  `fields` (status, ...)."""
  return dict(experiment=experiment, row=registry.row_name(row), arm=row["arm"],
              seed=row["seed"], overrides=overrides(row), config=row["config"],
              settings=dict(settings or {}), fingerprint=fingerprint(cfg), **fields)


def run_row(experiment: registry.Experiment, row: dict, cfg, workdir: str, scale: str,
            settings: dict | None = None) -> dict:
  """Trains (or measures) one row; returns its row.json. Never raises for the row's own failure."""
  import jax  # pylint: disable=import-outside-toplevel
  os.makedirs(workdir, exist_ok=True)
  lead = jax.process_index() == 0
  record = row_record(experiment.name, row, cfg, settings, started=time.time())
  if lead:
    write_json(os.path.join(workdir, "row.json"), dict(record, status="running"))
  try:
    if row.get("task") == "measure":
      metrics = experiment.measure(row, cfg, workdir, scale, settings or {})
      final = dict(metrics, status="completed", name=cfg.name, workdir=workdir,
                   **provenance())
      if lead:
        write_json(os.path.join(workdir, "config.json"), config_lib.to_dict(cfg))
        write_json(os.path.join(workdir, "final.json"), final)
    else:
      from moejax.train import train_and_evaluate  # pylint: disable=import-outside-toplevel
      final = train_and_evaluate(cfg, workdir)
    record.update(status=final.get("status", "completed"), eval_loss=final.get("eval/loss"))
  except KeyboardInterrupt:
    raise
  except Exception as e:  # pylint: disable=broad-except
    record.update(status="failed", error=f"{type(e).__name__}: {e}")
    if lead:
      with open(os.path.join(workdir, "error.txt"), "w") as f:
        f.write(traceback.format_exc())
    logging.error("row %s failed: %s", record["row"], record["error"])
  record["finished"] = time.time()
  if lead:
    write_json(os.path.join(workdir, "row.json"), record)
  return record


def _agree(action: int) -> int:
  """Process 0's choice for a row (0 skip, 1 reuse, 2 run), taken by every process:
  hosts that read the outputs at different moments must still run the same rows."""
  import jax  # pylint: disable=import-outside-toplevel
  if jax.process_count() == 1:
    return action
  from jax.experimental import multihost_utils  # pylint: disable=import-outside-toplevel
  return int(multihost_utils.broadcast_one_to_all(np.int32(action)))


def run_sweep(name: str, scale: str, root: str, sweep_index: int | None = None,
              dry_run: bool = False, settings: dict | None = None, say=print) -> list[dict]:
  """Runs the sweep (or row `sweep_index`); returns the rows' records. `settings`
  ({"data.data_dir": ...}) apply to every row, after the row's own overrides."""
  import jax  # pylint: disable=import-outside-toplevel
  experiment = registry.get(name)
  plan = prepare(experiment, scale, jax.device_count(), settings)
  configs = plan.configs
  if sweep_index is not None and not 0 <= sweep_index < len(configs):
    raise ConfigError(f"--sweep_index={sweep_index} is out of range: experiment {name!r} has "
                      f"{len(configs)} rows at scale {scale!r} (0..{len(configs) - 1}).")
  say(f"experiment {name} ({experiment.title}), scale {scale}: {len(configs)} rows; "
      f"budgets matched before training:")
  for line in plan.report:
    say(line)
  for arm, b in plan.budgets.items():
    say(f"  {arm:<20s}params {b['params']:>14,}  active {b['active_params']:>12,}  "
        f"fwd FLOPs/token {b['forward_flops_per_token']:>14,}")
  if dry_run:
    return []
  selected = range(len(configs)) if sweep_index is None else [sweep_index]
  for i in selected:  # a changed config never passes for a completed row
    row, cfg = configs[i]
    workdir = row_workdir(root, name, scale, row)
    done = read_json(os.path.join(workdir, "row.json")) or {}
    # A reused row's config is the one of the run it points to.
    ran_in = done.get("reused_from") or workdir
    changed = (done.get("fingerprint") not in (None, fingerprint(cfg))
               and not same_config_as_row(ran_in, cfg))
    if changed and done.get("status") == "failed":
      # A failed row whose config was fixed since runs again from scratch; its
      # files are kept beside it for a look.
      aside = f"{workdir}.failed-{int(time.time())}"
      if jax.process_index() == 0:
        os.replace(workdir, aside)
      say(f"{registry.row_name(row)} failed with another config; moved to {aside} and "
          "run again")
      continue
    if changed:
      raise ConfigError(f"Row {registry.row_name(row)} in {workdir} was run with another "
                        f"config than the sweep now builds ({changed_fields(ran_in, cfg)}); "
                        "rerun with the launch's original --set values, give the changed "
                        "sweep a new --workdir, or delete that row to rerun it.")
  records = []
  for i in selected:
    row, cfg = configs[i]
    workdir = row_workdir(root, name, scale, row)
    previous = read_json(os.path.join(workdir, "row.json")) or {}
    same = None if row.get("task") == "measure" else find_completed(
        root, scale, fingerprint(cfg), workdir)
    action = _agree(0 if (is_completed(workdir) or (previous.get("reused_from") and
                                                     is_completed(previous["reused_from"])))
                    else 1 if same is not None else 2)
    if action == 0:
      say(f"[{i + 1}/{len(configs)}] {registry.row_name(row)}: already completed in "
          f"{previous.get('reused_from') or workdir}")
      records.append(dict(previous, status="completed"))
      continue
    if action == 1:
      say(f"[{i + 1}/{len(configs)}] {registry.row_name(row)}: the same config already "
          f"trained in {same}; reusing it")
      record = row_record(name, row, cfg, settings, status="completed", reused_from=same)
      if jax.process_index() == 0:
        os.makedirs(workdir, exist_ok=True)
        write_json(os.path.join(workdir, "row.json"), record)
      records.append(record)
      continue
    say(f"[{i + 1}/{len(configs)}] {registry.row_name(row)}: {row['config']} "
        f"{overrides(row) or ''} -> {workdir}")
    record = run_row(experiment, row, cfg, workdir, scale, settings)
    records.append(record)
    say(f"[{i + 1}/{len(configs)}] {record['row']}: {record['status']}"
        + (f" ({record['error']})" if record.get("error") else ""))
    if record["status"] == "preempted":
      say("preempted: rerun the same command to resume this row and the rest.")
      break
  failed = [r["row"] for r in records if r.get("status") == "failed"]
  say(f"sweep {name}/{scale}: {sum(r.get('status') == 'completed' for r in records)} completed, "
      f"{len(failed)} failed{': ' + ', '.join(failed) if failed else ''}. Aggregate with: "
      f"python -m experiments.report --experiment={name} --scale={scale} --runs={root}")
  return records
