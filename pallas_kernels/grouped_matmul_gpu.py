"""Grouped matmul kernels in Triton-dialect Pallas (whole-array refs, masked stores).

    gmm:   out[r] = lhs[r] @ rhs[g(r)]    (rhs[g(r)]^T with transpose_rhs; 0 past the groups)
    tgmm:  dW[g]  = lhs_g^T dout_g        (0 for an empty group)

A Triton program addresses global memory itself, so no index maps are needed:
each program reads its own scalars from the metadata and slices the operands.

gmm: one program per (visit, n tile). Visit v is (group, row tile) from
group_metadata; the program loops over K in tk steps (lax.fori_loop) into an
f32 [tm, tn] accumulator and stores only the rows of the tile that belong to
its group (a masked store), so programs that share a row tile write disjoint
rows and need no ordering. For the zero tail (group G, rows past
sum(group_sizes)) the loop has zero trips and the store writes zeros. Programs
past num_visits return at once.

tgmm: one program per (group, k tile, n tile), looping over the row tiles the
group touches (a trip count read from the offsets, so the grid does not depend
on the group sizes) with masked loads that read other groups' rows as zeros,
then one store of its [tk, tn] block of dW[g]. An empty group has zero trips
and stores zeros, so no second pass is needed.

Triton needs power-of-two blocks of at least 16 along a dot; grouped_matmul
pads K and N to satisfy this. Float32 inputs take Triton's default dot
precision (TF32 on recent GPUs), as XLA's default does.
"""

import jax
import jax.numpy as jnp
from jax.experimental import pallas as pl
from jax.experimental.pallas import triton as pltriton

from pallas_kernels.group_metadata import GroupMetadata
from pallas_kernels.platform import check_tiles


def _check_tiles(rows: int, k: int, n: int, tiling: tuple[int, int, int]) -> None:
  check_tiles(rows, k, n, tiling)
  if any(t & (t - 1) for t in tiling):
    raise ValueError(f"Tiling {tiling} must be powers of two for the gpu variant.")


def _compiler_params(tiling=None):
  """8 warps for 128 x 128 output tiles and larger, 4 below."""
  big = tiling is not None and tiling[0] * tiling[2] >= 128 * 128
  return pltriton.CompilerParams(num_warps=8 if big else 4, num_stages=3)


def gmm_gpu(lhs: jax.Array, rhs: jax.Array, meta: GroupMetadata, *,
            tiling: tuple[int, int, int], transpose_rhs: bool = False, out_dtype=None,
            interpret: bool = False) -> jax.Array:
  """lhs [M, K] (M % tm == 0), rhs [G, K, N] or [G, N, K] -> [M, N]."""
  tm, tk, tn = tiling
  num_groups = rhs.shape[0]
  n_dim = rhs.shape[1] if transpose_rhs else rhs.shape[2]
  rows, k_dim = lhs.shape
  _check_tiles(rows, k_dim, n_dim, tiling)
  num_k_tiles = k_dim // tk
  num_slots = meta.visit_group.shape[0]
  out_dtype = out_dtype or lhs.dtype
  contract = (((1,), (1,)), ((), ())) if transpose_rhs else (((1,), (0,)), ((), ()))

  def kernel(offsets_ref, visit_group_ref, visit_tile_ref, num_visits_ref, lhs_ref, rhs_ref,
             out_ref):
    v, n = pl.program_id(0), pl.program_id(1)

    @pl.when(v < num_visits_ref[0])
    def _visit():
      group, tile = visit_group_ref[v], visit_tile_ref[v]
      is_tail = group == num_groups
      weights = jnp.minimum(group, num_groups - 1)
      row_block, col_block = pl.ds(tile * tm, tm), pl.ds(n * tn, tn)

      def add_k_tile(k, acc):
        depth = pl.ds(k * tk, tk)
        a = lhs_ref[row_block, depth]
        if transpose_rhs:
          b = rhs_ref[weights, col_block, depth]
        else:
          b = rhs_ref[weights, depth, col_block]
        return acc + jax.lax.dot_general(a, b, contract, preferred_element_type=jnp.float32)

      trips = jnp.where(is_tail, 0, num_k_tiles)
      acc = jax.lax.fori_loop(0, trips, add_k_tile, jnp.zeros((tm, tn), jnp.float32))
      start = offsets_ref[group]
      stop = jnp.where(is_tail, rows, offsets_ref[weights + 1])
      row_ids = tile * tm + jax.lax.broadcasted_iota(jnp.int32, (tm, tn), 0)
      mine = (row_ids >= start) & (row_ids < stop)
      pltriton.store(out_ref.at[row_block, col_block], acc.astype(out_dtype), mask=mine)

  return pl.pallas_call(
      kernel,
      out_shape=jax.ShapeDtypeStruct((rows, n_dim), out_dtype),
      grid=(num_slots, n_dim // tn),
      compiler_params=_compiler_params((tm, tk, tn)),
      interpret=interpret,
  )(meta.offsets, meta.visit_group, meta.visit_tile, jnp.reshape(meta.num_visits, (1,)),
    lhs, rhs)


def tgmm_gpu(lhs: jax.Array, dout: jax.Array, meta: GroupMetadata, *, num_groups: int,
             tiling: tuple[int, int, int], out_dtype=None, interpret: bool = False) -> jax.Array:
  """lhs [M, K], dout [M, N] (M % tm == 0) -> dW [G, K, N]. Reads only meta.offsets."""
  tm, tk, tn = tiling
  rows, k_dim = lhs.shape
  n_dim = dout.shape[1]
  _check_tiles(rows, k_dim, n_dim, tiling)
  if meta.offsets.shape[0] != num_groups + 1:
    raise ValueError(f"Metadata is for {meta.offsets.shape[0] - 1} groups, not {num_groups}; "
                     "build it from the same group_sizes.")
  out_dtype = out_dtype or lhs.dtype

  def kernel(offsets_ref, lhs_ref, dout_ref, out_ref):
    g, k, n = pl.program_id(0), pl.program_id(1), pl.program_id(2)
    start, stop = offsets_ref[g], offsets_ref[g + 1]
    first_tile = start // tm
    end_tile = jnp.where(stop > start, (stop - 1) // tm + 1, first_tile)
    depth, cols = pl.ds(k * tk, tk), pl.ds(n * tn, tn)

    def add_row_tile(t, acc):
      row_block = pl.ds(t * tm, tm)
      row_ids = t * tm + jax.lax.broadcasted_iota(jnp.int32, (tm, 1), 0)
      mine = (row_ids >= start) & (row_ids < stop)
      a = pltriton.load(lhs_ref.at[row_block, depth], mask=jnp.broadcast_to(mine, (tm, tk)),
                        other=0)
      d = pltriton.load(dout_ref.at[row_block, cols], mask=jnp.broadcast_to(mine, (tm, tn)),
                        other=0)
      return acc + jax.lax.dot_general(a, d, (((0,), (0,)), ((), ())),
                                       preferred_element_type=jnp.float32)

    acc = jax.lax.fori_loop(first_tile, end_tile, add_row_tile, jnp.zeros((tk, tn), jnp.float32))
    out_ref[g, depth, cols] = acc.astype(out_dtype)

  return pl.pallas_call(
      kernel,
      out_shape=jax.ShapeDtypeStruct((num_groups, k_dim, n_dim), out_dtype),
      grid=(num_groups, k_dim // tk, n_dim // tn),
      compiler_params=_compiler_params((tm, tk, tn)),
      interpret=interpret,
  )(meta.offsets, lhs, dout)
