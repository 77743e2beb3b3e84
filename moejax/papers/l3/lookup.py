"""The L3 soft lookup: each token reads a softmax mixture of the table rows its id owns.

Token id t owns the rows offsets[t] .. offsets[t] + counts[t] - 1 of the tables
K [v, d] and V [v, e] (CSR layout). For a hidden state h of a token with id t:

    z_j = scale * K[row_j] . h                 (scale = 1: the paper has no 1/sqrt(d))
    p   = softmax(z) over the token's own rows
    a   = sum_j p_j V[row_j]                   the read, [e]
    H   = -sum_j p_j log p_j                   its entropy (nats)

The sums are kept as *partials* over the rows one (local part of a) table
holds, so a table split by rows can be combined afterwards (log-sum-exp merge):

    m = max_j z_j,  s = sum_j exp(z_j - m),  u = sum_j exp(z_j - m) z_j,
    numer = sum_j exp(z_j - m) V[row_j]
    a = numer / s,  H = log s + m - u / s

`m` only keeps exp() in range and every result is invariant to it, so it carries
no gradient (stop_gradient; this also keeps the pmax of the sharded merge out of
autodiff). A token with no rows in the local part gets m = NEG, s = u = 0 and
numer = 0, with no NaN or inf in values or gradients. Everything is float32.

Counts must not exceed max_rows: the caller caps them (the allocation clamps
d_t to [1, k]); a larger count would silently drop the token's last rows.
Tied tables (W_K = W_V): pass the same array as keys and values; each path
then gathers the rows once.
"""

from typing import NamedTuple

import jax
import jax.numpy as jnp

# Max score of a token with no rows: finite, so exp(NEG - M) is exactly 0 in
# the merge and never NaN.
NEG = -1e30
_HI = jax.lax.Precision.HIGHEST


class Partials(NamedTuple):
  m: jax.Array      # [T] float32 max score over the rows held (NEG if none)
  s: jax.Array      # [T] sum exp(z - m)
  u: jax.Array      # [T] sum exp(z - m) z
  numer: jax.Array  # [T, e] sum exp(z - m) V_row


def offsets_from_counts(counts):
  """First row of each token id: the exclusive cumulative sum of counts."""
  counts = jnp.asarray(counts, jnp.int32)
  return jnp.cumsum(counts) - counts


def take_rows(table, idx, *, sorted_idx=False, unique=False):
  """table[idx] for [n] indices; an index outside [0, rows) (negative included)
  reads zeros, and its gradient is dropped. The hints go to the gather and to
  the scatter-add of its gradient."""
  dnums = jax.lax.GatherDimensionNumbers(offset_dims=(1,), collapsed_slice_dims=(0,),
                                         start_index_map=(0,))
  return jax.lax.gather(table, idx[:, None].astype(jnp.int32), dnums,
                        (1,) + table.shape[1:], indices_are_sorted=sorted_idx,
                        unique_indices=unique,
                        mode=jax.lax.GatherScatterMode.FILL_OR_DROP, fill_value=0)


def _masked_exp(z, valid, m):
  """exp(z - m) where valid, else 0; the inner where keeps exp finite (its
  gradient would otherwise be 0 * inf = NaN)."""
  return jnp.where(valid, jnp.exp(jnp.where(valid, z - m, 0.0)), 0.0)


def _padded(h, ids, keys, values, offsets, counts, max_rows, row_start, scale):
  """Each token gathers max_rows rows from its first one: [T, max_rows, d + e]."""
  t = ids.shape[0]
  j = jnp.arange(max_rows, dtype=jnp.int32)
  local = (offsets[ids] - row_start)[:, None] + j  # [T, R]
  valid = (j < counts[ids][:, None]) & (local >= 0) & (local < keys.shape[0])
  idx = jnp.where(valid, local, -1).reshape(-1)
  k = take_rows(keys, idx).reshape(t, max_rows, -1).astype(jnp.float32)
  v = k if values is keys else (
      take_rows(values, idx).reshape(t, max_rows, -1).astype(jnp.float32))
  z = scale * jnp.einsum("trd,td->tr", k, h, precision=_HI)
  m = jax.lax.stop_gradient(jnp.max(jnp.where(valid, z, NEG), axis=1))
  e = _masked_exp(z, valid, m[:, None])
  return Partials(m, jnp.sum(e, axis=1), jnp.sum(e * jnp.where(valid, z, 0.0), axis=1),
                  jnp.einsum("tr,tre->te", e, v, precision=_HI))


