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

from pallas_kernels.row_gather import dispatch_rows, gather_pairs
from pallas_kernels.expert_layout import sort_by_expert


def expert_rows_ragged(x, expert_idx, combine_weights, w_gate, w_up, w_down):
  num_tokens, k = expert_idx.shape
  # Rows past the routed pairs (pairs without an expert) read 0.
  row_pair, pair_row, sizes = sort_by_expert(expert_idx, w_gate.shape[0], num_tokens * k)
  dt = x.dtype
  rows = dispatch_rows(x, row_pair, pair_row, k)
  gate = jax.lax.ragged_dot(rows, w_gate.astype(dt), sizes)
  up = jax.lax.ragged_dot(rows, w_up.astype(dt), sizes)
  out_rows = jax.lax.ragged_dot(jax.nn.silu(gate) * up, w_down.astype(dt), sizes)
  out = gather_pairs(out_rows.astype(dt), pair_row, row_pair).reshape(num_tokens, k, -1)
  y = jnp.einsum("tk,tkd->td", combine_weights.astype(jnp.float32), out,
                 preferred_element_type=jnp.float32)
  return y.astype(dt)
