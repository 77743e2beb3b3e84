"""Grouped matmul kernels in Mosaic TPU style (scalar-prefetched visit lists).

    gmm:   out[r] = lhs[r] @ rhs[g(r)]    (rhs[g(r)]^T with transpose_rhs; 0 past the groups)
    tgmm:  dW[g]  = lhs_g^T dout_g        (0 for an empty group)

A TPU kernel moves whole blocks between HBM and VMEM, and the block each grid
step sees is chosen by its index map before the body runs. The visit list of
group_metadata (which (group, row tile) pairs to visit, in order) is scalar-
prefetched so the index maps can read it: grid step v of the visit axis loads
row tile visit_tile[v] of lhs and the weight block of group visit_group[v].

gmm: grid (n tiles, visits, k tiles), K innermost, an f32 [tm, tn] VMEM
accumulator. At the last k step the visit stores only its group's rows,
`where(row in group, acc, o_ref)`: visits of one row tile are consecutive, so
the output block stays in VMEM across them and each row is set by exactly one
visit before the block goes back to HBM. Visits of the zero tail (group G, rows
past sum(group_sizes)) store zeros and skip the matmul.

tgmm: grid (k tiles, n tiles, visits), visits innermost, an f32 [tk, tn]
accumulator reset at a group's first visit and written to dW[g] at its last.
The output block index only changes between groups, so each [tk, tn] block of
dW[g] is written once. Built with visit_empty_groups, an empty group has one
visit whose row mask is empty, so it writes zeros. Tail visits do nothing.

Visits past num_visits repeat the last real one and are skipped with pl.when;
their index maps (and those of tail visits) hold blocks already fetched, so
they cost no DMA. The row masks are applied to both operands of the
weight gradient, so values in other groups' rows (even inf) cannot leak in.
Selects and the transpose of the lhs block are done in float32 (the form
Mosaic lowers on every TPU generation) and cast back before the MXU.
On a real TPU the blocks must obey the (8, 128) layout rule (tm % 8 == 0, tk
and tn multiples of 128 or the whole dimension); grouped_matmul picks such
tiles when it compiles, interpret mode has no such rule.
"""

import jax
import jax.numpy as jnp
from jax.experimental import pallas as pl
from jax.experimental.pallas import tpu as pltpu

from pallas_kernels.group_metadata import GroupMetadata
from pallas_kernels.platform import check_tiles


def _scalar_args(meta: GroupMetadata) -> tuple[jax.Array, ...]:
  return (meta.offsets, meta.visit_group, meta.visit_tile, jnp.reshape(meta.num_visits, (1,)))


def _rows_in(tile, tm: int, width: int, start, stop) -> jax.Array:
  """[tm, width] bool: rows of row tile `tile` that lie in [start, stop)."""
  rows = tile * tm + jax.lax.broadcasted_iota(jnp.int32, (tm, width), 0)
  return (rows >= start) & (rows < stop)


def _group_rows(block, tile, tm: int, start, stop) -> jax.Array:
  """The block (as f32) with rows outside [start, stop) set to 0."""
  mine = _rows_in(tile, tm, block.shape[1], start, stop)
  return jnp.where(mine, block.astype(jnp.float32), 0.0)


