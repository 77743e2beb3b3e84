"""The L3 lookup with its tables split by rows over the `expert` mesh axis.

The [v, d] key and [v, e] value tables are split into EP contiguous row blocks,
one per `expert` shard (logical axis "l3_rows"). A token's rows are fixed by its
id and may sit on any shard (or straddle two), so, as moejax/papers/omnimoe/parallel.py does,
every shard gathers the tokens of its `expert` group once (all_gather of h and
ids: (EP - 1) rows of d per local token), computes the lookup partials over the
rows it holds (row_start = shard * v / EP; rows elsewhere count as absent), and
the partials are merged across the group in float32 with the log-sum-exp rule:

    M = pmax(m),  w = exp(m - M),  (s, u, numer) = psum_scatter(w * (s, u, numer))

The reduce-scatter hands each shard back its own tokens ((EP - 1) / EP * (e + 2)
floats per gathered token), and the read and entropy are finalised there. The
max has no gradient (see l3_lookup.py), so the backward pass is the transposes
only: an all_gather of the (e + 2) cotangents and a reduce-scatter of dh.

The cost: every shard evaluates the full pair budget EP * T_l * max_rows of its
group (the foreign rows as masked zeros), i.e. EP times the per-device lookup
work of data parallelism, in exchange for holding 1/EP of the tables and their
optimizer state. Use it when the tables do not fit on one device. Compacting
the local pairs is future work. offsets and counts are replicated.
"""

import jax
import jax.numpy as jnp
from jax.sharding import PartitionSpec as P

from moejax.moe.dispatch.block_swiglu import varying_zeros
from moejax.papers.l3.lookup import Partials, finalize, lookup_partials
from moejax.sharding import BATCH_AXES


def l3_lookup_parallel(h, ids, keys, values, offsets, counts, *, max_rows: int, path: str,
                       scale: float = 1.0, mesh):
  """Same contract as l3_lookup.lookup (h [T, d], ids [T]; returns read [T, e] and
  entropy [T]), with keys/values split by rows over `expert` (values=keys: tied)."""
  ep = mesh.shape["expert"]
  local = keys.shape[0] // ep
  tied = values is keys

  def per_shard(h, ids, offsets, counts, keys, *maybe_values):
    values = keys if tied else maybe_values[0]
    hg = jax.lax.all_gather(h, "expert", axis=0, tiled=True)
    ig = jax.lax.all_gather(ids, "expert", axis=0, tiled=True)
    # One varying-axes type for tokens and tables.
    zero = varying_zeros((), jnp.float32, hg, keys)
    hg = hg.astype(jnp.float32) + zero
    me = jax.lax.axis_index("expert")
    p = lookup_partials(hg, ig, keys, values, offsets, counts, max_rows=max_rows,
                        path=path, row_start=me * local, scale=scale)
    big_m = jax.lax.stop_gradient(jax.lax.pmax(p.m, "expert"))
    w = jnp.exp(p.m - big_m)
    sums = jnp.concatenate([(w * p.s)[:, None], (w * p.u)[:, None], w[:, None] * p.numer],
                           axis=1)
    sums = jax.lax.psum_scatter(sums, "expert", scatter_dimension=0, tiled=True)
    t = h.shape[0]
    mine = jax.lax.dynamic_slice_in_dim(big_m, me * t, t)
    return finalize(Partials(mine, sums[:, 0], sums[:, 1], sums[:, 2:]))

  batch = P(BATCH_AXES)
  tables = (keys,) if tied else (keys, values)
  return jax.shard_map(
      per_shard, mesh=mesh,
      in_specs=(P(BATCH_AXES, None), batch, P(), P()) + (P("expert", None),) * len(tables),
      out_specs=(P(BATCH_AXES, None), batch))(h, ids, offsets, counts, *tables)
