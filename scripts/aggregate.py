r"""Turns an experiment's runs into a table, claim verdicts and plots.

  python scripts/aggregate.py --experiment=mohge --scale=tiny --runs=runs/experiments \
      --out=results/mohge

Reads <runs>/<experiment>/<scale>/<arm>_s<seed>/ for every row of the sweep
(the files of the run named by row.json's "reused_from", if any) and writes
<out>/table.md, <out>/table.tex, <out>/summary.json and, where some completed
run logged the data, val_loss.png, expert_load.png, group_traffic.png and
l3_entropy.png. A row that failed, is still running or never ran is listed
with its status and error; it never stops the aggregation.

A run's summary is final.json flattened with "/" ({"budget": {"params": ..}}
-> "budget/params"), then the last logged value of every scalar key of
metrics.jsonl that final.json lacks, then experiment.derived(records, config). An
arm's value is the mean over its completed seeds +- the sample standard
deviation (ddof=1); with one seed the mean alone, marked n=1.

Verdict rule for a Claim `arm.metric <relation> than_arm.metric` (or than_value):
  d = mean(arm) - mean(than_arm)      (or mean(arm) - than_value)
  s = sqrt(mean of the per-arm sample variances) over the arms involved that
      have >= 2 completed seeds (for a than_value claim: the arm's own std)
  t = 2 s: two seed-to-seed standard deviations. With two seeds per arm a
      standard error of the difference is no better estimated, so the rule
      asks the difference to stand clear of the seed noise itself.
  less:    d < -t reproduced, d > t contradicted, otherwise inconclusive
  greater: d > t reproduced, d < -t contradicted, otherwise inconclusive
  close:   |d| + t <= tolerance reproduced (the noise band lies inside the
           tolerance), |d| - t > tolerance contradicted, otherwise inconclusive:
           noise alone must not pass for a match
  no involved arm with 2 seeds: "inconclusive (one seed)"; an arm with no
  completed run: "not run"; completed runs that lack the metric: "no data".
The noise floor reported per claimed metric is the same pooled std over all arms.
"""

import dataclasses
import json
import math
import os
import sys

import numpy as np

_ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
if _ROOT not in sys.path:
  sys.path.insert(0, _ROOT)  # experiments/ and moejax/ from any working directory

from experiments import registry  # pylint: disable=wrong-import-position
from moejax.errors import ConfigError  # pylint: disable=wrong-import-position
from moejax.metrics import read_json, read_metrics  # pylint: disable=wrong-import-position

REPRODUCED, CONTRADICTED, INCONCLUSIVE = "reproduced", "contradicted", "inconclusive"
ONE_SEED, NOT_RUN, NO_DATA = "inconclusive (one seed)", "not run", "no data"
PLOTS = ("val_loss.png", "expert_load.png", "group_traffic.png", "l3_entropy.png")
DEFAULT_RUNS = "runs/experiments"
RULE = ("d = mean(arm) - mean(than) (or minus the claimed value); s = pooled seed-to-seed std "
        "of the metric, sqrt(mean of sample variances) over the arms involved with >= 2 "
        "completed seeds (a claim against a value: the arm's own std); t = 2 s. "
        "less: d < -t reproduced, d > t contradicted, else inconclusive; greater: the mirror; "
        "close: |d| + t <= tolerance reproduced, |d| - t > tolerance contradicted, else "
        "inconclusive. No involved arm with 2 "
        "seeds: inconclusive (one seed); an arm without a completed run: not run; completed "
        "runs without the metric: no data.")


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


# ----------------------------------------------------------------------------- reading runs


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


def _is_number(value) -> bool:
  return isinstance(value, (int, float, np.integer, np.floating)) and not isinstance(value, bool)


def _is_scalar(value) -> bool:
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
      if _is_scalar(value) and key not in fixed:
        summary[key] = value
  warnings = []
  if derived is not None:
    try:
      summary.update(flatten(derived(records, config) or {}))
    except Exception as e:  # pylint: disable=broad-except
      warnings.append(f"derived() failed for {workdir}: {type(e).__name__}: {_one_line(e)}")
  return summary, warnings


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
  run = Run(row=row, name=name, dir=rdir, source=source, status="completed", reused_from=reused)
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


