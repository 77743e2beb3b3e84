"""Arm statistics over seeds and the verdict on each of a paper's claims.

An arm's value is the mean over its completed seeds +- the sample standard
deviation (ddof=1); with one seed the mean alone, marked n=1.

Paired verdict (the one tables report). Within a table every arm trains on
the same seeds, and a seed fixes the data order (and every arm scores the same
evaluation batches), so arm and than_arm are compared seed by seed. For a
Claim `arm.metric <relation> than_arm.metric`:
  d_s = arm(seed s) - than_arm(seed s)   over the seeds where both completed
        (for a claim against a value v: d_s = arm(seed s) - v)
  d = mean(d_s);  95% interval d +- t_{0.975, n-1} sd(d_s) / sqrt(n)  (Student t, n pairs)
  less:    interval below 0 reproduced, above 0 contradicted, otherwise inconclusive
  greater: the mirror
  close:   interval inside [-tolerance, tolerance] reproduced, entirely outside
           it contradicted, otherwise inconclusive: noise must not pass for a match
  fewer than two pairs: "inconclusive (one seed)"; an arm with no completed
  run: "not run"; completed runs that lack the metric: "no data".
The paired noise floor of a claim is its interval's half-width: the smallest
difference this many seeds resolve given the spread of the paired differences.

Unpaired verdict (kept beside it, for comparison with unpaired reporting):
  d = mean(arm) - mean(than_arm); s = sqrt(mean of the per-arm sample
  variances) over the arms involved with >= 2 seeds (a claim against a value:
  the arm's own std); t = 2 s; less: d < -t reproduced, d > t contradicted;
  greater: the mirror; close: |d| + t <= tolerance reproduced, |d| - t >
  tolerance contradicted; otherwise inconclusive.
"""

import math

import numpy as np

from experiments import registry

REPRODUCED, CONTRADICTED, INCONCLUSIVE = "reproduced", "contradicted", "inconclusive"
ONE_SEED, NOT_RUN, NO_DATA = "inconclusive (one seed)", "not run", "no data"
RULE = ("paired: d_s = arm - than per seed (both completed), d = mean(d_s), 95% interval "
        "d +- t(0.975, n-1) sd(d_s)/sqrt(n) over n pairs (Student t). less: interval below 0 "
        "reproduced, above 0 contradicted, else inconclusive; greater: the mirror; close: "
        "interval inside +-tolerance reproduced, entirely outside contradicted, else "
        "inconclusive. Fewer than 2 pairs: inconclusive (one seed); an arm without a "
        "completed run: not run; completed runs without the metric: no data. Unpaired (shown "
        "beside): d = difference of means, t = 2 x pooled seed std, reproduced when d is "
        "beyond t in the claimed direction.")
LEVEL = 0.95


def _is_number(value) -> bool:
  return isinstance(value, (int, float, np.integer, np.floating)) and not isinstance(value, bool)


def stat(values, seeds=None) -> dict:
  """mean, sample std (ddof=1; None below two values), n, the values, whether all
  are ints, and (given the seeds of the values) the value of each seed."""
  seeds = list(seeds) if seeds is not None else [None] * len(list(values))
  kept = [(s, v) for s, v in zip(seeds, values) if _is_number(v) and math.isfinite(float(v))]
  values = [v for _, v in kept]
  n = len(values)
  return dict(mean=float(np.mean(values)) if n else None,
              std=float(np.std(values, ddof=1)) if n >= 2 else None, n=n,
              values=[float(v) for v in values],
              by_seed={s: float(v) for s, v in kept if s is not None},
              integral=bool(n) and all(isinstance(v, (int, np.integer)) for v in values))


def arm_stats(runs: list, arms, metrics) -> dict:
  """arm -> {"rows", "completed", "metrics": {metric: stat over completed seeds}}."""
  out = {}
  for arm in arms:
    mine = [r for r in runs if r.arm == arm]
    done = [r for r in mine if r.completed]
    out[arm] = dict(rows=len(mine), completed=len(done),
                    metrics={m: stat([r.summary.get(m) for r in done], [r.seed for r in done])
                             for m in metrics})
  return out


def paired_interval(diffs, level: float = LEVEL) -> dict:
  """mean, sample std, n and the Student-t interval of the mean of `diffs` (n >= 2)."""
  from scipy import stats as scipy_stats  # pylint: disable=import-outside-toplevel
  diffs = np.asarray(diffs, np.float64)
  n = diffs.size
  mean, sd = float(diffs.mean()), float(diffs.std(ddof=1))
  half = float(scipy_stats.t.ppf(0.5 + level / 2, n - 1)) * sd / math.sqrt(n)
  return dict(d=mean, sd=sd, n=n, low=mean - half, high=mean + half, half_width=half)


def _decide(relation: str, low: float, high: float, tolerance: float) -> str:
  if relation == "close":
    if -tolerance <= low and high <= tolerance:
      return REPRODUCED
    return CONTRADICTED if low > tolerance or high < -tolerance else INCONCLUSIVE
  if relation == "less":
    return REPRODUCED if high < 0 else CONTRADICTED if low > 0 else INCONCLUSIVE
  return REPRODUCED if low > 0 else CONTRADICTED if high < 0 else INCONCLUSIVE


