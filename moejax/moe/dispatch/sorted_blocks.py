"""The `sorted` backend: dropless, sort by expert, pad to blocks, block matmuls.

  1. sort the T*k (token, slot) pairs by expert; pad each group to a multiple
     of block_size (layout.py);
  2. gather token rows into that order (gather.py);
  3. run each block through its expert's SwiGLU (block_swiglu.py);
  4. read each pair's output back and combine: y_t = sum_j w_tj * out_tj.
Pure JAX, the fastest dropless path on CPU, and the reference layout for the
Pallas kernels.
"""

import jax
import jax.numpy as jnp

from moejax.moe.dispatch.block_swiglu import block_swiglu_groups, expert_block_ranges
from pallas_kernels.row_gather import dispatch_rows, gather_pairs
from pallas_kernels.expert_layout import block_layout


def auto_block_size(num_pairs: int, num_experts: int) -> int:
  """A power of two near a quarter of the mean group size, in [16, 256].

  Padding costs block_size/2 rows per expert on average; small blocks cost
  loop overhead. A quarter of the mean group keeps padding near 12%."""
  target = max(num_pairs // max(num_experts, 1) // 4, 1)
  size = 16
  while size * 2 <= min(target, 256):
    size *= 2
  return size


def expert_rows_sorted(x, expert_idx, combine_weights, w_gate, w_up, w_down, *,
                       block_size: int = 0):
  """x [T, d], expert_idx [T, k] (E = no expert), combine_weights [T, k] ->
  (y [T, d] in x.dtype, per-pair outputs are combined in float32): the grouped
  layout with one group of equal-width experts."""
  return expert_rows_sorted_groups(x, expert_idx, combine_weights, [(w_gate, w_up, w_down)],
                                   block_size=block_size)


def expert_rows_sorted_groups(x, expert_idx, combine_weights, groups, *, block_size: int = 0):
  """Experts of different widths in one sorted layout (MoHGE).

  groups: [(w_gate [n_g, d, f_g], w_up, w_down [n_g, f_g, d]), ...]; expert ids
  run group after group (group g holds ids [sum_{h<g} n_h, ... + n_g)). One sort,
  one token gather and one combine for all groups; each group's block loop visits
  only its own experts' blocks, so compute follows the widths chosen, and one
  output buffer serves every group (block_swiglu_groups). With several groups
  the backward recomputes the pre-activations rather than keep [rows, W_g]
  buffers for every group (memory that would grow with the sum of the widths,
  since each group's buffers span all rows)."""
  num_tokens, k = expert_idx.shape
  num_experts = sum(g[0].shape[0] for g in groups)
  block = block_size or auto_block_size(num_tokens * k, num_experts)
  with jax.named_scope("layout"):
    lay = block_layout(expert_idx, num_experts, block)
    first, count = expert_block_ranges(lay.block_expert, lay.num_blocks, num_experts)
  with jax.named_scope("gather"):
    rows = dispatch_rows(x, lay.row_pair, lay.pair_row, k)
  with jax.named_scope("experts"):
    out_rows = block_swiglu_groups(rows, groups, first, count, block,
                                   recompute=len(groups) > 1)
  with jax.named_scope("combine"):
    out = gather_pairs(out_rows, lay.pair_row, lay.row_pair).reshape(num_tokens, k, -1)
    y = jnp.einsum("tk,tkd->td", combine_weights.astype(jnp.float32), out,
                   preferred_element_type=jnp.float32)
  return y.astype(x.dtype)