def gmm_tpu(lhs: jax.Array, rhs: jax.Array, meta: GroupMetadata, *,
            tiling: tuple[int, int, int], transpose_rhs: bool = False, out_dtype=None,
            interpret: bool = False) -> jax.Array:
  """lhs [M, K] (M % tm == 0), rhs [G, K, N] or [G, N, K] -> [M, N]."""
  tm, tk, tn = tiling
  num_groups = rhs.shape[0]
  n_dim = rhs.shape[1] if transpose_rhs else rhs.shape[2]
  rows, k_dim = lhs.shape
  check_tiles(rows, k_dim, n_dim, tiling)
  num_k_tiles = k_dim // tk
  num_slots = meta.visit_group.shape[0]
  out_dtype = out_dtype or lhs.dtype

  def k_block(v, k, visit_group, num_visits):
    # Tail and unused visits do no matmul: hold the last K block (no new DMA per k step).
    idle = (visit_group[v] == num_groups) | (v >= num_visits[0])
    return jnp.where(idle, num_k_tiles - 1, k)

  def lhs_map(n, v, k, offsets, visit_group, visit_tile, num_visits):
    return visit_tile[v], k_block(v, k, visit_group, num_visits)

  def rhs_map(n, v, k, offsets, visit_group, visit_tile, num_visits):
    group = jnp.minimum(visit_group[v], num_groups - 1)
    depth = k_block(v, k, visit_group, num_visits)
    return (group, n, depth) if transpose_rhs else (group, depth, n)

  def out_map(n, v, k, offsets, visit_group, visit_tile, num_visits):
    return visit_tile[v], n

  rhs_block = (None, tn, tk) if transpose_rhs else (None, tk, tn)
  contract = (((1,), (1,)), ((), ())) if transpose_rhs else (((1,), (0,)), ((), ()))

  def kernel(offsets, visit_group, visit_tile, num_visits, lhs_ref, rhs_ref, out_ref, acc_ref):
    v, k = pl.program_id(1), pl.program_id(2)
    group, tile = visit_group[v], visit_tile[v]
    in_use = v < num_visits[0]
    is_tail = group == num_groups
    last_k = k == num_k_tiles - 1

    @pl.when(in_use & jnp.logical_not(is_tail))
    def _matmul():
      @pl.when(k == 0)
      def _zero():
        acc_ref[...] = jnp.zeros(acc_ref.shape, jnp.float32)

      acc_ref[...] += jax.lax.dot_general(lhs_ref[...], rhs_ref[...], contract,
                                          preferred_element_type=jnp.float32)

      @pl.when(last_k)
      def _store():
        mine = _rows_in(tile, tm, tn, offsets[group], offsets[group + 1])
        merged = jnp.where(mine, acc_ref[...], out_ref[...].astype(jnp.float32))
        out_ref[...] = merged.astype(out_dtype)

    @pl.when(in_use & is_tail & last_k)
    def _store_tail():
      mine = _rows_in(tile, tm, tn, offsets[num_groups], rows)
      out_ref[...] = jnp.where(mine, 0.0, out_ref[...].astype(jnp.float32)).astype(out_dtype)

  return pl.pallas_call(
      kernel,
      out_shape=jax.ShapeDtypeStruct((rows, n_dim), out_dtype),
      grid_spec=pltpu.PrefetchScalarGridSpec(
          num_scalar_prefetch=4,
          grid=(n_dim // tn, num_slots, num_k_tiles),
          in_specs=[pl.BlockSpec((tm, tk), lhs_map), pl.BlockSpec(rhs_block, rhs_map)],
          out_specs=pl.BlockSpec((tm, tn), out_map),
          scratch_shapes=[pltpu.VMEM((tm, tn), jnp.float32)],
      ),
      compiler_params=pltpu.CompilerParams(
          dimension_semantics=("parallel", "arbitrary", "arbitrary")),
      interpret=interpret,
  )(*_scalar_args(meta), lhs, rhs)


def tgmm_tpu(lhs: jax.Array, dout: jax.Array, meta: GroupMetadata, *, num_groups: int,
             tiling: tuple[int, int, int], out_dtype=None, interpret: bool = False) -> jax.Array:
  """lhs [M, K], dout [M, N] (M % tm == 0) -> dW [G, K, N].

  meta must be built with visit_empty_groups=True, or empty groups are unset."""
  tm, tk, tn = tiling
  rows, k_dim = lhs.shape
  n_dim = dout.shape[1]
  check_tiles(rows, k_dim, n_dim, tiling)
  if meta.offsets.shape[0] != num_groups + 1:
    raise ValueError(f"Metadata is for {meta.offsets.shape[0] - 1} groups, not {num_groups}; "
                     "build it from the same group_sizes.")
  num_slots = meta.visit_group.shape[0]
  out_dtype = out_dtype or lhs.dtype

  def row_block(v, offsets, visit_group, visit_tile):
    # Tail visits do nothing: point them all at the first tail tile (one DMA, not one each).
    first_tail_tile = jnp.minimum(jax.lax.div(offsets[num_groups], tm), rows // tm - 1)
    return jnp.where(visit_group[v] == num_groups, first_tail_tile, visit_tile[v])

  def lhs_map(k, n, v, offsets, visit_group, visit_tile, num_visits):
    return row_block(v, offsets, visit_group, visit_tile), k

  def dout_map(k, n, v, offsets, visit_group, visit_tile, num_visits):
    return row_block(v, offsets, visit_group, visit_tile), n

  def out_map(k, n, v, offsets, visit_group, visit_tile, num_visits):
    return jnp.minimum(visit_group[v], num_groups - 1), k, n

  def kernel(offsets, visit_group, visit_tile, num_visits, lhs_ref, dout_ref, out_ref, acc_ref):
    v = pl.program_id(2)
    group, tile = visit_group[v], visit_tile[v]
    last_visit = num_visits[0] - 1
    first_of_group = (v == 0) | (visit_group[jnp.maximum(v - 1, 0)] != group)
    last_of_group = (v == last_visit) | (visit_group[jnp.minimum(v + 1, num_slots - 1)] != group)

    @pl.when((v <= last_visit) & (group < num_groups))
    def _accumulate():
      @pl.when(first_of_group)
      def _zero():
        acc_ref[...] = jnp.zeros(acc_ref.shape, jnp.float32)

      start, stop = offsets[group], offsets[group + 1]
      lhs_t = _group_rows(lhs_ref[...], tile, tm, start, stop).T.astype(lhs_ref.dtype)
      dout_block = _group_rows(dout_ref[...], tile, tm, start, stop).astype(dout_ref.dtype)
      acc_ref[...] += jnp.dot(lhs_t, dout_block, preferred_element_type=jnp.float32)

      @pl.when(last_of_group)
      def _store():
        out_ref[...] = acc_ref[...].astype(out_dtype)

  return pl.pallas_call(
      kernel,
      out_shape=jax.ShapeDtypeStruct((num_groups, k_dim, n_dim), out_dtype),
      grid_spec=pltpu.PrefetchScalarGridSpec(
          num_scalar_prefetch=4,
          grid=(k_dim // tk, n_dim // tn, num_slots),
          in_specs=[pl.BlockSpec((tm, tk), lhs_map), pl.BlockSpec((tm, tn), dout_map)],
          out_specs=pl.BlockSpec((None, tk, tn), out_map),
          scratch_shapes=[pltpu.VMEM((tk, tn), jnp.float32)],
      ),
      compiler_params=pltpu.CompilerParams(
          dimension_semantics=("parallel", "parallel", "arbitrary")),
      interpret=interpret,
  )(*_scalar_args(meta), lhs, dout)

