"""Which (group, row tile) pairs a grouped matmul visits, built once per step.

Rows [0, M) of the left operand are split into G contiguous groups (group g
holds rows offsets[g] .. offsets[g+1] - 1, offsets = exclusive cumsum of
group_sizes) and cut into row tiles of tm rows (M % tm == 0). A tile that
straddles a group boundary is visited once per group it touches, and each visit
writes only its group's rows (a masked store), so every row is written by
exactly one visit:

    rows   | g0 g0 g0 g1 | g1 g1 g1 g1 | g1 g3 __ __ |      (g2 empty, __ = tail)
    visits   (g0,t0) (g1,t0) (g1,t1) (g1,t2) (g3,t2) (G,t2)

Rows past sum(group_sizes) form a tail "group" G whose visits store zeros, so
the output is defined everywhere without a second pass. With
visit_empty_groups (the weight-gradient kernel, which writes one [K, N] block
per group), each empty group gets one visit with no rows, so its gradient is
written as zeros rather than left unset.

The number of visits depends on the group sizes, so it is traced; the arrays
have a static length (an upper bound) and visits past `num_visits` repeat the
last real one, so a kernel that skips them (pl.when) also keeps its index maps
on blocks it already holds. The same metadata serves the forward, the input
gradient and the weight gradient of one step (they share the row grouping).
"""

from typing import NamedTuple

import jax
import jax.numpy as jnp


class GroupMetadata(NamedTuple):
  offsets: jax.Array      # [G + 1] int32: group g is rows [offsets[g], offsets[g+1])
  visit_group: jax.Array  # [V] int32: group of each visit; G = the zero tail
  visit_tile: jax.Array   # [V] int32: row tile of each visit (non-decreasing)
  num_visits: jax.Array   # [] int32: visits in use (a prefix of the V entries)


def max_visits(num_rows: int, num_groups: int, tm: int, visit_empty_groups: bool) -> int:
  """Static bound on visits: each group boundary adds at most one revisit of a
  tile (G groups and the tail: G boundaries), and each empty group one visit."""
  tiles = num_rows // tm
  return tiles + num_groups + (num_groups if visit_empty_groups else 0)


def make_group_metadata(group_sizes: jax.Array, num_rows: int, tm: int, *,
                        visit_empty_groups: bool = False) -> GroupMetadata:
  """group_sizes: [G] int (sum <= num_rows); num_rows % tm == 0."""
  if num_rows % tm:
    raise ValueError(f"num_rows={num_rows} is not a multiple of the row tile {tm}; "
                     "pad the rows first.")
  sizes = jnp.asarray(group_sizes, jnp.int32)
  num_groups = sizes.shape[0]
  ends = jnp.cumsum(sizes)
  offsets = jnp.concatenate([jnp.zeros(1, jnp.int32), ends]).astype(jnp.int32)
  total = offsets[-1]
  # The tail is one more group, [total, num_rows).
  starts = offsets
  stops = jnp.concatenate([ends, jnp.array([num_rows], jnp.int32)])
  nonempty = stops > starts
  first = jnp.minimum(starts // tm, num_rows // tm - 1)
  touched = jnp.where(nonempty, (stops - 1) // tm - first + 1, 0)
  if visit_empty_groups:
    touched = touched.at[:num_groups].set(jnp.where(nonempty[:num_groups],
                                                    touched[:num_groups], 1))
  ends_v = jnp.cumsum(touched)
  num_visits = ends_v[-1].astype(jnp.int32)
  bound = max_visits(num_rows, num_groups, tm, visit_empty_groups)
  v = jnp.minimum(jnp.arange(bound, dtype=jnp.int32), num_visits - 1)
  group = jnp.searchsorted(ends_v, v, side="right").astype(jnp.int32)
  tile = first[group] + v - (ends_v[group] - touched[group])
  del total
  return GroupMetadata(offsets, group, tile.astype(jnp.int32), num_visits)


def reference_visits(group_sizes, num_rows: int, tm: int, visit_empty_groups: bool = False):
  """The visit list written out in Python (tests compare against it)."""
  visits, start = [], 0
  for g, size in enumerate(list(group_sizes) + [None]):
    stop = num_rows if size is None else start + int(size)
    if stop > start:
      visits += [(g, t) for t in range(start // tm, (stop - 1) // tm + 1)]
    elif visit_empty_groups and size is not None:
      visits.append((g, min(start // tm, num_rows // tm - 1)))
    start = stop
  return visits
