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


def to_decoupled(group_major: np.ndarray, num_groups: int) -> np.ndarray:
  """Reorders a group-major [G n] per-expert vector into the decoupled order."""
  v = np.asarray(group_major).reshape(num_groups, -1)
  return np.array([v[g, j] for g, j in expert_order(num_groups, v.shape[1], "decoupled")])
