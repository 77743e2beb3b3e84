"""MoHGE's all-size group-decoupling expert order, and per-shard load under a placement.

Expert parallelism gives shard s the contiguous experts [s E/EP, (s+1) E/EP).
With experts numbered group by group (group-major, "size-sorted"), a shard holds
only the widest or only the narrowest experts. The paper numbers experts as
    e = j G + p,  expert j of group perm[p],  perm = [0, G-1, 1, G-2, 2, ...]
so every run of G consecutive experts has one expert of each width, and
neighbours pair small with large (W_0 + W_{G-1} = W_1 + W_{G-2} = ... for evenly
spaced widths). When n (experts per group) is a multiple of EP, shard s holds
experts j in [s n/EP, (s+1) n/EP) of every group, which is exactly how MoHGE's
per-group weight stacks are split over the `expert` mesh axis (mohge.py).

A shard's load is sum over its experts of tokens_e * W_e (FLOPs up to 6 d).

For an odd G the authors' closed form for an expert's width,
(G + ((e mod G + 1) // 2) (-1)^(e mod 2)) mod G, disagrees with their router's
permutation on every other run of G (it reads e mod 2 where p mod 2 is meant);
we follow the router. The paper uses G = 8, where the two agree.
"""

import numpy as np


def decoupled_group_order(num_groups: int) -> list[int]:
  """perm: [0, G-1, 1, G-2, ...], the group of position p within each run of G."""
  out, lo, hi = [], 0, num_groups - 1
  while lo <= hi:
    out.append(lo)
    if hi != lo:
      out.append(hi)
    lo, hi = lo + 1, hi - 1
  return out


def expert_order(num_groups: int, per_group: int, placement: str) -> list[tuple[int, int]]:
  """(group, j) of each position of the expert axis under a placement."""
  if placement == "sorted":
    return [(g, j) for g in range(num_groups) for j in range(per_group)]
  if placement == "decoupled":
    perm = decoupled_group_order(num_groups)
    return [(perm[p], j) for j in range(per_group) for p in range(num_groups)]
  raise ValueError(f"Unknown placement {placement!r}; use 'decoupled' or 'sorted'.")


def shard_loads(tokens, widths, ep: int, placement: str) -> np.ndarray:
  """tokens: [G, n] tokens per expert (group-major); -> [ep] sum of tokens * width."""
  tokens = np.asarray(tokens, np.float64)
  num_groups, per_group = tokens.shape
  if (num_groups * per_group) % ep:
    raise ValueError(f"{num_groups * per_group} experts do not split over {ep} shards.")
  order = expert_order(num_groups, per_group, placement)
  load = np.array([tokens[g, j] * widths[g] for g, j in order])
  return load.reshape(ep, -1).sum(axis=1)


def from_decoupled(vector, num_groups: int) -> np.ndarray:
  """A decoupled-order [G n] per-expert vector (as the layer logs it) as group-major [G, n]."""
  v = np.asarray(vector, np.float64)
  out = np.zeros((num_groups, v.size // num_groups))
  for value, (g, j) in zip(v, expert_order(num_groups, v.size // num_groups, "decoupled")):
    out[g, j] = value
  return out


def placement_report(tokens, widths, ep_degrees=(2, 4, 8)) -> list[dict]:
  """For each EP degree that divides the experts: per-shard loads (as a share of
  the mean shard) and max/mean, under the decoupled and the size-sorted placement."""
  tokens = np.asarray(tokens, np.float64)
  rows = []
  for ep in ep_degrees:
    if tokens.size % ep:
      continue
    for placement in ("decoupled", "sorted"):
      load = shard_loads(tokens, widths, ep, placement)
      mean = max(load.mean(), 1e-30)
      rows.append(dict(ep=ep, placement=placement, shard_load=(load / mean).round(3).tolist(),
                       max_over_mean=float(load.max() / mean)))
  return rows


def last_expert_loads(records: list[dict]) -> list[tuple[str, list]]:
  """(layer tag, per-expert load in decoupled order) from the last metrics.jsonl
  record that logged expert loads; [] if none did."""
  last = next((r for r in reversed(records)
               if any(k.startswith("aux/expert_load/") for k in r)), None)
  if last is None:
    return []
  layers = sorted(k for k in last if k.startswith("aux/expert_load/"))
  return [(k.rsplit("/", 1)[-1], last[k]) for k in layers]


def _last_expert_loads(workdir: str) -> tuple[dict, list]:
  """The run's config and the last logged per-layer expert loads (decoupled order)."""
  import json  # pylint: disable=import-outside-toplevel
  import os  # pylint: disable=import-outside-toplevel
  from moejax.metrics import read_metrics  # pylint: disable=import-outside-toplevel
  with open(os.path.join(workdir, "config.json")) as f:
    cfg = json.load(f)
  loads = last_expert_loads(read_metrics(workdir))
  if not loads:
    raise SystemExit(f"No aux/expert_load/* in {workdir}/metrics.jsonl; is it a MoHGE run?")
  return cfg, loads


def main(argv) -> None:
  """python -m moejax.papers.mohge.placement --workdir=RUN  (or --widths=... for balanced loads)"""
  from absl import flags  # pylint: disable=import-outside-toplevel
  del argv
  f = flags.FLAGS
  if f.workdir:
    cfg, layers = _last_expert_loads(f.workdir)
    widths = cfg["mohge"]["group_widths"]
    num_groups = len(widths)
    cases = [(name, from_decoupled(v, num_groups)) for name, v in layers]
  else:
    widths = [int(w) for w in f.widths]
    cases = [("balanced", np.ones((len(widths), f.experts_per_group)))]
  print(f"MoHGE shard load (tokens x width per shard / mean shard), widths {widths}")
  for name, tokens in cases:
    for row in placement_report(tokens, widths, [int(e) for e in f.ep]):
      loads = " ".join(f"{x:.3f}" for x in row["shard_load"])
      print(f"{name:>10}  EP={row['ep']}  {row['placement']:>9}  max/mean "
            f"{row['max_over_mean']:.3f}  [{loads}]")


if __name__ == "__main__":
  from absl import app, flags  # pylint: disable=import-outside-toplevel,ungrouped-imports
  flags.DEFINE_string("workdir", "", "A MoHGE run's --workdir (reads its last expert loads).")
  flags.DEFINE_list("widths", ["384", "512", "640", "768", "896", "1024", "1152", "1280"],
                    "Group widths, when no --workdir: balanced loads within each group.")
  flags.DEFINE_integer("experts_per_group", 8, "Experts per group, when no --workdir.")
  flags.DEFINE_list("ep", ["2", "4", "8"], "Expert-parallel degrees to report.")
  app.run(main)
