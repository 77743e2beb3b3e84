"""MoHGE's plot for the report: how the routed traffic splits over the expert groups."""

import numpy as np

from moejax import plotting


@plotting.titled("MoHGE group traffic")
def plot_group_traffic(runs: list, arms, path: str) -> bool:
  """MoHGE share of routed pairs per group vs step (one panel per arm, first seed)."""
  prefix = "aux/group_share/layer_"
  groups = plotting.by_arm(runs, arms, lambda r: plotting.prefixed(r.records, prefix))
  if not groups:
    return False
  plt = plotting.pyplot()
  cols = min(len(groups), 2)
  rows = -(-len(groups) // cols)
  fig, axes = plt.subplots(rows, cols, figsize=(6 * cols, 4.2 * rows), squeeze=False,
                           sharey=True)
  for ax in axes.flat[len(groups):]:
    ax.set_axis_off()
  for ax, (arm, mine) in zip(axes.flat, groups.items()):
    run = plotting.first_seed(mine)
    keys = plotting.prefixed(run.records, prefix)
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
  plotting.save(plt, fig, path)
  return True
