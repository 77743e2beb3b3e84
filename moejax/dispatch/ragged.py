"""The `ragged_dot` backend: dropless, rows sorted by expert, jax.lax.ragged_dot.

Pairs are sorted by expert without padding; each of the three SwiGLU matmuls is
one `jax.lax.ragged_dot` over the expert groups. Pairs with no expert (id E)
sort last, outside every group, and read back as zero. XLA's CPU and GPU
lowerings of ragged_dot are slow (a dense loop over groups); it is here as the
portable reference of what the Pallas kernels replace, and for TPU, where XLA
lowers it well.
"""

import jax
import jax.numpy as jnp

from moejax.dispatch.gather import dispatch_rows, gather_pairs
from moejax.dispatch.layout import group_sizes


def expert_rows_ragged(x, expert_idx, combine_weights, w_gate, w_up, w_down):
  num_tokens, k = expert_idx.shape
  num_experts = w_gate.shape[0]
  num_pairs = num_tokens * k
  flat = expert_idx.reshape(-1).astype(jnp.int32)
  order = jnp.argsort(flat, stable=True).astype(jnp.int32)
  has_expert = flat[order] < num_experts
  row_pair = jnp.where(has_expert, order, num_pairs)  # rows without an expert read 0
  pair_row = jnp.zeros(num_pairs, jnp.int32).at[order].set(
      jnp.where(has_expert, jnp.arange(num_pairs, dtype=jnp.int32), num_pairs))
  sizes = group_sizes(flat, num_experts)
  dt = x.dtype
  rows = dispatch_rows(x, row_pair, pair_row, k)
  gate = jax.lax.ragged_dot(rows, w_gate.astype(dt), sizes)
  up = jax.lax.ragged_dot(rows, w_up.astype(dt), sizes)
  out_rows = jax.lax.ragged_dot(jax.nn.silu(gate) * up, w_down.astype(dt), sizes)
  out = gather_pairs(out_rows.astype(dt), pair_row, row_pair).reshape(num_tokens, k, -1)
  y = jnp.einsum("tk,tkd->td", combine_weights.astype(jnp.float32), out,
                 preferred_element_type=jnp.float32)
  return y.astype(dt)
