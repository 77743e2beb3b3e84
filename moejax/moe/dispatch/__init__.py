"""Token dispatch to experts: one function, backends behind one config switch.

    y, dropped = expert_ffn(backend, x, expert_idx, combine_weights,
                            w_gate, w_up, w_down, block_size=, capacity_factor=)

x: [T, d] tokens; expert_idx: [T, k] (an id equal to E means "no expert");
combine_weights: [T, k]; w_gate, w_up: [E, d, f]; w_down: [E, f, d]. Computes
y_t = sum_j w_tj SwiGLU_{e_tj}(x_t) and returns the number of dropped pairs.

Backends (all equal to a per-token loop in tests, values and gradients):
  sorted      dropless; sort by expert, pad to blocks, block matmuls (default)
  ragged_dot  dropless; jax.lax.ragged_dot over unpadded groups
  capacity    GShard capacity factor; drops pairs past capacity and counts them
  pallas      dropless; the Pallas kernels of pallas_kernels/ (pallas.py)
  auto        the dropless backend measured fastest on this platform (auto.py);
              layers resolve it to a concrete name when they are built
"""

import jax.numpy as jnp

from moejax.moe.dispatch.auto import resolve_backend
from moejax.moe.dispatch.capacity import expert_rows_capacity
from moejax.moe.dispatch.pallas import expert_rows_pallas
from moejax.moe.dispatch.ragged import expert_rows_ragged
from moejax.moe.dispatch.sorted_blocks import expert_rows_sorted
from moejax.registry import Registry

# name -> fn(x, expert_idx, combine_weights, w_gate, w_up, w_down, *, block_size,
#            capacity_factor) -> (y, dropped_pairs)
BACKENDS: Registry = Registry("dispatch backend")
register = BACKENDS.register
# Backends that never drop a pair; evaluation always uses one of these.
DROPLESS: set[str] = set()


def _no_drops():
  return jnp.int32(0)


@register("sorted")
def _sorted(x, expert_idx, combine_weights, w_gate, w_up, w_down, *, block_size,
            capacity_factor):
  del capacity_factor
  return expert_rows_sorted(x, expert_idx, combine_weights, w_gate, w_up, w_down,
                            block_size=block_size), _no_drops()


@register("ragged_dot")
def _ragged(x, expert_idx, combine_weights, w_gate, w_up, w_down, *, block_size,
            capacity_factor):
  del block_size, capacity_factor
  return expert_rows_ragged(x, expert_idx, combine_weights, w_gate, w_up, w_down), _no_drops()


@register("capacity")
def _capacity(x, expert_idx, combine_weights, w_gate, w_up, w_down, *, block_size,
              capacity_factor):
  del block_size
  return expert_rows_capacity(x, expert_idx, combine_weights, w_gate, w_up, w_down,
                              capacity_factor=capacity_factor)


@register("pallas")
def _pallas(x, expert_idx, combine_weights, w_gate, w_up, w_down, *, block_size,
            capacity_factor):
  del block_size, capacity_factor
  return expert_rows_pallas(x, expert_idx, combine_weights, w_gate, w_up, w_down), _no_drops()


@register("auto")
def _auto(x, expert_idx, combine_weights, w_gate, w_up, w_down, *, block_size,
          capacity_factor):
  return BACKENDS.get(resolve_backend("auto"))(
      x, expert_idx, combine_weights, w_gate, w_up, w_down, block_size=block_size,
      capacity_factor=capacity_factor)


DROPLESS.update({"sorted", "ragged_dot", "pallas", "auto"})


def expert_ffn(backend: str, x, expert_idx, combine_weights, w_gate, w_up, w_down, *,
               block_size: int = 0, capacity_factor: float = 1.25):
  return BACKENDS.get(backend)(x, expert_idx, combine_weights, w_gate, w_up, w_down,
                               block_size=block_size, capacity_factor=capacity_factor)
