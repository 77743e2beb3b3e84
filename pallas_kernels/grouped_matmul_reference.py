"""The grouped matmul and its weight gradient, written plainly in JAX.

Rows [0, M) of lhs are split into G contiguous groups by group_sizes (group g is
rows offsets[g] .. offsets[g+1] - 1, offsets = exclusive cumsum), and

    gmm:   out[r]  = lhs[r] @ rhs[g(r)]          (rhs[g(r)]^T if transpose_rhs)
           out[r]  = 0 for rows past sum(group_sizes)
    tgmm:  dW[g]   = sum_{r in group g} lhs[r]^T dout[r]   (0 for an empty group)

Each group is a row mask and a dense product over all M rows: G times the work
of the kernels, but nothing here shares code or tiling with them, so the tests
that compare the two check the kernels' visit bookkeeping as well as their
arithmetic. Products accumulate in float32. Groups are cut at M (rows past the
end of lhs do not exist), and rows outside a group never enter its sums (not
even as 0 * inf), as in the kernels.
"""

import jax
import jax.numpy as jnp


def group_row_masks(group_sizes: jax.Array, num_rows: int) -> jax.Array:
  """[G, M] bool: mask[g, r] is True when row r belongs to group g."""
  sizes = jnp.asarray(group_sizes, jnp.int32)
  ends = jnp.cumsum(sizes)
  starts = ends - sizes
  rows = jnp.arange(num_rows, dtype=jnp.int32)
  return (rows[None, :] >= starts[:, None]) & (rows[None, :] < ends[:, None])


def gmm_reference(lhs: jax.Array, rhs: jax.Array, group_sizes: jax.Array, *,
                  transpose_rhs: bool = False, preferred_element_type=None) -> jax.Array:
  """lhs [M, K], rhs [G, K, N] (or [G, N, K] with transpose_rhs) -> [M, N]."""
  out_dtype = preferred_element_type or lhs.dtype
  masks = group_row_masks(group_sizes, lhs.shape[0])
  weights = jnp.swapaxes(rhs, 1, 2) if transpose_rhs else rhs

  def add_group(g, acc):
    product = jnp.dot(lhs, weights[g], preferred_element_type=jnp.float32)
    return acc + jnp.where(masks[g][:, None], product, 0.0)

  out = jnp.zeros((lhs.shape[0], weights.shape[2]), jnp.float32)
  out = jax.lax.fori_loop(0, rhs.shape[0], add_group, out)
  return out.astype(out_dtype)


def tgmm_reference(lhs: jax.Array, dout: jax.Array, group_sizes: jax.Array, *,
                   preferred_element_type=None) -> jax.Array:
  """lhs [M, K], dout [M, N] -> dW [G, K, N], dW[g] = lhs_g^T dout_g."""
  out_dtype = preferred_element_type or lhs.dtype
  masks = group_row_masks(group_sizes, lhs.shape[0])
  masked_lhs = jnp.where(masks[:, :, None], lhs[None].astype(jnp.float32), 0.0)
  masked_dout = jnp.where(masks[:, :, None], dout[None].astype(jnp.float32), 0.0)
  grads = jnp.einsum("gmk,gmn->gkn", masked_lhs, masked_dout)
  return grads.astype(out_dtype)
