"""The report's figures: the generic ones (validation loss, expert load) drawn here,
then each registered extension's own (moejax/extensions.py, `plots`).

Every plot is `fn(runs, arms, path) -> bool` over the protocol of
moejax/plotting.py, and is written only when some completed run logged its data.
"""

import os

import numpy as np

from experiments.report.runs import eval_curve
from moejax import extensions, plotting


@plotting.titled("Validation loss")
def plot_val_loss(runs: list, arms, path: str) -> bool:
  """Validation loss vs step per arm: the mean over seeds, a band of +- one std over
  seeds where there are two or more, and a star for a final evaluation that scored
  a different number of tokens than the curve."""
  groups = plotting.by_arm(runs, arms, lambda r: plotting.series(r.records, "eval/loss"))
  if not groups:
    return False
  plt = plotting.pyplot()
  fig, ax = plt.subplots(figsize=(7.5, 4.5))
  shown, any_final = [], False
  for arm, mine in groups.items():
    color = plotting.arm_colour(arms, arm)
    curves = [eval_curve(r.records) for r in mine]
    steps, mean, std = plotting.seed_band([c for c, _ in curves])
    mean, std = np.asarray(mean), np.asarray(std)
    ax.plot(steps, mean, color=color, lw=1.8, marker="o", ms=3, label=f"{arm} (n={len(mine)})")
    if len(mine) >= 2:
      ax.fill_between(steps, mean - std, mean + std, color=color, alpha=0.18, lw=0)
    shown += list(mean - std) + list(mean + std)
    finals = [f for _, f in curves if f is not None]
    if finals:
      any_final = True
      values = [v for _, v in finals]
      ax.plot([max(s for s, _ in finals)], [float(np.mean(values))], color=color, marker="*",
              ms=11, ls="none")
      shown += values
  lo, hi = min(shown), max(shown)
  pad = max(hi - lo, 1e-3) * 0.08
  ax.set_ylim(lo - pad, hi + pad)
  ax.set_xlabel("step")
  ax.set_ylabel("validation loss (nats/token)")
  ax.set_title("Validation loss: mean over seeds, band ±1 std", fontsize=10)
  if any_final:
    ax.plot([], [], color="gray", marker="*", ms=9, ls="none",
            label="final evaluation (more tokens)")
  ax.legend(fontsize=8)
  ax.grid(alpha=0.3)
  plotting.save(plt, fig, path)
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


@plotting.titled("Expert load")
def plot_expert_load(runs: list, arms, path: str) -> bool:
  """Max/mean expert load vs step per arm, and one layer's per-expert share over steps."""
  prefix = "aux/expert_load/layer_"
  groups = plotting.by_arm(runs, arms, lambda r: plotting.prefixed(r.records, prefix))
  if not groups:
    return False
  plt = plotting.pyplot()
  fig, (ax, hax) = plt.subplots(2, 1, figsize=(7.5, 7.5))
  for arm, mine in groups.items():
    color = plotting.arm_colour(arms, arm)
    per_seed = []
    for r in mine:
      keys = plotting.prefixed(r.records, prefix)
      per_seed.append({rec["step"]: v for rec in r.records if "step" in rec
                       for v in [_load_ratio(rec, keys)] if v is not None})
    steps, mean = plotting.seed_mean(per_seed)
    ax.plot(steps, mean, color=color, lw=1.8, label=f"{arm} (n={len(mine)})")
  ax.axhline(1.0, color="gray", lw=0.8, ls="--")
  ax.set_xlabel("step")
  ax.set_ylabel("max / mean expert load")
  ax.set_title("Expert load imbalance (averaged over layers; 1 = uniform)", fontsize=10)
  ax.legend(fontsize=8)
  ax.grid(alpha=0.3)
  arm, mine = next(iter(groups.items()))
  run = plotting.first_seed(mine)
  key = plotting.prefixed(run.records, prefix)[0]
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
  plotting.save(plt, fig, path)
  return True


GENERIC = {"val_loss.png": plot_val_loss, "expert_load.png": plot_expert_load}


def makers() -> dict:
  """file name -> plot function: the generic plots, then every extension's in
  registration order."""
  out = dict(GENERIC)
  for ext in extensions.registered():
    for file_name, fn in ext.plots.items():
      if file_name in out:
        raise ValueError(f"Extension {ext.name!r}: plot file {file_name!r} is taken.")
      out[file_name] = fn
  return out


def plot_names() -> list[str]:
  """Every file name a report may write a plot to."""
  return list(makers())


def plot_titles() -> dict:
  """file name -> the title table.md shows for it (plotting.titled), else the file name."""
  return {name: getattr(fn, "title", name) for name, fn in makers().items()}


def write_plots(runs: list, arms, out: str) -> list[str]:
  """Removes the plots an earlier report left in `out`, then writes each plot whose
  data some completed run logged; returns the file names written."""
  written = []
  for name, make in makers().items():
    path = os.path.join(out, name)
    if os.path.exists(path):  # a plot whose data is gone would mislead
      os.remove(path)
    if make(runs, arms, path):
      written.append(name)
  return written