def _sorted_layout(ids, offsets, counts, max_rows, row_start):
  """The (position, unique slot) pairs of the sorted path, and its unique rows.

  Tokens are sorted by id; a group of n tokens sharing id t (c rows) owns the
  n * c pairs (row j, token r) in row-major order, so valid pairs are sorted by
  row, and each distinct row of the batch has one slot in `urow` (sorted,
  unique). Invalid pairs (j >= count) fill the tail of the P = T * max_rows
  pair list. Returns pair_pos [P], pair_slot [P], pair_valid [P], urow [P]
  (local row indices; slots past the batch's distinct rows, and rows outside
  this part, point outside [0, local rows))."""
  t, r = ids.shape[0], max_rows
  p = t * r
  order = jnp.argsort(ids, stable=True).astype(jnp.int32)
  sid = ids[order]
  c = counts[sid]
  i = jnp.arange(t, dtype=jnp.int32)
  first = jnp.concatenate([jnp.ones((1,), bool), sid[1:] != sid[:-1]])
  start = jax.lax.cummax(jnp.where(first, i, 0))  # first sorted token of the group
  group = jnp.cumsum(first.astype(jnp.int32)) - 1
  size = jax.ops.segment_sum(jnp.ones_like(i), group, t, indices_are_sorted=True)[group]
  pairs_before = jnp.cumsum(c) - c  # valid pairs of earlier sorted tokens
  c_first = jnp.where(first, c, 0)
  slots_before = jnp.cumsum(c_first) - c_first  # distinct rows of earlier groups
  j = jnp.arange(r, dtype=jnp.int32)[None, :]
  valid = j < c[:, None]  # [T, R]
  total = jnp.sum(c)
  dest = jnp.where(valid,
                   pairs_before[start][:, None] + j * size[:, None] + (i - start)[:, None],
                   total + i[:, None] * r + j - pairs_before[:, None] - c[:, None])
  slot = jnp.where(valid, slots_before[start][:, None] + j, p - 1)
  cols = jnp.stack([jnp.broadcast_to(order[:, None], (t, r)), slot,
                    valid.astype(jnp.int32)], axis=-1).reshape(p, 3)
  pairs = jnp.zeros((p, 3), jnp.int32).at[dest.reshape(p)].set(
      cols, indices_are_sorted=False, unique_indices=True)
  # Distinct rows, written by the group's first token; past them, indices that
  # keep rising beyond every row of the table (out of range: zeros).
  num_rows = offsets[-1] + counts[-1]
  urow = num_rows - row_start + jnp.arange(p, dtype=jnp.int32)
  udest = jnp.where(valid & first[:, None], slots_before[:, None] + j, p)
  urow = urow.at[udest.reshape(p)].set(
      (offsets[sid][:, None] + j - row_start).reshape(p), mode="drop")
  return pairs[:, 0], pairs[:, 1], pairs[:, 2].astype(bool), urow


def _sorted(h, ids, keys, values, offsets, counts, max_rows, row_start, scale):
  """Segment softmax over a row-sorted (position, row) pair list."""
  t = ids.shape[0]
  pos, slot, valid, urow = _sorted_layout(ids, offsets, counts, max_rows, row_start)
  rows_here = (urow >= 0) & (urow < keys.shape[0])
  valid = valid & rows_here[slot]
  # Each distinct row is read once (sorted, unique: so is its gradient scatter),
  # then handed to its pairs (sorted slots).
  ku = take_rows(keys, urow, sorted_idx=True, unique=True).astype(jnp.float32)
  vu = ku if values is keys else (
      take_rows(values, urow, sorted_idx=True, unique=True).astype(jnp.float32))
  k = take_rows(ku, slot, sorted_idx=True)
  v = k if values is keys else take_rows(vu, slot, sorted_idx=True)
  z = scale * jnp.sum(k * h[pos], axis=-1)
  m = jax.lax.stop_gradient(
      jax.ops.segment_max(jnp.where(valid, z, NEG), pos, t))
  e = _masked_exp(z, valid, m[pos])
  seg = lambda x: jax.ops.segment_sum(x, pos, t)
  return Partials(m, seg(e), seg(e * jnp.where(valid, z, 0.0)), seg(e[:, None] * v))


