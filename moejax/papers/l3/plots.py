"""L3's plot for the report: how evenly each L3 layer reads its table."""

from moejax import plotting


@plotting.titled("L3 entropy")
def plot_l3_entropy(runs: list, arms, path: str) -> bool:
  """Normalised L3 lookup entropy per L3 layer vs step, per arm (seed mean)."""
  prefix = "aux/l3_entropy_norm/"
  groups = plotting.by_arm(runs, arms, lambda r: plotting.prefixed(r.records, prefix))
  if not groups:
    return False
  plt = plotting.pyplot()
  fig, ax = plt.subplots(figsize=(7.5, 4.5))
  styles = ("-", "--", ":", "-.")
  for arm, mine in groups.items():
    color = plotting.arm_colour(arms, arm)
    keys = sorted({k for r in mine for k in plotting.prefixed(r.records, prefix)})
    for j, key in enumerate(keys):
      steps, mean = plotting.seed_mean([plotting.series(r.records, key) for r in mine])
      ax.plot(steps, mean, color=color, ls=styles[j % len(styles)], lw=1.6,
              label=f"{arm} {key.rsplit('/', 1)[-1]}")
  ax.set_xlabel("step")
  ax.set_ylabel("normalised entropy of L3 lookups")
  ax.set_title("L3 table usage per L3 layer (seed mean; 1 = uniform)", fontsize=10)
  ax.legend(fontsize=8)
  ax.grid(alpha=0.3)
  plotting.save(plt, fig, path)
  return True
