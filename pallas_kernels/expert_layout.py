"""Where each (token, slot) pair goes when rows are sorted by expert and padded.

Given expert ids [T, k] (an id equal to `num_experts` means "no expert": a
dropped pair or an empty slot), pairs are stably sorted by expert and each
expert's group is padded up to a multiple of `block_size`, so every block of
`block_size` rows belongs to exactly one expert:

    rows:  | e0 e0 e0 __ | e1 e1 e1 e1 | e1 __ __ __ | e3 __ __ __ | ...
           block 0 -> e0  block 1 -> e1  block 2 -> e1  block 3 -> e3

No [tokens, experts, capacity] tensor is built: everything here is an integer
vector of length T*k or rows/blocks. The padded size is static (the worst case,
T*k + E*(block_size - 1) rows rounded up to a block); `num_blocks` says how many
blocks are in use, and the block loop visits only those.
"""

from typing import NamedTuple

import jax
import jax.numpy as jnp


class SortedPairs(NamedTuple):
  """Pairs sorted by expert, unpadded: row r holds pair row_pair[r] (P = none)."""
  row_pair: jax.Array   # [num_rows] int32
  pair_row: jax.Array   # [P] int32: row of each pair; num_rows when it has no expert
  sizes: jax.Array      # [E] int32: pairs per expert


def sort_by_expert(expert_idx: jax.Array, num_experts: int, num_rows: int) -> SortedPairs:
  """Stable sort of the T*k pairs by expert into rows [0, num_rows) (num_rows >= T*k),
  each expert's rows contiguous and unpadded (the ragged_dot / grouped-matmul layout).

  Pairs with no expert (any id outside [0, E)) sort last and get no row; rows
  past the routed pairs hold pair P (none)."""
  flat = expert_idx.reshape(-1).astype(jnp.int32)
  num_pairs = flat.shape[0]
  flat = jnp.where((flat >= 0) & (flat < num_experts), flat, num_experts)
  order = jnp.argsort(flat, stable=True).astype(jnp.int32)
  routed = flat[order] < num_experts
  row_pair = jnp.full(num_rows, num_pairs, jnp.int32).at[:num_pairs].set(
      jnp.where(routed, order, num_pairs))
  pair_row = jnp.zeros(num_pairs, jnp.int32).at[order].set(
      jnp.where(routed, jnp.arange(num_pairs, dtype=jnp.int32), num_rows))
  return SortedPairs(row_pair, pair_row, group_sizes(flat, num_experts))


class BlockLayout(NamedTuple):
  pair_row: jax.Array      # [T*k] padded row of each pair; num_rows if it has no expert
  row_pair: jax.Array      # [num_rows] pair index held by each row; T*k for padding
  block_expert: jax.Array  # [num_rows // block_size] expert of each block
  num_blocks: jax.Array    # scalar: blocks in use (a prefix of the blocks)
  group_sizes: jax.Array   # [E] pairs routed to each expert


def padded_rows(num_pairs: int, num_experts: int, block_size: int) -> int:
  """Static worst-case row count of the padded layout."""
  rows = num_pairs + num_experts * (block_size - 1)
  return -(-rows // block_size) * block_size


def group_sizes(expert_idx: jax.Array, num_experts: int) -> jax.Array:
  """Pairs per expert, [E] int32 (ids equal to num_experts are not counted)."""
  flat = expert_idx.reshape(-1)
  return jnp.bincount(flat, length=num_experts + 1)[:num_experts].astype(jnp.int32)


def block_layout(expert_idx: jax.Array, num_experts: int, block_size: int) -> BlockLayout:
  flat = expert_idx.reshape(-1).astype(jnp.int32)
  num_pairs = flat.shape[0]
  num_rows = padded_rows(num_pairs, num_experts, block_size)
  order = jnp.argsort(flat, stable=True).astype(jnp.int32)
  sorted_expert = flat[order]
  sizes = group_sizes(flat, num_experts)
  padded = -(-sizes // block_size) * block_size
  start = jnp.cumsum(sizes) - sizes
  padded_end = jnp.cumsum(padded)
  padded_start = padded_end - padded
  has_expert = sorted_expert < num_experts
  e = jnp.minimum(sorted_expert, num_experts - 1)
  rank = jnp.arange(num_pairs, dtype=jnp.int32) - start[e]
  row_of_sorted = jnp.where(has_expert, padded_start[e] + rank, num_rows)
  pair_row = jnp.zeros(num_pairs, jnp.int32).at[order].set(row_of_sorted)
  row_pair = jnp.full(num_rows, num_pairs, jnp.int32).at[row_of_sorted].set(
      order, mode="drop")
  num_blocks = (padded_end[-1] // block_size).astype(jnp.int32)
  block_start = jnp.arange(num_rows // block_size, dtype=jnp.int32) * block_size
  block_expert = jnp.searchsorted(padded_end, block_start, side="right")
  block_expert = jnp.minimum(block_expert, num_experts - 1).astype(jnp.int32)
  return BlockLayout(pair_row, row_pair, block_expert, num_blocks, sizes)