def pooled_std(stats: dict, metric: str, arms) -> tuple[float | None, list]:
  """sqrt(mean of sample variances) over `arms` with >= 2 values of `metric`, and those arms."""
  used = [a for a in arms if a in stats and metric in stats[a]["metrics"]
          and stats[a]["metrics"][metric]["n"] >= 2]
  if not used:
    return None, []
  return math.sqrt(float(np.mean([stats[a]["metrics"][metric]["std"] ** 2 for a in used]))), used


def verdict(claim: registry.Claim, stats: dict) -> dict:
  """The claim's paired verdict (module docstring), with the unpaired one under
  "unpaired"."""
  out = _base(claim, stats)
  out["unpaired"] = unpaired_verdict(claim, stats)
  out.update(d=None, low=None, high=None, half_width=None, sd=None, pairs=0, seeds=[])
  early = _missing(claim, stats)
  if early:
    return dict(out, verdict=early)
  mine = stats[claim.arm]["metrics"][claim.metric]["by_seed"]
  if claim.than_arm is not None:
    theirs = stats[claim.than_arm]["metrics"][claim.metric]["by_seed"]
    seeds = [s for s in mine if s in theirs]
    diffs = [mine[s] - theirs[s] for s in seeds]
  else:
    seeds = list(mine)
    diffs = [mine[s] - float(claim.than_value) for s in seeds]
  out.update(seeds=seeds, pairs=len(seeds))
  if len(diffs) == 1:
    out["d"] = diffs[0]
  if len(diffs) < 2:
    return dict(out, verdict=ONE_SEED)
  iv = paired_interval(diffs)
  out.update(d=iv["d"], sd=iv["sd"], low=iv["low"], high=iv["high"],
             half_width=iv["half_width"])
  return dict(out, verdict=_decide(claim.relation, iv["low"], iv["high"], claim.tolerance))


def _base(claim, stats) -> dict:
  involved = [claim.arm] + ([claim.than_arm] if claim.than_arm is not None else [])
  sides = [stats.get(a, {}).get("metrics", {}).get(claim.metric) for a in involved]
  return dict(text=claim.text, metric=claim.metric, arm=claim.arm, relation=claim.relation,
              than_arm=claim.than_arm, than_value=claim.than_value, tolerance=claim.tolerance,
              ours=sides[0], theirs=sides[1] if len(sides) > 1 else None)


def _missing(claim, stats) -> str | None:
  """NOT_RUN or NO_DATA when the claim cannot be checked at all, else None."""
  involved = [claim.arm] + ([claim.than_arm] if claim.than_arm is not None else [])
  if any(stats.get(a, {}).get("completed", 0) == 0 for a in involved):
    return NOT_RUN
  sides = [stats.get(a, {}).get("metrics", {}).get(claim.metric) for a in involved]
  if any(s is None or s["n"] == 0 for s in sides):
    return NO_DATA
  return None


def unpaired_verdict(claim: registry.Claim, stats: dict) -> dict:
  """The claim checked on the arms' means and pooled seed std (module docstring)."""
  out = dict(d=None, std=None, t=None)
  early = _missing(claim, stats)
  if early:
    return dict(out, verdict=early)
  involved = [claim.arm] + ([claim.than_arm] if claim.than_arm is not None else [])
  sides = [stats[a]["metrics"][claim.metric] for a in involved]
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


def paired_along_training(claim: registry.Claim, runs: list) -> list[dict]:
  """The paired interval of a claim on an evaluation metric at every evaluation step
  that at least two seeds of both sides logged: how the verdict forms with training
  length. Every row of a table scores the same evaluation batches at the same steps,
  so a step's values pair like the final ones. [] for metrics not on the curve."""
  from experiments.report.runs import eval_curve  # pylint: disable=import-outside-toplevel
  if not claim.metric.startswith("eval/"):
    return []

  def curves(arm):
    return {r.seed: eval_curve(r.records, claim.metric)[0] for r in runs
            if r.arm == arm and r.completed}

  mine = curves(claim.arm)
  theirs = curves(claim.than_arm) if claim.than_arm is not None else None
  steps = sorted({t for c in mine.values() for t in c})
  out = []
  for step in steps:
    if theirs is None:
      diffs = [c[step] - float(claim.than_value) for c in mine.values() if step in c]
    else:
      diffs = [mine[s][step] - theirs[s][step] for s in mine
               if s in theirs and step in mine[s] and step in theirs[s]]
    if len(diffs) < 2:
      continue
    iv = paired_interval(diffs)
    out.append(dict(step=step, d=iv["d"], low=iv["low"], high=iv["high"],
                    half_width=iv["half_width"], pairs=iv["n"],
                    verdict=_decide(claim.relation, iv["low"], iv["high"], claim.tolerance)))
  return out