def _pallas(h, ids, keys, values, offsets, counts, max_rows, row_start, scale):
  """The Pallas kernel (pallas_kernels/l3_lookup.py); the padded path on TPU,
  where that kernel has no Mosaic body."""
  # Imported here: the kernels import jax.experimental.pallas, which the other
  # paths do not need.
  from pallas_kernels import l3_lookup as kernel
  from pallas_kernels import platform
  if platform.default_variant() == "tpu":
    return _padded(h, ids, keys, values, offsets, counts, max_rows, row_start, scale)
  return Partials(*kernel.lookup_partials(h, ids, keys, values, offsets, counts,
                                          max_rows=max_rows, row_start=row_start,
                                          scale=scale))


PATHS = {"padded": _padded, "sorted": _sorted, "pallas": _pallas}


def lookup_partials(h, ids, keys, values, offsets, counts, *, max_rows: int, path: str,
                    row_start=0, scale: float = 1.0) -> Partials:
  """Partials of the lookup for h [T, d] and ids [T] over the rows
  [row_start, row_start + keys.shape[0]) that keys [L, d] / values [L, e] hold.

  offsets, counts: [vocab] int (global rows); offsets must be the exclusive
  cumsum of counts (offsets_from_counts), as the sorted path's index hints
  rely on larger ids owning later rows. path:
    "padded": each token gathers max_rows rows (masked): [T, max_rows, d + e].
    "sorted": tokens grouped by id (argsort), a flat list of T * max_rows
      (position, row) pairs whose valid ones are sorted by row, softmax by
      segment_max / segment_sum over positions (the paper's sort-by-id
      training trick). What it buys in JAX: each distinct row of the batch is
      gathered once from the table (sorted, unique indices), so the table
      gradient is one sorted, collision-free scatter-add, and repeated ids
      share their rows' reads. What it does not: the pair budget is static,
      T * max_rows, as in the padded path (XLA needs static shapes), and the
      pairs also carry a copy of h, so it holds more memory than padded
      (about P * (2d + e) for the pairs plus P * (d + e) for the distinct rows,
      P = T * max_rows, against P * (d + e)).
    "pallas": a Pallas kernel (pallas_kernels/l3_lookup.py) that loops over
      each token's own rows with an online softmax (no [T, max_rows] buffer)
      and scatter-adds the table gradients atomically; interpret mode off an
      accelerator, and the padded path on TPU.
  """
  if path not in PATHS:
    raise ValueError(f"Unknown L3 lookup path {path!r}; choose one of {sorted(PATHS)}.")
  offsets = jnp.asarray(offsets, jnp.int32)
  counts = jnp.asarray(counts, jnp.int32)
  return PATHS[path](jnp.asarray(h, jnp.float32), jnp.asarray(ids, jnp.int32), keys, values,
                      offsets, counts, max_rows, jnp.asarray(row_start, jnp.int32),
                      scale)


def combine(partials) -> Partials:
  """Merges partials over disjoint row sets: M = max m_i, w_i = exp(m_i - M),
  s = sum w_i s_i (likewise u and numer)."""
  partials = list(partials)
  big_m = jnp.max(jnp.stack([p.m for p in partials]), axis=0)
  w = [jnp.exp(p.m - big_m) for p in partials]
  return Partials(big_m, sum(wi * p.s for wi, p in zip(w, partials)),
                  sum(wi * p.u for wi, p in zip(w, partials)),
                  sum(wi[:, None] * p.numer for wi, p in zip(w, partials)))


def finalize(p: Partials):
  """-> (read = numer / s [T, e], entropy = log s + m - u / s [T]); 0 where s = 0."""
  some = p.s > 0
  s = jnp.where(some, p.s, 1.0)
  read = jnp.where(some[:, None], p.numer / s[:, None], 0.0)
  entropy = jnp.where(some, jnp.log(s) + p.m - p.u / s, 0.0)
  return read, entropy


def lookup(h, ids, keys, values, offsets, counts, *, max_rows: int, path: str = "padded",
           row_start=0, scale: float = 1.0):
  """(read [T, e], entropy [T]) of the whole lookup: finalize(lookup_partials(...))."""
  return finalize(lookup_partials(h, ids, keys, values, offsets, counts,
                                  max_rows=max_rows, path=path, row_start=row_start,
                                  scale=scale))