# ----------------------------------------------------------------------------- statistics


def stat(values) -> dict:
  """mean, sample std (ddof=1; None below two values), n, the values, and whether all are ints."""
  values = [v for v in values if _is_number(v) and math.isfinite(float(v))]
  n = len(values)
  return dict(mean=float(np.mean(values)) if n else None,
              std=float(np.std(values, ddof=1)) if n >= 2 else None, n=n,
              values=[float(v) for v in values],
              integral=bool(n) and all(isinstance(v, (int, np.integer)) for v in values))


def arm_stats(runs: list[Run], arms, metrics) -> dict:
  """arm -> {"rows", "completed", "metrics": {metric: stat over completed seeds}}."""
  out = {}
  for arm in arms:
    mine = [r for r in runs if r.arm == arm]
    done = [r for r in mine if r.completed]
    out[arm] = dict(rows=len(mine), completed=len(done),
                    metrics={m: stat(r.summary.get(m) for r in done) for m in metrics})
  return out


def pooled_std(stats: dict, metric: str, arms) -> tuple[float | None, list]:
  """sqrt(mean of sample variances) over `arms` with >= 2 values of `metric`, and those arms."""
  used = [a for a in arms if a in stats and metric in stats[a]["metrics"]
          and stats[a]["metrics"][metric]["n"] >= 2]
  if not used:
    return None, []
  return math.sqrt(float(np.mean([stats[a]["metrics"][metric]["std"] ** 2 for a in used]))), used


def verdict(claim: registry.Claim, stats: dict) -> dict:
  """The claim checked against the arms' stats by the rule at the top of this module."""
  involved = [claim.arm] + ([claim.than_arm] if claim.than_arm is not None else [])
  sides = [stats.get(a, {}).get("metrics", {}).get(claim.metric) for a in involved]
  out = dict(text=claim.text, metric=claim.metric, arm=claim.arm, relation=claim.relation,
             than_arm=claim.than_arm, than_value=claim.than_value, tolerance=claim.tolerance,
             ours=sides[0], theirs=sides[1] if len(sides) > 1 else None, d=None, std=None,
             t=None)
  if any(stats.get(a, {}).get("completed", 0) == 0 for a in involved):
    return dict(out, verdict=NOT_RUN)
  if any(s is None or s["n"] == 0 for s in sides):
    return dict(out, verdict=NO_DATA)
  ref = sides[1]["mean"] if claim.than_arm is not None else float(claim.than_value)
  d = sides[0]["mean"] - ref
  s, _ = pooled_std(stats, claim.metric, involved)
  out["d"] = d
  if s is None:
    return dict(out, verdict=ONE_SEED)
  t = 2.0 * s
  out.update(std=s, t=t)
  if claim.relation == "close":
    result = (REPRODUCED if abs(d) + t <= claim.tolerance
              else CONTRADICTED if abs(d) - t > claim.tolerance else INCONCLUSIVE)
  else:
    sign = -1.0 if claim.relation == "less" else 1.0  # the claimed direction
    result = (REPRODUCED if sign * d > t else CONTRADICTED if sign * d < -t else INCONCLUSIVE)
  return dict(out, verdict=result)


# ----------------------------------------------------------------------------- formatting


def _is_loss(metric: str) -> bool:
  return "loss" in metric or "bits_per_byte" in metric


def format_number(metric: str, value, integral: bool = False, missing: str = "—") -> str:
  """Losses with 4 decimals, integers with thousands separators, else 4 significant digits."""
  if value is None:
    return missing
  value = float(value)
  if not math.isfinite(value):
    return str(value)
  if _is_loss(metric):
    return f"{value:.4f}"
  if integral and value.is_integer():
    return f"{int(value):,}"
  if abs(value) >= 1e3:  # 4 significant digits or more: whole units, grouped
    return f"{value:,.0f}"
  return f"{value:.4g}"


