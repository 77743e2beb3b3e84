"""The `capacity` backend: GShard/Switch-style fixed expert capacity (drops tokens).

Each expert takes at most C = ceil(capacity_factor * T * k / E) pairs. Priority
goes to first choices, then second choices, ... and within a choice to earlier
tokens (GShard). Pairs past capacity are dropped: their output is zero (the
residual stream carries the token on), and the layer reports how many. The
experts then run as one batched matmul over a dense [E, C, d] buffer. Slots
are found by sorting, so no [tokens, experts, capacity] one-hot is built here
either. Evaluation never uses this backend: the MoE layer switches to a
dropless one.
"""

import math

import jax
import jax.numpy as jnp

from pallas_kernels.row_gather import dispatch_rows, gather_pairs


def capacity(num_pairs: int, num_experts: int, capacity_factor: float) -> int:
  return max(1, math.ceil(capacity_factor * num_pairs / num_experts))


def expert_rows_capacity(x, expert_idx, combine_weights, w_gate, w_up, w_down, *,
                         capacity_factor: float):
  """Returns (y [T, d], dropped pairs: int32 scalar)."""
  num_tokens, k = expert_idx.shape
  num_experts, d_model, _ = w_gate.shape
  num_pairs = num_tokens * k
  cap = capacity(num_pairs, num_experts, capacity_factor)
  num_rows = num_experts * cap
  # Priority order: slot-major (all first choices before any second choice).
  by_priority = expert_idx.T.reshape(-1).astype(jnp.int32)  # [k*T]
  pair_of = (jnp.arange(num_pairs, dtype=jnp.int32) % num_tokens) * k + (
      jnp.arange(num_pairs, dtype=jnp.int32) // num_tokens)
  order = jnp.argsort(by_priority, stable=True)
  sorted_expert = by_priority[order]
  sizes = jnp.bincount(by_priority, length=num_experts + 1)[:num_experts]
  start = jnp.cumsum(sizes) - sizes
  e = jnp.minimum(sorted_expert, num_experts - 1)
  rank = jnp.arange(num_pairs, dtype=jnp.int32) - start[e]
  routed = sorted_expert < num_experts
  kept = routed & (rank < cap)
  slot = jnp.where(kept, e * cap + rank, num_rows).astype(jnp.int32)
  pair_sorted = pair_of[order]
  pair_row = jnp.full(num_pairs, num_rows, jnp.int32).at[pair_sorted].set(slot)
  row_pair = jnp.full(num_rows, num_pairs, jnp.int32).at[slot].set(pair_sorted, mode="drop")
  dt = x.dtype
  rows = dispatch_rows(x, row_pair, pair_row, k).reshape(num_experts, cap, d_model)
  h = jax.nn.silu(jnp.einsum("ecd,edf->ecf", rows, w_gate.astype(dt))) * jnp.einsum(
      "ecd,edf->ecf", rows, w_up.astype(dt))
  out_rows = jnp.einsum("ecf,efd->ecd", h, w_down.astype(dt)).reshape(num_rows, d_model)
  out = gather_pairs(out_rows, pair_row, row_pair).reshape(num_tokens, k, d_model)
  y = jnp.einsum("tk,tkd->td", combine_weights.astype(jnp.float32), out,
                 preferred_element_type=jnp.float32)
  dropped = jnp.sum(routed & ~kept).astype(jnp.int32)
  return y.astype(dt), dropped
