"""Arm statistics over seeds and the verdict on each of a paper's claims.

An arm's value is the mean over its completed seeds +- the sample standard
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

import math

import numpy as np

from experiments import registry

REPRODUCED, CONTRADICTED, INCONCLUSIVE = "reproduced", "contradicted", "inconclusive"
ONE_SEED, NOT_RUN, NO_DATA = "inconclusive (one seed)", "not run", "no data"
RULE = ("d = mean(arm) - mean(than) (or minus the claimed value); s = pooled seed-to-seed std "
        "of the metric, sqrt(mean of sample variances) over the arms involved with >= 2 "
        "completed seeds (a claim against a value: the arm's own std); t = 2 s. "
        "less: d < -t reproduced, d > t contradicted, else inconclusive; greater: the mirror; "
        "close: |d| + t <= tolerance reproduced, |d| - t > tolerance contradicted, else "
        "inconclusive. No involved arm with 2 "
        "seeds: inconclusive (one seed); an arm without a completed run: not run; completed "
        "runs without the metric: no data.")


def _is_number(value) -> bool:
  return isinstance(value, (int, float, np.integer, np.floating)) and not isinstance(value, bool)


def stat(values) -> dict:
  """mean, sample std (ddof=1; None below two values), n, the values, and whether all are ints."""
  values = [v for v in values if _is_number(v) and math.isfinite(float(v))]
  n = len(values)
  return dict(mean=float(np.mean(values)) if n else None,
              std=float(np.std(values, ddof=1)) if n >= 2 else None, n=n,
              values=[float(v) for v in values],
              integral=bool(n) and all(isinstance(v, (int, np.integer)) for v in values))


def arm_stats(runs: list, arms, metrics) -> dict:
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