def format_stat(metric: str, s: dict | None, completed: int | None = None, pm: str = " ± ",
                missing: str = "—") -> str:
  """"mean ± std", "mean (n=1)", or `missing`; "(n=k)" when k differs from `completed`."""
  if s is None or s["n"] == 0:
    return missing
  mean = format_number(metric, s["mean"], s["integral"])
  if s["n"] == 1:
    return f"{mean} (n=1)"
  text = f"{mean}{pm}{format_number(metric, s['std'], s['integral'])}"
  return text if completed in (None, s["n"]) else f"{text} (n={s['n']})"


def _relation(c: dict) -> str:
  return f"close (±{c['tolerance']:g})" if c["relation"] == "close" else c["relation"]


def _than(c: dict, pm: str = " ± ", missing: str = "—") -> str:
  if c["than_arm"] is None:
    return f"value {format_number(c['metric'], c['than_value'], missing=missing)}"
  return f"{c['than_arm']}: {format_stat(c['metric'], c['theirs'], pm=pm, missing=missing)}"


def _md(text) -> str:
  return str(text).replace("|", "\\|").replace("\n", " ")


_TEX = {"\\": r"\textbackslash{}", "&": r"\&", "%": r"\%", "$": r"\$", "#": r"\#", "_": r"\_",
        "{": r"\{", "}": r"\}", "~": r"\textasciitilde{}", "^": r"\textasciicircum{}",
        "±": r"$\pm$", "—": "--", "≥": r"$\geq$", "≤": r"$\leq$"}


def tex_escape(text) -> str:
  """Text with LaTeX's special characters escaped."""
  return "".join(_TEX.get(ch, ch) for ch in str(text))


def render_markdown(summary: dict) -> str:
  """table.md from the summary aggregate() writes to summary.json."""
  s = summary
  env = s["environment"]
  lines = [f"# {s['title']}", "",
           f"Experiment `{s['experiment']}` at scale `{s['scale']}`; reproduces {s['paper']}.", "",
           "Runs produced by:", "", "```", s["command"], "```", "",
           f"Aggregated with `{s['aggregate_command']}`.", "",
           f"Environment: jax {', '.join(env['jax_version']) or 'not recorded'}; devices "
           f"{', '.join(env['devices']) or 'not recorded'} (from the completed runs' final.json).",
           "", "## Results", "",
           "Mean ± sample std over completed seeds (n = completed/rows per arm).", ""]
  cols = s["columns"]
  lines.append("| Arm | n | " + " | ".join(_md(c) for c in cols) + " |")
  lines.append("|---|---|" + "---|" * len(cols))
  for arm in s["arms"]:
    a = s["stats"][arm]
    cells = [format_stat(c, a["metrics"].get(c), a["completed"]) for c in cols]
    lines.append(f"| {_md(arm)} | {a['completed']}/{a['rows']} | " + " | ".join(cells) + " |")
  lines += ["", "## Claims", ""]
  if s["claims"]:
    lines.append("| # | Claim | Metric | Relation | Ours | Than | d | t = 2s | Verdict |")
    lines.append("|---|---|---|---|---|---|---|---|---|")
    for i, c in enumerate(s["claims"], 1):
      lines.append(
          f"| {i} | {_md(c['text'])} | {_md(c['metric'])} | {_relation(c)} | "
          f"{_md(c['arm'])}: {format_stat(c['metric'], c['ours'])} | {_md(_than(c))} | "
          f"{format_number(c['metric'], c['d'])} | {format_number(c['metric'], c['t'])} | "
          f"**{c['verdict']}** |")
  else:
    lines.append("This experiment states no claims.")
  lines += ["", "## Noise floor", "",
            "Pooled seed-to-seed std of each claimed metric: sqrt(mean of the per-arm sample "
            "variances) over the arms with at least 2 completed seeds.", ""]
  if s["noise_floor"]:
    lines += ["| Metric | Pooled std | Arms |", "|---|---|---|"]
    for metric, nf in s["noise_floor"].items():
      lines.append(f"| {_md(metric)} | {format_number(metric, nf['std'])} | "
                   f"{_md(', '.join(nf['arms'])) or 'none with 2 seeds'} |")
  lines += ["", "## Rows", ""]
  bad = [r for r in s["rows"] if r["status"] != "completed"]
  done = len(s["rows"]) - len(bad)
  lines.append(f"{done} of {len(s['rows'])} rows completed.")
  if bad:
    lines += ["", "| Row | Status | Error |", "|---|---|---|"]
    lines += [f"| {_md(r['row'])} | {_md(r['status'])} | {_md(r['error']) or '—'} |" for r in bad]
  reused = [r for r in s["rows"] if r["reused_from"]]
  if reused:
    lines += ["", "Rows whose identical config had already trained elsewhere (files read from "
              "there):", ""]
    lines += [f"- {r['row']} <- `{r['reused_from']}`" for r in reused]
  if s["warnings"]:
    lines += ["", "## Warnings", ""] + [f"- {_md(w)}" for w in s["warnings"]]
  if s["notes"]:
    lines += ["", "## Notes", "", s["notes"]]
  lines += ["", "## Plots", ""]
  titles = {"val_loss.png": "Validation loss", "expert_load.png": "Expert load",
            "group_traffic.png": "MoHGE group traffic", "l3_entropy.png": "L3 entropy"}
  if s["plots"]:
    lines += [f"![{titles.get(p, p)}]({p})" for p in s["plots"]]
  else:
    lines.append("No plots: no completed run logged the data they need.")
  lines += ["", "---", "", f"Verdict rule: {s['rule']}", ""]
  return "\n".join(lines)


