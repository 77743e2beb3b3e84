"""Turns an experiment's runs into a table, claim verdicts and plots.

  python -m experiments.report --experiment=mohge --scale=tiny --runs=runs/experiments \
      --out=results/mohge

Reads <runs>/<experiment>/<scale>/<arm>_s<seed>/ for every row of the sweep
(the files of the run named by row.json's "reused_from", if any) and writes
<out>/table.md, <out>/table.tex, <out>/summary.json and, where some completed
run logged the data, val_loss.png, expert_load.png and each registered paper's
plots (moejax/extensions.py). A row that failed, is still running or never ran
is listed with its status and error; it never stops the aggregation.

  runs.py     the rows found on disk and each run's summary
  stats.py    arm statistics over seeds and the verdict rule
  render.py   table.md and table.tex
  plots.py    the figures
  __main__.py the command line
"""

import json
import math
import os

import numpy as np

from experiments import registry
from experiments.report import plots, render, runs as run_files, stats


def _plain(x):
  """JSON-ready: numpy scalars to Python, NaN and inf to null, tuples and sets to lists."""
  if isinstance(x, dict):
    return {str(k): _plain(v) for k, v in x.items()}
  if isinstance(x, (list, tuple, set)):
    return [_plain(v) for v in x]
  if isinstance(x, (bool, np.bool_)):
    return bool(x)
  if isinstance(x, np.integer):
    return int(x)
  if isinstance(x, (float, np.floating)):
    return float(x) if math.isfinite(float(x)) else None
  return x


def default_command(name: str, scale: str, runs: str, settings: dict | None = None) -> str:
  """The run.py command that produces the runs this aggregates, with every --set."""
  cmd = f"python run.py --experiment={name} --scale={scale}"
  if os.path.normpath(runs) != os.path.normpath(run_files.DEFAULT_RUNS):
    cmd += f" --workdir={runs}"
  for key, value in sorted((settings or {}).items()):
    cmd += f" --set={key}={value}"
  return cmd


def code_version_warnings(done) -> list[str]:
  """One warning when the completed rows come from more than one code version: a
  change that only reorders float sums moves MoE runs by up to the seed-to-seed
  spread, so paired differences across versions are not what the table claims."""
  by_version = {}
  for r in done:
    if r.summary.get("code_version"):
      by_version.setdefault(str(r.summary["code_version"]), []).append(r.name)
  if len(by_version) < 2:
    return []
  parts = "; ".join(f"{v}: {', '.join(sorted(names))}" for v, names in sorted(by_version.items()))
  return [f"the completed rows come from {len(by_version)} code versions ({parts}); "
          "rerun the rows of the older ones so that every pair shares one version"]


def launch_settings(runs_found) -> tuple[dict, list]:
  """The --set values the rows were run with (row.json), and a warning per row
  whose values differ from the others' (the table then mixes launches)."""
  recorded = [(r.name, r.settings) for r in runs_found if r.settings is not None]
  if not recorded:
    return {}, []
  counts = {}
  for _, values in recorded:
    key = json.dumps(values, sort_keys=True)
    counts[key] = counts.get(key, 0) + 1
  common = max(counts, key=counts.get)
  warnings = [f"{name} was run with --set values {values}, the other rows with "
              f"{json.loads(common)}" for name, values in recorded
              if json.dumps(values, sort_keys=True) != common]
  return json.loads(common), warnings


def aggregate(experiment: registry.Experiment, scale: str, runs: str, out: str,
              command: str | None = None, say=print) -> dict:
  """Reads the experiment's runs, writes table.md, table.tex, summary.json and the plots
  to `out`, and returns the summary."""
  runs_found = [run_files.load_run(experiment, scale, runs, row)
                for row in experiment.rows(scale)]
  arms = list(dict.fromkeys([a for a in experiment.arms if any(r.arm == a for r in runs_found)]
                            + [r.arm for r in runs_found]))
  claimed = list(dict.fromkeys(c.metric for c in experiment.claims))
  metrics = list(dict.fromkeys(list(experiment.columns) + claimed))
  arm_stats = stats.arm_stats(runs_found, arms, metrics)
  noise = {}
  for m in claimed:
    s, used = stats.pooled_std(arm_stats, m, arms)
    noise[m] = dict(std=s, arms=used)
  claims = [dict(stats.verdict(c, arm_stats),
                along_training=stats.paired_along_training(c, runs_found))
            for c in experiment.claims]
  done = [r for r in runs_found if r.completed]
  env = {key: sorted({str(r.summary[key]) for r in done if r.summary.get(key)})
         for key in ("jax_version", "devices", "code_version")}
  os.makedirs(out, exist_ok=True)
  written = plots.write_plots(runs_found, arms, out)
  settings, mixed = launch_settings(runs_found)
  summary = dict(
      experiment=experiment.name, title=experiment.title, paper=experiment.paper, scale=scale,
      runs=runs, command=command or default_command(experiment.name, scale, runs, settings),
      aggregate_command=(f"python -m experiments.report --experiment={experiment.name} "
                         f"--scale={scale} --runs={runs} --out={out}"),
      environment=env, columns=list(experiment.columns), arms=arms, stats=arm_stats,
      noise_floor=noise, claims=claims, rule=stats.RULE, notes=experiment.notes, plots=written,
      warnings=([w for r in runs_found for w in r.warnings] + mixed
                + code_version_warnings(done)),
      rows=[dict(row=r.name, arm=r.arm, seed=r.seed, status=r.status, error=r.error,
                 dir=r.dir, reused_from=r.reused_from,
                 summary={k: v for k, v in r.summary.items() if run_files.is_scalar(v)})
            for r in runs_found])
  summary = _plain(summary)
  paths = [os.path.join(out, n) for n in ("table.md", "table.tex", "summary.json")]
  with open(paths[0], "w") as f:
    f.write(render.render_markdown(summary, plots.plot_titles()))
  with open(paths[1], "w") as f:
    f.write(render.render_latex(summary))
  with open(paths[2], "w") as f:
    json.dump(summary, f, indent=2, allow_nan=False)
    f.write("\n")
  bad = [f"{r.name} ({r.status})" for r in runs_found if not r.completed]
  say(f"{experiment.name}/{scale}: {len(done)} of {len(runs_found)} rows completed"
      + (f"; not completed: {', '.join(bad)}" if bad else ""))
  for c in claims:
    say(f"  [{c['verdict']}] {c['text']}{render.paired_detail(c)}")
  for w in summary["warnings"]:
    say(f"  warning: {w}")
  say("wrote " + ", ".join(paths + [os.path.join(out, p) for p in written]))
  return summary