def render_latex(summary: dict) -> str:
  """table.tex: booktabs tabulars of the main table and of the claims."""
  s = summary
  pm, dash = r" $\pm$ ", "--"
  cols = s["columns"]
  lines = [f"% {tex_escape(s['title'])}: experiment {s['experiment']}, scale {s['scale']}.",
           r"% Generated by scripts/aggregate.py; needs \usepackage{booktabs}.",
           r"\begin{tabular}{l r " + "r " * len(cols) + "}", r"\toprule",
           "Arm & $n$ & " + " & ".join(tex_escape(c) for c in cols) + r" \\", r"\midrule"]
  for arm in s["arms"]:
    a = s["stats"][arm]
    cells = [format_stat(c, a["metrics"].get(c), a["completed"], pm=pm, missing=dash)
             for c in cols]
    lines.append(f"{tex_escape(arm)} & {a['completed']}/{a['rows']} & " + " & ".join(cells)
                 + r" \\")
  lines += [r"\bottomrule", r"\end{tabular}", ""]
  if s["claims"]:
    lines += [r"\begin{tabular}{p{6cm} l l l l r r l}", r"\toprule",
              r"Claim & Metric & Relation & Ours & Than & $d$ & $t$ & Verdict \\", r"\midrule"]
    for c in s["claims"]:
      ours = f"{tex_escape(c['arm'])}: {format_stat(c['metric'], c['ours'], pm=pm, missing=dash)}"
      than = _than(c, pm="\0", missing=dash)  # escaped first, then the \pm put in
      lines.append(" & ".join([
          tex_escape(c["text"]), tex_escape(c["metric"]), tex_escape(_relation(c)), ours,
          tex_escape(than).replace("\0", pm), format_number(c["metric"], c["d"], missing=dash),
          format_number(c["metric"], c["t"], missing=dash), tex_escape(c["verdict"])]) + r" \\")
    lines += [r"\bottomrule", r"\end{tabular}", ""]
  lines.append(f"% Verdict rule: {tex_escape(s['rule'])}")
  return "\n".join(lines) + "\n"


# ----------------------------------------------------------------------------- plots


def _pyplot():
  import matplotlib  # pylint: disable=import-outside-toplevel
  matplotlib.use("Agg")
  import matplotlib.pyplot as plt  # pylint: disable=import-outside-toplevel
  return plt


def _series(records: list, key: str) -> dict:
  """step -> value of `key` (the last record wins when a step logged it twice)."""
  return {r["step"]: r[key] for r in records if key in r and "step" in r}


def _seed_mean(series: list[dict]) -> tuple[list, list]:
  """Steps every seed logged, and the mean over seeds there."""
  series = [s for s in series if s]
  if not series:
    return [], []
  steps = sorted(set.intersection(*(set(s) for s in series)))
  return steps, [float(np.mean([s[t] for s in series])) for t in steps]


def _prefixed(records: list, prefix: str) -> list[str]:
  """Keys `prefix` + one more name, e.g. aux/expert_load/layer_01 (not LoopMoE's
  aux/expert_load/layer_01/iter_0, whose pooled load is layer_01 itself)."""
  return sorted({k for r in records for k in r
                 if k.startswith(prefix) and "/" not in k[len(prefix):]})


def _first_seed(runs: list[Run]) -> Run:
  return min(runs, key=lambda r: (r.seed != 0, str(r.seed)))


def _by_arm(runs: list[Run], arms, has) -> dict:
  """arm -> its completed runs for which has(run) holds, arms without any left out."""
  out = {}
  for arm in arms:
    mine = [r for r in runs if r.arm == arm and r.completed and has(r)]
    if mine:
      out[arm] = mine
  return out


def _save(plt, fig, path: str) -> None:
  fig.tight_layout()
  fig.savefig(path, dpi=110)
  plt.close(fig)


def eval_curve(records: list) -> tuple[dict, tuple | None]:
  """step -> validation loss of the periodic evaluations, and (step, loss) of the final one
  when it ran on a different number of tokens (train.final_eval_batches, not eval_batches),
  so that the two are not joined into one curve."""
  evals = [r for r in records if "eval/loss" in r and "step" in r]
  final = None
  if len(evals) >= 2 and evals[-1].get("eval/tokens") != evals[-2].get("eval/tokens"):
    final = (evals[-1]["step"], evals[-1]["eval/loss"])
    evals = evals[:-1]
  return {r["step"]: r["eval/loss"] for r in evals}, final


def plot_val_loss(runs: list[Run], arms, path: str) -> bool:
  """Validation loss vs step per arm (seed mean; thin lines per seed; training loss dotted;
  a star for the final evaluation when it covered a different set of tokens)."""
  groups = _by_arm(runs, arms, lambda r: _series(r.records, "eval/loss"))
  if not groups:
    return False
  plt = _pyplot()
  fig, ax = plt.subplots(figsize=(7.5, 4.5))
  shown, any_final = [], False
  for arm, mine in groups.items():
    color = f"C{list(arms).index(arm) % 10}"
    curves = [eval_curve(r.records) for r in mine]
    for curve, _ in curves:
      ax.plot(sorted(curve), [curve[t] for t in sorted(curve)], color=color, lw=0.6, alpha=0.35)
      shown += list(curve.values())
    steps, mean = _seed_mean([c for c, _ in curves])
    ax.plot(steps, mean, color=color, lw=2, marker="o", ms=3, label=f"{arm} (n={len(mine)})")
    finals = [f for _, f in curves if f is not None]
    if finals:
      any_final = True
      values = [v for _, v in finals]
      ax.plot([max(s for s, _ in finals)], [float(np.mean(values))], color=color, marker="*",
              ms=11, ls="none")
      shown += values
    steps, mean = _seed_mean([_series(r.records, "loss") for r in mine])
    ax.plot(steps, mean, color=color, lw=0.8, alpha=0.3, ls=":")
  lo, hi = min(shown), max(shown)
  pad = max(hi - lo, 1e-3) * 0.3
  ax.set_ylim(lo - pad, hi + pad)  # early training loss is far above; it may leave the frame
  ax.set_xlabel("step")
  ax.set_ylabel("loss (nats/token)")
  ax.set_title("Validation loss (seed mean; thin: seeds; dotted: training loss"
               + ("; star: final evaluation, on more batches than the curve" if any_final else "")
               + ")",
               fontsize=9)
  ax.legend(fontsize=8)
  ax.grid(alpha=0.3)
  _save(plt, fig, path)
  return True


def _load_ratio(record: dict, keys: list) -> float | None:
  """max/mean of each layer's load vector, averaged over layers."""
  ratios = []
  for k in keys:
    if k in record:
      v = np.ravel(np.asarray(record[k], dtype=float))
      if v.size and np.mean(v) > 0:
        ratios.append(float(np.max(v) / np.mean(v)))
  return float(np.mean(ratios)) if ratios else None


def plot_expert_load(runs: list[Run], arms, path: str) -> bool:
  """Max/mean expert load vs step per arm, and one layer's per-expert share over steps."""
  prefix = "aux/expert_load/layer_"
  groups = _by_arm(runs, arms, lambda r: _prefixed(r.records, prefix))
  if not groups:
    return False
  plt = _pyplot()
  fig, (ax, hax) = plt.subplots(2, 1, figsize=(7.5, 7.5))
  for arm, mine in groups.items():
    color = f"C{list(arms).index(arm) % 10}"
    per_seed = []
    for r in mine:
      keys = _prefixed(r.records, prefix)
      per_seed.append({rec["step"]: v for rec in r.records if "step" in rec
                       for v in [_load_ratio(rec, keys)] if v is not None})
    steps, mean = _seed_mean(per_seed)
    ax.plot(steps, mean, color=color, lw=1.8, label=f"{arm} (n={len(mine)})")
  ax.axhline(1.0, color="gray", lw=0.8, ls="--")
  ax.set_xlabel("step")
  ax.set_ylabel("max / mean expert load")
  ax.set_title("Expert load imbalance (averaged over layers; 1 = uniform)", fontsize=10)
  ax.legend(fontsize=8)
  ax.grid(alpha=0.3)
  arm, mine = next(iter(groups.items()))
  run = _first_seed(mine)
  key = _prefixed(run.records, prefix)[0]
  rows = [(rec["step"], np.ravel(np.asarray(rec[key], dtype=float)))
          for rec in run.records if key in rec and "step" in rec]
  if len({v.size for _, v in rows}) == 1:
    share = np.stack([v / v.sum() if v.sum() > 0 else v for _, v in rows], axis=1)
    steps = [s for s, _ in rows]
    im = hax.imshow(share, aspect="auto", origin="lower", cmap="viridis", interpolation="nearest",
                    extent=(steps[0] - 0.5, steps[-1] + 0.5, -0.5, share.shape[0] - 0.5))
    fig.colorbar(im, ax=hax, label="share of routed tokens")
    hax.set_xlabel("step")
    hax.set_ylabel("expert")
    hax.set_title(f"Per-expert share, {arm} seed {run.seed}, {key.rsplit('/', 1)[-1]}",
                  fontsize=10)
  else:
    hax.set_axis_off()
  _save(plt, fig, path)
  return True


def plot_group_traffic(runs: list[Run], arms, path: str) -> bool:
  """MoHGE share of routed pairs per group vs step (one panel per arm, first seed)."""
  prefix = "aux/group_share/layer_"
  groups = _by_arm(runs, arms, lambda r: _prefixed(r.records, prefix))
  if not groups:
    return False
  plt = _pyplot()
  cols = min(len(groups), 2)
  rows = -(-len(groups) // cols)
  fig, axes = plt.subplots(rows, cols, figsize=(6 * cols, 4.2 * rows), squeeze=False,
                           sharey=True)
  for ax in axes.flat[len(groups):]:
    ax.set_axis_off()
  for ax, (arm, mine) in zip(axes.flat, groups.items()):
    run = _first_seed(mine)
    keys = _prefixed(run.records, prefix)
    steps, shares = [], []
    for rec in run.records:
      vecs = [np.ravel(np.asarray(rec[k], dtype=float)) for k in keys if k in rec]
      if vecs and "step" in rec and len({v.size for v in vecs}) == 1:
        steps.append(rec["step"])
        shares.append(np.mean(vecs, axis=0))
    h = run.config.get("mohge", {})
    widths = list(h.get("group_widths") or [])
    shares = np.array(shares)
    for g in range(shares.shape[1] if shares.ndim == 2 else 0):
      label = f"width {widths[g]}" if len(widths) == shares.shape[1] else f"group {g}"
      ax.plot(steps, shares[:, g], lw=1.6, label=label)
    total = run.config.get("train", {}).get("steps")
    frac = h.get("group_aux_start_fraction")
    if total is not None and frac is not None:
      start = int(round(frac * total))
      off = h.get("group_aux_coef") == 0
      ax.axvline(start, color="gray", ls="--", lw=1,
                 label=f"group loss {'off (coef 0); would start' if off else 'starts'} "
                       f"at step {start}")
    ax.set_title(f"{arm}, seed {run.seed}", fontsize=10)
    ax.set_xlabel("step")
    ax.grid(alpha=0.3)
    ax.legend(fontsize=7)
  for row in axes:
    row[0].set_ylabel("share of routed pairs (mean over layers)")
  _save(plt, fig, path)
  return True


def plot_l3_entropy(runs: list[Run], arms, path: str) -> bool:
  """Normalised L3 lookup entropy per L3 layer vs step, per arm (seed mean)."""
  prefix = "aux/l3_entropy_norm/"
  groups = _by_arm(runs, arms, lambda r: _prefixed(r.records, prefix))
  if not groups:
    return False
  plt = _pyplot()
  fig, ax = plt.subplots(figsize=(7.5, 4.5))
  styles = ("-", "--", ":", "-.")
  for arm, mine in groups.items():
    color = f"C{list(arms).index(arm) % 10}"
    keys = sorted({k for r in mine for k in _prefixed(r.records, prefix)})
    for j, key in enumerate(keys):
      steps, mean = _seed_mean([_series(r.records, key) for r in mine])
      ax.plot(steps, mean, color=color, ls=styles[j % len(styles)], lw=1.6,
              label=f"{arm} {key.rsplit('/', 1)[-1]}")
  ax.set_xlabel("step")
  ax.set_ylabel("normalised entropy of L3 lookups")
  ax.set_title("L3 table usage per L3 layer (seed mean; 1 = uniform)", fontsize=10)
  ax.legend(fontsize=8)
  ax.grid(alpha=0.3)
  _save(plt, fig, path)
  return True


def write_plots(runs: list[Run], arms, out: str) -> list[str]:
  """Writes each plot whose data some completed run logged; returns the file names."""
  makers = dict(zip(PLOTS, (plot_val_loss, plot_expert_load, plot_group_traffic,
                            plot_l3_entropy)))
  written = []
  for name, make in makers.items():
    if make(runs, arms, os.path.join(out, name)):
      written.append(name)
  return written


# ----------------------------------------------------------------------------- the whole report


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


def default_command(name: str, scale: str, runs: str) -> str:
  """The run.py command that produces the runs this aggregates."""
  cmd = f"python run.py --experiment={name} --scale={scale}"
  if os.path.normpath(runs) != os.path.normpath(DEFAULT_RUNS):
    cmd += f" --workdir={runs}"
  return cmd


def aggregate(experiment: registry.Experiment, scale: str, runs: str, out: str,
              command: str | None = None, say=print) -> dict:
  """Reads the experiment's runs, writes table.md, table.tex, summary.json and the plots
  to `out`, and returns the summary."""
  runs_found = [load_run(experiment, scale, runs, row) for row in experiment.rows(scale)]
  arms = list(dict.fromkeys([a for a in experiment.arms if any(r.arm == a for r in runs_found)]
                            + [r.arm for r in runs_found]))
  claimed = list(dict.fromkeys(c.metric for c in experiment.claims))
  metrics = list(dict.fromkeys(list(experiment.columns) + claimed))
  stats = arm_stats(runs_found, arms, metrics)
  noise = {}
  for m in claimed:
    s, used = pooled_std(stats, m, arms)
    noise[m] = dict(std=s, arms=used)
  claims = [verdict(c, stats) for c in experiment.claims]
  done = [r for r in runs_found if r.completed]
  env = dict(jax_version=sorted({str(r.summary["jax_version"]) for r in done
                                 if "jax_version" in r.summary}),
             devices=sorted({str(r.summary["devices"]) for r in done if "devices" in r.summary}))
  os.makedirs(out, exist_ok=True)
  for name in PLOTS:  # a plot from an earlier aggregation whose data is gone would mislead
    if os.path.exists(os.path.join(out, name)):
      os.remove(os.path.join(out, name))
  plots = write_plots(runs_found, arms, out)
  summary = dict(
      experiment=experiment.name, title=experiment.title, paper=experiment.paper, scale=scale,
      runs=runs, command=command or default_command(experiment.name, scale, runs),
      aggregate_command=(f"python scripts/aggregate.py --experiment={experiment.name} "
                         f"--scale={scale} --runs={runs} --out={out}"),
      environment=env, columns=list(experiment.columns), arms=arms, stats=stats,
      noise_floor=noise, claims=claims, rule=RULE, notes=experiment.notes, plots=plots,
      warnings=[w for r in runs_found for w in r.warnings],
      rows=[dict(row=r.name, arm=r.arm, seed=r.seed, status=r.status, error=r.error,
                 dir=r.dir, reused_from=r.reused_from,
                 summary={k: v for k, v in r.summary.items() if _is_scalar(v)})
            for r in runs_found])
  summary = _plain(summary)
  paths = [os.path.join(out, n) for n in ("table.md", "table.tex", "summary.json")]
  with open(paths[0], "w") as f:
    f.write(render_markdown(summary))
  with open(paths[1], "w") as f:
    f.write(render_latex(summary))
  with open(paths[2], "w") as f:
    json.dump(summary, f, indent=2, allow_nan=False)
    f.write("\n")
  bad = [f"{r.name} ({r.status})" for r in runs_found if not r.completed]
  say(f"{experiment.name}/{scale}: {len(done)} of {len(runs_found)} rows completed"
      + (f"; not completed: {', '.join(bad)}" if bad else ""))
  for c in claims:
    detail = "" if c["d"] is None else f": d = {format_number(c['metric'], c['d'])}" + (
        "" if c["t"] is None else f", t = {format_number(c['metric'], c['t'])}")
    say(f"  [{c['verdict']}] {c['text']}{detail}")
  for w in summary["warnings"]:
    say(f"  warning: {w}")
  say("wrote " + ", ".join(paths + [os.path.join(out, p) for p in plots]))
  return summary


# ----------------------------------------------------------------------------- command line


def define_flags():
  from absl import flags  # pylint: disable=import-outside-toplevel
  flags.DEFINE_string("experiment", None, "The experiment to aggregate (python run.py --list "
                      "names them).")
  flags.DEFINE_enum("scale", "tiny", list(registry.SCALES), "The scale its runs were made at.")
  flags.DEFINE_string("runs", DEFAULT_RUNS, "Root of the experiment runs (run.py --workdir).")
  flags.DEFINE_string("out", None, "Output folder (default results/<experiment>/<scale>).")
  flags.DEFINE_string("command", None, "The command that produced the runs, quoted in the "
                      "table (default: python run.py --experiment=NAME --scale=SCALE).")
  flags.mark_flag_as_required("experiment")


def main(argv):
  from absl import app, flags  # pylint: disable=import-outside-toplevel
  if len(argv) > 1:
    raise app.UsageError(f"Unexpected arguments: {argv[1:]}")
  f = flags.FLAGS
  try:
    experiment = registry.get(f.experiment)
    where = os.path.join(f.runs, experiment.name, f.scale)
    if not os.path.isdir(where):
      command = default_command(experiment.name, f.scale, f.runs)
      raise ConfigError(f"There are no runs in {where}; run `{command}` first, or point "
                        f"--runs at the root that holds them.")
    aggregate(experiment, f.scale, f.runs, f.out or os.path.join("results", experiment.name,
                                                                 f.scale), command=f.command)
  except ConfigError as e:
    print(f"config error: {e}", file=sys.stderr, flush=True)
    sys.exit(2)


if __name__ == "__main__":
  from absl import app as _app  # pylint: disable=import-outside-toplevel
  define_flags()
  _app.run(main)
